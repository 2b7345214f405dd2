"""Confusion matrix, IoU and mIoU on hand-computed examples."""

import math

import numpy as np
import pytest

from affinity_jax import metrics


def test_confusion_matrix_hand_example_and_accumulation():
  gt = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
  pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
  cm = metrics.confusion_matrix(gt, pred, num_classes=4)
  ref = np.zeros((4, 4), np.int64)
  ref[0, 0] = 2
  ref[0, 1] = 1
  ref[1, 1] = 2
  ref[2, 2] = 1
  ref[2, 0] = 1
  np.testing.assert_array_equal(cm, ref)
  iou = metrics.iou_from_confusion(cm)
  # class 0: TP 2, FP 1 (gt 2 -> 0), FN 1 (-> 1): 2/4; class 1: 2/3; class 2: 1/2; 3: NaN.
  np.testing.assert_allclose(iou[:3], [0.5, 2 / 3, 0.5])
  assert math.isnan(iou[3])
  assert metrics.mean_iou(cm) == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
  # Accumulated over a split, not averaged per image.
  acc = cm + metrics.confusion_matrix(np.array([[3, 3]]), np.array([[3, 0]]), num_classes=4)
  iou = metrics.iou_from_confusion(acc)
  assert iou[3] == pytest.approx(0.5)
  assert iou[0] == pytest.approx(2 / 5)
  assert metrics.mean_iou(acc) == pytest.approx((2 / 5 + 2 / 3 + 0.5 + 0.5) / 4)


def test_predicted_but_absent_class_scores_zero():
  cm = metrics.confusion_matrix(np.array([0, 0]), np.array([0, 1]), num_classes=3)
  iou = metrics.iou_from_confusion(cm)
  assert iou[1] == 0.0 and math.isnan(iou[2])
  assert metrics.mean_iou(cm) == pytest.approx(0.25)
  assert math.isnan(metrics.mean_iou(np.zeros((3, 3))))


def test_out_of_range_labels_raise_with_name():
  with pytest.raises(ValueError, match="ground truth.*7.*img_1"):
    metrics.confusion_matrix(np.array([7]), np.array([0]), num_classes=4, name="img_1")
  with pytest.raises(ValueError, match="prediction.*255"):
    metrics.confusion_matrix(np.array([0]), np.array([255]), num_classes=4)
  with pytest.raises(ValueError, match="shape"):
    metrics.confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int))
  with pytest.raises(ValueError, match="integer"):
    metrics.confusion_matrix(np.zeros(2, float), np.zeros(2, int))
  # 255 in the ground truth is skipped whatever the prediction is.
  assert metrics.confusion_matrix(np.array([255]), np.array([3]), num_classes=4).sum() == 0
