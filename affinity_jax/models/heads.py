"""The three networks of the pipeline: ResNet-38 plus a CAM, affinity or segmentation head.

Each network builds the backbone inline (`resnet38_taps`), so its variables are one flat tree in
the original's names: params['conv1a'], params['b4_3']['conv_branch2a'], ..., then the head's
params['fc8'] / params['f8_3'] ... params['f9'] / params['seg_conv1'], params['seg_conv2'].
Outputs of the heads are float32 whatever the compute dtype (losses and the random walk want it).
The same networks on VGG-16 are in vgg16.py; the heads (`class_scores`, `affinity_head`,
`segmentation_head`) serve both. Every network takes an optional `sizes` [B, 2] (int, each
image's height and width at the top-left of a padded canvas): the output on the image's cells is
then that of the unpadded image (models/canvas.py); None (the default) masks nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from affinity_jax.constants import STRIDE
from affinity_jax.models import canvas
from affinity_jax.models.resnet38 import channel_dropout, conv, resnet38_taps, scaled

Dtype = Any

# Initialisers of the original's new layers (PyTorch's names in the comments).
xavier_uniform = nn.initializers.xavier_uniform()                              # xavier_uniform_
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")      # kaiming_normal_
xavier_uniform_gain4 = nn.initializers.variance_scaling(16.0, "fan_avg", "uniform")

AFFINITY_HEAD_CHANNELS = {"f8_3": 64, "f8_4": 128, "f8_5": 256}  # on conv4, conv5, conv6
AFFINITY_FEATURES = 448
SEG_HIDDEN = 512
SEG_DILATION = 12


class CAMNet(nn.Module):
  """Classification network whose 1x1 classifier `fc8` gives the class activation maps.

  `__call__(images, train=False, sizes=None)`: images [B, H, W, 3] normalised -> logits
  [B, num_classes] (channel dropout 0.5 on conv6 when training, global average pool, fc8
  without bias). `cam(images, sizes=None)`: [B, h, w, num_classes] = relu(fc8 . conv6) at
  stride 8 (M_c of the paper). `sizes` [B, 2]: see the module docstring.
  """
  num_classes: int = 20
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def forward(self, images: jax.Array, train: bool, output: str,
              sizes: jax.Array | None = None) -> jax.Array:
    conv6 = resnet38_taps(images, self.width, self.dtype, train, sizes)["conv6"]
    scores = class_scores(conv6, self.num_classes, self.dtype, train, output, "dropout7", sizes)
    return nn.relu(scores) if output == "cam" else scores

  def __call__(self, images: jax.Array, train: bool = False,
               sizes: jax.Array | None = None) -> jax.Array:
    return self.forward(images, train, "logits", sizes)

  def cam(self, images: jax.Array, sizes: jax.Array | None = None) -> jax.Array:
    return self.forward(images, False, "cam", sizes)


def class_scores(features: jax.Array, num_classes: int, dtype: Dtype, train: bool, output: str,
                 dropout: str, sizes: jax.Array | None = None) -> jax.Array:
  """The classifier fc8 (1x1, no bias), built inside the calling (compact) module, float32.

  output "cam": fc8 at every cell, [B, h, w, num_classes]. Otherwise the logits
  [B, num_classes]: channel dropout 0.5 (named `dropout`, training only), global average pool
  (over each image's own cells when `sizes` [B, 2] is given), fc8; fc8 is linear without bias,
  so pooling first equals the original's order and is cheaper.
  """
  fc8 = conv(num_classes, 1, name="fc8", dtype=dtype, kernel_init=xavier_uniform)
  if output == "cam":
    return fc8(features).astype(jnp.float32)
  x = channel_dropout(features, 0.5, train, dropout)
  if sizes is None:
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(dtype)
  else:
    x = canvas.masked_mean(x, canvas.valid_cells(sizes, x.shape[1:3], STRIDE)).astype(dtype)
  return fc8(x)[:, 0, 0, :].astype(jnp.float32)


class AffinityNet(nn.Module):
  """Feature network whose L1 distances give the affinities W_ij = exp(-mean|f_i - f_j|).

  `__call__(images, train=False, valid=None, sizes=None)`: images [B, H, W, 3] normalised ->
  features [B, h, w, feature_dim] at stride 8: ELU(f8_3(conv4)), ELU(f8_4(conv5)),
  ELU(f8_5(conv6)), concatenated, then ELU(f9(.)); 1x1 convolutions without bias. `valid` is
  accepted for the interface VGG16AffinityNet shares and unused; `sizes` [B, 2]: see the module
  docstring (the original pads each image to a multiple of 8, so there sizes = 8 * grid).
  """
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return scaled(AFFINITY_FEATURES, self.width)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, valid: jax.Array | None = None,
               sizes: jax.Array | None = None) -> jax.Array:
    # `valid` (the cells of each image inside its canvas) is for VGG16AffinityNet's GroupNorm;
    # nothing here computes statistics over positions, so it is not needed.
    del valid
    taps = resnet38_taps(images, self.width, self.dtype, train, sizes)
    return affinity_head((taps["conv4"], taps["conv5"], taps["conv6"]), self.width, self.dtype)


def affinity_head(taps: Sequence[jax.Array], width: float, dtype: Dtype,
                  norm: Callable[[str, jax.Array], jax.Array] | None = None) -> jax.Array:
  """The affinity head, built inside the calling (compact) module: three taps [B, h, w, C_k]
  -> features [B, h, w, 448 w] float32 = ELU(f9(concat_k ELU(norm(f8_k(tap_k))))), 1x1
  convolutions without bias. `norm(name, x)` (VGG-16's GroupNorm; none for ResNet-38) follows
  the head convolution `name`."""
  parts = []
  for (name, channels), tap in zip(AFFINITY_HEAD_CHANNELS.items(), taps):
    x = conv(scaled(channels, width), 1, name=name, dtype=dtype, kernel_init=kaiming_normal)(tap)
    parts.append(nn.elu(norm(name, x) if norm else x))
  f9 = conv(scaled(AFFINITY_FEATURES, width), 1, name="f9", dtype=dtype,
            kernel_init=xavier_uniform_gain4)
  return nn.elu(f9(jnp.concatenate(parts, axis=-1))).astype(jnp.float32)


class SegNet(nn.Module):
  """Segmentation network of the paper (not in the original repository): DeepLab-style head.

  `__call__(images, train=False, sizes=None)`: images [B, H, W, 3] normalised -> logits
  [B, h, w, num_classes + 1] at stride 8 (index 0 = background): conv6 -> 3x3 atrous
  (dilation 12, 512 ch, bias) -> ReLU -> 3x3 atrous (dilation 12, num_classes + 1, bias).
  `sizes` [B, 2]: see the module docstring.
  """
  num_classes: int = 20
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               sizes: jax.Array | None = None) -> jax.Array:
    conv6 = resnet38_taps(images, self.width, self.dtype, train, sizes)["conv6"]
    return segmentation_head(conv6, self.num_classes, self.width, self.dtype, sizes)


def segmentation_head(features: jax.Array, num_classes: int, width: float, dtype: Dtype,
                      sizes: jax.Array | None = None) -> jax.Array:
  """The segmentation head, built inside the calling (compact) module: features [B, h, w, C]
  -> 3x3 atrous (dilation 12, 512 ch, bias) -> ReLU -> 3x3 atrous (dilation 12, num_classes + 1,
  bias) -> logits [B, h, w, num_classes + 1] float32. Shared by SegNet and VGG16SegNet.
  `sizes` [B, 2] (optional, input pixels): features outside each image's cells are zeroed
  before each atrous convolution, as the original's zero padding."""
  valid = canvas.valid_cells(sizes, features.shape[1:3], STRIDE)
  x = conv(scaled(SEG_HIDDEN, width), 3, dilation=SEG_DILATION, name="seg_conv1",
           dtype=dtype, use_bias=True,
           kernel_init=kaiming_normal)(canvas.zero_outside(features, valid))
  x = canvas.zero_outside(nn.relu(x), valid)
  x = conv(num_classes + 1, 3, dilation=SEG_DILATION, name="seg_conv2", dtype=dtype,
           use_bias=True, kernel_init=nn.initializers.normal(0.01))(x)
  return x.astype(jnp.float32)

