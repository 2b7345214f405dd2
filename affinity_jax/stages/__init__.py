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

from affinity_jax.errors import ConfigError

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


def run_stages(cfg, names: list[str]) -> dict[str, dict]:
  """Runs `names` in pipeline order, holding the workdir's lock; returns their summaries.

  Each stage runs only if its inputs match the record of its outputs, or there are none
  (affinity_jax/fingerprints.py). results.json gets the fingerprints and seconds of the runs
  it scored.
  """
  import jax
  from affinity_jax import io, workdir_lock
  main_process = jax.process_index() == 0
  io.check_writable_dir(cfg.workdir)  # a read-only or misplaced workdir: one message, no work
  lock = workdir_lock.hold(cfg.workdir) if main_process else contextlib.nullcontext()
  with lock:
    return _run_locked(cfg, names, main_process)


def _run_locked(cfg, names: list[str], main_process: bool) -> dict[str, dict]:
  from affinity_jax import artifacts, config, data, fingerprints, io
  config.validate(cfg)
  workdir = artifacts.Workdir(cfg.workdir)
  # Temporaries of writers killed in an earlier run, in the folders no stage's `missing` sweeps.
  for folder in ("", artifacts.REPORTS, artifacts.PANELS, artifacts.FINGERPRINTS):
    io.remove_stale_temporaries(workdir.path(folder))
  dataset = fingerprints.dataset_digest(data.from_config(cfg).info)
  modules = {s: importlib.import_module(f"affinity_jax.stages.{s}") for s in ORDER}
  consumes = {s: m.CONSUMES for s, m in modules.items()}
  t0 = time.time()
  summaries = {}
  for name in names:
    module = modules[name]
    fingerprints.check_consumed(workdir, name, module.CONSUMES)
    record = fingerprints.make_record(cfg, name, module.READS, module.CONSUMES, dataset,
                                      getattr(module, "VERSION", 1))
    verdict = fingerprints.prepare(cfg, name, record, bool(workdir.stage_outputs(name)),
                                   reuses_outputs=name != "evaluate")
    old = fingerprints.load_record(workdir, name) if verdict == "same" else None
    if main_process:
      if verdict == "redo":  # This stage's outputs, and all made from them, are invalid.
        for s in [name] + fingerprints.downstream(name, consumes):
          workdir.remove_stage_outputs(s)
      if verdict != "same":
        fingerprints.save_record(workdir, record)
      if name == names[0]:  # The config of this run, once a stage accepted it (for predict).
        artifacts.save_run_config(workdir, cfg.to_dict())
    print(f"== {name}", flush=True)
    t = time.time()
    summaries[name] = module.run(cfg) or {}
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
  total = time.time() - t0
  if main_process and "evaluate" in names and os.path.exists(
      workdir.path(artifacts.RESULTS_JSON)):
    records = {s: fingerprints.load_record(workdir, s) for s in ORDER}
    artifacts.add_provenance(
        workdir, {s: r["seconds"] for s, r in records.items() if r and "seconds" in r},
        {s: r["fingerprint"] if r else None for s, r in records.items()})
  print(f"== all stages done in {total:.1f} s; outputs in {cfg.workdir}", flush=True)
  return summaries
