"""The PyTorch original's state dicts (jiwoon-ahn/psa) -> our variables, strictly.

Renaming rule (PyTorch name -> (collection, path)):
  conv1a.weight                   -> params/conv1a/kernel
  b4_3.conv_branch2a.weight       -> params/b4_3/conv_branch2a/kernel
  b4_3.bn_branch2a.weight         -> batch_stats/b4_3/bn_branch2a/scale   (.bias -> bias,
                                     .running_mean -> mean, .running_var -> var)
  bn7.*                           -> batch_stats/bn7/*
  fc8.weight, f8_3.weight, ...    -> params/fc8/kernel, params/f8_3/kernel, ...
Convolution weights go from PyTorch's OIHW to Flax's HWIO (transpose(2, 3, 1, 0)). Every source
tensor must be consumed and every target filled: anything else is a ConversionError naming the
keys. `num_batches_tracked` entries (absent in PyTorch 0.4 files) are ignored.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from affinity_jax.errors import UserError
from affinity_jax.models import ARCHS as MODEL_ARCHS
from affinity_jax.models.heads import AFFINITY_FEATURES, AFFINITY_HEAD_CHANNELS
from affinity_jax.models.resnet38 import (BLOCKS, CONV6_CHANNELS, STEM_CHANNELS, block_bns,
                                          block_convs, scaled)

# The networks of the original repository (it has no segmentation network).
ARCHS = tuple(a for a in MODEL_ARCHS if a != "seg")
BN_SUFFIXES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
IGNORED_SUFFIX = "num_batches_tracked"
MODULE_PREFIX = "module."  # nn.DataParallel wraps every name in it.


class ConversionError(UserError):
  """A source checkpoint that cannot be converted; the message names the file or the keys."""


def psa_state_dict_shapes(arch: str, width: float = 1.0,
                          num_classes: int = 20) -> dict[str, tuple[int, ...]]:
  """The original's state-dict names and shapes (OIHW) for `arch`, without num_batches_tracked.

  arch: "backbone" (resnet38d), "cam" (resnet38_cls) or "affinity" (resnet38_aff). At width 1.0
  this is exactly the original's layout; other widths scale every channel count as the models
  do (names unchanged), for tests.
  """
  if arch not in ARCHS:
    raise ConversionError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")
  c = lambda n: scaled(n, width)  # noqa: E731
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


def _target(name: str) -> tuple[str, tuple[str, ...]]:
  """PyTorch name -> (collection, path in our tree)."""
  *modules, leaf = name.split(".")
  if modules and modules[-1].startswith("bn"):
    return "batch_stats", (*modules, BN_SUFFIXES[leaf])
  return "params", (*modules, "kernel")


def psa_state_dict_to_variables(state_dict: Mapping[str, Any], arch: str, *,
                                width: float = 1.0, num_classes: int | None = None,
                                source: str = "state dict") -> dict[str, dict]:
  """Converts the original's state dict to {"params": ..., "batch_stats": ...} (float32 numpy).

  state_dict: name -> array (numpy, or anything `np.asarray` takes, e.g. CPU torch tensors), in
    the original's names, optionally all prefixed by "module.".
  arch: "cam", "affinity" or "backbone" (the ResNet-38 part only).
  width: the model width the state dict was built at (1.0 for the original's files).
  num_classes: for "cam", the classes of fc8; None reads it from fc8.weight.
  source: how error messages name the input (e.g. its file name).
  """
  if arch not in ARCHS:
    raise ConversionError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")
  names = list(state_dict)
  if not all(isinstance(n, str) for n in names):
    raise ConversionError(f"{source}: state dict keys must be strings")
  if names and all(n.startswith(MODULE_PREFIX) for n in names):
    state_dict = {n[len(MODULE_PREFIX):]: v for n, v in state_dict.items()}
  tensors = {n: v for n, v in state_dict.items() if not n.endswith("." + IGNORED_SUFFIX)}
  if num_classes is None:
    fc8 = tensors.get("fc8.weight")
    num_classes = int(np.shape(fc8)[0]) if arch == "cam" and fc8 is not None else 20
  expected = psa_state_dict_shapes(arch, width, num_classes)

  missing = [n for n in expected if n not in tensors]
  unexpected = sorted(n for n in tensors if n not in expected)
  if missing or unexpected:
    lines = [f"{source}: does not match the original's {arch!r} network"]
    if missing:
      lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
    if arch != "backbone" and any(n.split(".")[0] in ("fc8", "f9") for n in unexpected):
      lines.append("  (is --arch right? 'cam' has fc8, 'affinity' has f8_3..f9)")
    raise ConversionError("\n".join(lines))
  wrong = [(n, expected[n], tuple(np.shape(tensors[n]))) for n in expected
           if tuple(np.shape(tensors[n])) != expected[n]]
  if wrong:
    raise ConversionError(f"{source}: wrong shapes (key, expected, got): " + "; ".join(
        f"({n}, {want}, {got})" for n, want, got in wrong))

  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for name in expected:
    value = np.asarray(tensors[name], dtype=np.float32)
    collection, path = _target(name)
    if collection == "params":
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    node = variables[collection]
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(value)
  return variables


def infer_width(state_dict: Mapping[str, Any], source: str = "state dict") -> float:
  """The model width of a state dict: conv1a's output channels / 64 (1.0 for the original's)."""
  for prefix in ("", MODULE_PREFIX):
    if prefix + "conv1a.weight" in state_dict:
      return np.shape(state_dict[prefix + "conv1a.weight"])[0] / STEM_CHANNELS
  raise ConversionError(f"{source}: no conv1a.weight: not a ResNet-38 of the original")


def read_torch_state_dict(in_path: str) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch checkpoint file as numpy arrays (needs torch)."""
  if not os.path.isfile(in_path):
    raise ConversionError(f"{in_path}: no such file")
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


def convert_psa_pytorch(in_path: str, out_dir: str, arch: str) -> dict:
  """Converts the original's .pth (resnet38_cls for "cam", resnet38_aff for "affinity", or the
  backbone alone for "backbone") to an orbax checkpoint folder `out_dir`. Returns its metadata."""
  from affinity_jax import checkpoint
  if arch not in ARCHS:
    raise ConversionError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")
  state_dict = read_torch_state_dict(in_path)
  width = infer_width(state_dict, in_path)
  variables = psa_state_dict_to_variables(state_dict, arch, width=width, source=in_path)
  num_classes = (int(variables["params"]["fc8"]["kernel"].shape[-1]) if arch == "cam" else None)
  metadata = dict(arch=arch, width=width, num_classes=num_classes,
                  source=f"psa-pytorch {os.path.basename(in_path)}")
  checkpoint.save_variables(out_dir, variables, metadata=metadata)
  return metadata
