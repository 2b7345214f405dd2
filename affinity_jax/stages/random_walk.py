"""Stage random_walk: pseudo labels by propagating CAMs over AffinityNet's affinities.

The method: docs/method.md §6.

For a batch of canvases: AffinityNet features at stride 8 of the image resized by
`aff.image_scale` (the original: 1, the image as it is), the CAM stack (background
(1 - max)^alpha + classes) resized likewise and pooled by 8 onto each image's own grid, the sparse
walk of 2^logt steps with positions outside the image excluded, bilinear upsampling of the padded
grid to the original resolution (cam.walk_to_image), crop, argmax; with `random_walk.crf` (the
paper's refinement, docs/method.md §6) the argmax of the dCRF marginals of the walked scores
(background and present classes, divided by their sum) instead. Writes
`{workdir}/pseudo_labels/{name}.png` (0 background, c + 1 class c) and, for the first
`eval.panels` images of each split, the walked foreground heat map for pictures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import artifacts, cam, checkpoint, config, crf, data, geometry
from affinity_jax import random_walk as rw
from affinity_jax.constants import STRIDE
from affinity_jax.stages import per_image

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("model", "random_walk.beta", "random_walk.logt", "random_walk.alpha",
         "random_walk.radius", "random_walk.scheme", "random_walk.tol", "random_walk.crf",
         "random_walk.crf_iters", "aff.image_scale", "data.canvas")
CONSUMES = ("train_aff", "infer_cam")
# The version of this stage's code: bumped when the same inputs give other outputs
# (fingerprints.py). 2: the exact canvas forward, the original's pair set per image.
VERSION = 2


def make_walk_fn(model, cfg):
  radius, scheme = int(cfg.random_walk.radius), cfg.random_walk.scheme
  t, beta = 2 ** int(cfg.random_walk.logt), float(cfg.random_walk.beta)
  tol = float(cfg.random_walk.tol) if cfg.random_walk.tol > 0 else None
  with_scores = bool(cfg.random_walk.crf)

  @jax.jit
  def walk(variables, images, cams, valid, sizes, ry, rx):
    # The original pads an image only to a multiple of 8 (not to the canvas): `sizes` [B, 2]
    # = 8 * each image's grid makes the network's canvas forward equal that (models/canvas.py),
    # `valid` [B, h, w] its grid (VGG-16's GroupNorm statistics, the walk).
    features = model.apply(variables, images, valid=valid, sizes=sizes).astype(jnp.float32)
    aff_sym = geometry.neighbourhood_affinities(features, radius=radius, scheme=scheme,
                                                valid=valid)
    walked = rw.propagate(aff_sym, cams, radius=radius, beta=beta, t=t, valid=valid, tol=tol)
    up = cam.upsample(walked, ry, rx)
    labels = jnp.argmax(up, axis=-1).astype(jnp.uint8)
    share = up / jnp.maximum(jnp.sum(up, axis=-1, keepdims=True), 1e-12)
    # The scores leave the device only for the dCRF (a 21-channel canvas per image on VOC).
    return labels, jnp.max(share[..., 1:], axis=-1), (share if with_scores else None)
  return walk


def crf_label(image: np.ndarray, share: np.ndarray, label: np.ndarray, iters: int) -> np.ndarray:
  """[H, W] pseudo label from dCRF on the walked scores `share` [H, W, 1 + C] (summing to one
  at each pixel) of the background and the image's classes `label` [C] (> 0 present)."""
  channels = np.concatenate([[0], np.flatnonzero(np.asarray(label) > 0) + 1])
  q = crf.crf_inference(np.ascontiguousarray(image), share[..., channels], t=iters)
  return channels[np.argmax(q, axis=-1)].astype(np.uint8)


def run(cfg) -> dict:
  workdir = artifacts.Workdir(cfg.workdir)
  out_dir = workdir.path(artifacts.PSEUDO_LABELS)
  builder = data.from_config(cfg)
  num_classes = cfg.model.num_classes
  scale = config.aff_image_scale(cfg)
  alpha = float(cfg.random_walk.alpha)
  panel_names = {n for split in cfg.data.pseudo_splits
                 for n in data.split_names(builder, split)[:cfg.eval.panels]}
  model = None
  written = 0
  report = artifacts.SkipReport(workdir, "random_walk", jax.process_index() == 0)
  for batch, batch_names, keep in per_image.pending(
      cfg, builder, cfg.data.pseudo_splits, out_dir, ".png", scales=(scale,),
      batch_size=cfg.random_walk.batch_size, report=report):
    if model is None:
      model, variables = checkpoint.load_network(cfg, artifacts.AFF_NET)
      walk = make_walk_fn(model, cfg)
    images = batch["image_s0"]
    b, hc8, wc8 = images.shape[0], images.shape[1] // STRIDE, images.shape[2] // STRIDE
    sizes = np.asarray(batch["orig_size"])
    scaled = np.asarray(batch["size_s0"])
    cams = np.zeros((b, hc8, wc8, num_classes + 1), np.float32)
    for i in list(keep):
      if not artifacts.has_positive_class(batch["label"][i]):
        report.skip(batch_names[i], artifacts.NO_POSITIVE_CLASS)
        keep.remove(i)
        continue
      path = workdir.cam(batch_names[i])
      full = artifacts.load_cam(path, num_classes)
      mismatch = artifacts.cam_size_mismatch(path, full.shape[:2], sizes[i])
      if mismatch:
        report.skip(batch_names[i], mismatch)
        keep.remove(i)
        continue
      if scale != 1.0:
        full = cam.resize_bilinear(full, scaled[i])
      stack = np.asarray(rw.prepare_cam(full, alpha=alpha))
      cams[i, :stack.shape[0], :stack.shape[1]] = stack
    if not keep:
      continue
    grid = np.stack([[cam.grid_size(h), cam.grid_size(w)] for h, w in scaled])
    valid = cam.valid_mask(grid, (hc8, wc8))
    ry, rx = cam.walk_to_image(grid, sizes, scaled, (hc8, wc8), scale)
    labels, heat, share = walk(variables, images, cams, valid, grid * STRIDE, ry, rx)
    labels, heat = np.asarray(labels), np.asarray(heat)
    if share is not None:
      share = np.asarray(share)
      artifacts.require_finite(workdir, artifacts.AFF_NET, share[keep],
                               [batch_names[i] for i in keep], "the walk gives non-finite scores")
    for i in keep:
      h, w = sizes[i]
      label = labels[i, :h, :w]
      if share is not None:
        label = crf_label(batch["raw"][i, :h, :w], share[i, :h, :w], batch["label"][i],
                          int(cfg.random_walk.crf_iters))
      artifacts.save_label(workdir.pseudo_label(batch_names[i]), label)
      if batch_names[i] in panel_names:
        artifacts.save_walk_heat(workdir.walk_heat(batch_names[i]), heat[i, :h, :w])
      written += 1
  print(f"[random_walk] wrote {written} pseudo labels to {out_dir}")
  return report.finish({"written": written})
