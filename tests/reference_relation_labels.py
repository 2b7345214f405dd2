"""Test oracle: IRN's reduction of a training crop's label to the stride-4 grid, by PIL.

IRN's loader (voc12/dataloader.py VOC12AffinityDataset) calls imutils.pil_rescale(label, 0.25,
order=0): PIL's nearest-neighbour resize of the uint8 map to (round(H / 4), round(W / 4)),
rounded half to even. The pipeline computes it inside tf.data (transforms.reduce_label_tf);
this version is PIL itself, so that tests can check the pipeline's against it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from affinity_jax.constants import IRN_STRIDE


def reduce_label(label: np.ndarray, stride: int = IRN_STRIDE) -> np.ndarray:
  """[H, W] integer labels in 0..255 -> [round(H / stride), round(W / stride)] uint8."""
  label = np.asarray(label)
  assert label.ndim == 2 and np.issubdtype(label.dtype, np.integer), label.dtype
  size = (int(np.round(label.shape[0] / stride)), int(np.round(label.shape[1] / stride)))
  reduced = Image.fromarray(np.ascontiguousarray(label, np.uint8)).resize(
      size[::-1], Image.Resampling.NEAREST)
  return np.asarray(reduced, np.uint8)
