"""PASCAL VOC 2012 with the SBD augmentation, as the tfds dataset `voc2012_aug`.

No machine of this project can download VOC, so the builder reads a local copy through tfds'
manual-download mechanism. `manual_dir` holds

  VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  VOCdevkit/VOC2012/Annotations/<id>.xml
  VOCdevkit/VOC2012/SegmentationClass/<id>.png      (palette PNG: the palette index is the class)
  VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
  benchmark_RELEASE/dataset/{img/<id>.jpg, cls/<id>.mat, train.txt, val.txt}   (SBD, optional)

Splits:
  train      VOC's segmentation train list (1,464 images on the real data).
  val        VOC's segmentation val list (1,449).
  train_aug  VOC train + SBD train + SBD val, minus VOC val (10,582). Only built when SBD is
             present; without it, asking for `train_aug` fails with tfds' unknown-split error.

Features (the same as `synthetic_wsss`, so the rest of the code treats both alike):
  image     uint8 [H, W, 3], the JPEG bytes as stored.
  name      the VOC id, e.g. "2007_000032".
  label     float32 [20] multi-hot image-level label, class order of `VOC_CLASSES`.
  mask      uint8 [H, W, 1]: class index 0..20, 255 = boundary / ignore.
  has_mask  bool; an image with no mask gets an all-255 mask.

Image-level labels (config `xml_labels`, the default) come from the XML annotations as the
original does: every listed object counts, objects marked difficult included. An image without
XML (possible for SBD-only ids) takes its label from its mask. Config `mask_labels` derives every
label from the mask instead (the classes present in it, boundary excluded).

Masks: VOC's SegmentationClass PNG when there is one, else SBD's `GTcls.Segmentation` from
`cls/<id>.mat`. Images come from VOC's JPEGImages, else from SBD's img folder.

Bad files. A missing folder, a file named in a list but missing, or a file that decodes but
does not hold what VOC's format says (a mask of RGB colours or with values outside 0..20 and
255, a mask that another tool re-indexed, an XML object of unknown class) stops the build with
an error naming the file. A file that no decoder can read (a truncated or empty JPEG, PNG, XML
or .mat) costs only its image: the image is left out of the split, with a line naming the file,
a summary per split and the list in the dataset's metadata (`left_out`); the build still stops
when more than 1% of a split (and more than 10 images) is unreadable, since that is a damaged
copy. CMYK JPEGs are converted to RGB (as PIL's `convert("RGB")` does) and re-encoded at
quality 95; masks with another palette than VOC's are read by their indices, as VOC's devkit
reads them. Each of the two is said once per build and listed in the metadata.
"""

from __future__ import annotations

import dataclasses
import io
import os
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from affinity_jax.constants import IGNORE_LABEL as IGNORE
from affinity_jax.data.base import LocalBuilder
from affinity_jax.errors import UserError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")
NUM_CLASSES = len(VOC_CLASSES)

_VOC = os.path.join("VOCdevkit", "VOC2012")
_SBD = os.path.join("benchmark_RELEASE", "dataset")

# Unreadable files a split may lose before the build calls the copy damaged and stops.
_MAX_UNREADABLE_SHARE = 0.01
_MAX_UNREADABLE_FLOOR = 10
_CMYK_QUALITY = 95  # high enough that re-encoding costs about one grey level


def palette(n: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map: [n, 3] uint8, bit-interleaved RGB of the index (255 -> the
  boundary colour)."""
  pal = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  return pal


class _Unreadable(UserError):
  """A file of one image that no decoder can read: the image is left out, not the build."""


def _undecodable(what: str, path: str, e: Exception) -> _Unreadable:
  """Why `path` cannot be used, in words (PIL's own text names an in-memory copy)."""
  if os.path.getsize(path) == 0:
    return _Unreadable(f"{what} {path} is an empty file")
  if isinstance(e, Image.UnidentifiedImageError):
    return _Unreadable(f"{what} {path} is not an image file that PIL knows")
  return _Unreadable(f"{what} {path} cannot be decoded ({e})")


class _BuildNotes:
  """What one build changed or left out: each kind said once, then summed up per split and kept
  in the dataset's metadata."""

  def __init__(self):
    self.changed: dict[str, list[str]] = {}  # kind -> image names

  def once(self, kind: str, name: str, message: str) -> None:
    self.changed.setdefault(kind, []).append(name)
    if len(self.changed[kind]) == 1:
      print(f"[voc2012_aug] {message}", flush=True)


@dataclasses.dataclass(eq=False)
class VocConfig(tfds.core.BuilderConfig):
  """labels_from: "xml" (the original's rule) or "mask"."""
  labels_from: str = "xml"


class Voc2012Aug(LocalBuilder):
  """PASCAL VOC 2012 segmentation splits plus SBD's train_aug, read from a local copy."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      VocConfig(name="xml_labels", labels_from="xml",
                description="Image labels from the XML annotations (difficult included)."),
      VocConfig(name="mask_labels", labels_from="mask",
                description="Image labels from the segmentation masks."),
  ]
  DEFAULT_CONFIG_NAME = "xml_labels"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put (or symlink) a local copy of PASCAL VOC 2012 and, optionally, SBD in `manual_dir`:
    manual_dir/VOCdevkit/VOC2012/{JPEGImages,Annotations,SegmentationClass,ImageSets/Segmentation}
    manual_dir/benchmark_RELEASE/dataset/{img,cls,train.txt,val.txt}
  VOC: http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar
  SBD: http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz
  Without SBD only the `train` and `val` splits are built.
  """

  class_names = VOC_CLASSES

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "name": tfds.features.Text(),
            "label": tfds.features.Tensor(shape=(NUM_CLASSES,), dtype=np.float32),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "has_mask": tfds.features.Tensor(shape=(), dtype=np.bool_),
        }),
        metadata=tfds.core.MetadataDict(class_names=list(VOC_CLASSES)),
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    voc = os.path.join(root, _VOC)
    for sub in ("JPEGImages", "Annotations", "SegmentationClass",
                os.path.join("ImageSets", "Segmentation")):
      _require_dir(os.path.join(voc, sub))
    seg_lists = os.path.join(voc, "ImageSets", "Segmentation")
    voc_train = _read_list(os.path.join(seg_lists, "train.txt"))
    voc_val = _read_list(os.path.join(seg_lists, "val.txt"))
    notes = _BuildNotes()
    splits = {
        "train": self._generate_examples(root, voc_train, sbd_ids=frozenset(), split="train",
                                         notes=notes),
        "val": self._generate_examples(root, voc_val, sbd_ids=frozenset(), split="val",
                                       notes=notes),
    }
    sbd = os.path.join(root, _SBD)
    if os.path.isdir(os.path.join(root, "benchmark_RELEASE")):
      for sub in ("img", "cls"):
        _require_dir(os.path.join(sbd, sub))
      sbd_ids = (_read_list(os.path.join(sbd, "train.txt"))
                 + _read_list(os.path.join(sbd, "val.txt")))
      val_set = set(voc_val)
      train_aug = list(dict.fromkeys(i for i in voc_train + sbd_ids if i not in val_set))
      splits["train_aug"] = self._generate_examples(root, train_aug, sbd_ids=frozenset(sbd_ids),
                                                    split="train_aug", notes=notes)
    return splits

  def _generate_examples(self, root: str, ids: list[str], sbd_ids: frozenset[str], split: str,
                         notes: _BuildNotes):
    labels_from = self.builder_config.labels_from
    if labels_from not in ("xml", "mask"):
      raise UserError(f"voc2012_aug: labels_from must be 'xml' or 'mask', got {labels_from!r}")
    left_out = {}
    most = max(_MAX_UNREADABLE_FLOOR, int(_MAX_UNREADABLE_SHARE * len(ids)))
    for name in ids:
      try:
        example = _example(root, name, from_sbd=name in sbd_ids, labels_from=labels_from,
                           notes=notes)
      except _Unreadable as e:
        left_out[name] = str(e)
        print(f"[voc2012_aug] {split}: leaving out {name}: {e}", flush=True)
        if len(left_out) > most:
          raise UserError(f"voc2012_aug: more than {most} files of split {split} cannot be "
                          f"decoded (the latest: {e}); this copy of VOC looks damaged, fetch it "
                          "again") from None
        continue
      yield name, example
    if ids and len(left_out) == len(ids):
      raise UserError(f"voc2012_aug: no image of split {split} can be read, e.g. "
                      f"{next(iter(left_out.values()))}")
    # On record with the prepared dataset: later runs read it, not this build's output.
    metadata = self.info.metadata
    if left_out:
      metadata.setdefault("left_out", {})[split] = left_out
      print(f"[voc2012_aug] {split}: left out {len(left_out)} of {len(ids)} images whose files "
            f"cannot be decoded: {', '.join(left_out)}", flush=True)
    for kind, names in notes.changed.items():
      metadata[kind] = sorted(set(names))


def _require_dir(path: str) -> None:
  if not os.path.isdir(path):
    raise UserError(f"voc2012_aug: folder {path} is missing; see the builder's "
                    "MANUAL_DOWNLOAD_INSTRUCTIONS for the expected layout")


def _read_list(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise UserError(f"voc2012_aug: image list {path} is missing")
  try:
    with open(path) as f:
      # SBD lists and VOC lists are one id per line; tolerate trailing fields and blank lines.
      ids = [line.split()[0] for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise UserError(f"voc2012_aug: image list {path} is not text ({e})") from None
  if not ids:
    raise UserError(f"voc2012_aug: image list {path} is empty")
  return ids


def _example(root: str, name: str, *, from_sbd: bool, labels_from: str,
             notes: _BuildNotes) -> dict:
  voc = os.path.join(root, _VOC)
  sbd = os.path.join(root, _SBD)
  image_path = os.path.join(voc, "JPEGImages", f"{name}.jpg")
  if not os.path.isfile(image_path) and from_sbd:
    image_path = os.path.join(sbd, "img", f"{name}.jpg")
  image_bytes, (height, width) = _read_jpeg(image_path, name, notes)

  png_path = os.path.join(voc, "SegmentationClass", f"{name}.png")
  if os.path.isfile(png_path):
    mask = _read_palette_png(png_path, name, notes)
  elif from_sbd:
    mask = _read_sbd_mat(os.path.join(sbd, "cls", f"{name}.mat"))
  else:
    raise UserError(f"voc2012_aug: {png_path} is missing (listed in VOC's segmentation lists)")
  if mask.shape != (height, width):
    raise UserError(f"voc2012_aug: mask of {name} is {mask.shape[0]}x{mask.shape[1]} but "
                    f"{image_path} is {height}x{width}")

  xml_path = os.path.join(voc, "Annotations", f"{name}.xml")
  if labels_from == "xml" and os.path.isfile(xml_path):
    label = _label_from_xml(xml_path)
  elif labels_from == "xml" and not from_sbd:
    raise UserError(f"voc2012_aug: annotation {xml_path} is missing")
  else:
    label = label_from_mask(mask, NUM_CLASSES)
  return {"image": io.BytesIO(image_bytes), "name": name, "label": label,
          "mask": mask[..., None], "has_mask": True}


def _read_jpeg(path: str, name: str, notes: _BuildNotes) -> tuple[bytes, tuple[int, int]]:
  """The bytes to store (the file's, or an RGB re-encoding of a CMYK file) and (H, W).

  Decodes the file once, so that an unreadable one is found here (`_Unreadable`).
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
    raise _undecodable("image", path, e) from e
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


def _read_palette_png(path: str, name: str, notes: _BuildNotes) -> np.ndarray:
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      colours = im.getpalette() if mode == "P" else None
      mask = np.asarray(im, dtype=np.uint8) if mode in ("P", "L") else None
  except Exception as e:
    raise _undecodable("mask", path, e) from e
  if mask is None:
    raise UserError(f"voc2012_aug: {path} is a {mode} image; SegmentationClass masks must be "
                    "palette (P) PNGs whose index is the class")
  if colours is not None:
    _check_palette(mask, np.asarray(colours, np.uint8).reshape(-1, 3), path, name, notes)
  _check_mask_values(mask, path)
  return mask


def _check_palette(mask: np.ndarray, colours: np.ndarray, path: str, name: str,
                   notes: _BuildNotes) -> None:
  """Indices are the classes whatever the palette, unless it holds VOC's class colours at other
  indices: then the mask was re-indexed (an RGB mask quantised, say) and its indices lie."""
  voc = palette()
  full = np.zeros_like(voc)
  full[:len(colours)] = colours[:len(voc)]
  used = _values(mask)
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


def _read_sbd_mat(path: str) -> np.ndarray:
  import scipy.io  # pylint: disable=g-import-not-at-top  (only SBD needs it)
  if not os.path.isfile(path):
    raise UserError(f"voc2012_aug: SBD mask {path} is missing")
  try:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    mask = np.asarray(mat["GTcls"].Segmentation)
  except Exception as e:
    raise _undecodable("SBD mask (GTcls.Segmentation)", path, e) from e
  if mask.ndim != 2:
    raise UserError(f"voc2012_aug: GTcls.Segmentation in {path} has shape {mask.shape}")
  mask = mask.astype(np.int64)
  _check_mask_values(mask, path)
  return mask.astype(np.uint8)


def _values(mask: np.ndarray) -> np.ndarray:
  """The distinct values of an integer mask, sorted (a count, not a sort: 36 Mpixel masks)."""
  if mask.dtype == np.uint8:
    return np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
  return np.unique(mask)


def _check_mask_values(mask: np.ndarray, path: str) -> None:
  bad = np.setdiff1d(_values(mask), np.r_[np.arange(NUM_CLASSES + 1), IGNORE])
  if bad.size:
    raise UserError(f"voc2012_aug: mask {path} holds values {bad.tolist()}; expected 0..20 "
                    "or 255")


def _label_from_xml(path: str) -> np.ndarray:
  try:
    tree = ET.parse(path)
  except ET.ParseError as e:
    raise _undecodable("annotation", path, e) from e
  label = np.zeros(NUM_CLASSES, np.float32)
  for obj in tree.getroot().iter("object"):
    cls = (obj.findtext("name") or "").strip()
    if cls not in VOC_CLASSES:
      raise UserError(f"voc2012_aug: {path} lists an object of unknown class {cls!r}")
    label[VOC_CLASSES.index(cls)] = 1.0
  return label


def label_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """[H, W] class indices (0 = background, 255 = ignore) -> float32 [num_classes] multi-hot."""
  present = np.unique(mask)
  present = present[(present >= 1) & (present <= num_classes)]
  label = np.zeros(num_classes, np.float32)
  label[present.astype(np.int64) - 1] = 1.0
  return label
