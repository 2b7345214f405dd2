"""Every file the stages hand each other: the workdir layout and one save/load pair per output.

  {workdir}/cam_net/, aff_net/, seg_net/   trained networks (`final/`: orbax variables + metadata)
  {workdir}/cams/{name}.npz                infer_cam:   CAMs of the present classes
  {workdir}/aff_labels/{name}.npz          aff_labels:  la / ha dCRF score maps
  {workdir}/aff_labels/{name}.png          aff_labels:  IRN's relation labels (method irn)
  {workdir}/pseudo_labels/{name}.png       random_walk: pseudo labels
  {workdir}/instances/{name}.npz           random_walk: IRN's instance masks (method irn)
  {workdir}/seg_pred/{name}.png            infer_seg:   predictions
  {workdir}/panels/                        random_walk (rw_{name}.npz heat) and evaluate (PNGs)
  {workdir}/reports/{stage}.json           every per-image stage: the images it skipped
  {workdir}/results.json, results.md       evaluate (scores), then the runner (stage seconds)
  {workdir}/results_iou.png                evaluate: IoU per class, a bar per row of the table
  {workdir}/results_confusion.png          evaluate: the segmentation row's confusion matrix
  {workdir}/fingerprints/{stage}.json      the runner: what each stage's outputs were made from
  {workdir}/config.json                    the runner: the config of the latest run (predict)
  {workdir}/.lock                          the runner: the run that holds the workdir

Each load validates what it reads and raises a `UserError` naming the file and the stage to
rerun. Writes go through `io` (temporary file, then rename), so a killed stage leaves only whole
files. This module imports no JAX: the dCRF worker processes use it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Iterable, Mapping

import numpy as np

from affinity_jax import distributed, io
from affinity_jax.errors import NonFiniteOutputError, UserError


@dataclasses.dataclass(frozen=True)
class Network:
  """A trained network of the pipeline and its names in each place it appears."""
  folder: str   # under the workdir, and its log name: "aff_net"
  arch: str     # models.build's and the checkpoint metadata's name: "affinity"
  section: str  # the config section of its training: "aff"
  stage: str    # the stage that trains it: "train_aff"


CAM_NET = Network("cam_net", "cam", "cam", "train_cam")
AFF_NET = Network("aff_net", "affinity", "aff", "train_aff")
SEG_NET = Network("seg_net", "seg", "seg", "train_seg")
NETWORKS = (CAM_NET, AFF_NET, SEG_NET)
# With method irn, IRN's relation network takes AffinityNet's place (its folder, section, stage).
RELATION_NET = Network("aff_net", "relation", "aff", "train_aff")

CAMS, CAM_PRED, AFF_LABELS, PSEUDO_LABELS, SEG_PRED, PANELS, REPORTS, FINGERPRINTS = (
    "cams", "cam_pred", "aff_labels", "pseudo_labels", "seg_pred", "panels", "reports",
    "fingerprints")
INSTANCES = "instances"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
RESULTS_IOU_PNG, RESULTS_CONFUSION_PNG = "results_iou.png", "results_confusion.png"
RUN_CONFIG = "config.json"

# What each stage writes (glob patterns under the workdir), besides reports/{stage}.json.
STAGE_OUTPUTS = {
    "train_cam": (CAM_NET.folder,), "infer_cam": (CAMS, CAM_PRED), "aff_labels": (AFF_LABELS,),
    "train_aff": (AFF_NET.folder,),
    "random_walk": (PSEUDO_LABELS, INSTANCES, PANELS + "/rw_*.npz"),
    "train_seg": (SEG_NET.folder,), "infer_seg": (SEG_PRED,),
    "evaluate": (PANELS + "/*.png", RESULTS_JSON, RESULTS_MD, RESULTS_IOU_PNG,
                 RESULTS_CONFUSION_PNG),
}

# The folders of the per-image stages' outputs, one file per image (and the panels' data).
PER_IMAGE_FOLDERS = (CAMS, CAM_PRED, AFF_LABELS, PSEUDO_LABELS, INSTANCES, SEG_PRED)

NO_POSITIVE_CLASS = "no positive class in its image-level label"


def require_finite(workdir: "Workdir", net: Network, values: np.ndarray, names: Iterable[str],
                   what: str) -> None:
  """Stops with what to redo when `values` (a network's outputs for the images `names`) hold
  NaN or Inf: its training diverged, and every later stage would be garbage. `what` says what
  was non-finite ("the CAM network gives non-finite CAMs")."""
  if not np.all(np.isfinite(values)):
    raise NonFiniteOutputError(
        f"{workdir.network(net)}: {what} (images {', '.join(names)}); its training "
        f"diverged. Delete {workdir.network_dir(net)} and retrain with a lower "
        f"--config.{net.section}.lr")


class Workdir:
  """Paths of one run's outputs."""

  def __init__(self, root: str | os.PathLike):
    self.root = os.fspath(root)

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def network_dir(self, net: Network) -> str:
    """Checkpoints and logs of `net`'s training."""
    return self.path(net.folder)

  def network(self, net: Network) -> str:
    """The trained network's variables (orbax), written once its training has finished."""
    return self.path(net.folder, "final")

  def cam(self, name: str) -> str:
    return self.path(CAMS, name + ".npz")

  def cam_prediction(self, name: str) -> str:
    """The CAM-only label map (the original's --out_cam_pred)."""
    return self.path(CAM_PRED, name + ".png")

  def scores(self, name: str) -> str:
    return self.path(AFF_LABELS, name + ".npz")

  def relation_label(self, name: str) -> str:
    """IRN's confident-region label (aff_labels with method irn)."""
    return self.path(AFF_LABELS, name + ".png")

  def pseudo_label(self, name: str) -> str:
    return self.path(PSEUDO_LABELS, name + ".png")

  def instances(self, name: str) -> str:
    """IRN's instance masks of the image (random_walk with method irn)."""
    return self.path(INSTANCES, name + ".npz")

  def prediction(self, name: str) -> str:
    return self.path(SEG_PRED, name + ".png")

  def walk_heat(self, name: str) -> str:
    return self.path(PANELS, "rw_" + name + ".npz")

  def panel(self, name: str) -> str:
    return self.path(PANELS, name + ".png")

  def report(self, stage: str) -> str:
    return self.path(REPORTS, stage + ".json")

  def fingerprint(self, stage: str) -> str:
    return self.path(FINGERPRINTS, stage + ".json")

  def run_config(self) -> str:
    """The config of the latest run, which `affinity-jax predict` reads."""
    return self.path(RUN_CONFIG)

  def stage_outputs(self, stage: str) -> list[str]:
    """The paths of `stage`'s outputs that exist (its report excluded)."""
    root = glob.escape(self.root)  # a workdir named run[1] is a name, not a pattern
    return sorted(p for pattern in STAGE_OUTPUTS[stage]
                  for p in glob.glob(os.path.join(root, pattern)))

  def remove_stage_outputs(self, stage: str) -> None:
    """Deletes `stage`'s outputs, its report and its fingerprint record."""
    for p in self.stage_outputs(stage) + [self.report(stage), self.fingerprint(stage)]:
      if os.path.isdir(p):
        shutil.rmtree(p)
      elif os.path.exists(p):
        os.remove(p)


def missing(names: Iterable[str], folder: str, suffix: str) -> list[str]:
  """Names whose output file `{folder}/{name}{suffix}` does not exist yet, or is cut short
  (deleted with a note, so that it is made again). (Temporaries of a killed writer are removed
  before the stages start, stages.run_stages: here they may be another process's files being
  written.)"""
  todo = []
  for n in names:
    path = os.path.join(folder, n + suffix)
    if os.path.exists(path) and not looks_whole(path):
      print(f"{path} is damaged (cut short); making it again", flush=True)
      os.remove(path)
    if not os.path.exists(path):
      todo.append(n)
  return todo


# How a whole file of each kind ends: a zip's end-of-central-directory record (within its
# comment's 64 KiB), a PNG's IEND chunk. A file cut short lacks it; checking reads a few bytes.
_ZIP_END, _PNG_END = b"PK\x05\x06", b"\x00\x00\x00\x00IEND\xaeB`\x82"


def looks_whole(path: str) -> bool:
  """False for an .npz or .png file that does not end as a whole one does."""
  if not path.endswith((".npz", ".png")):
    return True
  with open(path, "rb") as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - (22 + 65535 if path.endswith(".npz") else len(_PNG_END))))
    tail = f.read()
  return _ZIP_END in tail if path.endswith(".npz") else tail == _PNG_END


def require(path: str, stage: str) -> None:
  """A user error naming `path` and the stage that writes it, unless the file exists."""
  if not os.path.exists(path):
    raise UserError(f"{path} is missing: run the {stage} stage first (--stages {stage})")


# ---------------------------------------------------------------------------------------------
# CAMs (infer_cam): `cam` float32 [H, W, P], the present classes each divided by its maximum,
# and `class_ids` int32 [P].


def save_cam(path: str, cam: np.ndarray, class_ids: np.ndarray,
             strided: np.ndarray | None = None) -> None:
  """Writes a CAM file; `strided` [h, w, P]: IRN's stride-4 CAMs of the same classes, besides
  the full-resolution `cam` (method irn)."""
  arrays = {"cam": np.asarray(cam, np.float32), "class_ids": np.asarray(class_ids, np.int32)}
  if strided is not None:
    arrays["strided"] = np.asarray(strided, np.float32)
  io.save_npz(path, **arrays)


def load_strided_cam(path: str, image_hw, stride: int, num_classes: int
                     ) -> tuple[np.ndarray | None, np.ndarray | str]:
  """(strided [ceil(H / stride), ceil(W / stride), P] float32, class_ids [P]) of an IRN CAM file
  of an H x W image, checked; (None, why) when the file was made for an image of another size
  (the caller skips and reports the image, as cam_size_mismatch's callers do)."""
  require(path, "infer_cam")
  shapes = io.npz_shapes(path)  # the full-resolution CAM's size, without reading it
  if "strided" not in shapes or "cam" not in shapes or "class_ids" not in shapes:
    raise UserError(f"{path}: a CAM file without IRN's stride-{stride} CAMs (keys "
                    f"{sorted(shapes)}; written with method psa?); delete it and rerun infer_cam")
  z = io.load_npz(path, keys=("strided", "class_ids"))
  strided, ids = z["strided"], z["class_ids"]
  mismatch = cam_size_mismatch(path, shapes["cam"][:2], image_hw)
  if mismatch:
    return None, mismatch
  grid = tuple(-(-int(s) // stride) for s in image_hw)
  if (strided.shape != grid + (len(ids),) or not np.issubdtype(strided.dtype, np.floating)
      or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer)
      or (len(ids) and (ids.min() < 0 or ids.max() >= num_classes))):
    raise UserError(f"{path}: stride-{stride} CAMs of shape {strided.shape} ({strided.dtype}) "
                    f"with classes {ids.tolist()} do not fit the {image_hw[0]}x{image_hw[1]} "
                    f"image's {grid[0]}x{grid[1]} grid and {num_classes} classes; delete it "
                    "and rerun infer_cam")
  return strided.astype(np.float32), ids


def load_cam_present(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(cam [H, W, P] float32, class_ids [P] int) of a CAM file, checked."""
  z = _load_npz(path, "infer_cam")
  if "cam" not in z or "class_ids" not in z:
    raise UserError(f"{path}: not a CAM file (keys {sorted(z)}); delete it and rerun infer_cam")
  cam, ids = z["cam"], z["class_ids"]
  if (cam.ndim != 3 or ids.ndim != 1 or cam.shape[-1] != len(ids)
      or not np.issubdtype(cam.dtype, np.floating) or not np.issubdtype(ids.dtype, np.integer)):
    raise UserError(f"{path}: a CAM of shape {cam.shape} ({cam.dtype}) with class ids of shape "
                    f"{ids.shape} ({ids.dtype}) is not [H, W, P] float with P ids; delete it "
                    "and rerun infer_cam")
  return cam.astype(np.float32), ids


def load_cam(path: str, num_classes: int) -> np.ndarray:
  """[H, W, num_classes] CAM (absent classes zero) of a CAM file, checked."""
  cam, ids = load_cam_present(path)
  if len(ids) and (ids.min() < 0 or ids.max() >= num_classes):
    raise UserError(f"{path}: CAM of shape {cam.shape} with classes {ids.tolist()} does not fit "
                    f"{num_classes} classes; delete it and rerun infer_cam")
  full = np.zeros(cam.shape[:2] + (num_classes,), np.float32)
  full[..., ids] = cam
  return full


def cam_size_mismatch(path: str, cam_hw, image_hw) -> str | None:
  """Why a CAM of size `cam_hw` cannot serve an image of size `image_hw` (None if it can)."""
  if tuple(cam_hw) == tuple(image_hw):
    return None
  return (f"{path}: CAM is {cam_hw[0]}x{cam_hw[1]} but the image is {image_hw[0]}x"
          f"{image_hw[1]} (a CAM of another image or dataset; delete it and rerun infer_cam)")


# ---------------------------------------------------------------------------------------------
# Score maps (aff_labels): `la`, `ha` float32 [H, W, P + 1], channel 0 the background.


def save_scores(path: str, la: np.ndarray, ha: np.ndarray) -> None:
  io.save_npz(path, la=np.asarray(la, np.float32), ha=np.asarray(ha, np.float32))


def load_scores(path: str, image_hw, max_channels: int) -> tuple[np.ndarray, np.ndarray]:
  """(la, ha) float32 [H, W, K + 1] of a score file, for an image of `image_hw`, checked."""
  require(path, "aff_labels")
  z = _load_npz(path, "aff_labels")
  if "la" not in z or "ha" not in z:
    raise UserError(f"{path}: not a score file (keys {sorted(z)}); delete it and rerun "
                    "aff_labels")
  la, ha = z["la"], z["ha"]
  if la.ndim != 3 or la.shape != ha.shape or la.shape[:2] != tuple(image_hw):
    raise UserError(f"{path}: la {la.shape} and ha {ha.shape} must both be [H, W, K+1] with the "
                    f"image's H, W = {image_hw[0]}, {image_hw[1]}")
  if la.shape[2] > max_channels:
    raise UserError(f"{path}: {la.shape[2]} score channels, more than 1 + {max_channels - 1} "
                    "classes")
  return la.astype(np.float32), ha.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Label maps (infer_cam's CAM-only predictions, random_walk's pseudo labels, infer_seg's
# predictions): uint8 PNG [H, W], 0 background, c + 1 class c.


def save_label(path: str, label: np.ndarray) -> None:
  io.save_png(path, np.asarray(label, np.uint8))


def load_label(path: str, stage: str, image_hw=None) -> np.ndarray:
  """uint8 [H, W] label map written by `stage`; with `image_hw`, it must have that size."""
  require(path, stage)
  label = io.load_png(path)
  if label.ndim != 2 or label.dtype != np.uint8:
    raise UserError(f"{path}: a label map must be a one-channel 8-bit PNG, got shape "
                    f"{label.shape} of {label.dtype}")
  if image_hw is not None and label.shape != tuple(image_hw):
    raise UserError(f"{path}: label map is {label.shape[0]}x{label.shape[1]}, the image is "
                    f"{image_hw[0]}x{image_hw[1]}; delete it and rerun {stage}")
  return label


# ---------------------------------------------------------------------------------------------
# IRN's instances (random_walk, method irn): `instance_map` [H, W] (0 none, i + 1 instance i,
# uint8 or uint16), `class_ids` int32 [N] (0-based foreground classes), `scores` float32 [N].


def save_instances(path: str, instance_map: np.ndarray, class_ids: np.ndarray,
                   scores: np.ndarray) -> None:
  n = len(class_ids)
  dtype = np.uint8 if n < 256 else np.uint16 if n < 65536 else np.int32
  io.save_npz(path, instance_map=np.asarray(instance_map).astype(dtype),
              class_ids=np.asarray(class_ids, np.int32), scores=np.asarray(scores, np.float32))


def load_instances(path: str, image_hw, num_classes: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(instance_map [H, W] int32, class_ids [N] int32, scores [N] float32) of an instance
  file of an H x W image, checked."""
  z = _load_npz(path, "random_walk")
  if set(z) != {"instance_map", "class_ids", "scores"}:
    raise UserError(f"{path}: not an instance file (keys {sorted(z)}); delete it and rerun "
                    "random_walk")
  instance_map, ids, scores = z["instance_map"], z["class_ids"], z["scores"]
  n = len(ids)
  if (instance_map.shape != tuple(image_hw) or not np.issubdtype(instance_map.dtype, np.integer)
      or ids.ndim != 1 or scores.shape != (n,) or not np.issubdtype(ids.dtype, np.integer)
      or (n and (ids.min() < 0 or ids.max() >= num_classes))
      or (instance_map.size and (instance_map.min() < 0 or instance_map.max() > n))):
    raise UserError(f"{path}: an instance map of shape {instance_map.shape} with {n} instances "
                    f"of classes {ids.tolist()} does not fit the {image_hw[0]}x{image_hw[1]} "
                    f"image and {num_classes} classes; delete it and rerun random_walk")
  return instance_map.astype(np.int32), ids.astype(np.int32), scores.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The walk's foreground heat map of a few images, for the evaluate stage's panels.


def save_walk_heat(path: str, heat: np.ndarray) -> None:
  io.save_npz(path, heat=np.asarray(heat, np.float16))


def load_walk_heat(path: str, image_hw) -> np.ndarray:
  """[H, W] float heat of `path`, or zeros when the walk saved none for this image."""
  if not os.path.exists(path):
    return np.zeros(tuple(image_hw), np.float32)
  z = _load_npz(path, "random_walk")
  if "heat" not in z or z["heat"].shape != tuple(image_hw):
    raise UserError(f"{path}: not a walk heat map of a {image_hw[0]}x{image_hw[1]} image; "
                    "delete it and rerun random_walk")
  return z["heat"]


# ---------------------------------------------------------------------------------------------
# Skip reports: {"stage", "count", "skipped": {name: reason}} per stage.


class SkipReport:
  """The images a stage passes over, each with its reason (a bad image costs one image, not a run).

  `skip(name, reason)` records and prints one; `finish(summary)` writes
  `{workdir}/reports/{stage}.json` atomically and puts the count in the stage's summary. In a
  multi-process run every process calls `finish` (it gathers all their skips: one report,
  written by process 0), unless `gather` is False (a stage that runs on process 0 alone). A
  skipped image has no output, so a rerun examines it again: the report always lists what the
  latest run of the stage could not do.
  """

  def __init__(self, workdir: Workdir, stage: str, main_process: bool = True,
               gather: bool = True):
    self.stage = stage
    self.path = workdir.report(stage)
    self.main_process = main_process
    self.gather = gather
    self.skipped: dict[str, str] = {}

  def skip(self, name: str, reason: str) -> None:
    old = self.skipped.get(name)
    self.skipped[name] = reason if old in (None, reason) else f"{old}; {reason}"
    print(f"[{self.stage}] skipping {name}: {reason}", flush=True)

  def finish(self, summary: dict) -> dict:
    skipped = dict(self.skipped)
    if self.gather:
      for part in distributed.gather(f"{self.stage} skip report", self.skipped):
        skipped.update(part)
    if self.main_process:
      io.save_json(self.path, {"stage": self.stage, "count": len(skipped),
                               "skipped": dict(sorted(skipped.items()))})
    if skipped:
      print(f"[{self.stage}] skipped {len(skipped)} image(s); see {self.path}", flush=True)
    return {**summary, "skipped": len(skipped)}


def skipped_by(workdir: Workdir, stage: str) -> frozenset[str]:
  """Names that `stage` listed in its report (empty if it wrote none)."""
  p = workdir.report(stage)
  if not os.path.exists(p):
    return frozenset()
  try:
    with open(p) as f:
      return frozenset(json.load(f)["skipped"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{p}: unreadable stage report ({e}); delete it and rerun {stage}") from None


def has_positive_class(label) -> bool:
  return bool(np.any(np.asarray(label) > 0))


# ---------------------------------------------------------------------------------------------
# Results: results.json (scores, then the stages' seconds) and results.md (the table).


def save_results(workdir: Workdir, results: Mapping, table: str) -> None:
  """The evaluate stage's scores and table; replaces an earlier run's."""
  io.save_json(workdir.path(RESULTS_JSON), dict(results))
  io.save_text(workdir.path(RESULTS_MD), table + "\n")


def add_provenance(workdir: Workdir, stage_seconds: Mapping[str, float],
                   fingerprints: Mapping[str, str | None]) -> None:
  """Adds to results.json what it scored: every stage's fingerprint and the seconds its last
  complete run took (in all: their sum), whichever run of the command made them."""
  path = workdir.path(RESULTS_JSON)
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable results ({e}); rerun the evaluate stage") from None
  results["stage_seconds"] = dict(stage_seconds)
  results["seconds"] = round(sum(stage_seconds.values()), 1)
  results["fingerprints"] = dict(fingerprints)
  io.save_json(path, results)


# ---------------------------------------------------------------------------------------------
# The run's config (config.json): the config dict of the latest run, without `workdir` (the
# folder it is in), for `affinity-jax predict --workdir`.


def save_run_config(workdir: Workdir, config: Mapping) -> None:
  io.save_json(workdir.run_config(), {k: v for k, v in config.items() if k != "workdir"})


def load_run_config(workdir: Workdir) -> dict:
  """The config dict that the latest run in `workdir` recorded, checked."""
  path = workdir.run_config()
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist: {workdir.root} is not a workdir of "
                    "`affinity-jax run`, or its last run predates config records; give the "
                    "config it was run with (--config configs/X.py[:variant])")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable run config ({e}); rerun any stage to write it again, "
                    "or give --config") from None
  if not isinstance(config, dict):
    raise UserError(f"{path}: not a run config (a JSON object of config keys)")
  return config


def _load_npz(path: str, stage: str) -> dict[str, np.ndarray]:
  require(path, stage)
  return io.load_npz(path)
