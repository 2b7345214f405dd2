"""Dense CRF (Kraehenbuehl and Koltun) with the original's parameters, through pydensecrf.

docs/method.md §3: 10 mean-field iterations; unary = -log of the scores taken as probabilities
as they are (no re-normalisation over classes), clipped at 1e-5 as
pydensecrf.utils.unary_from_softmax does; Gaussian kernel sxy=3 compat=3; bilateral kernel
sxy=80 srgb=13 compat=10 on the RGB image.

docs/method.md §11 (IRN, misc/imutils.py `crf_inference_label`): the same model started from
hard labels instead of scores (`crf_label_inference`): unary -log(gt_prob = 0.7) for the given
label and -log(0.3 / (n - 1)) for each other one (pydensecrf.utils.unary_from_labels with
zero_unsure=False); 10 iterations; Gaussian kernel sxy=3 compat=3; bilateral kernel sxy=50
srgb=5 compat=10 on the RGB image; the argmax of the marginals.
"""

from __future__ import annotations

import numpy as np

GAUSSIAN_SXY = 3.0
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 80.0
BILATERAL_SRGB = 13.0
BILATERAL_COMPAT = 10
UNARY_CLIP = 1e-5

# IRN's label dCRF (misc/imutils.py crf_inference_label): a sharper appearance kernel than PSA's.
LABEL_GAUSSIAN_SXY = 3.0
LABEL_GAUSSIAN_COMPAT = 3
LABEL_BILATERAL_SXY = 50.0
LABEL_BILATERAL_SRGB = 5.0
LABEL_BILATERAL_COMPAT = 10
# Probability that a given label is right (crf_inference_label's default gt_prob).
LABEL_GT_PROB = 0.7


def check_image(image, caller: str) -> np.ndarray:
  """`image` as a uint8 [H, W, 3] numpy array, or ValueError naming `caller`."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{caller}: image must be uint8 RGB (got dtype {image.dtype}).")
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{caller}: image must be [H, W, 3] (got shape {image.shape}).")
  return image


def crf_inference(image: np.ndarray, probs: np.ndarray, *, t: int = 10) -> np.ndarray:
  """Mean-field dCRF inference.

  Args:
    image: [H, W, 3] uint8 RGB image.
    probs: [H, W, C] scores used as probabilities; they are not re-normalised, as in the
      original.
    t: mean-field iterations.

  Returns:
    [H, W, C] float32 marginals Q (sum to 1 over C at every pixel).
  """
  import pydensecrf.densecrf as dcrf  # Only the dCRF stages need the C extension.
  from pydensecrf.utils import unary_from_softmax

  image = check_image(image, "crf_inference")
  probs = np.asarray(probs)
  if probs.ndim != 3:
    raise ValueError(f"crf_inference: probs must be 3-D (got shape {probs.shape}).")
  h, w = image.shape[:2]
  if probs.shape[:2] != (h, w):
    raise ValueError(f"crf_inference: probs [H, W, C] does not match the {h}x{w} image "
                     f"(got {probs.shape}).")
  n_labels = probs.shape[-1]
  if n_labels < 1:
    raise ValueError("crf_inference: probs has no channel.")
  if not np.all(np.isfinite(probs)) or np.any(probs < 0):
    raise ValueError("crf_inference: probs must be finite and non-negative.")

  crf = dcrf.DenseCRF2D(w, h, n_labels)
  # pydensecrf wants classes first, C-contiguous float32.
  unary = unary_from_softmax(np.moveaxis(probs.astype(np.float32), -1, 0), clip=UNARY_CLIP)
  crf.setUnaryEnergy(np.ascontiguousarray(unary))
  crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
  crf.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB,
                           rgbim=np.ascontiguousarray(image), compat=BILATERAL_COMPAT)
  q = np.asarray(crf.inference(t), np.float32).reshape(n_labels, h, w)
  return np.ascontiguousarray(np.moveaxis(q, 0, -1))


def crf_label_inference(image: np.ndarray, labels: np.ndarray, num_labels: int, *, t: int = 10,
                        gt_prob: float = LABEL_GT_PROB) -> np.ndarray:
  """Mean-field dCRF started from hard labels, IRN's `crf_inference_label`.

  The unary of pixel i is -log(gt_prob) for label labels[i] and -log((1 - gt_prob) /
  (num_labels - 1)) for every other label (float32, as pydensecrf.utils.unary_from_labels with
  zero_unsure=False builds it: label 0 is a label like the others).

  Args:
    image: [H, W, 3] uint8 RGB image.
    labels: [H, W] integer labels in 0..num_labels-1.
    num_labels: number of labels n >= 1. With n = 1 the answer is 0 everywhere and no CRF runs
      (pydensecrf's unary divides by n - 1).
    t: mean-field iterations (IRN: 10).
    gt_prob: the probability given to each pixel's label, in (0, 1) (IRN: 0.7).

  Returns:
    [H, W] int64: argmax over the labels of the marginals Q (ties go to the lower label).
  """
  image = check_image(image, "crf_label_inference")
  labels = np.asarray(labels)
  h, w = image.shape[:2]
  if h == 0 or w == 0:
    raise ValueError(f"crf_label_inference: image is empty (shape {image.shape}).")
  if labels.shape != (h, w):
    raise ValueError(f"crf_label_inference: labels [H, W] does not match the {h}x{w} image "
                     f"(got shape {labels.shape}).")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    raise ValueError(f"crf_label_inference: labels must be integers (got dtype {labels.dtype}).")
  if isinstance(num_labels, bool) or int(num_labels) != num_labels or num_labels < 1:
    raise ValueError(f"crf_label_inference: num_labels must be an integer >= 1 "
                     f"(got {num_labels!r}).")
  num_labels = int(num_labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
    raise ValueError(f"crf_label_inference: labels must lie in 0..{num_labels - 1} for "
                     f"num_labels={num_labels} (got {labels.min()}..{labels.max()}).")
  if isinstance(t, bool) or int(t) != t or t < 0:
    raise ValueError(f"crf_label_inference: t must be a non-negative integer (got {t!r}).")
  if not 0.0 < gt_prob < 1.0:
    raise ValueError(f"crf_label_inference: gt_prob must lie in (0, 1) (got {gt_prob!r}).")
  if num_labels == 1:
    return np.zeros((h, w), np.int64)

  import pydensecrf.densecrf as dcrf  # Only the dCRF stages need the C extension.

  flat = labels.reshape(-1).astype(np.int64)
  # Energies in float64, stored as float32, as unary_from_labels does.
  unary = np.full((num_labels, h * w), -np.log((1.0 - gt_prob) / (num_labels - 1)), np.float32)
  unary[flat, np.arange(h * w)] = -np.log(gt_prob)
  crf = dcrf.DenseCRF2D(w, h, num_labels)
  crf.setUnaryEnergy(unary)
  crf.addPairwiseGaussian(sxy=LABEL_GAUSSIAN_SXY, compat=LABEL_GAUSSIAN_COMPAT)
  crf.addPairwiseBilateral(sxy=LABEL_BILATERAL_SXY, srgb=LABEL_BILATERAL_SRGB,
                           rgbim=np.ascontiguousarray(image), compat=LABEL_BILATERAL_COMPAT)
  q = np.asarray(crf.inference(int(t)), np.float32).reshape(num_labels, h, w)
  return np.argmax(q, axis=0).astype(np.int64)
