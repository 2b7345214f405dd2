"""A literal NumPy transcription of IRN's centroid refinement (step/make_ins_seg_labels.py,
find_centroids_with_refinement: channel-first field, two-index gathers, in-place float32
updates), the oracle of instances.centroids where IRN's checkout is not at hand."""

import numpy as np


def centroids(displacement: np.ndarray, iterations: int = 300) -> np.ndarray:
  """[h, w, 2] float (dy, dx) -> [h, w, 2] int32 (y, x)."""
  field = np.ascontiguousarray(np.asarray(displacement, np.float32).transpose(2, 0, 1))
  height, width = field.shape[1:]
  cy = np.repeat(np.arange(height)[:, None], width, axis=1).astype(np.float32)
  cx = np.repeat(np.arange(width)[None, :], height, axis=0).astype(np.float32)
  for _ in range(iterations):
    uy, dy = np.ceil(cy).astype(np.int32), np.floor(cy).astype(np.int32)
    ux, dx = np.ceil(cx).astype(np.int32), np.floor(cx).astype(np.int32)
    wy, wx = cy - dy, cx - dx
    for pos, f in ((cy, field[0]), (cx, field[1])):
      pos += (f[uy, ux] * wy * wx + f[dy, ux] * (1 - wy) * wx + f[uy, dx] * wy * (1 - wx)
              + f[dy, dx] * (1 - wy) * (1 - wx))
    cy = np.clip(cy, 0, height - 1)
    cx = np.clip(cx, 0, width - 1)
  return np.stack([np.round(cy), np.round(cx)], -1).astype(np.int32)
