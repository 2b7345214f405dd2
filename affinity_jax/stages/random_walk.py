"""Stage random_walk: pseudo labels by propagating CAMs over AffinityNet's affinities.

The method: docs/method.md §6.

For a batch of canvases (affinity_jax.random_walk.walk_batch, which predict runs too):
AffinityNet features at stride 8 of the image resized by `aff.image_scale` (the original: 1,
the image as it is), the CAM stack (background (1 - max)^alpha + classes) resized likewise
and pooled by 8 onto each image's own grid, the sparse walk of 2^logt steps with positions
outside the image excluded, bilinear upsampling of the padded grid to the original resolution
(cam.walk_to_image), crop, argmax; with `random_walk.crf` (the paper's refinement,
docs/method.md §6) the argmax of the dCRF marginals of the walked scores (background and
present classes, divided by their sum) instead. Writes
`{workdir}/pseudo_labels/{name}.png` (0 background, c + 1 class c) and, for the first
`eval.panels` images of each split, the walked foreground heat map for pictures.

With `method` "irn" (docs/method.md §11): the relation network's flip-averaged boundary map at
stride 4 of the image as it is (or resized by `aff.image_scale`, not IRN's: then IRN's
stride-4 CAMs are resampled to that image's grid, and the walked scores back to the image's
pixels), IRN's stride-4 CAMs (infer_cam's `strided`), the walk over the image's classes
(random_walk.boundary_walk_batch) and IRN's labels: background where every
class's walked score, divided by the image's maximum, is under random_walk.bg_threshold. IRN
stops there (configs/voc_irn_resnet50.py: random_walk.crf False); with random_walk.crf True
(not IRN's; PSA's refinement, for comparing the two walks on equal terms) the label is the
argmax of the dCRF marginals of those scores (the constant background and the normalised
classes, divided by their sum at each pixel) instead. With random_walk.instances (IRN's
make_ins_seg_labels.py) it also writes each image's instances, `{workdir}/instances/{name}.npz`
(affinity_jax/instances.py: the displacement field's groups, the same walk over each class's
CAM within each group, random_walk.instance_bg_threshold).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from affinity_jax import artifacts, checkpoint, config, data
from affinity_jax import random_walk as rw
from affinity_jax.constants import IRN_STRIDE
from affinity_jax.stages import per_image

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("model", "random_walk.beta", "random_walk.logt", "random_walk.alpha",
         "random_walk.radius", "random_walk.scheme", "random_walk.tol", "random_walk.crf",
         "random_walk.crf_iters", "aff.image_scale", "data.canvas")
# With method irn, also these (keys of IRN's configs only).
IRN_READS = ("random_walk.bg_threshold", "random_walk.instances")
# And these only where the key named is on: the instances' background counts only when the
# stage makes instances.
IRN_READS_WHEN = {"random_walk.instances": ("random_walk.instance_bg_threshold",)}
CONSUMES = ("train_aff", "infer_cam")
# The version of this stage's code: bumped when the same inputs give other outputs
# (fingerprints.py). 2: the exact canvas forward, the original's pair set per image.
VERSION = 2


def _pending(cfg, scale: float):
  """(workdir, report, devices, panel names, batches): what both walks start from, the batches
  (per_image.pending) of the images without a pseudo label, at `scale`."""
  workdir = artifacts.Workdir(cfg.workdir)
  builder = data.from_config(cfg)
  panel_names = {n for split in cfg.data.pseudo_splits
                 for n in data.split_names(builder, split)[:cfg.eval.panels]}
  report = artifacts.SkipReport(workdir, "random_walk", jax.process_index() == 0)
  devices = per_image.LocalDevices()
  batches = per_image.pending(
      cfg, builder, cfg.data.pseudo_splits, workdir.path(artifacts.PSEUDO_LABELS), ".png",
      scales=(scale,), batch_size=cfg.random_walk.batch_size, report=report,
      devices=devices.count)
  return workdir, report, devices, panel_names, batches


def _with_positive_class(batch, names, keep: list[int], report) -> list[int]:
  """Removes from `keep` (and reports) the images without a positive class, which have nothing
  to walk; returns a copy of what is left, for the caller to remove more from `keep`."""
  for i in [i for i in keep if not artifacts.has_positive_class(batch["label"][i])]:
    report.skip(names[i], artifacts.NO_POSITIVE_CLASS)
    keep.remove(i)
  return list(keep)


def _finish(workdir, report, devices, written: int) -> dict:
  print(f"[random_walk] wrote {written} pseudo labels to "
        f"{workdir.path(artifacts.PSEUDO_LABELS)}")
  return report.finish({"written": written, **devices.summary("random_walk")})


def run(cfg) -> dict:
  if config.method(cfg) == "irn":
    return _run_irn(cfg)
  num_classes = cfg.model.num_classes
  scale = config.aff_image_scale(cfg)
  alpha = float(cfg.random_walk.alpha)
  workdir, report, devices, panel_names, batches = _pending(cfg, scale)
  model = None
  written = 0
  for batch, batch_names, keep in batches:
    if model is None:
      model, variables = checkpoint.load_network(cfg, artifacts.AFF_NET)
      variables = devices.replicate(variables)  # once: every batch is split over the devices
      walk = rw.make_walk_fn(model, cfg)
    sizes = np.asarray(batch["orig_size"])
    cams = {}
    for i in _with_positive_class(batch, batch_names, keep, report):
      path = workdir.cam(batch_names[i])
      full = artifacts.load_cam(path, num_classes)
      mismatch = artifacts.cam_size_mismatch(path, full.shape[:2], sizes[i])
      if mismatch:
        report.skip(batch_names[i], mismatch)
        keep.remove(i)
        continue
      cams[i] = full
    if not keep:
      continue
    classes = {i: np.flatnonzero(batch["label"][i] > 0) for i in cams}
    labels, heat, share, channels = rw.walk_batch(
        walk, variables, batch["image_s0"], cams, sizes, batch["size_s0"], classes=classes,
        alpha=alpha, image_scale=scale, put=devices.put)
    devices.record(batch)
    if share is not None:
      artifacts.require_finite(workdir, artifacts.AFF_NET, share[keep],
                               [batch_names[i] for i in keep], "the walk gives non-finite scores")
    for i in keep:
      h, w = sizes[i]
      label = labels[i, :h, :w]
      if share is not None:
        label = rw.crf_label(batch["raw"][i, :h, :w], share[i, :h, :w], channels[i],
                             int(cfg.random_walk.crf_iters))
      artifacts.save_label(workdir.pseudo_label(batch_names[i]), label)
      if batch_names[i] in panel_names:
        artifacts.save_walk_heat(workdir.walk_heat(batch_names[i]), heat[i, :h, :w])
      written += 1
  return _finish(workdir, report, devices, written)


def _drop_labels_without_instances(workdir) -> None:
  """Process 0, before the walk: a pseudo label whose instance file is missing (deleted, or a
  write cut off between the two) is removed, so that the image is walked again. The instance
  file is written first, so a label alone never counts as done."""
  from affinity_jax import distributed
  if distributed.is_main():
    folder = workdir.path(artifacts.PSEUDO_LABELS)
    names = [f[:-4] for f in os.listdir(folder) if f.endswith(".png")] if os.path.isdir(
        folder) else []
    for name in names:
      if not os.path.exists(workdir.instances(name)):
        os.remove(workdir.pseudo_label(name))
  distributed.barrier("pseudo labels without instances removed")


def _run_irn(cfg) -> dict:
  """IRN's walk (method irn): see the module docstring."""
  threshold = float(cfg.random_walk.bg_threshold)
  with_instances = bool(cfg.random_walk.instances)
  scale = config.aff_image_scale(cfg)
  if with_instances:
    _drop_labels_without_instances(artifacts.Workdir(cfg.workdir))
  workdir, report, devices, panel_names, batches = _pending(cfg, scale)
  model = None
  written = 0
  for batch, batch_names, keep in batches:
    if model is None:
      model, variables = checkpoint.load_network(cfg, artifacts.RELATION_NET)
      variables = devices.replicate(variables)
      walk = rw.make_boundary_walk_fn(model, cfg)
    sizes, scaled = np.asarray(batch["orig_size"]), np.asarray(batch["size_s0"])
    cams, ids = {}, {}
    for i in _with_positive_class(batch, batch_names, keep, report):
      path = workdir.cam(batch_names[i])
      cams[i], ids[i] = artifacts.load_strided_cam(path, sizes[i], IRN_STRIDE,
                                                   cfg.model.num_classes)
      if cams[i] is None:  # made for an image of another size
        report.skip(batch_names[i], ids.pop(i))
        del cams[i]
        keep.remove(i)
      else:
        cams[i] = rw.strided_at_scale(cams[i], sizes[i], scaled[i], stride=IRN_STRIDE)
    if not keep:
      continue
    walked, boundary, displacement = rw.boundary_walk_batch(
        walk, variables, batch["image_s0"], cams, scaled, put=devices.put)
    devices.record(batch)
    for i in keep:
      artifacts.require_finite(workdir, artifacts.RELATION_NET, walked[i], [batch_names[i]],
                               "the walk gives non-finite scores")
      channels = np.concatenate([[0], ids[i].astype(np.int64) + 1])
      scores = rw.boundary_walk_scores(walked[i], sizes[i], threshold=threshold,
                                       stride=IRN_STRIDE, scaled=scaled[i])
      if cfg.random_walk.crf:
        h, w = sizes[i]
        label = rw.crf_label(batch["raw"][i, :h, :w], scores / scores.sum(-1, keepdims=True),
                             channels, int(cfg.random_walk.crf_iters))
      else:
        label = channels[np.argmax(scores, axis=-1)].astype(np.uint8)
      if with_instances:  # first: the label marks the image done
        artifacts.require_finite(workdir, artifacts.RELATION_NET, displacement[i],
                                 [batch_names[i]], "the displacement field is not finite")
        found = rw.boundary_walk_instances(
            walk, boundary[i], displacement[i], cams[i], ids[i], sizes[i],
            threshold=float(cfg.random_walk.instance_bg_threshold), scaled=scaled[i],
            check_finite=lambda v, name=batch_names[i]: artifacts.require_finite(
                workdir, artifacts.RELATION_NET, v, [name],
                "the instance walk gives non-finite scores"))
        artifacts.save_instances(workdir.instances(batch_names[i]), *found)
      artifacts.save_label(workdir.pseudo_label(batch_names[i]), label)
      if batch_names[i] in panel_names:
        artifacts.save_walk_heat(workdir.walk_heat(batch_names[i]),
                                 scores[..., 1:].max(axis=-1, initial=0.0))
      written += 1
  return _finish(workdir, report, devices, written)
