"""torchvision's ResNet-50 and IRN's CAM network on it -> our variables (models/resnet50.py).

Two layouts are read:
- torchvision's ImageNet state dict (`resnet50-*.pth`, the file IRN's net/resnet50.py loads):
  conv1, bn1, layer1.0 .. layer4.2, fc. `fc.weight` / `fc.bias` are dropped, as IRN does; the
  result is a "backbone" checkpoint.
- IRN's trained CAM network (`res50_cam.pth`, net/resnet50_cam.py): the same names prefixed
  "resnet50.", plus "classifier.weight" -> a "cam" checkpoint (or, with arch "backbone", the
  ResNet-50 alone, the classifier dropped). IRN's Net also registers its stages as modules
  (stage1..stage4, backbone, newly_added), so its state dict holds every tensor a second or
  third time under those names: each such alias must equal the tensor it names, and is dropped.
Either may carry DataParallel's "module." prefix and `num_batches_tracked` entries (ignored).

Renaming (models/resnet50.py has the full table): "layer3.4.conv2.weight" -> params/layer3_4/
conv2/kernel (OIHW -> HWIO, transpose(2, 3, 1, 0)), "layer2.0.downsample.0.weight" ->
params/layer2_0/downsample_0/kernel, a BatchNorm's weight / bias -> params/.../scale, bias and
running_mean / running_var -> batch_stats/.../mean, var. The width is read from conv1 (64
channels at 1.0); every other key must be there with its shape at that width, and nothing else
may be: anything else is a ConversionError naming the file and the first offending key.

Files: `.pth` through torch (`torch.load(weights_only=True)`, an optional dependency), or, with
no torch at all, a NumPy `.npz` holding the same names (`np.savez(path, **state_dict)` on a
machine that has torch).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping

import numpy as np

from affinity_jax.convert.psa import (BN_SUFFIXES, MODULE_PREFIX, ConversionError, open_input,
                                      place_tensor, plain_tensors, read_torch_state_dict)
from affinity_jax.models.resnet38 import scaled
from affinity_jax.models.resnet50 import EXPANSION, LAYERS, STEM_CHANNELS, has_downsample

CONVERTIBLE_ARCHS = ("backbone", "cam")
IRN_PREFIX = "resnet50."
CLASSIFIER = "classifier.weight"
IMAGENET_FC = ("fc.weight", "fc.bias")
# Where IRN's net/resnet50_cam.py registers the ResNet's modules a second time: stage1 =
# Sequential(conv1, bn1, relu, maxpool, layer1), stageN = Sequential(layerN), backbone =
# ModuleList(stage1..stage4), newly_added = ModuleList(classifier).
IRN_STAGE1 = {"0": "conv1", "1": "bn1", "4": "layer1"}


def _check_arch(arch: str) -> None:
  if arch not in CONVERTIBLE_ARCHS:
    raise ConversionError(f"unknown architecture {arch!r} for ResNet-50: expected one of "
                          f"{', '.join(CONVERTIBLE_ARCHS)}")


def _layout(arch: str, width: float, num_classes: int
            ) -> list[tuple[str, tuple[int, ...], str, tuple[str, ...]]]:
  """(torchvision name, shape, collection, our path) of every tensor, in torchvision's order."""
  _check_arch(arch)
  c = lambda n: scaled(n, width)  # noqa: E731
  out = []

  def conv(name: str, path: tuple[str, ...], cout: int, cin: int, k: int) -> None:
    out.append((f"{name}.weight", (cout, cin, k, k), "params", (*path, "kernel")))

  def bn(name: str, path: tuple[str, ...], channels: int) -> None:
    for suffix, leaf in BN_SUFFIXES.items():
      collection = "params" if suffix in ("weight", "bias") else "batch_stats"
      out.append((f"{name}.{suffix}", (channels,), collection, (*path, leaf)))

  conv("conv1", ("conv1",), c(STEM_CHANNELS), 3, 7)
  bn("bn1", ("bn1",), c(STEM_CHANNELS))
  cin = c(STEM_CHANNELS)
  for index, layer in enumerate(LAYERS):
    planes, cout = c(layer.planes), c(layer.planes * EXPANSION)
    for i in range(layer.blocks):
      name, module = f"{layer.name}.{i}", f"{layer.name}_{i}"
      conv(f"{name}.conv1", (module, "conv1"), planes, cin, 1)
      bn(f"{name}.bn1", (module, "bn1"), planes)
      conv(f"{name}.conv2", (module, "conv2"), planes, planes, 3)
      bn(f"{name}.bn2", (module, "bn2"), planes)
      conv(f"{name}.conv3", (module, "conv3"), cout, planes, 1)
      bn(f"{name}.bn3", (module, "bn3"), cout)
      # The stride does not change which blocks project: every layer's first one does.
      if has_downsample(index, i, stride=1):
        conv(f"{name}.downsample.0", (module, "downsample_0"), cout, cin, 1)
        bn(f"{name}.downsample.1", (module, "downsample_1"), cout)
      cin = cout
  if arch == "cam":
    conv("classifier", ("classifier",), num_classes, cin, 1)
  return out


def torchvision_state_dict_shapes(arch: str = "backbone", width: float = 1.0,
                                  num_classes: int = 20) -> dict[str, tuple[int, ...]]:
  """torchvision's ResNet-50 state-dict names and shapes (OIHW) without fc and
  num_batches_tracked, in its order; arch "cam" adds IRN's `classifier.weight`. Other widths
  scale every channel count as the models do (names unchanged), for tests."""
  return {name: shape for name, shape, _, _ in _layout(arch, width, num_classes)}


def _irn_alias(name: str) -> str | None:
  """The canonical name (without "resnet50.") of a tensor IRN's Net registers again under its
  stage modules, or None if `name` is no such alias."""
  parts = name.split(".")
  if len(parts) > 2 and parts[0] == "newly_added" and parts[1] == "0":
    return ".".join(["classifier", *parts[2:]])
  if len(parts) > 2 and parts[0] == "backbone" and parts[1] in ("0", "1", "2", "3"):
    parts = [f"stage{int(parts[1]) + 1}", *parts[2:]]
  if len(parts) > 2 and parts[0] == "stage1" and parts[1] in IRN_STAGE1:
    return ".".join([IRN_STAGE1[parts[1]], *parts[2:]])
  if len(parts) > 2 and parts[0] in ("stage2", "stage3", "stage4") and parts[1] == "0":
    return ".".join([f"layer{parts[0][-1]}", *parts[2:]])
  return None


def _canonical(state_dict: Mapping[str, Any], source: str) -> tuple[dict[str, Any], str]:
  """(tensors in torchvision's names plus "classifier.weight", "torchvision" or "irn"): the
  DataParallel prefix, num_batches_tracked and IRN's aliases removed."""
  tensors = plain_tensors(state_dict, source)
  if IRN_PREFIX + "conv1.weight" not in tensors:
    return tensors, "torchvision"
  out, aliases = {}, {}
  for name, value in tensors.items():
    if name.startswith(IRN_PREFIX):
      out[name[len(IRN_PREFIX):]] = value
    elif name == CLASSIFIER or _irn_alias(name) is None:
      out[name] = value  # the classifier, or a stranger reported as unexpected.
    else:
      aliases[name] = value
  for name, value in aliases.items():
    twin = _irn_alias(name)
    if twin not in out or np.shape(out[twin]) != np.shape(value) or not np.array_equal(
        np.asarray(out[twin]), np.asarray(value)):
      prefixed = twin if twin == CLASSIFIER else IRN_PREFIX + twin
      raise ConversionError(f"{source}: {name} should be the same tensor as {prefixed} (IRN's "
                            "Net registers its stages twice), but differs from it")
  return out, "irn"


def infer_width(state_dict: Mapping[str, Any], source: str = "state dict") -> float:
  """conv1's output channels / 64 (1.0 for torchvision's and IRN's files), in either layout."""
  for prefix in ("", MODULE_PREFIX):
    for name in (f"{prefix}conv1.weight", f"{prefix}{IRN_PREFIX}conv1.weight"):
      if name in state_dict:
        shape = np.shape(state_dict[name])
        if len(shape) != 4 or shape[0] < 1:
          raise ConversionError(f"{source}: {name} has shape {tuple(shape)}, not a convolution "
                                f"kernel [64, 3, 7, 7]")
        return shape[0] / STEM_CHANNELS
  raise ConversionError(f"{source}: no conv1.weight (nor resnet50.conv1.weight): not "
                        "torchvision's ResNet-50 nor IRN's CAM network")


def torchvision_to_variables(state_dict: Mapping[str, Any], arch: str = "backbone", *,
                             width: float | None = None, source: str = "state dict"
                             ) -> tuple[dict[str, dict], list[str]]:
  """({"params", "batch_stats"} as float32 numpy, sorted names of the tensors left out).

  state_dict: name -> array (numpy, or anything `np.asarray` takes, e.g. CPU torch tensors) in
    torchvision's or IRN's layout (module docstring).
  arch: "backbone" (fc, or IRN's classifier, left out) or "cam" (IRN's classifier needed; its
    rows give num_classes).
  width: the model width; None reads it from conv1.
  source: how error messages name the input (e.g. its file name).
  """
  _check_arch(arch)
  tensors, layout = _canonical(state_dict, source)
  width = infer_width(tensors, source) if width is None else width
  dropped = [n for n in IMAGENET_FC if n in tensors]
  if arch == "backbone" and CLASSIFIER in tensors:
    dropped.append(CLASSIFIER)
  if arch == "cam" and CLASSIFIER not in tensors:
    hint = (": torchvision's ImageNet file has none (its fc is ImageNet's 1000 classes); "
            "convert it with --arch backbone, IRN trains the classifier from scratch"
            if layout == "torchvision" else "")
    raise ConversionError(f"{source}: no {CLASSIFIER}, IRN's CAM classifier{hint}")
  classifier_shape = np.shape(tensors[CLASSIFIER]) if arch == "cam" else (0,)
  layout_rows = _layout(arch, width, int(classifier_shape[0]) if classifier_shape else 0)
  expected = {name: shape for name, shape, _, _ in layout_rows}
  kind = "IRN's CAM network" if arch == "cam" else "torchvision's ResNet-50"

  missing = [n for n in expected if n not in tensors]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ConversionError(f"{source}: missing {missing[0]}{more}: not {kind} at width {width:g} "
                          f"({layout} layout)")
  unexpected = sorted(n for n in tensors if n not in expected and n not in dropped)
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise ConversionError(f"{source}: unexpected key {unexpected[0]}{more}: not {kind} "
                          f"({layout} layout)")
  wrong = [(n, expected[n], tuple(np.shape(tensors[n]))) for n in expected
           if tuple(np.shape(tensors[n])) != expected[n]]
  if wrong:
    (name, want, got), more = wrong[0], (f" (and {len(wrong) - 1} more)" if len(wrong) > 1
                                         else "")
    raise ConversionError(f"{source}: {name} has shape {got}, expected {want} at width "
                          f"{width:g}{more}")

  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for name, _, collection, path in layout_rows:
    place_tensor(variables, collection, path, tensors[name])
  return variables, sorted(dropped)


def read_state_dict(in_path: str) -> dict[str, np.ndarray]:
  """The tensors of a `.pth` (through torch) or `.npz` (NumPy only) file as numpy arrays; a
  folder, a missing, truncated or foreign file is a ConversionError naming it."""
  if not in_path.endswith(".npz"):
    return read_torch_state_dict(in_path)
  open_input(in_path).close()
  try:
    with np.load(in_path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise ConversionError(f"{in_path}: not a NumPy .npz archive of arrays, or truncated "
                          f"({type(e).__name__}: {e})") from None


def convert_torchvision(in_path: str, out_dir: str, arch: str = "backbone") -> dict:
  """Converts torchvision's ResNet-50 (.pth or .npz; "backbone") or IRN's res50_cam.pth
  ("cam" or "backbone") to a resnet50 checkpoint folder `out_dir`. Returns the metadata
  written, whose "dropped" lists the tensors left out (fc.weight, fc.bias, ...)."""
  from affinity_jax import checkpoint
  _check_arch(arch)
  state_dict = read_state_dict(in_path)
  variables, dropped = torchvision_to_variables(state_dict, arch, source=in_path)
  width = infer_width(state_dict, in_path)
  num_classes = (int(variables["params"]["classifier"]["kernel"].shape[-1]) if arch == "cam"
                 else None)
  layout = "irn" if any(n.endswith(IRN_PREFIX + "conv1.weight") for n in state_dict) else (
      "torchvision")
  metadata = dict(arch=arch, backbone="resnet50", width=width, num_classes=num_classes,
                  source=f"{layout} {os.path.basename(in_path)}", dropped=dropped)
  checkpoint.save_variables(out_dir, variables, metadata=metadata)
  return metadata
