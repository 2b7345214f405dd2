"""Stage evaluate: mIoU of CAM, CAM + random walk and segmentation, a table and pictures.

Confusion matrices are accumulated over whole splits (255 ignored, docs/method.md §9).
Writes (artifacts.save_results) `{workdir}/results.json` (`cam_miou`, `rw_miou`, `seg_miou`
as fractions of the first configured split, plus per-split and per-class details),
`{workdir}/results.md` (the table) and PNG panels `{workdir}/panels/{name}.png`: image |
CAM heat map | random-walk heat map | pseudo label | ground truth.
"""

from __future__ import annotations

import os

import numpy as np

from affinity_jax import artifacts, cam, data, io, metrics
from affinity_jax.data import voc_files
from affinity_jax.errors import UserError

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("model.num_classes", "eval.cam_splits", "eval.seg_splits", "random_walk.crf")
CONSUMES = ("infer_cam", "random_walk", "infer_seg")


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


def _prediction(kind: str, path: str, num_classes: int) -> np.ndarray:
  if kind == "cam":
    return cam.cam_prediction(artifacts.load_cam(path, num_classes))
  return artifacts.load_label(path, _PRODUCER[kind])


def _score(cfg, split: str, kinds: dict[str, str], report) -> dict:
  """{kind: ConfusionMatrix} over `split` for prediction folders `kinds` {kind: folder}.

  An image that the producing stage skipped (listed in its report) is left out of that kind's
  score and listed in this stage's report.
  """
  import tensorflow_datasets as tfds
  workdir = artifacts.Workdir(cfg.workdir)
  n = cfg.model.num_classes + 1
  conf = {k: metrics.ConfusionMatrix(n) for k in kinds}
  pal = voc_files.palette()
  panels = int(cfg.eval.panels)
  builder = data.from_config(cfg)
  excluded = {kind: artifacts.skipped_by(workdir, _PRODUCER[kind]) for kind in kinds}
  suffix = {"cam": ".npz", "rw": ".png", "seg": ".png"}
  for idx, ex in enumerate(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))):
    name = ex["name"].decode()
    if not ex["has_mask"]:
      continue
    gt = ex["mask"][..., 0]
    preds = {}
    for kind, folder in kinds.items():
      path = os.path.join(folder, name + suffix[kind])
      if name in excluded[kind] and not os.path.exists(path):
        report.skip(name, f"no {kind} prediction ({_PRODUCER[kind]} skipped it)")
        continue
      artifacts.require(path, _PRODUCER[kind])
      preds[kind] = _prediction(kind, path, cfg.model.num_classes)
      if preds[kind].shape != gt.shape:  # e.g. a stale CAM of another image: one image lost.
        report.skip(name, f"{path}: prediction is {preds[kind].shape[0]}x"
                    f"{preds[kind].shape[1]}, ground truth {gt.shape[0]}x{gt.shape[1]}")
        del preds[kind]
        continue
      try:
        conf[kind].update(gt, preds[kind], name=name)
      except ValueError as e:  # labels out of range: a broken file or another dataset's.
        raise UserError(f"{path}: {e}") from None
    if idx < panels and "cam" in preds and "rw" in preds:
      cam_map = artifacts.load_cam(workdir.cam(name), cfg.model.num_classes)
      rw_heat = artifacts.load_walk_heat(workdir.walk_heat(name), gt.shape)
      io.save_png(workdir.panel(name), _panel([
          ex["image"], heat(cam_map.max(-1)), heat(rw_heat), pal[preds["rw"]], pal[gt]]))
  return conf


def run(cfg) -> dict:
  import jax
  workdir = artifacts.Workdir(cfg.workdir)
  results = {"splits": {}}
  report = artifacts.SkipReport(workdir, "evaluate", jax.process_index() == 0)
  rows = []
  # With random_walk.crf the pseudo labels are the paper's "CAM + RW + dCRF", not infer_aff.py's.
  labels = {"cam": "CAM", "rw": "CAM + RW + dCRF" if cfg.random_walk.crf else "CAM + RW",
            "seg": "Segmentation"}
  plan = {}
  for split in cfg.eval.cam_splits:
    plan.setdefault(split, {})["cam"] = workdir.path(artifacts.CAMS)
    plan[split]["rw"] = workdir.path(artifacts.PSEUDO_LABELS)
  for split in cfg.eval.seg_splits:
    plan.setdefault(split, {})["seg"] = workdir.path(artifacts.SEG_PRED)
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
  if jax.process_index() == 0:
    artifacts.save_results(workdir, results, text)
  print(text)
  return report.finish({k: v for k, v in results.items() if k.endswith("_miou")})
