"""IRN's walk against PSA's on the same CAMs (the synthetic data).

  python experiments/irn_vs_psa.py [--workdir-root runs/irn_vs_psa] [--irn-config synthetic_irn]
                                   [--psa-config synthetic] [--set KEY=VALUE ...]
                                   [--psa-set KEY=VALUE ...]

Four workdirs under ROOT, each an `affinity-jax run` subprocess:

  irn/        the IRN config end to end: its CAM network and CAMs, relation labels, relation
              network, IRN's walk at stride 4 (no dCRF), evaluated on train and val.
  psa/        PSA's stages after the CAMs on irn/'s CAMs: cams/ and the fingerprints of
              train_cam and infer_cam (and infer_cam's report) are copied from irn/, then
              aff_labels, train_aff, random_walk and evaluate of the PSA config (AffinityNet
              from its own pretrained backbone, never from a CAM network:
              `init.from_cam_net=False`; the walk and its dCRF) with
              `--config.on_change=keep`, which adopts the copied CAMs as they are.
  psa_nocrf/  psa/'s AffinityNet and affinity labels (copied), the walk again without dCRF
              (`random_walk.crf=False`), as IRN's own rule has none.
  irn_crf/    irn/'s CAMs, relation labels and relation network (copied), IRN's walk again with
              dCRF (`random_walk.crf=True`; not IRN's), as PSA's walk has it.

Printed and written to ROOT/irn_vs_psa.md: per split, the CAM row (each method's constant
background: IRN's 0.15, PSA's 0.2, on the same CAMs), the walked labels' mIoU and the lift of
each walk over the CAM row scored with IRN's background, so that every lift is over one
number: each walk with and without dCRF, so that the two can be set side by side on equal
terms either way. Each --set KEY=VALUE goes to every run as --config.KEY=VALUE (the tests pass
the tiny configs and a data_dir), each --psa-set KEY=VALUE to the two PSA runs only (the
figures in experiments/RESULTS.md were made with the synthetic config of their day: every table
before the walk's beta 32 with beta 4, `--psa-set random_walk.beta=4`; those before 7b48f38 also
with AffinityNet's 192-px crops, `--psa-set aff.crop_size=192` as well). A run whose
results.json exists is not made again (delete its folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

SPLITS = ("train", "val")
# What a walk again on a finished run's networks needs of that run: its folders and the
# fingerprints (and reports) of the stages that made them.
WALK_INPUTS = (("cams", "aff_labels", "aff_net"),
               ("train_cam", "infer_cam", "aff_labels", "train_aff"))


def _run(config: str, workdir: str, sets: list[str], *extra: str) -> dict:
  results = os.path.join(workdir, "results.json")
  if not os.path.exists(results):
    cmd = [sys.executable, "-m", "affinity_jax.cli", "run", "--config", config, "--workdir",
           workdir, f"--config.eval.cam_splits={SPLITS!r}", *extra,
           *(f"--config.{kv}" for kv in sets)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
  with open(results) as f:
    return json.load(f)


def _copy(src: str, dst: str, names: tuple[str, ...], stages: tuple[str, ...]) -> None:
  for name in names:
    if not os.path.exists(os.path.join(dst, name)):
      shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
  for stage in stages:  # the stage's fingerprint, and its report of the images it skipped
    for folder in ("fingerprints", "reports"):
      if os.path.exists(os.path.join(src, folder, stage + ".json")):
        os.makedirs(os.path.join(dst, folder), exist_ok=True)
        shutil.copy2(os.path.join(src, folder, stage + ".json"),
                     os.path.join(dst, folder, stage + ".json"))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir-root", default="runs/irn_vs_psa")
  parser.add_argument("--irn-config", default="synthetic_irn")
  parser.add_argument("--psa-config", default="synthetic")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--psa-set", action="append", default=[], metavar="KEY=VALUE")
  args = parser.parse_args(argv)
  root = args.workdir_root
  irn_dir, psa_dir, nocrf_dir, irn_crf_dir = (
      os.path.join(root, n) for n in ("irn", "psa", "psa_nocrf", "irn_crf"))

  irn = _run(args.irn_config, irn_dir, args.set)
  # No CAM network of PSA's exists here for AffinityNet to start from (the tiny config's way).
  after_cams = ("--stages", "aff_labels,train_aff,random_walk,evaluate",
                "--config.on_change=keep", "--config.eval.seg_splits=()",
                "--config.init.from_cam_net=False")
  _copy(irn_dir, psa_dir, ("cams",), ("train_cam", "infer_cam"))
  psa_sets = args.set + args.psa_set
  psa = _run(args.psa_config, psa_dir, psa_sets, *after_cams)
  _copy(psa_dir, nocrf_dir, *WALK_INPUTS)
  nocrf = _run(args.psa_config, nocrf_dir, psa_sets, "--stages", "random_walk,evaluate",
               *after_cams[2:], "--config.random_walk.crf=False")

  _copy(irn_dir, irn_crf_dir, *WALK_INPUTS)
  irn_crf = _run(args.irn_config, irn_crf_dir, args.set, "--stages", "random_walk,evaluate",
                 "--config.on_change=keep", "--config.eval.seg_splits=()",
                 "--config.random_walk.crf=True")

  runs = (irn, irn_crf, psa, nocrf)
  lines = ["| split | CAM (IRN's background 0.15) | CAM (PSA's 0.2) | IRN walk | IRN walk + dCRF "
           "| PSA walk + dCRF | PSA walk | IRN lift | IRN lift + dCRF | PSA lift + dCRF "
           "| PSA lift |", "|---" * 11 + "|"]
  for split in SPLITS:
    cam = 100 * irn["splits"][split]["cam"]["miou"]
    walks = [100 * r["splits"][split]["rw"]["miou"] for r in runs]
    row = [cam, 100 * psa["splits"][split]["cam"]["miou"], *walks, *(w - cam for w in walks)]
    lines.append(f"| {split} | " + " | ".join(
        f"{v:+.1f}" if i >= 2 + len(runs) else f"{v:.1f}" for i, v in enumerate(row)) + " |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(root, "irn_vs_psa.md"), "w") as f:
    f.write(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
