"""Losses of the networks: affinity (docs/method.md §5), multilabel soft margin, segmentation
cross-entropy, and IRN's inter-pixel relation loss (docs/method.md §11).

All are pure jnp functions of arrays, jit-able, returning float32 scalars.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from affinity_jax import geometry
from affinity_jax.constants import IGNORE_LABEL
from affinity_jax.relation_labels import RELATION_RADIUS

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


def relation_loss(edge_logits: jax.Array, displacement: jax.Array, relation_label: jax.Array, *,
                  radius: int = RELATION_RADIUS, scheme: str = "psa"
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """IRN's inter-pixel relation loss (net/resnet50_irn.py, weighted as step/train_irn.py).

  Pairs (p, p + o), o in geometry.forward_offsets(radius), labelled by
  geometry.pair_labels(relation_label, radius, scheme); "psa" is IRN's pair set. Their
  affinity is a = 1 - max of sigmoid(edge_logits) over the path from p to p + o
  (geometry.boundary_affinities); the displacement of the pair is d(p) - d(p + o). Sums and
  counts run over the whole batch; a part whose pair set is empty is 0.

  Parts:
    bg_pos: sum(-log(a + 1e-5)) / (count + 1e-5) over pairs of two background positions: their
      path should cross no boundary.
    fg_pos: the same over pairs of two positions of one foreground label.
    neg: sum(-log(1 + 1e-5 - a)) / (count + 1e-5) over pairs of two different labels: their
      path should cross a boundary.
    dp_fg: sum(|d(p) - d(p + o) - o|_1) / (2 count + 1e-5) over the fg_pos pairs: both ends
      point to one centroid, p + d(p) = p + o + d(p + o) (the mean over pairs and the two
      components, dy and dx).
    dp_bg: sum(|d(p) - d(p + o)|_1) / (2 count + 1e-5) over the bg_pos pairs: the background
      has no instance, its displacement field should be constant.
  Loss = (bg_pos / 2 + fg_pos / 2 + neg) / 2 + (dp_fg + dp_bg) / 2.

  Args:
    edge_logits: [B, h, w] class-boundary logits on the stride-4 grid.
    displacement: [B, h, w, 2] displacement field in grid cells, channel 0 = dy, 1 = dx.
    relation_label: [B, h, w] integer labels of the crop on that grid (relation_labels.py):
      0 = confident background, 1..254 = a foreground label, 255 = unsure.
    radius: pairs within this radius (IRN: 10; K = 152 offsets).
    scheme: the pair set, "psa" (IRN's) or "full" (geometry.py).

  Returns:
    (loss, {"bg_pos", "fg_pos", "neg", "dp_fg", "dp_bg"}) as float32 scalars.
  """
  if edge_logits.ndim != 3:
    raise ValueError(f"relation_loss: edge_logits must be [B, h, w] "
                     f"(got shape {tuple(edge_logits.shape)}).")
  grid = tuple(edge_logits.shape)
  if tuple(displacement.shape) != grid + (2,):
    raise ValueError(f"relation_loss: displacement must be [B, h, w, 2] = {list(grid + (2,))} "
                     f"on edge_logits' grid (got {list(displacement.shape)}).")
  if tuple(relation_label.shape) != grid:
    raise ValueError(f"relation_loss: relation_label must be [B, h, w] = {list(grid)} on "
                     f"edge_logits' grid (got {list(relation_label.shape)}).")
  pairs = geometry.pair_labels(relation_label, radius=radius, scheme=scheme)
  affinity = geometry.boundary_affinities(jax.nn.sigmoid(edge_logits.astype(jnp.float32)),
                                          radius=radius)
  parts = _relation_parts(affinity, displacement.astype(jnp.float32), pairs["bg_pos"],
                          pairs["fg_pos"], pairs["neg"], radius=radius)
  loss = ((parts["bg_pos"] / 2 + parts["fg_pos"] / 2 + parts["neg"]) / 2
          + (parts["dp_fg"] + parts["dp_bg"]) / 2)
  return loss, parts


def _relation_parts(affinity, displacement, bg_pos, fg_pos, neg, *, radius):
  def mean(nll, label):
    return jnp.sum(label * nll) / (jnp.sum(label) + COUNT_EPS)

  parts = {"bg_pos": mean(-jnp.log(affinity + LOG_EPS), bg_pos),
           "fg_pos": mean(-jnp.log(affinity + LOG_EPS), fg_pos),
           "neg": mean(-jnp.log(1.0 + LOG_EPS - affinity), neg)}
  # The pair displacement one component at a time, the ends gathered at once (a stack of 152
  # shifted views compiles slowly): no [B, h, w, K, 2] array is formed.
  b, h, w, _ = displacement.shape
  offsets = np.asarray(geometry.forward_offsets(radius))
  ends = _pair_end_indices(h, w, radius)
  fg_sum = bg_sum = jnp.zeros((), jnp.float32)
  for c in range(2):  # dy, then dx
    component = displacement[..., c]
    pair = component[..., None] - component.reshape(b, -1)[:, ends]  # d(p) - d(p + o)
    fg_sum += jnp.sum(fg_pos * jnp.abs(pair - offsets[:, c].astype(np.float32)))
    bg_sum += jnp.sum(bg_pos * jnp.abs(pair))
  parts["dp_fg"] = fg_sum / (2 * jnp.sum(fg_pos) + COUNT_EPS)
  parts["dp_bg"] = bg_sum / (2 * jnp.sum(bg_pos) + COUNT_EPS)
  return parts


@functools.lru_cache(maxsize=None)
def _pair_end_indices(h: int, w: int, radius: int) -> np.ndarray:
  """[h, w, K] int32 flat index (row-major over [h, w]) of p + o_k; ends outside the grid are
  clipped to its edge (those pairs carry no label)."""
  offsets = np.asarray(geometry.forward_offsets(radius))
  ys = np.clip(np.arange(h)[:, None, None] + offsets[:, 0], 0, h - 1)
  xs = np.clip(np.arange(w)[None, :, None] + offsets[:, 1], 0, w - 1)
  return (ys * w + xs).astype(np.int32)


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


def relation_training_loss(radius: int = RELATION_RADIUS, scheme: str = "psa"):
  """IRN's relation network's: ((edge_logits [B, h, w], displacement [B, h, w, 2]), batch with
  "relation_label" [B, h, w]) -> (loss, its five parts), `relation_loss` over the pairs within
  `radius` of the pair set `scheme`."""
  def rel_loss(outputs, batch):
    edge_logits, displacement = outputs
    return relation_loss(edge_logits, displacement, batch["relation_label"], radius=radius,
                         scheme=scheme)
  return rel_loss


def seg_training_loss(logits: jax.Array, batch) -> tuple[jax.Array, dict]:
  """The segmentation network's: cross-entropy of the stride-8 logits upsampled (bilinear) to
  the label batch["label"] [B, H, W], 255 ignored."""
  labels = batch["label"]
  b, h, w = labels.shape
  logits = jax.image.resize(logits.astype(jnp.float32), (b, h, w, logits.shape[-1]), "bilinear")
  return segmentation_loss(logits, labels), {}
