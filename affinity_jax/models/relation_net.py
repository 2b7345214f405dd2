"""IRN's inter-pixel relation network (Ahn et al., CVPR 2019; github jiwoon-ahn/irn,
net/resnet50_irn.py): a frozen ResNet-50 and two branches of 1x1 convolutions on its five
levels, one predicting class boundaries B and one a displacement field D, both on the stride-4
grid.

The five inputs are the backbone's features at every level, cut from the gradient (the
backbone is never trained; IRN detaches each one). In IRN's words they are stage1 (conv1, bn1,
ReLU, max pool: 64 channels, stride 4), stage2 (layer1: 256, stride 4), stage3 (layer2: 512,
stride 8), stage4 (layer3: 1024, stride 16) and stage5 (layer4: 2048, stride 16); our
`resnet50_taps` calls the last four stage1..stage4, so here they are named "pool", "stage1" ..
"stage4" (`LEVELS`).

Each head ("fc_edge1".."fc_edge5", "fc_dp1".."fc_dp7", IRN's module names) is a 1x1
convolution without bias, a GroupNorm (eps 1e-5), a bilinear upsampling with half-pixel
centres (PyTorch's align_corners=False) where the level is coarser than the head's target, and
a ReLU, in that order (the ReLU after the upsampling, as IRN's nn.Sequential has it). Each
upsampled map is cropped at the bottom and right to the size of its target grid, as IRN
slices `[..., :h, :w]`.
- Boundary branch: fc_edge1..5 on the five levels (32 channels, 4 groups each), upsampled to
  the stride-4 grid (x1, x1, x2, x4, x4), concatenated (160 channels) and `fc_edge6`, a 1x1
  convolution with bias to one channel: the boundary logits (IRN's edge_out; B = sigmoid).
- Displacement branch: fc_dp1 (64 channels, 8 groups) on pool, fc_dp2 (128, 16) on stage1,
  fc_dp3 (256, 16) on stage2, fc_dp4 and fc_dp5 (256, 16) on stage3 and stage4 upsampled to
  the stride-8 grid (x2); fc_dp6 (256, 16) on their concatenation (768), upsampled to the
  stride-4 grid (x2); fc_dp7 on the concatenation of fc_dp1, fc_dp2 and fc_dp6 (448): 256
  channels (16 groups), ReLU, then a 1x1 convolution without bias to 2 channels ("out").
  Channel 0 is the vertical displacement (dy), channel 1 the horizontal one (dx), IRN's
  order (its displacement target is search_dst, (dy, dx) pairs). IRN's MeanShift then
  subtracts the mean displacement over the training images from the output, at inference
  only; here that 2-vector is `batch_stats/mean_shift/mean` (IRN's mean_shift.running_mean:
  zeros at init, measured after training by stages/train_aff.py's `mean_shift` as IRN measures
  it, or converted from IRN's file).

Widths: every channel count above (the backbone's too) is scaled by `width` (resnet38.scaled;
1.0 = IRN's, which loads its weights); the two output channel counts (1 and 2) never are.
`head_width`, when given, scales the heads' channels instead (the backbone's stay at `width`):
a narrow backbone with IRN's heads (head_width 1.0: 32 channels per boundary head).
GroupNorm needs its group count to divide the channels, which a scaled count may not: each
GroupNorm takes the largest divisor of its channel count that does not exceed IRN's group
count (`group_count`), IRN's count itself at width 1.0 (e.g. width 1/16: fc_edge* 2 channels
in 2 groups, fc_dp1 4 in 4, fc_dp3 16 in 16; width 3/32: fc_edge* 3 in 3, fc_dp3 24 in 12).

IRN's inference (EdgeDisplacement) pads each image with zeros at the bottom and right to
512 x 512 and runs this network on the padded canvas; GroupNorm statistics then include the
padding, which running this network on the same zero-padded canvas reproduces. There is no
`sizes` (canvas mask) argument: a masked GroupNorm would not be IRN's.

Parameter names: the backbone's are ResNet50's (conv1, bn1, layer1_0, ..., layer4_2; so
`checkpoint.merge_backbone` fills them from an ImageNet or CAM-network backbone), then
  fc_edgeK.0.weight, fc_edgeK.1.weight/.bias -> params/fc_edgeK/conv/kernel, norm/scale, bias
  fc_edge6.weight, fc_edge6.bias              -> params/fc_edge6/kernel, params/fc_edge6/bias
  fc_dpK.0.weight, fc_dpK.1.weight/.bias      -> params/fc_dpK/conv/kernel, norm/scale, bias
  fc_dp7.3.weight                             -> params/fc_dp7/out/kernel
  mean_shift.running_mean                     -> batch_stats/mean_shift/mean
(convert/torchvision.py reads IRN's res50_irn.pth into these.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from affinity_jax.models.resnet38 import conv, scaled
from affinity_jax.models.resnet50 import (EXPANSION, IRN_STRIDES, LAYERS, NO_DILATION,
                                          POOL_STRIDE, STEM_CHANNELS, output_strides,
                                          resnet50_taps, stem_max_pool)

Dtype = Any

GN_EPS = 1e-5  # PyTorch's nn.GroupNorm default, which IRN keeps.
# The backbone levels the heads read, coarsest last; "pool" is the stem after its max pool.
LEVELS = ("pool", "stage1", "stage2", "stage3", "stage4")
BOUNDARY_CHANNELS = 1
DISPLACEMENT_CHANNELS = 2  # (dy, dx)


class HeadSpec(NamedTuple):
  """One of IRN's heads at width 1.0: `features` channels out of its GroupNorm in `groups`
  groups, reading the backbone level `level` (None: the concatenation of other heads)."""
  name: str
  features: int
  groups: int
  level: str | None


BOUNDARY_HEADS: tuple[HeadSpec, ...] = tuple(
    HeadSpec(f"fc_edge{i + 1}", 32, 4, level) for i, level in enumerate(LEVELS))
BOUNDARY_OUT = "fc_edge6"  # 1x1 convolution with bias: 5 x 32 channels -> 1
DISPLACEMENT_HEADS: tuple[HeadSpec, ...] = (
    HeadSpec("fc_dp1", 64, 8, "pool"), HeadSpec("fc_dp2", 128, 16, "stage1"),
    HeadSpec("fc_dp3", 256, 16, "stage2"), HeadSpec("fc_dp4", 256, 16, "stage3"),
    HeadSpec("fc_dp5", 256, 16, "stage4"),
    HeadSpec("fc_dp6", 256, 16, None),   # on fc_dp3 + fc_dp4 + fc_dp5
    HeadSpec("fc_dp7", 256, 16, None))   # on fc_dp1 + fc_dp2 + fc_dp6, then "out" to (dy, dx)
DISPLACEMENT_INPUTS = {"fc_dp6": ("fc_dp3", "fc_dp4", "fc_dp5"),
                       "fc_dp7": ("fc_dp1", "fc_dp2", "fc_dp6")}
BOUNDARY_MODULES = frozenset([h.name for h in BOUNDARY_HEADS] + [BOUNDARY_OUT])
DISPLACEMENT_MODULES = frozenset(h.name for h in DISPLACEMENT_HEADS)
MEAN_SHIFT = "mean_shift"


def group_count(channels: int, groups: int) -> int:
  """The largest divisor of `channels` that is at most `groups` (IRN's group count): the
  GroupNorm groups of a head scaled to `channels` (IRN's count wherever it divides)."""
  if channels < 1 or groups < 1:
    raise ValueError(f"group_count needs positive channels and groups, got {channels}, {groups}")
  return max(g for g in range(1, min(channels, groups) + 1) if channels % g == 0)


def level_channels(width: float = 1.0) -> dict[str, int]:
  """Channels of each backbone level (`LEVELS`) at `width`: 64, 256, 512, 1024, 2048 at 1.0."""
  return {"pool": scaled(STEM_CHANNELS, width),
          **{f"stage{i + 1}": scaled(layer.planes * EXPANSION, width)
             for i, layer in enumerate(LAYERS)}}


def head_channels(width: float = 1.0, head_width: float | None = None
                  ) -> dict[str, tuple[int, int, int]]:
  """(input channels, output channels, GroupNorm groups) of each head on a backbone at `width`
  with heads at `head_width` (None: `width`), in IRN's order (fc_edge1..5, fc_dp1..7), then
  fc_edge6 as (input, output, 0): (160, 1, 0) at 1.0. fc_dp7's "out" convolution maps its
  output channels to DISPLACEMENT_CHANNELS."""
  levels = level_channels(width)
  head_width = width if head_width is None else head_width
  if not head_width > 0:
    raise ValueError(f"head_width must be positive, got {head_width!r}")
  out = {}
  for head in BOUNDARY_HEADS + DISPLACEMENT_HEADS:
    features = scaled(head.features, head_width)
    cin = (levels[head.level] if head.level else
           sum(out[name][1] for name in DISPLACEMENT_INPUTS[head.name]))
    out[head.name] = (cin, features, group_count(features, head.groups))
  out[BOUNDARY_OUT] = (sum(out[h.name][1] for h in BOUNDARY_HEADS), BOUNDARY_CHANNELS, 0)
  return out


def upsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
  """[B, H, W, C] -> [B, factor H, factor W, C], bilinear with half-pixel centres: PyTorch's
  nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False), border rows copied
  (both clamp the sample position at the edge). jax.image.resize's antialiasing only acts
  when shrinking."""
  if factor == 1:
    return x
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, h * factor, w * factor, c), "bilinear").astype(x.dtype)


class Head(nn.Module):
  """1x1 convolution (no bias) "conv" -> GroupNorm "norm" -> bilinear x `upsample` -> ReLU, and
  with `out_features` a last 1x1 convolution (no bias) "out" (IRN's fc_dp7).

  `__call__(x)`: x [B, H, W, C_in] -> [B, upsample H, upsample W, features (or out_features)]
  in `dtype`.
  """
  features: int
  groups: int
  upsample: int = 1
  out_features: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = conv(self.features, 1, name="conv", dtype=self.dtype)(x)
    # The variance as the mean squared deviation, as PyTorch computes it; flax's default
    # E[x^2] - E[x]^2 cancels digits where the mean is large against the spread.
    y = nn.GroupNorm(num_groups=self.groups, epsilon=GN_EPS, dtype=self.dtype,
                     use_fast_variance=False, name="norm")(y)
    y = nn.relu(upsample_bilinear(y, self.upsample))
    if self.out_features:
      y = conv(self.out_features, 1, name="out", dtype=self.dtype)(y)
    return y


class MeanShift(nn.Module):
  """IRN's MeanShift: subtracts the stored mean (batch_stats "mean", [C], zeros at init) from
  x [..., C] when not training; the identity when training."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)).value
    return x if train else x - mean.astype(x.dtype)


class RelationNet(nn.Module):
  """IRN's inter-pixel relation network (module docstring): class boundaries and displacement
  field on the stride-4 grid of a frozen ResNet-50.

  width scales every channel count (1.0 = IRN's), head_width (None: width) the heads' alone;
  dtype is the compute dtype (parameters and statistics stay float32, outputs are float32);
  strides as ResNet50's (IRN's (2, 2, 2, 1)).
  Upsampling factors are the ratios of the levels' strides (IRN's x2 and x4 with its
  strides; a coarser level's stride is always a multiple of a finer one's).

  `__call__(images, train=False)`: images [B, H, W, 3] normalised ("imagenet" convention) ->
  (edge_logits [B, h, w], displacement [B, h, w, 2]) float32, with h, w = ceil(H / 4),
  ceil(W / 4) (the grid of stage1, `stride`); displacement[..., 0] is dy, [..., 1] dx, in
  grid cells; the mean shift is subtracted only when `train` is False. No dropout; the
  backbone's features are cut from the gradient, so only the heads get one.
  """
  width: float = 1.0
  dtype: Dtype = jnp.float32
  strides: tuple[int, ...] = IRN_STRIDES
  head_width: float | None = None

  @property
  def stride(self) -> int:
    """Input pixels per output cell (4 with IRN's strides)."""
    return output_strides(self.strides)["stage1"]

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    dt = self.dtype
    taps = resnet50_taps(images, self.width, dt, self.strides, NO_DILATION)
    levels = {"pool": stem_max_pool(taps["conv1"]),
              **{name: taps[name] for name in LEVELS[1:]}}
    levels = {name: jax.lax.stop_gradient(x) for name, x in levels.items()}  # IRN's .detach()
    tap_stride = output_strides(self.strides)
    stride = dict(tap_stride, pool=tap_stride["conv1"] * POOL_STRIDE)
    channels = head_channels(self.width, self.head_width)

    def head(spec: HeadSpec, x: jax.Array, grid: str, target: str,
             out_features: int | None = None) -> jax.Array:
      """The head `spec` on x (on the grid of level `grid`), upsampled to the grid of level
      `target` and cropped to it."""
      _, features, groups = channels[spec.name]
      upsample = stride[grid] // stride[target]
      y = Head(features, groups, upsample, out_features, dt, name=spec.name)(x)
      return y[:, :levels[target].shape[1], :levels[target].shape[2]]

    # Boundary branch: every level brought to the stride-4 grid (stage1's).
    edges = [head(spec, levels[spec.level], spec.level, "stage1") for spec in BOUNDARY_HEADS]
    edge = conv(BOUNDARY_CHANNELS, 1, use_bias=True, name=BOUNDARY_OUT,
                dtype=dt)(jnp.concatenate(edges, axis=-1))

    # Displacement branch: the three coarse levels joined on the stride-8 grid (stage2's), then
    # with the two fine ones on the stride-4 grid.
    dp = {}
    for spec in DISPLACEMENT_HEADS[:5]:
      target = "stage1" if spec.level in ("pool", "stage1") else "stage2"
      dp[spec.name] = head(spec, levels[spec.level], spec.level, target)
    join = lambda name: jnp.concatenate(  # noqa: E731
        [dp[n] for n in DISPLACEMENT_INPUTS[name]], axis=-1)
    dp["fc_dp6"] = head(DISPLACEMENT_HEADS[5], join("fc_dp6"), "stage2", "stage1")
    displacement = head(DISPLACEMENT_HEADS[6], join("fc_dp7"), "stage1", "stage1",
                        DISPLACEMENT_CHANNELS)
    displacement = MeanShift(name=MEAN_SHIFT)(displacement.astype(jnp.float32), train)
    return edge[..., 0].astype(jnp.float32), displacement
