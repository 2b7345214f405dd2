"""Stage train_cam: the classification network whose classifier gives the CAMs.

The method: docs/method.md §2, §8.

Trained on image-level labels with the multilabel soft margin loss, on `cls_train` batches
(random long-side resize, flip, colour jitter, crop). Writes `{workdir}/cam_net/final`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import artifacts, cam, losses, models, pictures
from affinity_jax.compilation import jit
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


def batches(cfg, builder, start, batch_size, process_index, process_count):
  c = cfg.cam
  return pipelines.cls_train(
      builder, cfg.data.train_split, batch_size=batch_size, crop_size=c.crop_size,
      resize_long=tuple(c.resize_long), color_jitter=tuple(c.color_jitter), seed=cfg.seed,
      start_step=start, shuffle_buffer=cfg.data.shuffle_buffer, process_index=process_index,
      process_count=process_count, convention=models.input_convention(cfg))


def cam_pictures(cfg, model):
  """What TensorBoard shows of the CAM network (`cam.image_every`): each image of the fixed
  batch beside its CAM laid over it in heat colours: the largest over the image's classes,
  each divided by its own maximum (cam.normalise, as infer_cam), bilinear from stride 8."""
  convention = models.input_convention(cfg)

  @jit
  def cam_heat(variables, images, labels):
    cams = model.apply(variables, images, method="cam")
    heat = jnp.max(cam.normalise(cams, labels, jnp.ones(cams.shape[:3], bool)), axis=-1)
    return jax.image.resize(heat, images.shape[:3], "bilinear")

  def draw(variables, batch):
    heat = np.asarray(cam_heat(variables, batch["image"], batch["label"]))
    images = models.denormalize_images(batch["image"], convention)
    return {"cams": np.stack([pictures.side_by_side(im, pictures.heat_overlay(im, h))
                              for im, h in zip(images, heat)])}
  return draw


SPEC = TrainingSpec(network=artifacts.CAM_NET, loss=lambda cfg: losses.cam_training_loss,
                    batches=batches, pictures=cam_pictures)


def run(cfg) -> dict:
  return run_training(cfg, SPEC)
