"""The padded-canvas forward: activations outside each image are zeroed where positions mix.

Inference runs the networks on a fixed canvas (one compile per scale), each image at the
top-left with normalised zeros around it. The original runs the CAM network on the unpadded
image and AffinityNet on the image padded to a multiple of 8, and each of its convolutions
zero-pads at the border of what it is given. On the canvas a 3x3 convolution at the image's
bottom/right border would instead see the BatchNorm-shifted, ReLU'd activations of the canvas
padding, and the difference spreads inwards layer after layer. Zeroing the activations outside
each image before every layer whose window spans several positions (3x3 and dilated
convolutions, VGG-16's max pools) and restricting pooled statistics (global average pooling,
GroupNorm) to the image makes the canvas forward equal the unpadded one on the image's cells.

Extent of an H x W image at stride 2^k: ceil(H / 2^k) x ceil(W / 2^k). Every stride-2 layer
gives ceil(H / 2) outputs of an H-row input: a 3x3 convolution or max pool padded by 1 on each
side (output i sees rows 2i - 1 .. 2i + 1, all inside [-1, H] when i < ceil(H / 2)) and a 1x1
projection that subsamples (row 2i < H). Halving twice is ceil(ceil(H / 2) / 2) = ceil(H / 4).
Pointwise layers (BatchNorm, ReLU, 1x1 convolutions, ELU) need no mask: what they compute
outside the image is never read by a cell inside it unless a mixing layer follows, and that one
masks first. `sizes=None` everywhere means no mask (training: crops fill their input).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def valid_cells(sizes: jax.Array | None, hw: tuple[int, int], stride: int) -> jax.Array | None:
  """[B, h, w, 1] bool: the cells of an h x w grid at `stride` inside each example's extent
  ceil(size / stride); None when `sizes` ([B, 2] int, (height, width) in input pixels) is."""
  if sizes is None:
    return None
  extent = (jnp.asarray(sizes, jnp.int32) + stride - 1) // stride  # [B, 2]
  rows = jnp.arange(hw[0], dtype=jnp.int32)[None, :] < extent[:, :1]
  cols = jnp.arange(hw[1], dtype=jnp.int32)[None, :] < extent[:, 1:]
  return rows[:, :, None, None] & cols[:, None, :, None]


def zero_outside(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """x [B, h, w, C] with the cells outside `valid` ([B, h, w, 1], from `valid_cells`) set to 0,
  as the original's zero padding; x itself when `valid` is None."""
  if valid is None:
    return x
  return jnp.where(valid, x, jnp.zeros((), x.dtype))


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, h, w, C] -> [B, 1, 1, C] float32: the mean over each example's `valid` cells (at least
  one cell counted, so an all-padding dummy example stays finite)."""
  weight = valid.astype(jnp.float32)
  total = jnp.sum(jnp.where(valid, x.astype(jnp.float32), 0.0), axis=(1, 2), keepdims=True)
  return total / jnp.maximum(jnp.sum(weight, axis=(1, 2), keepdims=True), 1.0)
