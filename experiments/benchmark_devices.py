"""The per-image stages infer_cam and random_walk on 1 vs N local devices: seconds, each device's
share of the images, and whether the outputs agree.

The networks are trained once (train_cam, infer_cam, aff_labels, train_aff, on one device) into
`{workdir}/base`. Then for each device count a copy of that workdir without the two stages'
outputs runs infer_cam and random_walk in a subprocess with JAX_PLATFORMS=cpu and
JAX_NUM_CPU_DEVICES set (the count is fixed when JAX starts): each stage twice, the second time
into fresh output folders again, its programmes then coming from JAX's compilation cache (a
stage builds its jitted functions anew each run), in a folder of that device count's own that
starts empty (cold: with compiling, warm: without). The stages split every batch over all
local devices (affinity_jax.stages.per_image.LocalDevices), a batch being the config's batch
size rounded up to a multiple of the device count; each reports how many real (valid) images
each device received, which must be equal up to the dummies that complete the last batch.

Forced CPU devices share the machine's cores: on a 2-core machine 4 devices cannot be faster
than one. What this shows on a CPU is the even split; the speed-up is for a machine with several
accelerators.

Usage: python experiments/benchmark_devices.py [--devices 1,4] [--config synthetic:tiny]
  [--set key=value ...] [--workdir DIR]
The last line printed is JSON of all figures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ("train_cam", "infer_cam", "aff_labels", "train_aff")
TIMED = ("infer_cam", "random_walk")


def load_config(args, workdir: str):
  from affinity_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config(args.config)
  config_lib.apply_overrides(cfg, args.set)
  cfg.workdir = workdir
  cfg.data.data_dir = os.path.join(args.root, "tfds")
  return cfg


def remove_outputs(workdir: str, stages) -> None:
  """Deletes what `stages` wrote into `workdir` (a stage then redoes every image)."""
  from affinity_jax import artifacts  # pylint: disable=g-import-not-at-top
  for stage in stages:
    for pattern in artifacts.STAGE_OUTPUTS[stage]:
      for path in glob.glob(os.path.join(workdir, pattern)):
        if os.path.isdir(path):
          shutil.rmtree(path)
        else:
          os.remove(path)


def child(args) -> None:
  """Runs `args.stages` in `args.workdir` (`args.repeats` times each, fresh outputs each time)
  on this process's devices; prints a RESULT line of JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  from affinity_jax import stages  # pylint: disable=g-import-not-at-top
  if args.cache:
    jax.config.update("jax_compilation_cache_dir", args.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  cfg = load_config(args, args.workdir)
  out = {"devices": jax.local_device_count(), "stages": {}}
  for name in args.stages.split(","):
    seconds = []
    for k in range(args.repeats):
      if k:
        remove_outputs(args.workdir, [name])
      t = time.perf_counter()
      summary = stages.run_stages(cfg, [name])[name]
      seconds.append(time.perf_counter() - t)
    out["stages"][name] = {"seconds": seconds, "written": summary.get("written"),
                           "images_per_device": summary.get("images_per_device")}
  print("RESULT " + json.dumps(out), flush=True)


def run_child(args, workdir: str, stages, devices: int, repeats: int, cache: str = "") -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
  if "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", ""):
    env.pop("XLA_FLAGS")  # it would set the device count instead
  command = [sys.executable, os.path.abspath(__file__), "--child", "--workdir", workdir,
             "--root", args.root, "--config", args.config, "--stages", ",".join(stages),
             "--repeats", str(repeats), "--cache", cache]
  command += [a for kv in args.set for a in ("--set", kv)]
  done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
  if done.returncode:
    sys.exit(f"{' '.join(stages)} on {devices} device(s) failed:\n{done.stdout[-4000:]}\n"
             f"{done.stderr[-4000:]}")
  line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def compare(a: str, b: str) -> dict:
  """How the two workdirs' infer_cam and random_walk outputs agree."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from affinity_jax import artifacts, io  # pylint: disable=g-import-not-at-top
  same_png, png, cam_diff = 0, 0, 0.0
  for folder in (artifacts.CAM_PRED, artifacts.PSEUDO_LABELS):
    for path in glob.glob(os.path.join(a, folder, "*.png")):
      with open(path, "rb") as x, open(os.path.join(b, folder, os.path.basename(path)), "rb") as y:
        same_png += x.read() == y.read()
      png += 1
  for path in glob.glob(os.path.join(a, artifacts.CAMS, "*.npz")):
    x, y = io.load_npz(path), io.load_npz(os.path.join(b, artifacts.CAMS, os.path.basename(path)))
    cam_diff = max(cam_diff, float(np.abs(x["cam"] - y["cam"]).max()))
  return {"identical_pngs": same_png, "pngs": png, "max_cam_difference": cam_diff}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,4", help="device counts, comma separated")
  parser.add_argument("--config", default="synthetic:tiny")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set cam_infer.batch_size=8 (repeatable)")
  parser.add_argument("--workdir", default="", help="scratch folder (default: a temp dir)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--root", default="", help=argparse.SUPPRESS)
  parser.add_argument("--stages", default="", help=argparse.SUPPRESS)
  parser.add_argument("--repeats", type=int, default=2, help=argparse.SUPPRESS)
  parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  args.root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="benchmark_devices_"))
  counts = [int(n) for n in args.devices.split(",")]
  print(f"machine: {cpu_model()}, {os.cpu_count()} cores; config {args.config} "
        f"{' '.join(args.set)}; scratch {args.root}", flush=True)

  base = os.path.join(args.root, "base")
  t = time.perf_counter()
  run_child(args, base, TRAIN, devices=1, repeats=1)
  print(f"{', '.join(TRAIN)} on 1 device (what a rerun finds done is skipped): "
        f"{time.perf_counter() - t:.0f} s", flush=True)
  results, workdirs = {}, {}
  for n in counts:
    workdirs[n] = os.path.join(args.root, f"devices{n}")
    shutil.rmtree(workdirs[n], ignore_errors=True)
    shutil.copytree(base, workdirs[n])
    remove_outputs(workdirs[n], TIMED)
    cache = os.path.join(args.root, f"jax_cache_devices{n}")
    shutil.rmtree(cache, ignore_errors=True)
    results[n] = run_child(args, workdirs[n], TIMED, devices=n, repeats=2, cache=cache)
    assert results[n]["devices"] == n, results[n]

  first = counts[0]
  print(f"\n| stage | devices | seconds, cold (with compiling) | seconds, warm | "
        f"warm speed-up vs {first} | real images per device |")
  print("|---|---|---|---|---|---|")
  for stage in TIMED:
    warm_first = results[first]["stages"][stage]["seconds"][-1]
    for n in counts:
      r = results[n]["stages"][stage]
      cold, warm = r["seconds"][0], r["seconds"][-1]
      shares = ", ".join(str(k) for k in r["images_per_device"])
      print(f"| {stage} | {n} | {cold:.1f} | {warm:.1f} | {warm_first / warm:.2f} | {shares} |")
  agreement = {n: compare(workdirs[first], workdirs[n]) for n in counts[1:]}
  for n, a in agreement.items():
    print(f"\n{n} devices vs {first}: {a['identical_pngs']} of {a['pngs']} label PNGs "
          f"(cam_pred, pseudo_labels) byte-identical; CAMs differ by at most "
          f"{a['max_cam_difference']:.1e}")
  print(json.dumps({"machine": cpu_model(), "cores": os.cpu_count(), "config": args.config,
                    "overrides": args.set, "results": results, "agreement": agreement}))


if __name__ == "__main__":
  main()
