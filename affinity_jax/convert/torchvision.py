"""torchvision's ResNet-50 and IRN's CAM and relation networks on it -> our variables
(models/resnet50.py, models/relation_net.py).

Three layouts are read:
- torchvision's ImageNet state dict (`resnet50-*.pth`, the file IRN's net/resnet50.py loads):
  conv1, bn1, layer1.0 .. layer4.2, fc. `fc.weight` / `fc.bias` are dropped, as IRN does; the
  result is a "backbone" checkpoint.
- IRN's trained CAM network (`res50_cam.pth`, net/resnet50_cam.py): the same names prefixed
  "resnet50.", plus "classifier.weight" -> a "cam" checkpoint (or, with arch "backbone", the
  ResNet-50 alone, the classifier dropped). IRN's Net also registers its stages as modules
  (stage1..stage4, backbone, newly_added), so its state dict holds every tensor a second or
  third time under those names: each such alias must equal the tensor it names, and is dropped.
- IRN's trained inter-pixel relation network (`res50_irn.pth`, net/resnet50_irn.py): the
  backbone as "resnet50." again, its heads fc_edge1..6 and fc_dp1..7 and
  mean_shift.running_mean -> a "relation" checkpoint (or, with arch "backbone", the ResNet-50
  alone). Its aliases differ from the CAM network's: stage1 = (conv1, bn1, relu, maxpool),
  stage2..stage5 = layer1..layer4, backbone = the five stages, edge_layers / dp_layers = the
  heads, fc_dp7.4 = mean_shift. train_irn.py saves the state dict of its loss module, whose
  training-only buffers (path_indices0.., disp_target) are dropped.
  models/relation_net.py has the table of the heads' names.
Any may carry DataParallel's "module." prefix and `num_batches_tracked` entries (ignored).

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
from affinity_jax.models import relation_net
from affinity_jax.models.resnet38 import scaled
from affinity_jax.models.resnet50 import EXPANSION, LAYERS, STEM_CHANNELS, has_downsample

CONVERTIBLE_ARCHS = ("backbone", "cam", "relation")
IRN_PREFIX = "resnet50."
CLASSIFIER = "classifier.weight"
IMAGENET_FC = ("fc.weight", "fc.bias")
# Where IRN's net/resnet50_cam.py registers the ResNet's modules a second time: stage1 =
# Sequential(conv1, bn1, relu, maxpool, layer1), stageN = Sequential(layerN), backbone =
# ModuleList(stage1..stage4), newly_added = ModuleList(classifier).
IRN_STAGE1 = {"0": "conv1", "1": "bn1", "4": "layer1"}
# net/resnet50_irn.py instead: stage1 = Sequential(conv1, bn1, relu, maxpool), stageN =
# Sequential(layer{N-1}) for N = 2..5, backbone = ModuleList(stage1..stage5), edge_layers /
# dp_layers = ModuleList(fc_edge1..6) / (fc_dp1..7), and fc_dp7's fifth module is mean_shift.
RELATION_STAGE1 = {"0": "conv1", "1": "bn1"}
MEAN_SHIFT = f"{relation_net.MEAN_SHIFT}.running_mean"
MEAN_SHIFT_ALIAS = "fc_dp7.4.running_mean"
# A relation network's head tensor in IRN's nn.Sequential: index.tensor -> our path below it.
HEAD_TENSORS = {"0.weight": ("conv", "kernel"), "1.weight": ("norm", "scale"),
                "1.bias": ("norm", "bias")}
DISPLACEMENT_OUT = ("3.weight", ("out", "kernel"))  # fc_dp7's last convolution
# train_irn.py saves AffinityDisplacementLoss's state dict: these buffers hold no weights.
RELATION_TRAINING_BUFFERS = ("path_indices", "disp_target")
# The top-level names only IRN's relation network has (its heads, their lists, its fifth stage).
RELATION_MODULES = (relation_net.BOUNDARY_MODULES | relation_net.DISPLACEMENT_MODULES
                    | {relation_net.MEAN_SHIFT, "edge_layers", "dp_layers", "stage5"})


def _check_arch(arch: str) -> None:
  if arch not in CONVERTIBLE_ARCHS:
    raise ConversionError(f"unknown architecture {arch!r} for ResNet-50: expected one of "
                          f"{', '.join(CONVERTIBLE_ARCHS)}")


def _layout(arch: str, width: float, num_classes: int, head_width: float | None = None
            ) -> list[tuple[str, tuple[int, ...], str, tuple[str, ...]]]:
  """(torchvision name, shape, collection, our path) of every tensor, in torchvision's order;
  a relation network's heads at `head_width` (None: `width`)."""
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
  if arch == "relation":  # in IRN's order: mean_shift, fc_edge1..6, fc_dp1..7
    out.append((MEAN_SHIFT, (relation_net.DISPLACEMENT_CHANNELS,), "batch_stats",
                (relation_net.MEAN_SHIFT, "mean")))
    channels = relation_net.head_channels(width, head_width)
    for name in ([h.name for h in relation_net.BOUNDARY_HEADS] + [relation_net.BOUNDARY_OUT]
                 + [h.name for h in relation_net.DISPLACEMENT_HEADS]):
      cin, cout, _ = channels[name]
      if name == relation_net.BOUNDARY_OUT:  # a plain convolution, with bias
        conv(name, (name,), cout, cin, 1)
        out.append((f"{name}.bias", (cout,), "params", (name, "bias")))
        continue
      for suffix, path in HEAD_TENSORS.items():
        shape = (cout, cin, 1, 1) if path[0] == "conv" else (cout,)
        out.append((f"{name}.{suffix}", shape, "params", (name, *path)))
      if name == "fc_dp7":
        suffix, path = DISPLACEMENT_OUT
        out.append((f"{name}.{suffix}", (relation_net.DISPLACEMENT_CHANNELS, cout, 1, 1),
                    "params", (name, *path)))
  return out


def torchvision_state_dict_shapes(arch: str = "backbone", width: float = 1.0,
                                  num_classes: int = 20, head_width: float | None = None
                                  ) -> dict[str, tuple[int, ...]]:
  """torchvision's ResNet-50 state-dict names and shapes (OIHW) without fc and
  num_batches_tracked, in its order; arch "cam" adds IRN's `classifier.weight`, arch
  "relation" IRN's relation heads (mean_shift.running_mean, fc_edge1..6, fc_dp1..7, in IRN's
  order, without its aliases, its heads at `head_width`, None: `width`). Other widths scale
  every channel count as the models do (names unchanged), for tests."""
  return {name: shape for name, shape, _, _ in _layout(arch, width, num_classes, head_width)}


def _is_relation(names) -> bool:
  """Whether IRN-layout tensor `names` are its relation network's (it has heads and a stage5)."""
  return any(n.split(".")[0] in RELATION_MODULES for n in names)


def _irn_alias(name: str, relation: bool) -> str | None:
  """The canonical name (without "resnet50.") of a tensor IRN's CAM Net (or relation Net, with
  `relation`) registers again under its stage or list modules, or None if `name` is no such
  alias."""
  parts = name.split(".")
  if len(parts) < 3:
    return None
  if not relation:
    if parts[0] == "newly_added" and parts[1] == "0":
      return ".".join(["classifier", *parts[2:]])
    if parts[0] == "backbone" and parts[1] in ("0", "1", "2", "3"):
      parts = [f"stage{int(parts[1]) + 1}", *parts[2:]]
    if len(parts) > 2 and parts[0] == "stage1" and parts[1] in IRN_STAGE1:
      return ".".join([IRN_STAGE1[parts[1]], *parts[2:]])
    if len(parts) > 2 and parts[0] in ("stage2", "stage3", "stage4") and parts[1] == "0":
      return ".".join([f"layer{parts[0][-1]}", *parts[2:]])
    return None
  if name == MEAN_SHIFT_ALIAS:
    return MEAN_SHIFT
  lists = {"edge_layers": "fc_edge", "dp_layers": "fc_dp"}
  if parts[0] in lists and parts[1].isdigit():
    twin = ".".join([f"{lists[parts[0]]}{int(parts[1]) + 1}", *parts[2:]])
    return MEAN_SHIFT if twin == MEAN_SHIFT_ALIAS else twin
  if parts[0] == "backbone" and parts[1] in ("0", "1", "2", "3", "4"):
    parts = [f"stage{int(parts[1]) + 1}", *parts[2:]]
  if len(parts) > 2 and parts[0] == "stage1" and parts[1] in RELATION_STAGE1:
    return ".".join([RELATION_STAGE1[parts[1]], *parts[2:]])
  if (len(parts) > 2 and parts[0] in ("stage2", "stage3", "stage4", "stage5")
      and parts[1] == "0"):
    return ".".join([f"layer{int(parts[0][-1]) - 1}", *parts[2:]])
  return None


def _is_backbone(name: str) -> bool:
  return name.split(".")[0] in ("conv1", "bn1") or name.startswith("layer")


def _canonical(state_dict: Mapping[str, Any], source: str) -> tuple[dict[str, Any], str]:
  """(tensors in torchvision's names plus IRN's heads ("classifier.weight"; fc_edge*, fc_dp*,
  mean_shift.running_mean), "torchvision" or "irn"): the DataParallel prefix,
  num_batches_tracked and IRN's aliases removed."""
  tensors = plain_tensors(state_dict, source)
  if IRN_PREFIX + "conv1.weight" not in tensors:
    return tensors, "torchvision"
  relation = _is_relation(tensors)
  out, aliases = {}, {}
  for name, value in tensors.items():
    if name.startswith(IRN_PREFIX):
      out[name[len(IRN_PREFIX):]] = value
    elif _irn_alias(name, relation) is None:
      out[name] = value  # a head, or a stranger reported as unexpected.
    else:
      aliases[name] = value
  for name, value in aliases.items():
    twin = _irn_alias(name, relation)
    if twin not in out or np.shape(out[twin]) != np.shape(value) or not np.array_equal(
        np.asarray(out[twin]), np.asarray(value)):
      stored = IRN_PREFIX + twin if _is_backbone(twin) else twin
      raise ConversionError(f"{source}: {name} should be the same tensor as {stored} (IRN's "
                            "Net registers its modules more than once), but differs from it")
  return out, "irn"


def _out_channels(state_dict: Mapping[str, Any], names: tuple[str, ...], kernel: str,
                  source: str) -> int | None:
  """The output channels of the first convolution kernel of `names` in `state_dict` (None if
  none is there); a tensor that is no kernel is an error naming it (`kernel`: its expected
  shape, for the message)."""
  for name in names:
    if name in state_dict:
      shape = np.shape(state_dict[name])
      if len(shape) != 4 or shape[0] < 1:
        raise ConversionError(f"{source}: {name} has shape {tuple(shape)}, not a convolution "
                              f"kernel {kernel}")
      return shape[0]
  return None


def infer_width(state_dict: Mapping[str, Any], source: str = "state dict") -> float:
  """conv1's output channels / 64 (1.0 for torchvision's and IRN's files), in either layout."""
  names = tuple(f"{prefix}{irn}conv1.weight" for prefix in ("", MODULE_PREFIX)
                for irn in ("", IRN_PREFIX))
  channels = _out_channels(state_dict, names, "[64, 3, 7, 7]", source)
  if channels is None:
    raise ConversionError(f"{source}: no conv1.weight (nor resnet50.conv1.weight): not "
                          "torchvision's ResNet-50 nor one of IRN's networks")
  return channels / STEM_CHANNELS


def infer_head_width(state_dict: Mapping[str, Any], source: str = "state dict") -> float:
  """A relation network's heads' width: fc_edge1's output channels / 32 (1.0 for IRN's file;
  our relation networks may have heads wider than their backbone, `aff.head_width`)."""
  first = relation_net.BOUNDARY_HEADS[0]
  names = (f"{first.name}.0.weight", f"{MODULE_PREFIX}{first.name}.0.weight")
  channels = _out_channels(state_dict, names, f"[{first.features}, C, 1, 1]", source)
  if channels is None:
    raise ConversionError(f"{source}: no {first.name}.0.weight, IRN's relation network")
  return channels / first.features


def torchvision_to_variables(state_dict: Mapping[str, Any], arch: str = "backbone", *,
                             width: float | None = None, source: str = "state dict"
                             ) -> tuple[dict[str, dict], list[str]]:
  """({"params", "batch_stats"} as float32 numpy, sorted names of the tensors left out).

  state_dict: name -> array (numpy, or anything `np.asarray` takes, e.g. CPU torch tensors) in
    torchvision's or IRN's layout (module docstring).
  arch: "backbone" (fc, or IRN's classifier or relation heads, left out), "cam" (IRN's
    classifier needed; its rows give num_classes) or "relation" (IRN's relation network:
    fc_edge1..6, fc_dp1..7 and mean_shift.running_mean needed; the training-only buffers of
    train_irn.py's loss module, path_indices* and disp_target, are left out).
  width: the model width; None reads it from conv1.
  source: how error messages name the input (e.g. its file name).
  """
  _check_arch(arch)
  tensors, layout = _canonical(state_dict, source)
  width = infer_width(tensors, source) if width is None else width
  dropped = [n for n in IMAGENET_FC if n in tensors]
  if arch == "backbone" and CLASSIFIER in tensors:
    dropped.append(CLASSIFIER)
  relation = layout == "irn" and _is_relation(tensors)
  if relation:
    dropped += [n for n in tensors if n.startswith(RELATION_TRAINING_BUFFERS) or (
        arch == "backbone" and n.split(".")[0] in RELATION_MODULES)]
  if arch == "relation" and not relation:
    hint = ("torchvision's ImageNet file has none: convert it with --arch backbone, IRN "
            "trains the relation network's heads from scratch on it" if layout == "torchvision"
            else "this is IRN's CAM network (res50_cam.pth), not its relation network "
            "(res50_irn.pth)")
    raise ConversionError(f"{source}: no fc_edge1.0.weight, IRN's relation network: {hint}")
  if arch == "cam" and CLASSIFIER not in tensors:
    hint = (": torchvision's ImageNet file has none (its fc is ImageNet's 1000 classes); "
            "convert it with --arch backbone, IRN trains the classifier from scratch"
            if layout == "torchvision" else "")
    raise ConversionError(f"{source}: no {CLASSIFIER}, IRN's CAM classifier{hint}")
  classifier_shape = np.shape(tensors[CLASSIFIER]) if arch == "cam" else (0,)
  head_width = infer_head_width(tensors, source) if arch == "relation" else None
  layout_rows = _layout(arch, width, int(classifier_shape[0]) if classifier_shape else 0,
                        head_width)
  expected = {name: shape for name, shape, _, _ in layout_rows}
  kind = {"cam": "IRN's CAM network", "relation": "IRN's relation network"}.get(
      arch, "torchvision's ResNet-50")
  at = f"width {width:g}" + (f", heads at {head_width:g}" if head_width not in (None, width)
                             else "")

  missing = [n for n in expected if n not in tensors]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ConversionError(f"{source}: missing {missing[0]}{more}: not {kind} at {at} "
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
    raise ConversionError(f"{source}: {name} has shape {got}, expected {want} at {at}{more}")

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
  """Converts torchvision's ResNet-50 (.pth or .npz; "backbone"), IRN's res50_cam.pth ("cam"
  or "backbone") or IRN's res50_irn.pth ("relation" or "backbone") to a resnet50 checkpoint
  folder `out_dir`. Returns the metadata written, whose "dropped" lists the tensors left out
  (fc.weight, fc.bias, ...)."""
  from affinity_jax import checkpoint
  _check_arch(arch)
  state_dict = read_state_dict(in_path)
  variables, dropped = torchvision_to_variables(state_dict, arch, source=in_path)
  width = infer_width(state_dict, in_path)
  # Heads wider than the backbone (aff.head_width) are recorded so that a config with other
  # heads is refused by name (checkpoint.check_compatible).
  extra = {"head_width": infer_head_width(state_dict, in_path)} if arch == "relation" else {}
  num_classes = (int(variables["params"]["classifier"]["kernel"].shape[-1]) if arch == "cam"
                 else None)
  layout = "irn" if any(n.endswith(IRN_PREFIX + "conv1.weight") for n in state_dict) else (
      "torchvision")
  metadata = dict(arch=arch, backbone="resnet50", width=width, num_classes=num_classes,
                  source=f"{layout} {os.path.basename(in_path)}", dropped=dropped, **extra)
  checkpoint.save_variables(out_dir, variables, metadata=metadata)
  return metadata
