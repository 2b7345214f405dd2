"""Fault injection: run the pipeline, kill it at random points, change its config, damage its
files, rerun, and compare with a clean run of the final config.

  python experiments/chaos.py --kills 5 [--changes 2] [--corruptions 2] [--seed 0]
                              [--config configs/synthetic.py:tiny] [--root DIR]
                              [--sigterm_every 3] [--config.key=value ...]

1. A clean run of every stage (`affinity-jax run`) in ROOT/clean; its stdout gives each stage's
   start time and duration.
2. The same command in ROOT/chaos, killed `--kills` times. Each kill draws a stage uniformly
   and a time within the stage's clean duration, and the kills go in pipeline order; the rerun
   is watched until it announces that stage ("== stage"; for a training stage, until its first
   step's progress line, since start-up and compilation come before), and after that time (the
   stage resumes, so the kill may land in a later stage) it gets SIGKILL
   (every `--sigterm_every`-th kill a SIGTERM instead: the pre-emption path, which saves a
   checkpoint when it lands in training). A run that ends before its kill lands is a miss: a
   new (stage, time) is drawn, that stage's outputs and later ones are deleted, and the kill is
   tried again. Then one last run to completion.
   With `--changes K`, K config changes (a key of CHANGES and a value, drawn at random) are
   scheduled before random kills: from then on the reruns carry the changed value (every rerun
   has --config.on_change=redo, so the stages made from the old value are redone). The clean
   run of step 1 uses the final config, all changes applied. With `--corruptions M`, before M
   random kills one existing per-image output (a CAM, score map, pseudo label or prediction) is
   cut to half its size, as a failing disk or an interrupted copy would leave it.
3. Every output of the two workdirs is compared:
   - networks (`*_net/final`): every variable bit-identical (checkpoint.load_variables);
   - per-image outputs: CAM / score .npz files array by array, bit-identical; PNG pseudo labels,
     predictions and panels pixel by pixel;
   - results.json and reports/*.json equal once wall-clock fields ("seconds",
     "stage_seconds") are dropped; results.md byte for byte.
   Training checkpoints and TensorBoard logs are not outputs and are not compared. Temporary
   files that kills left behind (never read: `.tmp-*`, `.final.tmp-*`) are counted.
Exit status 0 when everything matches. A summary goes to stdout and ROOT/chaos.json, with what
the reruns redid (stages redone after a change, damaged files made again).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from affinity_jax import artifacts, checkpoint, io  # noqa: E402
from affinity_jax.stages import ORDER  # noqa: E402

# Keys a change may set, with the values it draws from (valid for the tiny synthetic config).
CHANGES = {"random_walk.beta": ("2.0", "8.0"), "aff_labels.alpha_high": ("16.0", "24.0"),
           "cam_infer.scales": ("(1.0,)", "(1.0, 1.5)")}
CORRUPTIBLE = (artifacts.CAMS, artifacts.AFF_LABELS, artifacts.PSEUDO_LABELS, artifacts.SEG_PRED)

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
NETS = ("cam_net", "aff_net", "seg_net")
WALL_CLOCK = ("seconds", "stage_seconds")


class Run:
  """One `affinity-jax run` subprocess whose stdout lines are timestamped as they arrive."""

  def __init__(self, cmd: list[str], log_path: str):
    self.t0 = time.time()
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines: list[tuple[float, str]] = []
    self.log = open(log_path, "a")
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append((time.time() - self.t0, line))
      self.log.write(line)
      self.log.flush()

  def wait_for_line(self, text: str | tuple[str, ...], timeout: float) -> bool:
    """True once a line starting with `text` (or one of them) arrived; False if the run ended
    first."""
    end = time.time() + timeout
    while time.time() < end:
      if any(line.startswith(text) for _, line in self.lines):
        return True
      if self.proc.poll() is not None:
        self.reader.join()
        return any(line.startswith(text) for _, line in self.lines)
      time.sleep(0.02)
    raise TimeoutError(f"no {text!r} within {timeout} s")

  def wait(self) -> int:
    status = self.proc.wait()
    # A killed run's orphaned children could hold its stdout open: do not wait for them forever.
    self.reader.join(timeout=60)
    if self.reader.is_alive():
      print("chaos: the killed run left processes holding its output open", file=sys.stderr)
    self.log.close()
    return status


NET_OF = {"train_cam": "cam_net", "train_aff": "aff_net", "train_seg": "seg_net"}


def stage_times(lines: list[tuple[float, str]]) -> dict[str, float]:
  """Seconds each stage took, from the "== stage" / "== stage done" lines; for a training stage,
  from its first step's progress line on (before it, start-up and compilation: a kill there
  only restarts the stage)."""
  starts, out = {}, {}
  for t, line in lines:
    m = re.match(r"== (\w+)( done)?", line)
    if m and m.group(1) in ORDER:
      if m.group(2):
        out[m.group(1)] = t - starts[m.group(1)]
      else:
        starts[m.group(1)] = t
    m = re.match(r"\[(\w+_net)\] \[", line)
    stage = {v: k for k, v in NET_OF.items()}.get(m.group(1)) if m else None
    if stage and stage not in out and not starts.get(stage + "/steps"):
      starts[stage + "/steps"] = starts[stage] = t
  return out


def _strip(obj):
  if isinstance(obj, dict):
    return {k: _strip(v) for k, v in obj.items() if k not in WALL_CLOCK}
  return obj


def compare(clean: str, chaos: str) -> dict:
  """Compares every output under the two workdirs; returns counts and the mismatches."""
  checked, mismatches, leftovers = {}, [], []

  def note(kind):
    checked[kind] = checked.get(kind, 0) + 1

  for net in NETS:
    a, meta_a = checkpoint.load_variables(os.path.join(clean, net, "final"))
    b, meta_b = checkpoint.load_variables(os.path.join(chaos, net, "final"))
    import jax  # only for tree flattening
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb or meta_a != meta_b or not all(np.array_equal(x, y) for x, y in zip(la, lb)):
      mismatches.append(f"{net}/final")
    note("network")
  for root, dirs, files in os.walk(clean):
    rel_root = os.path.relpath(root, clean)
    top = rel_root.split(os.sep)[0]
    if top in NETS:  # final variables compared above; checkpoints and logs are not outputs
      dirs[:] = []
      continue
    for name in files:
      rel = os.path.normpath(os.path.join(rel_root, name))
      if name.startswith(".tmp-"):
        continue
      other = os.path.join(chaos, rel)
      mine = os.path.join(root, name)
      if not os.path.exists(other):
        mismatches.append(f"{rel} missing")
        continue
      if name.endswith(".npz"):
        za, zb = io.load_npz(mine), io.load_npz(other)
        same = za.keys() == zb.keys() and all(
            za[k].dtype == zb[k].dtype and np.array_equal(za[k], zb[k]) for k in za)
        note("npz")
      elif name.endswith(".png"):
        same = np.array_equal(io.load_png(mine), io.load_png(other))
        note("png")
      elif name.endswith(".json"):
        with open(mine) as f, open(other) as g:
          same = _strip(json.load(f)) == _strip(json.load(g))
        note("json")
      else:
        with open(mine, "rb") as f, open(other, "rb") as g:
          same = f.read() == g.read()
        note("other")
      if not same:
        mismatches.append(rel)
  for root, dirs, files in os.walk(chaos):
    for name in files + dirs:
      if name.startswith(".tmp-") or ".tmp-" in name:
        leftovers.append(os.path.relpath(os.path.join(root, name), chaos))
    rel_root = os.path.relpath(root, chaos)
    if rel_root.split(os.sep)[0] in NETS:
      continue
    for name in files:
      rel = os.path.normpath(os.path.join(rel_root, name))
      if not name.startswith(".tmp-") and not os.path.exists(os.path.join(clean, rel)):
        mismatches.append(f"{rel} only in the disturbed run")
  return {"checked": checked, "files_checked": sum(checked.values()), "mismatches": mismatches,
          "leftover_temporaries": leftovers}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kills", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--config", default=os.path.join(REPO, "configs", "synthetic.py:tiny"))
  p.add_argument("--root", default=None, help="work folder (default: a new temporary one)")
  p.add_argument("--sigterm_every", type=int, default=3,
                 help="every n-th kill is a SIGTERM (0: SIGKILL only)")
  p.add_argument("--changes", type=int, default=0,
                 help="config changes scheduled between kills (keys of CHANGES)")
  p.add_argument("--corruptions", type=int, default=0,
                 help="per-image output files cut short between kills")
  args = p.parse_args([a for a in argv if not a.startswith("--config.")])
  root = args.root or tempfile.mkdtemp(prefix="chaos-")
  os.makedirs(root, exist_ok=True)
  rng = random.Random(args.seed)

  # Before kill i: the changes and corruptions scheduled there. A change comes after the first
  # kill (there are outputs to redo by then) and sets another value than its key had.
  changes, last = [], {}
  for at in sorted(rng.randrange(1, max(args.kills, 2)) for _ in range(args.changes)):
    key = rng.choice(sorted(CHANGES))
    last[key] = rng.choice([v for v in CHANGES[key] if v != last.get(key)])
    changes.append((at, key, last[key]))
  corrupt_at = sorted(rng.randrange(max(args.kills, 1)) for _ in range(args.corruptions))
  final_changes = [f"--config.{key}={value}" for _, key, value in changes]

  def command(workdir, applied=None):
    changed = final_changes if applied is None else [
        f"--config.{key}={value}" for at, key, value in changes if at <= applied]
    return [sys.executable, "-m", "affinity_jax.cli", "run", "--config", args.config,
            "--workdir", workdir, f"--config.data.data_dir={os.path.join(root, 'tfds')}",
            *overrides, *changed, "--config.on_change=redo"]

  clean_dir, chaos_dir = os.path.join(root, "clean"), os.path.join(root, "chaos")
  timing_path = os.path.join(root, "clean_timing.json")
  if os.path.exists(timing_path):  # a clean run finished earlier in this root: reuse it
    with open(timing_path) as f:
      timing = json.load(f)
    print(f"chaos: reusing the clean run in {clean_dir}", flush=True)
  else:
    print(f"chaos: clean run in {clean_dir}", flush=True)
    t = time.time()
    clean = Run(command(clean_dir), os.path.join(root, "clean.log"))
    if clean.wait() != 0:
      print(f"chaos: the clean run failed; see {root}/clean.log", file=sys.stderr)
      return 1
    timing = {"seconds": time.time() - t, "stages": stage_times(clean.lines)}
    io.save_json(timing_path, timing)
  clean_seconds, durations = timing["seconds"], timing["stages"]
  print("chaos: clean stage seconds " +
        ", ".join(f"{k} {v:.1f}" for k, v in durations.items()), flush=True)

  # Kill points: a stage drawn uniformly for each kill and a uniform fraction of its clean
  # duration, in pipeline order (each stage, however short, is as likely to be hit).
  picks = sorted(((rng.choice(ORDER), rng.random()) for _ in range(args.kills)),
                 key=lambda sf: (ORDER.index(sf[0]), sf[1]))
  events, misses, runs = [], 0, 0
  damaged, changed_from = [], set()
  t = time.time()
  i = 0
  while i < len(picks):
    stage, frac = picks[i]
    sig = (signal.SIGTERM if args.sigterm_every and (i + 1) % args.sigterm_every == 0
           else signal.SIGKILL)
    for _ in range(corrupt_at.count(i)):
      corrupt_at.remove(i)
      victim = _cut_short(chaos_dir, rng)
      if victim:
        damaged.append(victim)
        print(f"chaos: cut {victim} short before kill {i + 1}", flush=True)
    for at, key, value in changes:
      if at == i and (at, key) not in changed_from:
        changed_from.add((at, key))
        print(f"chaos: from kill {i + 1} on, --config.{key}={value}", flush=True)
    run = Run(command(chaos_dir, applied=i), os.path.join(root, "chaos.log"))
    runs += 1
    landed = run.wait_for_line(f"== {stage}", timeout=3600)
    if landed and stage in NET_OF:  # from the first step on, as the durations
      after = ORDER[ORDER.index(stage) + 1] if stage != ORDER[-1] else "all stages"
      landed = run.wait_for_line((f"[{NET_OF[stage]}] [", f"== {after}"), timeout=3600)
    if landed:
      deadline = time.time() + frac * durations.get(stage, 1.0)
      while time.time() < deadline and run.proc.poll() is None:
        time.sleep(0.01)
      landed = run.proc.poll() is None
    if landed:
      run.proc.send_signal(sig)
      status = run.wait()
      announced = [m.group(1) for _, line in run.lines
                   for m in [re.match(r"== (\w+)$", line.strip())] if m and m.group(1) in ORDER]
      at = f"{announced[-1] if announced else stage} (drawn: {stage} +" \
           f"{frac * durations.get(stage, 1.0):.1f} s)"
      last = [line.strip() for _, line in run.lines if line.strip()][-1:]
      events.append({"stage": stage, "after_seconds": round(frac * durations.get(stage, 1.0), 1),
                     "landed_in": announced[-1] if announced else None,
                     "signal": signal.Signals(sig).name, "status": status,
                     "last_line": last[0][:160] if last else ""})
      print(f"chaos: kill {len(events)}/{args.kills}: {signal.Signals(sig).name} at {at}, "
            f"status {status}", flush=True)
      i += 1
    else:
      status = run.wait()
      if status != 0:
        print(f"chaos: a rerun failed with status {status}; see {root}/chaos.log",
              file=sys.stderr)
        return 1
      misses += 1
      print(f"chaos: the run finished before the kill in {stage}; removing its outputs from "
            "that stage on and drawing again", flush=True)
      picks[i] = (rng.choice(ORDER), rng.random())
      _rewind(chaos_dir, picks[i][0])
      picks[i:] = sorted(picks[i:], key=lambda sf: (ORDER.index(sf[0]), sf[1]))
  final = Run(command(chaos_dir), os.path.join(root, "chaos.log"))
  runs += 1
  if final.wait() != 0:
    print(f"chaos: the final rerun failed; see {root}/chaos.log", file=sys.stderr)
    return 1
  chaos_seconds = time.time() - t
  result = compare(clean_dir, chaos_dir)
  with open(os.path.join(root, "chaos.log")) as f:
    log = f.read()
  result.update(changes=[{"before_kill": at + 1, "key": key, "value": value}
                         for at, key, value in changes],
                damaged=damaged, redone_after_change=log.count("deleting its outputs and redoing"),
                remade_damaged=log.count("is damaged (cut short)"))
  result.update(kills=events, kills_survived=len(events), misses=misses, runs=runs,
                clean_seconds=round(clean_seconds, 1), chaos_seconds=round(chaos_seconds, 1),
                seed=args.seed, config=args.config, overrides=overrides, root=root)
  io.save_json(os.path.join(root, "chaos.json"), result)
  print(json.dumps({k: result[k] for k in (
      "kills_survived", "misses", "runs", "changes", "redone_after_change", "damaged",
      "remade_damaged", "files_checked", "checked", "mismatches", "leftover_temporaries",
      "clean_seconds", "chaos_seconds")}, indent=1))
  ok = not result["mismatches"]
  print(f"chaos: {'OK' if ok else 'MISMATCH'}: {len(events)} kills survived, "
        f"{result['files_checked']} outputs compared, {len(result['mismatches'])} differ",
        flush=True)
  return 0 if ok else 1


def _rewind(workdir: str, stage: str) -> None:
  """Deletes the outputs of `stage` and later stages, so that a kill can land there again."""
  for s in ORDER[ORDER.index(stage):]:
    artifacts.Workdir(workdir).remove_stage_outputs(s)


def _cut_short(workdir: str, rng: random.Random) -> str | None:
  """Truncates one per-image output to half its size; returns its path under the workdir."""
  files = sorted(os.path.join(folder, f) for folder in CORRUPTIBLE
                 if os.path.isdir(os.path.join(workdir, folder))
                 for f in os.listdir(os.path.join(workdir, folder)) if not f.startswith("."))
  if not files:
    return None
  victim = rng.choice(files)
  path = os.path.join(workdir, victim)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  return victim


if __name__ == "__main__":
  sys.exit(main())
