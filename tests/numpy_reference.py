"""An independent NumPy (float64, NCHW / OIHW) forward pass of the original's networks.

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
