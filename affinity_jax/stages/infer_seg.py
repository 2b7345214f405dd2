"""Stage infer_seg: the segmentation network's predictions on the evaluation splits.

Multi-scale + flip average of the softmax scores (upsampled to the image), optionally refined
by dCRF on the RGB image; writes `{workdir}/seg_pred/{name}.png` (0 background, c + 1 class c).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from affinity_jax import crf, io
from affinity_jax.stages import common, inference


def run(cfg) -> dict:
  from affinity_jax.data import pipelines
  out_dir = common.path(cfg, common.SEG_PRED)
  builder = common.builder(cfg)
  scales = tuple(cfg.seg_infer.scales)
  model = variables = seg_fn = None
  written = 0
  for split in cfg.eval.seg_splits:
    todo = set(common.missing(common.split_names(cfg, split), out_dir, ".png"))
    if not todo:
      print(f"[infer_seg] {split}: all predictions present in {out_dir}")
      continue
    if model is None:
      model, variables = common.load_trained(cfg, common.SEG_NET)
      seg_fn = inference.multiscale_flip_sum(
          lambda v, x: jax.nn.softmax(model.apply(v, x).astype("float32"), axis=-1))
    for batch in pipelines.inference(builder, split, scales=scales, canvas=tuple(cfg.data.canvas),
                                     batch_size=cfg.seg_infer.batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
      names = inference.batch_names(batch)
      keep = [i for i, n in enumerate(names) if batch["valid"][i] and n in todo]
      if not keep:
        continue
      probs = np.asarray(seg_fn(variables, inference.pass_inputs(batch, scales))) / (2 * len(scales))
      for i in keep:
        h, w = batch["orig_size"][i]
        p = probs[i, :h, :w]
        if cfg.seg_infer.crf:
          p = crf.crf_inference(np.ascontiguousarray(batch["raw"][i, :h, :w]), p)
        io.save_png(os.path.join(out_dir, names[i] + ".png"), np.argmax(p, -1).astype(np.uint8))
        written += 1
  print(f"[infer_seg] wrote {written} predictions to {out_dir}")
  return {"written": written}
