"""Class activation maps as the pipeline computes them (docs/method.md §2, §3, §6).

Batched multi-scale + flip inference on fixed canvases. Every image of a batch sits at the
top-left of a fixed canvas (`data.pipelines.inference`), so one compiled function serves a whole
split whatever the image sizes. Per-image geometry (its own stride-8 extent, its size, its flip)
enters as data, not shapes:

* the network gets each image's size on the canvas (`sizes`) and zeroes its activations
  outside the image wherever positions mix (models/canvas.py), so that its output on the
  image's cells equals the original's forward of the unpadded image;
* a flip pass flips each image within its own width (a per-example gather), so its stride-8
  grid is aligned as when the original flips the unpadded image, and the flipped image keeps
  its place and size;
* bilinear upsampling with half-pixel centres (PyTorch's align_corners=False) of a grid cropped
  to the image's own extent, rows [0, ceil(H_s / 8)) and columns [0, ceil(W_s / 8)), is a pair
  of interpolation matrices Ry [H, h] and Rx [W, w], built on the host per image and zero outside
  the image; on the device it is one einsum. For a flip pass Rx also flips the result back.

The multi-scale sum (`multiscale_flip_sum`) serves the segmentation network's scores too;
`cam_fn` and `segmentation_fn` are the whole computation on an inference batch that the stages
(infer_cam, infer_seg) and `affinity-jax predict` run.
Then `normalise` zeroes absent classes and divides each class by its maximum (+1e-5), and
`background_stack` / `cam_prediction` add the background channel that every later stage uses.
Layout: channels last; C = number of classes (no background channel) unless stated.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import crf as crf_lib
from affinity_jax.compilation import jit
from affinity_jax.constants import IMAGENET_MEAN, IMAGENET_STD, IRN_STRIDE, STRIDE

NORM_EPS = 1e-5
# The constant background score of CAM-only predictions (docs/method.md §2).
CAM_ONLY_BACKGROUND = 0.2


def grid_size(size: int) -> int:
  """Cells of the stride-8 grid along a side of `size` pixels: ceil(size / 8)."""
  return -(-int(size) // STRIDE)


def bilinear_taps(out_size: int, in_size: int, ratio: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The two source cells and weights of each output cell of a bilinear resize (align_corners
  =False): (i0, i1, w0, w1), each [out_size], output y = w0[y] * x[i0[y]] + w1[y] * x[i1[y]].

  PyTorch's rule: source coordinate (y + 0.5) * in / out - 0.5, clamped at 0, the upper
  neighbour clamped to the last cell. Where both neighbours are the last cell, w0 holds their
  summed weight and w1 is 0, so that each (row, cell) of `interp_matrix` is one weight.
  `ratio`: source cells per output cell, when it is not in / out (a grid resampled by a known
  scale, whose two ends do not meet: PyTorch's `scale_factor` with its recompute off).
  """
  ratio = in_size / out_size if ratio is None else float(ratio)
  src = (np.arange(out_size) + 0.5) * ratio - 0.5
  src = np.maximum(src, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = (src - i0).astype(np.float32)
  same = i0 == i1
  w0 = np.where(same, (1.0 - frac) + frac, 1.0 - frac).astype(np.float32)
  w1 = np.where(same, np.float32(0.0), frac).astype(np.float32)
  return i0, i1, w0, w1


def interp_matrix(out_size: int, in_size: int, out_pad: int, in_pad: int) -> np.ndarray:
  """[out_pad, in_pad] bilinear weights (align_corners=False) from in_size cells to out_size.

  Row y < out_size holds `bilinear_taps`' weights of output y at its source cells; other rows
  and columns >= in_size are zero.
  """
  m = np.zeros((out_pad, in_pad), np.float32)
  if out_size <= 0 or in_size <= 0:
    return m
  i0, i1, w0, w1 = bilinear_taps(out_size, in_size)
  rows = np.arange(out_size)
  m[rows, i0] = w0
  m[rows, i1] += w1
  return m


def resize_bilinear(maps: np.ndarray, size, ratio: tuple[float, float] | None = None
                    ) -> np.ndarray:
  """[H, W, C] -> [size[0], size[1], C], bilinear with half-pixel centres (align_corners=False).

  Two passes of two taps each (rows, then columns): the same float32 products and sums as the
  product with `interp_matrix` on either side, without its zero terms. `ratio`: (rows, columns)
  source cells per output cell, when not H / size[0] and W / size[1] (`bilinear_taps`).
  """
  ratio = (None, None) if ratio is None else ratio
  maps = np.asarray(maps, np.float32)
  if maps.ndim != 3:
    raise ValueError(f"resize_bilinear: maps must be [H, W, C] (got shape {maps.shape}).")
  if not (maps.shape[0] and maps.shape[1] and int(size[0]) and int(size[1])):
    return np.zeros((int(size[0]), int(size[1]), maps.shape[2]), np.float32)
  i0, i1, w0, w1 = bilinear_taps(int(size[0]), maps.shape[0], ratio[0])
  rows = maps[i0] * w0[:, None, None] + maps[i1] * w1[:, None, None]
  i0, i1, w0, w1 = bilinear_taps(int(size[1]), maps.shape[1], ratio[1])
  return rows[:, i0] * w0[None, :, None] + rows[:, i1] * w1[None, :, None]


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
  """Host-side per-scale inputs of one inference batch: images [B, Hc_s, Wc_s, 3], sizes
  [B, 2] int32 (each resized image's h, w on the canvas), flip index, matrices."""
  out_sizes = np.asarray(batch[out_key])
  canvas_hw = batch["raw"].shape[1:3]
  passes = []
  for i, _ in enumerate(scales):
    images = batch[f"image_s{i}"]
    sizes = np.asarray(batch[f"size_s{i}"])
    grid_hw = (grid_size(images.shape[1]), grid_size(images.shape[2]))
    ry, rx = upsample_matrices(sizes, out_sizes, grid_hw, canvas_hw)
    _, rx_flip = upsample_matrices(sizes, out_sizes, grid_hw, canvas_hw, flipped=True)
    passes.append({"images": images, "sizes": sizes.astype(np.int32),
                   "flip": flip_index(sizes[:, 1], images.shape[2]),
                   "ry": ry, "rx": rx, "rx_flip": rx_flip})
  return passes


def multiscale_flip_sum(apply_fn):
  """jit(variables, passes) -> sum over scales and flips of `apply_fn(variables, images, sizes)`
  grids upsampled to the canvas, [B, Hc, Wc, C] float32. `passes` from `pass_inputs`.

  apply_fn(variables, images [2B, Hc_s, Wc_s, 3], sizes [2B, 2] int32) -> [2B, h, w, C]: the
  network's grids, given each image's size on its canvas (a network's `sizes` argument); each
  image is followed by itself flipped within its own width, same size.
  """
  def interleave(a, b):  # [B, ...] twice -> [2B, ...]: a[0], b[0], a[1], b[1], ...
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])

  @jit
  def run(variables, passes: list[dict]) -> jax.Array:
    # Each image next to its flip, not all flips after all images: on a batch split over
    # devices every device then flips and runs its own images, with no exchange between
    # devices, and each image's numbers are those of a one-device run of its share.
    total = 0.0
    for p in passes:
      b = p["images"].shape[0]
      both = interleave(p["images"], flip_within(p["images"], p["flip"]))
      grids = apply_fn(variables, both, interleave(p["sizes"], p["sizes"]))
      grids = grids.reshape((b, 2) + grids.shape[1:])
      total = total + upsample(grids[:, 0], p["ry"], p["rx"])
      total = total + upsample(grids[:, 1], p["ry"], p["rx_flip"])
    return total
  return run


def valid_mask(sizes: np.ndarray, canvas_hw: tuple[int, int]) -> np.ndarray:
  """[B, Hc, Wc] bool: True inside each image's own (h, w) at the canvas's top-left."""
  sizes = np.asarray(sizes)
  return ((np.arange(canvas_hw[0])[None, :, None] < sizes[:, 0, None, None]) &
          (np.arange(canvas_hw[1])[None, None, :] < sizes[:, 1, None, None]))


def normalise(total: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """Multi-scale CAM sums -> CAMs: absent classes and padding zeroed, each class / (max + 1e-5).

  Args:
    total: [B, Hc, Wc, C] summed CAMs of `multiscale_flip_sum`.
    labels: [B, C] multi-hot image labels.
    valid: [B, Hc, Wc] bool from `valid_mask`.
  """
  present = labels > 0
  total = jnp.where(present[:, None, None, :] & valid[..., None], total, 0.0)
  peak = jnp.max(total, axis=(1, 2), keepdims=True)
  return total / (peak + NORM_EPS)


def _as_given(tree):
  return tree


def cam_fn(model):
  """The CAM network's CAMs of an inference batch, as infer_cam and predict compute them.

  Returns run(variables, batch, scales, labels, put=None) -> [B, Hc, Wc, C] float32 numpy:
  `multiscale_flip_sum` of `model`'s CAMs over `pass_inputs(batch, scales)`, then `normalise`
  with the multi-hot `labels` [B, C] inside each image's extent (batch["orig_size"] on the
  canvas of batch["raw"]). `put` places the per-example arrays (all batch first) on the
  devices, e.g. `jax.device_put` with a batch sharding; by default they go as they are.
  """
  total_fn = multiscale_flip_sum(lambda v, x, sizes: model.apply(v, x, sizes, method="cam"))
  normalise_fn = jit(normalise)

  def run(variables, batch: dict, scales, labels, put=None) -> np.ndarray:
    put = put or _as_given
    total = total_fn(variables, put(pass_inputs(batch, scales)))
    valid = valid_mask(np.asarray(batch["orig_size"]), batch["raw"].shape[1:3])
    return np.asarray(normalise_fn(total, *put((jnp.asarray(labels), jnp.asarray(valid)))))
  return run


def segmentation_fn(model):
  """The segmentation network's scores of an inference batch, as infer_seg and predict compute
  them.

  Returns run(variables, batch, scales, put=None) -> [B, Hc, Wc, 1 + C] float32 numpy: the
  softmax scores averaged over the scales and flips of `pass_inputs(batch, scales)`; `put` as
  in `cam_fn`.
  """
  sum_fn = multiscale_flip_sum(lambda v, x, sizes: jax.nn.softmax(
      model.apply(v, x, sizes=sizes).astype("float32"), axis=-1))

  def run(variables, batch: dict, scales, put=None) -> np.ndarray:
    put = put or _as_given
    return np.asarray(sum_fn(variables, put(pass_inputs(batch, scales)))) / (2 * len(scales))
  return run


def segmentation_label(image: np.ndarray, probs: np.ndarray, *, crf: bool = False) -> np.ndarray:
  """[H, W] int label map (0 background, c + 1 class c): the argmax of the segmentation scores
  `probs` [H, W, 1 + C], with `crf` refined first by dCRF on the uint8 RGB `image` [H, W, 3]."""
  if crf:
    probs = crf_lib.crf_inference(np.ascontiguousarray(image), probs)
  return np.argmax(probs, -1)


def class_probability_fn(model):
  """jit(variables, images [B, H, W, 3], sizes [B, 2]) -> [B, C] float32: the sigmoid of the
  CAM network's logits (global average pool over each image's own cells), i.e. its own
  image-level classification, for when no image-level labels are given (predict)."""
  @jit
  def run(variables, images, sizes):
    return jax.nn.sigmoid(model.apply(variables, images, sizes=sizes).astype(jnp.float32))
  return run


def predicted_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
  """[B, C] multi-hot float32 image labels from class probabilities `probs` [B, C]: the classes
  scoring above `threshold`, and always the top class (an image holds at least one object)."""
  probs = np.asarray(probs, np.float32)
  labels = (probs > threshold).astype(np.float32)
  if probs.shape[-1]:
    labels[np.arange(len(probs)), np.argmax(probs, axis=-1)] = 1.0
  return labels


def background_stack(cam, *, alpha: Optional[float] = None,
                     constant: Optional[float] = None):
  """[..., C] CAMs -> [..., 1 + C] with a background score first.

  The background is (1 - max_c cam)^alpha (`alpha`: 4 and 32 for the affinity labels, 16 for
  the walk) or a `constant` (CAM-only predictions); with no class at all, max_c cam is 0.
  NumPy in, NumPy out (the dCRF stage); a JAX array in, a JAX array out (the walk).
  """
  if (alpha is None) == (constant is None):
    raise ValueError("background_stack: give exactly one of alpha and constant")
  xp = jnp if isinstance(cam, jax.Array) else np
  shape = cam.shape[:-1] + (1,)
  if constant is not None:
    background = xp.full(shape, constant, cam.dtype)
  else:
    peak = xp.max(cam, axis=-1, keepdims=True) if cam.shape[-1] else xp.zeros(shape, cam.dtype)
    background = xp.power(1.0 - peak, alpha)
  return xp.concatenate([background, cam], axis=-1)


def cam_prediction(cam, *, background: float = CAM_ONLY_BACKGROUND) -> np.ndarray:
  """CAM-only segmentation: [..., H, W, C] CAMs -> [..., H, W] int32 argmax over (constant
  background, classes): 0 = background, c + 1 = class c."""
  cam = np.asarray(cam, np.float32)
  return np.argmax(background_stack(cam, constant=background), axis=-1).astype(np.int32)


def walk_to_image(grid_hw: np.ndarray, sizes: np.ndarray, scaled: np.ndarray,
                  canvas_grid: tuple[int, int], image_scale: float
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(Ry, Rx) taking the walk's padded grid of each image back to the image's own pixels.

  The walk runs on the stride-8 grid of the image resized by `image_scale`. Each image's own
  grid (`grid_hw` [B, 2] cells) covers grid * 8 resized pixels, i.e. grid * 8 * size / scaled
  original ones (at least the image): the grid is upsampled bilinearly to that and the caller
  crops to the image's `sizes` [B, 2]. `scaled` [B, 2] are the resized sizes. At scale 1 this
  is grid * 8. The output canvas is one static shape for every batch: the canvas grid times 8
  (divided by the scale, plus a row and a column of slack for rounding, when it is not 1).

  Returns:
    Ry [B, Ho, hc], Rx [B, Wo, wc] for `upsample`, hc x wc = `canvas_grid`.
  """
  grid_hw = np.asarray(grid_hw)
  out_sizes = np.round(grid_hw * STRIDE * np.asarray(sizes) /
                       np.maximum(np.asarray(scaled), 1)).astype(np.int64)
  hc, wc = canvas_grid
  out_hw = (hc * STRIDE, wc * STRIDE)
  if image_scale != 1.0:
    out_hw = tuple(int(np.ceil(n * STRIDE / image_scale)) + 1 for n in (hc, wc))
  return upsample_matrices(grid_hw * STRIDE, out_sizes, canvas_grid, out_hw)


# ---------------------------------------------------------------------------------------------
# IRN's CAMs (docs/method.md §11): one image at a time on the host, for IRN's ResNet-50 CAM
# network at stride 16.

IRN_CAM_STRIDE = 16


def irn_cams(cam_apply, image: np.ndarray, classes, *, scales=(1.0, 0.5, 1.5, 2.0),
             normalise_fn=None) -> dict[str, np.ndarray]:
  """IRN's multi-scale + flip CAMs of one image: the stride-4 map the walk takes and the
  full-resolution one its relation labels take.

  Args:
    cam_apply: images [2, h, w, 3] (network input) -> [2, ceil(h / 16), ceil(w / 16), C] class
      maps, e.g. `jax.jit(lambda x: model.apply(variables, x, method="cam"))` with
      `models.ResNet50CAMNet` (relu of the classifier at every cell).
    image: [H, W, 3] uint8 RGB.
    classes: the indices of the image's classes among the C (IRN: its label's non-zeros).
    scales: IRN's (1, 0.5, 1.5, 2). A scale s resizes the image to round(H s) x round(W s)
      (PIL bicubic; 1 keeps it as it is).
    normalise_fn: uint8 images -> network input (default: ImageNet mean and std, the
      convention of torchvision's ResNet-50 as IRN feeds it).

  Returns:
    {"cam": [ceil(H / 4), ceil(W / 4), K], "high_res": [H, W, K]} float32, K = len(classes):
    at each scale the map of the image plus the flipped-back map of its flip, bilinearly
    resized (half-pixel centres) to the stride-4 grid, and to 16 x the stride-16 grid of the
    image and then cropped to it; summed over the scales; each class divided by its maximum
    + 1e-5.
  """
  from PIL import Image
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"irn_cams: image must be uint8 [H, W, 3] (got {image.dtype} "
                     f"{image.shape}).")
  if normalise_fn is None:
    mean, std = np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
    normalise_fn = lambda x: (x.astype(np.float32) / 255.0 - mean) / std  # noqa: E731
  height, width = image.shape[:2]
  grid = (-(-height // IRN_STRIDE), -(-width // IRN_STRIDE))
  padded = (-(-height // IRN_CAM_STRIDE) * IRN_CAM_STRIDE,
            -(-width // IRN_CAM_STRIDE) * IRN_CAM_STRIDE)
  classes = np.asarray(classes, np.int64).reshape(-1)
  strided, high_res = 0.0, 0.0
  for scale in scales:
    size = (int(np.round(height * scale)), int(np.round(width * scale)))
    scaled = image if size == (height, width) else np.asarray(
        Image.fromarray(image).resize(size[::-1], Image.BICUBIC))
    x = normalise_fn(scaled)
    maps = np.asarray(cam_apply(np.stack([x, x[:, ::-1]])), np.float32)
    if maps.ndim != 4 or maps.shape[0] != 2:
      raise ValueError(f"irn_cams: cam_apply must return [2, h, w, C] (got {maps.shape}).")
    summed = maps[0] + maps[1][:, ::-1]
    strided = strided + resize_bilinear(summed, grid)
    high_res = high_res + resize_bilinear(summed, padded)[:height, :width]
  out = {}
  for key, total in (("cam", strided), ("high_res", high_res)):
    total = np.asarray(total, np.float32)[..., classes]
    out[key] = total / (total.max(axis=(0, 1), keepdims=True) + NORM_EPS)
  return out
