"""ResNet-38 (model A1 of Wu, Shen and van den Hengel, "Wider or Deeper", 2016) at output stride 8.

Pre-activation residual blocks (frozen BN -> ReLU -> conv), no convolution biases. Module names
are the PyTorch original's state-dict names (`conv1a`, `b2`, `b2_1`, ..., `b7`, `bn7`; inside a
block `bn_branch2a`, `conv_branch2a`, ..., `conv_branch1`), so that weight conversion is a plain
renaming. All convolution padding is explicit and symmetric, as PyTorch's: 'SAME' would pad a
stride-2 convolution on the bottom/right only and shift every later feature by half a pixel.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from affinity_jax.compilation import jit
from affinity_jax.models import canvas, convolution

Dtype = Any

BN_EPS = 1e-5


def scaled(channels: int, width: float) -> int:
  """The original's channel count `channels` scaled by `width` (rounded, at least 1)."""
  return max(1, int(round(channels * width)))


class BlockSpec(NamedTuple):
  """One residual block of the original, in its channel counts at width 1.0.

  kind: "basic" (two 3x3 convs) or "bottleneck" (1x1 -> 3x3 -> 1x1).
  stride: of the first convolution and of the shortcut projection.
  first_dilation / dilation: of the first and of the second 3x3 convolution ("basic"), or of
    the 3x3 convolution ("bottleneck", first_dilation unused).
  dropout: channel-dropout rate inside a bottleneck block (training only).
  """
  name: str
  kind: str
  in_channels: int
  mid_channels: int
  out_channels: int
  stride: int = 1
  first_dilation: int = 1
  dilation: int = 1
  dropout: float = 0.0


# The backbone as the original builds it. b5 keeps stride 1 and dilates instead (stride 8).
BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec("b2", "basic", 64, 128, 128, stride=2),
    BlockSpec("b2_1", "basic", 128, 128, 128),
    BlockSpec("b2_2", "basic", 128, 128, 128),
    BlockSpec("b3", "basic", 128, 256, 256, stride=2),
    BlockSpec("b3_1", "basic", 256, 256, 256),
    BlockSpec("b3_2", "basic", 256, 256, 256),
    BlockSpec("b4", "basic", 256, 512, 512, stride=2),
    BlockSpec("b4_1", "basic", 512, 512, 512),
    BlockSpec("b4_2", "basic", 512, 512, 512),
    BlockSpec("b4_3", "basic", 512, 512, 512),
    BlockSpec("b4_4", "basic", 512, 512, 512),
    BlockSpec("b4_5", "basic", 512, 512, 512),
    BlockSpec("b5", "basic", 512, 512, 1024, first_dilation=1, dilation=2),
    BlockSpec("b5_1", "basic", 1024, 512, 1024, first_dilation=2, dilation=2),
    BlockSpec("b5_2", "basic", 1024, 512, 1024, first_dilation=2, dilation=2),
    BlockSpec("b6", "bottleneck", 1024, 512, 2048, dilation=4, dropout=0.3),
    BlockSpec("b7", "bottleneck", 2048, 1024, 4096, dilation=4, dropout=0.5),
)
STEM_CHANNELS = 64
CONV6_CHANNELS = 4096


def block_convs(spec: BlockSpec) -> list[tuple[str, int, int, int]]:
  """(conv name, kernel size, in channels, out channels) of a block at width 1.0, in order."""
  if spec.kind == "basic":
    convs = [("conv_branch2a", 3, spec.in_channels, spec.mid_channels),
             ("conv_branch2b1", 3, spec.mid_channels, spec.out_channels)]
  else:
    quarter, half = spec.out_channels // 4, spec.out_channels // 2
    convs = [("conv_branch2a", 1, spec.in_channels, quarter),
             ("conv_branch2b1", 3, quarter, half),
             ("conv_branch2b2", 1, half, spec.out_channels)]
  if has_projection(spec):
    convs.append(("conv_branch1", 1, spec.in_channels, spec.out_channels))
  return convs


def block_bns(spec: BlockSpec) -> list[tuple[str, int]]:
  """(BN name, channels) of a block at width 1.0: the BN before each main-branch conv."""
  return [("bn_" + name[len("conv_"):], cin) for name, _, cin, _ in block_convs(spec)
          if name != "conv_branch1"]


def has_projection(spec: BlockSpec) -> bool:
  return spec.in_channels != spec.out_channels or spec.stride != 1


# PyTorch's default convolution init (kaiming-uniform with a = sqrt(5)); the backbone is meant
# to be loaded from ImageNet weights, so this only matters for from-scratch runs and tests.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Conv(nn.Module):
  """A convolution padded symmetrically by dilation * (kernel - 1) / 2 on each side, as PyTorch;
  with stride 2 this gives ceil(H / 2) outputs for every H (odd sizes included).

  Parameters as nn.Conv's: 'kernel' [k, k, C_in, features] (HWIO) and, with use_bias, 'bias'
  [features], both float32; the arithmetic runs in `dtype`. `__call__`: x [B, H, W, C_in] ->
  [B, H', W', features].

  A 1x1 kernel is applied as a matrix product over the channels (`convolution.pointwise`,
  after subsampling for stride 2): the same numbers, but XLA:CPU differentiates a dot into two
  matrix products, while the kernel gradient of a 1x1 convolution becomes a convolution with an
  H x W window, about 3.5x slower (2048 -> 4096 channels, 2 x 28 x 28 positions: 1.26 s against
  4.5 s). The bias is added by `convolution.add_bias`.
  """
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    if k == 1:
      if self.stride > 1:
        # The subsampled input is made a value of its own: XLA:GPU (jax 0.11.2) aborted fusing
        # the strided slice into a Triton GEMM ("triton_tiling_propagation.cc:703 Check failed:
        # subdim_size_accumulator == dim_size (50176 vs. 448)", experiments/RESULTS.md,
        # "On a GPU, second lease"). The numbers are the same.
        x = jax.lax.optimization_barrier(x[:, ::self.stride, ::self.stride])
      y = convolution.pointwise(x, kernel[0, 0])
    else:
      y = convolution.conv2d(x, kernel, self.stride, self.dilation)
    if self.use_bias:
      y = convolution.add_bias(y, self.param("bias", nn.initializers.zeros_init(),
                                             (self.features,), jnp.float32).astype(self.dtype))
    return y


def conv(features: int, kernel: int, *, stride: int = 1, dilation: int = 1, name: str,
         dtype: Dtype, use_bias: bool = False,
         kernel_init: Callable = torch_default_init) -> Conv:
  """A `Conv` named `name` (PyTorch padding; float32 parameters, `dtype` arithmetic)."""
  return Conv(features, kernel, stride=stride, dilation=dilation, use_bias=use_bias,
              dtype=dtype, kernel_init=kernel_init, name=name)


class FrozenBatchNorm(nn.Module):
  """Inference-mode batch norm: y = (x - mean) / sqrt(var + eps) * scale + bias, stored statistics.

  The four arrays live in the 'batch_stats' collection and are never trained nor updated (the
  original freezes every BN), so `params` holds only convolution kernels. Applied as one
  per-channel multiply-add so that a later pass can fold it into the neighbouring convolution.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C] in `dtype`."""
    c = x.shape[-1]
    scale = self.variable("batch_stats", "scale", lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), jnp.float32)).value
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32)).value
    # Folded in float32, then applied in the compute dtype.
    mult = scale * jax.lax.rsqrt(var + BN_EPS)
    shift = bias - mean * mult
    return x * mult.astype(self.dtype) + shift.astype(self.dtype)


def channel_dropout(x: jax.Array, rate: float, train: bool, name: str) -> jax.Array:
  """Dropout of whole channels, one mask per example (PyTorch Dropout2d); x: [B, H, W, C]."""
  return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train, name=name)(x)


def bn_relu(x: jax.Array, name: str, dtype: Dtype) -> jax.Array:
  return nn.relu(FrozenBatchNorm(dtype=dtype, name=name)(x))


def residual_block(x: jax.Array, spec: BlockSpec, width: float, dtype: Dtype, train: bool,
                   valid_in: jax.Array | None = None,
                   valid_out: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One pre-activation block, built inside the calling module (names under `spec.name`).

  valid_in / valid_out: [B, h, w, 1] bool (canvas.valid_cells) at the block's input and output
  resolution, or None; activations outside are zeroed before each 3x3 convolution.
  Returns (output, the block's BN-ReLU input activation), the latter being the taps conv4/conv5.
  """
  return _Block(spec=spec, width=width, dtype=dtype, name=spec.name)(x, train, valid_in,
                                                                     valid_out)


class _Block(nn.Module):
  spec: BlockSpec
  width: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, valid_in: jax.Array | None,
               valid_out: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    s, w, dt = self.spec, self.width, self.dtype
    pre = bn_relu(x, "bn_branch2a", dt)
    if s.kind == "basic":  # A bottleneck's first convolutions are 1x1.
      pre = canvas.zero_outside(pre, valid_in)
    shortcut = (conv(scaled(s.out_channels, w), 1, stride=s.stride, name="conv_branch1",
                     dtype=dt)(pre) if has_projection(s) else x)
    if s.kind == "basic":
      y = conv(scaled(s.mid_channels, w), 3, stride=s.stride, dilation=s.first_dilation,
               name="conv_branch2a", dtype=dt)(pre)
      y = canvas.zero_outside(bn_relu(y, "bn_branch2b1", dt), valid_out)
      y = conv(scaled(s.out_channels, w), 3, dilation=s.dilation, name="conv_branch2b1",
               dtype=dt)(y)
    else:
      y = conv(scaled(s.out_channels // 4, w), 1, stride=s.stride, name="conv_branch2a",
               dtype=dt)(pre)
      y = bn_relu(y, "bn_branch2b1", dt)
      y = canvas.zero_outside(channel_dropout(y, s.dropout, train, "dropout_2b1"), valid_out)
      y = conv(scaled(s.out_channels // 2, w), 3, dilation=s.dilation, name="conv_branch2b1",
               dtype=dt)(y)
      y = bn_relu(y, "bn_branch2b2", dt)
      y = channel_dropout(y, s.dropout, train, "dropout_2b2")
      y = conv(scaled(s.out_channels, w), 1, name="conv_branch2b2", dtype=dt)(y)
    return y + shortcut, pre


def resnet38_taps(images: jax.Array, width: float, dtype: Dtype, train: bool,
                  sizes: jax.Array | None = None) -> dict[str, jax.Array]:
  """The backbone, built as submodules of the calling (compact) module so that every network
  keeps the original's flat names (params['conv1a'], params['b2'], ..., batch_stats['bn7']).

  images: [B, H, W, 3] normalised. sizes: None, or [B, 2] int (height, width) of each image at
  the top-left of its canvas: the taps on its cells are then those of the unpadded image
  (models/canvas.py); outside them they are unspecified. Returns taps at stride 8
  (h = ceil(ceil(ceil(H/2)/2)/2)): "conv4" [B, h, w, 512w], "conv5" [B, h, w, 1024w],
  "conv6" [B, h, w, 4096w], in `dtype`.
  """
  hw = images.shape[1:3]
  valid = {s: canvas.valid_cells(sizes, tuple(-(-n // s) for n in hw), s) for s in (1, 2, 4, 8)}
  x = canvas.zero_outside(images.astype(dtype), valid[1])
  x = conv(scaled(STEM_CHANNELS, width), 3, name="conv1a", dtype=dtype)(x)
  taps = {}
  stride = 1
  for spec in BLOCKS:
    x, pre = residual_block(x, spec, width, dtype, train, valid[stride],
                            valid[stride * spec.stride])
    stride *= spec.stride
    if spec.name == "b5":
      taps["conv4"] = pre
    elif spec.name == "b6":
      taps["conv5"] = pre
  taps["conv6"] = bn_relu(x, "bn7", dtype)
  return taps


class ResNet38(nn.Module):
  """The ResNet-38 backbone alone. `__call__(x, train=False, sizes=None)` -> {"conv4",
  "conv5", "conv6"}; `sizes` [B, 2] makes a canvas forward exact (models/canvas.py).

  width scales every channel count (1.0 = the original, which loads its weights).
  dtype is the compute dtype; parameters and BN statistics stay float32.
  """
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               sizes: jax.Array | None = None) -> dict[str, jax.Array]:
    """x: [B, H, W, 3] normalised images -> taps, each [B, h, w, C] at stride 8; sizes
    [B, 2] (optional): each image's (height, width) on its canvas (resnet38_taps)."""
    return resnet38_taps(x, self.width, self.dtype, train, sizes)


def calibrate_batch_norm(model, variables: dict, images) -> dict:
  """Sets every FrozenBatchNorm's mean/var to the statistics of its input on `images`.

  One forward pass in which each BatchNorm first records the per-channel mean and variance of
  what reaches it and then normalises with them, so every later layer sees the already
  calibrated earlier ones (sequential calibration in a single pass). Scale and bias stay as
  initialised (1, 0). Used only for from-scratch training (the synthetic default).
  """
  def record_statistics(next_fun, args, kwargs, context):
    if isinstance(context.module, FrozenBatchNorm) and context.method_name == "__call__":
      x = args[0].astype(jnp.float32)
      context.module.put_variable("batch_stats", "mean", x.mean(axis=(0, 1, 2)))
      context.module.put_variable("batch_stats", "var", x.var(axis=(0, 1, 2)))
    return next_fun(*args, **kwargs)

  @jit
  def calibrate(variables, images):
    with nn.intercept_methods(record_statistics):
      _, updated = model.apply(variables, images, mutable=["batch_stats"])
    return updated["batch_stats"]

  return {"params": variables["params"],
          "batch_stats": calibrate(variables, jnp.asarray(images, jnp.float32))}
