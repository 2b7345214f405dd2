"""What the stages share: the workdir layout, the dataset, model set-up and per-image bookkeeping."""

from __future__ import annotations

import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import checkpoint, models
from affinity_jax.errors import UserError

# Workdir layout (one folder per stage output).
CAM_NET, AFF_NET, SEG_NET = "cam_net", "aff_net", "seg_net"
CAMS, AFF_LABELS, PSEUDO_LABELS, SEG_PRED, PANELS, REPORTS = (
    "cams", "aff_labels", "pseudo_labels", "seg_pred", "panels", "reports")
ARCH = {CAM_NET: "cam", AFF_NET: "affinity", SEG_NET: "seg"}


def path(cfg, *parts: str) -> str:
  return os.path.join(cfg.workdir, *parts)


def final_path(cfg, net: str) -> str:
  """The trained network's variables (orbax), written once training has finished."""
  return path(cfg, net, "final")


def builder(cfg):
  from affinity_jax import data
  options = dict(cfg.data.options)
  if cfg.data.manual_dir:
    options["manual_dir"] = cfg.data.manual_dir
  b = data.get_builder(cfg.data.name, data_dir=cfg.data.data_dir or None, **options)
  if data.num_classes(b) != cfg.model.num_classes:
    raise UserError(f"dataset {cfg.data.name} has {data.num_classes(b)} classes but "
                    f"model.num_classes is {cfg.model.num_classes}; set --config.model.num_classes="
                    f"{data.num_classes(b)}")
  return b


def split_names(cfg, split: str) -> list[str]:
  """Image names of a split, in the dataset's order (decodes no image)."""
  from affinity_jax import data
  return data.split_names(builder(cfg), split)


def dtype(cfg):
  try:
    return jnp.dtype(cfg.model.dtype)
  except TypeError:
    raise UserError(f"config key model.dtype: unknown dtype {cfg.model.dtype!r} "
                    "(use float32 or bfloat16)") from None


def make_model(cfg, arch: str):
  return models.build(arch, num_classes=cfg.model.num_classes, width=cfg.model.width,
                      dtype=dtype(cfg))


def init_variables(cfg, arch: str, crop_size: int, calibration_images=None) -> dict:
  """Random initialisation, then the ImageNet backbone from `cfg.init.backbone` if given.

  Without a backbone, the frozen BatchNorm statistics are calibrated on `calibration_images`
  (see `calibrate_batch_norm`): the original never trains from scratch, and a frozen identity
  BatchNorm would leave the network's signal unnormalised.
  """
  model = make_model(cfg, arch)
  variables = models.init_variables(model, jax.random.key(cfg.seed), (1, crop_size, crop_size, 3))
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  if cfg.init.backbone:
    backbone, meta = checkpoint.load_variables(cfg.init.backbone)
    checkpoint.check_compatible(meta, arch="backbone", width=cfg.model.width,
                                path=cfg.init.backbone)
    variables = merge_backbone(variables, backbone, cfg.init.backbone)
  elif calibration_images is not None:
    variables = calibrate_batch_norm(model, variables, calibration_images)
  return jax.device_get(variables)


def calibrate_batch_norm(model, variables: dict, images) -> dict:
  """Sets every FrozenBatchNorm's mean/var to the statistics of its input on `images`.

  One forward pass in which each BatchNorm first records the per-channel mean and variance of
  what reaches it and then normalises with them, so every later layer sees the already
  calibrated earlier ones (sequential calibration in a single pass). Scale and bias stay as
  initialised (1, 0). Used only for from-scratch training (the synthetic default).
  """
  import flax.linen as nn
  from affinity_jax.models.resnet38 import FrozenBatchNorm

  def record_statistics(next_fun, args, kwargs, context):
    if isinstance(context.module, FrozenBatchNorm) and context.method_name == "__call__":
      x = args[0].astype(jnp.float32)
      context.module.put_variable("batch_stats", "mean", x.mean(axis=(0, 1, 2)))
      context.module.put_variable("batch_stats", "var", x.var(axis=(0, 1, 2)))
    return next_fun(*args, **kwargs)

  @jax.jit
  def calibrate(variables, images):
    with nn.intercept_methods(record_statistics):
      _, updated = model.apply(variables, images, mutable=["batch_stats"])
    return updated["batch_stats"]

  return {"params": variables["params"],
          "batch_stats": calibrate(variables, jnp.asarray(images, jnp.float32))}


def merge_backbone(variables: dict, backbone: dict, source: str) -> dict:
  """Overwrites the backbone part of `variables` with `backbone`, strictly by name and shape."""
  out = {}
  for collection, tree in variables.items():
    src = backbone.get(collection, {})
    merged = dict(tree)
    for name, sub in src.items():
      if name not in tree:
        raise UserError(f"{source}: backbone module {collection}/{name} is not in the model")
      want = jax.tree.map(np.shape, tree[name])
      got = jax.tree.map(np.shape, sub)
      if want != got:
        raise UserError(f"{source}: {collection}/{name} has shapes {got}, the model wants "
                        f"{want} (wrong width?)")
      merged[name] = sub
    out[collection] = merged
  return out


def load_trained(cfg, net: str) -> tuple[object, dict]:
  """(model, variables) of a trained network; a clear error if the stage has not run."""
  p = final_path(cfg, net)
  if not os.path.isdir(p):
    stage = {CAM_NET: "train_cam", AFF_NET: "train_aff", SEG_NET: "train_seg"}[net]
    raise UserError(f"{p} does not exist: run the {stage} stage first (--stages {stage})")
  variables, meta = checkpoint.load_variables(p)
  checkpoint.check_compatible(meta, arch=ARCH[net], width=cfg.model.width,
                              num_classes=cfg.model.num_classes, path=p)
  return make_model(cfg, ARCH[net]), variables


def save_trained(cfg, net: str, variables: dict) -> None:
  checkpoint.save_variables(final_path(cfg, net), variables, metadata=dict(
      arch=ARCH[net], width=cfg.model.width, num_classes=cfg.model.num_classes,
      source=f"affinity_jax {net}"))


def missing(names: Iterable[str], folder: str, suffix: str) -> list[str]:
  """Names whose output file `{folder}/{name}{suffix}` does not exist yet."""
  from affinity_jax import io
  io.remove_stale_temporaries(folder)
  return [n for n in names if not os.path.exists(os.path.join(folder, n + suffix))]


class NonFiniteOutputError(RuntimeError):
  """A trained network gives NaN or Inf outputs; the message names it and what to redo."""


class SkipReport:
  """The images a stage passes over, each with its reason (a bad image costs one image, not a run).

  `skip(name, reason)` records and prints one; `finish(summary)` writes
  `{workdir}/reports/{stage}.json` ({"stage", "count", "skipped": {name: reason}}) atomically and
  puts the count in the stage's summary. A skipped image has no output, so a rerun examines it
  again: the report always lists what the latest run of the stage could not do.
  """

  def __init__(self, cfg, stage: str):
    self.stage = stage
    self.path = path(cfg, REPORTS, stage + ".json")
    self.skipped: dict[str, str] = {}

  def skip(self, name: str, reason: str) -> None:
    old = self.skipped.get(name)
    self.skipped[name] = reason if old in (None, reason) else f"{old}; {reason}"
    print(f"[{self.stage}] skipping {name}: {reason}", flush=True)

  def finish(self, summary: dict) -> dict:
    from affinity_jax import io
    if jax.process_index() == 0:
      io.save_json(self.path, {"stage": self.stage, "count": len(self.skipped),
                               "skipped": dict(sorted(self.skipped.items()))})
    if self.skipped:
      print(f"[{self.stage}] skipped {len(self.skipped)} image(s); see {self.path}", flush=True)
    return {**summary, "skipped": len(self.skipped)}


def skipped_by(cfg, stage: str) -> frozenset[str]:
  """Names that `stage` listed in its report (empty if it wrote none)."""
  import json
  p = path(cfg, REPORTS, stage + ".json")
  if not os.path.exists(p):
    return frozenset()
  try:
    with open(p) as f:
      return frozenset(json.load(f)["skipped"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{p}: unreadable stage report ({e}); delete it and rerun {stage}") from None


def has_positive_class(label) -> bool:
  return bool(np.any(np.asarray(label) > 0))


def aff_image_scale(cfg) -> float:
  """The config key aff.image_scale, checked (train_aff and random_walk must agree on it)."""
  scale = float(cfg.aff.image_scale)
  if not scale > 0:
    raise UserError(f"config key aff.image_scale must be > 0, got {scale}")
  return scale


NO_POSITIVE_CLASS = "no positive class in its image-level label"


def steps_for(net_cfg, num_examples: int) -> int:
  if net_cfg.steps > 0:
    return int(net_cfg.steps)
  return max(1, int(net_cfg.epochs) * num_examples // int(net_cfg.batch_size))


def local_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise UserError(f"batch size {global_batch} is not divisible by the {jax.process_count()} "
                    "hosts")
  return global_batch // jax.process_count()
