"""Network variables on disk: an orbax checkpoint plus a small JSON record of what it holds.

Layout of a checkpoint folder `path/`:
  path/variables/      orbax (StandardCheckpointer) tree {"params": ..., "batch_stats": ...}
  path/metadata.json   {"arch", "backbone" (absent: resnet38), "width", "num_classes", ...;
                        a relation network's "head_width" (absent: its width)}

`save_variables` writes everything into a temporary sibling folder and renames it into place,
so a crash never leaves a half-written checkpoint under `path`. The metadata lets a loader
refuse a checkpoint of the wrong architecture or width before shapes fail somewhere deep in a
jitted function (`check_compatible`).

`load_network` / `save_network` are the trained networks of a workdir (artifacts.Network) with
the config's sizes; `merge_backbone` puts pretrained backbone weights into a network's variables.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from affinity_jax import artifacts, io, models
from affinity_jax.models import relation_net
from affinity_jax.errors import UserError
from affinity_jax.constants import ARCHS

METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"
REQUIRED_METADATA = ("arch", "width", "num_classes", "source")


class CheckpointError(UserError):
  """A checkpoint folder that is missing, damaged or of the wrong kind."""


def _this_process_alone() -> ocp.options.MultiprocessingOptions:
  """orbax's options for a write that one process of a multi-process run does alone (the
  final networks, host arrays written by process 0): no waiting for the others."""
  if jax.process_count() == 1:
    return ocp.options.MultiprocessingOptions()
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                            barrier_sync_key_prefix=f"alone{me}")


def save_variables(path: str, variables: Mapping[str, Any], *, metadata: Mapping[str, Any]) -> None:
  """Writes `variables` ({"params": ..., "batch_stats": ...}) and `metadata` to folder `path`.

  metadata must give arch, width, num_classes (None where meaningless) and source; extra
  JSON-serialisable keys are kept. An existing checkpoint at `path` is replaced.
  """
  missing = [k for k in REQUIRED_METADATA if k not in metadata]
  if missing:
    raise ValueError(f"checkpoint metadata for {path} lacks {', '.join(missing)}")
  if metadata["arch"] not in ARCHS:
    raise ValueError(f"checkpoint metadata for {path}: unknown arch {metadata['arch']!r} "
                     f"(expected one of {', '.join(ARCHS)})")
  meta = dict(metadata)
  meta["width"] = float(meta["width"])
  if meta["num_classes"] is not None:
    meta["num_classes"] = int(meta["num_classes"])
  text = json.dumps(meta, indent=2, sort_keys=True)  # fails here, before anything is written.

  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.exists(os.path.join(path, METADATA_FILE)):
    raise CheckpointError(f"{path} exists and is not an affinity_jax checkpoint; refusing to "
                          "overwrite it")
  parent = os.path.dirname(path)
  io.make_dirs(parent)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
  try:
    tree = jax.tree.map(np.asarray, dict(variables))
    ckptr = ocp.StandardCheckpointer(multiprocessing_options=_this_process_alone())
    try:
      ckptr.save(os.path.join(tmp, VARIABLES_DIR), tree)
      ckptr.wait_until_finished()
      with open(os.path.join(tmp, METADATA_FILE), "w") as f:
        f.write(text)
    except (OSError, ValueError) as e:  # a full or read-only disk; the temporary goes below.
      refused = io.disk_error(path, e)
      if refused is None:
        raise
      raise refused from None
    finally:
      ckptr.close()
    if os.path.exists(path):
      old = tmp + "-old"
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load_metadata(path: str) -> dict:
  """The metadata record of the checkpoint at `path` (CheckpointError if there is none)."""
  file = os.path.join(path, METADATA_FILE)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint folder")
  if not os.path.isfile(file):
    raise CheckpointError(f"{path}: not an affinity_jax checkpoint (no {METADATA_FILE})")
  try:
    with open(file) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{file}: unreadable checkpoint metadata ({e})") from None
  missing = [k for k in REQUIRED_METADATA if k not in meta]
  if missing:
    raise CheckpointError(f"{file}: checkpoint metadata lacks {', '.join(missing)}")
  return meta


def load_variables(path: str) -> tuple[dict, dict]:
  """(variables as numpy arrays, metadata) of the checkpoint folder `path`."""
  meta = load_metadata(path)
  folder = os.path.join(os.path.abspath(path), VARIABLES_DIR)
  if not os.path.isdir(folder):
    raise CheckpointError(f"{path}: checkpoint has no {VARIABLES_DIR}/ folder")
  # Each process reads alone: in a multi-process run a process may load a network that others
  # do not (one whose share of a per-image stage is empty loads none).
  ckptr = ocp.StandardCheckpointer(multiprocessing_options=_this_process_alone())
  try:
    tree = ckptr.restore(folder)
  except Exception as e:  # orbax raises many types for damaged folders; the cause is kept.
    raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
  finally:
    ckptr.close()
  return jax.tree.map(np.asarray, tree), meta


def check_compatible(metadata: Mapping[str, Any], *, arch: str, width: float | None = None,
                     num_classes: int | None = None, path: str = "checkpoint",
                     backbone: str | None = None, head_width: float | None = None) -> None:
  """Raises CheckpointError unless the checkpoint fits the model about to use it.

  arch: the architecture wanted ("backbone", "cam", "affinity", "seg"), matched exactly.
  width / num_classes are checked when given (num_classes only where both sides have classes).
  backbone ("resnet38", "vgg16", "resnet50") is checked when given; checkpoints that record
  none predate VGG-16 and hold ResNet-38. head_width (a relation network's heads, with width)
  is checked by the channels it gives; checkpoints that record none have heads at their width.
  """
  have = metadata.get("arch")
  if have != arch:
    hint = (" (convert the ImageNet weights with `affinity-jax convert mxnet`, `convert "
            "caffe` for VGG-16 or `convert torchvision` for ResNet-50)" if arch == "backbone"
            else "")
    raise CheckpointError(f"{path}: holds a {have!r} network, but a {arch!r} network is "
                          f"needed{hint}")
  have_backbone = metadata.get("backbone", models.DEFAULT_BACKBONE)
  if backbone is not None and have_backbone != backbone:
    raise CheckpointError(f"{path}: holds a {have_backbone} network, but the config's "
                          f"model.backbone is {backbone}")
  if width is not None and not np.isclose(float(metadata.get("width", np.nan)), float(width)):
    raise CheckpointError(f"{path}: was saved at model width {metadata.get('width')}, but the "
                          f"model has width {width} (set model.width to match)")
  if arch == "relation" and width is not None and head_width is not None:
    have = float(metadata.get("head_width", metadata.get("width")))
    if (relation_net.head_channels(width, have)
        != relation_net.head_channels(width, head_width)):
      raise CheckpointError(f"{path}: has its relation heads at width {have:g}, but the "
                            f"config's give {head_width:g} (set aff.head_width to {have:g})")
  have_classes = metadata.get("num_classes")
  if (num_classes is not None and have_classes is not None and arch in ("cam", "seg")
      and int(have_classes) != int(num_classes)):
    raise CheckpointError(f"{path}: has {have_classes} classes, but the model has {num_classes} "
                          "(set model.num_classes to match)")


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


def load_network(cfg, net: artifacts.Network, path: str | None = None) -> tuple[object, dict]:
  """(model, variables) of the trained `net` in the config's workdir (or in the checkpoint
  folder `path`), checked against the config's model section; a user error naming the stage
  to run if it has not been trained."""
  if path is None:
    path = artifacts.Workdir(cfg.workdir).network(net)
    if not os.path.isdir(path):
      raise UserError(f"{path} does not exist: run the {net.stage} stage first "
                      f"(--stages {net.stage})")
  variables, meta = load_variables(path)
  check_compatible(meta, arch=net.arch, width=cfg.model.width,
                   num_classes=cfg.model.num_classes, path=path,
                   backbone=models.backbone_name(cfg), head_width=_head_width(cfg))
  return models.from_config(cfg, net.arch), variables


def save_network(cfg, net: artifacts.Network, variables: dict) -> None:
  """Writes the trained `net` into the config's workdir."""
  save_variables(artifacts.Workdir(cfg.workdir).network(net), variables, metadata=dict(
      arch=net.arch, backbone=models.backbone_name(cfg), width=cfg.model.width,
      num_classes=cfg.model.num_classes, source=f"affinity_jax {net.folder}",
      **({"head_width": _head_width(cfg)} if net.arch == "relation" else {})))


def _head_width(cfg) -> float:
  # Imported here, as in models.from_config: this module loads without ml_collections.
  from affinity_jax import config  # pylint: disable=g-import-not-at-top
  return config.head_width(cfg)
