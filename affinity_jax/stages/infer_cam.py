"""Stage infer_cam: multi-scale + flip CAMs of every image of the pseudo-label splits.

The method: docs/method.md §2.

Writes `{workdir}/cams/{name}.npz` (artifacts.save_cam): the present classes, each divided by its
own maximum + 1e-5; and `{workdir}/cam_pred/{name}.png`, the CAM-only label map (argmax over a
constant background 0.2 and the CAMs: 0 background, c + 1 class c; the original's
`--out_cam_pred`), for inspecting or scoring CAMs with any tool.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from affinity_jax import artifacts, cam, checkpoint, data
from affinity_jax.data import records
from affinity_jax.stages import per_image

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("model", "cam_infer.scales", "data.canvas")
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
  for batch, names, keep in per_image.pending(
      cfg, builder, cfg.data.pseudo_splits, out_dir, ".npz", scales=scales,
      batch_size=cfg.cam_infer.batch_size, report=report):
    if model is None:
      model, variables = checkpoint.load_network(cfg, artifacts.CAM_NET)
      cam_fn = cam.cam_fn(model)
    for i in [i for i in keep if not artifacts.has_positive_class(batch["label"][i])]:
      report.skip(names[i], artifacts.NO_POSITIVE_CLASS)
      keep.remove(i)
    if not keep:
      continue
    cams = cam_fn(variables, batch, scales, batch["label"])
    sizes = np.asarray(batch["orig_size"])
    artifacts.require_finite(workdir, artifacts.CAM_NET, cams[keep], [names[i] for i in keep],
                             "the CAM network gives non-finite CAMs")
    for i in keep:
      h, w = sizes[i]
      class_ids = np.flatnonzero(batch["label"][i] > 0).astype(np.int32)
      artifacts.save_cam(workdir.cam(names[i]), cams[i, :h, :w][..., class_ids], class_ids)
      artifacts.save_label(workdir.cam_prediction(names[i]), cam.cam_prediction(cams[i, :h, :w]))
      written += 1
  print(f"[infer_cam] wrote {written} CAM files to {out_dir}")
  derived = _derive_cam_predictions(cfg, workdir, builder)
  return report.finish({"written": written, "cam_predictions_derived": derived})


def _derive_cam_predictions(cfg, workdir: artifacts.Workdir, builder) -> int:
  """Writes the CAM-only label map of every image of this host's share that has a CAM file but
  no map (a map deleted by hand, a run killed between the two files); returns how many it
  wrote. Only this host's images: another host may still be writing its own."""
  index, count = jax.process_index(), jax.process_count()
  names = [n for split in cfg.data.pseudo_splits
           for n in data.split_names(builder, records.host_split(builder, split, index, count))]
  derived = 0
  for name in names:
    if not os.path.exists(workdir.cam(name)) or os.path.exists(workdir.cam_prediction(name)):
      continue
    full = artifacts.load_cam(workdir.cam(name), cfg.model.num_classes)
    artifacts.save_label(workdir.cam_prediction(name), cam.cam_prediction(full))
    derived += 1
  if derived:
    print(f"[infer_cam] wrote {derived} CAM-only label maps from existing CAM files")
  return derived
