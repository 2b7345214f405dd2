"""IRN's relation labels: the label dCRF, confident regions, the stride-4 label, pair labels.

Oracles: pydensecrf called here with IRN's settings, PIL's resize called here, pairs enumerated
by loops here. With IRN_ROOT (a checkout of github.com/jiwoon-ahn/irn): its misc/imutils.py
(crf_inference_label, pil_rescale) with the lines of step/cam_to_ir_label.py written out here,
and, with torch, its GetAffinityLabelFromIndices (voc12/dataloader.py) on PathIndex's indices.
"""

import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest

from affinity_jax import crf, geometry
from affinity_jax import relation_labels as rl


def _disc_scene(h=24, w=32, centre=(12, 16)):
  """A red disc (radius 6) in a yellow ring (to radius 9.5) on green, and a Gaussian CAM that
  crosses 0.30 at the disc's edge and 0.05 at the ring's. Returns (image, cam [H, W] float32)."""
  yy, xx = np.mgrid[:h, :w]
  d = np.hypot(yy - centre[0], xx - centre[1])
  image = np.zeros((h, w, 3), np.uint8)
  image[:] = (30, 120, 40)
  image[d < 9.5] = (200, 200, 60)
  image[d < 6] = (200, 40, 40)
  sigma = 6 / np.sqrt(2 * np.log(1 / 0.3))
  return image, np.exp(-d ** 2 / (2 * sigma ** 2)).astype(np.float32)


def _synthetic(h, w, classes, seed):
  """(image [H, W, 3] uint8, cams [H, W, C] float32): blobs of colour and noisy CAM blobs
  around them, each CAM divided by max + 1e-5 as IRN's make_cam.py."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  image = np.zeros((h, w, 3), np.float32) + rng.uniform(30, 90, 3)
  image += 25 * np.sin(xx / 7 + seed)[..., None] * rng.uniform(0, 1, 3)
  cams = []
  for _ in range(classes):
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    s = rng.uniform(0.12, 0.22) * min(h, w)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    cams.append(np.maximum(blob * (1 + 0.3 * rng.standard_normal((h, w))), 0))
    image += (blob > 0.15)[..., None] * rng.uniform(30, 80, 3)
    image += (blob > 0.5)[..., None] * rng.uniform(40, 100, 3)
  image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
  cams = np.stack(cams, -1).astype(np.float32)
  cams /= cams.max((0, 1), keepdims=True) + 1e-5
  return image, cams


def _pydensecrf_labels(image, labels, n, t=10, gt_prob=0.7):
  """The label dCRF of docs/method.md §11 straight from pydensecrf (its unary_from_labels and
  both kernels with the documented settings), the marginals' argmax."""
  densecrf = pytest.importorskip("pydensecrf.densecrf")
  utils = pytest.importorskip("pydensecrf.utils")
  height, width = labels.shape
  model = densecrf.DenseCRF2D(width, height, n)
  model.setUnaryEnergy(utils.unary_from_labels(labels, n, gt_prob, zero_unsure=False))
  model.addPairwiseGaussian(compat=3, sxy=3)
  model.addPairwiseBilateral(compat=10, sxy=50, srgb=5, rgbim=np.ascontiguousarray(image))
  marginals = np.asarray(model.inference(t)).reshape(n, height, width)
  return marginals.argmax(0)


# ---------------------------------------------------------------------------------------------
# crf.crf_label_inference


@pytest.mark.parametrize("n,t,gt_prob", [(2, 10, 0.7), (4, 10, 0.7), (3, 5, 0.6)])
def test_label_crf_equals_pydensecrf(n, t, gt_prob):
  rng = np.random.default_rng(n)
  image, _ = _synthetic(24, 32, 2, seed=n)
  labels = rng.integers(0, n, (24, 32))
  labels[4:14, 6:20] = n - 1  # a block, so that the CRF has something to keep
  expected = _pydensecrf_labels(image, labels, n, t=t, gt_prob=gt_prob)
  got = crf.crf_label_inference(image, labels, n, t=t, gt_prob=gt_prob)
  assert got.shape == (24, 32) and got.dtype == np.int64
  np.testing.assert_array_equal(got, expected)
  assert 0 < np.mean(got != labels) < 0.9  # it did change the noisy labels


def test_label_crf_snaps_to_the_colour_edge():
  image = np.zeros((24, 32, 3), np.uint8)
  image[:, :20] = (200, 30, 30)
  image[:, 20:] = (20, 40, 220)
  labels = np.zeros((24, 32), np.int64)
  labels[:, 16:] = 1  # four columns of the red region wrongly labelled 1
  out = crf.crf_label_inference(image, labels, 2)
  assert np.all(out[:, :20] == 0) and np.all(out[:, 20:] == 1)
  np.testing.assert_array_equal(crf.crf_label_inference(np.asfortranarray(image), labels, 2),
                                out)


def test_label_crf_one_label_is_zero_everywhere():
  image, _ = _disc_scene()
  out = crf.crf_label_inference(image, np.zeros((24, 32), np.int64), 1)
  assert out.shape == (24, 32) and not out.any()


def test_label_crf_bad_inputs_raise():
  image, _ = _disc_scene()
  labels = np.zeros((24, 32), np.int64)
  with pytest.raises(ValueError, match="image must be uint8"):
    crf.crf_label_inference(image.astype(np.float32), labels, 2)
  with pytest.raises(ValueError, match=r"image must be \[H, W, 3\]"):
    crf.crf_label_inference(image[..., :2], labels, 2)
  with pytest.raises(ValueError, match="image is empty"):
    crf.crf_label_inference(image[:0], labels[:0], 2)
  with pytest.raises(ValueError, match="does not match the 24x32 image"):
    crf.crf_label_inference(image, labels.T, 2)
  with pytest.raises(ValueError, match="labels must be integers"):
    crf.crf_label_inference(image, labels.astype(np.float32), 2)
  labels[:, 30:] = 2
  with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1 for num_labels=2 \(got 0\.\.2"):
    crf.crf_label_inference(image, labels, 2)
  labels[:, 30:] = 0
  with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
    crf.crf_label_inference(image, labels - 1, 2)
  with pytest.raises(ValueError, match="num_labels must be an integer >= 1"):
    crf.crf_label_inference(image, labels, 0)
  with pytest.raises(ValueError, match="gt_prob must lie in"):
    crf.crf_label_inference(image, labels, 2, gt_prob=1.0)
  with pytest.raises(ValueError, match="t must be a non-negative integer"):
    crf.crf_label_inference(image, labels, 2, t=-1)


# ---------------------------------------------------------------------------------------------
# relation_labels


def test_confident_regions_by_hand():
  image, cam = _disc_scene()
  label = rl.relation_labels(image, cam[..., None])
  assert label.shape == (24, 32) and label.dtype == np.uint8
  assert set(np.unique(label)) == {0, 1, 255}
  assert label[12, 16] == 1          # the disc: CAM > 0.30, confident foreground
  assert label[12, 16 + 8] == 255    # the ring: 0.05 < CAM <= 0.30, unsure
  assert label[12, 16 - 8] == 255
  assert label[0, 0] == 0 and label[23, 31] == 0  # far away: confident background
  d = np.hypot(*(np.mgrid[:24, :32] - np.array([12, 16])[:, None, None]))
  assert np.all(label[d < 5] == 1) and np.all(label[(d > 7) & (d < 9)] == 255)
  assert np.all(label[d > 10.5] == 0)


def test_thresholds():
  image, cam = _disc_scene()
  cams = cam[..., None]
  # Nothing passes fg_threshold: no foreground; the disc and ring (above 0.05) are unsure.
  label = rl.relation_labels(image, cams, fg_threshold=1.5)
  assert set(np.unique(label)) == {0, 255} and label[12, 16] == 255 and label[0, 0] == 0
  # Equal thresholds: both maps agree, so nothing is unsure.
  label = rl.relation_labels(image, cams, fg_threshold=0.3, bg_threshold=0.3)
  assert set(np.unique(label)) == {0, 1}
  # bg_threshold 0: every positive CAM score keeps a pixel out of the background.
  label = rl.relation_labels(image, cams, bg_threshold=0.0)
  assert np.mean(label == 0) < np.mean(rl.relation_labels(image, cams) == 0)


def test_classes_give_voc_ids():
  image_a, cam_a = _disc_scene(24, 48, centre=(12, 12))
  image_b, cam_b = _disc_scene(24, 48, centre=(12, 36))
  image = np.where(np.arange(48)[None, :, None] < 24, image_a, image_b)
  cams = np.stack([cam_a, cam_b], -1)
  channels = rl.relation_labels(image, cams)
  assert set(np.unique(channels)) == {0, 1, 2, 255}
  voc = rl.relation_labels(image, cams, classes=[4, 14])  # boat, person
  lut = np.arange(256)
  lut[[1, 2]] = [5, 15]
  np.testing.assert_array_equal(voc, lut[channels])


def test_no_class_is_background():
  image, _ = _disc_scene()
  label = rl.relation_labels(image, np.zeros((24, 32, 0), np.float32))
  assert label.dtype == np.uint8 and not label.any()
  assert not rl.relation_labels(image, np.zeros((24, 32, 0)), classes=[]).any()


def test_score_equal_to_the_threshold_is_background():
  # IRN pads the CAMs with the threshold in their dtype: float32(0.3) ties with it and argmax
  # picks the background; the same score in float64 (0.3000000119 > 0.3) is foreground.
  image, _ = _disc_scene()
  cams = np.full((24, 32, 1), 0.3, np.float32)
  assert np.all(rl.relation_labels(image, cams) == 255)
  assert np.all(rl.relation_labels(image, cams.astype(np.float64)) == 1)
  assert np.all(rl.relation_labels(image, np.full((24, 32, 1), 0.3)) == 255)


def test_relation_labels_bad_inputs_raise():
  image, cam = _disc_scene()
  cams = cam[..., None]
  with pytest.raises(ValueError, match="image must be uint8"):
    rl.relation_labels(image.astype(np.int32), cams)
  with pytest.raises(ValueError, match=r"image must be \[H, W, 3\]"):
    rl.relation_labels(image[..., 0], cams)
  with pytest.raises(ValueError, match=r"cams must be \[H, W, C\] on the 24x32 image"):
    rl.relation_labels(image, cam)
  with pytest.raises(ValueError, match=r"cams must be \[H, W, C\] on the 24x32 image"):
    rl.relation_labels(image, np.moveaxis(cams, -1, 0))
  with pytest.raises(ValueError, match="cams must be floating point"):
    rl.relation_labels(image, (cams > 0.3).astype(np.int64))
  with pytest.raises(ValueError, match="cams must be finite"):
    rl.relation_labels(image, np.where(cams > 0.9, np.nan, cams))
  with pytest.raises(ValueError, match=r"bg_threshold \(0.4\) must not exceed fg_threshold"):
    rl.relation_labels(image, cams, bg_threshold=0.4)
  with pytest.raises(ValueError, match="fg_threshold must be finite"):
    rl.relation_labels(image, cams, fg_threshold=float("nan"))
  with pytest.raises(ValueError, match="classes must be 1 integers, one per CAM channel"):
    rl.relation_labels(image, cams, classes=[3, 4])
  with pytest.raises(ValueError, match="classes must be 1 integers"):
    rl.relation_labels(image, cams, classes=[3.0])
  with pytest.raises(ValueError, match=r"classes must lie in 0\.\.253"):
    rl.relation_labels(image, cams, classes=[254])
  with pytest.raises(ValueError, match="classes must be distinct"):
    rl.relation_labels(image, np.concatenate([cams, cams], -1), classes=[3, 3])


# ---------------------------------------------------------------------------------------------
# relation_pair_labels


def _loop_pair_labels(label, radius, scheme):
  """IRN's definitions pair by pair: confident = label < 21 at both ends."""
  h, w = label.shape
  offsets = geometry.forward_offsets(radius)
  out = {name: np.zeros((h, w, len(offsets)), np.float32) for name in ("bg_pos", "fg_pos", "neg")}
  for y in range(h):
    for x in range(w):
      if scheme == "psa" and not (y <= h - radius and radius - 1 <= x <= w - radius):
        continue
      for k, (dy, dx) in enumerate(offsets):
        y2, x2 = y + dy, x + dx
        if not (0 <= y2 < h and 0 <= x2 < w):
          continue
        a, b = int(label[y, x]), int(label[y2, x2])
        if a >= 21 or b >= 21:
          continue
        if a != b:
          out["neg"][y, x, k] = 1
        elif a == 0:
          out["bg_pos"][y, x, k] = 1
        else:
          out["fg_pos"][y, x, k] = 1
  return out


def _label_with_unsure(h, w, seed):
  rng = np.random.default_rng(seed)
  label = np.zeros((h, w), np.uint8)
  label[2:h - 3, 3:w // 2] = 7
  label[h // 3:, w // 2 + 2:w - 2] = 15
  label[rng.random((h, w)) < 0.15] = 255
  label[:, w // 2:w // 2 + 2] = 255
  return label


@pytest.mark.parametrize("radius", [3, 10])
@pytest.mark.parametrize("scheme", ["psa", "full"])
def test_pair_labels_against_loops(radius, scheme):
  label = _label_with_unsure(24, 30, seed=radius)
  got = rl.relation_pair_labels(label, radius, scheme=scheme)
  expected = _loop_pair_labels(label, radius, scheme)
  assert set(got) == {"bg_pos", "fg_pos", "neg"}
  for name in expected:
    assert got[name].shape == (24, 30, len(geometry.forward_offsets(radius)))
    assert got[name].dtype == np.float32
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert got[name].sum() > 0
  total = sum(got.values())
  assert total.max() == 1  # one label per pair at most


def test_pair_labels_default_is_irns_radius_and_crop():
  label = _label_with_unsure(24, 30, seed=0)
  got = rl.relation_pair_labels(label)
  expected = _loop_pair_labels(label, 10, "psa")
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name])
  assert not got["neg"][15:].any() and not got["neg"][:, :9].any()  # rows > 14, columns < 9


def test_irn_offset_order_by_hand():
  offsets = geometry.forward_offsets(5)
  order = [offsets[k] for k in rl.irn_offset_order(5)]
  assert sorted(order) == sorted(offsets)
  # Paths of 2 cells, then 3, then 4 ((0, 3), (1, -1), (1, 1), (3, 0) in the original's order).
  assert order[:8] == [(0, 1), (1, 0), (0, 2), (2, 0), (0, 3), (1, -1), (1, 1), (3, 0)]
  assert len(rl.irn_offset_order(10)) == len(geometry.forward_offsets(10)) == 152


def test_to_irn_layout():
  radius, h, w = 3, 6, 9
  k = len(geometry.forward_offsets(radius))
  ys, xs, ks = np.meshgrid(np.arange(h), np.arange(w), np.arange(k), indexing="ij")
  per_offset = 10000 * ys + 100 * xs + ks
  out = rl.to_irn_layout(per_offset, radius)
  n = (h - radius + 1) * (w - 2 * radius + 2)
  assert out.shape == (k, n)
  order = rl.irn_offset_order(radius)
  assert out[0, 0] == 10000 * 0 + 100 * 2 + order[0]  # first from position: (0, r - 1)
  assert out[3, n - 1] == 10000 * (h - radius) + 100 * (w - radius) + order[3]
  with pytest.raises(ValueError, match=r"per_offset must be \[h, w, 34\] at radius 5"):
    rl.to_irn_layout(np.zeros((12, 12, 33)), 5)
  with pytest.raises(ValueError, match="needs h >= 5 and w >= 9 at radius 5"):
    rl.to_irn_layout(np.zeros((12, 8, 34)), 5)


def test_pair_labels_bad_inputs_raise():
  label = np.zeros((12, 16), np.uint8)
  with pytest.raises(ValueError, match=r"reduced_label must be \[h, w\]"):
    rl.relation_pair_labels(label[None])
  with pytest.raises(ValueError, match="reduced_label must be integers"):
    rl.relation_pair_labels(label.astype(np.float32))
  with pytest.raises(ValueError, match=r"values must lie in 0\.\.255"):
    rl.relation_pair_labels(label.astype(np.int64) - 1)
  with pytest.raises(ValueError, match="radius must be an integer >= 2"):
    rl.relation_pair_labels(label, 1)
  with pytest.raises(ValueError, match="scheme must be one of"):
    rl.relation_pair_labels(label, scheme="irn")


# ---------------------------------------------------------------------------------------------
# IRN's own code (IRN_ROOT)


def _irn_root():
  root = os.environ.get("IRN_ROOT")
  if not root:
    pytest.skip("set IRN_ROOT to a checkout of github.com/jiwoon-ahn/irn to compare with it")
  if not os.path.isfile(os.path.join(root, "misc", "imutils.py")):
    pytest.fail(f"IRN_ROOT={root!r} is not a checkout of jiwoon-ahn/irn (no misc/imutils.py)")
  return root


@pytest.fixture
def irn_imutils():
  """IRN's misc/imutils.py, loaded from its file (it needs pydensecrf and PIL, not torch)."""
  root = _irn_root()
  pytest.importorskip("pydensecrf.densecrf")
  spec = importlib.util.spec_from_file_location(
      "irn_misc_imutils", os.path.join(root, "misc", "imutils.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def irn_pairs(monkeypatch):
  """IRN's misc/indexing.py and voc12/dataloader.py (torch); the loader reads
  voc12/cls_labels.npy from the working folder and imports imageio, which it needs only to read
  files."""
  root = _irn_root()
  pytest.importorskip("torch", reason="IRN's pair labels need torch")
  pytest.importorskip("pydensecrf.densecrf")  # its misc/imutils.py, imported by the loader
  try:
    importlib.import_module("imageio")
  except ImportError:
    monkeypatch.setitem(sys.modules, "imageio", types.ModuleType("imageio"))
  before = set(sys.modules)
  monkeypatch.syspath_prepend(root)
  monkeypatch.chdir(root)
  try:
    yield types.SimpleNamespace(indexing=importlib.import_module("misc.indexing"),
                                dataloader=importlib.import_module("voc12.dataloader"))
  finally:
    for name in set(sys.modules) - before:  # IRN's packages are called misc and voc12
      if name.split(".")[0] in ("misc", "voc12"):
        del sys.modules[name]


def _irn_conf(imutils, image, cams, classes):
  """The rule of docs/method.md §11 around IRN's own label dCRF (imutils.crf_inference_label),
  cams [C, H, W] as IRN keeps them: VOC ids of the 0.30 map's foreground, 0 where both maps
  are background, 255 where only the 0.30 one is."""
  ids = np.concatenate([[0], np.asarray(classes) + 1])

  def crf_map(threshold):
    stacked = np.concatenate([np.full((1,) + cams.shape[1:], threshold, cams.dtype), cams])
    hard = stacked.argmax(0)  # the constant first: a tie is background
    return ids[imutils.crf_inference_label(image, hard, n_labels=len(ids))]

  high, low = crf_map(0.30), crf_map(0.05)
  return np.select([high > 0, low > 0], [high, 255], default=0).astype(np.uint8)


def _reduce_label(label):
  """The training pipeline's reduction of a crop's label to the stride-4 grid."""
  from affinity_jax.data import transforms
  return transforms.reduce_label_tf(label, 4).numpy()


IRN_CASES = [(47, 61, 1, (14,)), (64, 80, 2, (8, 11)), (96, 128, 3, (2, 4, 15))]


@pytest.mark.parametrize("h,w,c,classes", IRN_CASES)
def test_relation_labels_equal_irns(irn_imutils, h, w, c, classes):
  image, cams = _synthetic(h, w, c, seed=h)
  theirs = _irn_conf(irn_imutils, image, np.ascontiguousarray(np.moveaxis(cams, -1, 0)), classes)
  ours = rl.relation_labels(image, cams, classes=classes)
  assert {0, 255} <= set(np.unique(theirs)) and len(np.unique(theirs)) >= 3
  np.testing.assert_array_equal(ours, theirs)
  # The loader's reduction, on the label and on a crop-sized one padded with 255.
  np.testing.assert_array_equal(_reduce_label(ours), irn_imutils.pil_rescale(theirs, 0.25, 0))
  padded = np.full((128, 136), 255, np.uint8)
  padded[:h, :w] = theirs
  np.testing.assert_array_equal(_reduce_label(padded), irn_imutils.pil_rescale(padded, 0.25, 0))


def test_pair_enumeration_is_irns(irn_pairs):
  for radius in (5, 10):
    index = irn_pairs.indexing.PathIndex(radius=radius, default_size=(2 * radius, 3 * radius))
    offsets = geometry.forward_offsets(radius)
    dst = [tuple(int(v) for v in d) for d in index.search_dst]
    assert sorted(dst) == sorted(offsets)
    assert dst == [offsets[k] for k in rl.irn_offset_order(radius)]
    assert dst != list(offsets)  # the same pairs, in another order


@pytest.mark.parametrize("source", ["synthetic", "unsure"])
def test_pair_labels_equal_irns(irn_pairs, source):
  if source == "synthetic":
    image, cams = _synthetic(96, 128, 3, seed=96)
    label = _reduce_label(rl.relation_labels(image, cams, classes=(2, 4, 15)))
  else:
    label = _label_with_unsure(24, 30, seed=1)
  for radius in (10, 5):
    index = irn_pairs.indexing.PathIndex(radius=radius, default_size=label.shape)
    extract = irn_pairs.dataloader.GetAffinityLabelFromIndices(index.src_indices,
                                                               index.dst_indices)
    bg_pos, fg_pos, neg = (t.numpy() for t in extract(label))
    ours = rl.relation_pair_labels(label, radius)
    for name, theirs in (("bg_pos", bg_pos), ("fg_pos", fg_pos), ("neg", neg)):
      assert theirs.sum() > 0
      np.testing.assert_array_equal(rl.to_irn_layout(ours[name], radius), theirs,
                                    err_msg=f"{name} at radius {radius}")
      assert ours[name].sum() == theirs.sum()  # nothing outside IRN's crop
