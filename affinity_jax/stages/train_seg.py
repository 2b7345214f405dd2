"""Stage train_seg: the segmentation network on the random walk's pseudo labels.

The method: docs/method.md §7.

Batches of `seg_train` (image and pseudo label scaled, flipped and cropped together; 255
ignored); cross-entropy of the stride-8 logits upsampled to the label. Writes
`{workdir}/seg_net/final`.
"""

from __future__ import annotations

from affinity_jax import artifacts, losses, models
from affinity_jax.data import pipelines
from affinity_jax.stages.training import TrainingSpec, run_training

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("seed", "model", "init", "seg", "data.train_split", "data.shuffle_buffer")
CONSUMES = ("random_walk", "train_cam")
# The version of this stage's code: bumped when the same inputs give other outputs
# (fingerprints.py). 2: PIL's JPEG pixels, the original's long-side size rule.
VERSION = 2


def batches(cfg, builder, start, batch_size, process_index, process_count):
  c = cfg.seg
  workdir = artifacts.Workdir(cfg.workdir)
  return pipelines.seg_train(
      builder, cfg.data.train_split, workdir.path(artifacts.PSEUDO_LABELS),
      batch_size=batch_size, crop_size=c.crop_size, scale_range=tuple(c.scale_range),
      seed=cfg.seed, start_step=start, shuffle_buffer=cfg.data.shuffle_buffer,
      exclude=artifacts.skipped_by(workdir, "random_walk"), process_index=process_index,
      process_count=process_count, convention=models.input_convention(cfg))


SPEC = TrainingSpec(network=artifacts.SEG_NET, loss=lambda cfg: losses.seg_training_loss,
                    batches=batches, backbone_from_cam_net=True)


def run(cfg) -> dict:
  return run_training(cfg, SPEC)
