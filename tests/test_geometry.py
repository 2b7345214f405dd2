"""Pair geometry, affinities and affinity labels against brute-force loops."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from affinity_jax import geometry
from tests import reference_geometry


def _brute_pairs(h, w, radius, scheme, valid=None):
  """{(y, x, k): (y2, x2)} of the scheme's forward pairs, by explicit loops.

  `valid` is an image's own grid at the top-left; "psa" enumerates on that grid, as the original.
  """
  pairs = {}
  if valid is not None:  # The image's own grid.
    h_img, w_img = int(valid.any(1).sum()), int(valid.any(0).sum())
  else:
    h_img, w_img = h, w
  for k, (dy, dx) in enumerate(geometry.forward_offsets(radius)):
    for y in range(h):
      for x in range(w):
        y2, x2 = y + dy, x + dx
        if not (0 <= y2 < h and 0 <= x2 < w):
          continue
        if scheme == "psa" and not (y <= h_img - radius and radius - 1 <= x <= w_img - radius):
          continue
        if valid is not None and not (valid[y, x] and valid[y2, x2]):
          continue
        pairs[(y, x, k)] = (y2, x2)
  return pairs


def test_forward_offsets_radius5_original_order():
  offsets = geometry.forward_offsets(5)
  assert len(offsets) == 34
  assert offsets[:4] == ((0, 1), (0, 2), (0, 3), (0, 4))
  assert offsets[4:13] == tuple((1, dx) for dx in range(-4, 5))
  assert offsets[-5:] == tuple((4, dx) for dx in range(-2, 3))
  assert offsets[-1] == (4, 2)
  assert all(dy * dy + dx * dx < 25 for dy, dx in offsets)


def test_forward_offsets_radius3_and_symmetric():
  assert geometry.forward_offsets(3) == (
      (0, 1), (0, 2), (1, -2), (1, -1), (1, 0), (1, 1), (1, 2),
      (2, -2), (2, -1), (2, 0), (2, 1), (2, 2))
  sym = geometry.symmetric_offsets(3)
  assert len(sym) == 25 and sym[0] == (0, 0) and sym[13] == (0, -1)


def test_psa_pair_indices_match_loops():
  h, w, r = 7, 10, 3
  ind_from, ind_to = geometry.psa_pair_indices(h, w, r)
  from_ref = [y * w + x for y in range(h - r + 1) for x in range(r - 1, w - r + 1)]
  to_ref = [(y + dy) * w + x + dx for dy, dx in geometry.forward_offsets(r)
            for y in range(h - r + 1) for x in range(r - 1, w - r + 1)]
  np.testing.assert_array_equal(ind_from, from_ref)
  np.testing.assert_array_equal(ind_to, to_ref)
  # 448 crop at radius 5: 52 x 48 from positions, 34 offsets.
  ind_from, ind_to = geometry.psa_pair_indices(56, 56, 5)
  assert ind_from.shape == (52 * 48,) and ind_to.shape == (34 * 52 * 48,)


@pytest.mark.parametrize("scheme", ["psa", "full"])
def test_pair_mask_matches_loops(scheme):
  h, w, r = 6, 9, 3
  valid = np.ones((1, h, w), bool)
  valid[0, 4:, :] = False
  valid[0, :, 7:] = False
  for v in (None, valid):
    mask = np.asarray(geometry.pair_mask(h, w, radius=r, scheme=scheme, valid=v))
    pairs = _brute_pairs(h, w, r, scheme, None if v is None else v[0])
    got = set(zip(*np.nonzero(mask if v is None else mask[0])))
    assert got == set(pairs)


def _original_pairs(h, w, radius):
  """(from, to) flat-index pairs of the original's pair set on an h x w grid, written from its
  definition: from positions drop the last r-1 rows and the first and last r-1 columns, to
  positions are the from positions moved by each forward offset."""
  r1 = radius - 1
  pairs = set()
  for dy, dx in geometry.forward_offsets(radius):
    for y in range(h - r1):
      for x in range(r1, w - r1):
        pairs.add((y * w + x, (y + dy) * w + x + dx))
  return pairs


def test_psa_pairs_on_a_canvas_are_the_original_pairs_of_the_image_grid():
  # A 47 x 63 image grid at the top-left of a 64 x 64 canvas grid: the walk's pair set must be
  # the original's on 47 x 63, not the canvas's set cut to the image (5,132 pairs more).
  h, w, hc, wc, r = 47, 63, 64, 64, 5
  valid = np.zeros((1, hc, wc), bool)
  valid[0, :h, :w] = True
  mask = np.asarray(geometry.pair_mask(hc, wc, radius=r, scheme="psa", valid=valid))[0]
  offsets = geometry.forward_offsets(r)
  got = {(y * w + x, (y + offsets[k][0]) * w + x + offsets[k][1])
         for y, x, k in zip(*np.nonzero(mask))}
  want = _original_pairs(h, w, r)
  assert len(want) == 34 * (h - 4) * (w - 8)
  assert got == want
  # The canvas's own set cut to the image has the extra pairs from the last rows and columns.
  canvas = np.asarray(geometry.pair_mask(hc, wc, radius=r, scheme="psa"))
  ends = np.asarray(geometry.pair_mask(hc, wc, radius=r, scheme="full", valid=valid))[0]
  assert int((canvas & ends).sum()) - len(want) == 5132


def test_pair_affinities_brute_force_and_schemes_agree():
  rng = np.random.default_rng(0)
  b, h, w, c, r = 2, 7, 9, 5, 3
  feats = rng.normal(size=(b, h, w, c)).astype(np.float32)
  valid = np.ones((b, h, w), bool)
  valid[1, 5:] = False
  full = np.asarray(jax.jit(lambda f, v: geometry.pair_affinities(f, radius=r, valid=v))(
      feats, valid))
  psa = np.asarray(geometry.pair_affinities(jnp.asarray(feats), radius=r, scheme="psa"))
  for bi in range(b):
    pairs = _brute_pairs(h, w, r, "full", valid[bi])
    ref = np.zeros((h, w, len(geometry.forward_offsets(r))), np.float32)
    for (y, x, k), (y2, x2) in pairs.items():
      ref[y, x, k] = np.exp(-np.mean(np.abs(feats[bi, y, x] - feats[bi, y2, x2])))
    np.testing.assert_allclose(full[bi], ref, rtol=1e-6, atol=1e-7)
  shared = np.asarray(geometry.pair_mask(h, w, radius=r, scheme="psa"))
  full_unmasked = np.asarray(geometry.pair_affinities(jnp.asarray(feats), radius=r))
  np.testing.assert_array_equal(psa[:, shared], full_unmasked[:, shared])
  assert np.all(psa[:, ~shared] == 0)


@pytest.mark.parametrize("h,w,r,scheme,cut", [(7, 9, 3, "full", True), (7, 9, 3, "psa", False),
                                               (6, 11, 5, "psa", True), (3, 2, 5, "full", False)])
def test_pair_affinities_gradient_matches_loops(h, w, r, scheme, cut):
  """The hand-written gradient of the pair distances against the pairs enumerated by loops:
  d/df_p of the sum of weighted affinities, float64, masked pairs contributing nothing."""
  rng = np.random.default_rng(1)
  b, c = 2, 6
  feats = rng.normal(size=(b, h, w, c)).astype(np.float32)
  weights = rng.normal(size=(b, h, w, len(geometry.forward_offsets(r)))).astype(np.float32)
  valid = np.ones((b, h, w), bool)
  if cut:
    valid[1, h - 2:] = False
    valid[1, :, w - 1:] = False
  grad = np.asarray(jax.jit(jax.grad(lambda f: jnp.sum(weights * geometry.pair_affinities(
      f, radius=r, scheme=scheme, valid=valid))))(feats))
  want = np.zeros((b, h, w, c))
  f64 = feats.astype(np.float64)
  for bi in range(b):
    for (y, x, k), (y2, x2) in _brute_pairs(h, w, r, scheme, valid[bi]).items():
      diff = f64[bi, y, x] - f64[bi, y2, x2]
      d_dist = -weights[bi, y, x, k] * np.exp(-np.mean(np.abs(diff))) * np.sign(diff) / c
      want[bi, y, x] += d_dist
      want[bi, y2, x2] -= d_dist
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def test_psa_vector_order_matches_original_gather():
  rng = np.random.default_rng(1)
  h, w, r = 8, 11, 4
  feats = rng.normal(size=(1, h, w, 3)).astype(np.float32)
  ind_from, ind_to = geometry.psa_pair_indices(h, w, r)
  flat = feats[0].reshape(h * w, 3)
  k = len(geometry.forward_offsets(r))
  ref = np.exp(-np.mean(np.abs(flat[np.tile(ind_from, k)] - flat[ind_to]), axis=-1))
  got = geometry.to_psa_vector(geometry.pair_affinities(jnp.asarray(feats), radius=r,
                                                        scheme="psa"), r)
  np.testing.assert_allclose(np.asarray(got)[0], ref, rtol=1e-6)


def test_symmetric_affinities_backward_entries():
  rng = np.random.default_rng(2)
  h, w, r = 6, 7, 3
  feats = rng.normal(size=(1, h, w, 4)).astype(np.float32)
  valid = np.ones((1, h, w), bool)
  valid[0, 0, 0] = False
  sym = np.asarray(geometry.neighbourhood_affinities(jnp.asarray(feats), radius=r, valid=valid))
  offsets = geometry.symmetric_offsets(r)
  assert sym.shape == (1, h, w, len(offsets))
  for n, (dy, dx) in enumerate(offsets):
    for y in range(h):
      for x in range(w):
        y2, x2 = y + dy, x + dx
        inside = 0 <= y2 < h and 0 <= x2 < w and valid[0, y, x] and valid[0, y2, x2]
        ref = np.exp(-np.mean(np.abs(feats[0, y, x] - feats[0, y2, x2]))) if inside else 0.0
        assert sym[0, y, x, n] == pytest.approx(ref, rel=1e-6, abs=1e-7)


def _score_maps():
  """A 16x24 crop (2x3 cells) with background + 2 classes, designed cell by cell."""
  la = np.zeros((16, 24, 3), np.float32)
  ha = np.zeros((16, 24, 3), np.float32)
  # Cell (0, 0): class 2 wins in la and in ha -> 2.
  la[:8, :8] = [0.2, 0.1, 0.7]
  ha[:8, :8] = [0.1, 0.1, 0.8]
  # Cell (0, 1): background wins in la but not in ha -> 255 (not confident).
  la[:8, 8:16] = [0.6, 0.4, 0.0]
  ha[:8, 8:16] = [0.3, 0.7, 0.0]
  # Cell (0, 2): background wins in ha -> 0, even though la says class 1.
  la[:8, 16:] = [0.1, 0.9, 0.0]
  ha[:8, 16:] = [0.9, 0.1, 0.0]
  # Cell (1, 0): a pooled tie-free mix: half the pixels class 1 strong, half background weak.
  la[8:, :4] = [0.0, 1.0, 0.0]
  la[8:, 4:8] = [0.6, 0.0, 0.0]
  ha[8:, :8] = [0.0, 1.0, 0.0]
  # Cell (1, 1): tiny scores everywhere (padding) -> 255. Cell (1, 2): all zero -> 255.
  la[8:, 8:16] = 1e-6
  ha[8:, 8:16] = 1e-6
  return la, ha


EXPECTED_LABELS = np.array([[2, 255, 0], [1, 255, 255]], np.uint8)


def test_affinity_labels_numpy_hand_example():
  la, ha = _score_maps()
  np.testing.assert_array_equal(reference_geometry.affinity_labels(la, ha), EXPECTED_LABELS)
  # Not a multiple of 8: zero padded like the original's block pooling (the last column of
  # cells becomes mostly padding and keeps its argmax since zeros do not change it).
  labels = reference_geometry.affinity_labels(la[:, :20], ha[:, :20])
  np.testing.assert_array_equal(labels, EXPECTED_LABELS)


def test_affinity_labels_tf_eager_and_in_dataset():
  import tensorflow as tf
  la, ha = _score_maps()
  eager = geometry.affinity_labels_tf(la, ha).numpy()
  np.testing.assert_array_equal(eager, EXPECTED_LABELS)
  assert eager.dtype == np.uint8
  rng = np.random.default_rng(3)
  la_r = rng.random((2, 20, 28, 4)).astype(np.float32) ** 4
  ha_r = rng.random((2, 20, 28, 4)).astype(np.float32) ** 4
  la_r[:, 12:] = 0
  ha_r[:, 12:] = 0

  def gen():
    for i in range(2):
      yield la_r[i], ha_r[i]

  spec = tf.TensorSpec([None, None, 4], tf.float32)
  ds = tf.data.Dataset.from_generator(gen, output_signature=(spec, spec))
  ds = ds.map(geometry.affinity_labels_tf)
  for i, got in enumerate(ds.as_numpy_iterator()):
    np.testing.assert_array_equal(got, reference_geometry.affinity_labels(la_r[i], ha_r[i]))


def test_pair_labels_match_psa_vector_and_loops():
  rng = np.random.default_rng(4)
  h, w, r = 8, 10, 4
  labels = rng.choice([0, 1, 2, 255], size=(1, h, w), p=[0.4, 0.25, 0.2, 0.15])
  got = geometry.pair_labels(labels, radius=r, scheme="psa")
  ref = reference_geometry.pair_labels_psa_vector(labels[0], r)
  for key in ("fg_pos", "bg_pos", "neg"):
    np.testing.assert_array_equal(np.asarray(geometry.to_psa_vector(got[key], r))[0], ref[key])
  valid = np.ones((1, h, w), bool)
  valid[0, :, 8:] = False
  full = {k: np.asarray(v)[0] for k, v in
          geometry.pair_labels(labels, radius=r, scheme="full", valid=valid).items()}
  pairs = _brute_pairs(h, w, r, "full", valid[0])
  for key in full:
    assert full[key].sum() <= len(pairs)
  for y in range(h):
    for x in range(w):
      for k in range(len(geometry.forward_offsets(r))):
        a = labels[0, y, x]
        b = labels[0][pairs[(y, x, k)]] if (y, x, k) in pairs else 255
        sure = a != 255 and b != 255
        assert full["fg_pos"][y, x, k] == float(sure and a == b and a != 0)
        assert full["bg_pos"][y, x, k] == float(sure and a == b == 0)
        assert full["neg"][y, x, k] == float(sure and a != b)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="scheme"):
    geometry.pair_mask(5, 5, scheme="dense")
  with pytest.raises(ValueError, match="radius"):
    geometry.forward_offsets(1)
  with pytest.raises(ValueError, match="valid"):
    geometry.pair_mask(5, 5, radius=3, valid=np.ones((1, 4, 5), bool))
  with pytest.raises(ValueError, match="shapes differ"):
    reference_geometry.affinity_labels(np.zeros((8, 8, 3)), np.zeros((8, 8, 4)))
  with pytest.raises(ValueError, match="psa pair set"):
    geometry.psa_pair_indices(3, 20, 5)
  with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
    geometry.pair_affinities(jnp.zeros((4, 4, 3)))
