"""Stage infer_cam: multi-scale + flip CAMs of every image of the pseudo-label splits.

The method: docs/method.md §2.

Writes `{workdir}/cams/{name}.npz` (artifacts.save_cam): the present classes, each divided by its
own maximum + 1e-5; and `{workdir}/cam_pred/{name}.png`, the CAM-only label map (argmax over a
constant background 0.2 and the CAMs: 0 background, c + 1 class c; the original's
`--out_cam_pred`), for inspecting or scoring CAMs with any tool.

With `method` "irn" (docs/method.md §11) the CAMs are IRN's (cam.irn_cams, one image at a time
at its own size): the full-resolution map is the file's `cam`, and the stride-4 map that the
walk takes is its `strided` (artifacts.save_cam).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from affinity_jax import artifacts, cam, checkpoint, config, data, distributed
from affinity_jax.compilation import jit
from affinity_jax.stages import per_image

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
# (`method` is not read apart: config.validate ties it to model.backbone.)
READS = ("model", "cam_infer.scales", "data.canvas")
# With method irn, also these (keys of IRN's configs only).
IRN_READS = ("eval.cam_background",)
CONSUMES = ("train_cam",)
# The version of this stage's code: bumped when the same inputs give other outputs
# (fingerprints.py). 2: the exact canvas forward, PIL's pixels and resizes.
VERSION = 2


def run(cfg) -> dict:
  workdir = artifacts.Workdir(cfg.workdir)
  out_dir = workdir.path(artifacts.CAMS)
  builder = data.from_config(cfg)
  model = None
  written = 0
  report = artifacts.SkipReport(workdir, "infer_cam", jax.process_index() == 0)
  scales = tuple(cfg.cam_infer.scales)
  devices = per_image.LocalDevices()
  irn = config.method(cfg) == "irn"
  background = config.cam_background(cfg)
  plan = per_image.shares(builder, cfg.data.pseudo_splits, out_dir, ".npz", "infer_cam")
  # IRN's CAMs are made from each image as it is (`raw`), scaled on the host.
  for batch, names, keep in per_image.pending(
      cfg, builder, cfg.data.pseudo_splits, out_dir, ".npz", scales=(1.0,) if irn else scales,
      batch_size=cfg.cam_infer.batch_size, report=report, devices=devices.count, plan=plan):
    if model is None:
      model, variables = checkpoint.load_network(cfg, artifacts.CAM_NET)
      if irn:
        irn_apply = _bucketed(jit(lambda v, x, sizes: model.apply(v, x, sizes,
                                                                      method="cam")),
                              model.stride)
      else:
        variables = devices.replicate(variables)  # once: every batch is split over the devices
        cam_fn = cam.cam_fn(model)
    for i in [i for i in keep if not artifacts.has_positive_class(batch["label"][i])]:
      report.skip(names[i], artifacts.NO_POSITIVE_CLASS)
      keep.remove(i)
    if not keep:
      continue
    if irn:
      written += _irn_cams(workdir, batch, names, keep, scales,
                           lambda x: irn_apply(variables, x), background)
      continue
    cams = cam_fn(variables, batch, scales, batch["label"], put=devices.put)
    devices.record(batch)
    sizes = np.asarray(batch["orig_size"])
    artifacts.require_finite(workdir, artifacts.CAM_NET, cams[keep], [names[i] for i in keep],
                             "the CAM network gives non-finite CAMs")
    for i in keep:
      h, w = sizes[i]
      class_ids = np.flatnonzero(batch["label"][i] > 0).astype(np.int32)
      artifacts.save_cam(workdir.cam(names[i]), cams[i, :h, :w][..., class_ids], class_ids)
      artifacts.save_label(workdir.cam_prediction(names[i]),
                           cam.cam_prediction(cams[i, :h, :w], background=background))
      written += 1
  print(f"[infer_cam] wrote {written} CAM files to {out_dir}")
  todo = {n for names in plan[0].values() for n in names}
  done_before = [n for split in cfg.data.pseudo_splits for n in data.split_names(builder, split)
                 if n not in todo]
  derived = _derive_cam_predictions(cfg, workdir, done_before)
  return report.finish({"written": written, "cam_predictions_derived": derived,
                        **devices.summary("infer_cam")})


# IRN's CAMs run image by image at each image's own (scaled) size: each goes to the top-left of
# a canvas of its size rounded up to this many pixels, with its size given (models/canvas.py:
# the same CAMs as the image alone), so that a split's many sizes compile a few programs.
IRN_BUCKET = 128


def _bucketed(cam_fn, stride: int):
  """(variables, images [B, h, w, 3]) -> [B, ceil(h / stride), ceil(w / stride), C]: `cam_fn`
  (variables, canvas, sizes) on the images padded to a multiple of IRN_BUCKET."""
  def apply(variables, images):
    b, h, w, c = images.shape
    canvas = np.zeros((b, -(-h // IRN_BUCKET) * IRN_BUCKET, -(-w // IRN_BUCKET) * IRN_BUCKET, c),
                      np.float32)
    canvas[:, :h, :w] = images
    out = cam_fn(variables, canvas, np.full((b, 2), (h, w), np.int32))
    return np.asarray(out)[:, :-(-h // stride), :-(-w // stride)]
  return apply


def _irn_cams(workdir: artifacts.Workdir, batch: dict, names: list[str], keep: list[int],
              scales, apply, background: float) -> int:
  """IRN's CAMs of the images `keep` of an inference batch, each at its own size (the canvas
  holds it at the top-left, scale 1); returns how many it wrote."""
  sizes = np.asarray(batch["orig_size"])
  for i in keep:
    h, w = sizes[i]
    class_ids = np.flatnonzero(batch["label"][i] > 0).astype(np.int32)
    maps = cam.irn_cams(apply, np.asarray(batch["raw"][i, :h, :w]), class_ids, scales=scales)
    artifacts.require_finite(workdir, artifacts.CAM_NET, maps["high_res"], [names[i]],
                             "the CAM network gives non-finite CAMs")
    artifacts.save_cam(workdir.cam(names[i]), maps["high_res"], class_ids,
                       strided=maps["cam"])
    full = np.zeros(maps["high_res"].shape[:2] + (len(batch["label"][i]),), np.float32)
    full[..., class_ids] = maps["high_res"]
    artifacts.save_label(workdir.cam_prediction(names[i]),
                         cam.cam_prediction(full, background=background))
  return len(keep)


def _derive_cam_predictions(cfg, workdir: artifacts.Workdir, done_before: list[str]) -> int:
  """Writes the CAM-only label map of every image of this process's share of `done_before`
  (those whose CAM was there before the stage started, which no process writes now) that has a
  CAM file but no map (a map deleted by hand, a run killed between the two files); returns how
  many it wrote."""
  derived = 0
  for name in distributed.share(list(dict.fromkeys(done_before))):
    if not os.path.exists(workdir.cam(name)) or os.path.exists(workdir.cam_prediction(name)):
      continue
    full = artifacts.load_cam(workdir.cam(name), cfg.model.num_classes)
    artifacts.save_label(workdir.cam_prediction(name),
                         cam.cam_prediction(full, background=config.cam_background(cfg)))
    derived += 1
  if derived:
    print(f"[infer_cam] wrote {derived} CAM-only label maps from existing CAM files")
  return derived
