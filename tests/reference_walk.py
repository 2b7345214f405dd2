"""Test oracle: the original's random walk, dense and image by image.

`dense_*` build the HW x HW affinity matrix of one image and square the transition matrix as
the original's infer_aff.py does (O((hw)^2) memory: small grids only); `random_walk_labels` is
the single-image pseudo-label path (pool the CAM stack, walk, upsample, crop, argmax). The
pipeline's batched sparse walk (`affinity_jax.random_walk`, stages/random_walk.py) is checked
against them.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import geometry
from affinity_jax.random_walk import prepare_cam, random_walk


def random_walk_labels(features: jax.Array, cam: jax.Array, *, alpha: float = 16.0,
                       radius: int = 5, beta: float = 8.0, t: int = 256, scheme: str = "full",
                       stride: int = 8, tol: Optional[float] = None) -> np.ndarray:
  """Pseudo label of one image (docs/method.md §6).

  Args:
    features: [h_f, w_f, Cf] (or [1, h_f, w_f, Cf]) affinity features of the image padded
      bottom/right; h_f >= ceil(H / stride), w_f >= ceil(W / stride). A larger canvas grid is
      cropped to the image's grid (top-left placement, as cam.py).
    cam: [H, W, C] normalised CAMs of all classes (absent ones zero), so that label c + 1 is
      class c and 0 the background.
    alpha, radius, beta, t, scheme, stride, tol: see `prepare_cam` and `random_walk`.

  Returns:
    [H, W] uint8: argmax over C + 1 of the walk, bilinearly upsampled (half-pixel centres) to
    the padded size (stride * grid) and cropped to the image.
  """
  if features.ndim == 4:
    if features.shape[0] != 1:
      raise ValueError(f"random_walk_labels takes one image (got features {features.shape}).")
    features = features[0]
  cam = jnp.asarray(cam)
  if cam.ndim != 3:
    raise ValueError(f"cam must be [H, W, C] (got shape {tuple(cam.shape)}).")
  height, width = cam.shape[:2]
  scores = prepare_cam(cam, alpha=alpha, stride=stride)
  gh, gw = scores.shape[:2]
  if features.ndim != 3 or features.shape[0] < gh or features.shape[1] < gw:
    raise ValueError(f"features must be [h, w, Cf] with h >= {gh}, w >= {gw} for a "
                     f"{height}x{width} image at stride {stride} (got {tuple(features.shape)}).")
  features = features[:gh, :gw]
  walked = random_walk(features[None], scores[None], radius=radius, beta=beta, t=t,
                       scheme=scheme, tol=tol)[0]
  up = jax.image.resize(walked, (gh * stride, gw * stride, walked.shape[-1]), "bilinear",
                        antialias=False)
  return np.asarray(jnp.argmax(up[:height, :width], axis=-1)).astype(np.uint8)


def dense_affinity_matrix(forward: np.ndarray, *, radius: int = 5,
                          valid: Optional[np.ndarray] = None,
                          dtype=np.float64) -> np.ndarray:
  """The original's dense affinity matrix of one image: pairs + identity + transposed pairs.

  Args:
    forward: [h, w, K] masked forward affinities (`pair_affinities(...)[b]`). Every in-grid
      pair is entered; pairs outside the scheme carry 0 and so contribute 0 after the power.
    radius: radius of `forward`.
    valid: optional [h, w] bool; invalid positions keep only their identity entry (isolated).

  Returns:
    [hw, hw] `dtype` matrix (row-major flattening of the grid).
  """
  forward = np.asarray(forward, np.float64)
  h, w, k = forward.shape
  offsets = geometry.forward_offsets(radius)
  if k != len(offsets):
    raise ValueError(f"forward must be [h, w, {len(offsets)}] at radius {radius} "
                     f"(got {forward.shape}).")
  n = h * w
  mat = np.zeros((n, n), dtype)
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  frm = (ys * w + xs).reshape(-1)
  for j, (dy, dx) in enumerate(offsets):
    inside = ((ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)).reshape(-1)
    to = ((ys + dy) * w + xs + dx).reshape(-1)
    a = forward[..., j].reshape(-1)
    mat[frm[inside], to[inside]] += a[inside]
    mat[to[inside], frm[inside]] += a[inside]
  mat[np.arange(n), np.arange(n)] += 1.0
  if valid is not None:
    bad = np.flatnonzero(~np.asarray(valid, bool).reshape(-1))
    mat[bad, :] = 0.0
    mat[:, bad] = 0.0
    mat[bad, bad] = 1.0  # Paired indices: the diagonal entries of the invalid positions.
  return mat


def dense_walk(matrix: np.ndarray, cam: np.ndarray, *, beta: float = 8.0,
               t: int = 256) -> np.ndarray:
  """A^beta, column-normalise, T^t (by squaring when t is a power of 2), then vec(v) T^t.

  Args:
    matrix: [N, N] dense affinity matrix; its dtype sets the precision.
    cam: [N, C] scores.

  Returns:
    [N, C] walked scores.
  """
  trans = np.power(matrix, beta)
  trans /= trans.sum(axis=0, keepdims=True)
  if t > 0 and (t & (t - 1)) == 0:
    for _ in range(int(np.log2(t))):
      trans = trans @ trans
  else:
    trans = np.linalg.matrix_power(trans, t)
  return (np.asarray(cam, matrix.dtype).T @ trans).T


def dense_reference(forward: np.ndarray, cam: np.ndarray, *, radius: int = 5,
                    beta: float = 8.0, t: int = 256, valid: Optional[np.ndarray] = None,
                    dtype=np.float64) -> np.ndarray:
  """Dense random walk of one image, as the original computes it.

  Args:
    forward: [h, w, K] masked forward affinities of the pair set.
    cam: [h, w, C] scores.
    valid: optional [h, w] bool; invalid positions are zeroed in the input and the output.

  Returns:
    [h, w, C] walked scores in `dtype`.
  """
  h, w, c = np.shape(cam)
  cam = np.asarray(cam, np.float64)
  if valid is not None:
    cam = np.where(np.asarray(valid, bool)[..., None], cam, 0.0)
  mat = dense_affinity_matrix(forward, radius=radius, valid=valid, dtype=dtype)
  out = dense_walk(mat, cam.reshape(h * w, c), beta=beta, t=t).reshape(h, w, c)
  if valid is not None:
    out = np.where(np.asarray(valid, bool)[..., None], out, 0.0)
  return out
