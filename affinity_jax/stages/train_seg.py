"""Stage train_seg: trains the seg network (see stages/training.py)."""

from affinity_jax.stages import common
from affinity_jax.stages.training import run_training


def run(cfg) -> dict:
  return run_training(cfg, common.SEG_NET)
