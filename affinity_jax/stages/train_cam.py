"""Stage train_cam: the classification network whose classifier gives the CAMs.

The method: docs/method.md §2, §8.

Trained on image-level labels with the multilabel soft margin loss, on `cls_train` batches
(random long-side resize, flip, colour jitter, crop). Writes `{workdir}/cam_net/final`.
"""

from __future__ import annotations

from affinity_jax import artifacts, losses, models
from affinity_jax.data import pipelines
from affinity_jax.stages.training import TrainingSpec, run_training

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("seed", "model", "init.backbone", "init.freeze_stem", "cam", "data.train_split",
         "data.shuffle_buffer")
CONSUMES = ()
# The version of this stage's code: bumped when the same inputs give other outputs
# (fingerprints.py). 2: PIL bicubic resize and PIL's JPEG pixels in its batches.
VERSION = 2


def loss(logits, batch):
  """Multilabel soft margin on image-level labels."""
  return losses.multilabel_soft_margin_loss(logits, batch["label"]), {}


def batches(cfg, builder, start, batch_size, process_index, process_count):
  c = cfg.cam
  return pipelines.cls_train(
      builder, cfg.data.train_split, batch_size=batch_size, crop_size=c.crop_size,
      resize_long=tuple(c.resize_long), color_jitter=tuple(c.color_jitter), seed=cfg.seed,
      start_step=start, shuffle_buffer=cfg.data.shuffle_buffer, process_index=process_index,
      process_count=process_count, convention=models.input_convention(cfg))


SPEC = TrainingSpec(network=artifacts.CAM_NET, loss=lambda cfg: loss, batches=batches)


def run(cfg) -> dict:
  return run_training(cfg, SPEC)
