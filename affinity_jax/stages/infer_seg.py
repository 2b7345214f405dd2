"""Stage infer_seg: the segmentation network's predictions on the evaluation splits.

The method: docs/method.md §7.

Multi-scale + flip average of the softmax scores (upsampled to the image), optionally refined
by dCRF on the RGB image; writes `{workdir}/seg_pred/{name}.png` (0 background, c + 1 class c).
"""

from __future__ import annotations

import jax

from affinity_jax import artifacts, cam, checkpoint, data
from affinity_jax.stages import per_image

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("model", "seg_infer.scales", "seg_infer.crf", "data.canvas")
CONSUMES = ("train_seg",)
# The version of this stage's code: bumped when the same inputs give other outputs
# (fingerprints.py). 2: the exact canvas forward, PIL's pixels and resizes.
VERSION = 2


def run(cfg) -> dict:
  workdir = artifacts.Workdir(cfg.workdir)
  out_dir = workdir.path(artifacts.SEG_PRED)
  builder = data.from_config(cfg)
  scales = tuple(cfg.seg_infer.scales)
  model = None
  written = 0
  report = artifacts.SkipReport(workdir, "infer_seg", jax.process_index() == 0)
  devices = per_image.LocalDevices()
  for batch, names, keep in per_image.pending(
      cfg, builder, cfg.eval.seg_splits, out_dir, ".png", scales=scales,
      batch_size=cfg.seg_infer.batch_size, report=report, devices=devices.count):
    if model is None:
      model, variables = checkpoint.load_network(cfg, artifacts.SEG_NET)
      variables = devices.replicate(variables)  # once: every batch is split over the devices
      seg_fn = cam.segmentation_fn(model)
    if not keep:
      continue
    probs = seg_fn(variables, batch, scales, put=devices.put)
    devices.record(batch)
    for i in keep:
      h, w = batch["orig_size"][i]
      label = cam.segmentation_label(batch["raw"][i, :h, :w], probs[i, :h, :w],
                                     crf=cfg.seg_infer.crf)
      artifacts.save_label(workdir.prediction(names[i]), label)
      written += 1
  print(f"[infer_seg] wrote {written} predictions to {out_dir}")
  return report.finish({"written": written, **devices.summary("infer_seg")})
