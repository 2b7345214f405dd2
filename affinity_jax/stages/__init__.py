"""The pipeline's stages, in order. Each is a module with `run(cfg) -> dict` (its summary).

train_cam -> infer_cam -> aff_labels -> train_aff -> random_walk -> train_seg -> infer_seg
-> evaluate. A stage skips when its outputs are complete and otherwise redoes only what is
missing, so rerunning a command after a crash or a pre-emption continues where it stopped.
Stages share files (affinity_jax.artifacts), never code: no stage imports another.
`training.py` is what the three training stages have in common.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time

from affinity_jax.errors import ConfigError, UserError

ORDER = ("train_cam", "infer_cam", "aff_labels", "train_aff", "random_walk", "train_seg",
         "infer_seg", "evaluate")


def parse_stages(text: str) -> list[str]:
  if text in ("", "all"):
    return list(ORDER)
  names = [s.strip() for s in text.split(",") if s.strip()]
  unknown = [s for s in names if s not in ORDER]
  if unknown:
    raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(ORDER)}")
  return [s for s in ORDER if s in names]


def reads(module, cfg) -> tuple[str, ...]:
  """The config keys a stage's outputs are made from: its READS, and with method irn its
  IRN_READS (keys that only IRN's configs have) and, of its IRN_READS_WHEN {key: keys}, the
  keys whose switch `key` is on."""
  from affinity_jax import config, fingerprints
  if config.method(cfg) != "irn":
    return tuple(module.READS)
  extra = list(getattr(module, "IRN_READS", ()))
  switches = getattr(module, "IRN_READS_WHEN", {})
  values = fingerprints.config_values(cfg, tuple(switches))
  for switch, keys in switches.items():
    if values[switch]:
      extra.extend(keys)
  return tuple(module.READS) + tuple(extra)


def version(module, cfg) -> int | str:
  """The version of a stage's code (fingerprints.py): its VERSION, and with method irn also its
  IRN_VERSION where it has one ("2+irn3"): a change to IRN's path alone leaves PSA's outputs
  current, a change to both paths (VERSION) makes IRN's outputs old too."""
  from affinity_jax import config
  base = int(getattr(module, "VERSION", 1))
  if config.method(cfg) == "irn" and hasattr(module, "IRN_VERSION"):
    return f"{base}+irn{int(module.IRN_VERSION)}"
  return base


def run_stages(cfg, names: list[str]) -> dict[str, dict]:
  """Runs `names` in pipeline order, holding the workdir's lock; returns their summaries.

  Each stage runs only if its inputs match the record of its outputs, or there are none
  (affinity_jax/fingerprints.py). results.json gets the fingerprints and seconds of the runs
  it scored. In a multi-process run (affinity_jax/distributed.py) every process calls this:
  process 0 holds the lock, prepares the dataset, decides each stage's fate and writes the
  records; each stage starts on all processes together and ends when the last one is done.
  """
  from affinity_jax import distributed, io, workdir_lock
  io.check_writable_dir(cfg.workdir)  # a read-only or misplaced workdir: one message, no work
  lock = workdir_lock.hold(cfg.workdir) if distributed.is_main() else contextlib.nullcontext()
  with lock:
    return _run_locked(cfg, names)


def _dataset(cfg):
  """The config's prepared dataset: made by process 0 alone while the others wait."""
  from affinity_jax import data, distributed
  if distributed.is_main():
    builder = data.from_config(cfg)
  distributed.barrier("dataset prepared")
  problem = None
  if not distributed.is_main():
    builder = data.from_config(cfg, prepare=False)
    if not builder.is_prepared():
      problem = (
          f"process {distributed.index()} does not see the dataset process 0 prepared in "
          f"{builder.data_dir}: data.data_dir must be a folder every process sees (a mounted "
          "bucket, a shared file system)")
  if distributed.count() > 1:
    _all_or_none("dataset seen", problem)
  return builder


def _check_shared_workdir(cfg) -> None:
  """Every process must see the files process 0 writes in the workdir."""
  from affinity_jax import distributed, io
  path = os.path.join(cfg.workdir, ".shared-check")

  def write():
    token = f"{os.uname().nodename} {os.getpid()} {time.time_ns()}"
    io.save_text(path, token)
    return token
  token = distributed.broadcast("workdir shared", write)
  try:
    with open(path) as f:
      seen = f.read()
  except OSError:
    seen = None
  problem = None if seen == token else (
      f"process {distributed.index()} does not see the workdir {cfg.workdir} that process 0 "
      f"writes ({path} is {'missing' if seen is None else 'another file'} there): the "
      "workdir must be a folder every process sees (a mounted bucket, a shared file system)")
  _all_or_none("workdir seen", problem)


def _all_or_none(name: str, problem: str | None) -> None:
  """Raises on every process the first process's `problem` (None: none), so that a check that
  fails on one process stops all of them at once."""
  from affinity_jax import distributed
  problems = [p for p in distributed.gather(name, problem) if p]
  if problems:
    raise UserError(problems[0])


def _run_locked(cfg, names: list[str]) -> dict[str, dict]:
  import jax
  from affinity_jax import artifacts, config, distributed, fingerprints, io
  main_process = distributed.is_main()
  config.validate(cfg)
  workdir = artifacts.Workdir(cfg.workdir)
  if distributed.count() > 1:
    print(f"== {distributed.count()} processes, {jax.device_count()} devices "
          f"({jax.local_device_count()} per process); process 0 reports", flush=True)
  if main_process:
    # Temporaries of writers killed in an earlier run. Only now, before any stage starts: a
    # temporary file seen later may be another process's file being written.
    for folder in ("", artifacts.REPORTS, artifacts.PANELS, artifacts.FINGERPRINTS,
                   *artifacts.PER_IMAGE_FOLDERS):
      io.remove_stale_temporaries(workdir.path(folder))
  if distributed.count() > 1:
    _check_shared_workdir(cfg)
  dataset = fingerprints.dataset_digest(_dataset(cfg).info)
  modules = {s: importlib.import_module(f"affinity_jax.stages.{s}") for s in ORDER}
  consumes = {s: m.CONSUMES for s, m in modules.items()}
  t0 = time.time()
  summaries = {}
  for name in names:
    module = modules[name]
    record = fingerprints.make_record(cfg, name, reads(module, cfg), module.CONSUMES, dataset,
                                      version(module, cfg))

    def decide(name=name, record=record):
      """Process 0: the stage's verdict, acted on before any process starts the stage."""
      fingerprints.check_consumed(workdir, name, modules[name].CONSUMES)
      verdict = fingerprints.prepare(cfg, name, record, bool(workdir.stage_outputs(name)),
                                     reuses_outputs=name != "evaluate")
      if verdict == "redo":  # This stage's outputs, and all made from them, are invalid.
        for s in [name] + fingerprints.downstream(name, consumes):
          workdir.remove_stage_outputs(s)
      old = fingerprints.load_record(workdir, name) if verdict == "same" else None
      if verdict != "same":
        fingerprints.save_record(workdir, record)
      if name == names[0]:  # The config of this run, once a stage accepted it (for predict).
        artifacts.save_run_config(workdir, cfg.to_dict())
      return old

    old = distributed.broadcast(f"{name} inputs", decide)
    print(f"== {name}", flush=True)
    t = time.time()
    summaries[name] = module.run(cfg) or {}
    # Every process's outputs are written once all are here; a count is the run's.
    written = distributed.gather(f"{name} done", summaries[name].get("written"))
    if None not in written:
      summaries[name]["written"] = sum(written)
    summaries[name]["seconds"] = round(time.time() - t, 1)
    if main_process:
      # A rerun that found everything done keeps the seconds of the run that did the work.
      idle = summaries[name].get("skipped") is True or summaries[name].get("written") == 0
      seconds = old["seconds"] if idle and old and "seconds" in old else summaries[name]["seconds"]
      fingerprints.save_record(workdir, {**record, "complete": True, "seconds": seconds})
    skipped = summaries[name].get("skipped")  # a count; True from a stage skipped whole
    skipped = 0 if isinstance(skipped, bool) else skipped
    note = f"; skipped {skipped} image(s), see reports/{name}.json" if skipped else ""
    print(f"== {name} done in {summaries[name]['seconds']:.1f} s{note}", flush=True)
  distributed.barrier("records written")
  total = time.time() - t0
  if main_process and "evaluate" in names and os.path.exists(
      workdir.path(artifacts.RESULTS_JSON)):
    records = {s: fingerprints.load_record(workdir, s) for s in ORDER}
    artifacts.add_provenance(
        workdir, {s: r["seconds"] for s, r in records.items() if r and "seconds" in r},
        {s: r["fingerprint"] if r else None for s, r in records.items()})
  print(f"== all stages done in {total:.1f} s; outputs in {cfg.workdir}", flush=True)
  return summaries
