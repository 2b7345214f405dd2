"""IRN's walk: path geometry, affinities from a boundary map, the walk and its labels.

Oracles: pairs and paths enumerated by loops here, the dense walk of tests/reference_walk.py;
with IRN_ROOT (a checkout of github.com/jiwoon-ahn/irn) and torch, IRN's own propagate_to_edge
through experiments/compare_irn.py.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from affinity_jax import geometry, random_walk
from tests import reference_walk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_path_offsets_by_hand():
  paths = dict(zip(geometry.forward_offsets(5), geometry.path_offsets(5)))
  assert set(paths[(0, 3)]) == {(0, 0), (0, 1), (0, 2), (0, 3)}
  assert set(paths[(1, 1)]) == {(0, 0), (0, 1), (1, 0), (1, 1)}
  # (2, 1): every cell of the 3 x 2 box lies within one cell of the line y = 2x.
  assert set(paths[(2, 1)]) == {(y, x) for y in range(3) for x in range(2)}
  # (3, -1): the box's corners (0, -1) and (3, 0) are 3 / sqrt(10) ~ 0.95 cells away: kept;
  # (2, 0) is 2 / sqrt(10) away, kept too.
  assert set(paths[(3, -1)]) == {(y, x) for y in range(4) for x in (-1, 0)}
  # (3, 3): the diagonal and its neighbours (|x - y| <= 1), not the box's far corners.
  assert set(paths[(3, 3)]) == {(y, x) for y in range(4) for x in range(4) if abs(x - y) <= 1}
  for (dy, dx), path in paths.items():
    assert (0, 0) in path and (dy, dx) in path and len(set(path)) == len(path)
  assert len(geometry.path_offsets(10)) == len(geometry.forward_offsets(10))


def _cells_on_path(dy, dx):
  n = dy * dy + dx * dx
  return [(y, x) for y in range(min(0, dy), max(0, dy) + 1)
          for x in range(min(0, dx), max(0, dx) + 1) if (dy * x - dx * y) ** 2 < n]


@pytest.mark.parametrize("radius", [3, 5])
def test_boundary_affinities_match_loops(radius):
  rng = np.random.default_rng(0)
  b, h, w = 2, 9, 11
  boundary = rng.random((b, h, w)).astype(np.float32)
  valid = np.ones((b, h, w), bool)
  valid[1, 6:] = False
  valid[1, :, 8:] = False
  got = np.asarray(geometry.boundary_affinities(jnp.asarray(boundary), radius=radius,
                                                valid=valid))
  want = np.zeros_like(got)
  for bi in range(b):
    for k, (dy, dx) in enumerate(geometry.forward_offsets(radius)):
      for y in range(h):
        for x in range(w):
          y2, x2 = y + dy, x + dx
          if not (0 <= y2 < h and 0 <= x2 < w and valid[bi, y, x] and valid[bi, y2, x2]):
            continue
          want[bi, y, x, k] = 1 - max(boundary[bi, y + py, x + px]
                                      for py, px in _cells_on_path(dy, dx))
  np.testing.assert_array_equal(got, want)


def _inputs(h, w, classes, seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  boundary = np.clip(np.abs(np.sin(yy / 2.5 + xx / 4.0)) ** 6 + 0.05 * rng.random((h, w)), 0, 1)
  cams = np.stack([np.exp(-((yy - rng.random() * h) ** 2 + (xx - rng.random() * w) ** 2)
                          / (0.1 * h * w)) for _ in range(classes)], -1)
  return boundary.astype(np.float32), cams.astype(np.float32)


def test_boundary_walk_matches_the_dense_walk():
  boundary, cams = _inputs(13, 17, 3, seed=1)
  walked = np.asarray(random_walk.boundary_walk(boundary[None], cams[None], beta=10.0,
                                                t=256))[0]
  forward = np.asarray(geometry.boundary_affinities(jnp.asarray(boundary[None])))[0]
  damped = cams * (1 - boundary)[..., None]
  dense = reference_walk.dense_reference(forward, damped, beta=10.0, t=256)
  np.testing.assert_allclose(walked, dense, rtol=0, atol=1e-4 * np.abs(dense).max())
  np.testing.assert_array_equal(np.argmax(walked, -1), np.argmax(dense, -1))


def test_boundary_walk_on_a_canvas_equals_the_image_alone():
  boundary, cams = _inputs(10, 12, 2, seed=2)
  alone = np.asarray(random_walk.boundary_walk(boundary[None], cams[None], t=64))[0]
  canvas_b = np.full((1, 14, 16), 0.3, np.float32)
  canvas_c = np.full((1, 14, 16, 2), 0.7, np.float32)
  canvas_b[0, :10, :12], canvas_c[0, :10, :12] = boundary, cams
  valid = np.zeros((1, 14, 16), bool)
  valid[0, :10, :12] = True
  on_canvas = np.asarray(random_walk.boundary_walk(canvas_b, canvas_c, t=64, valid=valid))[0]
  np.testing.assert_allclose(on_canvas[:10, :12], alone, rtol=1e-5, atol=1e-7)
  assert np.all(on_canvas[~valid[0]] == 0)


def test_boundary_walk_labels_by_hand():
  walked = np.zeros((2, 2, 2), np.float32)
  walked[0, 0, 0] = 4.0   # class channel 0 strong at the top left
  walked[1, 1, 1] = 2.0   # channel 1 at half the maximum at the bottom right
  labels = random_walk.boundary_walk_labels(walked, (7, 6), stride=4)
  assert labels.shape == (7, 6) and labels.dtype == np.int32
  assert labels[0, 0] == 1 and labels[6, 5] == 2
  # Where both classes fall under 0.25 of the maximum: background (the bottom-left cell is 0;
  # at (0, 5) channel 0 keeps an eighth of its 4).
  assert labels[6, 0] == 0 and labels[0, 5] == 0
  assert np.all(random_walk.boundary_walk_labels(np.zeros((2, 2, 1)), (5, 5)) == 0)


def test_boundary_walk_scores_are_what_the_labels_take():
  walked = np.zeros((2, 2, 2), np.float32)
  walked[0, 0, 0], walked[1, 1, 1] = 4.0, 2.0
  scores = random_walk.boundary_walk_scores(walked, (7, 6), threshold=0.3, stride=4)
  assert scores.shape == (7, 6, 3) and scores.dtype == np.float32
  assert np.all(scores[..., 0] == np.float32(0.3))            # the constant background first
  assert scores[0, 0, 1] == 1.0 and scores[..., 1:].max() == 1.0  # divided by the maximum
  # The bottom-right corner of an 8x8 image lies past the last cell's centre: channel 1's 2 / 4.
  np.testing.assert_allclose(
      random_walk.boundary_walk_scores(walked, (8, 8), threshold=0.3)[7, 7], [0.3, 0, 0.5])
  # Nothing walked: the classes stay 0, the background is the constant.
  empty = random_walk.boundary_walk_scores(np.zeros((2, 2, 1)), (5, 5))
  assert np.all(empty[..., 0] == 0.25) and np.all(empty[..., 1] == 0)


@pytest.mark.parametrize("size,scale", [((37, 50), 2.0), ((24, 24), 2.0), ((41, 30), 1.5)])
def test_grids_at_an_image_scale_keep_the_geometry(size, scale):
  """With aff.image_scale the walk runs on the stride-4 grid of the image resized by it. A map
  linear in position (each cell holding its centre's row in the image's own pixels) must stay
  that map through `strided_at_scale` (image grid -> resized image's grid) and
  `boundary_walk_scores(scaled=)` (resized image's grid -> image pixels), away from the clamped
  edges; at scale 1 both are what they were without a scale."""
  height, width = size
  scaled = (round(height * scale), round(width * scale))
  grid = (-(-height // 4), -(-width // 4))
  rows = np.broadcast_to((4 * np.arange(grid[0], dtype=np.float32) + 2)[:, None, None],
                         grid + (1,))
  cols = np.broadcast_to((4 * np.arange(grid[1], dtype=np.float32) + 2)[None, :, None],
                         grid + (1,))
  strided = np.concatenate([rows, cols], -1)
  on_scaled = random_walk.strided_at_scale(strided, size, scaled)
  assert on_scaled.shape == (-(-scaled[0] // 4), -(-scaled[1] // 4), 2)
  # Cell j of the resized image's grid has its centre at (4 j + 2) / scale in the image.
  for axis in (0, 1):
    centres = (4 * np.arange(on_scaled.shape[axis]) + 2) * (size[axis] / scaled[axis])
    inside = (centres >= 2) & (centres <= 4 * grid[axis] - 2)
    got = np.moveaxis(on_scaled[..., axis], axis, 0)[inside]
    np.testing.assert_allclose(got, np.broadcast_to(centres[inside][:, None], got.shape),
                               rtol=1e-5)
  np.testing.assert_array_equal(random_walk.strided_at_scale(strided, size, size), strided)
  # Back to the image: pixel y's centre y + 0.5, divided by the maximum over the image.
  walked = np.concatenate([
      np.broadcast_to((4 * np.arange(on_scaled.shape[0], dtype=np.float32)[:, None, None] + 2)
                      * (size[0] / scaled[0]), on_scaled.shape[:2] + (1,)),
      np.ones(on_scaled.shape[:2] + (1,), np.float32)], -1)
  scores = random_walk.boundary_walk_scores(walked, size, threshold=0.0, scaled=scaled)
  assert scores.shape == (height, width, 3)
  ys = np.arange(height) + 0.5
  inside = (ys * scaled[0] / height >= 2) & (ys * scaled[0] / height <= 4 * len(walked) - 2)
  assert inside.sum() > height // 2
  ratio = scores[inside, 0, 1] / ys[inside]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)  # proportional to y + 0.5
  # The same grid without a scale is IRN's upsampling by 4, bit for bit.
  np.testing.assert_array_equal(
      random_walk.boundary_walk_scores(strided, size, scaled=size),
      random_walk.boundary_walk_scores(strided, size))


def test_boundary_walk_bad_inputs():
  with pytest.raises(ValueError, match="boundary must be"):
    geometry.boundary_affinities(jnp.zeros((4, 4)))
  with pytest.raises(ValueError, match=r"boundary must lie in \[0, 1\] \(got -2 .. 3\)"):
    random_walk.boundary_walk(np.array([[[-2.0, 3.0]]]), np.zeros((1, 1, 2, 1)))
  with pytest.raises(ValueError, match="on the boundary map's grid"):
    random_walk.boundary_walk(np.zeros((1, 4, 4)), np.zeros((1, 4, 5, 2)))
  with pytest.raises(ValueError, match="does not fit"):
    random_walk.boundary_walk_labels(np.zeros((2, 2, 1)), (9, 4))


def _compare_irn(sizes: str, needs: tuple[str, ...]) -> dict:
  """experiments/compare_irn.py's JSON against IRN_ROOT at stride-4 grids `sizes` (skips
  without IRN_ROOT or a module of `needs`)."""
  irn_root = os.environ.get("IRN_ROOT")
  if not irn_root:
    pytest.skip("set IRN_ROOT to a checkout of github.com/jiwoon-ahn/irn to compare with it")
  for module in needs:
    pytest.importorskip(module, reason=f"the comparison with IRN needs {module}")
  res = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "compare_irn.py"), "--irn-root",
       irn_root, "--sizes", sizes], capture_output=True, text=True, timeout=600,
      cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert res.returncode == 0, res.stderr[-3000:]
  return json.loads(res.stdout.strip().splitlines()[-1])


def test_walk_equals_irns_own():
  results = _compare_irn("11x14,19x26", ("torch",))
  assert results["paths_equal_r5"] and results["paths_equal_r10"]
  assert results["transition_max_abs"] <= 1e-6
  assert results["walk_max_rel"] <= 1e-4
  assert results["labels_equal_pct"] >= 99.9


def test_instances_equal_irns_own():
  """IRN's instance step (step/make_ins_seg_labels.py) against ours, by compare_irn.py; it
  imports scikit-image, imageio and pydensecrf."""
  results = _compare_irn("11x14,19x26,24x24", ("torch", "skimage", "imageio", "pydensecrf"))
  assert results["instances_equal"]  # centroids, groups and the instances' classes
  assert results["instance_scores_max_abs"] <= 1e-4
  assert results["instance_pixels_equal_pct"] >= 99.9
  assert max(r["groups"] for r in results["instances"]) >= 2


def test_compare_irn_names_a_folder_that_is_not_irn(tmp_path):
  (tmp_path / "misc").mkdir()
  (tmp_path / "misc" / "indexing.py").write_text("")
  res = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "compare_irn.py"), "--irn-root",
       str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
  assert res.returncode == 2
  assert f"--irn-root '{tmp_path}' is not a checkout of jiwoon-ahn/irn: missing" in res.stderr
  assert "net/resnet50.py" in res.stderr and "misc/indexing.py" not in res.stderr


def test_the_stages_walk_of_a_canvas_batch_equals_each_image_alone():
  """random_walk.make_boundary_walk_fn / boundary_walk_batch (the random_walk stage's, method
  irn) on images narrower and shorter than the canvas: each image's scores equal IRN's procedure
  for it alone: the relation network on [image, its flip] padded to the canvas, logits cropped
  to the image's stride-4 grid, the flip's flipped back, sigmoid of their mean, the walk on the
  image's own grid."""
  import jax
  from affinity_jax import config, models
  cfg = config.load_config("synthetic_irn:tiny")
  model = models.build("relation", width=1 / 16, backbone="resnet50")
  variables = models.init_variables(model, jax.random.key(0), (1, 64, 64, 3))
  rng = np.random.default_rng(0)
  sizes = np.array([[50, 37], [61, 64], [23, 30]])
  images = np.zeros((3, 64, 64, 3), np.float32)
  cams = {}
  for i, (h, w) in enumerate(sizes):
    images[i, :h, :w] = rng.normal(size=(h, w, 3))
    cams[i] = rng.random((-(-h // 4), -(-w // 4), 1 + i % 2)).astype(np.float32)
  walk = random_walk.make_boundary_walk_fn(model, cfg)
  got, boundaries, displacements = random_walk.boundary_walk_batch(walk, variables, images,
                                                                   cams, sizes)
  assert boundaries.shape == (3, 16, 16) and displacements.shape == (3, 16, 16, 2)
  forward = jax.jit(model.apply)
  for i, (h, w) in enumerate(sizes):
    pair = np.zeros((2, 64, 64, 3), np.float32)
    pair[0, :h, :w], pair[1, :h, :w] = images[i, :h, :w], images[i, :h, :w, :][:, ::-1]
    edges = np.asarray(forward(variables, pair)[0])[:, :-(-h // 4), :-(-w // 4)]
    boundary = 1 / (1 + np.exp(-(edges[0] / 2 + edges[1][:, ::-1] / 2)))
    # The maps handed on to the instances: the boundary map, and the image's own displacement.
    np.testing.assert_allclose(boundaries[i, :-(-h // 4), :-(-w // 4)], boundary, rtol=1e-5,
                               atol=1e-6)
    displacement = np.asarray(forward(variables, pair)[1])[0, :-(-h // 4), :-(-w // 4)]
    np.testing.assert_allclose(displacements[i, :-(-h // 4), :-(-w // 4)], displacement,
                               rtol=1e-5, atol=1e-6)
    want = random_walk.boundary_walk(boundary[None], cams[i][None], radius=int(cfg.random_walk.radius),
                            beta=float(cfg.random_walk.beta), t=2 ** int(cfg.random_walk.logt))
    assert got[i].shape == cams[i].shape
    np.testing.assert_allclose(got[i], np.asarray(want)[0], rtol=1e-4, atol=1e-6)


def test_non_finite_walked_scores_are_an_error_not_background():
  walked = np.ones((4, 5, 2), np.float32)
  walked[1, 2, 0] = np.nan
  with pytest.raises(ValueError, match="walked scores must be finite"):
    random_walk.boundary_walk_labels(walked, (16, 20))
