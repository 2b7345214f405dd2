"""Test oracle: affinity labels and pair labels in NumPy, in the original's vector order.

The pipeline computes affinity labels inside tf.data (`geometry.affinity_labels_tf`) and pair
labels per offset on the device (`geometry.pair_labels`); these NumPy versions follow
docs/method.md §3 and §5 directly so that tests can check both.
"""

from __future__ import annotations

import numpy as np

from affinity_jax.constants import IGNORE_LABEL
from affinity_jax.geometry import (NO_SCORE_THRESHOLD, _check_score_maps, forward_offsets,
                                   psa_pair_indices)


def _pool_np(x: np.ndarray, stride: int) -> np.ndarray:
  """Average pool [H, W, C] by `stride`, zero padding bottom/right to a multiple first."""
  h, w, c = x.shape
  gh, gw = -(-h // stride), -(-w // stride)
  x = np.pad(x, ((0, gh * stride - h), (0, gw * stride - w), (0, 0)))
  return x.reshape(gh, stride, gw, stride, c).mean(axis=(1, 3))


def affinity_labels(la: np.ndarray, ha: np.ndarray, *, stride: int = 8) -> np.ndarray:
  """Per-position affinity labels of a crop from its two dCRF score maps (numpy).

  Args:
    la: [H, W, C+1] dCRF scores with alpha = 4 (background amplified); channel 0 = background;
      zero where the crop is padding.
    ha: [H, W, C+1] dCRF scores with alpha = 32 (background suppressed), same layout.
    stride: the feature stride; H and W are zero padded to a multiple of it, then average pooled.

  Returns:
    [ceil(H / stride), ceil(W / stride)] uint8: argmax(la); 255 where argmax(la) is background;
    0 where argmax(ha) is background; 255 where every score of la and ha is < 1e-5.
  """
  la = np.asarray(la, np.float32)
  ha = np.asarray(ha, np.float32)
  _check_score_maps(la, ha, "affinity_labels")
  la, ha = _pool_np(la, stride), _pool_np(ha, stride)
  no_score = np.maximum(la.max(-1), ha.max(-1)) < NO_SCORE_THRESHOLD
  label_la = la.argmax(-1)
  label = np.where(label_la == 0, IGNORE_LABEL, label_la)
  label = np.where(ha.argmax(-1) == 0, 0, label)
  label = np.where(no_score, IGNORE_LABEL, label)
  return label.astype(np.uint8)


def pair_labels_psa_vector(labels: np.ndarray, radius: int = 5) -> dict[str, np.ndarray]:
  """Pair labels of one [h, w] grid in the original's vector order ([K * N] each), numpy.

  For parity checks against the original's label extraction; `pair_labels` is the one to use.
  """
  labels = np.asarray(labels).astype(np.int64)
  ind_from, ind_to = psa_pair_indices(*labels.shape, radius)
  flat = labels.reshape(-1)
  frm = np.tile(flat[ind_from], len(forward_offsets(radius)))
  to = flat[ind_to]
  confident = (frm != IGNORE_LABEL) & (to != IGNORE_LABEL)
  same = frm == to
  return {
      "fg_pos": (same & (frm != 0) & confident).astype(np.float32),
      "bg_pos": (same & (frm == 0)).astype(np.float32),
      "neg": (~same & confident).astype(np.float32),
  }
