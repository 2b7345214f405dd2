"""dCRF with the real pydensecrf."""

import numpy as np
import pytest

from affinity_jax import crf


def _two_regions(h=24, w=32, edge=20):
  image = np.zeros((h, w, 3), np.uint8)
  image[:, :edge] = (200, 30, 30)
  image[:, edge:] = (20, 40, 220)
  # A blurry probability edge in the wrong place: a ramp from column 8 to 24 centred at 16.
  ramp = np.clip((np.arange(w) - 8) / 16.0, 0.0, 1.0)
  p1 = np.tile(ramp, (h, 1))
  probs = np.stack([1 - p1, p1], axis=-1).astype(np.float32)
  return image, probs


def test_crf_snaps_to_the_colour_edge():
  image, probs = _two_regions()
  q = crf.crf_inference(image, probs, t=10)
  assert q.shape == probs.shape and q.dtype == np.float32
  np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-4)
  before = probs.argmax(-1)
  after = q.argmax(-1)
  assert np.any(before[:, 16:20] == 1)  # the blurry maps put class 1 left of the edge
  assert np.all(after[:, :20] == 0) and np.all(after[:, 20:] == 1)


def test_crf_does_not_renormalise_scores():
  # A per-pixel constant in the unary does not change mean field, so renormalising matters only
  # through the 1e-5 clip: scores (1e-6, 1e-7) clip to equal unaries (no preference) as in the
  # original, whereas renormalised they would be (0.91, 0.09), a clear vote for class 0.
  image = np.full((16, 16, 3), 128, np.uint8)
  probs = np.full((16, 16, 2), 0.5, np.float32)
  probs[6:10, 6:10] = [1e-6, 1e-7]
  q = crf.crf_inference(image, probs)
  np.testing.assert_allclose(q[6:10, 6:10], 0.5, atol=1e-4)
  renormalised = probs / probs.sum(-1, keepdims=True)
  q_renorm = crf.crf_inference(image, renormalised)
  assert np.all(q_renorm[7:9, 7:9, 0] > 0.6)


def test_non_contiguous_inputs():
  image, probs = _two_regions()
  base = crf.crf_inference(image, probs)
  image_nc = np.asfortranarray(image)
  probs_nc = np.moveaxis(np.moveaxis(probs, -1, 0).copy(), 0, -1)  # a strided view
  assert not probs_nc.flags["C_CONTIGUOUS"]
  np.testing.assert_allclose(crf.crf_inference(image_nc, probs_nc), base, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
  image, probs = _two_regions()
  with pytest.raises(ValueError, match="uint8"):
    crf.crf_inference(image.astype(np.float32), probs)
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    crf.crf_inference(image[..., :2], probs)
  with pytest.raises(ValueError, match="does not match"):
    crf.crf_inference(image, probs[:-1])
  with pytest.raises(ValueError, match="does not match"):
    crf.crf_inference(image, np.ascontiguousarray(np.moveaxis(probs, -1, 0)))
  with pytest.raises(ValueError, match="non-negative"):
    crf.crf_inference(image, -probs)
