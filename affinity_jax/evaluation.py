"""Scoring label maps against ground truth: the one home of "how good are these masks".

The pipeline's evaluate stage (stages/evaluate.py) and `affinity-jax evaluate` (any folder of
label PNGs against a folder of masks or a dataset split) both score through `Scores`, so the
two give the same mIoU for the same files. JAX-free; TensorFlow only to read a dataset split.

Conventions (docs/method.md §9; the arithmetic is metrics.py's):
- A label map is a PNG whose pixel values are class indices. Palette PNGs ('P', VOC's
  SegmentationClass style: the index is the class, the palette's colours are not looked at)
  and greyscale ones ('L', what the stages write; 16-bit too) read alike. Colour (RGB) masks
  are refused: their colours are not indices.
- Ground truth 255 is ignored, whatever is predicted there.
- A prediction of 255 means "no class" (the method abstained): the pixel is a miss of its
  ground-truth class (a false negative, and a false positive of no class), counted apart as
  `unlabelled`. Ignoring it instead would let a method raise its score by abstaining.
- Any other value outside 0..C-1, in either file, is an error naming the file and the value;
  so are maps of different sizes, and images without a prediction or predictions without
  ground truth (unless `partial`: then only the images that have both are scored).
- IoU_c = TP / (TP + FP + FN) over the confusion accumulated over all images; mIoU is the mean
  over the classes present in the ground truth or the predictions.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from affinity_jax import charts, io, metrics
from affinity_jax.constants import IGNORE_LABEL, VOC_CLASSES
from affinity_jax.errors import UserError

BACKGROUND = "background"
# Names of the label values 0..20 of VOC's masks: `affinity-jax evaluate --gt DIR`'s default.
VOC_LABELS = (BACKGROUND,) + VOC_CLASSES
_SHOWN = 5  # names shown in a message about many files


class SizeMismatch(UserError):
  """A prediction whose size is not its ground truth's."""


class LabelOutOfRange(UserError):
  """A label map holding a value that is neither a class nor 255."""


def labels_with_background(foreground: Sequence[str]) -> tuple[str, ...]:
  """Names of the label values 0..C: the background, then a dataset's classes in order."""
  return (BACKGROUND,) + tuple(foreground)


def read_label_map(path: str) -> np.ndarray:
  """Integer class indices [H, W] of a palette ('P') or greyscale ('L', 'I;16', '1') PNG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      label = np.asarray(im) if mode in ("P", "L", "1") or mode.startswith("I") else None
  except FileNotFoundError:
    raise UserError(f"{path} is missing") from None
  except Exception as e:  # PIL raises many types for broken files.
    raise UserError(f"{path}: not a readable image ({e})") from None
  if label is None or label.ndim != 2:
    raise UserError(f"{path}: a {mode} image; a label map is a palette (P) or greyscale (L) PNG "
                    "whose pixel values are the class indices (convert colour-coded masks to "
                    "indices first)")
  return label.astype(np.uint8) if label.dtype == bool else label


def _size(a: np.ndarray) -> str:
  return "x".join(str(d) for d in a.shape)


def _values(a: np.ndarray) -> np.ndarray:
  """The distinct values of an integer array (a count, not a sort, for 8-bit maps)."""
  if a.dtype in (np.uint8, bool):
    return np.flatnonzero(np.bincount(a.reshape(-1).astype(np.uint8), minlength=256))
  return np.unique(a)


def _some(names: Sequence[str]) -> str:
  shown = ", ".join(names[:_SHOWN])
  return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


class Scores:
  """The confusion of label maps against their ground truth, accumulated image by image.

  `confusion` int64 [C, C] (rows ground truth, columns prediction) and `unlabelled` int64 [C]
  (ground-truth pixels of each class predicted 255), over `images` images.
  """

  def __init__(self, class_names: Sequence[str]):
    n = len(class_names)
    if not 1 <= n <= IGNORE_LABEL:
      raise UserError(f"{n} classes: scoring needs 1 to {IGNORE_LABEL} (label {IGNORE_LABEL} is "
                      "the ignore label)")
    self.class_names = tuple(class_names)
    self.confusion = np.zeros((n, n), np.int64)
    self.unlabelled = np.zeros(n, np.int64)
    self.images = 0

  def add(self, ground_truth: np.ndarray, prediction: np.ndarray, *, prediction_file: str,
          ground_truth_file: str) -> None:
    """Adds one image: two integer label maps of one shape. The files (or descriptions) are
    named in the errors: `SizeMismatch`, `LabelOutOfRange`."""
    gt, pred = np.asarray(ground_truth), np.asarray(prediction)
    if gt.shape != pred.shape:
      raise SizeMismatch(f"{prediction_file}: prediction is {_size(pred)}, ground truth "
                         f"{_size(gt)} ({ground_truth_file})")
    n = len(self.class_names)
    for what, where, arr in (("ground truth", ground_truth_file, gt),
                             ("prediction", prediction_file, pred)):
      if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"{where}: {what} must hold integer labels, got {arr.dtype}")
      values = _values(arr)
      bad = values[((values < 0) | (values >= n)) & (values != IGNORE_LABEL)]
      if bad.size:
        raise LabelOutOfRange(
            f"{where}: {what} holds label {', '.join(str(v) for v in bad[:10])}, neither a "
            f"class (0..{n - 1}: {self.class_names[0]} .. {self.class_names[-1]}) nor "
            f"{IGNORE_LABEL}")
    none = pred == IGNORE_LABEL
    if none.any():
      missed = gt[none & (gt != IGNORE_LABEL)].astype(np.int64)
      self.unlabelled += np.bincount(missed, minlength=n)
      gt = np.where(none, IGNORE_LABEL, gt)  # out of the confusion: counted above
    self.confusion += metrics.confusion_matrix(gt, pred, n)
    self.images += 1

  def iou(self) -> np.ndarray:
    """float64 [C]; NaN for a class absent from both ground truth and predictions."""
    return metrics.iou_from_confusion(self.confusion, self.unlabelled)

  def miou(self) -> float:
    return metrics.mean_iou(self.confusion, self.unlabelled)

  def pixel_accuracy(self) -> float:
    scored = self.confusion.sum() + self.unlabelled.sum()
    return float(np.trace(self.confusion) / scored) if scored else float("nan")

  def to_json(self) -> dict:
    """Everything about the scores as JSON values (an IoU that does not exist is null)."""
    def num(x):
      return None if np.isnan(x) else float(x)
    gt_pixels = self.confusion.sum(1) + self.unlabelled
    predicted = self.confusion.sum(0)
    return {
        "miou": num(self.miou()), "pixel_accuracy": num(self.pixel_accuracy()),
        "images": self.images, "ignore_label": IGNORE_LABEL,
        "classes": [{"label": c, "name": name, "iou": num(iou),
                     "ground_truth_pixels": int(gt_pixels[c]),
                     "predicted_pixels": int(predicted[c]),
                     "unlabelled_pixels": int(self.unlabelled[c])}
                    for c, (name, iou) in enumerate(zip(self.class_names, self.iou()))],
        "confusion": self.confusion.tolist(),
    }

  def table(self) -> str:
    """The per-class table (markdown), mIoU last; "n/a" for a class absent from both sides."""
    gt_pixels = self.confusion.sum(1) + self.unlabelled
    predicted = self.confusion.sum(0)
    lines = ["| label | class | IoU (%) | ground-truth pixels | predicted pixels |",
             "|---:|---|---:|---:|---:|"]
    for c, (name, iou) in enumerate(zip(self.class_names, self.iou())):
      shown = "n/a" if np.isnan(iou) else f"{100 * iou:.1f}"
      lines.append(f"| {c} | {name} | {shown} | {gt_pixels[c]:,} | {predicted[c]:,} |")
    lines.append(f"| | mIoU | {100 * self.miou():.1f} | {gt_pixels.sum():,} | "
                 f"{predicted.sum():,} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Ground truth: a folder of PNGs, or a split of one of our tfds datasets.


@dataclasses.dataclass
class GroundTruth:
  """Masks to score against: their image names and how to read those wanted."""
  description: str   # for messages: the folder, or the dataset and split
  names: list[str]
  # read(wanted) -> (name, mask [H, W], what to call it in messages) for each wanted name.
  read: Callable[[frozenset], Iterator[tuple[str, np.ndarray, str]]]


def png_names(folder: str, what: str) -> dict[str, str]:
  """{name: path} of the PNGs in `folder` (hidden files, e.g. temporaries, left out)."""
  if not os.path.isdir(folder):
    raise UserError(f"{what} folder {folder} does not exist" if not os.path.exists(folder)
                    else f"{what} {folder} is not a folder")
  found = {f[:-4]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
           if f.lower().endswith(".png") and not f.startswith(".")}
  if not found:
    raise UserError(f"{what} folder {folder} holds no PNG file")
  return found


def folder_ground_truth(folder: str) -> GroundTruth:
  paths = png_names(folder, "ground-truth")

  def read(wanted):
    for name in sorted(wanted):
      yield name, read_label_map(paths[name]), paths[name]
  return GroundTruth(folder, sorted(paths), read)


def dataset_ground_truth(builder, split: str) -> GroundTruth:
  """The masks of `split` of a prepared tfds builder (images without a mask left out)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if split.split("[")[0] not in builder.info.splits:
    raise UserError(f"dataset {builder.info.full_name} has no split {split!r}; it has "
                    f"{', '.join(sorted(builder.info.splits))}")
  description = f"dataset {builder.info.full_name} (in {builder.data_dir}), split {split}"

  def examples(mask_decoding):
    decoders = {"image": tfds.decode.SkipDecoding()}
    if not mask_decoding:
      decoders["mask"] = tfds.decode.SkipDecoding()
    return tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False,
                                            decoders=decoders))

  names = [ex["name"].decode() for ex in examples(False) if ex["has_mask"]]

  def read(wanted):
    for ex in examples(True):
      name = ex["name"].decode()
      if name in wanted:
        yield name, ex["mask"][..., 0], f"{name} of {builder.info.full_name} {split}"
  return GroundTruth(description, names, read)


def dataset_class_names(builder) -> tuple[str, ...]:
  """Names of the label values of a dataset's masks: background, then its classes (from the
  builder, or from the metadata of a dataset read back from its folder)."""
  names = getattr(builder, "class_names", None)
  if names is None:
    names = (builder.info.metadata or {}).get("class_names")
  if not names:
    raise UserError(f"dataset {builder.info.full_name} names no classes (metadata "
                    "class_names); give a ground-truth folder with --class-names instead")
  return labels_with_background(names)


def find_dataset(name: str, data_dir: str | None = None, config: str | None = None,
                 manual_dir: str | None = None, predictions: str | None = None):
  """The tfds builder of dataset `name` whose masks to score against.

  A config prepared in `data_dir` (default: tfds') is read as it is; with `config` that one,
  else the only one prepared, else the one that the pipeline run holding `predictions` (a
  workdir's output folder) was made from. With none prepared, `config` (or the dataset's
  default) is built, from `manual_dir` for VOC.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from affinity_jax import data, fingerprints  # pylint: disable=g-import-not-at-top
  root = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
  prepared = _prepared_configs(root, name)
  if config in prepared:
    return tfds.builder_from_directory(prepared[config])
  if config or not prepared:
    return data.get_builder(name, root, config=config, manual_dir=manual_dir or None)
  if len(prepared) == 1:
    return tfds.builder_from_directory(next(iter(prepared.values())))
  wanted = _run_dataset(predictions)
  for path in prepared.values() if wanted is not None else ():
    builder = tfds.builder_from_directory(path)
    if fingerprints.dataset_digest(builder.info) == wanted:
      return builder
  raise UserError(f"{len(prepared)} configs of dataset {name} are prepared in {root} "
                  f"({', '.join(sorted(prepared))}); choose one with --dataset-config, or give "
                  "the run's config with --config")


def _prepared_configs(root: str, name: str) -> dict[str, str]:
  """{config: folder of its newest prepared version} of dataset `name` under `root`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  found = {}
  for info in glob.glob(os.path.join(glob.escape(root), name, "*", "*", "dataset_info.json")):
    folder = os.path.dirname(info)
    config = os.path.basename(os.path.dirname(folder))
    try:
      version = tfds.core.Version(os.path.basename(folder))
    except ValueError:
      continue
    if config not in found or version > found[config][0]:
      found[config] = (version, folder)
  return {c: folder for c, (_, folder) in found.items()}


def _run_dataset(predictions: str | None) -> str | None:
  """The dataset digest that the pipeline run owning the folder `predictions` recorded."""
  if not predictions:
    return None
  from affinity_jax import artifacts  # pylint: disable=g-import-not-at-top
  records = glob.glob(os.path.join(glob.escape(os.path.dirname(os.path.abspath(predictions))),
                                   artifacts.FINGERPRINTS, "*.json"))
  seen = set()
  for path in records:
    try:
      with open(path) as f:
        seen.add(json.load(f)["inputs"]["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
      continue
  return seen.pop() if len(seen) == 1 else None


# ---------------------------------------------------------------------------------------------
# Scoring a folder of predictions.


def score_folder(predictions: str, ground_truth: GroundTruth, class_names: Sequence[str], *,
                 partial: bool = False) -> tuple[Scores, dict[str, list[str]]]:
  """Scores every PNG of the folder `predictions` against the image of the same name.

  Returns the scores and what was left out ({"no_prediction": names, "no_ground_truth":
  names}); with `partial` False anything left out is an error naming a few of them.
  """
  preds = png_names(predictions, "prediction")
  have = set(ground_truth.names)
  left_out = {"no_prediction": [n for n in ground_truth.names if n not in preds],
              "no_ground_truth": [n for n in preds if n not in have]}
  problems = []
  if left_out["no_prediction"]:
    names = [n + ".png" for n in left_out["no_prediction"]]
    problems.append(f"{len(names)} of the {len(have)} ground-truth images of "
                    f"{ground_truth.description} have no prediction in {predictions}: "
                    f"{_some(names)}")
  if left_out["no_ground_truth"]:
    names = [os.path.basename(preds[n]) for n in left_out["no_ground_truth"]]
    problems.append(f"{len(names)} of the {len(preds)} predictions in {predictions} have no "
                    f"ground truth in {ground_truth.description}: {_some(names)}")
  both = frozenset(preds) & have
  if not both:
    raise UserError(f"no prediction in {predictions} has ground truth in "
                    f"{ground_truth.description} (the names differ: e.g. "
                    f"{next(iter(preds))} and {ground_truth.names[0] if have else 'none'})")
  if problems and not partial:
    raise UserError("; ".join(problems) + " (--partial scores only the images that have both)")
  scores = Scores(class_names)
  for name, mask, where in ground_truth.read(both):
    scores.add(mask, read_label_map(preds[name]), prediction_file=preds[name],
               ground_truth_file=where)
  return scores, left_out


def command(pred: str, *, gt: str | None = None, gt_dataset: str | None = None,
            config: str | None = None, overrides: Sequence[str] = (), split: str = "val",
            data_dir: str | None = None, manual_dir: str | None = None,
            dataset_config: str | None = None, num_classes: int | None = None,
            class_names: str | None = None, out: str | None = None,
            partial: bool = False) -> Scores:
  """`affinity-jax evaluate`: scores, prints the per-class table, writes JSON and a picture.

  The ground truth is a folder (`gt`), a dataset (`gt_dataset`, found by `find_dataset`) or a
  config's dataset (`config` with `overrides`), of which `split` is scored. `out` (default:
  the folder holding `pred`) receives `{pred's name}_eval.json` and `_confusion.png`.
  """
  if sum(x is not None for x in (gt, gt_dataset, config)) != 1:
    raise UserError("give the ground truth once: --gt DIR, --gt-dataset NAME or --config SPEC")
  if overrides and config is None:
    raise UserError(f"{overrides[0]}: config overrides need --config")
  if gt is None and (num_classes is not None or class_names is not None):
    raise UserError("--num-classes / --class-names are for a ground-truth folder (--gt); a "
                    "dataset names its own classes")
  if gt is not None:
    truth, names = folder_ground_truth(gt), _label_names(num_classes, class_names)
  else:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
    if config is not None:
      from affinity_jax import config as config_lib  # pylint: disable=g-import-not-at-top
      from affinity_jax import data  # pylint: disable=g-import-not-at-top
      cfg = config_lib.load_config(config)
      config_lib.apply_overrides(cfg, overrides)
      builder = data.from_config(cfg)
    else:
      builder = find_dataset(gt_dataset, data_dir, dataset_config, manual_dir, pred)
    truth, names = dataset_ground_truth(builder, split), dataset_class_names(builder)
  scores, left_out = score_folder(pred, truth, names, partial=partial)

  folder = out if out is not None else os.path.dirname(os.path.abspath(pred))
  stem = os.path.join(folder, os.path.basename(os.path.abspath(pred)))
  report = {"predictions": os.path.abspath(pred), "ground_truth": truth.description,
            **scores.to_json()}
  if partial:
    report["left_out"] = left_out
  io.save_json(stem + "_eval.json", report)
  title = f"{os.path.basename(os.path.abspath(pred))}: mIoU {100 * scores.miou():.1f}%"
  charts.confusion_picture(stem + "_confusion.png", scores, title)

  print(f"scored {scores.images} predictions in {pred} against {truth.description} "
        f"(ground truth {IGNORE_LABEL} ignored; a prediction {IGNORE_LABEL} is a miss)")
  for key, what in (("no_prediction", "ground-truth images without a prediction"),
                    ("no_ground_truth", "predictions without ground truth")):
    if partial and left_out[key]:
      print(f"left out {len(left_out[key])} {what}: {_some(left_out[key])}")
  print(scores.table())
  missed = int(scores.unlabelled.sum())
  note = f"; {missed:,} pixels predicted {IGNORE_LABEL} counted as misses" if missed else ""
  print(f"mIoU {100 * scores.miou():.1f}% over {len(scores.class_names)} classes, pixel "
        f"accuracy {100 * scores.pixel_accuracy():.1f}%{note}")
  print(f"wrote {stem}_eval.json and {stem}_confusion.png")
  return scores


def _label_names(num_classes: int | None, class_names: str | None) -> tuple[str, ...]:
  """The names of the label values of a ground-truth folder: --class-names (a comma-separated
  list, or a text file with one name a line), else --num-classes values "0".."N-1", else VOC's
  21."""
  names = None
  if class_names is not None:
    if os.path.isfile(class_names):
      with open(class_names) as f:
        names = tuple(line.strip() for line in f if line.strip())
    else:
      names = tuple(n.strip() for n in class_names.split(",") if n.strip())
    if not names:
      raise UserError(f"--class-names {class_names!r} names no class")
    if num_classes is not None and num_classes != len(names):
      raise UserError(f"--num-classes {num_classes} but --class-names names {len(names)} "
                      f"classes ({_some(list(names))})")
    return names
  if num_classes is not None:
    if num_classes < 1:
      raise UserError(f"--num-classes must be at least 1, got {num_classes}")
    return tuple(str(c) for c in range(num_classes))
  return VOC_LABELS
