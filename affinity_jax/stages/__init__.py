"""The pipeline's stages, in order. Each is a module with `run(cfg) -> dict` (its summary).

train_cam -> infer_cam -> aff_labels -> train_aff -> random_walk -> train_seg -> infer_seg
-> evaluate. A stage skips when its outputs are complete and otherwise redoes only what is
missing, so rerunning a command after a crash or a pre-emption continues where it stopped.
Stages share files (affinity_jax.artifacts), never code: no stage imports another.
`training.py` is what the three training stages have in common.
"""

from __future__ import annotations

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
  """Runs `names` in pipeline order; adds the wall-clock seconds to results.json."""
  from affinity_jax import artifacts, io
  workdir = artifacts.Workdir(cfg.workdir)
  os.makedirs(workdir.root, exist_ok=True)
  # Temporaries of writers killed in an earlier run, in the folders no stage's `missing` sweeps.
  for folder in ("", artifacts.REPORTS, artifacts.PANELS):
    io.remove_stale_temporaries(workdir.path(folder))
  t0 = time.time()
  summaries = {}
  for name in names:
    module = importlib.import_module(f"affinity_jax.stages.{name}")
    print(f"== {name}", flush=True)
    t = time.time()
    summaries[name] = module.run(cfg) or {}
    summaries[name]["seconds"] = round(time.time() - t, 1)
    skipped = summaries[name].get("skipped")  # a count; True from a stage skipped whole
    skipped = 0 if isinstance(skipped, bool) else skipped
    note = f"; skipped {skipped} image(s), see reports/{name}.json" if skipped else ""
    print(f"== {name} done in {summaries[name]['seconds']:.1f} s{note}", flush=True)
  total = time.time() - t0
  if "evaluate" in names and os.path.exists(workdir.path(artifacts.RESULTS_JSON)):
    artifacts.add_stage_seconds(workdir, {k: v["seconds"] for k, v in summaries.items()}, total)
  print(f"== all stages done in {total:.1f} s; outputs in {cfg.workdir}", flush=True)
  return summaries
