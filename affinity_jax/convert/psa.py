"""The PyTorch original's state dicts (jiwoon-ahn/psa) -> our variables, strictly.

Renaming rule (PyTorch name -> (collection, path)):
  conv1a.weight                   -> params/conv1a/kernel
  b4_3.conv_branch2a.weight       -> params/b4_3/conv_branch2a/kernel
  b4_3.bn_branch2a.weight         -> batch_stats/b4_3/bn_branch2a/scale   (.bias -> bias,
                                     .running_mean -> mean, .running_var -> var)
  bn7.*                           -> batch_stats/bn7/*
  fc8.weight, f8_3.weight, ...    -> params/fc8/kernel, params/f8_3/kernel, ...
and for VGG-16 (`backbone="vgg16"`: network/vgg16d.py, vgg16_cls.py, vgg16_aff.py):
  conv1_1.weight, conv1_1.bias    -> params/conv1_1/kernel, params/conv1_1/bias  (... fc6, fc7)
  gn8_3.weight, gn8_3.bias        -> params/gn8_3/scale, params/gn8_3/bias       (GroupNorm)
Convolution weights go from PyTorch's OIHW to Flax's HWIO (transpose(2, 3, 1, 0)). Every source
tensor must be consumed and every target filled: anything else is a ConversionError naming the
keys. `num_batches_tracked` entries (absent in PyTorch 0.4 files) are ignored.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from affinity_jax.errors import UserError
from affinity_jax.constants import ORIGINAL_ARCHS
from affinity_jax.constants import PSA_BACKBONES
from affinity_jax.models import DEFAULT_BACKBONE
from affinity_jax.models.heads import AFFINITY_FEATURES, AFFINITY_HEAD_CHANNELS
from affinity_jax.models.resnet38 import (BLOCKS, CONV6_CHANNELS, STEM_CHANNELS, block_bns,
                                          block_convs, scaled)
from affinity_jax.models.vgg16 import FC7_CHANNELS, TRUNK_CONVS

BN_SUFFIXES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
IGNORED_SUFFIX = "num_batches_tracked"
MODULE_PREFIX = "module."  # nn.DataParallel wraps every name in it.
# The first convolution of each backbone: it tells the backbone and the width of a state dict.
FIRST_CONV = {"resnet38": ("conv1a.weight", STEM_CHANNELS),
              "vgg16": ("conv1_1.weight", TRUNK_CONVS[0][3])}


class ConversionError(UserError):
  """A source checkpoint that cannot be converted; the message names the file or the keys."""


def open_input(in_path: str):
  """`in_path` opened for reading in binary; a missing, unreadable or folder path is a
  ConversionError naming it."""
  if os.path.isdir(in_path):
    raise ConversionError(f"{in_path}: a folder, not a weight file")
  if not os.path.exists(in_path):
    raise ConversionError(f"{in_path}: no such file")
  try:
    return open(in_path, "rb")  # pylint: disable=consider-using-with
  except OSError as e:
    raise ConversionError(f"{in_path}: cannot be read ({e.strerror or e})") from None


def _check(arch: str, backbone: str) -> None:
  if arch not in ORIGINAL_ARCHS:
    raise ConversionError(f"unknown architecture {arch!r}: expected one of "
                          f"{', '.join(ORIGINAL_ARCHS)}")
  if backbone not in PSA_BACKBONES:
    raise ConversionError(f"unknown backbone {backbone!r}: the original's networks are on "
                          f"{' or '.join(PSA_BACKBONES)}")


def plain_tensors(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The tensors of a PyTorch state dict under their module names: string keys checked (else
  ConversionError naming `source`), DataParallel's "module." prefix and the BatchNorm
  `num_batches_tracked` counters removed."""
  names = list(state_dict)
  if not all(isinstance(n, str) for n in names):
    raise ConversionError(f"{source}: state dict keys must be strings")
  if names and all(n.startswith(MODULE_PREFIX) for n in names):
    state_dict = {n[len(MODULE_PREFIX):]: v for n, v in state_dict.items()}
  return {n: v for n, v in state_dict.items() if not n.endswith("." + IGNORED_SUFFIX)}


def place_tensor(variables: dict, collection: str, path: tuple, value: Any) -> None:
  """Puts a PyTorch tensor into `variables[collection]` at `path` (nested dicts) as float32,
  a convolution kernel turned from OIHW to HWIO."""
  value = np.asarray(value, dtype=np.float32)
  if path[-1] == "kernel":
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  node = variables[collection]
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = np.ascontiguousarray(value)


def psa_state_dict_shapes(arch: str, width: float = 1.0, num_classes: int = 20,
                          backbone: str = DEFAULT_BACKBONE) -> dict[str, tuple[int, ...]]:
  """The original's state-dict names and shapes (OIHW) for `arch`, without num_batches_tracked,
  in the original's order.

  arch: "backbone" (resnet38d / vgg16d), "cam" (resnet38_cls / vgg16_cls) or "affinity"
  (resnet38_aff / vgg16_aff), on `backbone` "resnet38" or "vgg16". At width 1.0 this is exactly
  the original's layout; other widths scale every channel count as the models do (names
  unchanged), for tests.
  """
  _check(arch, backbone)
  c = lambda n: scaled(n, width)  # noqa: E731
  if backbone == "vgg16":
    return _vgg16_shapes(arch, c, num_classes)
  shapes: dict[str, tuple[int, ...]] = {"conv1a.weight": (c(STEM_CHANNELS), 3, 3, 3)}

  def bn(prefix: str, channels: int) -> None:
    for suffix in BN_SUFFIXES:
      shapes[f"{prefix}.{suffix}"] = (channels,)

  for spec in BLOCKS:
    bns = dict(block_bns(spec))
    for name, k, cin, cout in block_convs(spec):
      bn_name = "bn_" + name[len("conv_"):]
      if bn_name in bns:
        bn(f"{spec.name}.{bn_name}", c(bns[bn_name]))
      shapes[f"{spec.name}.{name}.weight"] = (c(cout), c(cin), k, k)
  bn("bn7", c(CONV6_CHANNELS))
  if arch == "cam":
    shapes["fc8.weight"] = (num_classes, c(CONV6_CHANNELS), 1, 1)
  elif arch == "affinity":
    taps = (c(512), c(1024), c(CONV6_CHANNELS))
    for (name, out), cin in zip(AFFINITY_HEAD_CHANNELS.items(), taps):
      shapes[f"{name}.weight"] = (c(out), cin, 1, 1)
    concat = sum(c(n) for n in AFFINITY_HEAD_CHANNELS.values())
    shapes["f9.weight"] = (c(AFFINITY_FEATURES), concat, 1, 1)
  return shapes


def _vgg16_shapes(arch: str, c, num_classes: int) -> dict[str, tuple[int, ...]]:
  shapes: dict[str, tuple[int, ...]] = {}
  for name, k, cin, cout, _ in TRUNK_CONVS:
    shapes[f"{name}.weight"] = (c(cout), cin if name == "conv1_1" else c(cin), k, k)
    shapes[f"{name}.bias"] = (c(cout),)
  if arch == "cam":
    shapes["fc8.weight"] = (num_classes, c(FC7_CHANNELS), 1, 1)
  elif arch == "affinity":  # vgg16_aff.py registers f8_3..f8_5, then gn8_3..gn8_5, then f9.
    taps = (c(512), c(512), c(FC7_CHANNELS))
    for (name, out), cin in zip(AFFINITY_HEAD_CHANNELS.items(), taps):
      shapes[f"{name}.weight"] = (c(out), cin, 1, 1)
    for name, out in AFFINITY_HEAD_CHANNELS.items():
      shapes[f"gn{name[1:]}.weight"] = shapes[f"gn{name[1:]}.bias"] = (c(out),)
    concat = sum(c(n) for n in AFFINITY_HEAD_CHANNELS.values())
    shapes["f9.weight"] = (c(AFFINITY_FEATURES), concat, 1, 1)
  return shapes


def _target(name: str) -> tuple[str, tuple[str, ...]]:
  """PyTorch name -> (collection, path in our tree)."""
  *modules, leaf = name.split(".")
  if modules and modules[-1].startswith("bn"):
    return "batch_stats", (*modules, BN_SUFFIXES[leaf])
  if leaf == "bias":  # VGG-16's convolutions and GroupNorms (ResNet-38's have none).
    return "params", (*modules, "bias")
  if modules and modules[-1].startswith("gn"):
    return "params", (*modules, "scale")
  return "params", (*modules, "kernel")


def psa_state_dict_to_variables(state_dict: Mapping[str, Any], arch: str, *,
                                width: float = 1.0, num_classes: int | None = None,
                                source: str = "state dict",
                                backbone: str = DEFAULT_BACKBONE) -> dict[str, dict]:
  """Converts the original's state dict to {"params": ..., "batch_stats": ...} (float32 numpy).

  state_dict: name -> array (numpy, or anything `np.asarray` takes, e.g. CPU torch tensors), in
    the original's names, optionally all prefixed by "module.".
  arch: "cam", "affinity" or "backbone" (the ResNet-38 / VGG-16 trunk only).
  width: the model width the state dict was built at (1.0 for the original's files).
  num_classes: for "cam", the classes of fc8; None reads it from fc8.weight.
  source: how error messages name the input (e.g. its file name).
  backbone: "resnet38" or "vgg16" (VGG-16 has no BatchNorm: "batch_stats" stays empty).
  """
  _check(arch, backbone)
  tensors = plain_tensors(state_dict, source)
  if num_classes is None:
    fc8 = tensors.get("fc8.weight")
    num_classes = int(np.shape(fc8)[0]) if arch == "cam" and fc8 is not None else 20
  expected = psa_state_dict_shapes(arch, width, num_classes, backbone)

  missing = [n for n in expected if n not in tensors]
  unexpected = sorted(n for n in tensors if n not in expected)
  if missing or unexpected:
    lines = [f"{source}: does not match the original's {arch!r} network on {backbone}"]
    if missing:
      lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
    if arch != "backbone" and any(n.split(".")[0] in ("fc8", "f9") for n in unexpected):
      lines.append("  (is --arch right? 'cam' has fc8, 'affinity' has f8_3..f9)")
    if any(n.split(".")[0] in ("conv1a", "conv1_1") for n in unexpected):
      lines.append("  (is --backbone right? resnet38 starts with conv1a, vgg16 with conv1_1)")
    raise ConversionError("\n".join(lines))
  wrong = [(n, expected[n], tuple(np.shape(tensors[n]))) for n in expected
           if tuple(np.shape(tensors[n])) != expected[n]]
  if wrong:
    raise ConversionError(f"{source}: wrong shapes (key, expected, got): " + "; ".join(
        f"({n}, {want}, {got})" for n, want, got in wrong))

  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for name in expected:
    place_tensor(variables, *_target(name), tensors[name])
  return variables


def infer_backbone(state_dict: Mapping[str, Any], source: str = "state dict") -> str:
  """"resnet38" or "vgg16": which first convolution the state dict holds."""
  for backbone, (first, _) in FIRST_CONV.items():
    if first in state_dict or MODULE_PREFIX + first in state_dict:
      return backbone
  raise ConversionError(f"{source}: neither conv1a.weight nor conv1_1.weight: not a network "
                        "of the original (ResNet-38 or VGG-16)")


def infer_width(state_dict: Mapping[str, Any], source: str = "state dict",
                backbone: str = DEFAULT_BACKBONE) -> float:
  """The model width of a state dict: the first convolution's output channels / 64 (conv1a for
  ResNet-38, conv1_1 for VGG-16; 1.0 for the original's files)."""
  first, channels = FIRST_CONV[backbone]
  for prefix in ("", MODULE_PREFIX):
    if prefix + first in state_dict:
      return np.shape(state_dict[prefix + first])[0] / channels
  raise ConversionError(f"{source}: no {first}: not a {backbone} network of the original")


def read_torch_state_dict(in_path: str) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch checkpoint file as numpy arrays (needs torch)."""
  open_input(in_path).close()
  try:
    import torch  # optional: only this converter needs it.
  except ImportError:
    raise ConversionError(f"{in_path}: reading .pth files needs PyTorch: "
                          "pip install 'affinity_jax[torch]'") from None
  try:
    obj = torch.load(in_path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle, zip and runtime errors alike for foreign files.
    # torch's own message suggests weights_only=False, which would run arbitrary pickled code.
    raise ConversionError(f"{in_path}: not a PyTorch checkpoint of plain tensors (torch.load "
                          f"with weights_only=True failed: {type(e).__name__}); other pickles "
                          "are refused for safety") from None
  for key in ("state_dict", "model"):  # training scripts often wrap the weights.
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not obj:
    raise ConversionError(f"{in_path}: holds a {type(obj).__name__}, not a state dict of tensors")
  out = {}
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(f"{in_path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    out[name] = value.detach().cpu().numpy()
  return out


def convert_psa_pytorch(in_path: str, out_dir: str, arch: str,
                        backbone: str | None = None) -> dict:
  """Converts the original's .pth (resnet38_cls / vgg16_cls for "cam", resnet38_aff /
  vgg16_aff for "affinity", or the trunk alone for "backbone") to an orbax checkpoint folder
  `out_dir`. backbone: "resnet38" or "vgg16"; None reads it from the file (conv1a or conv1_1).
  Returns the metadata written."""
  from affinity_jax import checkpoint
  _check(arch, backbone or DEFAULT_BACKBONE)
  state_dict = read_torch_state_dict(in_path)
  backbone = backbone or infer_backbone(state_dict, in_path)
  width = infer_width(state_dict, in_path, backbone)
  variables = psa_state_dict_to_variables(state_dict, arch, width=width, source=in_path,
                                          backbone=backbone)
  num_classes = (int(variables["params"]["fc8"]["kernel"].shape[-1]) if arch == "cam" else None)
  metadata = dict(arch=arch, backbone=backbone, width=width, num_classes=num_classes,
                  source=f"psa-pytorch {os.path.basename(in_path)}")
  checkpoint.save_variables(out_dir, variables, metadata=metadata)
  return metadata
