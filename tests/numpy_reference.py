"""An independent NumPy (float64, NCHW / OIHW) forward pass of the original's networks: ResNet-38
and, below, VGG-16 (network/vgg16d.py, vgg16_cls.py, vgg16_aff.py).

Written from the method's description (docs/method.md) and fed a state dict in the original's
names; it shares no code with affinity_jax.models, so agreement between the two is evidence that
both follow the spec.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5

# (block, stride, dilation of the first 3x3, dilation of the second 3x3), per the original.
BASIC_BLOCKS = (
    [("b2", 2, 1, 1), ("b2_1", 1, 1, 1), ("b2_2", 1, 1, 1),
     ("b3", 2, 1, 1), ("b3_1", 1, 1, 1), ("b3_2", 1, 1, 1),
     ("b4", 2, 1, 1)] + [(f"b4_{i}", 1, 1, 1) for i in range(1, 6)] +
    [("b5", 1, 1, 2), ("b5_1", 1, 2, 2), ("b5_2", 1, 2, 2)])
BOTTLENECK_DILATION = 4


def conv2d(x: np.ndarray, w: np.ndarray, stride: int = 1, dilation: int = 1) -> np.ndarray:
  """x [N, C, H, W], w [O, C, k, k]; zero padding dilation * (k - 1) / 2 on every side."""
  k = w.shape[-1]
  pad = dilation * (k - 1) // 2
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho = (xp.shape[2] - dilation * (k - 1) - 1) // stride + 1
  wo = (xp.shape[3] - dilation * (k - 1) - 1) // stride + 1
  cols = np.empty((x.shape[0], x.shape[1], k, k, ho, wo), x.dtype)  # im2col
  for i in range(k):
    for j in range(k):
      cols[:, :, i, j] = xp[:, :, i * dilation: i * dilation + stride * (ho - 1) + 1: stride,
                            j * dilation: j * dilation + stride * (wo - 1) + 1: stride]
  return np.einsum("ncijhw,ocij->nohw", cols, w, optimize=True)


def batch_norm(x: np.ndarray, sd: dict, prefix: str) -> np.ndarray:
  g = lambda s: np.asarray(sd[f"{prefix}.{s}"], np.float64)[None, :, None, None]  # noqa: E731
  return (x - g("running_mean")) / np.sqrt(g("running_var") + EPS) * g("weight") + g("bias")


def relu(x):
  return np.maximum(x, 0.0)


def elu(x):
  return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


def _w(sd, name):
  return np.asarray(sd[name], np.float64)


def _shortcut(sd, name, x, pre, stride):
  key = f"{name}.conv_branch1.weight"
  return conv2d(pre, _w(sd, key), stride) if key in sd else x


def basic_block(sd, name, x, stride, d1, d2):
  pre = relu(batch_norm(x, sd, f"{name}.bn_branch2a"))
  y = conv2d(pre, _w(sd, f"{name}.conv_branch2a.weight"), stride, d1)
  y = relu(batch_norm(y, sd, f"{name}.bn_branch2b1"))
  y = conv2d(y, _w(sd, f"{name}.conv_branch2b1.weight"), 1, d2)
  return y + _shortcut(sd, name, x, pre, stride), pre


def bottleneck_block(sd, name, x):
  pre = relu(batch_norm(x, sd, f"{name}.bn_branch2a"))
  y = conv2d(pre, _w(sd, f"{name}.conv_branch2a.weight"))
  y = relu(batch_norm(y, sd, f"{name}.bn_branch2b1"))
  y = conv2d(y, _w(sd, f"{name}.conv_branch2b1.weight"), 1, BOTTLENECK_DILATION)
  y = relu(batch_norm(y, sd, f"{name}.bn_branch2b2"))
  y = conv2d(y, _w(sd, f"{name}.conv_branch2b2.weight"))
  return y + _shortcut(sd, name, x, pre, 1), pre


def backbone(sd: dict, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
  """images [N, 3, H, W] (normalised) -> {"conv4", "conv5", "conv6"} [N, C, h, w]."""
  x = conv2d(np.asarray(images_nchw, np.float64), _w(sd, "conv1a.weight"))
  taps = {}
  for name, stride, d1, d2 in BASIC_BLOCKS:
    x, pre = basic_block(sd, name, x, stride, d1, d2)
    if name == "b5":
      taps["conv4"] = pre
  x, taps["conv5"] = bottleneck_block(sd, "b6", x)
  x, _ = bottleneck_block(sd, "b7", x)
  taps["conv6"] = relu(batch_norm(x, sd, "bn7"))
  return taps


def cam_logits(sd: dict, images_nchw: np.ndarray) -> np.ndarray:
  """[N, classes]: global average pool of conv6, then fc8 (no bias)."""
  pooled = backbone(sd, images_nchw)["conv6"].mean(axis=(2, 3))
  return pooled @ _w(sd, "fc8.weight")[:, :, 0, 0].T


def cams(sd: dict, images_nchw: np.ndarray) -> np.ndarray:
  """[N, classes, h, w] = relu(fc8 . conv6)."""
  return relu(conv2d(backbone(sd, images_nchw)["conv6"], _w(sd, "fc8.weight")))


def affinity_features(sd: dict, images_nchw: np.ndarray) -> np.ndarray:
  """[N, 448 w, h, w] = ELU(f9(concat(ELU(f8_3(conv4)), ELU(f8_4(conv5)), ELU(f8_5(conv6)))))."""
  taps = backbone(sd, images_nchw)
  parts = [elu(conv2d(taps[t], _w(sd, f"{h}.weight")))
           for h, t in (("f8_3", "conv4"), ("f8_4", "conv5"), ("f8_5", "conv6"))]
  return elu(conv2d(np.concatenate(parts, axis=1), _w(sd, "f9.weight")))


# --- VGG-16 (network/vgg16d.py, vgg16_cls.py, vgg16_aff.py) -------------------------------------

# The trunk in order: a convolution (3x3, bias, ReLU) as (name, dilation), or a 3x3 max pool
# padded by 1 as ("pool", stride).
VGG_TRUNK = ([("conv1_1", 1), ("conv1_2", 1), ("pool", 2), ("conv2_1", 1), ("conv2_2", 1),
              ("pool", 2)] + [(f"conv3_{i}", 1) for i in (1, 2, 3)] + [("pool", 2)] +
             [(f"conv4_{i}", 1) for i in (1, 2, 3)] + [("pool", 1)] +
             [(f"conv5_{i}", 2) for i in (1, 2, 3)])
VGG_GN_GROUPS = {"gn8_3": 8, "gn8_4": 16, "gn8_5": 32}


def max_pool3(x: np.ndarray, stride: int) -> np.ndarray:
  """3x3 max pool of [N, C, H, W], padded by 1 with -inf, output floor((H - 1) / s) + 1."""
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  ho, wo = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
  out = np.full(x.shape[:2] + (ho, wo), -np.inf)
  for i in range(3):
    for j in range(3):
      out = np.maximum(out, xp[:, :, i: i + stride * (ho - 1) + 1: stride,
                               j: j + stride * (wo - 1) + 1: stride])
  return out


def conv_bias(sd: dict, name: str, x: np.ndarray, dilation: int = 1) -> np.ndarray:
  return conv2d(x, _w(sd, f"{name}.weight"), 1, dilation) + _w(sd, f"{name}.bias")[:, None, None]


def vgg16_backbone(sd: dict, images_nchw: np.ndarray, fc6_dilation: int) -> dict[str, np.ndarray]:
  """images [N, 3, H, W] (BGR minus the mean) -> {"conv4", "conv5", "conv5fc"} [N, C, h, w]."""
  x = np.asarray(images_nchw, np.float64)
  taps = {}
  for name, arg in VGG_TRUNK:
    x = max_pool3(x, arg) if name == "pool" else relu(conv_bias(sd, name, x, arg))
    if name in ("conv4_3", "conv5_3"):
      taps[name[:5]] = x
  x = relu(conv_bias(sd, "fc6", x, fc6_dilation))
  taps["conv5fc"] = relu(conv_bias(sd, "fc7", x))
  return taps


def vgg16_cam_logits(sd: dict, images_nchw: np.ndarray) -> np.ndarray:
  """[N, classes]: fc8 at every cell, then the average over cells (the original's order)."""
  x = conv2d(vgg16_backbone(sd, images_nchw, 1)["conv5fc"], _w(sd, "fc8.weight"))
  return x.mean(axis=(2, 3))


def vgg16_cams(sd: dict, images_nchw: np.ndarray) -> np.ndarray:
  """[N, classes, h, w] = sqrt(relu(fc8 . conv5fc))."""
  return np.sqrt(relu(conv2d(vgg16_backbone(sd, images_nchw, 1)["conv5fc"],
                             _w(sd, "fc8.weight"))))


def group_norm(x: np.ndarray, sd: dict, prefix: str, groups: int) -> np.ndarray:
  """PyTorch GroupNorm of [N, C, H, W]: biased variance over each group's channels and cells."""
  n, c, h, w = x.shape
  g = x.reshape(n, groups, c // groups, h, w)
  mean = g.mean(axis=(2, 3, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(2, 3, 4), keepdims=True)
  y = ((g - mean) / np.sqrt(var + EPS)).reshape(n, c, h, w)
  return y * _w(sd, f"{prefix}.weight")[:, None, None] + _w(sd, f"{prefix}.bias")[:, None, None]


def vgg16_affinity_features(sd: dict, images_nchw: np.ndarray,
                            groups: dict[str, int] | None = None) -> np.ndarray:
  """[N, 448 w, h, w] of vgg16_aff (fc6 dilation 4, GroupNorm `groups`, default 8/16/32)."""
  groups = groups or VGG_GN_GROUPS
  taps = vgg16_backbone(sd, images_nchw, 4)
  parts = [elu(group_norm(conv2d(taps[t], _w(sd, f"f{h}.weight")), sd, f"gn{h}", groups[f"gn{h}"]))
           for h, t in (("8_3", "conv4"), ("8_4", "conv5"), ("8_5", "conv5fc"))]
  return elu(conv2d(np.concatenate(parts, axis=1), _w(sd, "f9.weight")))
