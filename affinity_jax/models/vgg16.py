"""VGG-16 at output stride 8 and its three networks, as the original's network/vgg16d.py,
vgg16_cls.py and vgg16_aff.py build them (the segmentation head is SegNet's).

The trunk is DeepLab's fc-reduced VGG-16 (`vgg16_20M.caffemodel`): thirteen 3x3 convolutions
with biases, each followed by ReLU; 3x3 max pools padded by 1 after conv1_2, conv2_2, conv3_3
(stride 2) and conv4_3 (stride 1, which with conv5_* dilated by 2 keeps the output stride at 8);
`fc6` a 3x3 convolution to 1024 channels (dilation 1 in the CAM network, 4 in AffinityNet), ReLU,
channel dropout 0.5 (training only), `fc7` 1x1 to 1024, ReLU. The original also defines pool5 and
pool5a, which its forward never uses, so they are absent here. No BatchNorm: `batch_stats` is
empty. Module names are the original's state-dict names (conv1_1 ... fc7, fc8, f8_3 ... f9,
gn8_3 ...), so weight conversion is a renaming. Inputs: BGR minus the Caffe mean pixel
(`data.transforms.normalize(..., "caffe_bgr")`). As on ResNet-38, every network takes an optional
`sizes` [B, 2] (each image's height and width at the top-left of a padded canvas) for the
unpadded forward on the image's cells (models/canvas.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from affinity_jax.constants import STRIDE
from affinity_jax.models import canvas, convolution
from affinity_jax.models.heads import (AFFINITY_HEAD_CHANNELS, AffinityNet, CAMNet, SegNet,
                                       affinity_head, class_scores, segmentation_head)
from affinity_jax.models.resnet38 import channel_dropout, scaled, torch_default_init

Dtype = Any

# (name, kernel, input channels, output channels, dilation) at width 1.0, in order; fc6's
# dilation (None) is the network's: 1 in the CAM and segmentation networks, 4 in AffinityNet.
TRUNK_CONVS: tuple[tuple[str, int, int, int, int | None], ...] = (
    ("conv1_1", 3, 3, 64, 1), ("conv1_2", 3, 64, 64, 1),
    ("conv2_1", 3, 64, 128, 1), ("conv2_2", 3, 128, 128, 1),
    ("conv3_1", 3, 128, 256, 1), ("conv3_2", 3, 256, 256, 1), ("conv3_3", 3, 256, 256, 1),
    ("conv4_1", 3, 256, 512, 1), ("conv4_2", 3, 512, 512, 1), ("conv4_3", 3, 512, 512, 1),
    ("conv5_1", 3, 512, 512, 2), ("conv5_2", 3, 512, 512, 2), ("conv5_3", 3, 512, 512, 2),
    ("fc6", 3, 512, 1024, None), ("fc7", 1, 1024, 1024, 1),
)
# The max pool (3x3, padding 1) after a convolution: its stride.
POOL_STRIDE = {"conv1_2": 2, "conv2_2": 2, "conv3_3": 2, "conv4_3": 1}
FC7_CHANNELS = 1024
CAM_FC6_DILATION, AFFINITY_FC6_DILATION = 1, 4  # vgg16_cls.py (vgg16d's default), vgg16_aff.py
# GroupNorm of each affinity head (vgg16_aff.py: 8, 16 and 32 groups; 8 channels per group).
AFFINITY_GN_GROUPS = {"f8_3": 8, "f8_4": 16, "f8_5": 32}
GN_EPS = 1e-5  # PyTorch's GroupNorm default.


def gn_groups(head: str, width: float) -> int:
  """Groups of `head`'s GroupNorm at `width`: the original's count, scaled like the channels,
  then the largest count <= that dividing the channels (8 / 16 / 32 at width 1.0)."""
  channels = scaled(AFFINITY_HEAD_CHANNELS[head], width)
  want = scaled(AFFINITY_GN_GROUPS[head], width)
  return max(g for g in range(1, want + 1) if channels % g == 0)


class TrunkConv(nn.Module):
  """A convolution of the trunk with bias, stride 1, padded as PyTorch: 'kernel' [k, k, C_in,
  features] (HWIO) and 'bias' [features], float32; arithmetic in `dtype`. 3x3 kernels through
  `convolution.conv2d` with the kernel gradient as products (that module's docstring), 1x1 as a
  matrix product over the channels (`convolution.pointwise`, as resnet38.Conv); the bias added
  by `convolution.add_bias`."""
  features: int
  kernel_size: int
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", torch_default_init, (k, k, x.shape[-1], self.features),
                        jnp.float32).astype(self.dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    y = convolution.pointwise(x, kernel[0, 0]) if k == 1 else convolution.conv2d(
        x, kernel, dilation=self.dilation, kernel_grad="products")
    return convolution.add_bias(y, bias.astype(self.dtype))


def vgg16_taps(images: jax.Array, width: float, dtype: Dtype, train: bool,
               fc6_dilation: int, sizes: jax.Array | None = None) -> dict[str, jax.Array]:
  """The trunk, built as submodules of the calling (compact) module (flat original names).

  images: [B, H, W, 3] BGR minus the mean pixel. sizes: None, or [B, 2] int (height, width) of
  each image at the top-left of its canvas: the taps on its cells are then those of the unpadded
  image (models/canvas.py). Returns the original's forward_as_dict taps at stride 8
  (h = ceil(ceil(ceil(H/2)/2)/2)), in `dtype`: "conv4" [B, h, w, 512w] (after conv4_3's ReLU),
  "conv5" [B, h, w, 512w] (after conv5_3's), "conv5fc" [B, h, w, 1024w] (after fc7's).
  """
  x = images.astype(dtype)
  taps = {}
  stride = 1
  valid = canvas.valid_cells(sizes, x.shape[1:3], stride)
  for name, k, _, out, dilation in TRUNK_CONVS:
    if name == "fc7":  # the original's drop6 sits between fc6 and fc7.
      x = channel_dropout(x, 0.5, train, "drop6")
    if k > 1:
      x = canvas.zero_outside(x, valid)
    x = nn.relu(TrunkConv(scaled(out, width), k, dilation or fc6_dilation, dtype, name=name)(x))
    if name == "conv4_3":
      taps["conv4"] = x
    elif name == "conv5_3":
      taps["conv5"] = x
    if name in POOL_STRIDE:  # PyTorch pads max pools with -inf, as nn.max_pool does.
      # On a canvas, zeros outside the image act as that -inf: x >= 0 after ReLU, and the centre
      # of every window of an output cell inside the image lies inside it.
      x = canvas.zero_outside(x, valid)
      s = POOL_STRIDE[name]
      x = nn.max_pool(x, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)))
      stride *= s
      valid = canvas.valid_cells(sizes, x.shape[1:3], stride)
  taps["conv5fc"] = x
  return taps


class GroupNorm(nn.Module):
  """GroupNorm as PyTorch's (biased variance, eps 1e-5, per-channel 'scale' and 'bias').

  `__call__(x, valid=None)`: x [B, h, w, C] -> [B, h, w, C] in `dtype`, statistics in float32
  over (h, w, C / groups) of each example; with `valid` [B, h, w] (bool) over the valid cells
  only. The random walk passes its images padded to a fixed canvas: without the mask the
  padding would enter the statistics, where the original pads each image only to a multiple
  of 8 and its grid is exactly the valid cells.
  """
  num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    b, h, w, c = x.shape
    scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    xg = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
    axes = (1, 2, 4)
    if valid is None:
      mean = jnp.mean(xg, axis=axes, keepdims=True)
      var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    else:
      weight = valid.astype(jnp.float32).reshape(b, h, w, 1, 1)
      # At least one cell, so the all-padding dummy examples of a batch stay finite.
      count = jnp.maximum(jnp.sum(weight, axis=axes, keepdims=True), 1.0) * xg.shape[-1]
      mean = jnp.sum(xg * weight, axis=axes, keepdims=True) / count
      var = jnp.sum(jnp.square(xg - mean) * weight, axis=axes, keepdims=True) / count
    y = ((xg - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(b, h, w, c)
    return (y * scale + bias).astype(self.dtype)


class VGG16(nn.Module):
  """The trunk alone (`backbone` checkpoints). `__call__(x, train=False, sizes=None)` -> its
  taps; `sizes` [B, 2] makes a canvas forward exact (models/canvas.py)."""
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               sizes: jax.Array | None = None) -> dict[str, jax.Array]:
    """x: [B, H, W, 3] -> {"conv4", "conv5", "conv5fc"}, each [B, h, w, C] at stride 8;
    sizes [B, 2] (optional): each image's (height, width) on its canvas (vgg16_taps)."""
    return vgg16_taps(x, self.width, self.dtype, train, CAM_FC6_DILATION, sizes)


class VGG16CAMNet(CAMNet):
  """network/vgg16_cls.py: the trunk, channel dropout 0.5 (drop7), fc8 without bias, GAP.

  As CAMNet: `__call__(images, train=False, sizes=None)` -> logits [B, num_classes] (float32);
  `cam(images, sizes=None)` -> [B, h, w, num_classes] = sqrt(relu(fc8 . conv5fc)): the
  original's VGG-16 takes the square root, its ResNet-38 does not (docs/method.md §2).
  """

  @nn.compact
  def forward(self, images: jax.Array, train: bool, output: str,
              sizes: jax.Array | None = None) -> jax.Array:
    x = vgg16_taps(images, self.width, self.dtype, train, CAM_FC6_DILATION, sizes)["conv5fc"]
    scores = class_scores(x, self.num_classes, self.dtype, train, output, "drop7", sizes)
    return jnp.sqrt(nn.relu(scores)) if output == "cam" else scores


class VGG16AffinityNet(AffinityNet):
  """network/vgg16_aff.py: affinity features on the trunk with fc6 dilated by 4.

  `__call__(images, train=False, valid=None, sizes=None)`: images [B, H, W, 3] -> features
  [B, h, w, feature_dim] (float32) = ELU(f9(concat(ELU(GN(f8_3(conv4))), ELU(GN(f8_4(conv5))),
  ELU(GN(f8_5(conv5fc)))))); 1x1 convolutions without bias, GroupNorm of 8 / 16 / 32 groups
  (`gn_groups` at other widths), statistics over the cells `valid` [B, h, w] when given, else
  over each image's cells ceil(sizes / 8) when `sizes` [B, 2] is (which also masks the trunk).
  """

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, valid: jax.Array | None = None,
               sizes: jax.Array | None = None) -> jax.Array:
    taps = vgg16_taps(images, self.width, self.dtype, train, AFFINITY_FC6_DILATION, sizes)
    if valid is None and sizes is not None:
      valid = canvas.valid_cells(sizes, taps["conv4"].shape[1:3], STRIDE)[..., 0]

    def group_norm(head: str, x: jax.Array) -> jax.Array:  # gn8_3 follows f8_3, ...
      gn = GroupNorm(gn_groups(head, self.width), self.dtype, name="gn" + head[1:])
      return gn(x, valid)

    return affinity_head((taps["conv4"], taps["conv5"], taps["conv5fc"]), self.width,
                         self.dtype, group_norm)


class VGG16SegNet(SegNet):
  """SegNet's head (heads.segmentation_head) on the trunk's conv5fc (fc6 dilation 1).

  `__call__(images, train=False, sizes=None)` -> logits [B, h, w, num_classes + 1] (float32).
  """

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               sizes: jax.Array | None = None) -> jax.Array:
    x = vgg16_taps(images, self.width, self.dtype, train, CAM_FC6_DILATION, sizes)["conv5fc"]
    return segmentation_head(x, self.num_classes, self.width, self.dtype, sizes)
