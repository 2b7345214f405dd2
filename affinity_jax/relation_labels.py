"""IRN's inter-pixel relation labels: confident regions from CAMs, and the pairs they label.

docs/method.md §11. IRN (github jiwoon-ahn/irn) trains its relation network on labels made from
the CAMs of the image's own classes; this file gives them for one image, in three steps:

1. `relation_labels` (step/cam_to_ir_label.py): confident foreground and background at full
   resolution. Two label maps, each the argmax over [constant threshold, CAMs] (0.30, then
   0.05) smoothed by the label dCRF (crf.crf_label_inference), are combined: the first map's
   foreground is kept, a pixel that is background in both is background (0), and a pixel that
   is background only at 0.30 is unsure (255).
2. transforms.reduce_label_tf (voc12/dataloader.py VOC12AffinityDataset), in the training
   pipeline: the label of the training crop taken to the stride-4 grid as PIL's
   nearest-neighbour resize does it, size round(H / 4).
3. `relation_pair_labels` (GetAffinityLabelFromIndices with misc/indexing.py PathIndex at
   radius 10): every pair within the radius whose ends are both confident is a positive of the
   background ("bg_pos") or of the foreground ("fg_pos") when its ends agree, a negative ("neg")
   when they differ. IRN's pairs are geometry.forward_offsets(radius) from the from positions
   of the "psa" pair set (rows 0..h-r, columns r-1..w-r), listed in another order
   (`irn_offset_order`; `to_irn_layout` gives IRN's arrays).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from affinity_jax import crf, geometry
from affinity_jax.constants import IGNORE_LABEL

# run_sample.py --conf_fg_thres / --conf_bg_thres: CAM scores (each CAM divided by its maximum)
# above which a pixel may be foreground, with the dCRF's say.
FG_THRESHOLD = 0.30
BG_THRESHOLD = 0.05
# IRN's relation network works on the stride-4 grid (constants.IRN_STRIDE), its pairs within
# radius 10 there (step/train_irn.py PathIndex(radius=10, ...)).
RELATION_RADIUS = 10


def _confident_labels(image, cams, threshold):
  """dCRF label map of argmax over [threshold, cams]: 0 = below threshold, c + 1 = channel c."""
  # The constant channel takes the CAMs' dtype, as IRN's np.pad does: a float32 CAM equal to
  # float32(0.3) ties with the threshold and the tie goes to the background.
  constant = np.full(cams.shape[:2] + (1,), threshold, cams.dtype)
  hard = np.argmax(np.concatenate([constant, cams], axis=-1), axis=-1)
  return crf.crf_label_inference(image, hard, cams.shape[-1] + 1)


def relation_labels(image: np.ndarray, cams: np.ndarray, *,
                    classes: Optional[Sequence[int]] = None,
                    fg_threshold: float = FG_THRESHOLD,
                    bg_threshold: float = BG_THRESHOLD) -> np.ndarray:
  """IRN's confident-region label of one image (its step/cam_to_ir_label.py).

  fg = dCRF(argmax [fg_threshold, cams]) and bg = dCRF(argmax [bg_threshold, cams]), with
  crf.crf_label_inference (IRN's settings). Then the label is fg; 255 where fg is background;
  0 where fg and bg are both background.

  Args:
    image: [H, W, 3] uint8 RGB image.
    cams: [H, W, C] float CAMs of the image's own classes at full resolution, each divided by its
      maximum (IRN's make_cam.py: by max + 1e-5). The threshold channel takes their dtype, as in
      IRN, which matters only for a score equal to a threshold (the tie is background). C = 0
      (no class) gives 0 everywhere: every pixel is background in both maps.
    classes: optional C distinct class indices in 0..253, those of the CAM channels (VOC: 0 =
      aeroplane ... 19 = tvmonitor, ascending as IRN lists them). Given, channel c is labelled
      classes[c] + 1, the VOC class id IRN writes to its ir_label PNGs; omitted, it is labelled
      c + 1 (pair labels only compare labels, so either gives the same pairs).
    fg_threshold: CAM score above which a pixel is foreground before the dCRF (IRN: 0.30).
    bg_threshold: CAM score at or below which a pixel is background before the dCRF (IRN: 0.05);
      at most fg_threshold.

  Returns:
    [H, W] uint8: 0 = confident background, c + 1 (or classes[c] + 1) = confident foreground of
    channel c, 255 = unsure.
  """
  image = crf.check_image(image, "relation_labels")
  cams = np.asarray(cams)
  h, w = image.shape[:2]
  if cams.ndim != 3 or cams.shape[:2] != (h, w):
    raise ValueError(f"relation_labels: cams must be [H, W, C] on the {h}x{w} image "
                     f"(got shape {cams.shape}).")
  if not np.issubdtype(cams.dtype, np.floating):
    raise ValueError(f"relation_labels: cams must be floating point (got dtype {cams.dtype}).")
  if not np.all(np.isfinite(cams)):
    raise ValueError("relation_labels: cams must be finite.")
  for name, value in (("fg_threshold", fg_threshold), ("bg_threshold", bg_threshold)):
    if not np.isfinite(value):
      raise ValueError(f"relation_labels: {name} must be finite (got {value!r}).")
  if bg_threshold > fg_threshold:
    raise ValueError(f"relation_labels: bg_threshold ({bg_threshold}) must not exceed "
                     f"fg_threshold ({fg_threshold}).")
  num_classes = cams.shape[-1]
  if classes is None:
    keys = np.arange(num_classes + 1)
  else:
    classes = np.asarray(classes)
    if classes.shape != (num_classes,) or (
        classes.size and not np.issubdtype(classes.dtype, np.integer)):
      raise ValueError(f"relation_labels: classes must be {num_classes} integers, one per CAM "
                       f"channel (got {classes.tolist()!r}).")
    if np.any(classes < 0) or np.any(classes > IGNORE_LABEL - 2):
      raise ValueError(f"relation_labels: classes must lie in 0..{IGNORE_LABEL - 2} "
                       f"(got {classes.tolist()!r}).")
    if len(np.unique(classes)) != num_classes:
      raise ValueError(f"relation_labels: classes must be distinct (got {classes.tolist()!r}).")
    keys = np.concatenate([[0], classes.astype(np.int64) + 1])

  fg = keys[_confident_labels(image, cams, fg_threshold)]
  bg = keys[_confident_labels(image, cams, bg_threshold)]
  label = np.where(fg == 0, IGNORE_LABEL, fg)
  label[(fg == 0) & (bg == 0)] = 0
  return label.astype(np.uint8)


def relation_pair_labels(reduced_label: np.ndarray, radius: int = RELATION_RADIUS, *,
                         scheme: str = "psa") -> dict[str, np.ndarray]:
  """IRN's pair labels for training the relation network (GetAffinityLabelFromIndices).

  A pair (p, p + o_k), o_k the k-th of geometry.forward_offsets(radius), is labelled when both
  ends are confident: "bg_pos" if both are 0, "fg_pos" if both carry the same foreground label,
  "neg" if the labels differ. IRN calls a label confident when it is < 21 (VOC's 0..20), here
  when it is not 255: the same on VOC labels and on channel labels (relation_labels).

  Args:
    reduced_label: [h, w] integer labels on the stride-4 grid (transforms.reduce_label_tf);
      255 = unsure.
    radius: pairs within this radius (IRN: 10).
    scheme: "psa" is IRN's pair set: from positions rows 0..h-r and columns r-1..w-r (its
      PathIndex crop, r' = ceil(radius) - 1 = r - 1 cells below and on either side), so every
      pair stays inside the grid (none on a grid under r x (2r - 1)); "full" adds the pairs
      from the border band whose end lies inside the grid (geometry.pair_mask).

  Returns:
    {"bg_pos", "fg_pos", "neg"}: each [h, w, K] float32 in {0, 1}, K = len(forward_offsets),
    entry [y, x, k] for the pair ((y, x), (y, x) + o_k); 0 in all three for pairs outside the
    scheme. `to_irn_layout` orders them as IRN's arrays.
  """
  reduced_label = np.asarray(reduced_label)
  if reduced_label.ndim != 2:
    raise ValueError(f"relation_pair_labels: reduced_label must be [h, w] "
                     f"(got shape {reduced_label.shape}).")
  if not np.issubdtype(reduced_label.dtype, np.integer):
    raise ValueError(f"relation_pair_labels: reduced_label must be integers "
                     f"(got dtype {reduced_label.dtype}).")
  if reduced_label.size and (reduced_label.min() < 0 or reduced_label.max() > 255):
    raise ValueError(f"relation_pair_labels: reduced_label values must lie in 0..255 "
                     f"(got {reduced_label.min()}..{reduced_label.max()}).")
  pairs = geometry.pair_labels(reduced_label[None].astype(np.int32), radius=radius,
                               scheme=scheme)
  return {name: np.asarray(pairs[name][0]) for name in ("bg_pos", "fg_pos", "neg")}


def irn_offset_order(radius: int = RELATION_RADIUS) -> tuple[int, ...]:
  """IRN's order of the forward offsets, as indices into geometry.forward_offsets(radius).

  PathIndex enumerates the same offsets in the same order, then groups them by the number of
  cells on their path (geometry.path_offsets), shortest first, keeping that order within a
  group: its search_dst / dst_indices follow this order.
  """
  lengths = [len(path) for path in geometry.path_offsets(radius)]
  return tuple(sorted(range(len(lengths)), key=lambda k: lengths[k]))


def to_irn_layout(per_offset: np.ndarray, radius: int = RELATION_RADIUS) -> np.ndarray:
  """[h, w, K] per-offset pair values -> [K, N] in IRN's layout.

  Row j belongs to offset irn_offset_order(radius)[j]; column n to the n-th from position of
  the "psa" pair set in row-major order (N = (h - r + 1)(w - 2r + 2)): the layout of the labels
  GetAffinityLabelFromIndices returns with PathIndex's src_indices / dst_indices.
  """
  per_offset = np.asarray(per_offset)
  k = len(geometry.forward_offsets(radius))
  if per_offset.ndim != 3 or per_offset.shape[-1] != k:
    raise ValueError(f"to_irn_layout: per_offset must be [h, w, {k}] at radius {radius} "
                     f"(got shape {per_offset.shape}).")
  h, w, _ = per_offset.shape
  if h < radius or w < 2 * radius - 1:
    raise ValueError(f"to_irn_layout: IRN's pair set needs h >= {radius} and "
                     f"w >= {2 * radius - 1} at radius {radius} (got {h}x{w}).")
  reordered = per_offset[None][..., np.asarray(irn_offset_order(radius))]
  return np.asarray(geometry.to_psa_vector(reordered, radius)).reshape(k, -1)
