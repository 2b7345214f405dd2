"""Segmentation evaluation: a confusion matrix accumulated over a split, per-class IoU, mIoU.

Conventions (docs/method.md §9):
- Ground-truth pixels labelled `ignore_index` (255) are skipped, whatever is predicted there.
- Any other ground-truth or predicted value outside [0, num_classes) is an error (ValueError):
  it means a wrong class mapping or a broken file, which must not be scored silently.
- IoU_c = TP / (TP + FP + FN). A class absent from both ground truth and prediction over the
  whole split has no IoU: NaN, and mIoU is the mean over the other classes (nanmean), as the
  usual VOC scripts do. A class predicted but never in the ground truth has IoU 0.
- A prediction of 255 ("no class": a method that abstains) is not a class: `confusion_matrix`
  refuses it, and evaluation.py counts such pixels per ground-truth class apart (`unlabelled`),
  as misses of that class: FN, and FP of no class. Abstaining never raises a score.
"""

from __future__ import annotations

import numpy as np

from affinity_jax.constants import IGNORE_LABEL


def confusion_matrix(ground_truth: np.ndarray, prediction: np.ndarray, num_classes: int = 21, *,
                     ignore_index: int = IGNORE_LABEL, name: str = "") -> np.ndarray:
  """[num_classes, num_classes] int64 counts of (ground truth, prediction) pixel pairs.

  Args:
    ground_truth, prediction: integer label maps of the same shape (any rank).
    num_classes: 21 for VOC (background + 20).
    ignore_index: ground-truth value that is skipped.
    name: named in error messages (e.g. the image id).
  """
  gt = np.asarray(ground_truth)
  pred = np.asarray(prediction)
  where = f" ({name})" if name else ""
  if gt.shape != pred.shape:
    raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape{where}.")
  for what, arr in (("ground truth", gt), ("prediction", pred)):
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
      raise ValueError(f"{what} must hold integer labels (got dtype {arr.dtype}){where}.")
  gt = gt.astype(np.int64).reshape(-1)
  pred = pred.astype(np.int64).reshape(-1)
  keep = gt != ignore_index
  gt, pred = gt[keep], pred[keep]
  for what, arr in (("ground truth", gt), ("prediction", pred)):
    bad = (arr < 0) | (arr >= num_classes)
    if np.any(bad):
      values = np.unique(arr[bad])[:10].tolist()
      raise ValueError(f"{what} has labels outside [0, {num_classes}) other than "
                       f"{ignore_index}: {values}{where}.")
  return np.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def iou_from_confusion(counts: np.ndarray, unlabelled: np.ndarray | None = None) -> np.ndarray:
  """Per-class IoU [num_classes] float64; NaN for classes absent from GT and prediction.

  `unlabelled` [num_classes]: ground-truth pixels of each class predicted 255 (no class),
  counted as false negatives of that class.
  """
  counts = np.asarray(counts, np.float64)
  tp = np.diag(counts)
  union = counts.sum(0) + counts.sum(1) - tp
  if unlabelled is not None:
    union = union + np.asarray(unlabelled, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def mean_iou(counts: np.ndarray, unlabelled: np.ndarray | None = None) -> float:
  """nanmean of the per-class IoU (NaN when no pixel was scored at all)."""
  iou = iou_from_confusion(counts, unlabelled)
  return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")
