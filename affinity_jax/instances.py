"""IRN's instance masks (Ahn, Cho & Kwak, CVPR 2019; github jiwoon-ahn/irn,
step/make_ins_seg_labels.py): the relation network's displacement field finds each object's
centre, its pixels are grouped by the centre they point to, and the walk over the boundary map
spreads each class's CAM within each group (docs/method.md §11, "Instance masks").

For one image, on its stride-4 grid (the relation network's outputs, IRN_STRIDE):
1. `centroids`: every cell moves along the displacement field, bilinearly sampled at its
   current position and clipped to the grid, `ITERATIONS` times; where it stops, rounded, is
   its centroid.
2. `clusters`: the cells where the displacement is shorter than `CLUSTER_THRESHOLD` cells
   (near a centre) form connected regions (4-neighbours); each cell belongs to the region its
   centroid fell in, or to "none" (region 0) when it fell elsewhere. The regions present, in
   order, are the image's K groups (group 0 is "none" when some centroid fell there: IRN keeps
   it as a group).
3. `instance_cams`: each class's stride-4 CAM times each group's indicator, C x K channels
   (channel c * K + k: class c within group k); the random_walk stage walks them over the
   boundary map as it walks the semantic CAMs (random_walk.boundary_walk) and takes IRN's
   scores (random_walk.boundary_walk_scores: upsampled by 4, divided by the image's maximum,
   the constant background `random_walk.instance_bg_threshold` in front).
4. `detect`: each channel's pixels where it wins the argmax, cut into connected regions
   (4-neighbours), are one instance each, of the channel's class, scored by the channel's
   largest score inside it, or 0 when it covers under `MIN_FRAGMENT` of the image.

The instances never overlap (each pixel is in at most one), so a file holds them as one map
(`artifacts.save_instances`). `average_precision` scores them as IRN does (chainercv's VOC
instance segmentation AP at an IoU threshold, IRN's 0.5). Everything here is NumPy and SciPy: the
walk is the caller's.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

# IRN's values (make_ins_seg_labels.py: find_centroids_with_refinement, cluster_centroids,
# detect_instance's max_fragment_size = 1 % of the image).
ITERATIONS = 300
CLUSTER_THRESHOLD = 2.5
MIN_FRAGMENT = 0.01
# skimage.measure.label(connectivity=1): 4-neighbours, which IRN uses for both groupings.
_FOUR_NEIGHBOURS = ndimage.generate_binary_structure(2, 1)


class Instances(NamedTuple):
  """One image's instances: `instance_map` [H, W] int32 (0 none, i + 1 instance i),
  `class_ids` [N] int32 (foreground classes, 0-based as the CAM files' class ids), `scores`
  [N] float32."""
  instance_map: np.ndarray
  class_ids: np.ndarray
  scores: np.ndarray

  def masks(self) -> np.ndarray:
    """[N, H, W] bool: instance i's pixels."""
    n = len(self.class_ids)
    return self.instance_map[None] == np.arange(1, n + 1, dtype=np.int32)[:, None, None]


def _check_displacement(displacement: np.ndarray) -> np.ndarray:
  displacement = np.asarray(displacement)
  if displacement.ndim != 3 or displacement.shape[-1] != 2 or 0 in displacement.shape:
    raise ValueError(f"displacement must be [h, w, 2] (dy, dx) on a non-empty grid (got shape "
                     f"{displacement.shape}).")
  if not np.all(np.isfinite(displacement)):
    raise ValueError("displacement must be finite.")
  return displacement.astype(np.float32)


def centroids(displacement: np.ndarray, iterations: int = ITERATIONS) -> np.ndarray:
  """Each cell's centroid: [h, w, 2] int32 (y, x) grid positions (step 1 of the docstring).

  IRN's arithmetic to the bit: positions are float32; each step is summed in float64 (NumPy
  promotes the float32 positions minus their int32 floors to float64), corner by corner in
  IRN's order, and added to the float32 positions, which keep float32. A displacement that
  overshoots its centre can make the steps chaotic, where any other rounding would end
  elsewhere.

  Args:
    displacement: [h, w, 2] float, (dy, dx) in grid cells (the relation network's displacement
      field, its mean shift subtracted).
    iterations: IRN's refinement steps (300; its comment asks for at least 100).
  """
  d = _check_displacement(displacement)
  h, w, _ = d.shape
  flat = d.reshape(h * w, 2)
  y = np.repeat(np.arange(h, dtype=np.float32)[:, None], w, axis=1).ravel()
  x = np.repeat(np.arange(w, dtype=np.float32)[None, :], h, axis=0).ravel()
  for _ in range(int(iterations)):
    y_hi, y_lo = np.ceil(y).astype(np.int32), np.floor(y).astype(np.int32)
    x_hi, x_lo = np.ceil(x).astype(np.int32), np.floor(x).astype(np.int32)
    fy, fx = (y - y_lo)[:, None], (x - x_lo)[:, None]  # float64, as in IRN
    step = (flat[y_hi * w + x_hi] * fy * fx + flat[y_lo * w + x_hi] * (1 - fy) * fx
            + flat[y_hi * w + x_lo] * fy * (1 - fx) + flat[y_lo * w + x_lo] * (1 - fy) * (1 - fx))
    y = np.clip((y + step[:, 0]).astype(np.float32), 0, h - 1)
    x = np.clip((x + step[:, 1]).astype(np.float32), 0, w - 1)
  return np.stack([np.round(y), np.round(x)], -1).astype(np.int32).reshape(h, w, 2)


def clusters(centre: np.ndarray, displacement: np.ndarray,
             threshold: float = CLUSTER_THRESHOLD) -> np.ndarray:
  """[h, w] int32 group of each cell, 0 .. K - 1 (step 2 of the docstring).

  Args:
    centre: [h, w, 2] int (y, x) of each cell's centroid (`centroids`).
    displacement: [h, w, 2] the field the centroids were found on.
    threshold: the displacement length (cells) under which a cell is near a centre.
  """
  d = _check_displacement(displacement)
  centre = np.asarray(centre)
  if centre.shape != d.shape or not np.issubdtype(centre.dtype, np.integer):
    raise ValueError(f"centre must be [h, w, 2] integer positions on the displacement's grid "
                     f"{d.shape[:2]} (got {centre.shape}, {centre.dtype}).")
  # IRN's length to the bit (float32 square root of dx^2 + dy^2; np.hypot rounds otherwise).
  near, _ = ndimage.label(np.sqrt(d[..., 1] ** 2 + d[..., 0] ** 2) < threshold,
                          structure=_FOUR_NEIGHBOURS)
  region = near[centre[..., 0], centre[..., 1]]
  _, group = np.unique(region, return_inverse=True)
  return group.reshape(region.shape).astype(np.int32)


def instance_cams(cams: np.ndarray, group: np.ndarray) -> np.ndarray:
  """[h, w, C * K] float32: channel c * K + k is class c's CAM within group k (step 3).

  Args:
    cams: [h, w, C] the image's stride-4 CAMs of its C classes.
    group: [h, w] int, 0 .. K - 1 (`clusters`).
  """
  cams = np.asarray(cams, np.float32)
  group = np.asarray(group)
  if cams.ndim != 3 or group.shape != cams.shape[:2]:
    raise ValueError(f"cams [h, w, C] and group [h, w] must share their grid (got "
                     f"{cams.shape} and {group.shape}).")
  k = int(group.max()) + 1 if group.size else 0
  onehot = group[..., None] == np.arange(k)
  return (cams[..., :, None] * onehot[..., None, :]).reshape(*cams.shape[:2], -1)


def detect(scores: np.ndarray, class_ids: Sequence[int], num_groups: int, *,
           min_fragment: float = MIN_FRAGMENT) -> Instances:
  """The instances of one image from IRN's scores of its C x K channels (step 4).

  Args:
    scores: [H, W, 1 + C * K]: the constant background, then channel c * K + k's walked
      score, divided by the image's maximum (random_walk.boundary_walk_scores).
    class_ids: [C] the classes of the C CAM channels.
    num_groups: K.
    min_fragment: an instance covering less than this share of the image scores 0.

  Returns:
    `Instances`, in IRN's order (channel, then the connected regions' raster order).
  """
  scores = np.asarray(scores, np.float32)
  class_ids = np.asarray(class_ids, np.int32)
  channels = len(class_ids) * int(num_groups)
  if scores.ndim != 3 or scores.shape[-1] != 1 + channels:
    raise ValueError(f"scores must be [H, W, 1 + C * K] = [H, W, {1 + channels}] for "
                     f"{len(class_ids)} classes in {num_groups} groups (got {scores.shape}).")
  winner = np.argmax(scores, axis=-1)
  height, width = winner.shape
  smallest = height * width * min_fragment
  instance_map = np.zeros((height, width), np.int32)
  ids, values = [], []
  for j in np.unique(winner[winner > 0]) - 1:
    regions, n = ndimage.label(winner == j + 1, structure=_FOUR_NEIGHBOURS)
    peaks = ndimage.maximum(scores[..., j + 1], regions, np.arange(1, n + 1))
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    instance_map = np.where(regions > 0, regions + len(ids), instance_map)
    ids += [class_ids[j // num_groups]] * n
    values += [0.0 if sizes[r] < smallest else float(peaks[r]) for r in range(n)]
  return Instances(instance_map, np.asarray(ids, np.int32), np.asarray(values, np.float32))


def ground_truth_instances(mask: np.ndarray, ignore: int = 255
                           ) -> tuple[np.ndarray, np.ndarray]:
  """Instances of a semantic mask: each class's connected regions (8-neighbours), for data
  whose objects never touch (the synthetic dataset keeps every object apart, an ignore band
  around each).

  Returns ([N, H, W] bool masks, [N] int32 foreground class ids, 0-based), in class order.
  """
  mask = np.asarray(mask)
  masks, ids = [], []
  for value in np.unique(mask):
    if value == 0 or value == ignore:
      continue
    regions, n = ndimage.label(mask == value, structure=np.ones((3, 3), bool))
    for r in range(1, n + 1):
      masks.append(regions == r)
      ids.append(int(value) - 1)
  return _stacked(masks, ids, mask.shape)


def _stacked(masks: list, ids: list, shape) -> tuple[np.ndarray, np.ndarray]:
  """([N, H, W] bool, [N] int32) of per-instance masks and class ids (N may be 0)."""
  return (np.stack(masks) if masks else np.zeros((0,) + tuple(shape), bool),
          np.asarray(ids, np.int32))


def objects_ground_truth(objects: np.ndarray, mask: np.ndarray, ignore: int = 255
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Instances of an object map (VOC's SegmentationObject: 0 none, k object k, `ignore`) and
  its class mask (SegmentationClass): each object's pixels, of the class its pixels hold in the
  mask (the most frequent one, the ignore value left out; an object without one is left out).
  On well-formed VOC maps (each object's pixels of one class) this is what chainercv's
  VOCInstanceSegmentationDataset gives IRN's eval_ins_seg.py; chainercv takes the smallest
  value instead, and fails on an object holding background or ignore pixels.

  Returns ([N, H, W] bool masks, [N] int32 foreground class ids, 0-based), in object order.
  """
  objects, mask = np.asarray(objects), np.asarray(mask)
  if objects.shape != mask.shape:
    raise ValueError(f"object map {objects.shape} and class mask {mask.shape} differ in size.")
  masks, ids = [], []
  for value in np.unique(objects):
    if value == 0 or value == ignore:
      continue
    region = objects == value
    classes = mask[region]
    classes = classes[(classes != ignore) & (classes != 0)]
    if not classes.size:
      continue
    masks.append(region)
    ids.append(int(np.bincount(classes).argmax()) - 1)
  return _stacked(masks, ids, mask.shape)


def average_precision(predictions: Sequence[Instances], ground_truth: Sequence[tuple],
                      num_classes: int, *, iou_threshold: float = 0.5) -> np.ndarray:
  """[num_classes] VOC average precision of instance masks at `iou_threshold` (NaN for a class
  with no ground-truth instance), as chainercv's eval_instance_segmentation_voc computes it
  (IRN's eval_ins_seg.py): per class, predictions by decreasing score, each a true positive
  when its best-overlapping ground-truth instance of the class overlaps it by at least the
  threshold and was not matched by a higher-scored prediction before; AP is the area under
  the precision envelope (not VOC 2007's 11 points).

  Args:
    predictions: each image's `Instances`.
    ground_truth: each image's ([M, H, W] bool masks, [M] class ids) (`ground_truth_instances`).
  """
  if len(predictions) != len(ground_truth):
    raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} images.")
  scores = [[] for _ in range(num_classes)]  # per class: every prediction's score ...
  matches = [[] for _ in range(num_classes)]  # ... and whether it is a true positive
  counts = np.zeros(num_classes, np.int64)
  for pred, (gt_masks, gt_ids) in zip(predictions, ground_truth):
    gt_masks, gt_ids = np.asarray(gt_masks, bool), np.asarray(gt_ids)
    masks = pred.masks()
    if len(gt_masks) and len(masks) and masks.shape[1:] != gt_masks.shape[1:]:
      raise ValueError(f"instance masks of size {masks.shape[1:]} against ground truth of "
                       f"size {gt_masks.shape[1:]}.")
    for c in range(num_classes):
      gt_c = gt_masks[gt_ids == c]
      counts[c] += len(gt_c)
      mine = np.flatnonzero(pred.class_ids == c)
      # chainercv's order: by score, ties as NumPy's default argsort reversed.
      mine = mine[np.argsort(pred.scores[mine])[::-1]]
      scores[c].extend(pred.scores[mine].tolist())
      if not len(mine):
        continue
      if not len(gt_c):
        matches[c].extend([False] * len(mine))
        continue
      pm = masks[mine].reshape(len(mine), -1).astype(np.float64)
      gm = gt_c.reshape(len(gt_c), -1).astype(np.float64)
      inter = pm @ gm.T
      iou = inter / (pm.sum(1)[:, None] + gm.sum(1)[None] - inter)
      taken = np.zeros(len(gt_c), bool)
      for row in iou:
        best = int(np.argmax(row))
        hit = bool(row[best] >= iou_threshold and not taken[best])
        taken[best] |= bool(row[best] >= iou_threshold)
        matches[c].append(hit)
  ap = np.full(num_classes, np.nan)
  for c in range(num_classes):
    if counts[c] == 0:
      continue
    order = np.argsort(np.asarray(scores[c], np.float32))[::-1]
    tp = np.cumsum(np.asarray(matches[c], bool)[order])
    fp = np.cumsum(~np.asarray(matches[c], bool)[order])
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / counts[c]
    envelope = np.concatenate([[0.0], precision, [0.0]])
    reach = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.maximum.accumulate(envelope[::-1])[::-1]
    steps = np.flatnonzero(reach[1:] != reach[:-1])
    ap[c] = float(np.sum((reach[steps + 1] - reach[steps]) * envelope[steps + 1]))
  return ap
