"""Test inputs in the original's formats, built from its state-dict layout (not from our code).

- `manifest(key)`: the original's names and shapes, as its network files define them.
- `random_state_dict(key, width)`: random weights in those names at a narrow width (every
  channel count scaled, names identical), BN with non-trivial statistics.
- `write_mxnet_params(path, arrays, version)`: MXNet's NDArray list format, written by hand.
"""

from __future__ import annotations

import struct

import numpy as np

TINY_WIDTH = 1 / 32
NUM_CLASSES = 20

# The original's resnet38_cls state dict (PyTorch names, OIHW shapes), as its network files
# define it, written out here so that a fresh clone can run the tests. Every
# BN module also has a `num_batches_tracked` int64 scalar after its running_var (added below).
_CLS_MANIFEST = """
conv1a.weight 64x3x3x3
b2.bn_branch2a.weight 64
b2.bn_branch2a.bias 64
b2.bn_branch2a.running_mean 64
b2.bn_branch2a.running_var 64
b2.conv_branch2a.weight 128x64x3x3
b2.bn_branch2b1.weight 128
b2.bn_branch2b1.bias 128
b2.bn_branch2b1.running_mean 128
b2.bn_branch2b1.running_var 128
b2.conv_branch2b1.weight 128x128x3x3
b2.conv_branch1.weight 128x64x1x1
b2_1.bn_branch2a.weight 128
b2_1.bn_branch2a.bias 128
b2_1.bn_branch2a.running_mean 128
b2_1.bn_branch2a.running_var 128
b2_1.conv_branch2a.weight 128x128x3x3
b2_1.bn_branch2b1.weight 128
b2_1.bn_branch2b1.bias 128
b2_1.bn_branch2b1.running_mean 128
b2_1.bn_branch2b1.running_var 128
b2_1.conv_branch2b1.weight 128x128x3x3
b2_2.bn_branch2a.weight 128
b2_2.bn_branch2a.bias 128
b2_2.bn_branch2a.running_mean 128
b2_2.bn_branch2a.running_var 128
b2_2.conv_branch2a.weight 128x128x3x3
b2_2.bn_branch2b1.weight 128
b2_2.bn_branch2b1.bias 128
b2_2.bn_branch2b1.running_mean 128
b2_2.bn_branch2b1.running_var 128
b2_2.conv_branch2b1.weight 128x128x3x3
b3.bn_branch2a.weight 128
b3.bn_branch2a.bias 128
b3.bn_branch2a.running_mean 128
b3.bn_branch2a.running_var 128
b3.conv_branch2a.weight 256x128x3x3
b3.bn_branch2b1.weight 256
b3.bn_branch2b1.bias 256
b3.bn_branch2b1.running_mean 256
b3.bn_branch2b1.running_var 256
b3.conv_branch2b1.weight 256x256x3x3
b3.conv_branch1.weight 256x128x1x1
b3_1.bn_branch2a.weight 256
b3_1.bn_branch2a.bias 256
b3_1.bn_branch2a.running_mean 256
b3_1.bn_branch2a.running_var 256
b3_1.conv_branch2a.weight 256x256x3x3
b3_1.bn_branch2b1.weight 256
b3_1.bn_branch2b1.bias 256
b3_1.bn_branch2b1.running_mean 256
b3_1.bn_branch2b1.running_var 256
b3_1.conv_branch2b1.weight 256x256x3x3
b3_2.bn_branch2a.weight 256
b3_2.bn_branch2a.bias 256
b3_2.bn_branch2a.running_mean 256
b3_2.bn_branch2a.running_var 256
b3_2.conv_branch2a.weight 256x256x3x3
b3_2.bn_branch2b1.weight 256
b3_2.bn_branch2b1.bias 256
b3_2.bn_branch2b1.running_mean 256
b3_2.bn_branch2b1.running_var 256
b3_2.conv_branch2b1.weight 256x256x3x3
b4.bn_branch2a.weight 256
b4.bn_branch2a.bias 256
b4.bn_branch2a.running_mean 256
b4.bn_branch2a.running_var 256
b4.conv_branch2a.weight 512x256x3x3
b4.bn_branch2b1.weight 512
b4.bn_branch2b1.bias 512
b4.bn_branch2b1.running_mean 512
b4.bn_branch2b1.running_var 512
b4.conv_branch2b1.weight 512x512x3x3
b4.conv_branch1.weight 512x256x1x1
b4_1.bn_branch2a.weight 512
b4_1.bn_branch2a.bias 512
b4_1.bn_branch2a.running_mean 512
b4_1.bn_branch2a.running_var 512
b4_1.conv_branch2a.weight 512x512x3x3
b4_1.bn_branch2b1.weight 512
b4_1.bn_branch2b1.bias 512
b4_1.bn_branch2b1.running_mean 512
b4_1.bn_branch2b1.running_var 512
b4_1.conv_branch2b1.weight 512x512x3x3
b4_2.bn_branch2a.weight 512
b4_2.bn_branch2a.bias 512
b4_2.bn_branch2a.running_mean 512
b4_2.bn_branch2a.running_var 512
b4_2.conv_branch2a.weight 512x512x3x3
b4_2.bn_branch2b1.weight 512
b4_2.bn_branch2b1.bias 512
b4_2.bn_branch2b1.running_mean 512
b4_2.bn_branch2b1.running_var 512
b4_2.conv_branch2b1.weight 512x512x3x3
b4_3.bn_branch2a.weight 512
b4_3.bn_branch2a.bias 512
b4_3.bn_branch2a.running_mean 512
b4_3.bn_branch2a.running_var 512
b4_3.conv_branch2a.weight 512x512x3x3
b4_3.bn_branch2b1.weight 512
b4_3.bn_branch2b1.bias 512
b4_3.bn_branch2b1.running_mean 512
b4_3.bn_branch2b1.running_var 512
b4_3.conv_branch2b1.weight 512x512x3x3
b4_4.bn_branch2a.weight 512
b4_4.bn_branch2a.bias 512
b4_4.bn_branch2a.running_mean 512
b4_4.bn_branch2a.running_var 512
b4_4.conv_branch2a.weight 512x512x3x3
b4_4.bn_branch2b1.weight 512
b4_4.bn_branch2b1.bias 512
b4_4.bn_branch2b1.running_mean 512
b4_4.bn_branch2b1.running_var 512
b4_4.conv_branch2b1.weight 512x512x3x3
b4_5.bn_branch2a.weight 512
b4_5.bn_branch2a.bias 512
b4_5.bn_branch2a.running_mean 512
b4_5.bn_branch2a.running_var 512
b4_5.conv_branch2a.weight 512x512x3x3
b4_5.bn_branch2b1.weight 512
b4_5.bn_branch2b1.bias 512
b4_5.bn_branch2b1.running_mean 512
b4_5.bn_branch2b1.running_var 512
b4_5.conv_branch2b1.weight 512x512x3x3
b5.bn_branch2a.weight 512
b5.bn_branch2a.bias 512
b5.bn_branch2a.running_mean 512
b5.bn_branch2a.running_var 512
b5.conv_branch2a.weight 512x512x3x3
b5.bn_branch2b1.weight 512
b5.bn_branch2b1.bias 512
b5.bn_branch2b1.running_mean 512
b5.bn_branch2b1.running_var 512
b5.conv_branch2b1.weight 1024x512x3x3
b5.conv_branch1.weight 1024x512x1x1
b5_1.bn_branch2a.weight 1024
b5_1.bn_branch2a.bias 1024
b5_1.bn_branch2a.running_mean 1024
b5_1.bn_branch2a.running_var 1024
b5_1.conv_branch2a.weight 512x1024x3x3
b5_1.bn_branch2b1.weight 512
b5_1.bn_branch2b1.bias 512
b5_1.bn_branch2b1.running_mean 512
b5_1.bn_branch2b1.running_var 512
b5_1.conv_branch2b1.weight 1024x512x3x3
b5_2.bn_branch2a.weight 1024
b5_2.bn_branch2a.bias 1024
b5_2.bn_branch2a.running_mean 1024
b5_2.bn_branch2a.running_var 1024
b5_2.conv_branch2a.weight 512x1024x3x3
b5_2.bn_branch2b1.weight 512
b5_2.bn_branch2b1.bias 512
b5_2.bn_branch2b1.running_mean 512
b5_2.bn_branch2b1.running_var 512
b5_2.conv_branch2b1.weight 1024x512x3x3
b6.bn_branch2a.weight 1024
b6.bn_branch2a.bias 1024
b6.bn_branch2a.running_mean 1024
b6.bn_branch2a.running_var 1024
b6.conv_branch2a.weight 512x1024x1x1
b6.bn_branch2b1.weight 512
b6.bn_branch2b1.bias 512
b6.bn_branch2b1.running_mean 512
b6.bn_branch2b1.running_var 512
b6.conv_branch2b1.weight 1024x512x3x3
b6.bn_branch2b2.weight 1024
b6.bn_branch2b2.bias 1024
b6.bn_branch2b2.running_mean 1024
b6.bn_branch2b2.running_var 1024
b6.conv_branch2b2.weight 2048x1024x1x1
b6.conv_branch1.weight 2048x1024x1x1
b7.bn_branch2a.weight 2048
b7.bn_branch2a.bias 2048
b7.bn_branch2a.running_mean 2048
b7.bn_branch2a.running_var 2048
b7.conv_branch2a.weight 1024x2048x1x1
b7.bn_branch2b1.weight 1024
b7.bn_branch2b1.bias 1024
b7.bn_branch2b1.running_mean 1024
b7.bn_branch2b1.running_var 1024
b7.conv_branch2b1.weight 2048x1024x3x3
b7.bn_branch2b2.weight 2048
b7.bn_branch2b2.bias 2048
b7.bn_branch2b2.running_mean 2048
b7.bn_branch2b2.running_var 2048
b7.conv_branch2b2.weight 4096x2048x1x1
b7.conv_branch1.weight 4096x2048x1x1
bn7.weight 4096
bn7.bias 4096
bn7.running_mean 4096
bn7.running_var 4096
fc8.weight 20x4096x1x1
"""
_AFFINITY_HEADS = """
f8_3.weight 64x512x1x1
f8_4.weight 128x1024x1x1
f8_5.weight 256x4096x1x1
f9.weight 448x448x1x1
"""


def _parse(text: str) -> list[tuple[str, tuple[int, ...], str]]:
  out = []
  for line in text.strip().splitlines():
    name, dims = line.split()
    out.append((name, tuple(int(d) for d in dims.split("x")), "float32"))
    if name.endswith(".running_var"):
      out.append((name[:-len("running_var")] + "num_batches_tracked", (), "int64"))
  return out


def manifest(key: str) -> list[tuple[str, tuple[int, ...], str]]:
  """[(name, shape, dtype)] of "resnet38_cls" or "resnet38_aff" in the original's order."""
  cls = _parse(_CLS_MANIFEST)
  if key == "resnet38_cls":
    return cls
  if key == "resnet38_aff":  # the same backbone, fc8 replaced by the affinity heads.
    return [e for e in cls if e[0] != "fc8.weight"] + _parse(_AFFINITY_HEADS)
  raise KeyError(key)


def _scale_dim(d: int, width: float) -> int:
  # Kernel sizes (1, 3), RGB input (3) and the 20 classes keep their size; channels scale.
  if d in (1, 3, NUM_CLASSES):
    return d
  return max(1, int(round(d * width)))


def random_state_dict(key: str, width: float = TINY_WIDTH, seed: int = 0,
                      num_batches_tracked: bool = True) -> dict[str, np.ndarray]:
  """A state dict with the original's names at `width`; backbone-only for key "backbone"."""
  rng = np.random.default_rng(seed)
  entries = manifest("resnet38_cls" if key == "backbone" else key)
  out = {}
  for name, shape, dtype in entries:
    if key == "backbone" and name.startswith("fc8."):
      continue
    shape = tuple(_scale_dim(d, width) for d in shape)
    leaf = name.rsplit(".", 1)[1]
    if leaf == "num_batches_tracked":
      if num_batches_tracked:
        out[name] = np.array(1000, np.int64)
      continue
    if leaf == "running_var":
      value = rng.uniform(0.5, 2.0, shape)
    elif leaf == "running_mean":
      value = rng.normal(0.0, 0.2, shape)
    elif leaf == "bias":
      value = rng.normal(0.0, 0.2, shape)
    elif len(shape) == 1:  # BN scale
      value = rng.uniform(0.6, 1.4, shape)
    else:  # conv weight OIHW: He-like scale keeps activations O(1) through 38 layers.
      fan_in = shape[1] * shape[2] * shape[3]
      value = rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
    out[name] = value.astype(np.float32)
  return out


def psa_to_mxnet_name(name: str) -> str:
  """Inverse of the documented ademxapp naming, written independently for the tests."""
  param = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
           "running_var": "moving_var"}
  module, leaf = name.rsplit(".", 1)
  if module == "conv1a":
    return "arg:conv1a_weight"
  if module == "bn7":
    return ("aux:" if "running" in leaf else "arg:") + "bn7_" + param[leaf]
  block, layer = module.split(".")
  stage, _, k = block[1:].partition("_")
  pos = f"b{k}" if k else "a"
  kind, branch = layer.split("_", 1)  # "conv", "branch2a"
  if kind == "conv":
    return f"arg:res{stage}{pos}_{branch}_weight"
  prefix = "aux:" if "running" in leaf else "arg:"
  return f"{prefix}bn{stage}{pos}_{branch}_{param[leaf]}"


_FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2,
          np.dtype(np.uint8): 3, np.dtype(np.int32): 4, np.dtype(np.int8): 5,
          np.dtype(np.int64): 6}


def write_mxnet_params(path: str, arrays: dict[str, np.ndarray], version: int = 2) -> None:
  """Writes `arrays` as MXNet's `nd.save` would: version 2 (storage type), 1, or 0 (legacy)."""
  parts = [struct.pack("<QQQ", 0x112, 0, len(arrays))]
  for value in arrays.values():
    value = np.ascontiguousarray(value)
    if version == 2:
      parts.append(struct.pack("<Ii", 0xF993FAC9, 0))
    elif version == 1:
      parts.append(struct.pack("<I", 0xF993FAC8))
    if version in (1, 2):
      parts.append(struct.pack("<I", value.ndim) + struct.pack(f"<{value.ndim}q", *value.shape))
    else:
      parts.append(struct.pack("<I", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape))
    parts.append(struct.pack("<iii", 1, 0, _FLAGS[value.dtype]))  # cpu(0), type flag
    parts.append(value.astype(value.dtype.newbyteorder("<")).tobytes())
  parts.append(struct.pack("<Q", len(arrays)))
  for name in arrays:
    raw = name.encode()
    parts.append(struct.pack("<Q", len(raw)) + raw)
  with open(path, "wb") as f:
    f.write(b"".join(parts))
