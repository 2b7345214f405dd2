"""Batched multi-scale + flip inference on fixed canvases, shared by infer_cam, random_walk, infer_seg.

Every image of a batch sits at the top-left of a fixed canvas (data.pipelines.inference), so one
compiled function serves a whole split whatever the image sizes. Per-image geometry (its own
stride-8 extent, its size, its flip) enters as data, not shapes:

* a flip pass flips each image within its own width (a per-example gather), so its stride-8
  grid is aligned as when the original flips the unpadded image;
* bilinear upsampling with half-pixel centres (PyTorch's align_corners=False) of a grid cropped
  to the image's own extent is a pair of interpolation matrices, Ry [H, h] and Rx [W, w],
  built on the host per image and zero outside the image; on device it is one einsum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STRIDE = 8


def interp_matrix(out_size: int, in_size: int, out_pad: int, in_pad: int) -> np.ndarray:
  """[out_pad, in_pad] bilinear weights (align_corners=False) from in_size cells to out_size.

  Row y < out_size holds the weights PyTorch's bilinear upsampling gives source cells for output
  y (source coordinate (y + 0.5) * in / out - 0.5, clamped at 0, upper neighbour clamped to the
  last cell); other rows and columns >= in_size are zero.
  """
  m = np.zeros((out_pad, in_pad), np.float32)
  if out_size <= 0 or in_size <= 0:
    return m
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  src = np.maximum(src, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = (src - i0).astype(np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - frac)
  np.add.at(m, (rows, i1), frac)
  return m


def resize_bilinear(maps: np.ndarray, size) -> np.ndarray:
  """[H, W, C] -> [size[0], size[1], C], bilinear with half-pixel centres (align_corners=False)."""
  ry = interp_matrix(int(size[0]), maps.shape[0], int(size[0]), maps.shape[0])
  rx = interp_matrix(int(size[1]), maps.shape[1], int(size[1]), maps.shape[1])
  rows = np.einsum("yh,hwc->ywc", ry, maps.astype(np.float32))  # Two passes: O(HW(H'+W')).
  return np.einsum("ywc,xw->yxc", rows, rx)


def grid_size(size: int) -> int:
  return -(-int(size) // STRIDE)


def flip_index(widths: np.ndarray, canvas_w: int) -> np.ndarray:
  """[B, canvas_w] gather index flipping each row's first widths[b] columns."""
  x = np.arange(canvas_w)[None, :]
  w = np.asarray(widths)[:, None]
  return np.where(x < w, w - 1 - x, x).astype(np.int32)


def flip_within(images: jax.Array, index: jax.Array) -> jax.Array:
  """images [B, H, W, C], index [B, W] -> each image flipped within its own width."""
  return jnp.take_along_axis(images, index[:, None, :, None], axis=2)


def upsample_matrices(sizes: np.ndarray, out_sizes: np.ndarray, grid_hw: tuple[int, int],
                      out_hw: tuple[int, int], flipped: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Per-example (Ry [B, Ho, h], Rx [B, Wo, w]) taking the grid of an input of `sizes` (cropped
  to its stride-8 extent) to `out_sizes`; for a flip pass Rx also flips the result back."""
  ry = np.stack([interp_matrix(int(o[0]), grid_size(s[0]), out_hw[0], grid_hw[0])
                 for s, o in zip(sizes, out_sizes)])
  rx = []
  for s, o in zip(sizes, out_sizes):
    m = interp_matrix(int(o[1]), grid_size(s[1]), out_hw[1], grid_hw[1])
    if flipped:
      w = int(o[1])
      m[:w] = m[:w][::-1].copy()
    rx.append(m)
  return ry, np.stack(rx)


def upsample(grid: jax.Array, ry: jax.Array, rx: jax.Array) -> jax.Array:
  """grid [B, h, w, C] -> [B, Ho, Wo, C] with per-example interpolation matrices."""
  return jnp.einsum("byh,bhwc,bxw->byxc", ry, grid.astype(jnp.float32), rx,
                    precision=jax.lax.Precision.HIGHEST)


def pass_inputs(batch: dict, scales, out_key: str = "orig_size") -> list[dict]:
  """Host-side per-scale inputs of one inference batch: images, flip index, matrices."""
  out_sizes = np.asarray(batch[out_key])
  canvas_hw = batch["raw"].shape[1:3]
  passes = []
  for i, _ in enumerate(scales):
    images = batch[f"image_s{i}"]
    sizes = np.asarray(batch[f"size_s{i}"])
    grid_hw = (grid_size(images.shape[1]), grid_size(images.shape[2]))
    ry, rx = upsample_matrices(sizes, out_sizes, grid_hw, canvas_hw)
    _, rx_flip = upsample_matrices(sizes, out_sizes, grid_hw, canvas_hw, flipped=True)
    passes.append({"images": images, "flip": flip_index(sizes[:, 1], images.shape[2]),
                   "ry": ry, "rx": rx, "rx_flip": rx_flip})
  return passes


def multiscale_flip_sum(apply_fn):
  """jit(variables, passes) -> sum over scales and flips of `apply_fn(variables, images)` grids
  upsampled to the canvas, [B, Hc, Wc, C] float32."""
  @jax.jit
  def run(variables, passes: list[dict]) -> jax.Array:
    total = 0.0
    for p in passes:
      b = p["images"].shape[0]
      both = jnp.concatenate([p["images"], flip_within(p["images"], p["flip"])], axis=0)
      grids = apply_fn(variables, both)
      total = total + upsample(grids[:b], p["ry"], p["rx"])
      total = total + upsample(grids[b:], p["ry"], p["rx_flip"])
    return total
  return run


def batch_names(batch: dict) -> list[str]:
  return [n.decode() if isinstance(n, bytes) else str(n) for n in batch["name"]]
