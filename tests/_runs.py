"""Helpers for the tests that run stages again on a copy of a finished tiny run's workdir."""

from __future__ import annotations

import os
import shutil

import numpy as np

from affinity_jax import io


def copy_run(run_dir, tmp_path, *drop):
  """A copy of the run's workdir without `drop` (and its tfds), and its argv pointing at it.

  `run_dir`: (workdir, argv) of a module's finished run (its fixture)."""
  workdir, argv = run_dir
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(*drop, "tfds"))
  return copy, [a if a != str(workdir) else str(copy) for a in argv]


def changed_pseudo_labels(copy, workdir) -> int:
  """How many of `copy`'s pseudo labels differ from `workdir`'s; asserts on the way that each
  has its image's shape and only the background and the image's own classes."""
  changed = 0
  for f in sorted(os.listdir(copy / "cams")):
    cam = io.load_npz(copy / "cams" / f)
    label = io.load_png(copy / "pseudo_labels" / (f[:-4] + ".png"))
    plain = io.load_png(workdir / "pseudo_labels" / (f[:-4] + ".png"))
    assert label.shape == plain.shape, f
    assert set(np.unique(label)) <= {0} | {int(c) + 1 for c in cam["class_ids"]}, f
    changed += int(np.any(label != plain))
  return changed
