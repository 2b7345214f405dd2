"""The random walk of docs/method.md §6 as a sparse stencil over the symmetric neighbourhood.

The original builds the dense transition matrix T (HW x HW) of the stride-8 grid and squares it
log2(t) times. Here T is never formed: A = W^beta is symmetric with ones on the diagonal, so
column j of T = A / column sums holds the weights A_ij / D_j (D_j = sum_i A_ij) of j's 2K+1
neighbours, and one step v <- v T is, at every position j,

    v'_j = sum_n P_jn v_{j + o_n},   P_jn = A(j, j + o_n)^beta / D_j,

a normalised neighbourhood average over `geometry.symmetric_offsets(radius)`. P is computed once
and the t steps run in a `lax.fori_loop` (or a `lax.while_loop` with an early stop) over shifted
static slices of one padded copy of v per step, channels first inside the loop, the multiply-adds
fused in groups of 24 offsets, and on the CPU one loop per core over a share of the channels.

Padding of a canvas (valid = False) is cut out of the graph: no pair touches it, its identity is
0, so no mass flows in or out, and its output is 0.

Public API:
  (geometry.neighbourhood_affinities: features -> the [B, h, w, 2K+1] affinities it takes.)
  transition_weights(aff_sym, beta) -> P [B, h, w, 2K+1].
  propagate(aff_sym, cam, radius=5, beta=8, t=256, valid=None, tol=None) -> [B, h, w, C].
  random_walk(features, cam, radius=5, beta=8, t=256, scheme="full", valid=None, tol=None).
  prepare_cam(cam, alpha=16, stride=8) -> [h, w, C+1] walk input of one image.
  boundary_walk(boundary, cam, radius=5, beta=10, t=256) -> IRN's walk (affinities from a
    boundary map, geometry.boundary_affinities); boundary_walk_labels(walked, size) its labels,
    boundary_walk_scores(walked, size) the scores they are the argmax of.
The pipeline's walk of a batch of canvases (AffinityNet, the walk, back to the images), which
the random_walk stage and `affinity-jax predict` run:
  make_walk_fn(model, cfg), walk_batch(walk, variables, images, cams, ...), crf_label(...).
IRN's (method irn): make_relation_maps_fn(model) (boundary map and displacement field),
  make_boundary_walk_fn(model, cfg), boundary_walk_batch(...), and boundary_walk_instances(...)
  (IRN's instance masks of one image, affinity_jax/instances.py).
The original's dense walk, used to check this one, lives in tests/reference_walk.py.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import cam as cam_lib
from affinity_jax import crf, geometry
from affinity_jax import instances as instances_lib
from affinity_jax.cam import background_stack
from affinity_jax.compilation import jit
from affinity_jax.constants import IRN_STRIDE, STRIDE


def transition_weights(aff_sym: jax.Array, *, beta: float = 8.0) -> jax.Array:
  """P_jn = A(j, j + o_n)^beta / sum_n A(j, j + o_n)^beta, 0 where the sum is 0.

  Args:
    aff_sym: [B, h, w, 2K+1] symmetric neighbourhood affinities (identity first), 0 on padding.
    beta: the Hadamard power of PSA (8).

  Returns:
    [B, h, w, 2K+1] float32 transition weights; each valid position's weights sum to 1.
  """
  a = jnp.power(aff_sym.astype(jnp.float32), beta)
  total = jnp.sum(a, axis=-1, keepdims=True)
  return jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), 0.0)


# Offsets summed per fused loop. XLA:CPU stops fusing a sum of a few hundred slices (radius 10
# has 313 offsets) and then writes every partial sum to memory (3x slower there); groups of 24,
# chained through an optimisation barrier, stay fused and also beat one 69-term fusion at
# radius 5 (measured 1.3x).
_OFFSET_GROUP = 24


def _step_fn(weights: jax.Array, radius: int, h: int, w: int):
  """One step v -> v T on channels-first v [B, C, h, w]; weights [2K+1, B, 1, h, w]."""
  offsets = geometry.symmetric_offsets(radius)
  m = radius - 1

  def step(v):
    # One pad per step, then static slices of it.
    vp = jnp.pad(v, ((0, 0), (0, 0), (m, m), (m, m)))
    acc = None
    for start in range(0, len(offsets), _OFFSET_GROUP):
      part = 0.0
      for n in range(start, min(start + _OFFSET_GROUP, len(offsets))):
        dy, dx = offsets[n]
        part = part + weights[n] * vp[:, :, m + dy:m + dy + h, m + dx:m + dx + w]
      acc = part if acc is None else jax.lax.optimization_barrier(acc) + part
    return acc

  return step


def _default_chunks(num_channels: int) -> int:
  # XLA:CPU runs one fused stencil loop on one core but runs independent loops concurrently;
  # one loop per core over a share of the channels uses them all (1.6x on 2 cores). On
  # accelerators one loop is best.
  if jax.default_backend() != "cpu":
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(cores or 1, num_channels))


@functools.partial(jit, static_argnames=("radius", "t", "tol", "chunks"))
def _propagate(weights, cam, *, radius, t, tol, chunks=1):
  _, h, w, _ = cam.shape
  # Channels first inside the loop: the innermost axis is then w, which vectorises better
  # than the 21 classes (measured ~2x faster on CPU).
  wt = jnp.transpose(weights, (3, 0, 1, 2))[:, :, None]
  v = jnp.transpose(cam.astype(jnp.float32), (0, 3, 1, 2))
  step = _step_fn(wt, radius, h, w)
  if tol is None:
    parts = jnp.array_split(v, chunks, axis=1) if chunks > 1 else [v]
    v = jnp.concatenate([jax.lax.fori_loop(0, t, lambda _, x: step(x), part)
                         for part in parts], axis=1)
    steps = jnp.asarray(t, jnp.int32)
  else:
    def cond(state):
      i, _, change = state
      return (i < t) & (change >= tol)

    def body(state):
      i, x, _ = state
      y = step(x)
      return i + 1, y, jnp.max(jnp.abs(y - x))

    steps, v, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), v,
                                                  jnp.asarray(jnp.inf, jnp.float32)))
  return jnp.transpose(v, (0, 2, 3, 1)), steps


def propagate(aff_sym: jax.Array, cam: jax.Array, *, radius: int = 5, beta: float = 8.0,
              t: int = 256, valid: Optional[jax.Array] = None, tol: Optional[float] = None,
              return_steps: bool = False, channel_chunks: Optional[int] = None):
  """Random walk of score maps over precomputed symmetric affinities: vec(v) T^t.

  Args:
    aff_sym: [B, h, w, 2K+1] from `geometry.neighbourhood_affinities(features, radius, ...)`.
    cam: [B, h, w, C] non-negative score maps on the same grid (C includes the background).
    radius: the radius `aff_sym` was built with.
    beta: Hadamard power (8 in PSA).
    t: number of steps (256 = 2^8 in PSA).
    valid: optional [B, h, w] bool; False positions are outside the graph and come out 0.
      It must be the mask `aff_sym` was built with.
    tol: optional early stop: the walk ends after the first step whose max |v' - v| < tol
      (at most t steps).
    return_steps: also return the number of steps taken (an int32 scalar array).
    channel_chunks: walk the channels in this many independent loops (no effect on the
      result); None: one per CPU core on the CPU backend, 1 elsewhere. Unused with `tol`.

  Returns:
    [B, h, w, C] float32 walked scores (and the step count when `return_steps`).
  """
  k2 = len(geometry.symmetric_offsets(radius))
  if aff_sym.ndim != 4 or aff_sym.shape[-1] != k2:
    raise ValueError(f"aff_sym must be [B, h, w, {k2}] at radius {radius} "
                     f"(got {tuple(aff_sym.shape)}).")
  if cam.ndim != 4 or cam.shape[:3] != aff_sym.shape[:3]:
    raise ValueError(f"cam must be [B, h, w, C] on the affinity grid {tuple(aff_sym.shape[:3])} "
                     f"(got {tuple(cam.shape)}).")
  if int(t) != t or t < 0:
    raise ValueError(f"t must be a non-negative integer (got {t!r}).")
  if valid is not None:
    valid = jnp.asarray(valid, bool)
    if valid.shape != aff_sym.shape[:3]:
      raise ValueError(f"valid must be {tuple(aff_sym.shape[:3])} (got {tuple(valid.shape)}).")
    cam = jnp.where(valid[..., None], cam, 0.0)
  weights = transition_weights(aff_sym, beta=beta)
  if channel_chunks is None:
    channel_chunks = _default_chunks(cam.shape[-1])
  out, steps = _propagate(weights, jnp.asarray(cam), radius=int(radius), t=int(t),
                          tol=None if tol is None else float(tol),
                          chunks=int(max(1, min(channel_chunks, cam.shape[-1]))))
  return (out, steps) if return_steps else out


def random_walk(features: jax.Array, cam: jax.Array, *, radius: int = 5, beta: float = 8.0,
                t: int = 256, scheme: str = "full", valid: Optional[jax.Array] = None,
                tol: Optional[float] = None, return_steps: bool = False,
                channel_chunks: Optional[int] = None):
  """Random walk of `cam` [B, h, w, C] with affinities from `features` [B, h, w, Cf].

  Affinities W_ij = exp(-mean_c |f_i - f_j|) over the `scheme`'s pairs within `radius`
  (see geometry.py); other arguments as in `propagate`.
  """
  aff_sym = geometry.neighbourhood_affinities(features, radius=radius, scheme=scheme,
                                              valid=valid)
  return propagate(aff_sym, cam, radius=radius, beta=beta, t=t, valid=valid, tol=tol,
                   return_steps=return_steps, channel_chunks=channel_chunks)


def boundary_walk(boundary: jax.Array, cam: jax.Array, *, radius: int = 5, beta: float = 10.0,
                  t: int = 256, valid: Optional[jax.Array] = None, tol: Optional[float] = None,
                  return_steps: bool = False, channel_chunks: Optional[int] = None):
  """IRN's random walk (docs/method.md, "IRN's walk"): scores spread over affinities taken from a
  class-boundary map instead of AffinityNet's features.

  Affinities are one minus the strongest boundary on the path between two positions
  (`geometry.boundary_affinities`, every pair within `radius`); the scores are first damped by
  (1 - boundary), then walked as `propagate` walks them: the same transition matrix
  A^beta / column sums, the same t steps.

  Args:
    boundary: [B, h, w] boundary map in [0, 1] on the scores' grid (IRN: stride 4).
    cam: [B, h, w, C] non-negative scores. IRN walks the image's classes only; the background
      is decided after the walk (`boundary_walk_labels`).
    radius, beta, t: IRN's are 5, 10 and 2^8.
    valid, tol, return_steps, channel_chunks: as in `propagate`.

  Returns:
    [B, h, w, C] float32 walked scores (and the step count when `return_steps`).
  """
  boundary = jnp.asarray(boundary, jnp.float32)
  cam = jnp.asarray(cam, jnp.float32)
  if not isinstance(boundary, jax.core.Tracer) and boundary.size and not (
      float(boundary.min()) >= 0.0 and float(boundary.max()) <= 1.0):
    raise ValueError(f"boundary must lie in [0, 1] (got {float(boundary.min()):.4g} .. "
                     f"{float(boundary.max()):.4g}): pass the sigmoid of the boundary logits.")
  if cam.ndim != 4 or cam.shape[:3] != boundary.shape:
    raise ValueError(f"cam must be [B, h, w, C] on the boundary map's grid "
                     f"{tuple(boundary.shape)} (got {tuple(cam.shape)}).")
  forward = geometry.boundary_affinities(boundary, radius=radius, valid=valid)
  aff_sym = geometry.symmetric_affinities(forward, radius=radius, valid=valid)
  return propagate(aff_sym, cam * (1.0 - boundary)[..., None], radius=radius, beta=beta, t=t,
                   valid=valid, tol=tol, return_steps=return_steps,
                   channel_chunks=channel_chunks)


def boundary_walk_scores(walked: np.ndarray, size, *, threshold: float = 0.25,
                         stride: int = 4, scaled=None) -> np.ndarray:
  """IRN's label scores of one image from its walked class scores: what its label is the
  argmax of (`boundary_walk_labels`), and what dCRF refines with `random_walk.crf`.

  Args:
    walked: [h, w, C] walked scores of the image's C classes (`boundary_walk`), its grid at
      `stride`.
    size: (H, W) of the image; H <= stride * h, W <= stride * w.
    threshold: the background's constant score after normalisation, >= 0 (IRN: 0.25).
    stride: the grid's stride (IRN: 4).
    scaled: (Hs, Ws), when the grid is at `stride` of the image resized to that
      (`aff.image_scale`; IRN: the image as it is): the grid is resampled to the image's own
      pixels (bilinear, half-pixel centres, Hs / (stride * H) cells a pixel).

  Returns:
    [H, W, 1 + C] float32: channel 0 the constant `threshold` (the background), channel c + 1
    class c's scores upsampled by `stride` (bilinear, half-pixel centres), cropped to the image
    and divided by their maximum over the image and the classes (all 0 where that maximum is
    not positive).
  """
  walked = np.asarray(walked, np.float32)
  if walked.ndim != 3:
    raise ValueError(f"walked must be [h, w, C] (got shape {walked.shape}).")
  if not np.all(np.isfinite(walked)):
    raise ValueError("walked scores must be finite (a NaN would make the image all background).")
  h, w, _ = walked.shape
  height, width = (int(v) for v in size)
  on = (height, width) if scaled is None else tuple(int(v) for v in scaled)
  if not (0 < on[0] <= stride * h and 0 < on[1] <= stride * w):
    raise ValueError(f"size {on[0]}x{on[1]} does not fit a {h}x{w} grid at stride {stride}.")
  if on == (height, width):
    up = cam_lib.resize_bilinear(walked, (stride * h, stride * w))[:height, :width]
  else:
    up = cam_lib.resize_bilinear(walked, (height, width),
                                 ratio=(on[0] / (stride * height), on[1] / (stride * width)))
  peak = float(up.max()) if up.size else 0.0
  up = up / peak if peak > 0 else np.zeros_like(up)
  return np.concatenate([np.full((height, width, 1), threshold, np.float32), up],
                        -1).astype(np.float32)


def strided_at_scale(strided: np.ndarray, size, scaled, *, stride: int = 4) -> np.ndarray:
  """A grid at `stride` of an image of `size` (H, W), [ceil(H / stride), ceil(W / stride), C],
  resampled to the grid at `stride` of the image resized to `scaled` (Hs, Ws) (bilinear,
  half-pixel centres, H / Hs cells a cell): IRN's stride-4 CAMs on the grid that its walk runs
  on when the relation network sees the image resized by `aff.image_scale`."""
  strided = np.asarray(strided, np.float32)
  (height, width), (hs, ws) = ((int(a), int(b)) for a, b in (size, scaled))
  if strided.ndim != 3 or strided.shape[:2] != (-(-height // stride), -(-width // stride)):
    raise ValueError(f"strided must be [ceil(H / {stride}), ceil(W / {stride}), C] of the "
                     f"{height}x{width} image (got shape {strided.shape}).")
  if (hs, ws) == (height, width):  # the image as it is: the grid itself
    return strided
  return cam_lib.resize_bilinear(strided, (-(-hs // stride), -(-ws // stride)),
                                 ratio=(height / hs, width / ws))


def boundary_walk_labels(walked: np.ndarray, size, *, threshold: float = 0.25,
                         stride: int = 4, scaled=None) -> np.ndarray:
  """IRN's semantic pseudo label of one image from its walked class scores.

  Args: as `boundary_walk_scores`.

  Returns:
    [H, W] int32: 0 for the background, c + 1 for channel c: the argmax of
    `boundary_walk_scores` (a position is background where every class's normalised score is
    under `threshold`; an image whose walked scores are all 0 is all background).
  """
  scores = boundary_walk_scores(walked, size, threshold=threshold, stride=stride, scaled=scaled)
  return np.argmax(scores, axis=-1).astype(np.int32)


def prepare_cam(cam: jax.Array, *, alpha: float = 16.0, stride: int = STRIDE) -> jax.Array:
  """Walk input of one image: background + class CAMs on the stride grid.

  Args:
    cam: [H, W, C] normalised full-resolution CAMs (cam.py), absent classes zero.
    alpha: background exponent: bg = (1 - max_c cam)^alpha (16 in PSA's walk).
    stride: feature stride.

  Returns:
    [ceil(H / stride), ceil(W / stride), C + 1] float32, channel 0 = background: the stack is
    zero padded bottom/right to a multiple of the stride, then average pooled by it.
  """
  cam = jnp.asarray(cam, jnp.float32)
  if cam.ndim != 3:
    raise ValueError(f"cam must be [H, W, C] (got shape {tuple(cam.shape)}).")
  h, w, _ = cam.shape
  stack = background_stack(cam, alpha=alpha)
  gh, gw = -(-h // stride), -(-w // stride)
  stack = jnp.pad(stack, ((0, gh * stride - h), (0, gw * stride - w), (0, 0)))
  return stack.reshape(gh, stride, gw, stride, -1).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------
# The pipeline's walk (docs/method.md §6): AffinityNet's features at stride 8 of the image
# resized by `aff.image_scale`, the CAM stack (background (1 - max)^alpha + classes) resized
# likewise and pooled by 8 onto each image's own grid, the walk of 2^logt steps with positions
# outside the image excluded, bilinear upsampling of the padded grid to the original resolution
# (cam.walk_to_image), argmax; or dCRF on the walked scores (`crf_label`).


def make_walk_fn(model, cfg):
  """(variables, images, cams, valid, sizes, ry, rx) -> (channel index [B, Ho, Wo] uint8 of
  the argmax, heat [B, Ho, Wo] (the largest foreground share), share [B, Ho, Wo, K] (the walked
  scores divided by their sum; None unless cfg.random_walk.crf)) with `model` AffinityNet and
  the walk of the config's random_walk section, `cams` [B, h, w, K] the background and classes
  of each image. Its inputs are made, and its indices turned into labels, by `walk_batch`."""
  radius, scheme = int(cfg.random_walk.radius), cfg.random_walk.scheme
  t, beta = 2 ** int(cfg.random_walk.logt), float(cfg.random_walk.beta)
  tol = float(cfg.random_walk.tol) if cfg.random_walk.tol > 0 else None
  with_scores = bool(cfg.random_walk.crf)

  # Two programs: the network's depends only on the canvas, the walk's also on the channel
  # count (walk_batch's), so a new count compiles the cheap walk, never AffinityNet again.
  @jit
  def affinities(variables, images, valid, sizes):
    # The original pads an image only to a multiple of 8 (not to the canvas): `sizes` [B, 2]
    # = 8 * each image's grid makes the network's canvas forward equal that (models/canvas.py),
    # `valid` [B, h, w] its grid (VGG-16's GroupNorm statistics, the walk).
    features = model.apply(variables, images, valid=valid, sizes=sizes).astype(jnp.float32)
    return geometry.neighbourhood_affinities(features, radius=radius, scheme=scheme,
                                             valid=valid)

  @jit
  def walk_scores(aff_sym, cams, valid, ry, rx):
    walked = propagate(aff_sym, cams, radius=radius, beta=beta, t=t, valid=valid, tol=tol)
    up = cam_lib.upsample(walked, ry, rx)
    labels = jnp.argmax(up, axis=-1).astype(jnp.uint8)
    share = up / jnp.maximum(jnp.sum(up, axis=-1, keepdims=True), 1e-12)
    # The scores leave the device only for the dCRF.
    return labels, jnp.max(share[..., 1:], axis=-1), (share if with_scores else None)

  def walk(variables, images, cams, valid, sizes, ry, rx):
    return walk_scores(affinities(variables, images, valid, sizes), cams, valid, ry, rx)
  return walk


def channel_count(needed: int, total: int) -> int:
  """The walk's channel count for a batch whose images need at most `needed` channels
  (background + their classes) of `total`: the next power of two from 2, at most `total`, so
  that a few shapes (and compiles) serve every batch."""
  k = 2
  while k < needed:
    k *= 2
  return min(k, total)


def walk_batch(walk, variables, images, cams: Mapping[int, np.ndarray], sizes, scaled, *,
               classes: Mapping[int, np.ndarray], alpha: float, image_scale: float, put=None):
  """Walks the CAMs of one batch of canvases, over each image's background and own classes.

  The walk is linear in each channel and a class absent from an image has a zero CAM, which
  stays zero; so only the background and the image's classes are walked (padded to
  `channel_count` channels), which gives the labels of walking every class for a fraction of
  the work (VOC images have 1-3 of 20 classes).

  Args:
    walk: `make_walk_fn(model, cfg)`.
    images: [B, Hc, Wc, 3] AffinityNet's inputs: each image resized by `image_scale`,
      normalised, at the top-left of a canvas (`image_s0` of an inference batch at that scale).
    cams: {example index: [H, W, C] normalised CAMs at the image's own size, absent classes
      zero}; examples without one (dummies, skipped images) have nothing to walk.
    sizes: [B, 2] each image's own (h, w); scaled: [B, 2] its size resized by `image_scale`.
    classes: {example index: the indices (0-based) of the image's classes}, for each of `cams`.
    alpha, image_scale: the config's random_walk.alpha and aff.image_scale.
    put: places the per-example arrays (all batch first) on the devices; by default they go
      as they are.

  Returns:
    numpy (labels [B, Ho, Wo] (0 background, c + 1 class c), heat [B, Ho, Wo], share
    [B, Ho, Wo, K] or None, channels {example index: [1 + its classes] the label of each of its
    first channels of `share`}), each image at the top-left: crop to `sizes`.
  """
  b, hc8, wc8 = images.shape[0], images.shape[1] // STRIDE, images.shape[2] // STRIDE
  sizes, scaled = np.asarray(sizes), np.asarray(scaled)
  total = 1 + next(iter(cams.values())).shape[-1] if cams else 2
  channels = {i: np.concatenate([[0], np.sort(np.asarray(classes[i], np.int64)) + 1])
              for i in cams}
  k = channel_count(max((len(c) for c in channels.values()), default=1), total)
  stacks = np.zeros((b, hc8, wc8, k), np.float32)
  for i, full in cams.items():
    if image_scale != 1.0:
      full = cam_lib.resize_bilinear(full, scaled[i])
    stack = np.asarray(prepare_cam(full, alpha=alpha))
    stacks[i, :stack.shape[0], :stack.shape[1], :len(channels[i])] = stack[..., channels[i]]
  grid = np.stack([[cam_lib.grid_size(h), cam_lib.grid_size(w)] for h, w in scaled])
  valid = cam_lib.valid_mask(grid, (hc8, wc8))
  ry, rx = cam_lib.walk_to_image(grid, sizes, scaled, (hc8, wc8), image_scale)
  inputs = (images, stacks, valid, grid * STRIDE, ry, rx)
  walked, heat, share = walk(variables, *(put(inputs) if put else inputs))
  walked = np.asarray(walked)
  labels = np.zeros(walked.shape, np.uint8)
  for i, ids in channels.items():
    # Padding channels are zero and come last: the argmax never picks one over a channel of
    # the image (ties go to the first), so every index maps to a label of the image.
    labels[i] = np.append(ids, 0).astype(np.uint8)[np.minimum(walked[i], len(ids))]
  return labels, np.asarray(heat), None if share is None else np.asarray(share), channels


def crf_label(image: np.ndarray, share: np.ndarray, channels: np.ndarray,
              iters: int) -> np.ndarray:
  """[H, W] pseudo label from dCRF on the walked scores `share` [H, W, K >= len(channels)]
  (summing to one at each pixel) whose first channels are the labels `channels` (0 the
  background, c + 1 class c; `walk_batch`'s); the rest, padding, are left out."""
  channels = np.asarray(channels)
  q = crf.crf_inference(np.ascontiguousarray(image),
                        np.ascontiguousarray(share[..., :len(channels)]), t=iters)
  return channels[np.argmax(q, axis=-1)].astype(np.uint8)


# IRN's walk in the pipeline (docs/method.md §11, method irn): the relation network's boundary
# map at stride 4 of each image (flip-averaged, on the canvas), IRN's stride-4 CAMs of the
# image's classes, the walk, and IRN's labels (boundary_walk_labels).


def make_relation_maps_fn(model):
  """(variables, images [B, Hc, Wc, 3], flip [B, Wc], grid_flip [B, ceil(Wc / 4)]) ->
  (boundary [B, h, w], displacement [B, h, w, 2]) float32 on the canvas grid h, w =
  ceil(Hc / 4), ceil(Wc / 4), jitted: the relation network `model`'s maps as IRN's
  EdgeDisplacement gives them. The boundary map is the sigmoid of the mean of the boundary
  logits of the image and of its flip (each image flipped within its own width, the logits
  flipped back within its grid); the displacement field (dy, dx), its mean shift subtracted,
  is the image's alone. The network sees each image padded with zeros (after normalising) as
  IRN pads it to its crop size."""
  @jit
  def maps(variables, images, flip, grid_flip):
    edges, displacement = model.apply(variables, images)
    flipped, _ = model.apply(variables, cam_lib.flip_within(images, flip))
    back = cam_lib.flip_within(flipped[..., None], grid_flip)[..., 0]
    return jax.nn.sigmoid(edges / 2 + back / 2), displacement
  return maps


class BoundaryWalk(NamedTuple):
  """IRN's walk in two halves (`make_boundary_walk_fn`): `maps` (make_relation_maps_fn) and
  `scores` (boundary [B, h, w], cams [B, h, w, K], valid [B, h, w]) -> walked [B, h, w, K]
  float32, jitted (random_walk.boundary_walk with the config's radius, beta, logt, tol)."""
  maps: Callable
  scores: Callable


def make_boundary_walk_fn(model, cfg) -> BoundaryWalk:
  """IRN's walk of CAMs over the relation network `model`'s boundary map
  (`make_relation_maps_fn`), with the config's random_walk section (radius, beta, logt, tol);
  `boundary_walk_batch` runs it on a batch of canvases."""
  radius = int(cfg.random_walk.radius)
  t, beta = 2 ** int(cfg.random_walk.logt), float(cfg.random_walk.beta)
  tol = float(cfg.random_walk.tol) if cfg.random_walk.tol > 0 else None

  @jit
  def scores(edge, cams, valid):
    return boundary_walk(edge, cams, radius=radius, beta=beta, t=t, valid=valid, tol=tol)
  return BoundaryWalk(make_relation_maps_fn(model), scores)


def boundary_walk_batch(walk: BoundaryWalk, variables, images, cams: Mapping[int, np.ndarray],
                        sizes, *, put=None) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
  """IRN's walk of one batch of canvases (method irn): each image's walked class scores on its
  own stride-4 grid, which `boundary_walk_labels` turns into its label.

  Args:
    walk: `make_boundary_walk_fn(model, cfg)`.
    images: [B, Hc, Wc, 3] the relation network's inputs on a canvas (IRN: each image as it
      is; with `aff.image_scale`, resized by it).
    cams: {example index: [ceil(H / 4), ceil(W / 4), P] IRN's stride-4 CAMs of the image's
      classes} (with a scale, `strided_at_scale`'s); examples without one have nothing to walk.
    sizes: [B, 2] each image's (H, W) in `images` (resized, with a scale).
    put: as in `walk_batch`.

  Returns:
    ({example index: [ceil(H / 4), ceil(W / 4), P] float32 walked scores}, boundary [B, hc, wc]
    and displacement [B, hc, wc, 2], the relation network's maps on the canvas grid
    (`make_relation_maps_fn`), for `boundary_walk_instances`).
  """
  b = images.shape[0]
  grid_hw = (-(-images.shape[1] // IRN_STRIDE), -(-images.shape[2] // IRN_STRIDE))
  sizes = np.asarray(sizes)
  k = channel_count(max((c.shape[-1] for c in cams.values()), default=1), 1 << 30)
  stacks = np.zeros((b, *grid_hw, k), np.float32)
  for i, strided in cams.items():
    stacks[i, :strided.shape[0], :strided.shape[1], :strided.shape[2]] = strided
  grid = -(-sizes // IRN_STRIDE)
  valid = cam_lib.valid_mask(grid, grid_hw)
  net_inputs = (images, cam_lib.flip_index(sizes[:, 1], images.shape[2]),
                cam_lib.flip_index(grid[:, 1], grid_hw[1]))
  boundary, displacement = walk.maps(variables, *(put(net_inputs) if put else net_inputs))
  walk_inputs = (stacks, valid)
  walked = np.asarray(walk.scores(boundary, *(put(walk_inputs) if put else walk_inputs)))
  return ({i: walked[i, :grid[i][0], :grid[i][1], :strided.shape[-1]]
           for i, strided in cams.items()}, np.asarray(boundary), np.asarray(displacement))


def boundary_walk_instances(walk: BoundaryWalk, boundary: np.ndarray, displacement: np.ndarray,
                            cams: np.ndarray, class_ids, size, *, threshold: float = 0.25,
                            scaled=None, check_finite=None) -> instances_lib.Instances:
  """IRN's instances of one image (affinity_jax/instances.py; its make_ins_seg_labels.py).

  Args:
    walk: `make_boundary_walk_fn(model, cfg)`.
    boundary, displacement: the image's [hc, wc] and [hc, wc, 2] maps on a canvas grid
      (`boundary_walk_batch`), the image at its top-left.
    cams: [ceil(H / 4), ceil(W / 4), C] IRN's stride-4 CAMs of the image's classes `class_ids`
      (with `scaled`: of Hs, Ws, `strided_at_scale`).
    size: the image's (H, W).
    threshold: the background's constant score (IRN's ins_seg_bg_thres, 0.25).
    scaled: (Hs, Ws) when the maps are those of the image resized to that (`aff.image_scale`):
      the instances are found on the grid and cut on the image's own pixels.
    check_finite: called with the walked scores (the stage's names the image and the network);
      by default non-finite scores are a ValueError.
  """
  h, w = cams.shape[:2]
  hc, wc = boundary.shape
  group = instances_lib.clusters(instances_lib.centroids(displacement[:h, :w]),
                                 displacement[:h, :w])
  num_groups = int(group.max()) + 1
  stack = instances_lib.instance_cams(cams, group)
  padded = np.zeros((1, hc, wc, channel_count(stack.shape[-1], 1 << 30)), np.float32)
  padded[0, :h, :w, :stack.shape[-1]] = stack
  valid = cam_lib.valid_mask(np.array([[h, w]]), (hc, wc))
  walked = np.asarray(walk.scores(boundary[None], padded, valid))[0, :h, :w, :stack.shape[-1]]
  if check_finite is not None:
    check_finite(walked)
  elif not np.all(np.isfinite(walked)):
    raise ValueError("the instance walk gives non-finite scores")
  scores = boundary_walk_scores(walked, size, threshold=threshold, stride=IRN_STRIDE,
                                scaled=scaled)
  return instances_lib.detect(scores, class_ids, num_groups)
