"""Stage train_aff: AffinityNet on the pair labels of the confident CAM regions.

The method: docs/method.md §4, §5.

Batches of `aff_train` (image and its la / ha score maps flipped and cropped together, affinity
labels on the stride-8 grid), the images resized by `aff.image_scale`; the loss compares the
affinities of every pair within the radius with their labels. Writes `{workdir}/aff_net/final`.

With `method` "irn" (docs/method.md §11) it trains IRN's relation network instead
(models.RelationNet, its backbone frozen) on `relation_train` batches (image and IRN's
confident-region label rescaled, flipped and cropped together, the label reduced to stride 4),
with losses.relation_training_loss (the affinity of every pair within aff.radius against the
label's pairs, and the displacement field's two losses); then, as IRN does, the displacement
field's mean over the training images (`mean_shift`), which inference subtracts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import artifacts, config, data, geometry, losses, models, pictures
from affinity_jax.compilation import jit
from affinity_jax.data import pipelines
from affinity_jax.errors import UserError
from affinity_jax.models import relation_net
from affinity_jax.stages.training import TrainingSpec, run_training

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("seed", "model", "init", "aff", "data.train_split", "data.shuffle_buffer")
# With method irn, also: the mean displacement leaves out images larger than the canvas.
IRN_READS = ("data.canvas",)
CONSUMES = ("aff_labels", "train_cam")
# The version of this stage's code: bumped when the same inputs give other outputs
# (fingerprints.py). 2: black crop fill, PIL's pixels and resize.
VERSION = 2
# With method irn: 3, the relation network's mean displacement measured after training.
IRN_VERSION = 3


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


def boundary_map(features: jax.Array, radius: int) -> jax.Array:
  """[B, h, w, D] affinity features -> [B, h, w]: 1 - the mean affinity of each position to
  its neighbours within `radius` (those inside the grid): near 1 where the network separates a
  position from what surrounds it (an object's outline), near 0 inside a region."""
  _, h, w, _ = features.shape
  forward = geometry.pair_affinities(features, radius=radius, scheme="full")
  mask = geometry.pair_mask(h, w, radius=radius, scheme="full").astype(forward.dtype)[None]
  # Both sums include the identity (1) first.
  total = jnp.sum(geometry.symmetric_affinities(forward, radius=radius), axis=-1) - 1.0
  count = jnp.sum(geometry.symmetric_affinities(mask, radius=radius), axis=-1) - 1.0
  return 1.0 - total / jnp.maximum(count, 1.0)


def affinity_pictures(cfg, model):
  """What TensorBoard shows of AffinityNet (`aff.image_every`): each image of the fixed batch
  beside its `boundary_map` in heat colours (bilinear from stride 8), so that the outlines the
  network learns to see appear."""
  radius = int(cfg.aff.radius)
  convention = models.input_convention(cfg)

  @jit
  def boundary(variables, images):
    features = model.apply(variables, images).astype(jnp.float32)
    return jax.image.resize(boundary_map(features, radius), images.shape[:3], "bilinear")

  return _boundary_pictures(boundary, convention)


def _boundary_pictures(boundary, convention: str):
  """TensorBoard's draw(variables, batch): each image beside its boundary map in heat colours,
  `boundary(variables, images)` [B, H, W] in [0, 1]."""
  def draw(variables, batch):
    edges = np.asarray(boundary(variables, batch["image"]))
    images = models.denormalize_images(batch["image"], convention)
    return {"boundaries": np.stack([pictures.side_by_side(im, pictures.heat(b))
                                    for im, b in zip(images, edges)])}
  return draw


def relation_batches(cfg, builder, start, batch_size, process_index, process_count):
  c = cfg.aff
  workdir = artifacts.Workdir(cfg.workdir)
  return pipelines.relation_train(
      builder, cfg.data.train_split, workdir.path(artifacts.AFF_LABELS), batch_size=batch_size,
      crop_size=c.crop_size, scale_range=tuple(c.scale_range),
      color_jitter=tuple(c.color_jitter), seed=cfg.seed, start_step=start,
      shuffle_buffer=cfg.data.shuffle_buffer, exclude=artifacts.skipped_by(workdir, "aff_labels"),
      process_index=process_index, process_count=process_count,
      convention=models.input_convention(cfg))


def relation_pictures(cfg, model):
  """What TensorBoard shows of the relation network (`aff.image_every`): each image of the
  fixed batch beside its boundary map (the sigmoid of the boundary logits, bilinear from
  stride 4) in heat colours."""
  convention = models.input_convention(cfg)

  @jit
  def boundary(variables, images):
    edges, _ = model.apply(variables, images)
    return jax.image.resize(jax.nn.sigmoid(edges), images.shape[:3], "bilinear")

  return _boundary_pictures(boundary, convention)


def mean_shift(cfg, model, variables) -> dict:
  """`variables` with the relation network's mean displacement (batch_stats mean_shift/mean),
  measured as IRN's train_irn.py measures it after training, but over data.train_split (IRN:
  its infer_list, VOC train; our VOC configs train on train_aug): the mean of the displacement
  field (the network in inference mode, its mean shift still zero) over the training split's
  images, each at scale 1 (or aff.image_scale, as the walk sees them) at the top-left of an
  aff.crop_size square of zeros (cut there when larger; IRN's crop_method "top_left"), the
  whole square's grid averaged, in batches of aff.batch_size of which a last partial one is
  dropped (IRN's drop_last) but one batch is always taken. Images larger than data.canvas,
  which inference does not load, are left out."""
  crop = int(cfg.aff.crop_size)
  builder = data.from_config(cfg)
  names = data.split_names(builder, cfg.data.train_split)
  batch_size = int(cfg.aff.batch_size)
  names = names[:max(batch_size, len(names) // batch_size * batch_size)]
  scale = config.aff_image_scale(cfg)
  # Resized, at least the crop (pipelines.canvas_for_scale).
  canvas = tuple(max(int(c), int(np.ceil(crop / scale))) for c in cfg.data.canvas)

  @jit
  def field(variables, images):
    _, displacement = model.apply(variables, images)
    return jnp.mean(displacement, axis=(1, 2), dtype=jnp.float32)

  sums, count = np.zeros(2, np.float64), 0
  for batch in pipelines.inference(builder, cfg.data.train_split, scales=(scale,), canvas=canvas,
                                   batch_size=batch_size, names=names,
                                   convention=models.input_convention(cfg)):
    keep = np.asarray(batch["valid"], bool)
    if not keep.any():
      continue
    images = np.asarray(batch["image_s0"])[keep, :crop, :crop]
    means = np.asarray(field(variables, images), np.float64)
    sums += means.sum(0)
    count += len(means)
  if not count:
    raise UserError(f"no image of {cfg.data.train_split} fits the canvas {canvas} "
                    "(data.canvas): the relation network's mean displacement needs one")
  variables = jax.tree.map(lambda x: x, variables)  # a copy whose leaves can be replaced
  variables["batch_stats"][relation_net.MEAN_SHIFT]["mean"] = (sums / count).astype(np.float32)
  print(f"[{artifacts.RELATION_NET.folder}] mean displacement (dy, dx) over {count} training "
        f"images: {sums[0] / count:.4f}, {sums[1] / count:.4f}", flush=True)
  return variables


RELATION_SPEC = TrainingSpec(
    network=artifacts.RELATION_NET,
    loss=lambda cfg: losses.relation_training_loss(int(cfg.aff.radius), cfg.aff.scheme),
    batches=relation_batches, backbone_from_cam_net=True, pictures=relation_pictures,
    frozen_backbone=True, finish=mean_shift)

SPEC = TrainingSpec(network=artifacts.AFF_NET,
                    loss=lambda cfg: losses.affinity_training_loss(cfg.aff.radius,
                                                                   cfg.aff.scheme),
                    batches=batches,
                    backbone_from_cam_net=True, pictures=affinity_pictures)


def run(cfg) -> dict:
  return run_training(cfg, RELATION_SPEC if config.method(cfg) == "irn" else SPEC)
