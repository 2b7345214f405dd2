"""Stage aff_labels: the la / ha dCRF score maps behind AffinityNet's labels (docs/method.md §3).

For every image with a CAM: the stack (background (1 - max)^alpha, present classes) for
alpha_low (la) and alpha_high (ha), each refined by dCRF on the RGB image. Writes
`{workdir}/aff_labels/{name}.npz` (artifacts.save_scores), what data.pipelines.aff_train reads.
dCRF runs in `aff_labels.workers` processes; in a multi-process run each process labels its
even share of the images still to do (per_image.shares).

With `method` "irn" (docs/method.md §11) it writes IRN's confident-region labels instead,
`{workdir}/aff_labels/{name}.png` (relation_labels.relation_labels on the full-resolution CAMs,
thresholds aff_labels.fg_threshold / bg_threshold): what data.pipelines.relation_train reads.

This module imports no JAX at load time: its worker functions run in spawned processes.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

import numpy as np

from affinity_jax import artifacts, config, console, crf

# What its outputs are made from (affinity_jax/fingerprints.py): the config keys it reads
# (a section stands for all its keys) and the stages whose outputs it consumes.
READS = ("aff_labels",)
CONSUMES = ("infer_cam",)
# The version of this stage's code: bumped when the same inputs give other outputs
# (fingerprints.py). 2: its dCRF sees PIL's JPEG pixels.
VERSION = 2


def _die_with_parent() -> None:
  """Worker initialiser: a SIGKILL of the stage's process must not leave its workers behind
  (they would wait on their task queue forever). Linux only; elsewhere a no-op."""
  import ctypes
  import signal
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() == 1:  # the parent died before prctl took effect
    os._exit(1)


def crf_scores(image: np.ndarray, la: np.ndarray, ha: np.ndarray, out_path: str,
               iters: int) -> None:
  """Refines the la / ha stacks of one image by dCRF and writes them (in a worker process)."""
  artifacts.save_scores(out_path, crf.crf_inference(image, la, t=iters),
                        crf.crf_inference(image, ha, t=iters))


def relation_label(image: np.ndarray, cams: np.ndarray, class_ids: np.ndarray, out_path: str,
                   fg_threshold: float, bg_threshold: float) -> None:
  """Writes IRN's confident-region label of one image (in a worker process)."""
  from affinity_jax import relation_labels
  artifacts.save_label(out_path, relation_labels.relation_labels(
      image, cams, classes=class_ids, fg_threshold=fg_threshold, bg_threshold=bg_threshold))


def run(cfg) -> dict:
  import jax
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from affinity_jax import cam, data
  from affinity_jax import distributed
  from affinity_jax.data import records
  from affinity_jax.stages import per_image
  workdir = artifacts.Workdir(cfg.workdir)
  out_dir = workdir.path(artifacts.AFF_LABELS)
  workers = int(cfg.aff_labels.workers) or os.cpu_count() or 1
  builder = data.from_config(cfg)
  irn = config.method(cfg) == "irn"
  suffix = ".png" if irn else ".npz"
  if irn:
    thresholds = (float(cfg.aff_labels.fg_threshold), float(cfg.aff_labels.bg_threshold))
  else:
    alpha_low, alpha_high = float(cfg.aff_labels.alpha_low), float(cfg.aff_labels.alpha_high)
    iters = int(cfg.aff_labels.crf_iters)
  written = 0
  report = artifacts.SkipReport(workdir, "aff_labels", jax.process_index() == 0)
  no_cam = artifacts.skipped_by(workdir, "infer_cam")  # e.g. larger than the canvas

  def collect(future):
    nonlocal written
    future.result()
    written += 1

  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                              initializer=_die_with_parent) as pool:
    splits = list(cfg.data.pseudo_splits)
    todo_of, mine = per_image.shares(builder, splits, out_dir, suffix, "aff_labels")
    for split in splits:
      if not todo_of[split]:
        print(f"[aff_labels] {split}: all labels present in {out_dir}")
        continue
      # This process's images still without scores (an image of two splits: in the first).
      todo = set(artifacts.missing([n for n in todo_of[split] if n in mine], out_dir, suffix))
      if not todo:
        continue
      futures = {}
      # Only this process's images are decoded (as builder.as_dataset decodes them).
      image_feature = builder.info.features["image"]
      ds = records.named(records.encoded(builder, split), todo).map(
          lambda ex: {"name": ex["name"], "label": ex["label"],
                      "image": image_feature.decode_example(ex["image"])},
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      for ex in console.track(tfds.as_numpy(ds), len(todo), "aff_labels",
                              enabled=report.main_process):
        distributed.check_peers()
        name = ex["name"].decode()
        if name not in todo:
          continue
        if not artifacts.has_positive_class(ex["label"]):
          report.skip(name, artifacts.NO_POSITIVE_CLASS)
          continue
        cam_path = workdir.cam(name)
        if name in no_cam and not os.path.exists(cam_path):
          report.skip(name, "no CAM (infer_cam skipped it)")
          continue
        present, class_ids = artifacts.load_cam_present(cam_path)
        mismatch = artifacts.cam_size_mismatch(cam_path, present.shape[:2], ex["image"].shape[:2])
        if mismatch:
          report.skip(name, mismatch)
          continue
        if irn:
          future = pool.submit(relation_label, ex["image"], present, class_ids,
                               workdir.relation_label(name), *thresholds)
        else:
          la = cam.background_stack(present, alpha=alpha_low)
          ha = cam.background_stack(present, alpha=alpha_high)
          future = pool.submit(crf_scores, ex["image"], la, ha, workdir.scores(name), iters)
        futures[future] = name
        # Bound the queue so images are not all held in memory at once.
        if len(futures) >= 4 * workers:
          done, _ = concurrent.futures.wait(futures, return_when="FIRST_COMPLETED")
          for f in done:
            futures.pop(f)
            collect(f)
      for f in futures:
        collect(f)
  print(f"[aff_labels] wrote {written} {'relation labels' if irn else 'score files'} to "
        f"{out_dir} ({workers} workers)")
  return report.finish({"written": written})
