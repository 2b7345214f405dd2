"""Stage train_aff: AffinityNet on the pair labels of the confident CAM regions.

The method: docs/method.md §4, §5.

Batches of `aff_train` (image and its la / ha score maps flipped and cropped together, affinity
labels on the stride-8 grid), the images resized by `aff.image_scale`; the loss compares the
affinities of every pair within the radius with their labels. Writes `{workdir}/aff_net/final`.
"""

from __future__ import annotations

import jax.numpy as jnp

from affinity_jax import artifacts, config, geometry, losses, models
from affinity_jax.data import pipelines
from affinity_jax.stages.training import TrainingSpec, run_training

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("seed", "model", "init", "aff", "data.train_split", "data.shuffle_buffer")
CONSUMES = ("aff_labels", "train_cam")
# The version of this stage's code: bumped when the same inputs give other outputs
# (fingerprints.py). 2: black crop fill, PIL's pixels and resize.
VERSION = 2


def make_loss(radius: int, scheme: str):
  """(features [B, h, w, D], batch with "aff_label" [B, h, w]) -> (loss, its three parts)."""
  def aff_loss(features, batch):
    features = features.astype(jnp.float32)
    aff = geometry.pair_affinities(features, radius=radius, scheme=scheme)
    pairs = geometry.pair_labels(batch["aff_label"], radius=radius, scheme=scheme)
    return losses.affinity_loss(aff, pairs["fg_pos"], pairs["bg_pos"], pairs["neg"])
  return aff_loss


def batches(cfg, builder, start, batch_size, process_index, process_count):
  c = cfg.aff
  workdir = artifacts.Workdir(cfg.workdir)
  return pipelines.aff_train(
      builder, cfg.data.train_split, workdir.path(artifacts.AFF_LABELS), batch_size=batch_size,
      crop_size=c.crop_size, color_jitter=tuple(c.color_jitter),
      image_scale=config.aff_image_scale(cfg), seed=cfg.seed, start_step=start,
      shuffle_buffer=cfg.data.shuffle_buffer,
      exclude=artifacts.skipped_by(workdir, "aff_labels"), process_index=process_index,
      process_count=process_count, convention=models.input_convention(cfg))


SPEC = TrainingSpec(network=artifacts.AFF_NET,
                    loss=lambda cfg: make_loss(cfg.aff.radius, cfg.aff.scheme), batches=batches,
                    backbone_from_cam_net=True)


def run(cfg) -> dict:
  return run_training(cfg, SPEC)
