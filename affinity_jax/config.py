"""Loading ml-collections configs: `NAME[:variant]` or `path/x.py[:variant]`, plus
`--config.a.b=value` overrides.

Also the checked reading of keys that more than one stage reads (`aff_image_scale`).

A NAME (no path separator, no `.py`: `synthetic`, `voc_resnet38:tiny`) is a config shipped with
the package (the checkout's configs/, installed as `affinity_jax.configs`); anything else is a
file path. Every config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`;
the text after the colon is passed as `arg` (e.g. `synthetic:tiny`). Overrides must name keys
that exist; their values are parsed to the type of the value they replace.
"""

from __future__ import annotations

import ast
import difflib
import importlib.resources
import importlib.util
import math
import os
from typing import Any, Iterable

import ml_collections

from affinity_jax.errors import ConfigError


def shipped_configs() -> dict[str, str]:
  """{name: path} of the configs shipped with the package (`affinity_jax.configs`)."""
  try:
    folder = importlib.resources.files("affinity_jax.configs")
  except ModuleNotFoundError:  # a checkout on sys.path that was never installed
    raise ConfigError("the shipped configs (affinity_jax.configs) are not installed: run "
                      "`pip install -e .` in the checkout, or give a config file's path") from None
  return {f.name[:-3]: os.fspath(f) for f in sorted(folder.iterdir(), key=lambda f: f.name)
          if f.name.endswith(".py") and not f.name.startswith("_")}


def config_path(name_or_path: str) -> str:
  """The file of a shipped config's name (`synthetic`), or `name_or_path` itself when it is a
  path (it holds a path separator or ends in `.py`); ConfigError when neither exists."""
  is_path = "/" in name_or_path or os.sep in name_or_path or name_or_path.endswith(".py")
  if is_path and os.path.isfile(name_or_path):
    return name_or_path
  shipped = shipped_configs()
  names = ", ".join(shipped)
  if is_path:
    raise ConfigError(f"config file {name_or_path!r} not found (or name a shipped config: "
                      f"{names})")
  if name_or_path not in shipped:
    raise ConfigError(f"unknown config {name_or_path!r}; shipped configs: {names} (or give "
                      "the path of a .py file)")
  return shipped[name_or_path]


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `NAME`, `path.py`, `NAME:arg` or `path.py:arg`; returns its (unlocked) ConfigDict."""
  name_or_path, _, arg = spec.partition(":")
  path = config_path(name_or_path)
  name = "affinity_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  try:
    config = module.get_config(arg or None)
  except ValueError as e:  # the config files' own messages, e.g. an unknown variant.
    raise ConfigError(str(e)) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


def _parse_value(text: str, old: Any, key: str) -> Any:
  if isinstance(old, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}: expected true/false, got {text!r}")
  if isinstance(old, str) or old is None:
    try:  # None-valued keys may take any literal; strings stay strings.
      return ast.literal_eval(text) if old is None else text
    except (ValueError, SyntaxError):
      return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"--config.{key}: cannot parse {text!r} as {type(old).__name__}") from None
  if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
    # Elements take the type the default's elements share (canvas: ints, scales: floats);
    # a default of mixed or no elements says nothing.
    kinds = {type(v) for v in old}
    if len(kinds) == 1 and kinds <= {int, float, str}:
      kind = kinds.pop()
      try:
        value = [_same_type(v, kind) for v in value]
      except TypeError:
        raise ConfigError(f"--config.{key}: expected a {type(old).__name__} of "
                          f"{kind.__name__}, got {text!r}") from None
    return type(old)(value)
  try:
    return _same_type(value, type(old))
  except TypeError:
    want = "a finite float" if isinstance(old, float) else type(old).__name__
    raise ConfigError(f"--config.{key}: expected {want}, got {text!r}") from None


def _same_type(value: Any, kind: type) -> Any:
  """`value` as a `kind` (ints widen to floats; bools are not numbers here), else TypeError."""
  if kind is float and type(value) is int:
    value = float(value)
  if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
    raise TypeError(value)
  if kind is float and not math.isfinite(value):  # 1e400 parses as inf
    raise TypeError(value)
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies `a.b=value` (a leading `--config.` is optional) in place."""
  for item in overrides:
    text = item[len("--config."):] if item.startswith("--config.") else item
    key, sep, value = text.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} must look like --config.key=value")
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        close = difflib.get_close_matches(key, _all_keys(config), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"config key {key!r} does not exist{hint}")
      if i < len(parts) - 1:
        node = node[part]
    node[parts[-1]] = _parse_value(value, node[parts[-1]], key)


def aff_image_scale(cfg) -> float:
  """The key aff.image_scale, checked: train_aff and random_walk must both resize by it."""
  scale = float(cfg.aff.image_scale)
  if not scale > 0:
    raise ConfigError(f"config key aff.image_scale must be > 0, got {scale}")
  return scale


METHODS = ("psa", "irn")


def method(cfg) -> str:
  """The config's `method`, checked: "psa" (AffinityNet, the default where the key is absent)
  or "irn" (IRN's relation network and its walk at stride 4, docs/method.md §11)."""
  name = cfg.get("method", "psa")
  if name not in METHODS:
    raise ConfigError(f"config key method must be one of {METHODS}, got {name!r}")
  return name


def cam_background(cfg) -> float:
  """The constant background score of CAM-only label maps: eval.cam_background with method irn
  (IRN's eval_cam.py: 0.15), PSA's 0.2 otherwise (cam.CAM_ONLY_BACKGROUND)."""
  if method(cfg) == "irn":
    value = float(cfg.eval.cam_background)
    if not 0 <= value <= 1:
      raise ConfigError(f"config key eval.cam_background must lie in [0, 1], got {value}")
    return value
  return 0.2


def _check(ok: bool, key: str, want: str, value) -> None:
  if not ok:
    raise ConfigError(f"config key {key} must be {want}, got {value!r}")


def head_width(cfg) -> float:
  """The width of the relation network's heads: `aff.head_width`, or model.width where it is 0
  or absent (IRN's configs only; train_aff's key, so that a change retrains no CAM network)."""
  value = cfg.aff.get("head_width", 0.0) if "aff" in cfg else 0.0
  _check(float(value) >= 0, "aff.head_width", ">= 0 (0: model.width)", value)
  return float(value) or float(cfg.model.width)


def validate(cfg) -> None:
  """Checks the keys the library would otherwise reject deep inside a stage (as a bug would:
  with a traceback), so that a bad value is one message naming its key, before any work."""
  # Imported here: config.py is loaded before JAX is needed.
  from affinity_jax.constants import PSA_BACKBONES
  from affinity_jax.geometry import SCHEMES
  from affinity_jax.train import OPTIMIZERS
  for section in ("cam", "aff", "seg"):
    net = cfg[section]
    _check(net.optimizer in OPTIMIZERS, f"{section}.optimizer", f"one of {OPTIMIZERS}",
           net.optimizer)
    _check(int(net.batch_size) > 0, f"{section}.batch_size", "> 0", net.batch_size)
    _check(float(net.lr) > 0, f"{section}.lr", "> 0", net.lr)
    _check(float(net.pretrained_lr_mult) >= 0, f"{section}.pretrained_lr_mult", ">= 0",
           net.pretrained_lr_mult)
    jitter = net.get("color_jitter")
    _check(not jitter or len(jitter) == 4, f"{section}.color_jitter",
           "4 numbers (brightness, contrast, saturation, hue) or empty", jitter)
  for section in ("aff", "random_walk"):
    _check(cfg[section].scheme in SCHEMES, f"{section}.scheme", f"one of {SCHEMES}",
           cfg[section].scheme)
    radius = cfg[section].radius
    _check(int(radius) == radius and radius >= 2, f"{section}.radius", "an integer >= 2",
           radius)
  logt = cfg.random_walk.logt
  _check(int(logt) == logt and logt >= 0, "random_walk.logt", "an integer >= 0", logt)
  _check(float(cfg.model.width) > 0, "model.width", "> 0", cfg.model.width)
  head_width(cfg)
  # PSA's stages run ResNet-38 or VGG-16; IRN's run ResNet-50 (docs/method.md §11).
  backbone = cfg.model.get("backbone", "resnet38")
  if method(cfg) == "irn":
    _check(backbone == "resnet50", "model.backbone", "resnet50 with method irn", backbone)
    # IRN's pair set ("psa") takes pairs from rows 0..h-r and columns r-1..w-r of the crop's
    # stride-4 grid: a grid narrower than 2r - 1 has none, and the loss would train nothing.
    _check(int(cfg.aff.crop_size) % 4 == 0 and cfg.aff.crop_size > 0, "aff.crop_size",
           "a positive multiple of 4 with method irn (the relation network's stride)",
           cfg.aff.crop_size)
    # The relation network never trains its backbone: it must come from somewhere.
    _check(bool(cfg.init.backbone) or bool(cfg.init.from_cam_net), "init.backbone",
           "a converted ResNet-50 (affinity-jax convert torchvision) with method irn, or "
           "init.from_cam_net True: the relation network's backbone is frozen, and a random one "
           "would never learn", cfg.init.backbone)
    # With dCRF (not IRN's) the label scores are divided by their sum at each pixel, which the
    # constant background keeps positive.
    threshold = cfg.random_walk.bg_threshold
    _check(0 < float(threshold) <= 1 if cfg.random_walk.crf else 0 <= float(threshold) <= 1,
           "random_walk.bg_threshold",
           "in (0, 1] with random_walk.crf (dCRF takes the scores divided by their sum)"
           if cfg.random_walk.crf else "in [0, 1] (the walked scores' maximum is 1)", threshold)
    threshold = cfg.random_walk.get("instance_bg_threshold", 0.25)
    _check(0 <= float(threshold) <= 1, "random_walk.instance_bg_threshold",
           "in [0, 1] (the walked scores' maximum is 1)", threshold)
    grid, radius = int(cfg.aff.crop_size) // 4, int(cfg.aff.radius)
    _check(cfg.aff.scheme != "psa" or grid >= 2 * radius - 1, "aff.crop_size",
           f"at least 4 * (2 * aff.radius - 1) = {4 * (2 * radius - 1)} with aff.scheme psa "
           f"and aff.radius {radius} (IRN's pair set needs a grid of {2 * radius - 1} cells; "
           "or lower aff.radius, or use aff.scheme full)", cfg.aff.crop_size)
  else:
    _check(backbone in PSA_BACKBONES, "model.backbone",
           f"one of {PSA_BACKBONES} with method psa (resnet50 is IRN's: method irn)", backbone)
  canvas = cfg.data.canvas
  _check(len(canvas) == 2 and all(int(c) == c and c > 0 for c in canvas), "data.canvas",
         "(height, width) in positive pixels", canvas)
  aff_image_scale(cfg)
