"""Stability of the demo: the pipeline over several training seeds and CPU instruction sets.

  python experiments/demo_seeds.py [--config synthetic] [--seeds 0,1,2] [--isa native,AVX2]
                                   [--workdir-root runs/demo_seeds] [--keep-going]
                                   [--set KEY=VALUE ...]

Each (seed, isa) is one `affinity-jax run` subprocess, one after the other:

  python -m affinity_jax.cli run --config CONFIG --workdir ROOT/seedS-ISA --config.seed=S
      [--config.KEY=VALUE for each --set]

`seed` is the config's only training seed: it seeds the networks' initialisation, the training
streams' shuffling and augmentation (data/pipelines.py) and the dropout keys, for all three
networks. The dataset has a seed of its own (`data.options`, synthetic_wsss' `seed`), left
alone: every run scores the same images. For an ISA other than "native", XLA_FLAGS gets
`--xla_cpu_max_isa=ISA` appended (XLA's names: SSE4_2, AVX, AVX2, AVX512, AVX512_VNNI,
AVX512_BF16, AMX, AMX_FP16; NEON, SVE, SVE2 on ARM) and, on x86, ONEDNN_MAX_CPU_ISA is set
to oneDNN's name of the same level (the package's CPU convolutions); "native" leaves both as
they are. The caps reach only XLA's and oneDNN's kernels: TensorFlow's input pipeline, NumPy's SIMD
dispatch and the dCRF keep the CPU's own paths. (With jaxlib 0.10.2 XLA's kernels prefer
256-bit vectors even on an AVX-512 CPU: native and AVX2 runs of the tiny config were
bit-identical on one.)

A run is not made again when its workdir holds `demo_seeds.json` (written atomically after
the run: seed, ISA, XLA_FLAGS, wall seconds and a digest of the results.json it made) for the
same seed and ISA, that very results.json, and a config.json (the pipeline's record of its
config) equal to the config the run would get now: an edited config file or another --set
runs it again. Any other workdir is run (again): the pipeline skips the stages it finds
complete. Each run's output goes to ROOT/seedS-ISA.log; its stage lines are echoed. A run
that fails prints its last lines and stops the script (exit status 1), or with --keep-going
is left out of the table (exit status 1 at the end).

Printed and written to ROOT/demo_seeds.md (markdown, for experiments/RESULTS.md): the machine
(CPU model, AVX-512 or not); a row per run: seed, ISA asked for, the CPU ISA XLA could use,
wall seconds of the command and the pipeline's own seconds of its stages (a rerun that found
them done keeps those of the run that did the work), mIoU of CAM, CAM + RW and segmentation,
the walk's lift over the CAMs, segmentation minus CAM + RW, the class with the smallest IoU
after the walk; the mean and range (max - min) of each column; per class, the IoU after the
walk, mean and min over the runs; and the targets of the demo, each met or missed with its
numbers. Scores are the evaluate stage's
(results.json: `cam_miou`, `rw_miou`, `seg_miou`, and per-class IoU under `splits`), in %.
Missed targets do not change the exit status.

This process imports neither JAX nor TensorFlow (only affinity_jax's config, io and
constants, to resolve configs and write files).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from affinity_jax import config as config_lib  # noqa: E402
from affinity_jax import io  # noqa: E402
from affinity_jax.errors import ConfigError  # noqa: E402

RECORD = "demo_seeds.json"   # in each run's workdir
RESULTS = "results.json"     # artifacts.RESULTS_JSON and RUN_CONFIG (artifacts imports more)
RUN_CONFIG = "config.json"
TABLE = "demo_seeds.md"      # in the workdir root
NATIVE = "native"
TAIL_LINES = 40              # of a failed run's output

# XLA's --xla_cpu_max_isa values, lowest first, with the /proc/cpuinfo flag that says the CPU
# has each. XLA takes any case and only warns about an unknown name, so names are checked here.
X86_ISAS = (("SSE4_2", "sse4_2"), ("AVX", "avx"), ("AVX2", "avx2"), ("AVX512", "avx512f"),
            ("AVX512_VNNI", "avx512_vnni"), ("AVX512_BF16", "avx512_bf16"),
            ("AMX", "amx_tile"), ("AMX_FP16", "amx_fp16"))
ARM_ISAS = (("NEON", "asimd"), ("SVE", "sve"), ("SVE2", "sve2"))
# oneDNN's names (ONEDNN_MAX_CPU_ISA) for XLA's x86 levels.
ONEDNN_ISAS = {"SSE4_2": "SSE41", "AVX": "AVX", "AVX2": "AVX2", "AVX512": "AVX512_CORE",
               "AVX512_VNNI": "AVX512_CORE_VNNI", "AVX512_BF16": "AVX512_CORE_BF16",
               "AMX": "AVX512_CORE_AMX", "AMX_FP16": "AVX512_CORE_AMX_FP16"}
# The level reported for a run without the flag: the CPU's best up to AVX512 (the extensions
# above it add int8 / bf16 / matrix instructions, which a float32 pipeline does not use).
NATIVE_CEILING = {"x86": "AVX512", "arm": "SVE2"}

# The targets, in points of mIoU / IoU.
MIN_RW_LIFT = 10.0
MAX_SPREAD = 2.0
MIN_CLASS_IOU = 40.0

SCORES = (("cam", "CAM"), ("rw", "CAM + RW"), ("seg", "Segmentation"))
# Numeric columns of a run's row, in table order: (key, header).
COLUMNS = (("wall_s", "wall s"), ("stage_s", "stages s"), ("cam", "CAM"), ("rw", "CAM + RW"),
           ("seg", "Seg"), ("lift", "RW lift"), ("seg_minus_rw", "Seg - RW"),
           ("worst_iou", "min class IoU"))


class UsageError(Exception):
  """A bad command-line value; the message names it."""


# ---------------------------------------------------------------------------------------------
# The machine and the instruction sets.


def read_cpuinfo(path: str = "/proc/cpuinfo") -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


def cpu_flags(cpuinfo: str) -> set[str]:
  """The CPU's feature flags (x86 `flags`, ARM `Features`) of the first processor."""
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() in ("flags", "Features"):
      return set(value.split())
  return set()


def cpu_model(cpuinfo: str) -> str:
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() in ("model name", "Model", "cpu model", "Hardware"):
      return value.strip()
  return "unknown CPU"


def parse_isa(name: str) -> str:
  """"native" or XLA's name of an instruction set (any case), normalised."""
  if name.strip().lower() == NATIVE:
    return NATIVE
  upper = name.strip().upper()
  known = [n for n, _ in X86_ISAS + ARM_ISAS]
  if upper not in known:
    raise UsageError(f"--isa: unknown instruction set {name!r} (XLA's --xla_cpu_max_isa "
                     f"takes {', '.join(known)}; or {NATIVE})")
  return upper


def max_isa_flag(xla_flags: str) -> str | None:
  """The last --xla_cpu_max_isa in an XLA_FLAGS value (the one XLA keeps), upper case."""
  value = None
  for flag in xla_flags.split():
    if flag.startswith("--xla_cpu_max_isa="):
      value = flag.split("=", 1)[1].upper()
  return value


def isa_used(xla_flags: str, flags: set[str]) -> str:
  """The widest instruction set XLA may use on a CPU with `flags` under `xla_flags`: the
  highest one the CPU has, up to --xla_cpu_max_isa, or up to NATIVE_CEILING without it."""
  for family, levels in (("x86", X86_ISAS), ("arm", ARM_ISAS)):
    names = [n for n, _ in levels]
    if not any(flag in flags for _, flag in levels):
      continue
    cap = max_isa_flag(xla_flags)
    cap = cap if cap in names else NATIVE_CEILING[family]
    have = [n for n, flag in levels[:names.index(cap) + 1] if flag in flags]
    return have[-1] if have else "unknown"
  return "unknown"


def child_env(isa: str, environ: Mapping[str, str]) -> dict[str, str]:
  """The environment of a run with instruction set `isa`: XLA_FLAGS gets --xla_cpu_max_isa
  appended to what it holds, and on x86 ONEDNN_MAX_CPU_ISA caps oneDNN's convolutions
  (affinity_jax/models/onednn.py) at the same level (nothing for native)."""
  env = dict(environ)
  if isa != NATIVE:
    env["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} --xla_cpu_max_isa={isa}".strip()
    if isa in ONEDNN_ISAS:
      env["ONEDNN_MAX_CPU_ISA"] = ONEDNN_ISAS[isa]
  return env


def describe_machine(cpuinfo: str) -> str:
  flags = cpu_flags(cpuinfo)
  avx512 = sorted(f for f in flags if f.startswith("avx512"))
  versions = []
  for package in ("jax", "jaxlib"):
    try:
      versions.append(f"{package} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  parts = [cpu_model(cpuinfo), f"{os.cpu_count()} cores",
           f"AVX-512: yes ({' '.join(avx512)})" if avx512 else "AVX-512: no",
           f"native ISA for XLA: {isa_used('', flags)}"] + versions
  return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Runs: one subprocess each, unless its workdir already holds its results.


@dataclasses.dataclass(frozen=True)
class Spec:
  """One run: its training seed and instruction set ("native" or XLA's name)."""
  seed: int
  isa: str

  @property
  def name(self) -> str:
    return f"seed{self.seed}-{self.isa}"


@dataclasses.dataclass
class Outcome:
  """What a command runner reports: the exit status and the last lines of the output."""
  returncode: int
  tail: list[str]


Runner = Callable[[list[str], dict, str], Outcome]


def subprocess_runner(argv: list[str], env: dict, log_path: str) -> Outcome:
  """Runs `argv` from the repository root; all its output goes to `log_path`, its stage lines
  ("== ...") to stdout as well."""
  tail = collections.deque(maxlen=TAIL_LINES)
  env = dict(env, PYTHONUNBUFFERED="1")
  with open(log_path, "w") as log:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    for line in proc.stdout:
      log.write(line)
      tail.append(line.rstrip("\n"))
      if line.startswith("== "):
        print(f"  {line.rstrip()}", flush=True)
    return Outcome(proc.wait(), list(tail))


def run_command(config: str, workdir: str, seed: int, overrides: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "affinity_jax.cli", "run", "--config", config,
          "--workdir", workdir, f"--config.seed={seed}",
          *(f"--config.{o}" for o in overrides)]


def complete_results(results) -> bool:
  """Whether a results.json is a finished run's: the three scores, per-class IoU after the
  walk, and the runner's provenance (added after the last stage)."""
  try:
    return (all(isinstance(results[f"{kind}_miou"], (int, float)) for kind, _ in SCORES)
            and bool(walk_iou(results)) and isinstance(results["fingerprints"], dict))
  except (AttributeError, IndexError, KeyError, TypeError, ValueError):
    return False


def _load_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def run_config(config: str, overrides: Sequence[str], seed: int) -> dict:
  """The config a run gets, as the pipeline records it in its workdir's config.json (without
  `workdir`). Raises ConfigError for an unknown config or key."""
  cfg = config_lib.load_config(config)
  config_lib.apply_overrides(cfg, [f"seed={seed}", *overrides])
  values = cfg.to_dict()
  values.pop("workdir", None)
  return json.loads(json.dumps(values))  # tuples as lists, as read back from JSON


def _digest(path: str) -> str | None:
  try:
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  except OSError:
    return None


def reusable(workdir: str, spec: Spec, expected_config: Mapping) -> dict | None:
  """The record of an earlier run of this seed and ISA whose results.json is still the one it
  made, from the config the run would get now (`expected_config`); None: the run is to be
  made."""
  record = _load_json(os.path.join(workdir, RECORD))
  if not isinstance(record, dict) or (record.get("seed"), record.get("isa")) != (spec.seed,
                                                                                   spec.isa):
    return None
  if _load_json(os.path.join(workdir, RUN_CONFIG)) != expected_config:
    return None
  path = os.path.join(workdir, RESULTS)
  if record.get("results_sha256") != _digest(path) or not complete_results(_load_json(path)):
    return None
  return record


def run_one(spec: Spec, root: str, config: str, overrides: Sequence[str], *,
            runner: Runner = subprocess_runner, environ: Mapping[str, str] | None = None,
            cpuinfo: str = "") -> tuple[dict | None, Outcome | None]:
  """(record, None) for a finished run, reused or made now; (None, outcome) for a failed one.

  The record (also in the workdir's demo_seeds.json) holds the seed, ISA, config spec and
  overrides, XLA_FLAGS, the instruction set XLA could use, wall seconds and results.json's
  digest.
  """
  workdir = os.path.join(root, spec.name)
  record = reusable(workdir, spec, run_config(config, overrides, spec.seed))
  if record is not None:
    print(f"== {spec.name}: reused ({os.path.join(workdir, RESULTS)})", flush=True)
    return record, None
  env = child_env(spec.isa, os.environ if environ is None else environ)
  argv = run_command(config, workdir, spec.seed, overrides)
  if os.path.exists(os.path.join(workdir, RECORD)):
    os.remove(os.path.join(workdir, RECORD))  # stale: this run replaces what it described
  os.makedirs(root, exist_ok=True)
  xla_flags = env.get("XLA_FLAGS", "")
  print(f"== {spec.name}: {' '.join(argv[1:])}" + (f"  [XLA_FLAGS={xla_flags}]" if xla_flags
                                                    else ""), flush=True)
  start = time.monotonic()
  outcome = runner(argv, env, os.path.join(root, spec.name + ".log"))
  wall = time.monotonic() - start
  path = os.path.join(workdir, RESULTS)
  if outcome.returncode != 0 or not complete_results(_load_json(path)):
    return None, outcome
  record = {"seed": spec.seed, "isa": spec.isa, "config": config, "overrides": list(overrides),
            "xla_flags": xla_flags, "isa_used": isa_used(xla_flags, cpu_flags(cpuinfo)),
            "wall_s": round(wall, 1), "results_sha256": _digest(path)}
  io.save_json(os.path.join(workdir, RECORD), record)
  print(f"== {spec.name}: done in {wall:.0f} s", flush=True)
  return record, None


# ---------------------------------------------------------------------------------------------
# The table.


def walk_iou(results: Mapping) -> list[float]:
  """Per-class IoU after the walk (fractions; index 0 the background) of the split that
  `rw_miou` reports (the first of eval.cam_splits)."""
  splits = {s: v for s, v in results["splits"].items() if "rw" in v}
  same = [s for s, v in splits.items() if v["rw"]["miou"] == results["rw_miou"]]
  split = (same or (["val"] if "val" in splits else sorted(splits)))[0]
  return [float("nan") if x is None else float(x) for x in splits[split]["rw"]["iou"]]


def class_names(results: Mapping, count: int) -> list[str]:
  """Names of label values 0 .. count - 1: the evaluate stage's record of them (results.json
  `class_names`), or "class i" where a results.json made before that record has none."""
  names = results.get("class_names")
  if isinstance(names, list) and len(names) == count:
    return [str(n) for n in names]
  return [f"class {i}" for i in range(count)]


def run_row(name: str, record: Mapping, results: Mapping, names: Sequence[str]) -> dict:
  """A run's row: scores in % (points for the differences), the class with the smallest IoU
  after the walk, and every class's IoU after the walk."""
  cam, rw, seg = (100 * float(results[f"{kind}_miou"]) for kind, _ in SCORES)
  iou = 100 * np.asarray(walk_iou(results))
  worst = int(np.nanargmin(iou)) if np.any(np.isfinite(iou)) else 0
  return {"run": name, "seed": record["seed"], "isa": record["isa"],
          "isa_used": record.get("isa_used", "?"), "wall_s": float(record.get("wall_s", np.nan)),
          "stage_s": float(results.get("seconds", np.nan)),
          "cam": cam, "rw": rw, "seg": seg, "lift": rw - cam, "seg_minus_rw": seg - rw,
          "worst_iou": float(iou[worst]), "worst_class": names[worst],
          "class_iou": iou.tolist(), "class_names": list(names)}


def summary(rows: Sequence[Mapping]) -> tuple[dict, dict]:
  """(mean, range = max - min) of each numeric column over the runs."""
  values = {k: np.array([r[k] for r in rows], float) for k, _ in COLUMNS}
  mean = {k: float(np.nanmean(v)) for k, v in values.items()}
  spread = {k: float(np.nanmax(v) - np.nanmin(v)) for k, v in values.items()}
  return mean, spread


def per_class(rows: Sequence[Mapping]) -> list[tuple[str, float, float, str]]:
  """Per class: (name, mean IoU after the walk, min IoU, the run of the min), over the runs."""
  names = rows[0]["class_names"]
  iou = np.array([r["class_iou"] for r in rows], float)  # [runs, classes]
  out = []
  for c, name in enumerate(names):
    column = iou[:, c]
    if not np.any(np.isfinite(column)):
      out.append((name, float("nan"), float("nan"), "-"))
      continue
    low = int(np.nanargmin(column))
    out.append((name, float(np.nanmean(column)), float(column[low]), rows[low]["run"]))
  return out


@dataclasses.dataclass(frozen=True)
class Check:
  target: str
  met: bool
  detail: str

  def line(self) -> str:
    return f"- [{'met' if self.met else 'MISSED'}] {self.target}: {self.detail}"


def checks(rows: Sequence[Mapping]) -> list[Check]:
  """The issue's targets over the runs, each with the numbers that decide it."""
  def lowest(key):
    r = min(rows, key=lambda r: r[key])
    return r[key], r["run"]

  lift, lift_run = lowest("lift")
  gap, gap_run = lowest("seg_minus_rw")
  _, spread = summary(rows)
  worst = [(r["worst_iou"], r["worst_class"], r["run"]) for r in rows]
  low, low_class, low_run = min(worst, key=lambda w: w[0])
  spreads = ", ".join(f"{label} {spread[key]:.1f}" for key, label in SCORES)
  return [
      Check(f"RW lift >= {MIN_RW_LIFT:g} on every run", lift >= MIN_RW_LIFT,
            f"min {lift:+.1f} ({lift_run}); all " +
            " ".join(f"{r['lift']:+.1f}" for r in rows)),
      Check("segmentation >= CAM+RW on every run", gap >= 0,
            f"min Seg - RW {gap:+.1f} ({gap_run}); all " +
            " ".join(f"{r['seg_minus_rw']:+.1f}" for r in rows)),
      Check(f"spread of each row <= {MAX_SPREAD:g} points",
            all(spread[key] <= MAX_SPREAD for key, _ in SCORES),
            f"max - min over {len(rows)} run(s): {spreads}"),
      Check(f"no class under {MIN_CLASS_IOU:g} IoU after the walk", low >= MIN_CLASS_IOU,
            f"min {low:.1f}: {low_class} in {low_run}"),
  ]


def _f(value: float, fmt: str = ".1f") -> str:
  return "-" if not np.isfinite(value) else format(value, fmt)


def render(rows: Sequence[Mapping], *, machine: str, command: str,
           failed: Sequence[str] = ()) -> str:
  """The markdown report: machine, a row per run with mean and range, per-class IoU after the
  walk, and the targets."""
  out = [f"Machine: {machine}", "", f"Command: `{command}`", ""]
  if not rows:
    out.append("No run finished.")
  else:
    mean, spread = summary(rows)
    head = ["run", "seed", "ISA", "CPU ISA used"] + [h for _, h in COLUMNS] + ["min class"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
      cells = [r["run"], str(r["seed"]), r["isa"], r["isa_used"]]
      cells += [_f(r[k], ".0f") for k, _ in COLUMNS[:2]]
      cells += [_f(r[k]) for k, _ in COLUMNS[2:]] + [r["worst_class"]]
      out.append("| " + " | ".join(cells) + " |")
    for label, row in (("mean", mean), ("range", spread)):
      cells = [label, "", "", ""] + [_f(row[k], ".0f") for k, _ in COLUMNS[:2]]
      cells += [_f(row[k]) for k, _ in COLUMNS[2:]] + [""]
      out.append("| " + " | ".join(cells) + " |")
    out += ["", "mIoU and IoU in %, differences in points; RW lift = CAM + RW - CAM; min class: "
            "the smallest per-class IoU after the walk; wall s: this script's time of the run's "
            "command, stages s: the pipeline's (results.json `seconds`).", "",
            "IoU after the walk per class, over the runs:", "",
            "| class | mean | min | run of the min |", "|---|---|---|---|"]
    out += [f"| {name} | {_f(m)} | {_f(lo)} | {run} |" for name, m, lo, run in per_class(rows)]
    out += ["", "Targets:", ""] + [c.line() for c in checks(rows)]
  if failed:
    out += ["", f"Failed (left out): {', '.join(failed)}"]
  return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# The command line.


def _parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise UsageError(f"--seeds: integers separated by commas, got {text!r}") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise UsageError(f"--seeds: one or more distinct integers, got {text!r}")
  return seeds


def _parse_isas(text: str) -> list[str]:
  isas = [parse_isa(s) for s in text.split(",") if s.strip()]
  if not isas or len(set(isas)) != len(isas):
    raise UsageError(f"--isa: one or more distinct instruction sets, got {text!r}")
  return isas


def _parse_sets(items: Sequence[str]) -> list[str]:
  out = []
  for item in items:
    item = item[len("--config."):] if item.startswith("--config.") else item
    key, sep, _ = item.partition("=")
    if not sep or not key:
      raise UsageError(f"--set: KEY=VALUE, got {item!r}")
    if key in ("seed", "workdir"):
      raise UsageError(f"--set {key}: set by this script (use --seeds / --workdir-root)")
    out.append(item)
  return out


def _absolute_config(spec: str) -> str:
  """A config file given relative to this folder, made absolute (runs start in the repo)."""
  path, sep, variant = spec.partition(":")
  if path.endswith(".py") and os.path.exists(path):
    return os.path.abspath(path) + sep + variant
  return spec


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="synthetic",
                 help="config name or path.py[:variant] (default: synthetic)")
  p.add_argument("--seeds", default="0,1,2", help="training seeds (default: 0,1,2)")
  p.add_argument("--isa", default=f"{NATIVE},AVX2",
                 help="instruction sets: native or XLA's --xla_cpu_max_isa names "
                      "(default: native,AVX2)")
  p.add_argument("--workdir-root", default=os.path.join("runs", "demo_seeds"),
                 help="a workdir per run, seedS-ISA, under it (default: runs/demo_seeds)")
  p.add_argument("--keep-going", action="store_true",
                 help="after a failed run, go on with the others")
  p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                 help="config overrides for every run (as --config.KEY=VALUE)")
  args = p.parse_args(argv)
  try:
    seeds, isas = _parse_seeds(args.seeds), _parse_isas(args.isa)
    overrides = _parse_sets(args.set)
    config = _absolute_config(args.config)
    run_config(config, overrides, seeds[0])  # an unknown config or key stops here, not in a run
  except (UsageError, ConfigError) as e:
    p.error(str(e))
  root = os.path.abspath(args.workdir_root)
  cpuinfo = read_cpuinfo()
  machine = describe_machine(cpuinfo)
  print(f"Machine: {machine}", flush=True)

  rows, failed = [], []
  for spec in (Spec(s, isa) for s in seeds for isa in isas):
    record, outcome = run_one(spec, root, config, overrides, runner=runner, cpuinfo=cpuinfo)
    if record is None:
      print(f"== {spec.name}: FAILED (exit status {outcome.returncode}); its last lines "
            f"({os.path.join(root, spec.name + '.log')}):", file=sys.stderr)
      print("\n".join(f"   {line}" for line in outcome.tail), file=sys.stderr, flush=True)
      failed.append(spec.name)
      if not args.keep_going:
        return 1
      continue
    workdir = os.path.join(root, spec.name)
    results = _load_json(os.path.join(workdir, RESULTS))
    names = class_names(results, len(walk_iou(results)))
    rows.append(run_row(spec.name, record, results, names))

  command = " ".join(["python experiments/demo_seeds.py", "--config", args.config,
                      "--seeds", ",".join(map(str, seeds)), "--isa", ",".join(isas)]
                     + (["--set", *overrides] if overrides else []))
  text = render(rows, machine=machine, command=command, failed=failed)
  print("\n" + text, end="", flush=True)
  io.save_text(os.path.join(root, TABLE), text)
  print(f"\nwrote {os.path.join(root, TABLE)}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
