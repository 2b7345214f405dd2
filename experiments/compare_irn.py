"""affinity_jax against IRN (github jiwoon-ahn/irn): the walk at stride 4, side by side.

Both sides run in this process on the same boundary maps and CAMs, IRN's code imported from its
checkout (`--irn-root` or IRN_ROOT) by irn_original.py, its files not edited:
- paths: geometry.path_offsets against misc/indexing.py's PathIndex search paths (radius 5 and
  10): the same cells for every offset;
- path affinities: the one-step transition matrix (beta 1) of geometry.boundary_affinities (as
  the dense matrix tests/reference_walk.py builds from them, divided by its column sums)
  against IRN's, read off its own propagate_to_edge (the identity basis walked 2^0 steps is
  diag(1 - boundary) T): max abs difference over rows whose damping is above 1e-3;
- walked scores: random_walk.boundary_walk against propagate_to_edge (beta 10, 2^8 steps,
  radius 5), both float32, and both against propagate_to_edge in float64 (the rounding floor);
- pseudo labels: random_walk.boundary_walk_labels on our walk against the rule of
  docs/method.md §11 (upsample x4 bilinear, crop, divide by the maximum, background 0.25)
  applied in torch to IRN's walk: share of equal pixels.
- instances (when IRN's step/make_ins_seg_labels.py imports: scikit-image, imageio, pydensecrf):
  instances.centroids and instances.clusters against find_centroids_with_refinement and
  cluster_centroids (equal; fields that lead the centroids to their centres, and fields that
  overshoot), and random_walk.boundary_walk_instances against the `_work` body
  of that step (IRN's functions and propagate_to_edge, on the CPU): instance count, classes,
  scores and the share of pixels in the same instance.
Inputs are synthetic: a boundary map of ridges between random regions (blurred, with noise) and
1-3 class CAMs as blobs, each divided by its maximum as IRN's make_cam.py does.

Usage: python experiments/compare_irn.py --irn-root /tmp/irn [--sizes 17x23,30x41,47x63]
Sizes are stride-4 grids (h x w); the images are 4h - 2 x 4w - 3. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import irn_original  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # oracles: tests/

BETA, EXP_TIMES, RADIUS, BG_THRESHOLD = 10, 8, 5, 0.25  # IRN's run_sample.py / make_sem_seg


def parse_grid(text: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"grid {text!r}: expected HxW, e.g. 30x41") from None
  if h < 2 or w < 2:
    raise argparse.ArgumentTypeError(f"grid {text!r}: needs at least 2x2 cells")
  return h, w


def synthetic_inputs(h: int, w: int, classes: int, seed: int):
  """(boundary [h, w] in [0, 1], cams [h, w, classes] each with maximum 1), float32."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  centres = rng.random((6, 2)) * [h, w]
  region = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2,
                     -1)
  ridge = np.zeros((h, w))
  ridge[:-1] += region[:-1] != region[1:]
  ridge[:, :-1] += region[:, :-1] != region[:, 1:]
  padded = np.pad(np.minimum(ridge, 1.0), 1)
  blurred = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 4.0
  boundary = np.clip(blurred + 0.05 * rng.random((h, w)), 0.0, 1.0).astype(np.float32)
  cams = []
  for _ in range(classes):
    cy, cx = rng.random(2) * [h, w]
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.08 * h * w))
    cams.append(blob / blob.max())
  return boundary, np.stack(cams, -1).astype(np.float32)


def labels_by_the_rule(torch, walked, size):
  """docs/method.md §11 step 6 in torch, our own oracle: walked [C, h, w] -> [H, W] channel
  index (0 = background; a class must beat 0.25 of the maximum, a tie is background)."""
  _, h, w = walked.shape
  up = torch.nn.functional.interpolate(walked[None], size=(4 * h, 4 * w), mode="bilinear",
                                       align_corners=False)[0, :, :size[0], :size[1]]
  share = (up / up.max()).numpy()
  return np.where(share.max(0) <= BG_THRESHOLD, 0, share.argmax(0) + 1)


def irn_transitions(irn, boundary: np.ndarray) -> np.ndarray:
  """IRN's one-step transition matrix T = A / column sums (beta 1), read off its own
  propagate_to_edge: walking the identity basis for 2^0 steps gives diag(1 - B) T."""
  torch = irn.torch
  h, w = boundary.shape
  basis = torch.eye(h * w).reshape(h * w, h, w)
  walked = irn.indexing.propagate_to_edge(basis, torch.from_numpy(boundary)[None],
                                          radius=RADIUS, beta=1, exp_times=0)
  return walked.reshape(h * w, h * w).numpy()


def compare(irn, grid, classes: int, seed: int) -> dict:
  import jax.numpy as jnp
  from affinity_jax import geometry, random_walk
  from tests import reference_walk
  torch, indexing = irn.torch, irn.indexing
  h, w = grid
  size = (4 * h - 2, 4 * w - 3)
  boundary, cams = synthetic_inputs(h, w, classes, seed)
  forward = np.asarray(geometry.boundary_affinities(jnp.asarray(boundary[None]), radius=RADIUS))
  matrix = reference_walk.dense_affinity_matrix(forward[0], radius=RADIUS)
  ours_matrix = matrix / matrix.sum(axis=0, keepdims=True)
  damping = 1.0 - boundary.reshape(-1).astype(np.float64)
  rows = damping > 1e-3
  theirs_matrix = irn_transitions(irn, boundary)[rows] / damping[rows, None]
  ours_matrix = ours_matrix[rows]
  walked = np.asarray(random_walk.boundary_walk(boundary[None], cams[None], radius=RADIUS,
                                                beta=BETA, t=2 ** EXP_TIMES))[0]
  x = torch.from_numpy(cams.transpose(2, 0, 1).copy())
  edge = torch.from_numpy(boundary)[None]
  rw32 = indexing.propagate_to_edge(x, edge, radius=RADIUS, beta=BETA, exp_times=EXP_TIMES)
  rw64 = indexing.propagate_to_edge(x.double(), edge.double(), radius=RADIUS, beta=BETA,
                                    exp_times=EXP_TIMES)
  theirs = rw32[:, 0].numpy().transpose(1, 2, 0)
  exact = rw64[:, 0].numpy().transpose(1, 2, 0)
  scale = float(np.abs(exact).max())
  labels_theirs = labels_by_the_rule(torch, rw32[:, 0], size)
  labels_ours = random_walk.boundary_walk_labels(walked, size, threshold=BG_THRESHOLD)
  return {"grid": [h, w], "image": list(size), "classes": classes,
          "transition_max_abs": float(np.abs(ours_matrix - theirs_matrix).max()),
          "walk_max_rel": float(np.abs(walked - theirs).max() / np.abs(theirs).max()),
          "ours_vs_float64_max_rel": float(np.abs(walked - exact).max() / scale),
          "irn_vs_float64_max_rel": float(np.abs(theirs - exact).max() / scale),
          "labels_equal_pct": 100.0 * float(np.mean(labels_ours == labels_theirs))}


def synthetic_displacement(h: int, w: int, seed: int, pull: float = 0.9) -> np.ndarray:
  """[h, w, 2] (dy, dx): each cell pointing `pull` times the way to the nearest of 4 random
  centres, with noise, so that the centroids gather in groups with some strays (a pull over 2
  overshoots: the steps oscillate, where any other rounding than IRN's ends elsewhere)."""
  rng = np.random.default_rng(seed + 1000)
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  centres = rng.random((4, 2)) * [h - 1, w - 1]
  nearest = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2,
                      -1)
  target = centres[nearest]
  d = pull * (target - np.stack([yy, xx], -1)) + rng.normal(0, 0.3, (h, w, 2))
  return d.astype(np.float32)


def irn_instances(irn, step, boundary, displacement, cams, keys, size):
  """IRN's make_ins_seg_labels.py `_work` body for one image, on the CPU, with its own
  functions and propagate_to_edge: (centroids [2, h, w], groups [K, h, w], detections)."""
  torch = irn.torch
  dp = np.ascontiguousarray(displacement.transpose(2, 0, 1))
  centroids = step.find_centroids_with_refinement(dp)
  instance_map = step.cluster_centroids(centroids, dp)
  instance_cam = step.separte_score_by_mask(torch.from_numpy(cams.transpose(2, 0, 1).copy()),
                                            instance_map)
  rw = irn.indexing.propagate_to_edge(instance_cam, torch.from_numpy(boundary), beta=BETA,
                                      exp_times=EXP_TIMES, radius=RADIUS)
  rw_up = torch.nn.functional.interpolate(rw, scale_factor=4, mode="bilinear",
                                          align_corners=False)[:, 0, :size[0], :size[1]]
  rw_up = rw_up / torch.max(rw_up)
  rw_up_bg = torch.nn.functional.pad(rw_up, (0, 0, 0, 0, 1, 0), value=BG_THRESHOLD)
  num_instances = instance_map.shape[0]
  shape = torch.argmax(rw_up_bg, 0).numpy()
  shape = irn.pyutils.to_one_hot(shape, maximum_val=num_instances * len(keys) + 1)[1:]
  detected = step.detect_instance(rw_up.numpy(), shape, np.repeat(keys, num_instances),
                                  max_fragment_size=size[0] * size[1] * 0.01)
  return centroids, instance_map, detected


def compare_instances(irn, step, grid, classes: int, seed: int) -> dict:
  """Instances (affinity_jax/instances.py through random_walk.boundary_walk_instances)
  against IRN's on the same boundary map, displacement field and CAMs."""
  import jax
  from affinity_jax import instances, random_walk
  h, w = grid
  size = (4 * h - 2, 4 * w - 3)
  boundary, cams = synthetic_inputs(h, w, classes, seed)
  displacement = synthetic_displacement(h, w, seed, pull=(0.9, 1.8, 2.7)[seed % 3])
  keys = np.arange(classes, dtype=np.int32) * 2 + 1  # class ids 1, 3, 5
  centroids, groups, theirs = irn_instances(irn, step, boundary, displacement, cams, keys, size)
  @jax.jit
  def scores(edge, stack, valid):
    return random_walk.boundary_walk(edge, stack, valid=valid, radius=RADIUS, beta=BETA,
                                     t=2 ** EXP_TIMES)
  walk = random_walk.BoundaryWalk(maps=None, scores=scores)
  ours = random_walk.boundary_walk_instances(walk, boundary, displacement, cams, keys, size,
                                             threshold=BG_THRESHOLD)
  our_centroids = instances.centroids(displacement)
  our_groups = instances.clusters(our_centroids, displacement)
  their_map = np.zeros(size, np.int32)
  for i, m in enumerate(theirs["mask"]):
    their_map[m] = i + 1
  same_count = len(theirs["class"]) == len(ours.class_ids)
  return {"grid": [h, w], "classes": classes, "groups": int(groups.shape[0]),
          "centroids_equal": bool(np.array_equal(our_centroids, centroids.transpose(1, 2, 0))),
          "groups_equal": bool(np.array_equal(our_groups, np.argmax(groups, 0))
                               and groups.shape[0] == our_groups.max() + 1),
          "instances": [len(theirs["class"]), len(ours.class_ids)],
          "classes_equal": bool(same_count and np.array_equal(theirs["class"], ours.class_ids)),
          "scores_max_abs": float(np.abs(theirs["score"] - ours.scores).max())
                            if same_count else float("inf"),
          "pixels_equal_pct": 100.0 * float(np.mean(their_map == ours.instance_map))}


def paths_equal(irn, radius: int) -> bool:
  from affinity_jax import geometry
  index = irn.indexing.PathIndex(radius=radius, default_size=(2 * radius + 2, 4 * radius + 2))
  theirs = {tuple(path[0]): {tuple(c) for c in path}
            for group in index.search_paths for path in group}
  ours = {o: set(p) for o, p in zip(geometry.forward_offsets(radius),
                                     geometry.path_offsets(radius))}
  return theirs == ours


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--irn-root", default=os.environ.get("IRN_ROOT"),
                      help="checkout of github.com/jiwoon-ahn/irn (default: $IRN_ROOT)")
  parser.add_argument("--sizes", type=lambda s: [parse_grid(v) for v in s.split(",")],
                      default=[(17, 23), (30, 41), (47, 63)], help="stride-4 grids, HxW")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if not args.irn_root:
    parser.error("--irn-root (or IRN_ROOT) is required")
  try:
    root = irn_original.check_irn_root(args.irn_root)
  except ValueError as e:
    parser.error(str(e))
  irn = irn_original.load_irn(root)
  results = {"paths_equal_r5": paths_equal(irn, 5), "paths_equal_r10": paths_equal(irn, 10),
             "cases": []}
  print(f"paths: radius 5 {'equal' if results['paths_equal_r5'] else 'DIFFERENT'}, "
        f"radius 10 {'equal' if results['paths_equal_r10'] else 'DIFFERENT'}")
  print("| grid (image) | classes | transitions max abs | walk max rel | ours / IRN vs "
        "float64 | labels equal |")
  print("|---|---|---|---|---|---|")
  for i, grid in enumerate(args.sizes):
    row = compare(irn, grid, classes=1 + i % 3, seed=args.seed + i)
    results["cases"].append(row)
    print(f"| {grid[0]}x{grid[1]} ({row['image'][0]}x{row['image'][1]}) | {row['classes']} | "
          f"{row['transition_max_abs']:.1e} | {row['walk_max_rel']:.1e} | "
          f"{row['ours_vs_float64_max_rel']:.1e} / {row['irn_vs_float64_max_rel']:.1e} | "
          f"{row['labels_equal_pct']:.3f}% |", flush=True)
  try:
    step = irn_original.load_instance_step(irn)
  except ImportError as e:
    step = None
    print(f"instances: not compared ({e}; IRN's instance step imports scikit-image, imageio "
          "and pydensecrf)")
  if step is not None:
    irn.pyutils = importlib.import_module("misc.pyutils")
    print("| grid | classes | groups | centroids | groups equal | instances IRN / ours | "
          "classes | scores max abs | pixels equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    results["instances"] = []
    for i, grid in enumerate(args.sizes):
      row = compare_instances(irn, step, grid, classes=1 + i % 3, seed=args.seed + i)
      results["instances"].append(row)
      print(f"| {grid[0]}x{grid[1]} | {row['classes']} | {row['groups']} | "
            f"{'equal' if row['centroids_equal'] else 'DIFFERENT'} | {row['groups_equal']} | "
            f"{row['instances'][0]} / {row['instances'][1]} | {row['classes_equal']} | "
            f"{row['scores_max_abs']:.1e} | {row['pixels_equal_pct']:.3f}% |", flush=True)
  cases = results["cases"]
  results.update({
      "transition_max_abs": max(c["transition_max_abs"] for c in cases),
      "walk_max_rel": max(c["walk_max_rel"] for c in cases),
      "ours_vs_float64_max_rel": max(c["ours_vs_float64_max_rel"] for c in cases),
      "irn_vs_float64_max_rel": max(c["irn_vs_float64_max_rel"] for c in cases),
      "labels_equal_pct": min(c["labels_equal_pct"] for c in cases)})
  if step is not None:
    rows = results["instances"]
    results["instances_equal"] = all(
        r["centroids_equal"] and r["groups_equal"] and r["classes_equal"] for r in rows)
    results["instance_scores_max_abs"] = max(r["scores_max_abs"] for r in rows)
    results["instance_pixels_equal_pct"] = min(r["pixels_equal_pct"] for r in rows)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
