"""Reading PASCAL VOC's and SBD's files for the `voc2012_aug` builder (data/voc.py).

JPEGs (CMYK converted to RGB, unreadable ones named), palette PNG masks (VOC's palette or
another one read by its indices), SBD's .mat masks, XML annotations; what a build converts
or leaves out is collected in `BuildNotes`. Every problem is a `UserError` naming the file.
"""

from __future__ import annotations

import io
import os
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image

from affinity_jax.constants import IGNORE_LABEL as IGNORE
from affinity_jax.constants import VOC_CLASSES
from affinity_jax.errors import UserError
from affinity_jax.pictures import palette

NUM_CLASSES = len(VOC_CLASSES)
_CMYK_QUALITY = 95  # high enough that re-encoding costs about one grey level


class Unreadable(UserError):
  """A file of one image that no decoder can read: the image is left out, not the build."""


def undecodable(what: str, path: str, e: Exception) -> Unreadable:
  """Why `path` cannot be used, in words (PIL's own text names an in-memory copy)."""
  if os.path.getsize(path) == 0:
    return Unreadable(f"{what} {path} is an empty file")
  if isinstance(e, Image.UnidentifiedImageError):
    return Unreadable(f"{what} {path} is not an image file that PIL knows")
  return Unreadable(f"{what} {path} cannot be decoded ({e})")


class BuildNotes:
  """What one build changed or left out: each kind said once, then summed up per split and kept
  in the dataset's metadata."""

  def __init__(self):
    self.changed: dict[str, list[str]] = {}  # kind -> image names

  def once(self, kind: str, name: str, message: str) -> None:
    self.changed.setdefault(kind, []).append(name)
    if len(self.changed[kind]) == 1:
      print(f"[voc2012_aug] {message}", flush=True)


def read_jpeg(path: str, name: str, notes: BuildNotes) -> tuple[bytes, tuple[int, int]]:
  """The bytes to store (the file's, or an RGB re-encoding of a CMYK file) and (H, W).

  Decodes the file once, so that an unreadable one is found here (`Unreadable`).
  """
  if not os.path.isfile(path):
    raise UserError(f"voc2012_aug: image {path} is missing")
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      mode, size, kind = im.mode, im.size, im.format
      rgb = im.convert("RGB") if mode == "CMYK" else None
  except Exception as e:  # PIL raises many types for broken files.
    raise undecodable("image", path, e) from e
  if kind != "JPEG":
    raise UserError(f"voc2012_aug: {path} is {kind}, not JPEG")
  if rgb is not None:
    # tf's decoder also reads CMYK, but the stored record should be what every reader expects.
    notes.once("cmyk_to_rgb", name, f"{path} is a CMYK JPEG: converting it, and any other "
               "CMYK JPEG of this build, to RGB (listed in the dataset's metadata)")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=_CMYK_QUALITY, subsampling=0)
    data = buf.getvalue()
  elif mode not in ("RGB", "L"):  # tfds decodes with channels=3, which expands grey.
    raise UserError(f"voc2012_aug: image {path} is {mode}, expected RGB")
  return data, (size[1], size[0])


def read_palette_png(path: str, name: str, notes: BuildNotes) -> np.ndarray:
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      colours = im.getpalette() if mode == "P" else None
      mask = np.asarray(im, dtype=np.uint8) if mode in ("P", "L") else None
  except Exception as e:
    raise undecodable("mask", path, e) from e
  if mask is None:
    raise UserError(f"voc2012_aug: {path} is a {mode} image; SegmentationClass masks must be "
                    "palette (P) PNGs whose index is the class")
  if colours is not None:
    check_palette(mask, np.asarray(colours, np.uint8).reshape(-1, 3), path, name, notes)
  check_mask_values(mask, path)
  return mask


def read_object_png(path: str) -> np.ndarray:
  """uint8 [H, W] of a SegmentationObject PNG: 0 background, k the image's k-th object, 255
  boundary / ignore (the palette index, as VOC's devkit reads it)."""
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      objects = np.asarray(im, dtype=np.uint8) if mode in ("P", "L") else None
  except Exception as e:
    raise UserError(f"voc2012_aug: {path} cannot be decoded as a PNG ({e})") from None
  if objects is None:
    raise UserError(f"voc2012_aug: {path} is a {mode} image; SegmentationObject masks must be "
                    "palette (P) PNGs whose index is the object")
  return objects


def check_palette(mask: np.ndarray, colours: np.ndarray, path: str, name: str,
                   notes: BuildNotes) -> None:
  """Indices are the classes whatever the palette, unless it holds VOC's class colours at other
  indices: then the mask was re-indexed (an RGB mask quantised, say) and its indices lie."""
  voc = palette()
  full = np.zeros_like(voc)
  full[:len(colours)] = colours[:len(voc)]
  used = mask_values(mask)
  if (full[used] == voc[used]).all():
    return
  # Index 0's black is also the filler of short palettes, so only class colours count.
  classes = {tuple(c): k for k, c in enumerate(voc) if k in range(1, NUM_CLASSES + 1)
             or k == IGNORE}
  for index in used:
    cls = classes.get(tuple(full[index]))
    if cls is not None and cls != index:
      what = "the boundary" if cls == IGNORE else f"class {cls} ({VOC_CLASSES[cls - 1]})"
      raise UserError(f"voc2012_aug: mask {path} holds index {index}, whose palette colour is "
                      f"VOC's colour of {what}: its indices are not VOC's classes (an RGB mask "
                      "converted to a palette?). Save it with index = class, as VOC's are")
  notes.once("foreign_palette", name, f"{path} has another palette than VOC's: reading its "
             "indices as the classes, as VOC's devkit does (this and any other such mask is "
             "listed in the dataset's metadata)")


def read_sbd_mat(path: str) -> np.ndarray:
  import scipy.io  # pylint: disable=g-import-not-at-top  (only SBD needs it)
  if not os.path.isfile(path):
    raise UserError(f"voc2012_aug: SBD mask {path} is missing")
  try:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    mask = np.asarray(mat["GTcls"].Segmentation)
  except Exception as e:
    raise undecodable("SBD mask (GTcls.Segmentation)", path, e) from e
  if mask.ndim != 2:
    raise UserError(f"voc2012_aug: GTcls.Segmentation in {path} has shape {mask.shape}")
  mask = mask.astype(np.int64)
  check_mask_values(mask, path)
  return mask.astype(np.uint8)


def mask_values(mask: np.ndarray) -> np.ndarray:
  """The distinct values of an integer mask, sorted (a count, not a sort: 36 Mpixel masks)."""
  if mask.dtype == np.uint8:
    return np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
  return np.unique(mask)


def check_mask_values(mask: np.ndarray, path: str) -> None:
  bad = np.setdiff1d(mask_values(mask), np.r_[np.arange(NUM_CLASSES + 1), IGNORE])
  if bad.size:
    raise UserError(f"voc2012_aug: mask {path} holds values {bad.tolist()}; expected 0..20 "
                    "or 255")


def label_from_xml(path: str) -> np.ndarray:
  try:
    tree = ET.parse(path)
  except ET.ParseError as e:
    raise undecodable("annotation", path, e) from e
  label = np.zeros(NUM_CLASSES, np.float32)
  for obj in tree.getroot().iter("object"):
    cls = (obj.findtext("name") or "").strip()
    if cls not in VOC_CLASSES:
      raise UserError(f"voc2012_aug: {path} lists an object of unknown class {cls!r}")
    label[VOC_CLASSES.index(cls)] = 1.0
  return label
