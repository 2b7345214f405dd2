"""The pipeline's canvas inference (affinity_jax.cam) agrees with the per-image CAM oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affinity_jax import cam
from tests import reference_cam as cam_lib


@pytest.mark.parametrize("out_size,in_size", [(37, 5), (64, 8), (7, 3), (5, 9), (1, 1)])
def test_interp_matrix_matches_bilinear_half_pixel(out_size, in_size):
  rng = np.random.default_rng(0)
  x = rng.random((in_size, 2, 1)).astype(np.float32)
  m = cam.interp_matrix(out_size, in_size, out_size + 3, in_size + 2)
  got = np.einsum("yh,hwc->ywc", m[:out_size, :in_size], x)
  want = np.asarray(cam_lib.upsample_cam(jnp.asarray(x), (out_size, 2)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not m[out_size:].any() and not m[:, in_size:].any()


def test_interp_matrix_hand_example():
  # 2 -> 4 cells: PyTorch bilinear (align_corners=False) gives 1, 1.25, 1.75, 2 from [1, 2].
  m = cam.interp_matrix(4, 2, 4, 2)
  np.testing.assert_allclose(m @ np.array([1.0, 2.0]), [1.0, 1.25, 1.75, 2.0])


@pytest.mark.parametrize("in_hw,out_hw", [((24, 24), (192, 192)), ((13, 17), (100, 133)),
                                          ((7, 7), (3, 5)), ((1, 4), (6, 1))])
def test_resize_bilinear_is_the_interpolation_matrices_on_both_sides(in_hw, out_hw):
  rng = np.random.default_rng(2)
  maps = (rng.standard_normal((*in_hw, 3)) * 100).astype(np.float32)
  ry = cam.interp_matrix(out_hw[0], in_hw[0], out_hw[0], in_hw[0]).astype(np.float64)
  rx = cam.interp_matrix(out_hw[1], in_hw[1], out_hw[1], in_hw[1]).astype(np.float64)
  want = np.einsum("yh,hwc,xw->yxc", ry, maps.astype(np.float64), rx)
  got = cam.resize_bilinear(maps, out_hw)
  assert got.dtype == np.float32 and got.shape == (*out_hw, 3)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
  want_torch = np.asarray(cam_lib.upsample_cam(jnp.asarray(maps), out_hw))
  np.testing.assert_allclose(got, want_torch, rtol=1e-5, atol=1e-3)


def test_resize_bilinear_of_nothing_is_empty():
  assert cam.resize_bilinear(np.ones((4, 5, 2)), (0, 7)).shape == (0, 7, 2)
  assert cam.resize_bilinear(np.ones((0, 5, 2)), (3, 7)).shape == (3, 7, 2)


def test_canvas_pass_equals_per_image_upsample_with_flip():
  rng = np.random.default_rng(1)
  sizes = np.array([[20, 27], [13, 9]])       # rescaled sizes of two images
  out_sizes = np.array([[40, 54], [26, 18]])  # their original sizes
  canvas_grid, canvas_out = (4, 4), (56, 60)
  grids = rng.random((2, 4, 4, 3)).astype(np.float32)
  for flipped in (False, True):
    ry, rx = cam.upsample_matrices(sizes, out_sizes, canvas_grid, canvas_out, flipped)
    got = np.asarray(cam.upsample(jnp.asarray(grids), jnp.asarray(ry), jnp.asarray(rx)))
    for b in range(2):
      h, w = out_sizes[b]
      want = np.asarray(cam_lib.upsample_cam(grids[b], (h, w), scaled_hw=tuple(sizes[b]),
                                             flipped=flipped))
      np.testing.assert_allclose(got[b, :h, :w], want, rtol=1e-5, atol=1e-6)
      assert not got[b, h:].any() and not got[b, :, w:].any()


def test_flip_within_flips_each_image_inside_its_width():
  images = np.arange(2 * 1 * 6 * 1, dtype=np.float32).reshape(2, 1, 6, 1)
  idx = cam.flip_index(np.array([4, 6]), 6)
  out = np.asarray(cam.flip_within(jnp.asarray(images), jnp.asarray(idx)))
  np.testing.assert_array_equal(out[0, 0, :, 0], [3, 2, 1, 0, 4, 5])
  np.testing.assert_array_equal(out[1, 0, :, 0], [11, 10, 9, 8, 7, 6])


@pytest.mark.parametrize("scale", [1.0, 2.0, 1.5])
def test_walk_grid_back_to_the_image(scale):
  # Two images of a batch on a 6x7-cell canvas grid; each walk result lives on the grid of the
  # image resized by `scale`, and must come back bilinearly (half-pixel centres) stretched over
  # grid * 8 * size / scaled pixels, then cropped to the image, zero outside it.
  rng = np.random.default_rng(2)
  sizes = np.array([[37, 29], [20, 45]])
  scaled = np.round(sizes * scale).astype(np.int64)
  grid = -(-scaled // 8)
  canvas_grid = (int(grid[:, 0].max()) + 1, int(grid[:, 1].max()) + 2)
  walked = rng.random((2,) + canvas_grid + (3,)).astype(np.float32)
  ry, rx = cam.walk_to_image(grid, sizes, scaled, canvas_grid, scale)
  out = np.asarray(cam.upsample(jnp.asarray(walked), jnp.asarray(ry), jnp.asarray(rx)))
  for b in range(2):
    (gh, gw), (h, w) = grid[b], sizes[b]
    stretched = np.round(grid[b] * 8 * sizes[b] / scaled[b]).astype(int)
    assert (stretched >= sizes[b]).all()
    want = jax.image.resize(walked[b, :gh, :gw], (*stretched, 3), "bilinear", antialias=False)
    np.testing.assert_allclose(out[b, :h, :w], np.asarray(want)[:h, :w], rtol=1e-5, atol=1e-6)
    assert not out[b, stretched[0]:].any() and not out[b, :, stretched[1]:].any()
