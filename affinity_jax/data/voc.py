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
  image     uint8 [H, W, 3], the JPEG bytes as stored, decoded as PIL decodes them (`VocImage`).
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

import numpy as np
import tensorflow_datasets as tfds

from affinity_jax.data import records, voc_files
from affinity_jax.data.base import LocalBuilder
from affinity_jax.data.voc_files import NUM_CLASSES, VOC_CLASSES
from affinity_jax.errors import UserError


_VOC = os.path.join("VOCdevkit", "VOC2012")
_SBD = os.path.join("benchmark_RELEASE", "dataset")

# Unreadable files a split may lose before the build calls the copy damaged and stops.
_MAX_UNREADABLE_SHARE = 0.01
_MAX_UNREADABLE_FLOOR = 10


class VocImage(tfds.features.Image):
  """tfds' JPEG image feature, decoded to the pixels PIL gives (libjpeg's accurate DCT).

  The original opens every image with PIL; tfds' own Image feature decodes with tf's fast DCT,
  which differs on most values. Every reader of the dataset that lets tfds decode (the dCRF of
  the affinity-label stage, evaluation, tests) gets the same pixels as the input pipelines,
  which decode with the same `records.decode_rgb`. Stored bytes are unchanged: a dataset
  prepared with tfds' plain Image feature reads the same.
  """

  def decode_example(self, example):
    return records.decode_rgb(example)


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
            "image": VocImage(shape=(None, None, 3), encoding_format="jpeg"),
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
    if not os.path.isdir(voc):
      raise UserError(f"voc2012_aug: {voc} is missing: data.manual_dir ({root}) must hold "
                      "VOCdevkit/VOC2012/ (and benchmark_RELEASE/ for train_aug)")
    for sub in ("JPEGImages", "Annotations", "SegmentationClass",
                os.path.join("ImageSets", "Segmentation")):
      _require_dir(os.path.join(voc, sub))
    seg_lists = os.path.join(voc, "ImageSets", "Segmentation")
    voc_train = _read_list(os.path.join(seg_lists, "train.txt"))
    voc_val = _read_list(os.path.join(seg_lists, "val.txt"))
    notes = voc_files.BuildNotes()
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
                         notes: voc_files.BuildNotes):
    labels_from = self.builder_config.labels_from
    if labels_from not in ("xml", "mask"):
      raise UserError(f"voc2012_aug: labels_from must be 'xml' or 'mask', got {labels_from!r}")
    left_out = {}
    most = max(_MAX_UNREADABLE_FLOOR, int(_MAX_UNREADABLE_SHARE * len(ids)))
    for name in ids:
      try:
        example = _example(root, name, from_sbd=name in sbd_ids, labels_from=labels_from,
                           notes=notes)
      except voc_files.Unreadable as e:
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
             notes: voc_files.BuildNotes) -> dict:
  voc = os.path.join(root, _VOC)
  sbd = os.path.join(root, _SBD)
  image_path = os.path.join(voc, "JPEGImages", f"{name}.jpg")
  if not os.path.isfile(image_path) and from_sbd:
    image_path = os.path.join(sbd, "img", f"{name}.jpg")
  image_bytes, (height, width) = voc_files.read_jpeg(image_path, name, notes)

  png_path = os.path.join(voc, "SegmentationClass", f"{name}.png")
  if os.path.isfile(png_path):
    mask = voc_files.read_palette_png(png_path, name, notes)
  elif from_sbd:
    mask = voc_files.read_sbd_mat(os.path.join(sbd, "cls", f"{name}.mat"))
  else:
    raise UserError(f"voc2012_aug: {png_path} is missing (listed in VOC's segmentation lists)")
  if mask.shape != (height, width):
    raise UserError(f"voc2012_aug: mask of {name} is {mask.shape[0]}x{mask.shape[1]} but "
                    f"{image_path} is {height}x{width}")

  xml_path = os.path.join(voc, "Annotations", f"{name}.xml")
  if labels_from == "xml" and os.path.isfile(xml_path):
    label = voc_files.label_from_xml(xml_path)
  elif labels_from == "xml" and not from_sbd:
    raise UserError(f"voc2012_aug: annotation {xml_path} is missing")
  else:
    label = label_from_mask(mask, NUM_CLASSES)
  return {"image": io.BytesIO(image_bytes), "name": name, "label": label,
          "mask": mask[..., None], "has_mask": True}


def label_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """[H, W] class indices (0 = background, 255 = ignore) -> float32 [num_classes] multi-hot."""
  present = np.unique(mask)
  present = present[(present >= 1) & (present <= num_classes)]
  label = np.zeros(num_classes, np.float32)
  label[present.astype(np.int64) - 1] = 1.0
  return label
