"""Loading ml-collections configs: `configs/x.py[:variant]` plus `--config.a.b=value` overrides.

Also the checked reading of keys that more than one stage reads (`aff_image_scale`).

Every config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`; the text
after the colon is passed as `arg` (e.g. `configs/synthetic.py:tiny`). Overrides must name keys
that exist; their values are parsed to the type of the value they replace.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable

import ml_collections

from affinity_jax.errors import ConfigError


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py` or `path.py:arg` and returns its (unlocked) ConfigDict."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found (expected e.g. configs/synthetic.py)")
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
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(old)(value)
  if not isinstance(value, type(old)):
    raise ConfigError(f"--config.{key}: expected {type(old).__name__}, got {text!r}")
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
