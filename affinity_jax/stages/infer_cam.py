"""Stage infer_cam: multi-scale + flip CAMs of every image of the pseudo-label splits.

Writes `{workdir}/cams/{name}.npz` with `cam` float32 [H, W, P] (the present classes, each
divided by its own maximum + 1e-5, PSA.md step 2) and `class_ids` int32 [P].
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import io
from affinity_jax.stages import common, inference


def _normalise(total, labels, valid_hw):
  """Zero absent classes; divide each class by its max over the image (+1e-5)."""
  present = labels > 0
  total = jnp.where(present[:, None, None, :] & valid_hw[..., None], total, 0.0)
  peak = jnp.max(total, axis=(1, 2), keepdims=True)
  return total / (peak + 1e-5)


def run(cfg) -> dict:
  from affinity_jax.data import pipelines
  out_dir = common.path(cfg, common.CAMS)
  builder = common.builder(cfg)
  model, variables = None, None
  written = 0
  report = common.SkipReport(cfg, "infer_cam")
  for split in cfg.data.pseudo_splits:
    todo = set(common.missing(common.split_names(cfg, split), out_dir, ".npz"))
    if not todo:
      print(f"[infer_cam] {split}: all CAMs present in {out_dir}")
      continue
    if model is None:
      model, variables = common.load_trained(cfg, common.CAM_NET)
      cam_fn = inference.multiscale_flip_sum(
          lambda v, x: model.apply(v, x, method="cam"))
      normalise = jax.jit(_normalise)
    scales = tuple(cfg.cam_infer.scales)
    for batch in pipelines.inference(builder, split, scales=scales, canvas=tuple(cfg.data.canvas),
                                     batch_size=cfg.cam_infer.batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
      names = inference.batch_names(batch)
      keep = [i for i, n in enumerate(names) if batch["valid"][i] and n in todo]
      for i in [i for i in keep if not common.has_positive_class(batch["label"][i])]:
        report.skip(names[i], common.NO_POSITIVE_CLASS)
        keep.remove(i)
      if not keep:
        continue
      total = cam_fn(variables, inference.pass_inputs(batch, scales))
      hc, wc = batch["raw"].shape[1:3]
      sizes = np.asarray(batch["orig_size"])
      valid_hw = (np.arange(hc)[None, :, None] < sizes[:, 0, None, None]) & \
                 (np.arange(wc)[None, None, :] < sizes[:, 1, None, None])
      cams = np.asarray(normalise(total, jnp.asarray(batch["label"]), jnp.asarray(valid_hw)))
      if not np.all(np.isfinite(cams[keep])):
        # A diverged network gives NaN/Inf scores: every later stage would be garbage.
        raise common.NonFiniteOutputError(
            f"{common.final_path(cfg, common.CAM_NET)}: the CAM network gives non-finite CAMs "
            f"(images {', '.join(names[i] for i in keep)}); its training diverged. Delete "
            f"{common.path(cfg, common.CAM_NET)} and retrain with a lower --config.cam.lr")
      for i in keep:
        h, w = sizes[i]
        class_ids = np.flatnonzero(batch["label"][i] > 0).astype(np.int32)
        io.save_npz(os.path.join(out_dir, names[i] + ".npz"),
                    cam=cams[i, :h, :w][..., class_ids], class_ids=class_ids)
        written += 1
  print(f"[infer_cam] wrote {written} CAM files to {out_dir}")
  return report.finish({"written": written})


def load_cam(path: str, num_classes: int) -> np.ndarray:
  """[H, W, num_classes] CAM (absent classes zero) from a file written by this stage."""
  z = io.load_npz(path)
  if "cam" not in z or "class_ids" not in z:
    raise ValueError(f"{path}: not a CAM file (keys {sorted(z)}); delete it and rerun infer_cam")
  cam, ids = z["cam"], z["class_ids"]
  if cam.ndim != 3 or cam.shape[-1] != len(ids) or (len(ids) and ids.max() >= num_classes):
    raise ValueError(f"{path}: CAM of shape {cam.shape} with classes {ids.tolist()} does not fit "
                     f"{num_classes} classes; delete it and rerun infer_cam")
  full = np.zeros(cam.shape[:2] + (num_classes,), np.float32)
  full[..., ids] = cam
  return full
