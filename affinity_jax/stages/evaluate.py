"""Stage evaluate: mIoU of CAM, CAM + random walk and segmentation, a table and pictures.

With method irn and random_walk.instances, also the instances' mean AP at IoU 0.5 (IRN's
measure) on each of eval.cam_splits, over the images whose ground-truth instances are known
(the synthetic dataset's; VOC's SegmentationObject PNGs under data.manual_dir):
`instance_map50` and per-split `instances` in results.json, a second table.

Confusion matrices are accumulated over whole splits (255 ignored, docs/method.md §9) by
evaluation.Scores, which `affinity-jax evaluate` scores any folder of masks with.
Writes (artifacts.save_results) `{workdir}/results.json` (`cam_miou`, `rw_miou`, `seg_miou`
as fractions of the first configured split, plus per-split and per-class details and the
`class_names` of the IoU lists, background first),
`{workdir}/results.md` (the table) and PNG panels `{workdir}/panels/{name}.png`: image |
CAM heat map | random-walk heat map | pseudo label | ground truth; and two charts:
`results_iou.png` (IoU per class, a bar per row of the table) and `results_confusion.png`
(the confusion matrix of the first segmentation row).
"""

from __future__ import annotations

import os

import numpy as np

from affinity_jax import (artifacts, cam, charts, config, data, evaluation, instances, io,
                          pictures)
from affinity_jax.data import voc_files
from affinity_jax.errors import UserError

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("model.num_classes", "eval.cam_splits", "eval.seg_splits", "random_walk.crf")
# With method irn, also these (keys of IRN's configs only).
IRN_READS = ("eval.cam_background", "random_walk.instances")
CONSUMES = ("infer_cam", "random_walk", "infer_seg")


# The stage whose skipped images have no prediction of each kind.
_PRODUCER = {"cam": "infer_cam", "rw": "random_walk", "seg": "infer_seg"}


def _prediction(kind: str, path: str, num_classes: int, background: float) -> np.ndarray:
  if kind == "cam":
    return cam.cam_prediction(artifacts.load_cam(path, num_classes), background=background)
  return artifacts.load_label(path, _PRODUCER[kind])


def _score(cfg, split: str, kinds: dict[str, str], report) -> dict:
  """{kind: evaluation.Scores} over `split` for prediction folders `kinds` {kind: folder}.

  An image that the producing stage skipped (listed in its report) is left out of that kind's
  score and listed in this stage's report.
  """
  import tensorflow_datasets as tfds
  workdir = artifacts.Workdir(cfg.workdir)
  pal = pictures.palette()
  panels = int(cfg.eval.panels)
  builder = data.from_config(cfg)
  names = evaluation.dataset_class_names(builder)
  conf = {k: evaluation.Scores(names) for k in kinds}
  excluded = {kind: artifacts.skipped_by(workdir, _PRODUCER[kind]) for kind in kinds}
  suffix = {"cam": ".npz", "rw": ".png", "seg": ".png"}
  from affinity_jax import console
  examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
  for idx, ex in enumerate(console.track(examples, builder.info.splits[split].num_examples,
                                         f"evaluate {split}", enabled=report.main_process)):
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
      preds[kind] = _prediction(kind, path, cfg.model.num_classes, config.cam_background(cfg))
      try:  # labels out of range (a broken file or another dataset's) stop with its name.
        conf[kind].add(gt, preds[kind], prediction_file=path,
                       ground_truth_file=f"{name} of {cfg.data.name} {split}")
      except evaluation.SizeMismatch as e:  # e.g. a stale CAM of another image: one image lost.
        report.skip(name, str(e))
        del preds[kind]
        continue
    if idx < panels and "cam" in preds and "rw" in preds:
      cam_map = artifacts.load_cam(workdir.cam(name), cfg.model.num_classes)
      rw_heat = artifacts.load_walk_heat(workdir.walk_heat(name), gt.shape)
      io.save_png(workdir.panel(name), pictures.side_by_side(
          ex["image"], pictures.heat(cam_map.max(-1)), pictures.heat(rw_heat), pal[preds["rw"]],
          pal[gt]))
  return conf


def _instance_truth(cfg):
  """name, mask -> the image's ground-truth instances (`instances.ground_truth_instances`
  form), or None where it has none; or a reason (str) when the data has no instances to score:
  the synthetic data's objects are each class's connected regions of the mask (they never
  touch); VOC's are its SegmentationObject PNGs under data.manual_dir (VOC's train and val
  images have them; SBD's do not), each object of the class its pixels hold
  (instances.objects_ground_truth)."""
  if cfg.data.name == "synthetic_wsss":
    return lambda name, mask: instances.ground_truth_instances(mask)
  folder = os.path.join(str(cfg.data.get("manual_dir", "") or ""), "VOCdevkit", "VOC2012",
                        "SegmentationObject")
  if cfg.data.name == "voc2012_aug" and os.path.isdir(folder):
    def voc(name, mask):
      path = os.path.join(folder, name + ".png")
      if not os.path.isfile(path):
        return None
      objects = voc_files.read_object_png(path)
      if objects.shape != mask.shape:
        raise UserError(f"{path}: object map of {objects.shape[0]}x{objects.shape[1]} for an "
                        f"image of {mask.shape[0]}x{mask.shape[1]}")
      return instances.objects_ground_truth(objects, mask)
    return voc
  if cfg.data.name == "voc2012_aug":
    return f"no folder {folder} (data.manual_dir)"
  return f"dataset {cfg.data.name} has no instance masks"


def _score_instances(cfg, split: str, report) -> tuple[np.ndarray, int] | None:
  """([num_classes] AP at IoU 0.5 (NaN: no instance of the class), images scored) of the
  random_walk stage's instances over the images of `split` with ground-truth instances
  (`_instance_truth`; instances.average_precision, IRN's measure; an image random_walk skipped
  has its objects missed), or None when there are none to score."""
  import tensorflow_datasets as tfds
  truth_of = _instance_truth(cfg)
  if isinstance(truth_of, str):
    print(f"[evaluate] instances on {split} not scored: {truth_of}")
    return None
  workdir = artifacts.Workdir(cfg.workdir)
  builder = data.from_config(cfg)
  excluded = artifacts.skipped_by(workdir, "random_walk")
  predictions, truth = [], []
  for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    name = ex["name"].decode()
    if not ex["has_mask"]:
      continue
    gt = ex["mask"][..., 0]
    objects = truth_of(name, gt)
    if objects is None:
      continue
    path = workdir.instances(name)
    if name in excluded and not os.path.exists(path):
      if not len(objects[1]):
        continue  # nothing to find (an image without a class, which the walk passes over)
      # Its objects count as missed, as in IRN's evaluation (which scores every image).
      report.skip(name, "no instances (random_walk skipped it); its objects count as missed")
      found = instances.Instances(np.zeros(gt.shape, np.int32), np.zeros(0, np.int32),
                                  np.zeros(0, np.float32))
    else:
      found = instances.Instances(*artifacts.load_instances(path, gt.shape,
                                                            cfg.model.num_classes))
    predictions.append(found)
    truth.append(objects)
  if not truth:
    print(f"[evaluate] instances on {split} not scored: no image has ground-truth instances")
    return None
  return instances.average_precision(predictions, truth, cfg.model.num_classes), len(truth)


def _draw(workdir: artifacts.Workdir, scored: list) -> None:
  """results_iou.png (every row of the table) and results_confusion.png (the first
  segmentation row); an earlier run's are removed first, so that none outlives its table."""
  iou_path = workdir.path(artifacts.RESULTS_IOU_PNG)
  confusion_path = workdir.path(artifacts.RESULTS_CONFUSION_PNG)
  for path in (iou_path, confusion_path):
    if os.path.exists(path):
      os.remove(path)
  if scored:
    charts.iou_chart(iou_path, [(label, scores) for label, _, scores in scored])
  seg = [(label, scores) for label, kind, scores in scored if kind == "seg"]
  if seg:
    label, scores = seg[0]
    charts.confusion_picture(confusion_path, scores, f"{label}: mIoU {100 * scores.miou():.1f}%")


def run(cfg) -> dict:
  from affinity_jax import distributed
  if not distributed.is_main():  # the other processes' outputs are all written by now
    return {}
  workdir = artifacts.Workdir(cfg.workdir)
  results = {"splits": {}}
  report = artifacts.SkipReport(workdir, "evaluate", gather=False)
  rows = []
  scored = []  # (chart label, kind, Scores) per row
  # With random_walk.crf the pseudo labels are the paper's "CAM + RW + dCRF", not infer_aff.py's;
  # likewise the segmentation network's predictions with seg_infer.crf.
  labels = {"cam": "CAM", "rw": "CAM + RW + dCRF" if cfg.random_walk.crf else "CAM + RW",
            "seg": "Segmentation + dCRF" if cfg.seg_infer.crf else "Segmentation"}
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
      results["class_names"] = list(c.class_names)  # the dataset's, the same for every row
      miou = c.miou()
      results["splits"][split][kind] = {"miou": miou, "iou": c.iou().tolist()}
      key = f"{kind}_miou"
      if key not in results:
        results[key] = miou
      rows.append((labels[kind], split, miou))
      scored.append((f"{labels[kind]} ({split})", kind, c))
  table = ["| stage | split | mIoU (%) |", "|---|---|---|"]
  table += [f"| {what} | {split} | {100 * m:.1f} |" for what, split, m in rows]
  if config.method(cfg) == "irn" and cfg.random_walk.instances:
    ins_rows = []
    for split in cfg.eval.cam_splits:
      scored_instances = _score_instances(cfg, split, report)
      if scored_instances is None:
        continue
      ap, images = scored_instances
      mean_ap = float(np.nanmean(ap)) if np.any(np.isfinite(ap)) else float("nan")
      results["splits"][split]["instances"] = {"map50": mean_ap, "ap50": ap.tolist(),
                                               "images": images}
      results.setdefault("instance_map50", mean_ap)
      ins_rows.append(f"| Instances (IRN) | {split} | {images} | {100 * mean_ap:.1f} |")
    if ins_rows:
      table += ["", "| instances | split | images | mAP at IoU 0.5 (%) |", "|---|---|---|---|"]
      table += ins_rows
  text = "\n".join(table)
  artifacts.save_results(workdir, results, text)
  _draw(workdir, scored)
  print(text)
  return report.finish({k: v for k, v in results.items() if k.endswith(("_miou", "_map50"))})
