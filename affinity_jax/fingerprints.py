"""Stage fingerprints: every output is keyed on what it was made from, so none is ever stale.

A stage's record `{workdir}/fingerprints/{stage}.json` holds its *inputs* (the config keys the
stage reads, the dataset, the fingerprint of every stage whose outputs it consumes, and the
version of the stage's code when it is past 1) and their hash, the *fingerprint*. A stage module
bumps its `VERSION` when the same inputs give other outputs than before (a fix), so outputs of
an older affinity_jax count as changed, never as current. The runner (stages/__init__.py)
writes the record before the stage runs (`complete: false`) and again when the stage has
finished (`complete: true`, its seconds).
Before a stage runs:

* same fingerprint: its outputs are reused and it does only what is missing, as always;
* another fingerprint while outputs exist: `on_change = "error"` (the default) stops with the
  changed keys, their old and new values and the command that redoes the stage; `"redo"`
  deletes the stage's outputs and runs it again; `"keep"` adopts the outputs as they are;
* every consumed stage must have finished, and be the run that its own consumers saw:
  a stage made from an older upstream run (say seg_pred from yesterday's pseudo labels) is
  never mixed with a newer one.

A trained network that no stage of this workdir made (converted from the original's weights,
say) counts by the identity of its files (names and contents).
This module imports no JAX.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Mapping, Sequence

from affinity_jax import artifacts, io
from affinity_jax.errors import UserError

ON_CHANGE = ("error", "redo", "keep")
# Keys that never change a result: how often to log, draw TensorBoard pictures or save, how
# many dCRF workers.
_NO_EFFECT = ("checkpoint_every", "log_every", "workers", "image_every")


def config_values(cfg, keys: Sequence[str]) -> dict[str, Any]:
  """{key: value} of the config keys (a section stands for all its leaves), JSON-able."""
  out = {}
  for key in keys:
    node = cfg
    for part in key.split("."):
      if part not in node:
        raise UserError(f"the config has no key {key}, which a stage's outputs depend on")
      node = node[part]
    if hasattr(node, "items"):
      for leaf, value in node.items():
        if leaf not in _NO_EFFECT:
          out[f"{key}.{leaf}"] = _plain(value)
    else:
      out[key] = _plain(node)
  return out


def _plain(value):
  if hasattr(value, "items"):
    return {k: _plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def digest(inputs: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_digest(info) -> str:
  """What a prepared dataset (its tfds `DatasetInfo`) counts as in the records: its name,
  config and version, and its metadata (what its build left out or converted: a fixed file
  changes it)."""
  return digest({"name": info.full_name, "metadata": dict(info.metadata or {})})


def network_identity(path: str) -> str | None:
  """A hash of a network folder's files (names and contents): a copy has the same identity."""
  if not os.path.isdir(path):
    return None
  h = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for f in sorted(files):
      h.update(os.path.relpath(os.path.join(root, f), path).encode() + b"\0")
      with open(os.path.join(root, f), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
          h.update(block)
  return h.hexdigest()[:16]


def load_record(workdir: artifacts.Workdir, stage: str) -> dict | None:
  path = workdir.fingerprint(stage)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    record["fingerprint"], record["inputs"]  # pylint: disable=pointless-statement
    return record
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: unreadable fingerprint record ({e}); delete it and rerun "
                    f"{stage} with --config.on_change=redo") from None


def save_record(workdir: artifacts.Workdir, record: Mapping[str, Any]) -> None:
  io.save_json(workdir.fingerprint(record["stage"]), dict(record))


def upstream_fingerprint(workdir: artifacts.Workdir, stage: str) -> str | None:
  """The fingerprint of `stage`'s outputs as a consumer sees them."""
  record = load_record(workdir, stage)
  if record is not None:
    return record["fingerprint"]
  net = next((n for n in artifacts.NETWORKS if n.stage == stage), None)
  if net is not None:  # a network put there by hand (converted weights): its files.
    identity = network_identity(workdir.network(net))
    return None if identity is None else "files:" + identity
  return None


def make_record(cfg, stage: str, reads: Sequence[str], consumes: Sequence[str],
                dataset: str, version: int = 1) -> dict:
  workdir = artifacts.Workdir(cfg.workdir)
  inputs = {"config": config_values(cfg, reads), "dataset": dataset,
            "upstream": {s: upstream_fingerprint(workdir, s) for s in consumes}}
  if version != 1:  # Records written before versions existed are version 1.
    inputs["version"] = version
  if "init.backbone" in inputs["config"] and cfg.init.backbone:
    # The pretrained weights count by their files alone: a file replaced in place is a change,
    # the same files elsewhere (a moved checkout, the shipped backbone of another clone) are not.
    identity = network_identity(cfg.init.backbone)
    if identity is not None:
      del inputs["config"]["init.backbone"]
    inputs["backbone"] = identity
  return {"stage": stage, "fingerprint": digest(inputs), "inputs": inputs, "complete": False}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """'key: old -> new' lines between two records' inputs."""
  def flat(inputs):
    out = {f"--config.{k}": v for k, v in inputs["config"].items()}
    out["dataset"] = inputs["dataset"]
    out["the stage's code version"] = inputs.get("version", 1)
    if "backbone" in inputs:
      out["the files of --config.init.backbone"] = inputs["backbone"]
    out.update({f"the {s} run": v for s, v in inputs["upstream"].items()})
    return out
  a, b = flat(old["inputs"]), flat(new["inputs"])
  return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def downstream(stage: str, consumes: Mapping[str, Sequence[str]]) -> list[str]:
  """The stages that consume `stage`'s outputs, directly or through others, in `consumes`
  order ({stage: the stages it consumes}, in pipeline order)."""
  found = []
  for s, ups in consumes.items():
    if any(u == stage or u in found for u in ups):
      found.append(s)
  return found


def _command(extra: str) -> str:
  args = [a for a in sys.argv[1:] if not a.startswith("--config.on_change")]
  return "affinity-jax " + " ".join(args + [extra])


def check_consumed(workdir: artifacts.Workdir, stage: str, consumes: Sequence[str]) -> None:
  """Every consumed stage that ran here finished, and so did everything upstream of it, each
  from the upstream runs whose outputs exist now (no mixing of runs anywhere in the chain)."""
  checked = set()

  def check(s: str, consumer: str) -> None:
    if s in checked:
      return
    checked.add(s)
    record = load_record(workdir, s)
    if record is None:
      return
    if not record.get("complete"):
      raise UserError(f"{consumer} needs the outputs of {s}, whose last run did not finish; "
                      f"run it first (--stages {s})")
    for up, seen in record["inputs"]["upstream"].items():
      if seen is not None and upstream_fingerprint(workdir, up) != seen:
        raise UserError(
            f"{stage} would mix runs: the outputs of {s} were made from an earlier run of {up} "
            f"than the one in {workdir.root} now. Redo {s} and the stages after it first, e.g. "
            f"{_command('--stages ' + s + ',...,' + stage)}")
      check(up, s)

  for s in consumes:
    check(s, stage)


def prepare(cfg, stage: str, record: dict, outputs_exist: bool, reuses_outputs: bool = True
            ) -> str:
  """Compares `record` with the stage's last one; returns "same", "new" or "redo".

  "redo" means the caller must delete the stage's outputs (and those of the stages after it)
  before running it. Raises a UserError (on_change = "error") when outputs made from other
  inputs exist. A stage that rewrites all its outputs every run (`reuses_outputs` False: the
  evaluation) is simply redone.
  """
  workdir = artifacts.Workdir(cfg.workdir)
  on_change = cfg.get("on_change", "error")
  if on_change not in ON_CHANGE:
    raise UserError(f"config key on_change must be one of {', '.join(ON_CHANGE)}, got "
                    f"{on_change!r}")
  old = load_record(workdir, stage)
  if old is not None and old["fingerprint"] == record["fingerprint"]:
    return "same"
  if not outputs_exist:
    return "new"
  if not reuses_outputs:
    return "redo"
  if on_change == "keep":
    why = "no fingerprint record" if old is None else "inputs changed"
    print(f"[{stage}] {why}; keeping its outputs as they are (on_change=keep)", flush=True)
    return "new"
  if on_change == "redo":
    print(f"[{stage}] inputs changed; deleting its outputs and redoing it (on_change=redo)",
          flush=True)
    return "redo"
  if old is None:
    raise UserError(
        f"{stage}: {workdir.root} holds outputs of {stage} with no fingerprint record (made by "
        "an older affinity_jax, or by hand), so they may not match this config. Redo them "
        f"with: {_command('--config.on_change=redo')} (or adopt them as they are with "
        "--config.on_change=keep)")
  lines = "\n  ".join(changes(old, record))
  raise UserError(
      f"{stage}: its outputs in {workdir.root} were made from other inputs:\n  {lines}\n"
      f"Redo {stage} and what depends on it with: {_command('--config.on_change=redo')}\n"
      "(or restore the old values; --config.on_change=keep adopts the outputs as they are)")
