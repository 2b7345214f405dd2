"""tf preprocessing ops, joint where the image and its maps must move together.

Every random op is stateless: it takes a `seed`, an int32/int64 tensor of shape [2], so a
pipeline seeded once gives the same batches on every run, eagerly or inside tf.data.
Images are uint8 [H, W, 3] as decoded; where the original resizes them (CAM training, inference;
IRN's relation training) they are resized while still uint8 with PIL's bicubic (`resize_image`),
as it resizes its PIL images, and IRN's label maps with PIL's nearest (`resize_label`). Then
they are float32 in 0..255 until `normalize`. Maps (masks, pseudo labels, score maps) are
[H, W, C] tensors of any dtype that follow the image's geometry.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from affinity_jax.constants import CAFFE_MEAN_RGB, IMAGENET_MEAN, IMAGENET_STD, INPUT_CONVENTIONS

_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's colour jitter uses.


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """`num` independent [2] seeds from one."""
  return list(tf.unstack(tf.random.experimental.stateless_split(seed, num)))


def normalize(image: tf.Tensor, convention: str = "imagenet") -> tf.Tensor:
  """[..., 3] RGB 0..255 -> float32 network input [..., 3].

  convention "imagenet" (ResNet-38): RGB, (x / 255 - mean) / std. "caffe_bgr" (VGG-16, whose
  Caffe weights expect it; the original's network/vgg16d.py Normalize): channels reversed to
  BGR, minus the mean pixel, no scaling. In both, 0 is the mean colour, so zero padding of a
  normalised image is padding with the mean.
  """
  if convention == "imagenet":
    image = tf.cast(image, tf.float32) / 255.0
    return (image - IMAGENET_MEAN) / IMAGENET_STD
  if convention == "caffe_bgr":
    return tf.reverse(tf.cast(image, tf.float32), axis=[-1]) - CAFFE_MEAN_RGB[::-1]
  raise ValueError(f"unknown input convention {convention!r}: expected one of "
                   f"{', '.join(INPUT_CONVENTIONS)}")


def color_jitter(image: tf.Tensor, seed: tf.Tensor, *, brightness: float = 0.3,
                 contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.1) -> tf.Tensor:
  """torchvision-style colour jitter of a float32 [H, W, 3] 0..255 image, in a FIXED order.

  Factors are drawn uniformly: brightness and contrast and saturation in [1 - x, 1 + x], a hue
  shift in [-hue, hue] of the colour circle. Brightness scales the image; contrast blends it
  with its mean grey level; saturation blends it with its own grey image; hue rotates in HSV.
  torchvision (as the original used it) applies the four in a random order; we apply them in
  this fixed order, which keeps the op simple and changes only which compositions are likely.
  """
  s_b, s_c, s_s, s_h = split_seed(seed, 4)
  image = tf.cast(image, tf.float32)
  f = tf.random.stateless_uniform([], s_b, 1.0 - brightness, 1.0 + brightness)
  image = tf.clip_by_value(image * f, 0.0, 255.0)
  f = tf.random.stateless_uniform([], s_c, 1.0 - contrast, 1.0 + contrast)
  mean = tf.reduce_mean(tf.reduce_sum(image * _GREY, axis=-1))
  image = tf.clip_by_value((image - mean) * f + mean, 0.0, 255.0)
  f = tf.random.stateless_uniform([], s_s, 1.0 - saturation, 1.0 + saturation)
  grey = tf.reduce_sum(image * _GREY, axis=-1, keepdims=True)
  image = tf.clip_by_value((image - grey) * f + grey, 0.0, 255.0)
  delta = tf.random.stateless_uniform([], s_h, -hue, hue)
  image = tf.image.adjust_hue(image / 255.0, delta) * 255.0
  return tf.clip_by_value(image, 0.0, 255.0)


def random_flip(tensors: Sequence[tf.Tensor], seed: tf.Tensor) -> list[tf.Tensor]:
  """Flips every [H, W, ...] tensor left-right together, with probability 1/2."""
  tensors = [tf.convert_to_tensor(t) for t in tensors]
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return [tf.cond(flip, lambda t=t: tf.reverse(t, axis=[1]), lambda t=t: t) for t in tensors]


def random_crop(tensors: Sequence[tf.Tensor], fills: Sequence[float], crop_size: int,
                seed: tf.Tensor) -> list[tf.Tensor]:
  """One random crop_size x crop_size window of several [H, W, C] tensors of equal H, W.

  Per axis, as the original's random crop: when the image is longer than the crop, a random
  window of it; when shorter, the whole image at a random offset in the crop, the rest filled
  with each tensor's `fill` (0: black for 0..255 images, the mean colour for normalised ones, no
  score for score maps; 255 for labels).
  """
  tensors = [tf.convert_to_tensor(t) for t in tensors]
  shape = tf.shape(tensors[0])
  s_y, s_x = split_seed(seed, 2)
  pads, starts = [], []
  for size, s in ((shape[0], s_y), (shape[1], s_x)):
    space = size - crop_size
    # One draw in [0, |space|]: the window's start if the image is longer, else the image's.
    offset = tf.random.stateless_uniform([], s, 0, tf.abs(space) + 1, dtype=tf.int32)
    start = tf.where(space > 0, offset, 0)
    before = tf.where(space > 0, 0, offset)
    pads.append([before, tf.maximum(crop_size - size - before, 0)])
    starts.append(start)
  out = []
  for t, fill in zip(tensors, fills):
    channels = t.shape[2:]  # Static trailing dims survive the crop.
    t = tf.pad(t, pads + [[0, 0]] * len(channels), constant_values=tf.cast(fill, t.dtype))
    t = t[starts[0]:starts[0] + crop_size, starts[1]:starts[1] + crop_size]
    out.append(tf.ensure_shape(t, [crop_size, crop_size] + channels))
  return out


def resize(tensors: Sequence[tf.Tensor], size: tf.Tensor, methods: Sequence[str],
           antialias: bool = True) -> list[tf.Tensor]:
  """Resizes [H, W, C] tensors to size = [h, w]; "nearest" keeps dtype (labels).

  "pil_bicubic" is `resize_image` (uint8 RGB in and out, PIL's bicubic); "pil_nearest" is
  `resize_label` (uint8 label maps, PIL's nearest). The other continuous methods ("bilinear",
  "bicubic") return float32 and, with `antialias`, widen their kernel when shrinking, as PIL
  does (it changes nothing when enlarging, only costs time).
  """
  out = []
  for t, method in zip(tensors, methods):
    t = tf.convert_to_tensor(t)
    if method == "nearest":
      out.append(tf.image.resize(t, size, method="nearest"))
    elif method == "pil_bicubic":
      out.append(resize_image(t, size))
    elif method == "pil_nearest":
      out.append(resize_label(t, size))
    else:
      out.append(tf.image.resize(tf.cast(t, tf.float32), size, method=method,
                                 antialias=antialias))
  return out


def _pil_bicubic(image: np.ndarray, size: np.ndarray) -> np.ndarray:
  height, width = int(size[0]), int(size[1])
  if image.shape[:2] == (height, width):
    return image  # PIL returns a copy at the same size.
  resized = Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
  return np.asarray(resized)


def resize_image(image: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, 3] -> uint8 [h, w, 3] at size = [h, w], resized by PIL's bicubic filter.

  As the original resizes its images (`img.resize(size, PIL.Image.CUBIC)`, CUBIC being
  BICUBIC) in multi-scale inference and in `RandomResizeLong`: the same call on the same uint8
  image, so the same pixels (PIL widens the kernel when shrinking and rounds in fixed point;
  tf.image.resize, even antialiased, differs on 15 to 22 % of the values, mostly by a level).
  It runs in a `tf.numpy_function`; PIL releases the GIL while resampling, so parallel tf.data
  maps resize in parallel.
  """
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:  # A cast would wrap or truncate a float image silently.
    raise TypeError(f"resize_image: expects a uint8 image, got {image.dtype.name}")
  resized = tf.numpy_function(_pil_bicubic, [image, size], tf.uint8, stateful=False)
  return tf.ensure_shape(resized, [None, None, 3])


def _pil_nearest(label: np.ndarray, size: np.ndarray) -> np.ndarray:
  height, width = int(size[0]), int(size[1])
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(label[..., c])).resize(
      (width, height), Image.Resampling.NEAREST)) for c in range(label.shape[-1])]
  return np.stack(channels, axis=-1)


def resize_label(label: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, C] -> uint8 [h, w, C] at size = [h, w], by PIL's nearest neighbour.

  As IRN rescales its label maps (imutils.pil_rescale, order 0), to its pixels: PIL steps
  through the input in doubles, so where an output pixel's centre falls exactly on an input
  pixel edge it may take either neighbour, which tf.image.resize (float32) and the exact rule
  of `reduce_label_tf` do not reproduce. Runs in a `tf.numpy_function`, as `resize_image`.
  """
  label = tf.convert_to_tensor(label)
  if label.dtype != tf.uint8 or label.shape.rank != 3:
    raise TypeError(f"resize_label: expects a uint8 [H, W, C] label map, got {label.dtype.name} "
                    f"of rank {label.shape.rank}")
  resized = tf.numpy_function(_pil_nearest, [label, size], tf.uint8, stateful=False)
  return tf.ensure_shape(resized, [None, None] + label.shape[2:])


def reduce_label_tf(label: tf.Tensor, stride: int) -> tf.Tensor:
  """[H, W, ...] label map -> [round(H / stride), round(W / stride), ...] on the stride grid.

  IRN's reduction of its training crop's label by PIL's nearest neighbour
  (tests/reference_relation_labels.py) in TF: sizes rounded half to even, and output row i
  takes input row floor((i + 1/2) * H / h), computed exactly in integers; likewise for
  columns. PIL steps through the same positions in doubles, so the two could part only where
  (2i + 1) * H / (2h) is an integer. When H is a multiple of the stride the ratio is exact in
  doubles and they agree. At stride 4 the other ties need H = 4h +- 2 with h odd, which
  rounding half to even rules out (4h +- 2 rounds to the even neighbour), so they agree for
  every H (tests/test_relation_pipeline.py checks H up to 2048); at other strides they may part
  at sizes that are not multiples of it (stride 8: H = 52, 84, ...), never at relation_train's.

  Args:
    label: [H, W, ...] labels of any dtype (uint8 in the pipeline).
    stride: the grid's stride (IRN: 4); round(H / stride) and round(W / stride) must be >= 1.
  """
  label = tf.convert_to_tensor(label)
  shape = tf.shape(label)
  static = label.shape.as_list()
  for axis in (0, 1):
    size = _round_div(shape[axis], stride)
    tf.debugging.assert_positive(size, f"reduce_label_tf: no cell at stride {stride}")
    rows = ((2 * tf.range(size) + 1) * shape[axis]) // (2 * size)
    label = tf.gather(label, rows, axis=axis)
    if static[axis] is not None:
      static[axis] = round(static[axis] / stride)  # Python's round: half to even.
  return tf.ensure_shape(label, static)


def scaled_size(height: tf.Tensor, width: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
  """[round(h * s), round(w * s)] int32, at least 1.

  Rounds half to even, as Python 3's round() in the original's resizing code does.
  """
  hw = tf.cast(tf.stack([height, width]), tf.float32) * tf.cast(scale, tf.float32)
  return tf.maximum(tf.cast(tf.round(hw), tf.int32), 1)


def _round_div(numerator: tf.Tensor, denominator: tf.Tensor) -> tf.Tensor:
  """round(numerator / denominator) of non-negative ints, half to even, exactly."""
  quotient = numerator // denominator
  twice_rest = 2 * (numerator - quotient * denominator)
  up = (twice_rest > denominator) | ((twice_rest == denominator) & (quotient % 2 == 1))
  return quotient + tf.cast(up, quotient.dtype)


def long_side_size(height: tf.Tensor, width: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
  """[h, w] int32 with the long side `target`, aspect kept: the original's `RandomResizeLong`.

  The short side is round(short * target / long) (Python's round, half to even, computed
  exactly in integers), at least 1; a square image becomes target x target. Elementwise: sizes
  of shape [..., 2] for heights and widths of shape [...].
  """
  height, width, target = (tf.cast(v, tf.int32) for v in (height, width, target))
  tall = width < height
  new_height = tf.where(tall, target, _round_div(height * target, width))
  new_width = tf.where(tall, _round_div(width * target, height), target)
  return tf.maximum(tf.stack([new_height, new_width], axis=-1), 1)


def random_resize_long(tensors: Sequence[tf.Tensor], methods: Sequence[str], low: int,
                       high: int, seed: tf.Tensor) -> list[tf.Tensor]:
  """Resizes so that the long side is a uniform integer in [low, high], aspect kept.

  Sizes follow `long_side_size`; with method "pil_bicubic" for a uint8 image this is the
  original's `RandomResizeLong(low, high)` (its images are PIL images resized with bicubic).
  """
  shape = tf.shape(tensors[0])
  target = tf.random.stateless_uniform([], seed, low, high + 1, dtype=tf.int32)
  return resize(tensors, long_side_size(shape[0], shape[1], target), methods)


def random_scale(tensors: Sequence[tf.Tensor], methods: Sequence[str], low: float, high: float,
                 seed: tf.Tensor) -> list[tf.Tensor]:
  """Resizes by a factor drawn uniformly in [low, high], aspect kept."""
  shape = tf.shape(tensors[0])
  scale = tf.random.stateless_uniform([], seed, low, high)
  return resize(tensors, scaled_size(shape[0], shape[1], scale), methods)


def pad_to(t: tf.Tensor, height: int, width: int, fill: float) -> tf.Tensor:
  """Pads [h, w, C] at the bottom and right to [height, width, C] with `fill` (h <= height)."""
  t = tf.convert_to_tensor(t)
  shape = tf.shape(t)
  padding = [[0, height - shape[0]], [0, width - shape[1]]] + [[0, 0]] * (t.shape.rank - 2)
  t = tf.pad(t, padding, constant_values=tf.cast(fill, t.dtype))
  return tf.ensure_shape(t, [height, width] + t.shape[2:])
