"""IRN's instance masks (affinity_jax/instances.py, random_walk.boundary_walk_instances) on
fields and scores made by hand; against IRN's own step in tests/test_boundary_walk.py (IRN_ROOT).
"""

import jax
import numpy as np
import pytest

from affinity_jax import artifacts, instances, random_walk
from affinity_jax.errors import UserError
from tests import reference_instances


def _towards(h, w, centres, radius):
  """[h, w, 2]: inside each disc of `radius` around a centre, the step to it; 0 elsewhere."""
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  d = np.zeros((h, w, 2), np.float32)
  for cy, cx in centres:
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    d[inside, 0] = (cy - yy)[inside]
    d[inside, 1] = (cx - xx)[inside]
  return d


def test_no_displacement_leaves_each_cell_its_own_centroid_in_one_group():
  d = np.zeros((5, 7, 2), np.float32)
  centre = instances.centroids(d)
  assert np.array_equal(centre[..., 0], np.repeat(np.arange(5)[:, None], 7, 1))
  assert np.array_equal(centre[..., 1], np.repeat(np.arange(7)[None], 5, 0))
  assert np.array_equal(instances.clusters(centre, d), np.zeros((5, 7), np.int32))


def test_cells_pointing_at_two_centres_form_two_groups_apart_from_the_rest():
  h, w = 20, 30
  d = _towards(h, w, [(6, 7), (13, 22)], radius=5)
  centre = instances.centroids(d)
  yy, xx = np.mgrid[:h, :w]
  disc_a = (yy - 6) ** 2 + (xx - 7) ** 2 <= 25
  disc_b = (yy - 13) ** 2 + (xx - 22) ** 2 <= 25
  assert np.all(centre[disc_a] == [6, 7]) and np.all(centre[disc_b] == [13, 22])
  group = instances.clusters(centre, d)
  # Regions near a centre in raster order: the background (it holds (0, 0)), disc a, disc b.
  assert np.all(group[disc_a] == 1) and np.all(group[disc_b] == 2)
  assert np.all(group[~disc_a & ~disc_b] == 0)


def test_a_displacement_at_the_threshold_is_measured_as_irn_measures_it():
  # float32 sqrt(dx^2 + dy^2) is 2.5000002 here (IRN: not near a centre); np.hypot gives
  # 2.4999998.
  d = np.array([[[0.0, 0.0], [2.499426, 0.05356726], [0.0, 0.0]]], np.float32)
  assert np.sqrt(d[0, 1, 1] ** 2 + d[0, 1, 0] ** 2) >= np.float32(2.5)
  centre = np.array([[[0, 0], [0, 0], [0, 2]]], np.int32)
  assert instances.clusters(centre, d).tolist() == [[0, 0, 1]]


def test_a_cell_whose_centroid_stops_far_from_a_centre_is_group_zero():
  # A uniform pull to the right: every centroid ends at the right edge, where the field is
  # strong; the near-centre cells (none) form no region.
  d = np.zeros((4, 6, 2), np.float32)
  d[..., 1] = 3.0
  centre = instances.centroids(d)
  assert np.all(centre[..., 1] == 5)
  assert np.array_equal(instances.clusters(centre, d), np.zeros((4, 6), np.int32))
  # Half the field weak: cells landing in it take its region, the others group 0.
  d[:, :3, 1] = 0.0
  group = instances.clusters(instances.centroids(d), d)
  assert np.all(group[:, :3] == 1) and np.all(group[:, 3:] == 0)


def test_centroid_sampling_is_bilinear_between_cells():
  d = np.zeros((1, 4, 2), np.float32)
  d[0, :, 1] = [0.5, 0.0, 1.0, 0.0]  # from 0: to 0.5, where the pull is 0.25; then 0.75 ...
  centre = instances.centroids(d, iterations=1)
  assert centre[0, 0, 1] == 0  # 0.5 rounds to the even 0, as NumPy (and IRN) round
  x = 0.0
  for _ in range(3):
    lo = int(np.floor(x))
    f = x - lo
    x = x + (1 - f) * d[0, lo, 1] + f * d[0, min(lo + 1, 3), 1]
  assert instances.centroids(d, iterations=3)[0, 0, 1] == int(np.round(x))


@pytest.mark.parametrize("pull", [0.9, 2.7])
def test_centroids_equal_irns_refinement_to_the_bit(pull):
  """Against a literal transcription of IRN's loop (tests/reference_instances.py), on fields
  that lead to 4 centres and on fields that overshoot them (the steps oscillate: any other
  rounding than IRN's float64 steps on float32 positions would end elsewhere)."""
  rng = np.random.default_rng(3)
  h, w = 31, 43
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  centres = rng.random((4, 2)) * [h - 1, w - 1]
  near = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2,
                   -1)
  d = (pull * (centres[near] - np.stack([yy, xx], -1))
       + rng.normal(0, 0.3, (h, w, 2))).astype(np.float32)
  want = reference_instances.centroids(d)
  assert np.array_equal(instances.centroids(d), want)
  # The test can tell: steps rounded to float32 before they are added end elsewhere when the
  # field overshoots.
  y = np.repeat(np.arange(h, dtype=np.float32)[:, None], w, 1)
  x = np.repeat(np.arange(w, dtype=np.float32)[None], h, 0)
  for _ in range(300):
    fy = (y - np.floor(y)).astype(np.float32)[..., None]
    fx = (x - np.floor(x)).astype(np.float32)[..., None]
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    jy, jx = np.ceil(y).astype(int), np.ceil(x).astype(int)
    step = (d[jy, jx] * fy * fx + d[iy, jx] * (1 - fy) * fx + d[jy, ix] * fy * (1 - fx)
            + d[iy, ix] * (1 - fy) * (1 - fx))
    y, x = np.clip(y + step[..., 0], 0, h - 1), np.clip(x + step[..., 1], 0, w - 1)
  rounded = np.stack([np.round(y), np.round(x)], -1).astype(np.int32)
  assert np.array_equal(rounded, want) == (pull < 2)


def test_instance_cams_put_class_c_of_group_k_in_channel_c_times_k_plus_k():
  cams = np.stack([np.full((2, 3), 1.0), np.full((2, 3), 2.0)], -1).astype(np.float32)
  group = np.array([[0, 1, 2], [2, 1, 0]])
  stack = instances.instance_cams(cams, group)
  assert stack.shape == (2, 3, 6)
  for c in range(2):
    for k in range(3):
      assert np.array_equal(stack[..., c * 3 + k], np.where(group == k, c + 1.0, 0.0))


def test_detect_cuts_each_channel_into_regions_and_scores_them():
  h, w = 20, 20
  scores = np.zeros((h, w, 1 + 4), np.float32)  # 2 classes x 2 groups
  scores[..., 0] = 0.25
  scores[2:6, 2:6, 1] = 0.9     # class 7, group 0: two regions of channel 0
  scores[10:14, 2:6, 1] = 0.6
  scores[3, 3, 1] = 1.0
  scores[2:8, 12:18, 4] = 0.8   # class 9, group 1
  scores[19, 19, 3] = 0.5       # class 9, group 0: one pixel, under 1 % of the image
  found = instances.detect(scores, [7, 9], 2)
  assert found.class_ids.tolist() == [7, 7, 9, 9]
  np.testing.assert_allclose(found.scores, [1.0, 0.6, 0.0, 0.8])
  masks = found.masks()
  assert masks.shape == (4, h, w)
  assert masks[0].sum() == 16 and masks[0][2:6, 2:6].all()
  assert masks[1][10:14, 2:6].all() and masks[2][19, 19] and masks[3][2:8, 12:18].all()
  assert (masks.sum(0) <= 1).all() and (masks.sum(0) == (found.instance_map > 0)).all()
  # Diagonal neighbours are apart (4-neighbours, IRN's connectivity 1).
  diag = np.zeros((4, 4, 2), np.float32)
  diag[..., 0] = 0.5
  diag[0, 0, 1] = diag[1, 1, 1] = 1.0
  assert len(instances.detect(diag, [0], 1, min_fragment=0).class_ids) == 2


def test_ground_truth_instances_are_each_classes_regions():
  mask = np.zeros((10, 12), np.uint8)
  mask[1:4, 1:4] = 3
  mask[6:9, 6:10] = 3
  mask[1:3, 8:11] = 1
  mask[0, :] = 255
  masks, ids = instances.ground_truth_instances(mask)
  assert ids.tolist() == [0, 2, 2]
  assert [m.sum() for m in masks] == [6, 9, 12]
  empty, none = instances.ground_truth_instances(np.zeros((3, 3), np.uint8))
  assert empty.shape == (0, 3, 3) and none.shape == (0,)


def test_voc_objects_take_the_class_their_pixels_hold(tmp_path):
  """instances.objects_ground_truth on a SegmentationObject written as VOC writes it
  (voc_files.read_object_png): objects of one class apart, the boundary ignored, an object
  with no class pixel left out."""
  from tests import _voc_tree
  mask = np.zeros((12, 16), np.uint8)
  mask[1:5, 1:6] = 15
  mask[1:5, 8:14] = 15
  mask[7:11, 2:9] = 3
  mask[0, :] = 255
  objects = np.where(mask == 255, 255, 0).astype(np.uint8)
  objects[1:5, 1:6], objects[1:5, 8:14], objects[7:11, 2:9] = 1, 2, 3
  objects[11, 15] = 4  # on background: no class
  path = str(tmp_path / "2007_000001.png")
  _voc_tree.save_palette_png(path, objects, _voc_tree.voc_palette())
  from affinity_jax.data import voc_files
  masks, ids = instances.objects_ground_truth(voc_files.read_object_png(path), mask)
  assert ids.tolist() == [14, 14, 2]
  assert [int(m.sum()) for m in masks] == [20, 24, 28]
  with open(tmp_path / "bad.png", "wb") as f:
    f.write(b"not a png")
  with pytest.raises(UserError, match="bad.png cannot be decoded as a PNG"):
    voc_files.read_object_png(str(tmp_path / "bad.png"))


def _instances(shape, regions, classes, scores):
  m = np.zeros(shape, np.int32)
  for i, (ys, xs) in enumerate(regions):
    m[ys, xs] = i + 1
  return instances.Instances(m, np.asarray(classes, np.int32), np.asarray(scores, np.float32))


def test_average_precision_by_hand():
  shape = (10, 20)
  gt_masks = np.zeros((2, *shape), bool)
  gt_masks[0, 0:4, 0:4] = True
  gt_masks[1, 5:9, 10:14] = True
  gt = (gt_masks, np.array([1, 1]))
  # Class 1: 0.9 hits object 0; 0.8 is in an image without objects (false); 0.7 hits object 1
  # with IoU 12 / 16 = 0.75; class 0 has no object: NaN, whatever is predicted; class 2 an object
  # and no prediction: 0.
  pred = _instances(shape, [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)),
                            (slice(5, 8), slice(10, 14)), (slice(0, 2), slice(16, 20))],
                    [1, 1, 1, 0], [0.9, 0.3, 0.7, 0.5])
  dup = _instances(shape, [(slice(0, 4), slice(0, 3))], [1], [0.8])  # its image has no object
  gt2 = np.zeros((1, *shape), bool)
  gt2[0, 0:2, 0:2] = True
  ap = instances.average_precision([pred, dup, _instances(shape, [], [], [])],
                                   [gt, (np.zeros((0, *shape), bool), np.zeros(0)),
                                    (gt2, np.array([2]))], 3)
  # Class 1 by score: 0.9 TP, 0.8 FP (image 2 has no object), 0.7 TP, 0.3 FP (IoU 0 with the
  # objects): precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1 -> 1/2 * 1 + 1/2 * 2/3.
  assert np.isnan(ap[0])
  assert ap[1] == pytest.approx(0.5 + 0.5 * 2 / 3)
  assert ap[2] == 0.0
  # Two predictions of one object in one image, each overlapping it by IoU 0.5 exactly
  # (instances never overlap): the first by score takes it, the second is a false positive.
  obj = np.zeros((1, 2, 2), bool)
  obj[0] = True
  halves = _instances((2, 2), [(slice(0, 1), slice(0, 2)), (slice(1, 2), slice(0, 2))], [0, 0],
                      [0.9, 0.8])
  ap = instances.average_precision([halves], [(obj, np.array([0]))], 1)
  assert ap[0] == pytest.approx(1.0)  # precision 1 at recall 1, before the false positive
  # With a second image between them by score: 0.9 TP, 0.85 FP (the object is taken), 0.8 TP
  # (image 2): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 1/2 + 1/2 * 2/3. Counting the
  # taken object again would give recall 1 at precision 1 (AP 1).
  dup = _instances((2, 2), [(slice(0, 1), slice(0, 2)), (slice(1, 2), slice(0, 2))], [0, 0],
                   [0.9, 0.85])
  whole = _instances((2, 2), [(slice(0, 2), slice(0, 2))], [0], [0.8])
  ap = instances.average_precision([dup, whole], [(obj, np.array([0]))] * 2, 1)
  assert ap[0] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_instances_round_trip_and_a_wrong_file_is_named(tmp_path):
  path = str(tmp_path / "a.npz")
  m = np.zeros((6, 5), np.int32)
  m[1:3, 1:3] = 1
  m[4, :] = 2
  artifacts.save_instances(path, m, np.array([3, 0]), np.array([0.5, 1.0]))
  got = artifacts.load_instances(path, (6, 5), 4)
  assert np.array_equal(got[0], m) and got[1].tolist() == [3, 0]
  np.testing.assert_allclose(got[2], [0.5, 1.0])
  with pytest.raises(UserError, match=r"a\.npz: an instance map .* does not fit the 6x6 image"):
    artifacts.load_instances(path, (6, 6), 4)
  with pytest.raises(UserError, match="classes \\[3, 0\\] does not fit"):
    artifacts.load_instances(path, (6, 5), 3)
  np.savez(str(tmp_path / "b.npz"), cam=np.zeros(3))
  with pytest.raises(UserError, match="b.npz: not an instance file"):
    artifacts.load_instances(str(tmp_path / "b.npz"), (6, 5), 4)


def test_bad_fields_are_refused():
  with pytest.raises(ValueError, match=r"displacement must be \[h, w, 2\]"):
    instances.centroids(np.zeros((4, 4)))
  with pytest.raises(ValueError, match="must be finite"):
    instances.centroids(np.full((2, 2, 2), np.nan))
  with pytest.raises(ValueError, match="scores must be"):
    instances.detect(np.zeros((4, 4, 3)), [1], 1)


def test_two_objects_of_one_class_walk_into_two_instances():
  """The whole step (random_walk.boundary_walk_instances): two discs of one class, each with
  its displacement towards its centre and a boundary ring around it, one CAM over both; on a
  canvas grid larger than the image."""
  h, w = 16, 24
  centres = [(5, 6), (10, 17)]
  d = _towards(h, w, centres, radius=3.5)
  yy, xx = np.mgrid[:h, :w]
  boundary = np.zeros((h + 3, w + 5), np.float32)  # the canvas grid
  discs = []
  for cy, cx in centres:
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    discs.append(r2 <= 12)
    boundary[:h, :w][(r2 > 12) & (r2 <= 25)] = 1.0
  cam = np.zeros((h, w, 1), np.float32)
  cam[discs[0] | discs[1], 0] = 1.0
  canvas_d = np.zeros(boundary.shape + (2,), np.float32)
  canvas_d[:h, :w] = d

  @jax.jit
  def scores(edge, stack, valid):
    return random_walk.boundary_walk(edge, stack, valid=valid, beta=10.0, t=256)

  walk = random_walk.BoundaryWalk(maps=None, scores=scores)
  found = random_walk.boundary_walk_instances(walk, boundary, canvas_d, cam, np.array([4]),
                                              (4 * h - 1, 4 * w - 2), threshold=0.25)
  assert found.class_ids.tolist() == [4, 4]
  assert found.instance_map.shape == (4 * h - 1, 4 * w - 2)
  for i, disc in enumerate(discs):
    truth = np.kron(disc, np.ones((4, 4), bool))[:4 * h - 1, :4 * w - 2]
    got = found.instance_map == i + 1
    assert (got & truth).sum() / (got | truth).sum() > 0.7
  assert np.all(found.scores > 0.5)
