"""Dense CRF (Kraehenbuehl and Koltun) with the original's parameters, through pydensecrf.

docs/method.md §3: 10 mean-field iterations; unary = -log of the scores taken as probabilities
as they are (no re-normalisation over classes), clipped at 1e-5 as
pydensecrf.utils.unary_from_softmax does; Gaussian kernel sxy=3 compat=3; bilateral kernel
sxy=80 srgb=13 compat=10 on the RGB image.
"""

from __future__ import annotations

import numpy as np

GAUSSIAN_SXY = 3.0
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 80.0
BILATERAL_SRGB = 13.0
BILATERAL_COMPAT = 10
UNARY_CLIP = 1e-5


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

  image = np.asarray(image)
  probs = np.asarray(probs)
  if image.dtype != np.uint8:
    raise ValueError(f"crf_inference: image must be uint8 RGB (got dtype {image.dtype}).")
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"crf_inference: image must be [H, W, 3] (got shape {image.shape}).")
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
