"""Losses of the three networks: affinity (docs/method.md §5), multilabel soft margin and
segmentation cross-entropy.

All are pure jnp functions of arrays, jit-able, returning float32 scalars.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from affinity_jax import geometry
from affinity_jax.constants import IGNORE_LABEL

# The original's epsilons: inside the logs and in the pair counts.
LOG_EPS = 1e-5
COUNT_EPS = 1e-5


def affinity_loss(affinity: jax.Array, fg_pos: jax.Array, bg_pos: jax.Array,
                  neg: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """AffinityNet loss L = L+fg / 4 + L+bg / 4 + L- / 2 (the original code's weights).

  L+ = sum(-log(W + 1e-5)) / (count + 1e-5) over positive pairs, L- = sum(-log(1 + 1e-5 - W)) /
  (count + 1e-5) over negative pairs; sums and counts run over the whole batch.

  Args:
    affinity: [B, h, w, K] pair affinities W in [0, 1] (geometry.pair_affinities).
    fg_pos, bg_pos, neg: [B, h, w, K] {0, 1} pair labels (geometry.pair_labels); pairs outside
      the pair set are 0 in all three, so their affinity does not matter.

  Returns:
    (loss, {"fg_pos", "bg_pos", "neg"}: the three partial losses) as float32 scalars.
  """
  if not (affinity.shape == fg_pos.shape == bg_pos.shape == neg.shape):
    raise ValueError("affinity_loss: affinity and the three label sets must share one shape "
                     f"(got {affinity.shape}, {fg_pos.shape}, {bg_pos.shape}, {neg.shape}).")
  affinity = affinity.astype(jnp.float32)
  pos_nll = -jnp.log(affinity + LOG_EPS)
  neg_nll = -jnp.log(1.0 + LOG_EPS - affinity)

  def mean(nll, label):
    label = label.astype(jnp.float32)
    return jnp.sum(label * nll) / (jnp.sum(label) + COUNT_EPS)

  parts = {"fg_pos": mean(pos_nll, fg_pos), "bg_pos": mean(pos_nll, bg_pos),
           "neg": mean(neg_nll, neg)}
  loss = parts["fg_pos"] / 4 + parts["bg_pos"] / 4 + parts["neg"] / 2
  return loss, parts


def multilabel_soft_margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """torch.nn.MultiLabelSoftMarginLoss: mean over classes of sigmoid BCE, then over the batch.

  Args:
    logits: [B, C] class scores.
    labels: [B, C] multi-hot targets in {0, 1}.
  """
  if logits.shape != labels.shape or logits.ndim != 2:
    raise ValueError(f"logits and labels must both be [B, C] (got {logits.shape} and "
                     f"{labels.shape}).")
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  per_class = -(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits))
  return jnp.mean(jnp.mean(per_class, axis=-1))


def segmentation_loss(logits: jax.Array, labels: jax.Array, *,
                      ignore_index: int = IGNORE_LABEL) -> jax.Array:
  """Softmax cross-entropy averaged over the labelled pixels (0 when none is labelled).

  Args:
    logits: [B, H, W, C] class scores.
    labels: [B, H, W] integer labels; `ignore_index` and every value outside [0, C) are
      ignored (inside jit they cannot raise; check labels on the host when in doubt).
  """
  if logits.ndim != 4 or labels.shape != logits.shape[:3]:
    raise ValueError(f"logits must be [B, H, W, C] and labels [B, H, W] (got {logits.shape} "
                     f"and {labels.shape}).")
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  safe = jnp.where(keep, labels, 0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  count = jnp.sum(keep)
  return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(count, 1)


# The trainer's losses: (network output, batch) -> (loss, {name: partial loss}), what
# train.make_train_step takes; the training stages and experiments/benchmark_models.py use them.


def cam_training_loss(logits: jax.Array, batch) -> tuple[jax.Array, dict]:
  """The CAM network's: multilabel soft margin on the image-level labels batch["label"]."""
  return multilabel_soft_margin_loss(logits, batch["label"]), {}


def affinity_training_loss(radius: int, scheme: str):
  """AffinityNet's: (features [B, h, w, D], batch with "aff_label" [B, h, w]) -> (loss, its three
  parts), over the pairs within `radius` of the pair set `scheme` (geometry.py)."""
  def aff_loss(features, batch):
    features = features.astype(jnp.float32)
    aff = geometry.pair_affinities(features, radius=radius, scheme=scheme)
    pairs = geometry.pair_labels(batch["aff_label"], radius=radius, scheme=scheme)
    return affinity_loss(aff, pairs["fg_pos"], pairs["bg_pos"], pairs["neg"])
  return aff_loss


def seg_training_loss(logits: jax.Array, batch) -> tuple[jax.Array, dict]:
  """The segmentation network's: cross-entropy of the stride-8 logits upsampled (bilinear) to
  the label batch["label"] [B, H, W], 255 ignored."""
  labels = batch["label"]
  b, h, w = labels.shape
  logits = jax.image.resize(logits.astype(jnp.float32), (b, h, w, logits.shape[-1]), "bilinear")
  return segmentation_loss(logits, labels), {}
