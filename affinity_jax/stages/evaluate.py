"""Stage evaluate: mIoU of CAM, CAM + random walk and segmentation, a table and pictures.

Confusion matrices are accumulated over whole splits (255 ignored, PSA.md "Evaluation").
Writes `{workdir}/results.json` (`cam_miou`, `rw_miou`, `seg_miou` as fractions of the first
configured split, plus per-split and per-class details), `{workdir}/results.md` (the table) and
PNG panels `{workdir}/panels/{name}.png`: image | CAM heat map | random-walk heat map |
pseudo label | ground truth.
"""

from __future__ import annotations

import os

import numpy as np

from affinity_jax import cam as cam_lib
from affinity_jax import io, metrics
from affinity_jax.stages import common
from affinity_jax.stages.infer_cam import load_cam


def palette(n: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map: [n, 3] uint8 (255 -> the VOC boundary colour)."""
  pal = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  return pal


def heat(x: np.ndarray) -> np.ndarray:
  """[H, W] in [0, 1] -> [H, W, 3] uint8 (black -> red -> yellow -> white)."""
  x = np.clip(np.asarray(x, np.float32), 0, 1)
  rgb = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], -1)
  return (rgb * 255).astype(np.uint8)


def _panel(parts: list[np.ndarray]) -> np.ndarray:
  h = parts[0].shape[0]
  gap = np.full((h, 4, 3), 255, np.uint8)
  row = []
  for p in parts:
    row += [p, gap]
  return np.concatenate(row[:-1], axis=1)


# The stage whose skipped images have no prediction of each kind.
_PRODUCER = {"cam": "infer_cam", "rw": "random_walk", "seg": "infer_seg"}


def _score(cfg, split: str, kinds: dict[str, tuple[str, str]], report) -> dict:
  """{kind: ConfusionMatrix} over `split` for prediction folders given as (folder, suffix).

  An image that the producing stage skipped (listed in its report) is left out of that kind's
  score and listed in this stage's report.
  """
  import tensorflow_datasets as tfds
  n = cfg.model.num_classes + 1
  conf = {k: metrics.ConfusionMatrix(n) for k in kinds}
  pal = palette()
  panels = int(cfg.eval.panels)
  builder = common.builder(cfg)
  excluded = {kind: common.skipped_by(cfg, _PRODUCER[kind]) for kind in kinds}
  for idx, ex in enumerate(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))):
    name = ex["name"].decode()
    if not ex["has_mask"]:
      continue
    gt = ex["mask"][..., 0]
    preds = {}
    for kind, (folder, suffix) in kinds.items():
      path = os.path.join(folder, name + suffix)
      if name in excluded[kind] and not os.path.exists(path):
        report.skip(name, f"no {kind} prediction ({_PRODUCER[kind]} skipped it)")
        continue
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run the stage that writes {folder}")
      if kind == "cam":
        cam = load_cam(path, cfg.model.num_classes)
        preds[kind] = np.asarray(cam_lib.cam_prediction(cam))
      else:
        preds[kind] = io.load_png(path)
      if preds[kind].shape != gt.shape:  # e.g. a stale CAM of another image: one image lost.
        report.skip(name, f"{path}: prediction is {preds[kind].shape[0]}x"
                    f"{preds[kind].shape[1]}, ground truth {gt.shape[0]}x{gt.shape[1]}")
        del preds[kind]
        continue
      conf[kind].update(gt, preds[kind], name=name)
    if idx < panels and "cam" in preds and "rw" in preds:
      cam = load_cam(os.path.join(kinds["cam"][0], name + ".npz"), cfg.model.num_classes)
      rw_heat_path = os.path.join(common.path(cfg, common.PANELS), "rw_" + name + ".npz")
      rw_heat = (io.load_npz(rw_heat_path)["heat"] if os.path.exists(rw_heat_path)
                 else np.zeros(gt.shape, np.float32))
      io.save_png(os.path.join(common.path(cfg, common.PANELS), name + ".png"), _panel([
          ex["image"], heat(cam.max(-1)), heat(rw_heat), pal[preds["rw"]], pal[gt]]))
  return conf


def run(cfg) -> dict:
  results = {"splits": {}}
  report = common.SkipReport(cfg, "evaluate")
  rows = []
  labels = {"cam": "CAM", "rw": "CAM + RW", "seg": "Segmentation"}
  plan = {}
  for split in cfg.eval.cam_splits:
    plan.setdefault(split, {})["cam"] = (common.path(cfg, common.CAMS), ".npz")
    plan[split]["rw"] = (common.path(cfg, common.PSEUDO_LABELS), ".png")
  for split in cfg.eval.seg_splits:
    plan.setdefault(split, {})["seg"] = (common.path(cfg, common.SEG_PRED), ".png")
  for split, kinds in plan.items():
    conf = _score(cfg, split, kinds, report)
    results["splits"][split] = {}
    for kind, c in conf.items():
      miou = c.miou()
      results["splits"][split][kind] = {"miou": miou, "iou": c.iou().tolist()}
      key = f"{kind}_miou"
      if key not in results:
        results[key] = miou
      rows.append((labels[kind], split, miou))
  table = ["| stage | split | mIoU (%) |", "|---|---|---|"]
  table += [f"| {what} | {split} | {100 * m:.1f} |" for what, split, m in rows]
  text = "\n".join(table)
  io.save_json(common.path(cfg, "results.json"), results)
  io.save_text(common.path(cfg, "results.md"), text + "\n")
  print(text)
  return report.finish({k: v for k, v in results.items() if k.endswith("_miou")})
