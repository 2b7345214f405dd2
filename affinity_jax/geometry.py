"""Pair geometry of AffinityNet: radius offsets, pair masks, affinities, affinity labels.

Everything lives on the stride-8 feature grid, channels last. A *pair* joins a "from" position
p = (y, x) to p + o for a forward offset o = (dy, dx) inside the radius gamma (docs/method.md §4).
Per-pair arrays are laid out per offset, [B, h, w, K]: entry [b, y, x, k] belongs to the pair
((y, x), (y + dy_k, x + dx_k)). Two pair sets ("schemes") exist:

- "psa": the original's enumeration. From positions are rows 0..h-r and columns r-1..w-r, so
  every forward offset stays inside the grid; pairs with both ends in that border band are absent.
- "full": every position, every forward offset whose target lies inside the grid (the default).

Both give the same affinity and the same labels for every pair they share; pairs outside a scheme
are masked to 0. An optional per-image validity mask [B, h, w] (True = a real image position,
False = padding of a canvas; the image's own grid at the top-left) removes every pair with an
invalid end, and for "psa" also makes the from positions those of each image's own grid (rows
0..h_i-r, columns r-1..w_i-r), as the original builds the pair set on the image's feature grid.

The random walk uses the *symmetric neighbourhood*: 2K+1 offsets (identity, the K forward ones,
then the K backward ones), whose affinities are the forward ones shifted, identity = 1.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax.compilation import jit
from affinity_jax.constants import IGNORE_LABEL, STRIDE

SCHEMES = ("psa", "full")

# A grid cell whose every la / ha score is under this has no label (docs/method.md §3).
NO_SCORE_THRESHOLD = 1e-5


def _check_radius(radius: int) -> int:
  if int(radius) != radius or radius < 2:
    raise ValueError(f"radius must be an integer >= 2 (got {radius!r}).")
  return int(radius)


def _check_scheme(scheme: str) -> str:
  if scheme not in SCHEMES:
    raise ValueError(f"scheme must be one of {SCHEMES} (got {scheme!r}).")
  return scheme


@functools.lru_cache(maxsize=None)
def forward_offsets(radius: int = 5) -> tuple[tuple[int, int], ...]:
  """The K forward offsets (dy, dx) within `radius`, in the original's order.

  (0, 1..r-1) first, then for dy = 1..r-1 the dx = -(r-1)..r-1 with dx^2 + dy^2 < r^2.
  K = 34 at radius 5.
  """
  r = _check_radius(radius)
  offsets = [(0, dx) for dx in range(1, r)]
  for dy in range(1, r):
    for dx in range(-r + 1, r):
      if dx * dx + dy * dy < r * r:
        offsets.append((dy, dx))
  return tuple(offsets)


def symmetric_offsets(radius: int = 5) -> tuple[tuple[int, int], ...]:
  """The 2K+1 offsets of the symmetric neighbourhood: identity, K forward, K backward.

  Index 0 is (0, 0); index 1 + k is forward offset k; index 1 + K + k is its negation.
  """
  fwd = forward_offsets(radius)
  return ((0, 0),) + fwd + tuple((-dy, -dx) for dy, dx in fwd)


def _shift(x: jax.Array, dy: int, dx: int, fill=0) -> jax.Array:
  """y[b, i, j, ...] = x[b, i + dy, j + dx, ...], `fill` outside. x: [B, h, w, ...]."""
  h, w = x.shape[1], x.shape[2]
  pad = [(0, 0)] * x.ndim
  pad[1] = (max(-dy, 0), max(dy, 0))
  pad[2] = (max(-dx, 0), max(dx, 0))
  xp = jnp.pad(x, pad, constant_values=fill)
  y0, x0 = max(dy, 0), max(dx, 0)
  return xp[:, y0:y0 + h, x0:x0 + w]


def _scheme_mask_np(h: int, w: int, radius: int, scheme: str) -> np.ndarray:
  """[h, w, K] bool: pair (p, p + o_k) belongs to the scheme's pair set."""
  offsets = forward_offsets(radius)
  r = radius
  ys = np.arange(h)[:, None]
  xs = np.arange(w)[None, :]
  mask = np.zeros((h, w, len(offsets)), bool)
  for k, (dy, dx) in enumerate(offsets):
    inside = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
    if scheme == "psa":
      inside = inside & (ys <= h - r) & (xs >= r - 1) & (xs <= w - r)
    mask[:, :, k] = inside
  return mask


def pair_mask(h: int, w: int, *, radius: int = 5, scheme: str = "full",
              valid: Optional[jax.Array] = None) -> jax.Array:
  """Validity of every forward pair.

  Args:
    h, w: feature grid size.
    radius: gamma of the paper (5 in PSA).
    scheme: "psa" (the original's enumeration) or "full" (every position, masked at the edge).
    valid: optional [B, h, w] bool, False on padding of a canvas; a pair needs both ends valid.
      With "psa", a from position p also needs p + (r-1, -(r-1)) and p + (r-1, r-1) valid:
      for an image's grid at the canvas's top-left, the original's pair set on that grid.

  Returns:
    [h, w, K] bool without `valid`, [B, h, w, K] bool with it.
  """
  radius = _check_radius(radius)
  _check_scheme(scheme)
  mask = jnp.asarray(_scheme_mask_np(h, w, radius, scheme))
  if valid is None:
    return mask
  valid = jnp.asarray(valid, bool)
  if valid.ndim != 3 or valid.shape[1:] != (h, w):
    raise ValueError(f"valid must be [B, {h}, {w}] (got {tuple(valid.shape)}).")
  return _mask_with_valid(mask, valid, radius=radius, psa=scheme == "psa")


@functools.partial(jit, static_argnames=("radius", "psa"))
def _mask_with_valid(mask, valid, *, radius, psa):
  ends = jnp.stack([_shift(valid, dy, dx, fill=False)
                    for dy, dx in forward_offsets(radius)], axis=-1)
  start = valid
  if psa:  # The from positions of the image's own grid: r-1 rows below, r-1 columns each side.
    r = radius - 1
    start = start & _shift(valid, r, -r, fill=False) & _shift(valid, r, r, fill=False)
  return mask[None] & start[..., None] & ends


def psa_pair_indices(h: int, w: int, radius: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """The original's flat pair indices, in its exact order.

  Returns:
    ind_from: [N] int64 flat indices (row-major over [h, w]) of the from positions, rows
      0..h-r and columns r-1..w-r.
    ind_to: [K * N] int64, offset-major: the to positions of offset 0 for every from position,
      then offset 1, and so on. The original's affinity vector has this order.
  """
  r = _check_radius(radius)
  if h < r or w < 2 * r - 1:
    raise ValueError(f"the psa pair set needs h >= {r} and w >= {2 * r - 1} at radius {r} "
                     f"(got {h}x{w}).")
  flat = np.arange(h * w, dtype=np.int64).reshape(h, w)
  ch, cw = h - (r - 1), w - 2 * (r - 1)
  ind_from = flat[:ch, r - 1:r - 1 + cw].reshape(-1)
  ind_to = np.concatenate([flat[dy:dy + ch, r - 1 + dx:r - 1 + dx + cw].reshape(-1)
                           for dy, dx in forward_offsets(r)])
  return ind_from, ind_to


def to_psa_vector(per_offset: jax.Array, radius: int = 5) -> jax.Array:
  """[B, h, w, K] per-offset pair values -> [B, K * N] in the original's vector order."""
  r = _check_radius(radius)
  b, h, w, k = per_offset.shape
  if k != len(forward_offsets(r)):
    raise ValueError(f"expected K = {len(forward_offsets(r))} offsets at radius {r} (got {k}).")
  crop = per_offset[:, :h - r + 1, r - 1:w - r + 1, :]
  return jnp.transpose(crop, (0, 3, 1, 2)).reshape(b, -1)


def pair_affinities(features: jax.Array, *, radius: int = 5, scheme: str = "full",
                    valid: Optional[jax.Array] = None) -> jax.Array:
  """Forward-pair affinities W_ij = exp(-mean_c |f_i - f_j|).

  Computed from shifted views of the feature grid (no HW x HW gather); static shapes, jit-able.

  Args:
    features: [B, h, w, C] affinity features.
    radius, scheme, valid: see `pair_mask`.

  Returns:
    [B, h, w, K] float: entry k at (y, x) is the affinity of ((y, x), (y, x) + o_k); 0 for pairs
    outside the scheme or touching an invalid position.
  """
  features = jnp.asarray(features)
  if features.ndim != 4:
    raise ValueError(f"features must be [B, h, w, C] (got shape {tuple(features.shape)}).")
  _, h, w, _ = features.shape
  mask = pair_mask(h, w, radius=radius, scheme=scheme, valid=valid)
  return _pair_affinities(features, mask, radius=_check_radius(radius))


def _pair_distance(features: jax.Array, dy: int, dx: int) -> jax.Array:
  """[B, h, w]: mean_c |f(p) - f(p + (dy, dx))| where p + (dy, dx) is on the grid, 0 elsewhere.

  Taken between the two overlapping slices of the grid and padded after the mean, so that only
  the [B, h, w] distance is padded, never the features (34 padded copies of them, and their
  gradients, cost more than the rest of the affinities)."""
  b, h, w, _ = features.shape
  y0, y1 = max(-dy, 0), h - max(dy, 0)
  x0, x1 = max(-dx, 0), w - max(dx, 0)
  if y1 <= y0 or x1 <= x0:  # the offset leaves the grid from everywhere
    return jnp.zeros((b, h, w), features.dtype)
  here = features[:, y0:y1, x0:x1]
  there = features[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
  dist = jnp.mean(jnp.abs(here - there), axis=-1)
  return jnp.pad(dist, ((0, 0), (y0, h - y1), (x0, w - x1)))


@functools.partial(jit, static_argnames=("radius",))
def _pair_affinities(features, mask, *, radius):
  dist = jnp.stack([_pair_distance(features, dy, dx) for dy, dx in forward_offsets(radius)],
                   axis=-1)
  return jnp.where(mask, jnp.exp(-dist), 0.0).astype(features.dtype)


@functools.lru_cache(maxsize=None)
def path_offsets(radius: int = 5) -> tuple[tuple[tuple[int, int], ...], ...]:
  """For each forward offset o = (dy, dx), the cells (y, x) relative to the from position that
  lie on the segment to p + o: those of the bounding box of 0 and o whose distance to the line
  through them is under one cell, ends included (IRN's path of an inter-pixel relation).

  (0, 2) has the path (0, 0), (0, 1), (0, 2); (1, 1) has (0, 0), (0, 1), (1, 0), (1, 1).
  """
  paths = []
  for dy, dx in forward_offsets(radius):
    length_sq = dy * dy + dx * dx
    paths.append(tuple((y, x)
                       for y in range(min(0, dy), max(0, dy) + 1)
                       for x in range(min(0, dx), max(0, dx) + 1)
                       if (dy * x - dx * y) ** 2 < length_sq))
  return tuple(paths)


def boundary_affinities(boundary: jax.Array, *, radius: int = 5,
                        valid: Optional[jax.Array] = None) -> jax.Array:
  """Forward-pair affinities of IRN: one minus the strongest boundary on the path between them.

  Args:
    boundary: [B, h, w] class-boundary map in [0, 1].
    radius: pairs within this radius (5 in IRN's walk), the offsets of `forward_offsets`.
    valid: optional [B, h, w] bool, the image's grid at the top-left of a canvas; pairs with an
      invalid end are masked (a path lies inside the box of its ends, so it stays valid).

  Returns:
    [B, h, w, K] float32: entry k at (y, x) is 1 - max of `boundary` over `path_offsets`[k]
    from (y, x); 0 for pairs whose end lies outside the grid (IRN pads the map with 1).
  """
  boundary = jnp.asarray(boundary)
  if boundary.ndim != 3:
    raise ValueError(f"boundary must be [B, h, w] (got shape {tuple(boundary.shape)}).")
  _, h, w = boundary.shape
  mask = pair_mask(h, w, radius=radius, scheme="full", valid=valid)
  return _boundary_affinities(boundary, mask, radius=_check_radius(radius))


@functools.lru_cache(maxsize=None)
def _path_table(radius: int) -> np.ndarray:
  """[K, L, 2] int32: the cells of each offset's path, padded to the longest (L) by repeating
  the from cell (0, 0), which every path holds (so the maximum does not change)."""
  paths = path_offsets(radius)
  longest = max(len(p) for p in paths)
  return np.asarray([list(p) + [(0, 0)] * (longest - len(p)) for p in paths], np.int32)


@functools.partial(jit, static_argnames=("radius",))
def _boundary_affinities(boundary, mask, *, radius):
  # One offset per scan step, its path's cells read as slices of one padded copy (fill 1): a
  # program of constant size whatever the radius (unrolled, radius 10's 152 paths of up to 21
  # cells took minutes to compile with their gradient), and with the step rematerialised, a
  # gradient that keeps no per-offset copies.
  boundary = boundary.astype(jnp.float32)
  b, h, w = boundary.shape
  padded = jnp.pad(boundary, ((0, 0), (radius, radius), (radius, radius)), constant_values=1.0)

  @jax.checkpoint
  def path_max(cells):
    return functools.reduce(jnp.maximum, [
        jax.lax.dynamic_slice(padded, (0, radius + cells[j, 0], radius + cells[j, 1]), (b, h, w))
        for j in range(cells.shape[0])])

  _, maxima = jax.lax.scan(lambda carry, cells: (carry, path_max(cells)), None,
                           jnp.asarray(_path_table(radius)))
  return jnp.where(mask, 1.0 - jnp.moveaxis(maxima, 0, -1), 0.0)


def symmetric_affinities(forward: jax.Array, *, radius: int = 5,
                         valid: Optional[jax.Array] = None) -> jax.Array:
  """Symmetric neighbourhood affinities from forward ones.

  Args:
    forward: [B, h, w, K] masked forward affinities (from `pair_affinities`).
    radius: the radius `forward` was computed with.
    valid: optional [B, h, w] bool; the identity is 0 at invalid positions.

  Returns:
    [B, h, w, 2K+1]: index n at p is the affinity of (p, p + o_n) for o_n in
    `symmetric_offsets(radius)`. Backward entries come from shifting the forward ones: the
    affinity of (p, p - o) is the forward affinity of offset o stored at p - o.
  """
  fwd = forward_offsets(radius)
  if forward.ndim != 4 or forward.shape[-1] != len(fwd):
    raise ValueError(f"forward affinities must be [B, h, w, {len(fwd)}] at radius {radius} "
                     f"(got {tuple(forward.shape)}).")
  if valid is None:
    identity = jnp.ones(forward.shape[:3] + (1,), forward.dtype)
  else:
    identity = jnp.asarray(valid, forward.dtype)[..., None]
  return _symmetric(jnp.asarray(forward), identity, radius=_check_radius(radius))


@functools.partial(jit, static_argnames=("radius",))
def _symmetric(forward, identity, *, radius):
  backward = [_shift(forward[..., k:k + 1], -dy, -dx)
              for k, (dy, dx) in enumerate(forward_offsets(radius))]
  return jnp.concatenate([identity, forward] + backward, axis=-1)


def neighbourhood_affinities(features: jax.Array, *, radius: int = 5, scheme: str = "full",
                             valid: Optional[jax.Array] = None) -> jax.Array:
  """[B, h, w, C] features -> [B, h, w, 2K+1] symmetric affinities (identity first)."""
  forward = pair_affinities(features, radius=radius, scheme=scheme, valid=valid)
  return symmetric_affinities(forward, radius=radius, valid=valid)


# ---------------------------------------------------------------------------------------------
# Affinity labels (docs/method.md §3).


def _check_score_maps(la, ha, name):
  if la.ndim != 3 or ha.ndim != 3:
    raise ValueError(f"{name}: la and ha must be [H, W, C+1] score maps "
                     f"(got {tuple(la.shape)} and {tuple(ha.shape)}).")
  if tuple(la.shape) != tuple(ha.shape):
    raise ValueError(f"{name}: la and ha shapes differ: {tuple(la.shape)} vs {tuple(ha.shape)}.")
  if la.shape[-1] is not None and la.shape[-1] < 1:
    raise ValueError(f"{name}: score maps need at least the background channel.")


def affinity_labels_tf(la, ha, stride: int = STRIDE):
  """Affinity labels of a crop from its two dCRF score maps, inside tf.data (graph mode).

  argmax(la); 255 where argmax(la) is background; 0 where argmax(ha) is background; 255 where
  every score of la and ha is < 1e-5 (docs/method.md §3). Both maps are zero padded bottom/right
  to a multiple of the stride, then average pooled by it.

  Args:
    la, ha: [H, W, C+1] float tensors (H, W may be dynamic; C+1 must be static).
    stride: pooling stride.

  Returns:
    [ceil(H / stride), ceil(W / stride)] tf.uint8 tensor.
  """
  import tensorflow as tf  # Imported here so that geometry.py never loads TF by itself.

  la = tf.convert_to_tensor(la, tf.float32)
  ha = tf.convert_to_tensor(ha, tf.float32)
  _check_score_maps(la, ha, "affinity_labels_tf")

  def pool(x):
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    gh, gw = -(-h // stride), -(-w // stride)
    x = tf.pad(x, [[0, gh * stride - h], [0, gw * stride - w], [0, 0]])
    # avg_pool with VALID padding on a multiple of the stride equals block means.
    return tf.nn.avg_pool2d(x[None], stride, stride, "VALID")[0]

  la, ha = pool(la), pool(ha)
  no_score = tf.maximum(tf.reduce_max(la, -1), tf.reduce_max(ha, -1)) < NO_SCORE_THRESHOLD
  label_la = tf.argmax(la, -1, output_type=tf.int32)
  label = tf.where(label_la == 0, IGNORE_LABEL, label_la)
  label = tf.where(tf.argmax(ha, -1, output_type=tf.int32) == 0, 0, label)
  label = tf.where(no_score, IGNORE_LABEL, label)
  return tf.cast(label, tf.uint8)


def pair_labels(labels: jax.Array, *, radius: int = 5, scheme: str = "full",
                valid: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """The three pair label sets of docs/method.md §5 for the scheme's pairs.

  Args:
    labels: [B, h, w] integer affinity labels (0 = background, 255 = not confident).
    radius, scheme, valid: see `pair_mask`.

  Returns:
    {"fg_pos", "bg_pos", "neg"}, each [B, h, w, K] float32 in {0, 1}:
    fg_pos: same label, not background, neither 255; bg_pos: both background;
    neg: different labels, neither 255. Pairs outside the scheme or touching padding are 0.
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f"labels must be [B, h, w] (got shape {tuple(labels.shape)}).")
  _, h, w = labels.shape
  mask = pair_mask(h, w, radius=radius, scheme=scheme, valid=valid)
  return _pair_labels(labels.astype(jnp.int32), mask, radius=_check_radius(radius))


@functools.partial(jit, static_argnames=("radius",))
def _pair_labels(labels, mask, *, radius):
  to = jnp.stack([_shift(labels, dy, dx, fill=IGNORE_LABEL)
                  for dy, dx in forward_offsets(radius)], axis=-1)
  frm = labels[..., None]
  confident = (frm != IGNORE_LABEL) & (to != IGNORE_LABEL) & mask
  same = frm == to
  return {
      "fg_pos": (same & (frm != 0) & confident).astype(jnp.float32),
      "bg_pos": (same & (frm == 0) & confident).astype(jnp.float32),
      "neg": (~same & confident).astype(jnp.float32),
  }
