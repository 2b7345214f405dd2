"""DeepLab's fc-reduced VGG-16 (`vgg16_20M.caffemodel`) without Caffe: a protobuf wire reader.

A `.caffemodel` is one serialised `NetParameter` message (Caffe's caffe.proto). Only the field
numbers below are used; every other field is skipped, as protobuf readers do.
  NetParameter       name 1; layer 100 (LayerParameter, current); layers 2 (V1LayerParameter)
  LayerParameter     name 1, type 2 (string), blobs 7
  V1LayerParameter   name 4, type 5 (enum), blobs 6; layer 1 (an embedded V0LayerParameter)
  V0LayerParameter   name 1, type 2 (string), blobs 50
  BlobProto          shape 7 (BlobShape), data 5 (float32), double_data 8 (float64),
                     legacy dims num 1, channels 2, height 3, width 4
  BlobShape          dim 1 (int64)
Wire format: each field is a varint key (field number << 3 | wire type), then a varint (type 0),
8 bytes (1), a varint length and that many bytes (2: strings, messages, packed repeated
numbers) or 4 bytes (5). Repeated numbers come packed (one type-2 field) or unpacked (one field
per value); both are read. All numbers are little-endian.

A layer's blobs are [weight (O, I, kh, kw), bias (O,)] for a convolution; a legacy blob without
`shape` has num x channels x height x width, so a bias is 1 x 1 x 1 x O and is flattened. The
original (network/vgg16d.py `convert_caffe_to_torch`) loads the file through its prototxt,
which names conv1_1 ... conv5_3, fc6 and fc7, so Caffe ignores any other layer of the file
(an ImageNet classifier, say): those are dropped here too and listed in the metadata.
"""

from __future__ import annotations

import os

import numpy as np

from affinity_jax.convert.psa import (ConversionError, infer_width, open_input,
                                      psa_state_dict_to_variables)
from affinity_jax.models.vgg16 import TRUNK_CONVS

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
V1_NAME, V1_BLOBS, V1_EMBEDDED_V0 = 4, 6, 1
V0_NAME, V0_BLOBS = 1, 50
# NetParameter's field of the layers -> (their name field, their blobs field).
NET_LAYOUTS = {100: (1, 7), 2: (V1_NAME, V1_BLOBS)}
BLOB_SHAPE, BLOB_DATA, BLOB_DOUBLE_DATA = 7, 5, 8
BLOB_LEGACY_DIMS = (1, 2, 3, 4)  # num, channels, height, width
SHAPE_DIM = 1
TRUNK = tuple(name for name, *_ in TRUNK_CONVS)


class _Damaged(Exception):
  """Raised inside the reader; turned into a ConversionError naming the file."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if pos >= end:
      raise _Damaged("ends inside a number")
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, pos
    shift += 7
    if shift >= 70:
      raise _Damaged("a number longer than 10 bytes")


def _field(buf: memoryview, pos: int, end: int) -> tuple[int, int, object, int]:
  """The field at buf[pos:end]: (number, wire type, value, position after it); value is an int
  (types 0, 1, 5) or the (start, stop) of its bytes (type 2)."""
  key, pos = _varint(buf, pos, end)
  number, wire = key >> 3, key & 7
  if number == 0:
    raise _Damaged("a field numbered 0")
  if wire == VARINT:
    value, pos = _varint(buf, pos, end)
  elif wire in (FIXED64, FIXED32):
    size = 8 if wire == FIXED64 else 4
    if pos + size > end:
      raise _Damaged("ends inside a number")
    value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
  elif wire == LENGTH:
    size, pos = _varint(buf, pos, end)
    if pos + size > end:
      raise _Damaged(f"a field of {size} bytes runs past its end")
    value, pos = (pos, pos + size), pos + size
  else:  # 3 and 4 (groups) never occur in caffe.proto; 6 and 7 do not exist.
    raise _Damaged(f"wire type {wire}, which Caffe models never use")
  return number, wire, value, pos


def _fields(buf: memoryview, pos: int, end: int):
  """Yields every `_field` of the message in buf[pos:end]."""
  while pos < end:
    field = _field(buf, pos, end)
    pos = field[-1]
    yield field


def _unpacked_run(buf: memoryview, pos: int, end: int, key: int, size: int, dtype: str):
  """The values of the consecutive unpacked fields from `pos` that have the one-byte `key` (a
  key byte then `size` bytes each), read at once: parsing a 20M-value blob one field at a time
  would take minutes. Returns (values, position after the run)."""
  n = (end - pos) // (1 + size)
  rows = np.frombuffer(buf, np.uint8, n * (1 + size), pos).reshape(n, 1 + size)
  mismatch = np.flatnonzero(rows[:, 0] != key)
  n = int(mismatch[0]) if mismatch.size else n
  return np.ascontiguousarray(rows[:n, 1:]).view(dtype).reshape(-1), pos + n * (1 + size)


def _blob(buf: memoryview, start: int, stop: int) -> np.ndarray:
  shape, legacy, chunks = None, {}, []
  pos = start
  while pos < stop:
    number, wire, value, after = _field(buf, pos, stop)
    if number in (BLOB_DATA, BLOB_DOUBLE_DATA):
      dtype, size = ("<f4", 4) if number == BLOB_DATA else ("<f8", 8)
      if wire == LENGTH:  # packed
        a, b = value
        if (b - a) % size:
          raise _Damaged("a packed array of a size that is no multiple of its element")
        chunks.append(np.frombuffer(buf, dtype, (b - a) // size, a))
      elif wire == (FIXED32 if size == 4 else FIXED64):  # unpacked: read the whole run
        values, after = _unpacked_run(buf, pos, stop, buf[pos], size, dtype)
        chunks.append(values)
      else:
        raise _Damaged(f"blob data with wire type {wire}")
    elif number == BLOB_SHAPE and wire == LENGTH:
      shape = []
      for dim_number, dim_wire, dim, _ in _fields(buf, *value):
        if dim_number != SHAPE_DIM:
          continue
        if dim_wire == LENGTH:  # packed varints
          p, q = dim
          while p < q:
            d, p = _varint(buf, p, q)
            shape.append(d)
        else:
          shape.append(dim)
    elif number in BLOB_LEGACY_DIMS and wire == VARINT:
      legacy[number] = value
    pos = after
  data = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0,), np.float32)
  if shape is None:
    shape = [legacy.get(n, 0) for n in BLOB_LEGACY_DIMS]
    if data.size and int(np.prod(shape)) == 0:  # dims omitted: defaults of 0
      shape = [data.size]
  if int(np.prod(shape)) != data.size:
    raise _Damaged(f"a blob of shape {tuple(shape)} holds {data.size} values")
  return data.reshape(shape)


def _layer(buf: memoryview, start: int, stop: int, name_field: int,
           blobs_field: int) -> tuple[str | None, list[np.ndarray]]:
  name, blobs = None, []
  for number, wire, value, _ in _fields(buf, start, stop):
    if wire != LENGTH:
      continue
    if number == name_field:
      name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
    elif number == blobs_field:
      blobs.append(_blob(buf, *value))
    elif name_field == V1_NAME and number == V1_EMBEDDED_V0:  # V1 wrapping a V0 layer
      inner_name, inner_blobs = _layer(buf, *value, V0_NAME, V0_BLOBS)
      name, blobs = name or inner_name, blobs + inner_blobs
  return name, blobs


def read_caffemodel(in_path: str) -> dict[str, list[np.ndarray]]:
  """layer name -> its blobs (float32, in their stored shapes) for every layer with blobs."""
  with open_input(in_path) as f:
    buf = memoryview(f.read())
  layers: dict[str, list[np.ndarray]] = {}
  try:
    for number, wire, value, _ in _fields(buf, 0, len(buf)):
      if number in NET_LAYOUTS and wire == LENGTH:
        name, blobs = _layer(buf, *value, *NET_LAYOUTS[number])
        if blobs:
          if not name or name in layers:
            raise _Damaged(f"a layer with blobs named {name!r} (empty or repeated)")
          layers[name] = blobs
  except _Damaged as e:
    hint = " (a text .prototxt?)" if buf[:1].tobytes().isalpha() else ""
    raise ConversionError(f"{in_path}: not a Caffe model or truncated{hint}: {e}") from None
  if not layers:
    raise ConversionError(f"{in_path}: holds no layer with weights: not a Caffe .caffemodel")
  return layers


def caffe_to_psa_state_dict(layers: dict[str, list[np.ndarray]],
                            source: str = "Caffe model"
                            ) -> tuple[dict[str, np.ndarray], list[str]]:
  """(the trunk in the original's state-dict names, names of the layers dropped)."""
  state_dict, dropped = {}, []
  for name, blobs in layers.items():
    if name not in TRUNK:
      dropped.append(name)
      continue
    if len(blobs) != 2:
      raise ConversionError(f"{source}: layer {name} has {len(blobs)} blobs, expected a weight "
                            "and a bias")
    state_dict[f"{name}.weight"] = blobs[0]
    state_dict[f"{name}.bias"] = blobs[1].reshape(-1)
  return state_dict, sorted(dropped)


def convert_caffe(in_path: str, out_dir: str) -> dict:
  """Converts DeepLab's VGG-16 `.caffemodel` to a VGG-16 "backbone" checkpoint `out_dir`.

  Every trunk layer must be there with the original's shapes. Returns the metadata written,
  whose "dropped" lists the layers left out.
  """
  from affinity_jax import checkpoint
  state_dict, dropped = caffe_to_psa_state_dict(read_caffemodel(in_path), in_path)
  width = infer_width(state_dict, in_path, "vgg16")
  variables = psa_state_dict_to_variables(state_dict, "backbone", width=width, source=in_path,
                                          backbone="vgg16")
  metadata = dict(arch="backbone", backbone="vgg16", width=width, num_classes=None,
                  source=f"caffe {os.path.basename(in_path)}", dropped=dropped)
  checkpoint.save_variables(out_dir, variables, metadata=metadata)
  return metadata
