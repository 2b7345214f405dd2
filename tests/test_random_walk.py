"""Sparse random walk against the original's dense matrix path, plus the pseudo-label step."""

import numpy as np
import pytest
import jax.numpy as jnp

from affinity_jax import geometry, random_walk as rw
from tests import reference_walk


def _valid(h, w, rows, cols):
  valid = np.ones((h, w), bool)
  if rows:
    valid[-rows:] = False
  if cols:
    valid[:, -cols:] = False
  return valid


CASES = [  # (h, w, radius, scheme, padded rows, padded cols)
    (9, 11, 5, "full", 0, 0),
    (9, 11, 5, "psa", 0, 0),
    (12, 7, 5, "full", 0, 0),
    (1, 9, 5, "full", 0, 0),
    (9, 1, 5, "full", 0, 0),
    (8, 12, 3, "full", 2, 3),
    (10, 10, 5, "psa", 1, 2),
    (11, 6, 4, "full", 3, 0),
]


@pytest.mark.parametrize("h,w,radius,scheme,pad_rows,pad_cols", CASES)
def test_sparse_matches_dense(h, w, radius, scheme, pad_rows, pad_cols):
  rng = np.random.default_rng(h * 100 + w)
  # Small feature spread so that many affinities are far from 0 and the walk mixes.
  feats = (rng.normal(size=(2, h, w, 4)) * 0.3).astype(np.float32)
  cam = rng.random((2, h, w, 3)).astype(np.float32)
  valid = None
  if pad_rows or pad_cols:
    valid = np.stack([_valid(h, w, pad_rows, pad_cols), _valid(h, w, 0, pad_cols)])
  forward = np.asarray(geometry.pair_affinities(jnp.asarray(feats), radius=radius,
                                                scheme=scheme, valid=valid))
  out = np.asarray(rw.random_walk(feats, cam, radius=radius, scheme=scheme, valid=valid))
  for b in range(2):
    ref = reference_walk.dense_reference(forward[b], cam[b], radius=radius,
                             valid=None if valid is None else valid[b])
    err = np.abs(out[b] - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err
    if valid is not None:
      assert np.all(out[b][~valid[b]] == 0)


def test_walk_mixes_inside_regions_only():
  # Two regions of constant features, far apart: affinities across the border vanish, inside
  # they are 1, so after many steps each region's scores are near-constant, and mass does not
  # cross the border.
  h, w = 6, 12
  feats = np.zeros((1, h, w, 2), np.float32)
  feats[:, :, 6:] = 50.0
  cam = np.zeros((1, h, w, 2), np.float32)
  cam[0, 2, 1, 0] = 1.0
  cam[0, 3, 9, 1] = 1.0
  out = np.asarray(rw.random_walk(feats, cam, radius=3))
  assert np.all(out[0, :, 6:, 0] < 1e-12) and np.all(out[0, :, :6, 1] < 1e-12)
  left = out[0, :, :6, 0]
  assert left.std() < 1e-3 * left.mean()


def test_padding_is_cut_out_of_the_graph():
  rng = np.random.default_rng(5)
  h, w = 8, 9
  feats = rng.normal(size=(1, h, w, 3)).astype(np.float32)
  cam = rng.random((1, h, w, 2)).astype(np.float32)
  valid = _valid(h, w, 2, 3)[None]
  out = rw.random_walk(feats, cam, radius=4, valid=valid)
  feats2, cam2 = feats.copy(), cam.copy()
  feats2[~valid] = 123.0
  cam2[~valid] = 7.0
  out2 = rw.random_walk(feats2, cam2, radius=4, valid=valid)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
  # The valid part equals a walk on the cropped image alone.
  alone = rw.random_walk(feats[:, :h - 2, :w - 3], cam[:, :h - 2, :w - 3], radius=4)
  np.testing.assert_allclose(np.asarray(out)[:, :h - 2, :w - 3], np.asarray(alone),
                             rtol=1e-5, atol=1e-7)


def test_channel_chunks_do_not_change_the_result():
  rng = np.random.default_rng(7)
  feats = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
  cam = rng.random((2, 6, 7, 5)).astype(np.float32)
  one = rw.random_walk(feats, cam, radius=3, t=16, channel_chunks=1)
  three = rw.random_walk(feats, cam, radius=3, t=16, channel_chunks=3)
  np.testing.assert_array_equal(np.asarray(one), np.asarray(three))


def test_transition_weights_normalised():
  rng = np.random.default_rng(6)
  feats = rng.normal(size=(1, 5, 6, 3)).astype(np.float32)
  valid = _valid(5, 6, 1, 0)[None]
  aff = geometry.neighbourhood_affinities(feats, radius=3, valid=valid)
  weights = np.asarray(rw.transition_weights(aff, beta=8.0))
  np.testing.assert_allclose(weights.sum(-1)[valid], 1.0, rtol=1e-6)
  assert np.all(weights[~valid] == 0)


def test_early_stop_saves_steps_and_stays_close():
  h, w = 16, 16
  yy, xx = np.mgrid[:h, :w]
  feats = np.where((yy < 8)[..., None], 0.0, 5.0) * np.ones((1, h, w, 4))
  cam = np.stack([np.exp(-((yy - 4) ** 2 + (xx - 5) ** 2) / 8.0),
                  np.exp(-((yy - 12) ** 2 + (xx - 10) ** 2) / 8.0)], -1)[None]
  full = rw.random_walk(feats.astype(np.float32), cam.astype(np.float32), radius=5)
  early, steps = rw.random_walk(feats.astype(np.float32), cam.astype(np.float32), radius=5,
                                tol=1e-5, return_steps=True)
  assert 0 < int(steps) < 256
  np.testing.assert_allclose(np.asarray(early), np.asarray(full), atol=1e-3)
  _, steps_all = rw.random_walk(feats.astype(np.float32), cam.astype(np.float32), radius=5,
                                t=20, tol=0.0, return_steps=True)
  assert int(steps_all) == 20


def test_prepare_cam_hand_example():
  cam = np.zeros((10, 9, 2), np.float32)
  cam[:8, :8, 1] = 0.5
  out = np.asarray(rw.prepare_cam(cam, alpha=2.0, stride=8))
  assert out.shape == (2, 2, 3)
  # Cell (0, 0): bg (1 - 0.5)^2 = 0.25, class 1 = 0.5.
  np.testing.assert_allclose(out[0, 0], [0.25, 0.0, 0.5], rtol=1e-6)
  # Cell (1, 1): two real pixels (bg 1) among 64.
  np.testing.assert_allclose(out[1, 1], [2 / 64, 0.0, 0.0], rtol=1e-6)
  # Cell (0, 1): 8 real pixels of 64.
  np.testing.assert_allclose(out[0, 1], [8 / 64, 0.0, 0.0], rtol=1e-6)


def test_random_walk_labels_fills_regions():
  # 40x48 image, 5x6 grid. Features: left 3 columns vs right 3 columns. A class-4 CAM covers
  # part of the left region only; the walk spreads it over the left region.
  height, width = 40, 48
  feats = np.zeros((5, 6, 2), np.float32)
  feats[:, 3:] = 30.0
  cam = np.zeros((height, width, 20), np.float32)
  cam[8:32, 0:20, 4] = 1.0
  labels = reference_walk.random_walk_labels(feats, cam, radius=3)
  assert labels.shape == (height, width) and labels.dtype == np.uint8
  assert set(np.unique(labels)) == {0, 5}
  assert np.all(labels[:, 28:] == 0)
  assert np.all(labels[:, :20] == 5)
  # A larger canvas grid is cropped to the image's grid: same answer.
  canvas = np.concatenate([feats, np.zeros((5, 2, 2), np.float32)], axis=1)
  np.testing.assert_array_equal(
      reference_walk.random_walk_labels(canvas[None], cam, radius=3), labels)


def test_bad_inputs_raise():
  aff = jnp.ones((1, 4, 4, 25))
  with pytest.raises(ValueError, match="aff_sym"):
    rw.propagate(aff, jnp.ones((1, 4, 4, 2)), radius=5)
  with pytest.raises(ValueError, match="cam"):
    rw.propagate(aff, jnp.ones((1, 4, 5, 2)), radius=3)
  with pytest.raises(ValueError, match="features"):
    reference_walk.random_walk_labels(np.zeros((2, 2, 3)), np.zeros((40, 40, 20)))


@pytest.mark.parametrize("crf", [False, True])
def test_walk_over_the_present_classes_gives_the_labels_of_the_walk_over_all(crf):
  """walk_batch walks only the background and each image's classes; walking all 20 classes (the
  original's way) gives the same pseudo labels and scores, with and without the dCRF."""
  import jax
  import ml_collections
  from affinity_jax import models
  model = models.build("affinity", width=1 / 32)
  variables = models.init_variables(model, jax.random.key(0), (1, 64, 64, 3))
  cfg = ml_collections.ConfigDict({"random_walk": dict(
      radius=5, scheme="psa", logt=6, beta=8.0, tol=0.0, crf=crf)})
  walk = rw.make_walk_fn(model, cfg)
  rng = np.random.default_rng(0)
  sizes = np.array([[64, 80], [45, 61], [37, 29]])   # 1, 2 and 3 classes of 20
  images = np.zeros((3, 64, 80, 3), np.float32)
  cams, classes = {}, {}
  for i, (h, w) in enumerate(sizes):
    images[i, :h, :w] = rng.normal(size=(h, w, 3))
    classes[i] = np.sort(rng.choice(20, size=i + 1, replace=False))
    full = np.zeros((h, w, 20), np.float32)
    for c in classes[i]:  # a blob per class, peaking at 1 (normalised CAMs)
      cy, cx = rng.uniform(0.2, 0.8, 2) * (h, w)
      yy, xx = np.mgrid[:h, :w]
      full[..., c] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.1 * h * w))
    cams[i] = full / full.max(axis=(0, 1), keepdims=True).clip(1e-6)
  raw = (rng.uniform(0, 255, (3, 64, 80, 3))).astype(np.uint8)
  every = {i: np.arange(20) for i in cams}
  results = {}
  for name, which in (("present", classes), ("all", every)):
    labels, heat, share, channels = rw.walk_batch(walk, variables, images, cams, sizes, sizes,
                                                  classes=which, alpha=16.0, image_scale=1.0)
    results[name] = labels, heat, share, channels
  labels, heat, share, channels = results["present"]
  all_labels, all_heat, all_share, all_channels = results["all"]
  assert share is None or share.shape[-1] == rw.channel_count(4, 21) == 4
  for i, (h, w) in enumerate(sizes):
    np.testing.assert_array_equal(channels[i], np.concatenate([[0], classes[i] + 1]))
    np.testing.assert_array_equal(labels[i, :h, :w], all_labels[i, :h, :w])
    assert set(np.unique(labels[i, :h, :w])) <= set(channels[i])
    assert len(np.unique(labels[i, :h, :w])) > 1  # the test walks something
    np.testing.assert_allclose(heat[i, :h, :w], all_heat[i, :h, :w], rtol=1e-6, atol=1e-7)
    if crf:
      k = len(channels[i])
      np.testing.assert_allclose(share[i, :h, :w, :k],
                                 all_share[i, :h, :w][..., channels[i]], rtol=1e-6, atol=1e-7)
      assert np.all(share[i, :h, :w, k:] == 0)
      iters = 5
      np.testing.assert_array_equal(
          rw.crf_label(raw[i, :h, :w], share[i, :h, :w], channels[i], iters),
          rw.crf_label(raw[i, :h, :w], all_share[i, :h, :w][..., channels[i]], channels[i],
                       iters))


def test_channel_count_keeps_compiles_few():
  assert [rw.channel_count(n, 21) for n in (1, 2, 3, 4, 5, 9, 17, 21)] == [
      2, 2, 4, 4, 8, 16, 21, 21]
  assert rw.channel_count(3, 3) == 3 and rw.channel_count(2, 6) == 2
