"""An independent NumPy (float64, NCHW / OIHW) forward pass of ResNet-50 as torchvision defines it
and IRN uses it (stride on the 3x3 convolution, strides (2, 2, 2, 1), frozen BatchNorm), and of
IRN's CAM network on it, fed a state dict in torchvision's names.

Written from torchvision's ResNet definition; shares no code with affinity_jax (convolution,
BatchNorm and the -inf padded max pool are tests/numpy_reference.py's). Also
`random_state_dict`: random weights in those names at a narrow width, with non-trivial BatchNorm
statistics, and `manifest()`: the names and shapes of torchvision's resnet50 state dict written
out by hand.
"""

from __future__ import annotations

import numpy as np

from tests.numpy_reference import batch_norm, conv2d, max_pool3, relu

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
