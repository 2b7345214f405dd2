"""Stage train_aff: trains the aff network (see stages/training.py)."""

from affinity_jax.stages import common
from affinity_jax.stages.training import run_training


def run(cfg) -> dict:
  return run_training(cfg, common.AFF_NET)
