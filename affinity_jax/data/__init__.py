"""Datasets (tfds builders) and their tf.data pipelines.

`voc2012_aug` reads a local PASCAL VOC 2012 + SBD copy; `synthetic_wsss` is generated from a seed.
Both yield the same features (image, name, label, mask, has_mask), so stages treat them alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os

import tensorflow_datasets as tfds

from affinity_jax.data.synthetic import SyntheticConfig, SyntheticWsss
from affinity_jax.data.voc import Voc2012Aug, VocConfig
from affinity_jax.errors import ConfigError, UserError

_BUILDERS = {"voc2012_aug": (Voc2012Aug, VocConfig), "synthetic_wsss": (SyntheticWsss,
                                                                        SyntheticConfig)}


def get_builder(name: str, data_dir: str | os.PathLike | None = None, *,
                config: str | None = None, manual_dir: str | os.PathLike | None = None,
                prepare: bool = True, **options) -> tfds.core.DatasetBuilder:
  """A prepared builder by dataset name, named config and/or knobs (fields of its config).

  `get_builder("synthetic_wsss", d)` is the default config; `config="tiny"` a named one;
  knobs such as `num_classes=7, size_range=(96, 160)` start from the named config (or the
  default) and make a new config whose name encodes the knobs, so different knobs never share
  prepared files. `manual_dir` is where `voc2012_aug` finds the local VOC / SBD copy.
  With `prepare` (the default) the dataset is generated into `data_dir` unless it is there.
  """
  if name not in _BUILDERS:
    raise UserError(f"unknown dataset {name!r}; known: {sorted(_BUILDERS)}")
  cls, config_cls = _BUILDERS[name]
  named = {c.name: c for c in cls.BUILDER_CONFIGS}
  base_name = config or cls.DEFAULT_CONFIG_NAME
  if base_name not in named:
    raise UserError(f"dataset {name}: unknown config {base_name!r}; known: {sorted(named)}")
  data_dir = os.fspath(data_dir) if data_dir is not None else None
  if not options:
    return _prepared(lambda: cls(config=base_name, data_dir=data_dir), manual_dir, prepare)
  fields = {f.name for f in dataclasses.fields(config_cls)} - {
      "name", "version", "release_notes", "supported_versions", "description", "tags"}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise UserError(f"dataset {name}: unknown option(s) {unknown}; known: {sorted(fields)}")
  options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
  base = named[base_name]
  knobs = {f: getattr(base, f) for f in sorted(fields)}
  knobs.update(options)
  digest = hashlib.sha1(json.dumps(knobs, sort_keys=True, default=str).encode()).hexdigest()[:10]
  custom = config_cls(name=f"{base_name}_{digest}", description=f"{base_name} with {options}",
                      **knobs)
  return _prepared(lambda: cls(config=custom, data_dir=data_dir), manual_dir, prepare)


@contextlib.contextmanager
def _preparing(builder):
  """Holds, blocking, the lock of one dataset config's preparation: runs started side by side
  (other workdirs, other seeds) on a dataset not yet built build it once; without the lock
  the second one's tfds stopped on the rename of its finished copy ("already exists")."""
  # data_dir is {root}/{name}/{config}/{version}; the lock sits next to the config's folder.
  config_dir = os.path.dirname(builder.data_dir)
  if "://" in config_dir:  # a bucket (gs://...) has no flock: prepare it from one process first
    yield
    return
  os.makedirs(os.path.dirname(config_dir), exist_ok=True)
  fd = os.open(config_dir + ".prepare.lock", os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel however the holder ends
    yield
  finally:
    os.close(fd)


def _prepared(make_builder, manual_dir, prepare: bool):
  builder = make_builder()
  if not prepare or builder.is_prepared():
    return builder
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) and not manual_dir:
    raise UserError(f"dataset {builder.name} is not prepared in {builder.data_dir}; set "
                    "data.manual_dir to the folder holding VOCdevkit/ (and benchmark_RELEASE/) "
                    "to build it")
  if manual_dir and not os.path.isdir(manual_dir):
    raise UserError(f"dataset {builder.name}: data.manual_dir {manual_dir} does not exist")
  if manual_dir and not os.listdir(manual_dir):  # tfds would stop with an AssertionError
    raise UserError(f"dataset {builder.name}: data.manual_dir {manual_dir} is empty; it must "
                    "hold VOCdevkit/ (and benchmark_RELEASE/)")
  with _preparing(builder):
    builder = make_builder()  # another process may have built it while this one waited
    if not builder.is_prepared():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(manual_dir) if manual_dir else None))
  return builder


def from_config(cfg, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The prepared builder of the config's `data` section, checked against `model.num_classes`
  (with `prepare` False, the builder as it is, prepared or not)."""
  options = dict(cfg.data.options)
  if cfg.data.manual_dir:
    options["manual_dir"] = cfg.data.manual_dir
  builder = get_builder(cfg.data.name, data_dir=cfg.data.data_dir or None, prepare=prepare,
                        **options)
  if not builder.is_prepared():
    return builder
  if num_classes(builder) != cfg.model.num_classes:
    raise ConfigError(f"dataset {cfg.data.name} has {num_classes(builder)} classes but "
                      f"model.num_classes is {cfg.model.num_classes}; set "
                      f"--config.model.num_classes={num_classes(builder)}")
  return builder


def describe(builder: tfds.core.DatasetBuilder) -> str:
  """Where a prepared dataset lies and its number of examples per split, as printed by
  `affinity-jax prepare`; images a VOC build left out (unreadable files) are counted too."""
  lines = [f"dataset {builder.name}/{builder.builder_config.name} {builder.version} "
           f"in {builder.data_dir}"]
  left_out = builder.info.metadata.get("left_out", {}) if builder.info.metadata else {}
  for split, info in sorted(builder.info.splits.items()):
    dropped = len(left_out.get(split, {}))
    note = f" ({dropped} left out: unreadable files)" if dropped else ""
    lines.append(f"  {split}: {info.num_examples} examples{note}")
  return "\n".join(lines)


def split_names(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
  """Image names of a split (or sub-split) in the dataset's stored order; decodes no image."""
  if isinstance(split, str) and split.split("[")[0] not in builder.info.splits:
    raise UserError(f"dataset {builder.name} has no split {split!r}; it has "
                    f"{sorted(builder.info.splits)}")
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders={
      "image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()})
  return [n.decode() for n in ds.map(lambda ex: ex["name"]).as_numpy_iterator()]


def class_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
  """Foreground class names in label order (background, index 0 of masks, not included)."""
  return tuple(builder.class_names)


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
  """Foreground classes: the length of the multi-hot label."""
  return len(class_names(builder))
