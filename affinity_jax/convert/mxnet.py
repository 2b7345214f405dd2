"""The ImageNet ResNet-38 of ademxapp (`ilsvrc-cls_rna-a1_cls1000_ep-0001.params`) without MXNet.

The file format (MXNet's `NDArray` list save, little-endian), as read here with numpy only:
  uint64 0x112 (list magic), uint64 reserved,
  uint64 count, then `count` arrays, each:
    uint32 magic: 0xF993FAC9 (v2: then int32 storage type, 0 = dense), or 0xF993FAC8 (v1);
      then uint32 ndim and ndim int64 dims. Files older than v1 have no magic: the first
      uint32 is ndim, followed by ndim uint32 dims.
    (nothing more if ndim == 0) int32 dev_type, int32 dev_id, int32 type flag
      (0 float32, 1 float64, 2 float16, 3 uint8, 4 int32, 5 int8, 6 int64), raw data (C order).
  uint64 count, then `count` names, each uint64 length + bytes ("arg:..." / "aux:...").

Names of ademxapp's model A1 -> the original's state-dict names (the blocks are numbered by
stage; the first block of a stage is "a", the following ones "b1", "b2", ...):
  conv1a_weight                         -> conv1a.weight
  res{S}a_branch{B}_weight              -> b{S}.conv_branch{B}.weight        (B: 1, 2a, 2b1, 2b2)
  res{S}b{K}_branch{B}_weight           -> b{S}_{K}.conv_branch{B}.weight
  bn{S}a_branch{B}_{P}, bn{S}b{K}_...   -> b{S}[_{K}].bn_branch{B}.{Q}
  bn7_{P}                               -> bn7.{Q}
with P -> Q: gamma -> weight, beta -> bias, moving_mean / mean -> running_mean,
moving_var / var -> running_var. E.g. res2b1 -> b2_1, res4b5 -> b4_5, res6a -> b6, res7a -> b7.
The 1000-class ImageNet classifier (`linear1000_*`, or any `fc*` / `linear*`) is dropped and
reported; any other name is an error.
"""

from __future__ import annotations

import os
import re
from typing import BinaryIO

import numpy as np

from affinity_jax.convert.psa import (ConversionError, infer_width, open_input,
                                      psa_state_dict_to_variables)

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
DENSE_STORAGE = 0
TYPE_FLAGS = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32,
              5: np.int8, 6: np.int64}
MAX_NDIM = 32

_BN_PARAM = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
             "mean": "running_mean", "moving_var": "running_var", "var": "running_var"}
_CONV = re.compile(r"res(\d)(a|b\d+)_branch(1|2a|2b1|2b2)_weight")
_BN = re.compile(r"bn(\d)(a|b\d+)_branch(2a|2b1|2b2)_(gamma|beta|moving_mean|moving_var|mean|var)")
_BN7 = re.compile(r"bn7_(gamma|beta|moving_mean|moving_var|mean|var)")
_CLASSIFIER = re.compile(r"(linear|fc)\w*")


class _Reader:
  """Little-endian reads that raise ConversionError (naming the file) when it ends early."""

  def __init__(self, f: BinaryIO, path: str):
    self.f, self.path = f, path

  def bytes(self, n: int, what: str) -> bytes:
    data = self.f.read(n)
    if len(data) != n:
      raise ConversionError(f"{self.path}: truncated MXNet file (ended while reading {what})")
    return data

  def scalar(self, dtype: str, what: str) -> int:
    dt = np.dtype(dtype).newbyteorder("<")
    return int(np.frombuffer(self.bytes(dt.itemsize, what), dt)[0])

  def array(self, dtype, count: int, what: str) -> np.ndarray:
    dt = np.dtype(dtype).newbyteorder("<")
    return np.frombuffer(self.bytes(dt.itemsize * count, what), dt, count)


def _read_ndarray(r: _Reader, index: int) -> np.ndarray:
  what = f"array {index}"
  head = r.scalar("u4", what + " header")
  if head in (NDARRAY_V1_MAGIC, NDARRAY_V2_MAGIC):
    if head == NDARRAY_V2_MAGIC:
      storage = r.scalar("i4", what + " storage type")
      if storage != DENSE_STORAGE:
        raise ConversionError(f"{r.path}: {what} has sparse storage type {storage}; only dense "
                              "arrays are supported")
    ndim = r.scalar("u4", what + " ndim")
    if ndim > MAX_NDIM:
      raise ConversionError(f"{r.path}: {what} claims {ndim} dimensions: not an MXNet file?")
    shape = tuple(int(d) for d in r.array("i8", ndim, what + " shape"))
  else:  # before v1: the header word is ndim, the dims are uint32.
    ndim = head
    if ndim > MAX_NDIM:
      raise ConversionError(f"{r.path}: {what} starts with 0x{head:08X}, neither an NDArray "
                            "magic nor a plausible ndim: not an MXNet .params file")
    shape = tuple(int(d) for d in r.array("u4", ndim, what + " shape"))
  if ndim == 0:
    return np.zeros((0,), np.float32)
  if any(d < 0 for d in shape):
    raise ConversionError(f"{r.path}: {what} has a negative dimension {shape}")
  r.scalar("i4", what + " device type")
  r.scalar("i4", what + " device id")
  flag = r.scalar("i4", what + " type flag")
  if flag not in TYPE_FLAGS:
    raise ConversionError(f"{r.path}: {what} has unsupported type flag {flag}")
  count = int(np.prod(shape))
  return r.array(TYPE_FLAGS[flag], count, what + " data").reshape(shape).copy()


def read_mxnet_params(in_path: str) -> dict[str, np.ndarray]:
  """name -> array of an MXNet `.params` / `nd.save` file (names keep their arg:/aux: prefix)."""
  with open_input(in_path) as f:
    r = _Reader(f, in_path)
    magic = r.scalar("u8", "the header")
    if magic != LIST_MAGIC:
      raise ConversionError(f"{in_path}: not an MXNet .params file (header 0x{magic:X}, "
                            f"expected 0x{LIST_MAGIC:X})")
    r.scalar("u8", "the header")
    count = r.scalar("u8", "the array count")
    size = os.fstat(f.fileno()).st_size
    if count > size:  # every array takes at least a byte; avoids a huge loop on garbage.
      raise ConversionError(f"{in_path}: claims {count} arrays in {size} bytes: damaged file")
    arrays = [_read_ndarray(r, i) for i in range(count)]
    num_names = r.scalar("u8", "the name count")
    if num_names != count:
      raise ConversionError(f"{in_path}: {count} arrays but {num_names} names: damaged file")
    names = []
    for i in range(num_names):
      length = r.scalar("u8", f"name {i} length")
      if length > size:
        raise ConversionError(f"{in_path}: name {i} claims {length} bytes: damaged file")
      try:
        names.append(r.bytes(length, f"name {i}").decode("utf-8"))
      except UnicodeDecodeError:
        raise ConversionError(f"{in_path}: name {i} is not text: damaged file") from None
    if f.read(1):
      raise ConversionError(f"{in_path}: unexpected bytes after the name list: damaged file")
  if len(set(names)) != len(names):
    raise ConversionError(f"{in_path}: repeated array names")
  return dict(zip(names, arrays))


def mxnet_name_to_psa(name: str) -> str | None:
  """The original's state-dict name of an ademxapp A1 array, None for the ImageNet classifier.

  Raises ConversionError for a name that follows none of the rules in the module docstring.
  """
  bare = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
  block = lambda stage, pos: f"b{stage}" if pos == "a" else f"b{stage}_{pos[1:]}"  # noqa: E731
  if bare == "conv1a_weight":
    return "conv1a.weight"
  if m := _CONV.fullmatch(bare):
    return f"{block(m[1], m[2])}.conv_branch{m[3]}.weight"
  if m := _BN.fullmatch(bare):
    return f"{block(m[1], m[2])}.bn_branch{m[3]}.{_BN_PARAM[m[4]]}"
  if m := _BN7.fullmatch(bare):
    return f"bn7.{_BN_PARAM[m[1]]}"
  if _CLASSIFIER.fullmatch(bare):
    return None
  raise ConversionError(f"unknown MXNet array name {name!r}: not part of ResNet-38 model A1")


def mxnet_to_psa_state_dict(arrays: dict[str, np.ndarray],
                            source: str = "MXNet file") -> tuple[dict[str, np.ndarray], list[str]]:
  """(state dict in the original's names, names dropped as the ImageNet classifier)."""
  out, dropped, unknown, origin = {}, [], [], {}
  for name, value in arrays.items():
    try:
      target = mxnet_name_to_psa(name)
    except ConversionError:
      unknown.append(name)
      continue
    if target is None:
      dropped.append(name)
    elif target in out:
      raise ConversionError(f"{source}: {origin[target]!r} and {name!r} both map to {target}")
    else:
      out[target], origin[target] = value, name
  if unknown:
    raise ConversionError(f"{source}: {len(unknown)} array names are not ResNet-38 model A1: "
                          + ", ".join(sorted(unknown)))
  return out, sorted(dropped)


def convert_mxnet(in_path: str, out_dir: str) -> dict:
  """Converts the ImageNet `.params` file to a "backbone" checkpoint folder `out_dir`.

  Returns the metadata written, whose "dropped" lists the arrays deliberately left out (the
  1000-class classifier).
  """
  from affinity_jax import checkpoint
  arrays = read_mxnet_params(in_path)
  state_dict, dropped = mxnet_to_psa_state_dict(arrays, source=in_path)
  width = infer_width(state_dict, in_path)
  variables = psa_state_dict_to_variables(state_dict, "backbone", width=width, source=in_path)
  metadata = dict(arch="backbone", width=width, num_classes=None,
                  source=f"mxnet {os.path.basename(in_path)}", dropped=dropped)
  checkpoint.save_variables(out_dir, variables, metadata=metadata)
  return metadata
