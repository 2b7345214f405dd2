"""Pictures of label maps and score maps for people to look at: colours, overlays, heat maps.

Label maps are coloured with PASCAL VOC's palette (`palette`: index 0, the
background, black; 255, "no class", cream), score maps in [0, 1] with a black -> red -> yellow
-> white heat scale. NumPy only: uint8 [H, W, 3] RGB in and out.
"""

from __future__ import annotations

import numpy as np


# How much of the picture an overlay's colour takes.
OVERLAY_OPACITY = 0.5


def palette(n: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map: [n, 3] uint8, bit-interleaved RGB of the index (255 -> the
  boundary colour)."""
  pal = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  return pal


def heat(x: np.ndarray) -> np.ndarray:
  """[H, W] in [0, 1] -> [H, W, 3] uint8 (black -> red -> yellow -> white)."""
  x = np.clip(np.nan_to_num(np.asarray(x, np.float32)), 0, 1)  # NaN (a diverged net): 0
  rgb = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], -1)
  return (rgb * 255).astype(np.uint8)


def blend(image: np.ndarray, colours: np.ndarray, where: np.ndarray | None = None,
          opacity: float = OVERLAY_OPACITY) -> np.ndarray:
  """`colours` [H, W, 3] laid over the uint8 RGB `image` [H, W, 3] with `opacity`, where the
  bool mask `where` [H, W] is True (everywhere by default)."""
  image = np.asarray(image, np.float32)
  mixed = (1 - opacity) * image + opacity * np.asarray(colours, np.float32)
  if where is not None:
    mixed = np.where(np.asarray(where)[..., None], mixed, image)
  return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def label_overlay(image: np.ndarray, label: np.ndarray) -> np.ndarray:
  """The uint8 RGB `image` [H, W, 3] with its label map [H, W] (0 background, c + 1 class c)
  laid over it in VOC's colours; the background is left as it is."""
  label = np.asarray(label)
  return blend(image, palette()[label], where=label > 0)


def heat_overlay(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """The uint8 RGB `image` [H, W, 3] under the heat colours of `scores` [H, W] in [0, 1]."""
  return blend(image, heat(scores))


def side_by_side(*parts: np.ndarray) -> np.ndarray:
  """uint8 [H, W_i, 3] pictures of one height side by side, 4 white columns apart."""
  gap = np.full((parts[0].shape[0], 4, 3), 255, np.uint8)
  row = [parts[0]]
  for p in parts[1:]:
    row += [gap, p]
  return np.concatenate(row, axis=1)
