"""Stage random_walk: pseudo labels by propagating CAMs over AffinityNet's affinities (step 6).

For a batch of canvases: AffinityNet features at stride 8 of the image resized by
`aff.image_scale` (the original: 1, the image as it is), the CAM stack (background
(1 - max)^alpha + classes) resized likewise and pooled by 8 onto each image's own grid, the sparse
walk of 2^logt steps with positions outside the image excluded, bilinear upsampling of the padded
grid to the original resolution, crop, argmax. Writes `{workdir}/pseudo_labels/{name}.png`
(uint8: 0 background, c + 1 class c) and, for the first `eval.panels` images of each split,
the walked foreground heat map for pictures.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import geometry, io
from affinity_jax import random_walk as rw
from affinity_jax.stages import common, inference
from affinity_jax.stages.infer_cam import load_cam


def make_walk_fn(model, cfg):
  radius, scheme = int(cfg.random_walk.radius), cfg.random_walk.scheme
  t, beta = 2 ** int(cfg.random_walk.logt), float(cfg.random_walk.beta)
  tol = float(cfg.random_walk.tol) if cfg.random_walk.tol > 0 else None

  @jax.jit
  def walk(variables, images, cams, valid, ry, rx):
    features = model.apply(variables, images).astype(jnp.float32)
    aff_sym = geometry.neighbourhood_affinities(features, radius=radius, scheme=scheme,
                                                valid=valid)
    walked = rw.propagate(aff_sym, cams, radius=radius, beta=beta, t=t, valid=valid, tol=tol)
    up = inference.upsample(walked, ry, rx)
    labels = jnp.argmax(up, axis=-1).astype(jnp.uint8)
    share = up / jnp.maximum(jnp.sum(up, axis=-1, keepdims=True), 1e-12)
    return labels, jnp.max(share[..., 1:], axis=-1)
  return walk


def run(cfg) -> dict:
  from affinity_jax.data import pipelines
  out_dir = common.path(cfg, common.PSEUDO_LABELS)
  cam_dir = common.path(cfg, common.CAMS)
  builder = common.builder(cfg)
  num_classes = cfg.model.num_classes
  scale = common.aff_image_scale(cfg)
  model = variables = walk = None
  written = 0
  report = common.SkipReport(cfg, "random_walk")
  for split in cfg.data.pseudo_splits:
    names = common.split_names(cfg, split)
    panel_names = set(names[:cfg.eval.panels])
    todo = set(common.missing(names, out_dir, ".png"))
    if not todo:
      print(f"[random_walk] {split}: all pseudo labels present in {out_dir}")
      continue
    if model is None:
      model, variables = common.load_trained(cfg, common.AFF_NET)
      walk = make_walk_fn(model, cfg)
    for batch in pipelines.inference(builder, split, scales=(scale,), canvas=tuple(cfg.data.canvas),
                                     batch_size=cfg.random_walk.batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
      batch_names = inference.batch_names(batch)
      keep = [i for i, n in enumerate(batch_names) if batch["valid"][i] and n in todo]
      images = batch["image_s0"]
      b, hc8, wc8 = images.shape[0], images.shape[1] // 8, images.shape[2] // 8
      sizes = np.asarray(batch["orig_size"])
      scaled = np.asarray(batch["size_s0"])
      cams = np.zeros((b, hc8, wc8, num_classes + 1), np.float32)
      for i in list(keep):
        path = os.path.join(cam_dir, batch_names[i] + ".npz")
        if not common.has_positive_class(batch["label"][i]):
          report.skip(batch_names[i], common.NO_POSITIVE_CLASS)
          keep.remove(i)
          continue
        if not os.path.exists(path):
          raise FileNotFoundError(f"{path} is missing: run the infer_cam stage first")
        cam = load_cam(path, num_classes)
        if cam.shape[:2] != tuple(sizes[i]):
          report.skip(batch_names[i], f"{path}: CAM is {cam.shape[0]}x{cam.shape[1]} but the "
                      f"image is {sizes[i][0]}x{sizes[i][1]} (delete it and rerun infer_cam)")
          keep.remove(i)
          continue
        if scale != 1.0:
          cam = inference.resize_bilinear(cam, scaled[i])
        stack = np.asarray(rw.prepare_cam(cam, alpha=float(cfg.random_walk.alpha)))
        cams[i, :stack.shape[0], :stack.shape[1]] = stack
      if not keep:
        continue
      grid = np.stack([[inference.grid_size(h), inference.grid_size(w)] for h, w in scaled])
      valid = ((np.arange(hc8)[None, :, None] < grid[:, 0, None, None]) &
               (np.arange(wc8)[None, None, :] < grid[:, 1, None, None]))
      # The padded grid covers grid * 8 scaled pixels, i.e. grid * 8 * orig / scaled original
      # ones (>= the image): upsample to that, then crop. At scale 1 this is grid * 8.
      out_sizes = np.round(grid * 8 * sizes / np.maximum(scaled, 1)).astype(np.int64)
      out_hw = images.shape[1:3]  # One compiled shape per run: the canvas's, not the batch's.
      if scale != 1.0:
        out_hw = tuple(int(math.ceil(n * 8 / scale)) + 1 for n in (hc8, wc8))
      ry, rx = inference.upsample_matrices(grid * 8, out_sizes, (hc8, wc8), out_hw)
      labels, heat = walk(variables, images, cams, valid, ry, rx)
      labels, heat = np.asarray(labels), np.asarray(heat)
      for i in keep:
        h, w = sizes[i]
        io.save_png(os.path.join(out_dir, batch_names[i] + ".png"), labels[i, :h, :w])
        if batch_names[i] in panel_names:
          io.save_npz(os.path.join(common.path(cfg, common.PANELS), "rw_" + batch_names[i] + ".npz"),
                      heat=heat[i, :h, :w].astype(np.float16))
        written += 1
  print(f"[random_walk] wrote {written} pseudo labels to {out_dir}")
  return report.finish({"written": written})
