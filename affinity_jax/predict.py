"""`affinity-jax predict`: label maps of your own images with the trained networks of a run.

  affinity-jax predict --workdir W --images PATH... --out DIR [--method auto|seg|walk]
                       [--crf | --no-crf] [--heatmaps] [--threshold 0.5] [--max-side 1024]

Two methods, each the pipeline's own computation on a batch of canvases:
- "seg", the segmentation network (W/seg_net/final or --seg-net): the softmax averaged over the
  config's seg_infer.scales and their flips (cam.segmentation_fn, what infer_seg runs), argmax,
  after dCRF if asked (cam.segmentation_label).
- "walk", the CAM network and AffinityNet (W/cam_net/final and W/aff_net/final, or --cam-net and
  --aff-net): the method without the segmentation stage. A user's image has no image-level
  labels, which the pipeline's CAMs use; the CAM network's own classification stands in: the
  classes whose sigmoid score (its logits on the image at scale 1) exceeds --threshold, and its
  top class always. Their CAMs over cam_infer.scales and flips (cam.cam_fn, what infer_cam runs)
  are walked over AffinityNet's affinities (random_walk.walk_batch, what the random_walk stage
  runs), then argmax, or dCRF (random_walk.crf_label).

The config is the workdir's unless --config names one: config.json (which every run records),
with each key that a finished stage recorded (fingerprints/*.json) as that stage had it, so that
predict mirrors what made the networks and outputs; --config.key=value overrides apply last. Images (data/image_files.py: any size and mode,
EXIF orientation applied) go through the inference pipeline's preprocessing
(data.pipelines.inference_inputs: PIL's bicubic resizing, the backbone's normalisation) onto a
canvas per batch: images are sorted by size and each batch's canvas is its largest image rounded
up (`canvas_side`), so that a few shapes, and compiles, serve a folder of photographs. The
networks get each image's size on the canvas, so padding does not change its result
(models/canvas.py). An image longer than --max-side is resized down for the networks and its
label map brought back to its size (nearest neighbour). Batches are split over the local
devices.

Per image, named after its file ({stem}; a second file whose outputs would take the same names
gets its folder's name in front, or a number):
  {stem}.png          the label map: a palette PNG in VOC's colours, 0 background, c + 1 class c
  {stem}_overlay.jpg  the label's colours over the image
  {stem}_cam.jpg, {stem}_rw.jpg   (walk, --heatmaps) the CAMs' and the walk's heat over the image
and predict.json: what each image gave, and the files skipped with why. A file that cannot be
read is skipped and reported, never the end of the run (which fails only if no image could be
labelled).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import os
import time
from typing import Callable, Sequence

import ml_collections
import numpy as np
from PIL import Image

from affinity_jax import artifacts, cam, checkpoint, console, distributed, io, models, pictures
from affinity_jax import config as config_lib
from affinity_jax import random_walk as rw
from affinity_jax.data import image_files, pipelines, transforms
from affinity_jax.errors import NonFiniteOutputError, UserError

REPORT = "predict.json"
# The files written per image, by kind: {stem}{suffix}.
# Pictures are JPEGs: the only PNGs in --out are label maps, which `evaluate --pred` scores.
OUTPUTS = {"label": ".png", "overlay": "_overlay.jpg", "cam": "_cam.jpg", "rw": "_rw.jpg"}
METHODS = ("auto", "seg", "walk")


def canvas_side(n: int) -> int:
  """The canvas side for images of up to `n` pixels: `n` rounded up to a multiple of 64 up to
  512, of 128 up to 1024, of 256 beyond (few shapes; at most a quarter of padding)."""
  step = 64 if n <= 512 else 128 if n <= 1024 else 256
  return -(-int(n) // step) * step


def fit_size(hw: Sequence[int], max_side: int) -> tuple[int, int]:
  """(h, w) scaled down so that the longer side is at most `max_side` (0: as it is)."""
  h, w = (int(n) for n in hw)
  if not max_side or max(h, w) <= max_side:
    return h, w
  f = max_side / max(h, w)
  return max(1, round(h * f)), max(1, round(w * f))


def output_stems(paths: Sequence[str]) -> dict[str, str]:
  """{path: stem} such that no two images' outputs ({stem}{suffix} of OUTPUTS) share a name,
  case-insensitively: a file's own name, else its folder's name in front, else a number."""
  taken, stems = set(), {}
  for path in paths:
    base = os.path.splitext(os.path.basename(path))[0] or "image"
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    for stem in itertools.chain([base, f"{folder}_{base}"],
                                (f"{base}-{k}" for k in itertools.count(2))):
      names = {(stem + suffix).lower() for suffix in OUTPUTS.values()}
      if not names & taken:
        break
    taken |= names
    stems[path] = stem
  return stems


# ---------------------------------------------------------------------------------------------
# Which networks, which config.


def choose_networks(workdir: str | None, method: str, seg_net: str | None,
                    cam_net: str | None, aff_net: str | None
                    ) -> tuple[str, dict[artifacts.Network, str]]:
  """("seg" or "walk", {network: checkpoint folder}) from the flags; a user error naming the
  stage to run when the workdir lacks a network."""
  if method not in METHODS:
    raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
  if seg_net and (cam_net or aff_net):
    raise UserError("give --seg-net (the segmentation network), or --cam-net and --aff-net (the "
                    "CAM + random-walk method), not both")
  given = {artifacts.SEG_NET: seg_net, artifacts.CAM_NET: cam_net, artifacts.AFF_NET: aff_net}
  wd = artifacts.Workdir(workdir) if workdir else None

  def trained(net):
    return wd is not None and os.path.isdir(wd.network(net))

  if method == "auto":
    if seg_net or cam_net or aff_net:
      method = "seg" if seg_net else "walk"
    elif trained(artifacts.SEG_NET):
      method = "seg"
    elif trained(artifacts.CAM_NET) and trained(artifacts.AFF_NET):
      method = "walk"
    elif wd is not None:
      raise UserError(
          f"{workdir} has no trained network to predict with (no seg_net/final; "
          f"{'no ' if not trained(artifacts.CAM_NET) else ''}cam_net/final, "
          f"{'no ' if not trained(artifacts.AFF_NET) else ''}aff_net/final): run the "
          "train_seg stage (the whole pipeline) for the segmentation network, or "
          + ("the train_aff stage" if trained(artifacts.CAM_NET) else
             "the train_cam and train_aff stages")
          + f" for the CAM + random-walk method (affinity-jax run --workdir {workdir} ...)")
    else:
      raise UserError("give --workdir (a run's workdir), --seg-net DIR, or --cam-net DIR with "
                      "--aff-net DIR")
  if method == "seg" and (cam_net or aff_net):
    raise UserError("--method seg uses the segmentation network: give --seg-net, not "
                    "--cam-net / --aff-net")
  if method == "walk" and seg_net:
    raise UserError("--method walk uses the CAM network and AffinityNet: give --cam-net and "
                    "--aff-net, not --seg-net")
  needed = [artifacts.SEG_NET] if method == "seg" else [artifacts.CAM_NET, artifacts.AFF_NET]
  paths = {}
  for net in needed:
    if given[net]:
      paths[net] = given[net]
    elif wd is not None:
      if not trained(net):
        raise UserError(f"{wd.network(net)} does not exist: run the {net.stage} stage first "
                        f"(affinity-jax run --workdir {workdir} --stages {net.stage} ...)")
      paths[net] = wd.network(net)
    else:
      raise UserError(f"the {method} method needs --{net.folder.replace('_', '-')} DIR (or "
                      "--workdir)")
  return method, paths


def _workdir_of(network_path: str) -> str | None:
  """The workdir that holds the checkpoint folder `network_path` (W/seg_net/final), if it
  records its config."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(network_path)))
  return root if os.path.isfile(artifacts.Workdir(root).run_config()) else None


def _tuples(value):
  """A config read back from JSON, with its lists as the tuples that configs hold."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _as_recorded(cfg: ml_collections.ConfigDict, wd: artifacts.Workdir) -> None:
  """Sets every config key that a finished stage of `wd` recorded (fingerprints.py) to the
  value it recorded, in pipeline order."""
  from affinity_jax import fingerprints
  from affinity_jax.stages import ORDER
  for stage in ORDER:
    record = fingerprints.load_record(wd, stage)
    if not record or not record.get("complete"):
      continue
    for key, value in record["inputs"]["config"].items():
      *parents, leaf = key.split(".")
      node = cfg
      for part in parents:
        node = node.get(part) if hasattr(node, "get") else None
      if hasattr(node, "keys") and leaf in node:
        node[leaf] = _tuples(value)


def load_config(spec: str | None, overrides: Sequence[str], workdir: str | None,
                network_paths: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
  """(config, where it came from): `spec` if given, else the run config of the workdir (or of
  the workdir that holds the networks), with `overrides` applied and checked."""
  if spec:
    cfg, source = config_lib.load_config(spec), spec
  else:
    root = workdir or next(filter(None, map(_workdir_of, network_paths)), None)
    if root is None:
      raise UserError("give --config configs/X.py[:variant]: the networks are not in a workdir "
                      "that records its config, and the config says their backbone, width, "
                      "classes and inference scales")
    wd = artifacts.Workdir(root)
    cfg = ml_collections.ConfigDict(_tuples(artifacts.load_run_config(wd)))
    source = wd.run_config()
    # config.json is the latest command's config, which may have changed keys that the
    # stages it ran did not read (or stopped at): the stages' records say what made the
    # networks and outputs that predict mirrors.
    _as_recorded(cfg, wd)
  config_lib.apply_overrides(cfg, overrides)
  if workdir:
    cfg.workdir = workdir
  config_lib.validate(cfg)
  return cfg, source


def _require_finite(values: np.ndarray, path: str, what: str, names: Sequence[str]) -> None:
  if not np.all(np.isfinite(values)):
    raise NonFiniteOutputError(f"{path}: {what} (images {', '.join(names)}); its training "
                               "diverged")


# ---------------------------------------------------------------------------------------------
# The two methods on a batch: arrays of `pipelines.inference_inputs` at `all_scales`, stacked,
# the first `n` real -> per image {"label": [h, w], ...} at the size the networks saw.


def _at_scales(arrays: dict, all_scales: Sequence[float], wanted: Sequence[float]) -> dict:
  """The inference batch of `wanted` scales (image_s{j}, size_s{j}) out of `arrays`."""
  out = {"orig_size": arrays["orig_size"], "raw": arrays["raw"]}
  for j, s in enumerate(wanted):
    i = list(all_scales).index(s)
    out[f"image_s{j}"], out[f"size_s{j}"] = arrays[f"image_s{i}"], arrays[f"size_s{i}"]
  return out


class Segmenter:
  """The segmentation network's label maps (the "seg" method)."""

  def __init__(self, cfg, paths: dict, put: Callable, replicate: Callable):
    self.path = paths[artifacts.SEG_NET]
    model, variables = checkpoint.load_network(cfg, artifacts.SEG_NET, self.path)
    self.variables = replicate(variables)
    self.scores = cam.segmentation_fn(model)
    self.scales = self.all_scales = tuple(float(s) for s in cfg.seg_infer.scales)
    self.crf = bool(cfg.seg_infer.crf)
    self.put = put

  def describe(self) -> str:
    return (f"segmentation network {self.path}, scales {_scales(self.scales)} + flips, "
            f"{'dCRF' if self.crf else 'no dCRF'}")

  def __call__(self, arrays: dict, names: Sequence[str]) -> list[dict]:
    probs = self.scores(self.variables, _at_scales(arrays, self.scales, self.scales),
                        self.scales, self.put)
    out = []
    for i, name in enumerate(names):
      h, w = arrays["orig_size"][i]
      p = probs[i, :h, :w]
      _require_finite(p, self.path, "the segmentation network gives non-finite scores", [name])
      out.append({"label": cam.segmentation_label(arrays["raw"][i, :h, :w], p, crf=self.crf)})
    return out


class Walker:
  """CAMs of the classes the CAM network finds, walked over AffinityNet (the "walk" method)."""

  def __init__(self, cfg, paths: dict, put: Callable, replicate: Callable, threshold: float):
    self.cam_path, self.aff_path = paths[artifacts.CAM_NET], paths[artifacts.AFF_NET]
    cam_model, cam_variables = checkpoint.load_network(cfg, artifacts.CAM_NET, self.cam_path)
    aff_model, aff_variables = checkpoint.load_network(cfg, artifacts.AFF_NET, self.aff_path)
    self.cam_variables, self.aff_variables = replicate(cam_variables), replicate(aff_variables)
    self.cams = cam.cam_fn(cam_model)
    self.classify = cam.class_probability_fn(cam_model)
    self.walk = rw.make_walk_fn(aff_model, cfg)
    self.cam_scales = tuple(float(s) for s in cfg.cam_infer.scales)
    self.aff_scale = config_lib.aff_image_scale(cfg)
    self.all_scales = tuple(dict.fromkeys(self.cam_scales + (1.0, self.aff_scale)))
    self.threshold = threshold
    self.alpha = float(cfg.random_walk.alpha)
    self.crf = bool(cfg.random_walk.crf)
    self.crf_iters = int(cfg.random_walk.crf_iters)
    self.put = put

  def describe(self) -> str:
    return (f"CAM network {self.cam_path} (scales {_scales(self.cam_scales)} + flips, classes "
            f"scoring > {self.threshold:g}) + random walk over AffinityNet {self.aff_path}, "
            f"{'dCRF' if self.crf else 'no dCRF'}")

  def __call__(self, arrays: dict, names: Sequence[str]) -> list[dict]:
    n = len(names)
    one = _at_scales(arrays, self.all_scales, (1.0,))
    probs = np.asarray(self.classify(self.cam_variables,
                                     *self.put((one["image_s0"], one["size_s0"]))))
    _require_finite(probs[:n], self.cam_path, "the CAM network gives non-finite scores", names)
    labels = cam.predicted_labels(probs, self.threshold)
    cams = self.cams(self.cam_variables, _at_scales(arrays, self.all_scales, self.cam_scales),
                     self.cam_scales, labels, self.put)
    sizes = np.asarray(arrays["orig_size"])
    full = {i: cams[i, :sizes[i, 0], :sizes[i, 1]] for i in range(n)}
    _require_finite(np.concatenate([c.ravel() for c in full.values()]), self.cam_path,
                    "the CAM network gives non-finite CAMs", names)
    walk_in = _at_scales(arrays, self.all_scales, (self.aff_scale,))
    walked, heat, share, channels = rw.walk_batch(
        self.walk, self.aff_variables, walk_in["image_s0"], full, sizes, walk_in["size_s0"],
        classes={i: np.flatnonzero(labels[i] > 0) for i in full}, alpha=self.alpha,
        image_scale=self.aff_scale, put=self.put)
    _require_finite(heat[:n] if share is None else share[:n], self.aff_path,
                    "the walk gives non-finite scores", names)
    out = []
    for i in range(n):
      h, w = sizes[i]
      label = walked[i, :h, :w]
      if share is not None:
        label = rw.crf_label(arrays["raw"][i, :h, :w], share[i, :h, :w], channels[i],
                             self.crf_iters)
      out.append({"label": label, "cam": full[i].max(axis=-1), "rw": heat[i, :h, :w],
                  "class_scores": probs[i]})
    return out


def _scales(scales: Sequence[float]) -> str:
  return ", ".join(f"{s:g}" for s in scales)


# ---------------------------------------------------------------------------------------------
# Reading batches (in a worker thread, one batch ahead) and writing each image's files.


@dataclasses.dataclass
class _Item:
  path: str
  stem: str
  size: tuple[int, int]  # (h, w) upright, from the file's header


@dataclasses.dataclass
class _Batch:
  items: list[_Item]          # those that decoded, in slot order
  images: list[np.ndarray]    # their pixels, uint8 [H, W, 3] at their own size
  arrays: dict                # inference inputs of all slots (dummies after the real ones)
  failed: list[tuple[_Item, str]]


def plan_batches(items: Sequence[_Item], batch_size: int, max_side: int) -> list[list[_Item]]:
  """Items sorted by the canvas they need (stable), in batches of `batch_size`."""
  order = sorted(items, key=lambda it: tuple(canvas_side(n) for n in fit_size(it.size,
                                                                               max_side)))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _read_batch(items: Sequence[_Item], *, scales: Sequence[float], convention: str,
                batch_size: int, max_side: int) -> _Batch:
  batch = _Batch([], [], {}, [])
  inputs = []
  for item in items:
    try:
      image = image_files.read_rgb(item.path)
    except image_files.UnreadableImage as e:
      batch.failed.append((item, str(e)))
      continue
    batch.items.append(item)
    batch.images.append(image)
    size = fit_size(image.shape[:2], max_side)
    inputs.append(image if size == image.shape[:2] else
                  np.asarray(transforms.resize_image(image, size)))
  if not inputs:
    return batch
  canvas = tuple(canvas_side(max(x.shape[k] for x in inputs)) for k in (0, 1))
  examples = [{k: np.asarray(v) for k, v in pipelines.inference_inputs(
      x, scales=scales, canvas=canvas, convention=convention).items()} for x in inputs]
  dummies = batch_size - len(examples)
  batch.arrays = {k: np.stack([e[k] for e in examples] + [np.zeros_like(examples[0][k])] * dummies)
                  for k in examples[0]}
  return batch


def _items(files: Sequence[str], skipped: dict[str, str]) -> list[_Item]:
  """The files whose header reads, with their output stems; the others go to `skipped`."""
  stems = output_stems(files)
  items = []
  for path in files:
    try:
      items.append(_Item(path, stems[path], image_files.upright_size(path)))
    except image_files.UnreadableImage as e:
      skipped[path] = str(e)
      print(f"[predict] skipping: {e}", flush=True)
      continue
    if stems[path] != os.path.splitext(os.path.basename(path))[0]:
      print(f"[predict] {path}: another input's outputs would take its name; its outputs are "
            f"{stems[path]}.*", flush=True)
  return items


def _resize(array: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
  if array.shape[:2] == tuple(hw):
    return array
  return np.asarray(Image.fromarray(array).resize((hw[1], hw[0]), resample))


def _write(out: str, item: _Item, image: np.ndarray, result: dict, heatmaps: bool) -> dict:
  """Writes one image's files; returns its record for the report."""
  hw = image.shape[:2]
  seen = result["label"].shape
  label = _resize(np.asarray(result["label"], np.uint8), hw, Image.Resampling.NEAREST)
  files = {"label": item.stem + OUTPUTS["label"], "overlay": item.stem + OUTPUTS["overlay"]}
  io.save_png(os.path.join(out, files["label"]), label, palette=pictures.palette())
  io.save_jpeg(os.path.join(out, files["overlay"]), pictures.label_overlay(image, label))
  if heatmaps:
    for kind in ("cam", "rw"):
      files[kind] = item.stem + OUTPUTS[kind]
      scores = _resize(np.asarray(result[kind], np.float32), hw, Image.Resampling.BILINEAR)
      io.save_jpeg(os.path.join(out, files[kind]), pictures.heat_overlay(image, scores))
  record = {"outputs": files, "height": int(hw[0]), "width": int(hw[1]),
            "classes": [int(c) for c in np.unique(label) if c]}
  if seen != hw:
    record["inferred_at"] = [int(n) for n in seen]
  if "class_scores" in result:
    record["class_scores"] = [round(float(p), 4) for p in result["class_scores"]]
  return record


# ---------------------------------------------------------------------------------------------


def run(args, overrides: Sequence[str] = ()) -> dict:
  """`affinity-jax predict` with the parsed flags `args` (cli.py) and `--config.` overrides;
  returns the report's summary."""
  t0 = time.time()
  if not 0 < args.threshold < 1:
    raise UserError(f"--threshold must be between 0 and 1, got {args.threshold}")
  if args.batch_size is not None and args.batch_size <= 0:
    raise UserError(f"--batch-size must be positive, got {args.batch_size}")
  if args.max_side < 0:
    raise UserError(f"--max-side must be >= 0 (0: never resize), got {args.max_side}")
  if args.workdir and not os.path.isdir(args.workdir):
    raise UserError(f"--workdir {args.workdir}: no such folder")
  method, paths = choose_networks(args.workdir, args.method, args.seg_net, args.cam_net,
                                  args.aff_net)
  if args.heatmaps and method != "walk":
    raise UserError("--heatmaps: the heat maps are the CAM network's and the walk's; use "
                    "--method walk (or --cam-net and --aff-net)")
  cfg, config_source = load_config(args.config, overrides, args.workdir, list(paths.values()))
  if method == "walk" and config_lib.method(cfg) == "irn":
    raise UserError("--method walk runs PSA's walk (CAM network and AffinityNet); this run's "
                    "config has method irn, whose walk predict does not run yet: use --method "
                    "seg (the segmentation network), or the random_walk stage on a dataset")
  if args.crf is not None:
    cfg.seg_infer.crf = cfg.random_walk.crf = bool(args.crf)

  files, problems = image_files.find_images(args.images)
  if not files:
    raise UserError("no image file to predict: " + "; ".join(problems.values()))
  put, replicate, devices = distributed.local_placement()
  if method == "seg":
    predictor = Segmenter(cfg, paths, put, replicate)
  else:
    predictor = Walker(cfg, paths, put, replicate, args.threshold)
  io.check_writable_dir(args.out)  # once the networks load: a wrong one leaves no folder
  report = os.path.join(args.out, REPORT)
  if os.path.exists(report):  # an earlier run's: this run's is written when it ends
    os.remove(report)
  batch_size = args.batch_size or int(cfg.seg_infer.batch_size if method == "seg"
                                      else cfg.random_walk.batch_size)
  batch_size = distributed.per_device_multiple(batch_size, devices)

  skipped = dict(problems)  # {path or pattern: why, naming it}
  for why in problems.values():
    print(f"[predict] skipping: {why}", flush=True)
  items = _items(files, skipped)
  records = {}
  read = functools.partial(_read_batch, scales=predictor.all_scales,
                           convention=models.input_convention(cfg), batch_size=batch_size,
                           max_side=args.max_side)
  batches = plan_batches(items, batch_size, args.max_side)
  with console.progress(len(items), "predict") as bar, \
      concurrent.futures.ThreadPoolExecutor(1) as reader:
    pending = reader.submit(read, batches[0]) if batches else None
    for k in range(len(batches)):
      batch = pending.result()
      if k + 1 < len(batches):  # the next batch is read while this one runs
        pending = reader.submit(read, batches[k + 1])
      for item, why in batch.failed:
        skipped[item.path] = why
        print(f"[predict] skipping: {why}", flush=True)
      if batch.items:
        results = predictor(batch.arrays, [item.path for item in batch.items])
        for item, image, result in zip(batch.items, batch.images, results):
          records[item.path] = _write(args.out, item, image, result, args.heatmaps)
      bar.update(len(batch.items) + len(batch.failed))

  seconds = round(time.time() - t0, 1)
  summary = {"written": len(records), "skipped": len(skipped), "seconds": seconds,
             "devices": devices}
  io.save_json(report, {
      **summary, "method": method, "networks": {n.folder: p for n, p in paths.items()},
      "config": config_source, "described": predictor.describe(), "max_side": args.max_side,
      "threshold": args.threshold if method == "walk" else None,
      "images": records, "skipped_files": skipped})
  print(f"[predict] labelled {len(records)} image(s) into {args.out} in {seconds:.1f} s on "
        f"{devices} device(s) ({predictor.describe()}); skipped {len(skipped)}"
        + (f", listed in {report}:" if skipped else ""), flush=True)
  for why in skipped.values():
    print(f"  {why}", flush=True)
  if not records:
    raise UserError(f"no image could be labelled: all {len(skipped)} input(s) were skipped "
                    f"(listed in {report})")
  return summary
