"""Stage aff_labels: the la / ha dCRF score maps behind AffinityNet's labels (PSA.md step 3).

For every image with a CAM: the stack (background (1 - max)^alpha, present classes) for
alpha_low (la) and alpha_high (ha), each refined by dCRF on the RGB image. Writes
`{workdir}/aff_labels/{name}.npz` with `la`, `ha` float32 [H, W, P + 1] (channel 0 background),
what data.pipelines.aff_train reads. dCRF runs in `aff_labels.workers` processes.

This module imports no JAX at load time: its worker function runs in spawned processes.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

import numpy as np

from affinity_jax import crf, io


def score_stack(cam: np.ndarray, alpha: float) -> np.ndarray:
  """[H, W, P] present-class CAMs -> [H, W, P + 1], background (1 - max)^alpha first."""
  peak = cam.max(axis=-1) if cam.shape[-1] else np.zeros(cam.shape[:2], np.float32)
  return np.concatenate([np.power(1.0 - peak, alpha)[..., None], cam], axis=-1)


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


def crf_scores(image: np.ndarray, cam_path: str, out_path: str, alpha_low: float,
               alpha_high: float, iters: int) -> str | None:
  """Writes the la / ha maps of one image; returns why it was skipped, or None when written."""
  z = io.load_npz(cam_path)
  cam = z["cam"].astype(np.float32)
  if cam.shape[:2] != image.shape[:2]:
    return (f"{cam_path}: CAM is {cam.shape[0]}x{cam.shape[1]} but the image is "
            f"{image.shape[0]}x{image.shape[1]} (a CAM of another image or dataset; delete it "
            "and rerun infer_cam)")
  la = crf.crf_inference(image, score_stack(cam, alpha_low), t=iters)
  ha = crf.crf_inference(image, score_stack(cam, alpha_high), t=iters)
  io.save_npz(out_path, la=la.astype(np.float32), ha=ha.astype(np.float32))
  return None


def run(cfg) -> dict:
  import tensorflow_datasets as tfds
  from affinity_jax.stages import common
  cam_dir = common.path(cfg, common.CAMS)
  out_dir = common.path(cfg, common.AFF_LABELS)
  workers = int(cfg.aff_labels.workers) or os.cpu_count() or 1
  builder = common.builder(cfg)
  args = (float(cfg.aff_labels.alpha_low), float(cfg.aff_labels.alpha_high),
          int(cfg.aff_labels.crf_iters))
  written = 0
  report = common.SkipReport(cfg, "aff_labels")

  def collect(future, name):
    nonlocal written
    reason = future.result()
    if reason:
      report.skip(name, reason)
    else:
      written += 1

  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                              initializer=_die_with_parent) as pool:
    for split in cfg.data.pseudo_splits:
      todo = set(common.missing(common.split_names(cfg, split), out_dir, ".npz"))
      if not todo:
        print(f"[aff_labels] {split}: all score maps present in {out_dir}")
        continue
      futures = {}
      ds = builder.as_dataset(split=split, shuffle_files=False)
      for ex in tfds.as_numpy(ds):
        name = ex["name"].decode()
        if name not in todo:
          continue
        if not common.has_positive_class(ex["label"]):
          report.skip(name, common.NO_POSITIVE_CLASS)
          continue
        cam_path = os.path.join(cam_dir, name + ".npz")
        if not os.path.exists(cam_path):
          raise FileNotFoundError(f"{cam_path} is missing: run the infer_cam stage first")
        futures[pool.submit(crf_scores, ex["image"], cam_path,
                            os.path.join(out_dir, name + ".npz"), *args)] = name
        # Bound the queue so images are not all held in memory at once.
        if len(futures) >= 4 * workers:
          done, _ = concurrent.futures.wait(futures, return_when="FIRST_COMPLETED")
          for f in done:
            collect(f, futures.pop(f))
      for f, name in futures.items():
        collect(f, name)
  print(f"[aff_labels] wrote {written} score files to {out_dir} ({workers} workers)")
  return report.finish({"written": written})
