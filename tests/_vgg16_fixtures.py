"""VGG-16 test inputs in the original's formats, written out here (not derived from our code).

- `manifest(key)`: the state-dict names and shapes of the original's network/vgg16_cls.py and
  vgg16_aff.py (on network/vgg16d.py), in their registration order.
- `random_state_dict(key, width)`: random weights in those names at a narrow width (channel
  counts scaled, names identical), with non-trivial GroupNorm scale and shift.
- `caffemodel(layers, layout)`: a Caffe NetParameter written byte by byte from the protobuf
  wire format (field numbers of Caffe's caffe.proto), in the V2 (`layer`) or V1 (`layers`)
  layout.
"""

from __future__ import annotations

import struct

import numpy as np

TINY_WIDTH = 1 / 8
NUM_CLASSES = 20

_TRUNK = """
conv1_1 64x3x3x3
conv1_2 64x64x3x3
conv2_1 128x64x3x3
conv2_2 128x128x3x3
conv3_1 256x128x3x3
conv3_2 256x256x3x3
conv3_3 256x256x3x3
conv4_1 512x256x3x3
conv4_2 512x512x3x3
conv4_3 512x512x3x3
conv5_1 512x512x3x3
conv5_2 512x512x3x3
conv5_3 512x512x3x3
fc6 1024x512x3x3
fc7 1024x1024x1x1
"""
_AFFINITY = """
f8_3.weight 64x512x1x1
f8_4.weight 128x512x1x1
f8_5.weight 256x1024x1x1
gn8_3.weight 64
gn8_3.bias 64
gn8_4.weight 128
gn8_4.bias 128
gn8_5.weight 256
gn8_5.bias 256
f9.weight 448x448x1x1
"""


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split("x"))


def manifest(key: str) -> list[tuple[str, tuple[int, ...]]]:
  """[(name, shape)] of "vgg16d" (the trunk), "vgg16_cls" or "vgg16_aff", in order."""
  out = []
  for line in _TRUNK.strip().splitlines():
    name, dims = line.split()
    out += [(f"{name}.weight", _dims(dims)), (f"{name}.bias", _dims(dims)[:1])]
  if key == "vgg16_cls":
    out.append(("fc8.weight", (NUM_CLASSES, 1024, 1, 1)))
  elif key == "vgg16_aff":
    out += [(name, _dims(dims)) for name, dims in map(str.split, _AFFINITY.strip().splitlines())]
  elif key != "vgg16d":
    raise KeyError(key)
  return out


def _scale(d: int, width: float) -> int:
  # Kernel sizes (1, 3), the BGR input (3) and the 20 classes keep their size; channels scale.
  return d if d in (1, 3, NUM_CLASSES) else max(1, int(round(d * width)))


def random_state_dict(key: str, width: float = TINY_WIDTH, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in manifest(key):
    shape = tuple(_scale(d, width) for d in shape)
    if len(shape) == 4:  # He scale: no BatchNorm keeps a plain VGG's activations O(1).
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif name.startswith("gn") and name.endswith(".weight"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # convolution and GroupNorm biases
      value = rng.normal(0.0, 0.2, shape)
    out[name] = value.astype(np.float32)
  return out


# --- protobuf wire format ------------------------------------------------------------------------

def varint(n: int) -> bytes:
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def key(number: int, wire: int) -> bytes:
  return varint(number << 3 | wire)


def length_field(number: int, payload: bytes) -> bytes:
  return key(number, 2) + varint(len(payload)) + payload


def blob(array: np.ndarray, layout: str) -> bytes:
  """A BlobProto: V2 with BlobShape (field 7, packed int64 dims) and packed float data (field
  5); V1 with the legacy num/channels/height/width (fields 1-4, a bias as 1x1x1xO) and
  unpacked floats (one fixed32 field 5 per value)."""
  array = np.asarray(array, "<f4")
  if layout == "v2":
    dims = b"".join(varint(d) for d in array.shape)
    return (length_field(7, length_field(1, dims)) +
            length_field(5, array.tobytes()))
  legacy = (1,) * (4 - array.ndim) + array.shape
  head = b"".join(key(n, 0) + varint(d) for n, d in zip((1, 2, 3, 4), legacy))
  return head + b"".join(key(5, 5) + struct.pack("<f", v) for v in array.reshape(-1))


def caffemodel(layers: dict[str, list[np.ndarray]], layout: str = "v2",
               extra: dict[str, str] | None = None) -> bytes:
  """A NetParameter: name (1), then per layer a LayerParameter (field 100: name 1, type 2,
  blobs 7) or a V1LayerParameter (field 2: name 4, type 5 = enum 4 CONVOLUTION, blobs 6).
  `extra`: blob-less layers name -> type, e.g. ReLUs, as real files have them."""
  out = length_field(1, b"VGG_ILSVRC_16_layers")
  entries = [(name, blobs, "Convolution") for name, blobs in layers.items()]
  entries += [(name, [], kind) for name, kind in (extra or {}).items()]
  for name, blobs, kind in entries:
    if layout == "v2":
      body = length_field(1, name.encode()) + length_field(2, kind.encode())
      body += b"".join(length_field(7, blob(b, layout)) for b in blobs)
      out += length_field(100, body)
    else:
      body = length_field(4, name.encode()) + key(5, 0) + varint(4 if blobs else 18)
      body += b"".join(length_field(6, blob(b, layout)) for b in blobs)
      out += length_field(2, body)
  return out
