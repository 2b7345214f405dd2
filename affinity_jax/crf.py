"""Dense CRF (Kraehenbuehl and Koltun) with the original's parameters, through pydensecrf.

PSA.md step 3: 10 mean-field iterations; unary = -log of the scores taken as probabilities as they
are (no re-normalisation over classes), clipped at 1e-5 as pydensecrf.utils.unary_from_softmax
does; Gaussian kernel sxy=3 compat=3; bilateral kernel sxy=80 srgb=13 compat=10 on the RGB image.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

GAUSSIAN_SXY = 3.0
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 80.0
BILATERAL_SRGB = 13.0
BILATERAL_COMPAT = 10
UNARY_CLIP = 1e-5


def crf_inference(image: np.ndarray, probs: np.ndarray, *, t: int = 10,
                  scale_factor: float = 1.0, labels: Optional[int] = None,
                  channels_first: bool = False) -> np.ndarray:
  """Mean-field dCRF inference.

  Args:
    image: [H, W, 3] uint8 RGB image.
    probs: [H, W, C] scores used as probabilities (or [C, H, W] with channels_first=True); they
      are not re-normalised, as in the original.
    t: mean-field iterations.
    scale_factor: divides both kernels' sxy (the original's knob for rescaled images).
    labels: number of labels; must equal C when given (kept for the original's signature).
    channels_first: probs is [C, H, W].

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
  if channels_first:
    probs = np.moveaxis(probs, 0, -1)
  h, w = image.shape[:2]
  if probs.shape[:2] != (h, w):
    layout = "[C, H, W]" if channels_first else "[H, W, C]"
    raise ValueError(f"crf_inference: probs {layout} does not match the {h}x{w} image "
                     f"(got {np.asarray(probs).shape} after layout {layout}).")
  n_labels = probs.shape[-1]
  if labels is not None and labels != n_labels:
    raise ValueError(f"crf_inference: labels={labels} but probs has {n_labels} channels.")
  if n_labels < 1:
    raise ValueError("crf_inference: probs has no channel.")
  if not np.all(np.isfinite(probs)) or np.any(probs < 0):
    raise ValueError("crf_inference: probs must be finite and non-negative.")

  crf = dcrf.DenseCRF2D(w, h, n_labels)
  # pydensecrf wants classes first, C-contiguous float32.
  unary = unary_from_softmax(np.moveaxis(probs.astype(np.float32), -1, 0), clip=UNARY_CLIP)
  crf.setUnaryEnergy(np.ascontiguousarray(unary))
  crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY / scale_factor, compat=GAUSSIAN_COMPAT)
  crf.addPairwiseBilateral(sxy=BILATERAL_SXY / scale_factor, srgb=BILATERAL_SRGB,
                           rgbim=np.ascontiguousarray(image), compat=BILATERAL_COMPAT)
  q = np.asarray(crf.inference(t), np.float32).reshape(n_labels, h, w)
  return np.ascontiguousarray(np.moveaxis(q, 0, -1))
