"""Losses against hand-computed values."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from affinity_jax import losses


def test_affinity_loss_hand_values():
  aff = jnp.array([[[[0.9, 0.2], [0.5, 0.7]]]])  # [1, 1, 2, 2]
  fg = jnp.array([[[[1.0, 0.0], [0.0, 0.0]]]])
  bg = jnp.array([[[[0.0, 0.0], [1.0, 1.0]]]])
  neg = jnp.array([[[[0.0, 1.0], [0.0, 0.0]]]])
  loss, parts = losses.affinity_loss(aff, fg, bg, neg)
  fg_ref = -math.log(0.9 + 1e-5) / (1 + 1e-5)
  bg_ref = (-math.log(0.5 + 1e-5) - math.log(0.7 + 1e-5)) / (2 + 1e-5)
  neg_ref = -math.log(1 + 1e-5 - 0.2) / (1 + 1e-5)
  assert float(parts["fg_pos"]) == pytest.approx(fg_ref, rel=1e-5)
  assert float(parts["bg_pos"]) == pytest.approx(bg_ref, rel=1e-5)
  assert float(parts["neg"]) == pytest.approx(neg_ref, rel=1e-5)
  assert float(loss) == pytest.approx(fg_ref / 4 + bg_ref / 4 + neg_ref / 2, rel=1e-5)


def test_affinity_loss_empty_sets_and_finite_gradient():
  aff = jnp.array([[[[0.0, 1.0]]]])  # masked 0 and a saturated 1
  zeros = jnp.zeros_like(aff)
  loss, parts = losses.affinity_loss(aff, zeros, zeros, zeros)
  assert float(loss) == 0.0
  grad = jax.grad(lambda a: losses.affinity_loss(a, zeros.at[0, 0, 0, 1].set(1.0), zeros,
                                                 zeros.at[0, 0, 0, 0].set(1.0))[0])(aff)
  assert np.all(np.isfinite(np.asarray(grad)))
  with pytest.raises(ValueError, match="share one shape"):
    losses.affinity_loss(aff, zeros[..., :1], zeros, zeros)


def test_multilabel_soft_margin_hand_values():
  logits = np.array([[2.0, -1.0, 0.0], [0.5, 3.0, -2.0]], np.float32)
  labels = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
  sig = 1 / (1 + np.exp(-logits.astype(np.float64)))
  per = -(labels * np.log(sig) + (1 - labels) * np.log(1 - sig))
  ref = per.mean(axis=1).mean()
  got = losses.multilabel_soft_margin_loss(jnp.asarray(logits), jnp.asarray(labels))
  assert float(got) == pytest.approx(ref, rel=1e-6)
  # Large logits stay finite (log-sigmoid form).
  big = losses.multilabel_soft_margin_loss(jnp.array([[100.0, -100.0]]), jnp.array([[0.0, 1.0]]))
  assert float(big) == pytest.approx(100.0, rel=1e-6)


def test_multilabel_soft_margin_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 20)).astype(np.float32) * 3
  labels = (rng.random((4, 20)) < 0.2).astype(np.float32)
  ref = torch.nn.MultiLabelSoftMarginLoss()(torch.from_numpy(logits), torch.from_numpy(labels))
  got = losses.multilabel_soft_margin_loss(jnp.asarray(logits), jnp.asarray(labels))
  assert float(got) == pytest.approx(float(ref), rel=1e-5)


def test_segmentation_loss_ignores_255_and_is_safe_when_empty():
  logits = np.zeros((1, 1, 3, 2), np.float32)
  logits[0, 0, 0] = [2.0, 0.0]
  logits[0, 0, 1] = [0.0, 1.0]
  labels = np.array([[[0, 1, 255]]])
  got = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels))
  ref = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
  assert float(got) == pytest.approx(ref, rel=1e-6)
  empty = losses.segmentation_loss(jnp.asarray(logits), jnp.full((1, 1, 3), 255))
  assert float(empty) == 0.0
  grad = jax.grad(lambda l: losses.segmentation_loss(l, jnp.full((1, 1, 3), 255)))(
      jnp.asarray(logits))
  assert np.all(np.asarray(grad) == 0)
  with pytest.raises(ValueError, match=r"\[B, H, W\]"):
    losses.segmentation_loss(jnp.asarray(logits), jnp.zeros((1, 3)))
