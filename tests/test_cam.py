"""CAM post-processing: the per-image oracle's upsampling, cropping and aggregation, and the
pipeline's background stack and CAM-only prediction (affinity_jax.cam)."""

import numpy as np
import pytest
import jax.numpy as jnp

from affinity_jax import cam
from tests import reference_cam as cam_lib


def test_bilinear_upsample_is_half_pixel_like_pytorch():
  # PyTorch, align_corners=False, 1x2 -> 1x4: source x = (i + 0.5) / 2 - 0.5, clamped at 0:
  # [1, 1 * 0.75 + 2 * 0.25, 1 * 0.25 + 2 * 0.75, 2] = [1, 1.25, 1.75, 2].
  grid = np.array([[[1.0], [2.0]]], np.float32)  # [1, 2, 1]
  up = np.asarray(cam_lib.upsample_cam(grid, (1, 4)))[..., 0]
  np.testing.assert_allclose(up, [[1.0, 1.25, 1.75, 2.0]], rtol=1e-6)
  # 2x2 -> 4x4: separable, the first row is the 1-D case of the first grid row.
  grid = np.array([[[0.0], [4.0]], [[8.0], [12.0]]], np.float32)
  up = np.asarray(cam_lib.upsample_cam(grid, (4, 4)))[..., 0]
  np.testing.assert_allclose(up[0], [0.0, 1.0, 3.0, 4.0], rtol=1e-6)
  np.testing.assert_allclose(up[:, 0], [0.0, 2.0, 6.0, 8.0], rtol=1e-6)
  np.testing.assert_allclose(up[1, 1], 0.75 * 0.75 * 0 + 0.75 * 0.25 * 4 + 0.25 * 0.75 * 8
                             + 0.25 * 0.25 * 12, rtol=1e-6)


def test_canvas_crop_matches_unpadded_grid_and_flip():
  rng = np.random.default_rng(0)
  # A 37x50 rescaled image has a ceil(37/8) x ceil(50/8) = 5x7 grid; on a 64x64 canvas the
  # network gives 8x8, of which the top-left 5x7 is the image's own grid.
  own = rng.random((5, 7, 3)).astype(np.float32)
  canvas = np.zeros((8, 8, 3), np.float32)
  canvas[:5, :7] = own
  canvas[5:] = 9.0
  canvas[:, 7:] = 9.0
  plain = cam_lib.upsample_cam(own, (30, 40))
  np.testing.assert_array_equal(
      np.asarray(cam_lib.upsample_cam(canvas, (30, 40), scaled_hw=(37, 50))), np.asarray(plain))
  flipped = cam_lib.upsample_cam(canvas, (30, 40), scaled_hw=(37, 50), flipped=True)
  np.testing.assert_array_equal(np.asarray(flipped), np.asarray(plain)[:, ::-1])
  with pytest.raises(ValueError, match="grid"):
    cam_lib.upsample_cam(own, (30, 40), scaled_hw=(80, 50))


def test_multiscale_aggregation_normalises_present_classes():
  rng = np.random.default_rng(1)
  image_hw = (16, 24)
  scales = (1.0, 0.5, 1.5, 2.0)
  grids, sizes, flips = [], [], []
  for s in scales:
    hs, ws = round(16 * s), round(24 * s)
    gh, gw = cam_lib.grid_extent((hs, ws))
    for f in (False, True):
      grids.append(rng.random((gh, gw, 4)).astype(np.float32))
      sizes.append((hs, ws))
      flips.append(f)
  label = np.array([0, 1, 0, 1])
  out = np.asarray(cam_lib.multiscale_cam(grids, image_hw=image_hw, label=label,
                                          scaled_hws=sizes, flips=flips))
  assert out.shape == (16, 24, 4)
  assert np.all(out[..., [0, 2]] == 0)
  total = sum(np.asarray(cam_lib.upsample_cam(g, image_hw, scaled_hw=s, flipped=f))
              for g, s, f in zip(grids, sizes, flips))
  for c in (1, 3):
    np.testing.assert_allclose(out[..., c], total[..., c] / (total[..., c].max() + 1e-5),
                               rtol=1e-6)
    assert out[..., c].max() == pytest.approx(1.0, abs=1e-4)
  with pytest.raises(ValueError, match="label"):
    cam_lib.aggregate_cams([total], np.array([1, 0]))


def test_background_prediction_and_score_stack():
  cam_map = np.zeros((2, 2, 3), np.float32)
  cam_map[0, 0] = [0.1, 0.5, 0.0]
  cam_map[0, 1] = [0.15, 0.0, 0.1]
  cam_map[1, 0] = [0.0, 0.0, 0.9]
  pred = np.asarray(cam.cam_prediction(cam_map))
  np.testing.assert_array_equal(pred, [[2, 0], [3, 0]])
  bg = np.asarray(cam.background_stack(cam_map, alpha=4))[..., 0]
  np.testing.assert_allclose(bg, [[0.5 ** 4, 0.85 ** 4], [0.1 ** 4, 1.0]], rtol=1e-5)
  # The same with JAX arrays (the walk's path), and the present classes only (the dCRF's).
  bg_jax = np.asarray(cam.background_stack(jnp.asarray(cam_map), alpha=4))[..., 0]
  np.testing.assert_allclose(bg_jax, bg, rtol=1e-6)
  ids = np.flatnonzero(np.array([1, 0, 1]))
  np.testing.assert_array_equal(ids, [0, 2])
  stack = cam.background_stack(cam_map[..., ids], alpha=32)
  assert stack.shape == (2, 2, 3)
  np.testing.assert_allclose(stack[0, 0], [0.9 ** 32, 0.1, 0.0], rtol=1e-5)
  np.testing.assert_allclose(stack[1, 1], [1.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="exactly one"):
    cam.background_stack(cam_map)
