"""Writes a miniature VOCdevkit + SBD tree in the real layout and formats, for the tests.

Real JPEGs, palette PNGs (VOC's colour map), XML annotations (one image lists a difficult object
that its mask does not show) and SBD `cls/*.mat` files in SBD's struct layout
(`GTcls.Segmentation`, `GTcls.Boundaries`, `GTcls.CategoriesPresent`).

`make_voc_tree(root)` returns what a reader should find: the ids of each split, each image's
mask (and VOC's object map, SegmentationObject) as written and the labels from XML and from the
mask.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.io
from PIL import Image

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")

# Split membership of the miniature tree:
VOC_TRAIN = ("2007_000001", "2007_000002", "2007_000003")
VOC_VAL = ("2007_000010", "2007_000011")
# SBD lists: 2007_000002 is also in VOC train (VOC mask must win); 2007_000010 and 2007_000011
# are VOC val (excluded from train_aug); 2008_000100 has no VOC files at all (image and mask from
# SBD, no XML: label from the mask).
SBD_TRAIN = ("2007_000002", "2008_000100", "2007_000010", "2008_000101")
SBD_VAL = ("2008_000102", "2007_000011")
TRAIN_AUG = ("2007_000001", "2007_000002", "2007_000003", "2008_000100", "2008_000101",
             "2008_000102")
SBD_ONLY = ("2008_000100",)  # no JPEGImages / Annotations / SegmentationClass entry


def voc_palette() -> list[int]:
  """VOC's colour map: bit-interleaved RGB of the class index."""
  palette = []
  for i in range(256):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    palette += [r, g, b]
  return palette


def _mask(rng: np.random.Generator, height: int, width: int, classes: list[int],
          boundary: bool) -> np.ndarray:
  """Rectangles of the given classes on background; optional 255 band around each."""
  mask = np.zeros((height, width), np.uint8)
  for k, cls in enumerate(classes):
    top = 4 + 12 * k
    left = int(rng.integers(2, width // 2))
    mask[top:top + 10, left:left + 14] = cls
    if boundary:
      mask[top - 1, left:left + 14] = 255
  return mask


def _objects(mask: np.ndarray) -> np.ndarray:
  """VOC's SegmentationObject for a `_mask`: its k-th rectangle (from the top) object k + 1,
  the mask's 255 kept."""
  objects = np.where(mask == 255, 255, 0).astype(np.uint8)
  rows = np.flatnonzero(((mask > 0) & (mask < 255)).any(axis=1))
  starts = rows[np.r_[True, np.diff(rows) > 1]] if rows.size else rows
  for k, top in enumerate(starts):
    band = np.zeros_like(mask, bool)
    band[top:top + 10] = True
    objects[band & (mask > 0) & (mask < 255)] = k + 1
  return objects


def _xml(name: str, objects: list[tuple[str, bool]], height: int, width: int) -> str:
  body = "".join(
      f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>"
      f"<difficult>{int(difficult)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
      f"<xmax>5</xmax><ymax>5</ymax></bndbox></object>" for cls, difficult in objects)
  return (f"<annotation><folder>VOC2012</folder><filename>{name}.jpg</filename><size>"
          f"<width>{width}</width><height>{height}</height><depth>3</depth></size>"
          f"<segmented>1</segmented>{body}</annotation>")


def _jpeg(path: str, rng: np.random.Generator, height: int, width: int) -> None:
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, quality=90)


def _png(path: str, mask: np.ndarray) -> None:
  im = Image.fromarray(mask, mode="P")
  im.putpalette(voc_palette())
  im.save(path)


def _sbd_mat(path: str, mask: np.ndarray) -> None:
  present = np.unique(mask[(mask > 0) & (mask < 255)]).astype(np.uint8)
  boundaries = np.empty((20, 1), dtype=object)
  for i in range(20):
    boundaries[i, 0] = np.zeros(mask.shape, np.uint8)  # sparse in SBD; dense is fine for us.
  scipy.io.savemat(path, {"GTcls": {"Segmentation": mask, "Boundaries": boundaries,
                                    "CategoriesPresent": present}})


def make_voc_tree(root: str, *, with_sbd: bool = True, seed: int = 0) -> dict:
  """Writes the tree under `root`; returns {"sizes", "masks", "xml_labels", "mask_labels"}."""
  rng = np.random.default_rng(seed)
  voc = os.path.join(root, "VOCdevkit", "VOC2012")
  sbd = os.path.join(root, "benchmark_RELEASE", "dataset")
  folders = [os.path.join(voc, d) for d in ("JPEGImages", "Annotations", "SegmentationClass",
                                            "SegmentationObject",
                                            os.path.join("ImageSets", "Segmentation"))]
  if with_sbd:
    folders += [os.path.join(sbd, "img"), os.path.join(sbd, "cls")]
  for d in folders:
    os.makedirs(d, exist_ok=True)

  all_ids = sorted(set(VOC_TRAIN + VOC_VAL + (SBD_TRAIN + SBD_VAL if with_sbd else ())))
  expected = {"sizes": {}, "masks": {}, "objects": {}, "xml_labels": {}, "mask_labels": {}}
  for n, name in enumerate(all_ids):
    height, width = 40 + 4 * n, 56 - 2 * n  # Distinct sizes, so mix-ups show.
    classes = [1 + (3 * n) % 20, 1 + (3 * n + 7) % 20][: 1 + n % 2]
    in_voc = name in VOC_TRAIN + VOC_VAL or (with_sbd and name not in SBD_ONLY)
    voc_mask = _mask(rng, height, width, classes, boundary=True)
    expected["sizes"][name] = (height, width)
    mask_label = np.zeros(20, np.float32)
    mask_label[np.array(classes) - 1] = 1.0
    if in_voc:
      _jpeg(os.path.join(voc, "JPEGImages", f"{name}.jpg"), rng, height, width)
      objects = [(CLASSES[c - 1], False) for c in classes]
      if n == 1:  # A difficult object the mask does not show: only the XML label has it.
        objects.append(("pottedplant", True))
      xml_label = np.zeros(20, np.float32)
      for cls, _ in objects:
        xml_label[CLASSES.index(cls)] = 1.0
      with open(os.path.join(voc, "Annotations", f"{name}.xml"), "w") as f:
        f.write(_xml(name, objects, height, width))
      expected["xml_labels"][name] = xml_label
    if name in VOC_TRAIN + VOC_VAL:
      _png(os.path.join(voc, "SegmentationClass", f"{name}.png"), voc_mask)
      expected["masks"][name] = voc_mask
      expected["objects"][name] = _objects(voc_mask)
      _png(os.path.join(voc, "SegmentationObject", f"{name}.png"), expected["objects"][name])
    if with_sbd and name in SBD_TRAIN + SBD_VAL:
      # SBD's mask differs from VOC's (other class, no boundary), so the preferred source shows.
      sbd_mask = voc_mask.copy() if name not in VOC_TRAIN + VOC_VAL else np.zeros_like(voc_mask)
      sbd_mask[sbd_mask == 255] = 0
      if name in VOC_TRAIN + VOC_VAL:
        sbd_mask[:3, :3] = 20
      _sbd_mat(os.path.join(sbd, "cls", f"{name}.mat"), sbd_mask)
      _jpeg(os.path.join(sbd, "img", f"{name}.jpg"), rng, height, width)
      if name not in expected["masks"]:
        expected["masks"][name] = sbd_mask
      if not in_voc:
        expected["xml_labels"][name] = mask_label  # No XML: the label comes from the mask.
    expected["mask_labels"][name] = mask_label

  def write_list(path, ids):
    with open(path, "w") as f:
      f.write("".join(i + "\n" for i in ids))
  write_list(os.path.join(voc, "ImageSets", "Segmentation", "train.txt"), VOC_TRAIN)
  write_list(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), VOC_VAL)
  if with_sbd:
    write_list(os.path.join(sbd, "train.txt"), SBD_TRAIN)
    write_list(os.path.join(sbd, "val.txt"), SBD_VAL)
  return expected


def write_voc_sized(root: str, count: int, *, seed: int = 0) -> None:
  """A VOC-shaped tree (500x375 JPEGs, no SBD) for the input benchmark: `count` train images."""
  rng = np.random.default_rng(seed)
  voc = os.path.join(root, "VOCdevkit", "VOC2012")
  for d in ("JPEGImages", "Annotations", "SegmentationClass",
            os.path.join("ImageSets", "Segmentation")):
    os.makedirs(os.path.join(voc, d), exist_ok=True)
  ids = [f"2010_{i:06d}" for i in range(count)]
  yy, xx = np.mgrid[0:375, 0:500]
  for i, name in enumerate(ids):
    # Smooth image plus noise: compresses like a photograph rather than like white noise.
    base = np.stack([(xx + 37 * i) % 256, (yy * 2 + 11 * i) % 256, (xx + yy) % 256], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(voc, "JPEGImages", f"{name}.jpg"), quality=90)
    cls = 1 + i % 20
    mask = _mask(rng, 375, 500, [cls], boundary=True)
    _png(os.path.join(voc, "SegmentationClass", f"{name}.png"), mask)
    with open(os.path.join(voc, "Annotations", f"{name}.xml"), "w") as f:
      f.write(_xml(name, [(CLASSES[cls - 1], False)], 375, 500))
  for split, part in (("train", ids), ("val", ids[: max(1, count // 10)])):
    with open(os.path.join(voc, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
      f.write("".join(i + "\n" for i in part))


# ---------------------------------------------------------------------------------------------
# Hostile inputs (tests/test_hostile_inputs.py): one more image in a tree, and odd files.


def smooth_pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
  """uint8 [H, W, 3] gradients: compresses like a photograph, so 6000 x 6000 stays small."""
  y = np.arange(height, dtype=np.uint8)[:, None]  # uint8 arithmetic wraps: mod 256 for free
  x = np.arange(width, dtype=np.uint8)[None, :]
  out = np.empty((height, width, 3), np.uint8)
  out[..., 0] = x * 3 + (40 * seed) % 256
  out[..., 1] = y * 2
  out[..., 2] = x + y
  return out


def add_image(root: str, name: str, split: str, *, height: int = 40, width: int = 48,
              cls: int = 1, seed: int = 0) -> dict:
  """Adds a VOC image of one object (JPEG, palette PNG, XML) to the tree at `root`, listed in
  VOC's `split`; returns its paths {"jpeg", "png", "xml"} and its pixels and mask."""
  voc = os.path.join(root, "VOCdevkit", "VOC2012")
  paths = {"jpeg": os.path.join(voc, "JPEGImages", f"{name}.jpg"),
           "png": os.path.join(voc, "SegmentationClass", f"{name}.png"),
           "xml": os.path.join(voc, "Annotations", f"{name}.xml")}
  pixels = smooth_pixels(height, width, seed)
  Image.fromarray(pixels).save(paths["jpeg"], quality=90)
  mask = np.zeros((height, width), np.uint8)
  mask[height // 4: max(height // 2, 1), width // 4: max(width // 2, 1)] = cls
  _png(paths["png"], mask)
  with open(paths["xml"], "w") as f:
    f.write(_xml(name, [(CLASSES[cls - 1], False)], height, width))
  with open(os.path.join(voc, "ImageSets", "Segmentation", f"{split}.txt"), "a") as f:
    f.write(name + "\n")
  return {**paths, "pixels": pixels, "mask": mask}


def save_cmyk_jpeg(path: str, pixels: np.ndarray) -> None:
  """Writes RGB `pixels` as a CMYK JPEG (Adobe marker, as PIL and Photoshop write them)."""
  Image.fromarray(pixels).convert("CMYK").save(path, quality=95)


def save_palette_png(path: str, mask: np.ndarray, colours: list[int]) -> None:
  """A palette PNG of `mask` (the indices) with any palette (flat RGB list)."""
  im = Image.fromarray(mask, mode="P")
  im.putpalette(colours)
  im.save(path)
