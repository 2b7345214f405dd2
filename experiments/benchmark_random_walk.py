"""Sparse (stencil) vs dense (original) random walk: time, agreement, peak memory.

Both paths run in this process on the same affinities and CAMs. Inputs look like real ones:
affinity features piecewise constant over a few regions (plus a little noise), CAMs of 21
channels (background + 20 classes) with three present classes as smooth blobs.

Dense: the original's path in float32 numpy (BLAS), as the test oracle tests/reference_walk.py
writes it: A^beta, column normalisation, 8 squarings of the (hw x hw) matrix, v @ T; timed after
one warm-up run, from the already built matrix (the original builds it on the CPU too, then
moves it to the GPU). Its peak memory is analytical: three live (hw)^2 float32 matrices (the
affinity matrix, T, and the product being formed). Grids whose dense matrix would not fit are
reported with that figure and not run.

Sparse: `random_walk.propagate` (weights + 256 stencil steps, jitted), best of 5 (2 on the two
large grids) after warm-up.
Its peak memory is XLA's compiled memory analysis of the jitted walk (arguments + outputs +
temporaries).

Present classes: the walk of the background and an image's 1 or 3 classes (walk_batch's
channels, padded to 2 or 4) against the walk of all 21, on VOC-size grids (56x56 and 47x63 at
stride 8, 94x125 at stride 4): seconds (best of 3), speed-up, share of equal labels.

Stage: the random_walk stage's per-batch work (`random_walk.walk_batch`: AffinityNet at
`--stage-width`, the walk, upsampling, argmax) on one 375x500 image, present classes vs all 21.

IRN's walk at stride 4 (`--irn`): random_walk.boundary_walk (affinities 1 - max boundary on the
path, beta 10, 2^8 steps, radius 5) on the stride-4 grid of a 375x500 image (94x125) with a
synthetic boundary map, over 21 channels and over an image's 1 or 3 classes (padded to 2 or 4
channels, as walk_batch pads them): seconds and XLA's peak memory. IRN's own dense walk
(misc/indexing.py propagate_to_edge, from `--irn-root`, in a child process on this CPU) on the
3-class input: seconds, the growth of the process's peak resident memory, and the share of equal
pseudo labels; its memory and FLOP are also computed (experiments/irn_original.py).

Usage: python experiments/benchmark_random_walk.py [--quick] [--stage-width 1.0]
           [--irn [--irn-root DIR]]
The last line printed is JSON for the 56x56 case (with `--irn`, for IRN's walk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from affinity_jax import geometry, random_walk as rw  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # oracles: tests/
from tests import reference_walk  # noqa: E402

MIB = 2 ** 20
DENSE_LIMIT_BYTES = 2 ** 30  # beyond this analytical peak the dense path is not run (minutes+)


def make_inputs(h, w, radius, seed=0, num_channels=21, feature_dim=16):
  """Piecewise-constant features over Voronoi regions, blob CAMs, on an h x w grid."""
  rng = np.random.default_rng(seed)
  seeds = rng.random((6, 2)) * [h, w]
  yy, xx = np.mgrid[:h, :w]
  region = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, -1)
  codes = rng.normal(size=(6, feature_dim)) * 2.0
  feats = codes[region] + rng.normal(size=(h, w, feature_dim)) * 0.05
  cam = np.zeros((h, w, num_channels))
  for c in (3, 8, 15):
    cy, cx = rng.random(2) * [h, w]
    sigma = 0.15 * min(h, w) + 1.0
    cam[..., c] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
  cam[..., 0] = (1 - cam[..., 1:].max(-1)) ** 16
  feats = jnp.asarray(feats[None], jnp.float32)
  cam = jnp.asarray(cam[None], jnp.float32)
  aff_sym = geometry.neighbourhood_affinities(feats, radius=radius)
  forward = geometry.pair_affinities(feats, radius=radius)
  return aff_sym, forward, cam


def time_best(fn, repeats=3):
  fn()  # warm-up (compilation)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def sparse_peak_mib(aff_sym, cam, radius, beta, t):
  weights = rw.transition_weights(aff_sym, beta=beta)
  lowered = rw._propagate.lower(weights, cam, radius=radius, t=t, tol=None,
                                chunks=rw._default_chunks(cam.shape[-1]))
  mem = lowered.compile().memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  # The weights themselves are computed outside the loop: add their producer's footprint
  # (the affinities in, the weights out).
  total += aff_sym.nbytes + weights.nbytes
  return total / MIB


def run_case(h, w, radius, stride, beta=8.0, t=256, tols=(1e-4, 1e-5)):
  aff_sym, forward, cam = make_inputs(h, w, radius)
  walk = lambda: rw.propagate(aff_sym, cam, radius=radius, beta=beta, t=t).block_until_ready()
  sparse_s = time_best(walk, repeats=5 if h * w <= 4096 else 2)
  sparse_out = np.asarray(walk())[0]
  steps = {}
  for tol in tols:
    _, n = rw.propagate(aff_sym, cam, radius=radius, beta=beta, t=t, tol=tol, return_steps=True)
    steps[tol] = int(n)
  n = h * w
  dense_bytes = 3 * n * n * 4
  row = {"grid": [h, w], "radius": radius, "stride": stride, "image": [h * stride, w * stride],
         "sparse_s": sparse_s, "sparse_peak_mib": sparse_peak_mib(aff_sym, cam, radius, beta, t),
         "dense_peak_mib": dense_bytes / MIB, "dense_s": None, "speedup": None,
         "max_abs_diff": None, "early_stop_steps": steps}
  if dense_bytes <= DENSE_LIMIT_BYTES:
    matrix = reference_walk.dense_affinity_matrix(np.asarray(forward[0]), radius=radius,
                                                  dtype=np.float32)
    v = np.asarray(cam[0]).reshape(n, -1)
    dense = lambda: reference_walk.dense_walk(matrix, v, beta=beta, t=t)
    row["dense_s"] = time_best(dense, repeats=3)
    dense_out = dense().reshape(sparse_out.shape)
    row["speedup"] = row["dense_s"] / sparse_s
    row["max_abs_diff"] = float(np.abs(dense_out - sparse_out).max())
  return row


def run_present(h, w, radius, stride, beta=8.0, t=256):
  """The walk over the background and an image's 1 or 3 classes (what walk_batch runs, padded
  to 2 or 4 channels) against the walk over all 21: seconds, and whether the labels agree."""
  aff_sym, _, cam = make_inputs(h, w, radius)
  rows = []
  for present in ((3,), (3, 8, 15)):
    full = np.zeros(cam.shape, np.float32)
    full[..., list(present)] = np.asarray(cam)[..., list(present)]
    full[..., 0] = (1 - full[..., 1:].max(-1)) ** 16
    channels = [0, *present]
    k = rw.channel_count(len(channels), full.shape[-1])
    compact = np.zeros(full.shape[:-1] + (k,), np.float32)
    compact[..., :len(channels)] = full[..., channels]
    full, compact = jnp.asarray(full), jnp.asarray(compact)
    walk = jax.jit(lambda a, c: rw.propagate(a, c, radius=radius, beta=beta, t=t))
    all_s = time_best(lambda: walk(aff_sym, full).block_until_ready(), repeats=3)
    present_s = time_best(lambda: walk(aff_sym, compact).block_until_ready(), repeats=3)
    labels_all = np.argmax(np.asarray(walk(aff_sym, full)), -1)
    labels_present = np.asarray(channels)[np.argmax(np.asarray(walk(aff_sym, compact)), -1)]
    rows.append({"grid": [h, w], "stride": stride, "classes": len(present), "channels": k,
                 "all_s": all_s, "present_s": present_s, "speedup": all_s / present_s,
                 "labels_equal": float(np.mean(labels_all == labels_present))})
  return rows


def run_stage(width: float, size=(375, 500), repeats: int = 3):
  """The random_walk stage's per-batch work (random_walk.walk_batch: AffinityNet at `width`,
  the walk of 2^8 steps, upsampling, argmax) on one VOC-size image with 1 and 3 classes of 20:
  the walk over the present classes against the walk over all 21 (classes= every class)."""
  import ml_collections
  from affinity_jax import models
  h, w = size
  model = models.build("affinity", width=width)
  variables = models.init_variables(model, jax.random.key(0), (1, 64, 64, 3))
  cfg = ml_collections.ConfigDict({"random_walk": dict(radius=5, scheme="psa", logt=8,
                                                       beta=8.0, tol=0.0, crf=False)})
  walk = rw.make_walk_fn(model, cfg)
  canvas = (-(-h // 8) * 8, -(-w // 8) * 8)
  rng = np.random.default_rng(0)
  images = np.zeros((1, *canvas, 3), np.float32)
  images[0, :h, :w] = rng.normal(size=(h, w, 3))
  sizes = np.array([[h, w]])
  rows = []
  for present in ((3,), (3, 8, 15)):
    cams = np.zeros((h, w, 20), np.float32)
    yy, xx = np.mgrid[:h, :w]
    for c in present:
      cy, cx = rng.uniform(0.2, 0.8, 2) * (h, w)
      cams[..., c] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 * h * w))
    times, labels = {}, {}
    for name, classes in (("all", np.arange(20)), ("present", np.asarray(present))):
      def run(classes=classes):
        return rw.walk_batch(walk, variables, images, {0: cams}, sizes, sizes,
                             classes={0: classes}, alpha=16.0, image_scale=1.0)[0]
      times[name] = time_best(run, repeats=repeats)
      labels[name] = run()
    rows.append({"size": [h, w], "width": width, "classes": len(present),
                 "all_s": times["all"], "present_s": times["present"],
                 "speedup": times["all"] / times["present"],
                 "labels_equal": float(np.mean(labels["all"] == labels["present"]))})
  return rows


IRN_GRID = (94, 125)  # stride 4 of a 375x500 image
IRN_BETA, IRN_T, IRN_RADIUS = 10.0, 256, 5


def irn_inputs(h, w, classes, seed=0):
  """(boundary [h, w], cams [h, w, classes]): compare_irn.py's synthetic ones."""
  import compare_irn
  return compare_irn.synthetic_inputs(h, w, classes, seed)


def run_irn(irn_root: str | None) -> dict:
  """IRN's walk on the stride-4 grid of a VOC-size image: ours over 21 / present channels
  (seconds, XLA's peak memory), IRN's dense walk in a child process where given."""
  import irn_original
  h, w = IRN_GRID
  boundary, cams = irn_inputs(h, w, 3)
  b = jnp.asarray(boundary[None])
  forward = geometry.boundary_affinities(b, radius=IRN_RADIUS)
  aff_sym = geometry.symmetric_affinities(forward, radius=IRN_RADIUS)
  walk = jax.jit(lambda bd, c: rw.boundary_walk(bd, c, radius=IRN_RADIUS, beta=IRN_BETA,
                                                t=IRN_T))
  rows = []
  for name, classes, channels in (("all 21", 3, 21), ("1 class", 1, rw.channel_count(1, 20)),
                                  ("3 classes", 3, rw.channel_count(3, 20))):
    c = np.zeros((1, h, w, channels), np.float32)
    c[0, ..., :classes] = cams[..., :classes]
    c = jnp.asarray(c)
    seconds = time_best(lambda c=c: walk(b, c).block_until_ready(), repeats=3)
    rows.append({"channels": name, "walked": channels, "seconds": seconds,
                 "peak_mib": sparse_peak_mib(aff_sym, c, IRN_RADIUS, IRN_BETA, IRN_T)})
  cost = irn_original.dense_walk_cost(h, w)
  result = {"grid": [h, w], "ours": rows, "dense_computed_mib": cost["peak_bytes"] / MIB,
            "dense_tflop": cost["flop"] / 1e12, "dense_s": None, "dense_measured_mib": None,
            "labels_equal_pct": None}
  if irn_root:
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
      inputs, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
      np.savez(inputs, boundary=boundary, cams=cams)
      res = subprocess.run([sys.executable, os.path.abspath(__file__), "--irn-dense-child",
                            irn_root, inputs, out], capture_output=True, text=True)
      if res.returncode != 0:
        raise SystemExit(f"IRN's dense walk failed:\n{res.stderr[-3000:]}")
      child = json.loads(res.stdout.strip().splitlines()[-1])
      theirs = np.load(out)["rw"]
    ours = np.asarray(walk(b, jnp.asarray(cams[None])))[0]
    size = (375, 500)
    result.update(dense_s=child["seconds"], dense_measured_mib=child["peak_growth_mib"],
                  labels_equal_pct=100.0 * float(np.mean(
                      rw.boundary_walk_labels(ours, size) ==
                      rw.boundary_walk_labels(theirs, size))))
  return result


def irn_dense_child(irn_root: str, inputs: str, out: str) -> None:
  """Runs IRN's propagate_to_edge on the saved inputs in this (fresh) process; prints seconds
  and how far the process's peak resident memory grew."""
  import resource
  import irn_original
  irn = irn_original.load_irn(irn_root)
  data = np.load(inputs)
  torch = irn.torch
  x = torch.from_numpy(data["cams"].transpose(2, 0, 1).copy())
  edge = torch.from_numpy(data["boundary"])[None]
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  t0 = time.perf_counter()
  walked = irn.indexing.propagate_to_edge(x, edge, radius=IRN_RADIUS, beta=IRN_BETA,
                                          exp_times=int(np.log2(IRN_T)))
  seconds = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  np.savez(out, rw=walked[:, 0].numpy().transpose(1, 2, 0))
  print(json.dumps({"seconds": seconds, "peak_growth_mib": (after - before) / 1024}))


def print_irn(result: dict) -> None:
  h, w = result["grid"]
  print(f"IRN's walk at stride 4 ({h}x{w} grid of a 375x500 image, radius {IRN_RADIUS}, beta "
        f"{IRN_BETA:g}, {IRN_T} steps):")
  print("| walk | channels | seconds | peak memory MiB |")
  print("|---|---|---|---|")
  for row in result["ours"]:
    print(f"| ours (boundary_walk), {row['channels']} | {row['walked']} | {row['seconds']:.3f} | "
          f"{row['peak_mib']:.1f} |")
  measured = result["dense_s"] is not None
  print(f"| IRN's dense (propagate_to_edge), 3 classes | 3 | "
        f"{'%.1f' % result['dense_s'] if measured else 'not run'} | "
        f"{'%.0f measured, ' % result['dense_measured_mib'] if measured else ''}"
        f"{result['dense_computed_mib']:.0f} computed |")
  print(f"IRN's dense walk: {result['dense_tflop']:.1f} TFLOP"
        + (f"; pseudo labels equal on {result['labels_equal_pct']:.3f}% of the pixels"
           if measured else "; pass --irn-root to run it"), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="only the 32x32 and 56x56 grids")
  parser.add_argument("--stage-width", type=float, default=1.0,
                      help="AffinityNet's width in the stage measurement (1.0: ResNet-38's); "
                           "0 leaves the stage measurement out")
  parser.add_argument("--irn", action="store_true",
                      help="only IRN's walk at stride 4 (with --irn-root: against IRN's own)")
  parser.add_argument("--irn-root", default=os.environ.get("IRN_ROOT"),
                      help="checkout of github.com/jiwoon-ahn/irn (default: $IRN_ROOT)")
  parser.add_argument("--irn-dense-child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.irn_dense_child:
    irn_dense_child(*args.irn_dense_child)
    return
  if args.irn:
    if args.irn_root:
      import irn_original
      try:
        args.irn_root = irn_original.check_irn_root(args.irn_root)
      except ValueError as e:
        parser.error(str(e))
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}")
    result = run_irn(args.irn_root)
    print_irn(result)
    print(json.dumps(result))
    return
  cases = [(32, 32, 5, 8), (56, 56, 5, 8), (47, 63, 5, 8), (128, 256, 5, 8), (125, 125, 10, 4)]
  if args.quick:
    cases = cases[:2]
  print(f"# machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, "
        f"numpy {np.__version__}, backend {jax.default_backend()}")
  header = ("grid", "radius", "dense s", "sparse s", "speedup", "max abs diff",
            "sparse peak MiB", "dense peak MiB", "steps tol 1e-4/1e-5")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  rows = []
  for h, w, radius, stride in cases:
    row = run_case(h, w, radius, stride)
    rows.append(row)
    ran = row["dense_s"] is not None
    fmt = lambda x, f: (f % x) if x is not None else "not run"
    print(f"| {h}x{w} (stride {stride}, {h * stride}x{w * stride}) | {radius} | "
          f"{fmt(row['dense_s'], '%.3f')} | {row['sparse_s']:.4f} | "
          f"{fmt(row['speedup'], '%.1fx')} | {fmt(row['max_abs_diff'], '%.2e')} | "
          f"{row['sparse_peak_mib']:.1f} | {row['dense_peak_mib']:.0f}"
          f"{'' if ran else ' (need)'} | "
          f"{row['early_stop_steps'][1e-4]}/{row['early_stop_steps'][1e-5]} |", flush=True)
  print()
  print("Walking the present classes only (background + 1 or 3 of 20 classes, as walk_batch "
        "does) against all 21 channels:")
  print("| grid | classes | channels walked | all 21 s | present s | speed-up | labels equal |")
  print("|---|---|---|---|---|---|---|")
  present_cases = [(56, 56, 5, 8), (47, 63, 5, 8)] + ([] if args.quick else [(94, 125, 5, 4)])
  for h, w, radius, stride in present_cases:
    for row in run_present(h, w, radius, stride):
      print(f"| {h}x{w} (stride {stride}) | {row['classes']} | {row['channels']} | "
            f"{row['all_s']:.4f} | {row['present_s']:.4f} | {row['speedup']:.1f}x | "
            f"{100 * row['labels_equal']:.3f}% |", flush=True)
  if args.stage_width > 0:
    print()
    print(f"The stage's per-batch work (walk_batch: AffinityNet at width {args.stage_width:g}, "
          "walk, upsampling, argmax) on one 375x500 image:")
    print("| image | classes | all 21 s | present s | speed-up | labels equal |")
    print("|---|---|---|---|---|---|")
    for row in run_stage(args.stage_width):
      print(f"| 375x500 | {row['classes']} | {row['all_s']:.3f} | {row['present_s']:.3f} | "
            f"{row['speedup']:.2f}x | {100 * row['labels_equal']:.3f}% |", flush=True)
  main_row = next(r for r in rows if r["grid"] == [56, 56])
  print(json.dumps({"grid": [56, 56], "speedup": main_row["speedup"],
                    "max_abs_diff": main_row["max_abs_diff"],
                    "sparse_peak_mib": main_row["sparse_peak_mib"],
                    "dense_peak_mib": main_row["dense_peak_mib"]}))


if __name__ == "__main__":
  main()
