"""Test oracle: the per-image CAM path written as the original does it, image by image.

The pipeline runs `affinity_jax.cam` on padded canvases in batches; these functions do the same
for one unpadded image at a time, so tests and the comparison with the original can check the
batched path against them. Canvas convention: a pass on a canvas holding a rescaled H_s x W_s
image at its top-left gives a grid whose rows [0, ceil(H_s / 8)) and columns [0, ceil(W_s / 8))
are the image's own grid; that crop is upsampled bilinearly with half-pixel centres
(align_corners=False) to the image's H x W, and a flip pass is flipped back.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

NORM_EPS = 1e-5


def grid_extent(scaled_hw: tuple[int, int], stride: int = 8) -> tuple[int, int]:
  """Stride-`stride` grid size of an unpadded H_s x W_s input: (ceil(H_s/s), ceil(W_s/s))."""
  return -(-int(scaled_hw[0]) // stride), -(-int(scaled_hw[1]) // stride)


def upsample_cam(cam_grid: jax.Array, image_hw: tuple[int, int], *,
                 scaled_hw: Optional[tuple[int, int]] = None, stride: int = 8,
                 flipped: bool = False) -> jax.Array:
  """One pass's CAM grid -> the original image size, cropping a canvas grid to the image.

  Args:
    cam_grid: [h, w, C] CAM of one pass (relu of the 1x1 classifier on the features).
    image_hw: (H, W) of the original image.
    scaled_hw: (H_s, W_s) of the rescaled image the pass saw; when given, the grid is cropped to
      `grid_extent(scaled_hw, stride)` first (required for padded canvases).
    stride: the network's output stride.
    flipped: the pass saw the horizontally flipped image; the result is flipped back.

  Returns:
    [H, W, C] float32.
  """
  cam_grid = jnp.asarray(cam_grid, jnp.float32)
  if cam_grid.ndim != 3:
    raise ValueError(f"cam_grid must be [h, w, C] (got shape {tuple(cam_grid.shape)}).")
  if scaled_hw is not None:
    gh, gw = grid_extent(scaled_hw, stride)
    if gh > cam_grid.shape[0] or gw > cam_grid.shape[1]:
      raise ValueError(f"a {scaled_hw[0]}x{scaled_hw[1]} input needs a {gh}x{gw} grid at "
                       f"stride {stride}, but the CAM grid is only {cam_grid.shape[:2]}.")
    cam_grid = cam_grid[:gh, :gw]
  height, width = int(image_hw[0]), int(image_hw[1])
  # antialias=False: plain interpolation like PyTorch's, also if a grid is larger than the image.
  up = jax.image.resize(cam_grid, (height, width, cam_grid.shape[-1]), "bilinear",
                        antialias=False)
  return up[:, ::-1] if flipped else up


def aggregate_cams(passes: Sequence[jax.Array] | jax.Array, label: jax.Array) -> jax.Array:
  """Sum of the passes' upsampled CAMs, absent classes zeroed, each class divided by its max.

  Args:
    passes: P arrays [H, W, C] (or one [P, H, W, C]) from `upsample_cam`.
    label: [C] multi-hot image label.

  Returns:
    [H, W, C] float32 in [0, 1): present classes divided by (their own max + 1e-5); absent
    classes 0.
  """
  stack = jnp.asarray(passes, jnp.float32) if not isinstance(passes, (list, tuple)) else \
      jnp.stack([jnp.asarray(p, jnp.float32) for p in passes])
  if stack.ndim != 4:
    raise ValueError(f"passes must be [P, H, W, C] (got shape {tuple(stack.shape)}).")
  label = jnp.asarray(label)
  if label.shape != stack.shape[-1:]:
    raise ValueError(f"label must be [{stack.shape[-1]}] (got {tuple(label.shape)}).")
  present = label > 0
  total = jnp.sum(jnp.where(present, stack, 0.0), axis=0)
  peak = jnp.max(total, axis=(0, 1))
  return jnp.where(present, total / (peak + NORM_EPS), 0.0)


def multiscale_cam(cam_grids: Sequence[jax.Array], *, image_hw: tuple[int, int],
                   label: jax.Array, scaled_hws: Optional[Sequence[tuple[int, int]]] = None,
                   flips: Optional[Sequence[bool]] = None, stride: int = 8) -> jax.Array:
  """PSA's multi-scale CAM: `upsample_cam` per pass, then `aggregate_cams`.

  Args:
    cam_grids: P grids [h_p, w_p, C] (PSA: scales 1.0, 0.5, 1.5, 2.0, each plain and flipped).
    image_hw: original image size.
    label: [C] multi-hot.
    scaled_hws: per pass (H_s, W_s) for canvas cropping (None: the grids are unpadded).
    flips: per pass, whether it saw the flipped image (None: no flips).
  """
  n = len(cam_grids)
  scaled_hws = [None] * n if scaled_hws is None else list(scaled_hws)
  flips = [False] * n if flips is None else list(flips)
  if len(scaled_hws) != n or len(flips) != n:
    raise ValueError(f"{n} CAM grids but {len(scaled_hws)} sizes and {len(flips)} flip flags.")
  ups = [upsample_cam(g, image_hw, scaled_hw=s, stride=stride, flipped=f)
         for g, s, f in zip(cam_grids, scaled_hws, flips)]
  return aggregate_cams(ups, label)
