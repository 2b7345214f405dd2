"""An independent NumPy (float64, NCHW / OIHW) forward pass of ResNet-50 as torchvision defines it
and IRN uses it (stride on the 3x3 convolution, strides (2, 2, 2, 1), frozen BatchNorm), and of
IRN's CAM and inter-pixel relation networks on it, fed a state dict in torchvision's names (IRN's
head names for the relation network: `relation`, `random_relation_state_dict`).

Written from torchvision's ResNet definition; shares no code with affinity_jax (convolution,
BatchNorm and the -inf padded max pool are tests/numpy_reference.py's). Also
`random_state_dict`: random weights in those names at a narrow width, with non-trivial BatchNorm
statistics, and `manifest()`: the names and shapes of torchvision's resnet50 state dict written
out by hand.
"""

from __future__ import annotations

import numpy as np

from tests.numpy_reference import batch_norm, conv2d, conv_bias, group_norm, max_pool3, relu

# (layer, bottleneck width, blocks) of ResNet-50; each block puts out 4 x its width.
LAYERS = (("layer1", 64, 3), ("layer2", 128, 4), ("layer3", 256, 6), ("layer4", 512, 3))
IRN_STRIDES = (2, 2, 2, 1)  # conv1, layer2, layer3, layer4


def manifest(width: float = 1.0, classes: int | None = None) -> list[tuple[str, tuple]]:
  """[(name, shape)] of torchvision's resnet50().state_dict() without fc and
  num_batches_tracked, in its order, channels scaled by `width`; IRN's classifier.weight at the
  end when `classes` is given."""
  c = lambda n: max(1, int(round(n * width)))  # noqa: E731
  out = [("conv1.weight", (c(64), 3, 7, 7))]

  def bn(name, n):
    out.extend((f"{name}.{s}", (n,)) for s in ("weight", "bias", "running_mean", "running_var"))

  bn("bn1", c(64))
  cin = c(64)
  for layer, planes, blocks in LAYERS:
    p, cout = c(planes), c(4 * planes)
    for i in range(blocks):
      name = f"{layer}.{i}"
      out.append((f"{name}.conv1.weight", (p, cin, 1, 1)))
      bn(f"{name}.bn1", p)
      out.append((f"{name}.conv2.weight", (p, p, 3, 3)))
      bn(f"{name}.bn2", p)
      out.append((f"{name}.conv3.weight", (cout, p, 1, 1)))
      bn(f"{name}.bn3", cout)
      if i == 0:
        out.append((f"{name}.downsample.0.weight", (cout, cin, 1, 1)))
        bn(f"{name}.downsample.1", cout)
      cin = cout
  if classes:
    out.append(("classifier.weight", (classes, cin, 1, 1)))
  return out


def random_state_dict(width: float, seed: int = 0, classes: int | None = None,
                      fc: bool = False) -> dict[str, np.ndarray]:
  """float32 weights in torchvision's names: He-scaled kernels, BatchNorm weight around 1, bias,
  mean around 0 and var in [0.5, 2] (so the statistics matter); `fc` adds ImageNet's fc."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in manifest(width, classes):
    if name.endswith("running_var"):
      value = rng.uniform(0.5, 2.0, shape)
    elif name.endswith("running_mean"):
      value = rng.normal(0.0, 0.3, shape)
    elif len(shape) == 1 and name.endswith(".weight"):
      value = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 1:
      value = rng.normal(0.0, 0.2, shape)
    else:
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    sd[name] = value.astype(np.float32)
  if fc:
    sd["fc.weight"] = rng.normal(0.0, 0.01, (1000, sd["layer4.2.conv3.weight"].shape[0]))
    sd["fc.weight"] = sd["fc.weight"].astype(np.float32)
    sd["fc.bias"] = np.zeros((1000,), np.float32)
  return sd


def _w(sd, name):
  return np.asarray(sd[name], np.float64)


def bottleneck(sd: dict, name: str, x: np.ndarray, stride: int) -> np.ndarray:
  """torchvision's Bottleneck (v1.5): 1x1, 3x3 with the stride, 1x1; projection if present."""
  y = relu(batch_norm(conv2d(x, _w(sd, f"{name}.conv1.weight")), sd, f"{name}.bn1"))
  y = relu(batch_norm(conv2d(y, _w(sd, f"{name}.conv2.weight"), stride), sd, f"{name}.bn2"))
  y = batch_norm(conv2d(y, _w(sd, f"{name}.conv3.weight")), sd, f"{name}.bn3")
  if f"{name}.downsample.0.weight" in sd:
    x = batch_norm(conv2d(x, _w(sd, f"{name}.downsample.0.weight"), stride), sd,
                   f"{name}.downsample.1")
  return relu(y + x)


def stages(sd: dict, images_nchw: np.ndarray,
           strides: tuple[int, ...] = IRN_STRIDES) -> dict[str, np.ndarray]:
  """images [N, 3, H, W] -> {"conv1" (after bn1 and ReLU), "stage1" .. "stage4"} [N, C, h, w]."""
  x = conv2d(np.asarray(images_nchw, np.float64), _w(sd, "conv1.weight"), strides[0])
  x = relu(batch_norm(x, sd, "bn1"))
  out = {"conv1": x}
  x = max_pool3(x, 2)
  for k, ((layer, _, blocks), stride) in enumerate(zip(LAYERS, (1, *strides[1:]))):
    for i in range(blocks):
      x = bottleneck(sd, f"{layer}.{i}", x, stride if i == 0 else 1)
    out[f"stage{k + 1}"] = x
  return out


def cam_logits(sd: dict, images_nchw: np.ndarray) -> np.ndarray:
  """[N, classes]: IRN's Net.forward, gap2d of stage4 then the 1x1 classifier."""
  pooled = stages(sd, images_nchw)["stage4"].mean(axis=(2, 3))
  return pooled @ _w(sd, "classifier.weight")[:, :, 0, 0].T


def cams(sd: dict, images_nchw: np.ndarray) -> np.ndarray:
  """[N, classes, h, w] = relu(classifier . stage4) at stride 16 (one image of IRN's CAM)."""
  return relu(conv2d(stages(sd, images_nchw)["stage4"], _w(sd, "classifier.weight")))


# --- IRN's inter-pixel relation network (net/resnet50_irn.py), from the paper's description
# and the module layout of IRN's Net: (name, output channels, GroupNorm groups) at width 1.0 ---
RELATION_EDGE = (("fc_edge1", 32, 4), ("fc_edge2", 32, 4), ("fc_edge3", 32, 4),
                 ("fc_edge4", 32, 4), ("fc_edge5", 32, 4))
RELATION_DP = (("fc_dp1", 64, 8), ("fc_dp2", 128, 16), ("fc_dp3", 256, 16), ("fc_dp4", 256, 16),
               ("fc_dp5", 256, 16), ("fc_dp6", 256, 16), ("fc_dp7", 256, 16))


def groups_at(channels: int, groups: int) -> int:
  """GroupNorm groups of a head narrowed to `channels`: the largest divisor <= IRN's count."""
  return next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)


def relation_manifest(width: float = 1.0, head_width: float | None = None
                      ) -> list[tuple[str, tuple]]:
  """[(name, shape)] of the heads of IRN's relation Net (its state-dict order, without the
  aliases and the backbone), the backbone's channels scaled by `width`, the heads' by
  `head_width` (None: `width`)."""
  b = lambda n: max(1, int(round(n * width)))  # noqa: E731
  hw = width if head_width is None else head_width
  c = lambda n: max(1, int(round(n * hw)))  # noqa: E731
  levels = (b(64), b(256), b(512), b(1024), b(2048))  # max pool, layer1 .. layer4
  out = [("mean_shift.running_mean", (2,))]

  def head(name, cin, cout):
    out.extend([(f"{name}.0.weight", (cout, cin, 1, 1)), (f"{name}.1.weight", (cout,)),
                (f"{name}.1.bias", (cout,))])

  for (name, cout, _), cin in zip(RELATION_EDGE, levels):
    head(name, cin, c(cout))
  out += [("fc_edge6.weight", (1, 5 * c(32), 1, 1)), ("fc_edge6.bias", (1,))]
  dp = [c(n) for _, n, _ in RELATION_DP]
  for (name, _, _), cin, cout in zip(RELATION_DP, list(levels) + [dp[2] + dp[3] + dp[4],
                                                                  dp[0] + dp[1] + dp[5]], dp):
    head(name, cin, cout)
  out.append(("fc_dp7.3.weight", (2, dp[6], 1, 1)))
  return out


def random_relation_state_dict(width: float, seed: int = 0, head_width: float | None = None
                               ) -> dict[str, np.ndarray]:
  """float32 weights of IRN's relation Net in its canonical names: the backbone's as
  `random_state_dict` (no fc), the heads' (at `head_width`, None: `width`) He-scaled, GroupNorm
  weight around 1 and bias, a non-zero fc_edge6 bias and mean shift."""
  sd = random_state_dict(width, seed)
  rng = np.random.default_rng(seed + 1000)
  for name, shape in relation_manifest(width, head_width):
    if len(shape) == 4:
      value = rng.normal(0.0, np.sqrt(2.0 / shape[1]), shape)
    elif name.endswith(".1.weight"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # GroupNorm biases, fc_edge6's bias, the mean shift
      value = rng.normal(0.0, 0.3, shape)
    sd[name] = value.astype(np.float32)
  return sd


def upsample_bilinear(x: np.ndarray, factor: int) -> np.ndarray:
  """[N, C, H, W] -> [N, C, fH, fW], PyTorch's bilinear with align_corners=False: output cell o
  samples the input at (o + 0.5) / f - 0.5, clamped below at 0 and its right neighbour at the
  last cell."""
  def along(x, axis):
    n = x.shape[axis]
    src = np.maximum((np.arange(n * factor) + 0.5) / factor - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    lam = src - lo
    shape = [1] * x.ndim
    shape[axis] = -1
    return (np.take(x, lo, axis) * (1 - lam).reshape(shape)
            + np.take(x, hi, axis) * lam.reshape(shape))
  return along(along(x, 2), 3)


def relation(sd: dict, images_nchw: np.ndarray, train: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
  """IRN's relation Net: images [N, 3, H, W] -> (edge logits [N, 1, h, w], displacement
  [N, 2, h, w]) on the stride-4 grid, the mean shift subtracted unless `train`."""
  taps = stages(sd, images_nchw)
  levels = [max_pool3(taps["conv1"], 2)] + [taps[f"stage{i}"] for i in range(1, 5)]

  def head(name, x, groups, factor=1):
    y = conv2d(x, _w(sd, f"{name}.0.weight"))
    y = group_norm(y, sd, f"{name}.1", groups_at(y.shape[1], groups))
    return relu(upsample_bilinear(y, factor) if factor > 1 else y)

  def crop(x, like):
    return x[:, :, :like.shape[2], :like.shape[3]]

  fine, mid = levels[1], levels[2]
  edges = [crop(head(name, x, g, f), fine)
           for (name, _, g), x, f in zip(RELATION_EDGE, levels, (1, 1, 2, 4, 4))]
  edge = conv_bias(sd, "fc_edge6", np.concatenate(edges, axis=1))
  (n1, _, g1), (n2, _, g2), (n3, _, g3), (n4, _, g4), (n5, _, g5), (n6, _, g6), (n7, _, g7) = (
      RELATION_DP)
  dp1, dp2, dp3 = head(n1, levels[0], g1), head(n2, levels[1], g2), head(n3, levels[2], g3)
  dp4, dp5 = crop(head(n4, levels[3], g4, 2), mid), crop(head(n5, levels[4], g5, 2), mid)
  dp6 = crop(head(n6, np.concatenate([dp3, dp4, dp5], axis=1), g6, 2), fine)
  dp = conv2d(head(n7, np.concatenate([dp1, dp2, dp6], axis=1), g7), _w(sd, "fc_dp7.3.weight"))
  if not train:
    dp = dp - _w(sd, "mean_shift.running_mean")[None, :, None, None]
  return edge, dp
