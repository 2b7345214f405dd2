"""ResNet-50 in torchvision's layout, as IRN (github jiwoon-ahn/irn, net/resnet50.py) uses it,
and IRN's CAM network on it (net/resnet50_cam.py).

Bottleneck blocks (1x1 -> 3x3 -> 1x1, expansion 4) with the stride on the 3x3 convolution, a
1x1 projection (`downsample`) where the stride or the channel count changes, no convolution
biases, every BatchNorm frozen to its stored statistics (eps 1e-5; IRN's FixedBatchNorm). The
stem: conv1 7x7 (stride `strides[0]`, padding 3), bn1, ReLU, max pool 3x3 (stride 2, padding 1,
always); then layer1 (stride 1), layer2..layer4 (strides `strides[1:]`). IRN's default
(2, 2, 2, 1) keeps layer4 at stride 16. Dilations as IRN's `_make_layer`: `dilations[i]`
applies to every block of layer i+1 but its first (padding = dilation).

Flax names map 1:1 onto the torchvision state dict (convert/torchvision.py): a block
"layerL.i" becomes the module "layerL_i", and nn.Sequential's "downsample.0" / "downsample.1"
become "downsample_0" / "downsample_1":
  conv1.weight                    -> params/conv1/kernel            (OIHW -> HWIO)
  bn1.weight, bn1.bias            -> params/bn1/scale, params/bn1/bias
  bn1.running_mean, .running_var  -> batch_stats/bn1/mean, batch_stats/bn1/var
  layer3.4.conv2.weight           -> params/layer3_4/conv2/kernel
  layer2.0.downsample.0.weight    -> params/layer2_0/downsample_0/kernel
  layer2.0.downsample.1.*         -> params|batch_stats/layer2_0/downsample_1/...
  classifier.weight (IRN's CAM)   -> params/classifier/kernel
Unlike ResNet-38's, these BatchNorms keep their affine scale and bias in `params`: IRN freezes
the statistics (FixedBatchNorm always normalises with them) but trains weight and bias of every
BatchNorm from layer3 on (net/resnet50_cam.py sets requires_grad False on conv1 and bn1 only,
and the detach after stage2 starves layer1 and layer2 of gradients); models.param_labels
freezes the rest.

All padding is explicit and symmetric, as PyTorch's (resnet38.Conv), so every stride-2 layer
gives ceil(H / 2) outputs and an H x W image has ceil(H / s) x ceil(W / s) cells at stride s.
As the other networks, every forward takes `sizes` [B, 2] for the exact forward of images at
the top-left of a padded canvas (models/canvas.py): activations outside each image are zeroed
before conv1, before the max pool (after ReLU, zeros act as its -inf padding) and before every
3x3 convolution.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from affinity_jax.models import canvas
from affinity_jax.models.heads import CAMNet, segmentation_head
from affinity_jax.models.resnet38 import (BN_EPS, FrozenBatchNorm, conv, scaled,
                                          torch_default_init)

Dtype = Any


class LayerSpec(NamedTuple):
  """One of torchvision's four layers at width 1.0: `blocks` bottlenecks of `planes` channels
  inside, 4 * planes out."""
  name: str
  planes: int
  blocks: int


LAYERS: tuple[LayerSpec, ...] = (LayerSpec("layer1", 64, 3), LayerSpec("layer2", 128, 4),
                                 LayerSpec("layer3", 256, 6), LayerSpec("layer4", 512, 3))
EXPANSION = 4
STEM_CHANNELS = 64
FEATURE_CHANNELS = LAYERS[-1].planes * EXPANSION  # 2048: stage4, what the classifier reads.
# IRN's resnet50(strides=(2, 2, 2, 1)) in net/resnet50_cam.py and resnet50_irn.py: conv1,
# layer2, layer3, layer4 (layer1 has stride 1 and the max pool stride 2, always).
IRN_STRIDES = (2, 2, 2, 1)
NO_DILATION = (1, 1, 1, 1)
# The segmentation network's trunk at output stride 8 (DeepLab's): layer3 and layer4 keep the
# resolution and dilate by 2 and 4 instead.
SEG_STRIDES = (2, 2, 1, 1)
SEG_DILATIONS = (1, 1, 2, 4)
POOL_STRIDE = 2
# IRN's stages: stage1 = conv1, bn1, ReLU, max pool, layer1; stage2..4 = layer2..4.
STAGES = ("stage1", "stage2", "stage3", "stage4")


def output_strides(strides: tuple[int, ...] = IRN_STRIDES) -> dict[str, int]:
  """The stride of each tap ("conv1", "stage1".."stage4") in input pixels: 2, 4, 8, 16, 16 with
  IRN's strides."""
  out = {"conv1": strides[0]}
  stride = strides[0] * POOL_STRIDE
  for stage, layer_stride in zip(STAGES, (1, *strides[1:])):
    stride *= layer_stride
    out[stage] = stride
  return out


def block_names() -> list[str]:
  """Our module names of the sixteen bottlenecks, in order: layer1_0 .. layer4_2."""
  return [f"{layer.name}_{i}" for layer in LAYERS for i in range(layer.blocks)]


def has_downsample(layer_index: int, block_index: int, stride: int) -> bool:
  """torchvision's rule at width 1.0: the first block of a layer projects its shortcut when
  the stride or the channel count changes (every layer's first block, with 64 stem channels)."""
  if block_index:
    return False
  in_channels = STEM_CHANNELS if layer_index == 0 else LAYERS[layer_index - 1].planes * EXPANSION
  return stride != 1 or in_channels != LAYERS[layer_index].planes * EXPANSION


class FixedBatchNorm(FrozenBatchNorm):
  """IRN's FixedBatchNorm: y = (x - mean) / sqrt(var + 1e-5) * scale + bias with the stored
  statistics always, training or not. 'scale' and 'bias' are parameters (IRN trains them where
  the layer gets gradients), 'mean' and 'var' live in 'batch_stats' and are never updated.
  A FrozenBatchNorm, so `resnet38.calibrate_batch_norm` sets its statistics too.

  `__call__(x)`: x [B, H, W, C] -> [B, H, W, C] in `dtype`.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32)).value
    mult = scale * jax.lax.rsqrt(var + BN_EPS)
    shift = bias - mean * mult
    return x * mult.astype(self.dtype) + shift.astype(self.dtype)


class Bottleneck(nn.Module):
  """torchvision's / IRN's Bottleneck: relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))
  + shortcut), the stride and dilation on conv2 (3x3), shortcut = downsample_1(downsample_0(x))
  (1x1 with the stride, then BatchNorm) or x.

  `__call__(x, valid_in=None)`: x [B, H, W, C_in] -> [B, ceil(H / stride), ceil(W / stride),
  4 * planes]; valid_in [B, H, W, 1] bool (canvas.valid_cells) zeroes conv2's input outside.
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid_in: jax.Array | None = None) -> jax.Array:
    dt = self.dtype
    y = conv(self.planes, 1, name="conv1", dtype=dt)(x)
    y = nn.relu(FixedBatchNorm(dtype=dt, name="bn1")(y))
    y = conv(self.planes, 3, stride=self.stride, dilation=self.dilation, name="conv2",
             dtype=dt)(canvas.zero_outside(y, valid_in))
    y = nn.relu(FixedBatchNorm(dtype=dt, name="bn2")(y))
    y = conv(self.planes * EXPANSION, 1, name="conv3", dtype=dt)(y)
    y = FixedBatchNorm(dtype=dt, name="bn3")(y)
    if self.downsample:
      x = conv(self.planes * EXPANSION, 1, stride=self.stride, name="downsample_0", dtype=dt)(x)
      x = FixedBatchNorm(dtype=dt, name="downsample_1")(x)
    return nn.relu(y + x.astype(y.dtype))


def stem_max_pool(x: jax.Array) -> jax.Array:
  """The stem's max pool: 3x3, stride 2, padding 1 (-inf, as PyTorch's). [B, H, W, C] ->
  [B, ceil(H / 2), ceil(W / 2), C]."""
  return nn.max_pool(x, (3, 3), strides=(POOL_STRIDE, POOL_STRIDE), padding=((1, 1), (1, 1)))


def resnet50_taps(images: jax.Array, width: float, dtype: Dtype,
                  strides: tuple[int, ...] = IRN_STRIDES,
                  dilations: tuple[int, ...] = NO_DILATION,
                  sizes: jax.Array | None = None,
                  detach_after: str | None = None) -> dict[str, jax.Array]:
  """The backbone, built as submodules of the calling (compact) module, so that every network
  keeps torchvision's flat names (params['conv1'], params['layer1_0'], ...).

  images: [B, H, W, 3] normalised ("imagenet" convention). sizes: None, or [B, 2] int (height,
  width) of each image at the top-left of its canvas (models/canvas.py). Returns, in `dtype`:
  "conv1" [B, H/2, W/2, 64w] (after bn1 and ReLU, before the max pool), "stage1" [B, H/4, W/4,
  256w], "stage2" [.., H/8, .., 512w], "stage3" [.., H/16, .., 1024w], "stage4" [.., H/16, ..,
  2048w] with IRN's strides (each size rounded up; `output_strides` for others).
  detach_after: a stage ("stage2" in IRN's training forward) whose output, and so everything
  before it, gets no gradient (jax.lax.stop_gradient, IRN's `.detach()`).
  """
  if len(strides) != 4 or len(dilations) != 4:
    raise ValueError(f"strides and dilations take 4 values (conv1, layer2, layer3, layer4 / "
                     f"layer1..layer4), got {strides!r} and {dilations!r}")
  hw = images.shape[1:3]
  valid = lambda s: canvas.valid_cells(sizes, tuple(-(-n // s) for n in hw), s)  # noqa: E731
  x = canvas.zero_outside(images.astype(dtype), valid(1))
  x = conv(scaled(STEM_CHANNELS, width), 7, stride=strides[0], name="conv1", dtype=dtype)(x)
  x = nn.relu(FixedBatchNorm(dtype=dtype, name="bn1")(x))
  taps = {"conv1": x}
  stride = strides[0]
  x = canvas.zero_outside(x, valid(stride))
  x = stem_max_pool(x)
  stride *= POOL_STRIDE
  for index, (layer, layer_stride, dilation) in enumerate(
      zip(LAYERS, (1, *strides[1:]), dilations)):
    for i in range(layer.blocks):
      block_stride = layer_stride if i == 0 else 1
      x = Bottleneck(scaled(layer.planes, width), block_stride, 1 if i == 0 else dilation,
                     has_downsample(index, i, block_stride), dtype,
                     name=f"{layer.name}_{i}")(x, valid(stride))
      stride *= block_stride
    if STAGES[index] == detach_after:
      x = jax.lax.stop_gradient(x)
    taps[STAGES[index]] = x
  return taps


class ResNet50(nn.Module):
  """The ResNet-50 backbone alone (`backbone` checkpoints). `__call__(x, train=False,
  sizes=None)` -> {"conv1", "stage1", .., "stage4"} (resnet50_taps); `train` is accepted for
  the interface the other backbones share and changes nothing (no dropout, frozen statistics).

  width scales every channel count (1.0 = torchvision's, which loads its weights); dtype is the
  compute dtype, parameters and statistics stay float32; strides / dilations as IRN's ResNet.
  """
  width: float = 1.0
  dtype: Dtype = jnp.float32
  strides: tuple[int, ...] = IRN_STRIDES
  dilations: tuple[int, ...] = NO_DILATION

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               sizes: jax.Array | None = None) -> dict[str, jax.Array]:
    del train
    return resnet50_taps(x, self.width, self.dtype, self.strides, self.dilations, sizes)


class ResNet50CAMNet(CAMNet):
  """IRN's CAM network (net/resnet50_cam.py Net and CAM): ResNet-50 at stride 16 and a 1x1
  `classifier` without bias to num_classes.

  `__call__(images, train=False, sizes=None)`: images [B, H, W, 3] -> logits [B, num_classes]
  (float32) = classifier(global average pool of stage4), as Net.forward; the features of stage2
  are cut from the gradient as there (IRN's `.detach()`). No dropout.
  `cam(images, sizes=None)`: [B, ceil(H/16), ceil(W/16), num_classes] (float32) =
  relu(classifier . stage4), CAM.forward for one image; IRN's CAM also adds the flipped second
  image of its batch, which is left to the inference code (cam.py's flip passes, which so far
  assume stride 8).
  `stride`: 16 with IRN's strides, the input pixels per CAM cell.
  """
  strides: tuple[int, ...] = IRN_STRIDES

  @property
  def stride(self) -> int:
    return output_strides(self.strides)["stage4"]

  @nn.compact
  def forward(self, images: jax.Array, train: bool, output: str,
              sizes: jax.Array | None = None) -> jax.Array:
    del train  # IRN's CAM network has no dropout and frozen BatchNorm statistics.
    x = resnet50_taps(images, self.width, self.dtype, self.strides, NO_DILATION, sizes,
                      detach_after="stage2" if output != "cam" else None)["stage4"]
    classifier = conv(self.num_classes, 1, name="classifier", dtype=self.dtype,
                      kernel_init=torch_default_init)
    if output == "cam":
      return nn.relu(classifier(x).astype(jnp.float32))
    if sizes is None:
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    else:
      pooled = canvas.masked_mean(x, canvas.valid_cells(sizes, x.shape[1:3], self.stride))
    # The classifier is linear without bias: pooling first is IRN's order (gap2d, then conv).
    return classifier(pooled.astype(self.dtype))[:, 0, 0, :].astype(jnp.float32)


class ResNet50SegNet(nn.Module):
  """A segmentation network on ResNet-50 for IRN's pseudo labels (IRN itself stops at them; its
  paper trains DeepLab): the trunk at output stride 8 (SEG_STRIDES, SEG_DILATIONS) and the
  segmentation head of the other backbones (heads.segmentation_head: two 3x3 atrous
  convolutions, dilation 12), so that the pipeline's inference at stride 8 serves it as it
  serves SegNet.

  `__call__(images, train=False, sizes=None)`: images [B, H, W, 3] ("imagenet" convention) ->
  logits [B, ceil(H/8), ceil(W/8), num_classes + 1] float32 (index 0 = background).
  """
  num_classes: int = 20
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               sizes: jax.Array | None = None) -> jax.Array:
    del train  # no dropout, frozen BatchNorm statistics
    x = resnet50_taps(images, self.width, self.dtype, SEG_STRIDES, SEG_DILATIONS,
                      sizes)["stage4"]
    return segmentation_head(x, self.num_classes, self.width, self.dtype, sizes)
