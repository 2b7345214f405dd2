"""tf.data input pipelines of the trainings and of inference, yielding numpy batches.

Training: per-epoch seeded shuffle of the encoded records -> this host's rows of each global
batch -> decode + augment (parallel, order-preserving) -> batch(drop_remainder) -> prefetch,
endless. Every random op is stateless and seeded from (seed, example counter), so two runs with
one seed give identical batches on any number of hosts, and `start_step` resumes exactly where
an interrupted run stopped without replaying it.
Inference: each host reads its own even part of a split (data/records.py: `tfds.even_splits`);
no randomness, fixed shapes, and masked dummy examples that make every host run the same number
of batches.

Images are decoded as PIL decodes them (records.decode_rgb) and resized with PIL's bicubic on
the uint8 image (transforms.resize_image), as the original does, so they have its pixels.
They come out NHWC float32, normalised as (x / 255 - mean) / std with the ImageNet statistics,
or, with `convention="caffe_bgr"` (VGG-16), as BGR minus the Caffe mean pixel
(transforms.normalize). Padding of a normalised image is 0 (the mean colour), except in
AffinityNet training crops, padded black before normalising as the original's are; padding of
a label is 255.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Iterator, Sequence

import tensorflow as tf

from affinity_jax import artifacts
from affinity_jax.constants import IGNORE_LABEL as IGNORE
from affinity_jax.constants import STRIDE
from affinity_jax.data import records, transforms
from affinity_jax.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
Batch = records.Batch


def _train_stream(builder, split, *, seed: int, start_step: int, batch_size: int,
                  shuffle_buffer: int, process_index: int, process_count: int,
                  exclude: frozenset[str] = frozenset()) -> tuple[tf.data.Dataset, int]:
  """This host's part of an endless (example, per-example seed) stream, shuffled per epoch,
  starting at start_step; `batch_size` is this host's share of the global batch.

  The global stream (every example of the split in a per-epoch seeded order, each with a seed
  of its own) depends on the seed alone; host i of n takes rows [i * b, (i + 1) * b) of each
  global batch of n * b. So the global batches, and the training, are the same on any number
  of hosts; each host scans the encoded records of the whole split but decodes and augments
  only its own rows. Images named in `exclude` (those an earlier stage skipped) are left out
  before shuffling.
  """
  records.host_split(builder, split, 0, 1)  # checks the split exists
  examples = records.encoded(builder, split)
  count = records.num_examples(builder, split)
  if exclude:
    from affinity_jax.data import split_names  # pylint: disable=g-import-not-at-top
    count = sum(n not in exclude for n in split_names(builder, split))
    left_out = tf.constant(sorted(exclude))
    examples = examples.filter(
        lambda ex: tf.logical_not(tf.reduce_any(tf.equal(ex["name"], left_out))))
  if count == 0:
    raise UserError(f"dataset {builder.name} has no example in {split!r} to train on")
  global_batch = batch_size * process_count
  first = start_step * global_batch
  # Epoch e is shuffled with its own seed, so resuming can start at any epoch directly.
  epochs = tf.data.Dataset.counter(start=first // count)
  stream = epochs.flat_map(lambda e: examples.shuffle(
      max(1, min(shuffle_buffer, count)), seed=_shuffle_seed(seed, e),
      reshuffle_each_iteration=False))
  stream = stream.skip(first % count)
  # Per-example seeds: (run seed, global example counter).
  counter = tf.data.Dataset.counter(start=first)
  seeds = counter.map(lambda i: tf.stack([tf.constant(seed, tf.int64), i]))
  stream = tf.data.Dataset.zip((stream, seeds))
  if process_count > 1:
    stream = stream.filter(
        lambda example, s: (s[1] % global_batch) // batch_size == process_index)
  return stream, count


def _shuffle_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
  return tf.constant(seed, tf.int64) * 1_000_003 * 1_000_033 + epoch


def _numpy_batches(ds: tf.data.Dataset) -> Iterator[Batch]:
  """records.numpy_batches of `ds` without tf.data's autotuning model.

  When a stage drops an iterator (the trainer after its last step, or a stage that stops
  early), tf.data (2.21) waits in the iterator's destructor for the model's optimisation thread
  to end its current wait, which grows to a minute over a long run: the demo's training stages
  sat idle 27-49 s each there (experiments/RESULTS.md, "Shorter still"). AUTOTUNE then takes
  tf.data's fixed defaults (benchmark_input.py on 2 cores: VOC-shaped images as fast, within its
  noise; the 96-px synthetic ones 10-21 % slower to train on, far above what the steps take);
  the batches are the same.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return records.numpy_batches(ds.with_options(options))


def _finish_train(ds: tf.data.Dataset, batch_size: int) -> Iterator[Batch]:
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  return _numpy_batches(ds)


def _check_crop(crop_size: int) -> None:
  if crop_size <= 0 or crop_size % STRIDE:
    raise UserError(f"crop_size must be a positive multiple of {STRIDE}, got {crop_size}")


def _jitter(image, seed, color_jitter: Sequence[float] | None):
  if not color_jitter:
    return image
  b, c, s, h = color_jitter
  return transforms.color_jitter(image, seed, brightness=b, contrast=c, saturation=s, hue=h)


def cls_train(builder, split: str, *, batch_size: int, crop_size: int,
              resize_long: tuple[int, int] = (256, 512),
              color_jitter: Sequence[float] | None = (0.3, 0.3, 0.3, 0.1), seed: int = 0,
              start_step: int = 0, shuffle_buffer: int = 1024,
              process_index: int | None = None, process_count: int | None = None,
              convention: str = "imagenet") -> Iterator[Batch]:
  """Classification (CAM network) training batches, endless.

  Per image, as the original's train_cls.py: resize so the long side is a uniform integer in
  `resize_long` (`RandomResizeLong`: PIL bicubic on the uint8 image, transforms.resize_image),
  horizontal flip, colour jitter (brightness, contrast, saturation, hue; fixed order, see
  transforms.color_jitter), normalise, random crop_size crop with zero fill. The crop comes
  after normalising, as in the original, so its padding is the mean colour (0), not black.

  Yields:
    {"image": float32 [B, S, S, 3], "label": float32 [B, C]} with S = crop_size.
  """
  _check_crop(crop_size)
  records.check_batch(batch_size)
  index, count = records.host(process_index, process_count)
  stream, _ = _train_stream(builder, split, seed=seed, start_step=start_step,
                            batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                            process_index=index, process_count=count)
  low, high = resize_long

  def preprocess(example, seed):
    s_resize, s_flip, s_jitter, s_crop = transforms.split_seed(seed, 4)
    image = records.decode(example)["image"]
    [image] = transforms.random_resize_long([image], ["pil_bicubic"], low, high, s_resize)
    [image] = transforms.random_flip([tf.cast(image, tf.float32)], s_flip)
    image = _jitter(image, s_jitter, color_jitter)
    image = transforms.normalize(image, convention)
    [image] = transforms.random_crop([image], [0.0], crop_size, s_crop)
    return {"image": image, "label": example["label"]}

  ds = stream.map(preprocess, num_parallel_calls=AUTOTUNE, deterministic=True)
  return _finish_train(ds, batch_size)


def _load_scores(path: bytes, height, width, channels):
  try:
    return artifacts.load_scores(path.decode(), (height, width), channels)
  except UserError as e:  # It crosses tf.data as an OpError; `_numpy` recovers it.
    records.fail(str(e))


def aff_train(builder, split: str, score_dir: str, *, batch_size: int, crop_size: int,
              color_jitter: Sequence[float] | None = (0.3, 0.3, 0.3, 0.1),
              image_scale: float = 1.0, seed: int = 0,
              start_step: int = 0, shuffle_buffer: int = 1024,
              process_index: int | None = None, process_count: int | None = None,
              check: bool = True, exclude: frozenset[str] = frozenset(),
              convention: str = "imagenet") -> Iterator[Batch]:
  """AffinityNet training batches, endless (without the images in `exclude`).

  Reads `{score_dir}/{name}.npz` (keys "la", "ha": float32 [H, W, K+1], channel 0 background,
  K present classes). With `image_scale` != 1 the image (PIL bicubic on the uint8 image, as the
  inference pipeline resizes) and both score maps (bilinear) are first resized by that factor
  (the original: 1). The image and both score maps are flipped and cropped together with zero
  fill; colour jitter touches the image only, before the crop. As in the original's
  train_aff.py, the crop takes the 0..255 image and normalising comes after it, so padding is
  black, normalised (and has no score, so its labels are 255). Affinity labels on the stride-8
  grid then follow PSA step 3 (geometry.affinity_labels_tf).
  With `check`, every score file of the split's images must exist before the first batch.

  Yields:
    {"image": float32 [B, S, S, 3], "aff_label": uint8 [B, S/8, S/8]} (0 background,
    1..K present classes in score-map order, 255 not confident).
  """
  from affinity_jax.geometry import affinity_labels_tf  # pylint: disable=g-import-not-at-top
  _check_crop(crop_size)
  records.check_batch(batch_size)
  if not image_scale > 0:
    raise ValueError(f"aff_train: image_scale must be > 0, got {image_scale}")
  index, count = records.host(process_index, process_count)
  if check:
    # The whole split on every host: each reads rows of all of it (_train_stream), and all
    # stop here together, before the first collective step, if a file is missing.
    records.check_files(builder, split, score_dir, ".npz", exclude)
  stream, _ = _train_stream(builder, split, seed=seed, start_step=start_step,
                            batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                            process_index=index, process_count=count, exclude=exclude)
  score_dir = os.fspath(score_dir)
  channels = len(builder.class_names) + 1

  def preprocess(example, seed):
    s_flip, s_jitter, s_crop = transforms.split_seed(seed, 3)
    image = records.decode(example)["image"]
    shape = tf.shape(image)
    path = tf.strings.join([score_dir, "/", example["name"], ".npz"])
    la, ha = tf.numpy_function(_load_scores, [path, shape[0], shape[1], channels],
                               [tf.float32, tf.float32], stateful=False)
    la = tf.ensure_shape(la, [None, None, None])
    ha = tf.ensure_shape(ha, [None, None, None])
    if image_scale != 1.0:
      size = transforms.scaled_size(shape[0], shape[1], image_scale)
      image = transforms.resize_image(image, size)
      la, ha = transforms.resize([la, ha], size, ["bilinear", "bilinear"],
                                 antialias=image_scale < 1)
    image, la, ha = transforms.random_flip([tf.cast(image, tf.float32), la, ha], s_flip)
    image = _jitter(image, s_jitter, color_jitter)
    image, la, ha = transforms.random_crop([image, la, ha], [0.0, 0.0, 0.0], crop_size, s_crop)
    image = transforms.normalize(image, convention)
    # Zero channels up to 1 + num_classes give the static channel count that the label rule
    # wants; a zero score never wins an argmax that a real score could win, and does not change
    # the "no score" test. Done after the crop, where the maps are smallest.
    la, ha = (tf.ensure_shape(tf.pad(t, [[0, 0], [0, 0], [0, channels - tf.shape(t)[2]]]),
                              [crop_size, crop_size, channels]) for t in (la, ha))
    label = tf.ensure_shape(affinity_labels_tf(la, ha, STRIDE),
                            [crop_size // STRIDE, crop_size // STRIDE])
    return {"image": image, "aff_label": label}

  ds = stream.map(preprocess, num_parallel_calls=AUTOTUNE, deterministic=True)
  return _finish_train(ds, batch_size)


def _load_label(path: bytes, height, width, stage: str):
  try:
    return artifacts.load_label(path.decode(), stage, (height, width))[..., None]
  except UserError as e:
    records.fail(str(e))


def _labelled_train(builder, split: str, label_dir: str | None, *, stage: str,
                    methods: Sequence[str], outputs, batch_size: int, crop_size: int,
                    scale_range: tuple[float, float], resize_long: tuple[int, int] | None,
                    color_jitter: Sequence[float] | None, seed: int, start_step: int,
                    shuffle_buffer: int, process_index: int | None, process_count: int | None,
                    check: bool, exclude: frozenset[str], convention: str) -> Iterator[Batch]:
  """Training batches of an image and its label map `{label_dir}/{name}.png` (written by
  `stage`), or with label_dir=None the dataset's own masks, endless.

  Per image: scaled together by a factor uniform in `scale_range` (or to a long side uniform in
  `resize_long`) with `methods` (image, label; the image is given uint8), flipped, colour
  jittered, normalised and cropped (image fill 0, label fill 255). `outputs(image, label)`
  turns the float32 [S, S, 3] crop and its uint8 [S, S, 1] label into the example.
  """
  records.check_batch(batch_size)
  index, count = records.host(process_index, process_count)
  if check and label_dir is not None:
    # The whole split on every host: each reads rows of all of it (_train_stream), and all
    # stop here together, before the first collective step, if a file is missing.
    records.check_files(builder, split, label_dir, ".png", exclude)
  stream, _ = _train_stream(builder, split, seed=seed, start_step=start_step,
                            batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                            process_index=index, process_count=count, exclude=exclude)
  load_label = functools.partial(_load_label, stage=stage)

  def preprocess(example, seed):
    s_scale, s_flip, s_jitter, s_crop = transforms.split_seed(seed, 4)
    example = records.decode(example)
    image = example["image"]
    if label_dir is None:
      label = example["mask"]
    else:
      shape = tf.shape(image)
      path = tf.strings.join([os.fspath(label_dir), "/", example["name"], ".png"])
      label = tf.numpy_function(load_label, [path, shape[0], shape[1]], tf.uint8,
                                stateful=False)
      label = tf.ensure_shape(label, [None, None, 1])
    if resize_long is not None:
      image, label = transforms.random_resize_long([image, label], methods, *resize_long,
                                                   s_scale)
    else:
      image, label = transforms.random_scale([image, label], methods, *scale_range, s_scale)
    image, label = transforms.random_flip([tf.cast(image, tf.float32), label], s_flip)
    image = transforms.normalize(_jitter(image, s_jitter, color_jitter), convention)
    image, label = transforms.random_crop([image, label], [0.0, IGNORE], crop_size, s_crop)
    return outputs(image, label)

  ds = stream.map(preprocess, num_parallel_calls=AUTOTUNE, deterministic=True)
  return _finish_train(ds, batch_size)


def seg_train(builder, split: str, label_dir: str | None, *, batch_size: int, crop_size: int,
              scale_range: tuple[float, float] = (0.7, 1.3),
              resize_long: tuple[int, int] | None = None,
              color_jitter: Sequence[float] | None = None, seed: int = 0, start_step: int = 0,
              shuffle_buffer: int = 1024, process_index: int | None = None,
              process_count: int | None = None, check: bool = True,
              exclude: frozenset[str] = frozenset(),
              convention: str = "imagenet") -> Iterator[Batch]:
  """Segmentation training batches, endless (without the images in `exclude`).

  Labels are the pseudo labels `{label_dir}/{name}.png` (uint8 [H, W], 255 ignored), or with
  label_dir=None the dataset's own masks (a fully supervised sanity check; images without a mask
  are all 255). Image and label are scaled together (by a factor uniform in `scale_range`, or to a
  long side uniform in `resize_long` when given; bilinear / nearest), flipped, optionally colour
  jittered, normalised and cropped (image fill 0, label fill 255).

  Yields:
    {"image": float32 [B, S, S, 3], "label": int32 [B, S, S]}.
  """
  _check_crop(crop_size)
  return _labelled_train(
      builder, split, label_dir, stage="random_walk", methods=("bilinear", "nearest"),
      outputs=lambda image, label: {"image": image, "label": tf.cast(label[..., 0], tf.int32)},
      batch_size=batch_size, crop_size=crop_size, scale_range=scale_range,
      resize_long=resize_long, color_jitter=color_jitter, seed=seed, start_step=start_step,
      shuffle_buffer=shuffle_buffer, process_index=process_index, process_count=process_count,
      check=check, exclude=exclude, convention=convention)


def relation_train(builder, split: str, label_dir: str | None, *, batch_size: int,
                   crop_size: int, scale_range: tuple[float, float] = (0.5, 1.5),
                   color_jitter: Sequence[float] | None = None, seed: int = 0,
                   start_step: int = 0, shuffle_buffer: int = 1024,
                   process_index: int | None = None, process_count: int | None = None,
                   check: bool = True, exclude: frozenset[str] = frozenset(),
                   convention: str = "imagenet", stride: int = 4) -> Iterator[Batch]:
  """IRN's relation network training batches, endless (without the images in `exclude`).

  Labels are IRN's confident-region labels `{label_dir}/{name}.png` (uint8 [H, W]: 0
  background, 1..254 foreground, 255 unsure; relation_labels.relation_labels, written by the
  aff_labels stage), or with label_dir=None the dataset's own masks (a sanity check).
  Per image, as IRN's VOC12AffinityDataset in step/train_irn.py:
  - image and label rescaled together by a factor s uniform in `scale_range` to
    round(h * s) x round(w * s) (imutils.random_scale: PIL's bicubic on the uint8 image, PIL's
    nearest on the label; here by PIL itself, transforms.resize_image and resize_label, so
    with IRN's pixels);
  - flipped left-right with probability 1/2 and normalised (IRN normalises first; the two
    commute);
  - cropped to crop_size x crop_size (imutils.random_crop): a random window of a longer side, a
    random place in the crop for a shorter one, filled with 0 (the mean colour: the crop
    follows normalising) in the image and 255 in the label;
  - the label reduced to the stride grid, round(S / stride) a side (transforms.reduce_label_tf,
    IRN's pil_rescale(label, 0.25, 0); tests/reference_relation_labels.py is PIL's own).
  IRN has no colour jitter; `color_jitter` (brightness, contrast, saturation, hue; before
  normalising) is off by default. The pair labels (IRN's aff_bg_pos_label, aff_fg_pos_label,
  aff_neg_label: relation_labels.relation_pair_labels) are for the consumer to make from
  "relation_label".
  With `check`, every label file of the split's images must exist before the first batch.

  Args:
    stride: the relation grid's stride (IRN: 4, constants.IRN_STRIDE); crop_size must
      be a positive multiple of it.

  Yields:
    {"image": float32 [B, S, S, 3], "relation_label": uint8 [B, S / stride, S / stride]} with
    S = crop_size (0 background, 1..254 foreground, 255 unsure or outside the image).
  """
  if isinstance(stride, bool) or int(stride) != stride or stride < 1:
    raise ValueError(f"relation_train: stride must be a positive integer, got {stride!r}")
  if crop_size <= 0 or crop_size % stride:
    raise UserError(f"crop_size must be a positive multiple of {stride}, got {crop_size}")
  stride = int(stride)
  return _labelled_train(
      builder, split, label_dir, stage="aff_labels", methods=("pil_bicubic", "pil_nearest"),
      outputs=lambda image, label: {
          "image": image, "relation_label": transforms.reduce_label_tf(label[..., 0], stride)},
      batch_size=batch_size, crop_size=crop_size, scale_range=scale_range, resize_long=None,
      color_jitter=color_jitter, seed=seed, start_step=start_step,
      shuffle_buffer=shuffle_buffer, process_index=process_index, process_count=process_count,
      check=check, exclude=exclude, convention=convention)


def canvas_for_scale(canvas: tuple[int, int], scale: float) -> tuple[int, int]:
  """The fixed padded size at one scale: ceil(canvas * scale / 8) * 8 per side."""
  return tuple(int(math.ceil(c * scale / STRIDE)) * STRIDE for c in canvas)


def inference_num_batches(builder, split: str, batch_size: int, process_count: int) -> int:
  """Batches every host runs: enough for the largest host share."""
  parts = [records.host_split(builder, split, i, process_count) for i in range(process_count)]
  most = max(records.num_examples(builder, p) for p in parts)
  return max(1, math.ceil(most / batch_size))


def inference_inputs(image: tf.Tensor, *, scales: Sequence[float], canvas: tuple[int, int],
                     convention: str = "imagenet") -> dict[str, tf.Tensor]:
  """The multi-scale inputs of one uint8 [H, W, 3] image no larger than `canvas`, as `inference`
  makes them (inside tf.data) and `affinity-jax predict` does (eagerly, per image).

  Returns:
    image_s{i}: float32 [Hc_i, Wc_i, 3] (the image resized by scales[i] with PIL's bicubic,
    normalised, zero padded to canvas_for_scale(canvas, scales[i])); size_s{i}: int32 [2]
    (resized h, w); orig_size: int32 [2] (h, w); raw: uint8 [Hc, Wc, 3] (zero padded).
  """
  canvas_h, canvas_w = (int(c) for c in canvas)
  shape = tf.shape(image)
  out = {}
  for i, s in enumerate(scales):
    size = transforms.scaled_size(shape[0], shape[1], s)
    resized = transforms.resize_image(image, size)
    out[f"image_s{i}"] = transforms.pad_to(transforms.normalize(resized, convention),
                                           *canvas_for_scale((canvas_h, canvas_w), s), 0.0)
    out[f"size_s{i}"] = size
  out["orig_size"] = shape[:2]
  out["raw"] = transforms.pad_to(image, canvas_h, canvas_w, 0)
  return out


def inference(builder, split: str, *, scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
              canvas: tuple[int, int] = (512, 512), batch_size: int,
              process_index: int | None = None, process_count: int | None = None,
              convention: str = "imagenet",
              names: Sequence[str] | None = None) -> Iterator[Batch]:
  """Multi-scale inference batches of fixed shapes, in the split's stored order: of this host's
  even part of the split, or with `names`, of those images of the whole split (any host; the
  records of the others are passed over undecoded).

  For each image and scale s (index i): the image resized by s to round(h * s) x round(w * s)
  (Python's round) with PIL's bicubic on the uint8 image (transforms.resize_image), as the
  original's multi-scale inference does, normalised, padded bottom/right with 0 to
  canvas_for_scale(canvas, s). Flips are for the consumer to do on device. The last batch is
  completed with dummy examples (valid False), and without `names` every host runs
  `inference_num_batches`.
  An image larger than the canvas is never resized (memory stays what the canvas allows): it
  comes as a 1 x 1 black stand-in with valid False and its own size in `image_size`, for the
  stage to report (`pending`).

  Yields:
    image_s{i}: float32 [B, Hc_i, Wc_i, 3]; size_s{i}: int32 [B, 2] (resized h, w);
    orig_size: int32 [B, 2] (h, w of what the canvas holds); image_size: int32 [B, 2] (h, w of
    the stored image); raw: uint8 [B, Hc, Wc, 3] (the image as decoded, zero padded, for dCRF);
    name: bytes [B]; label: float32 [B, C]; mask: uint8 [B, Hc, Wc] (255 padded);
    valid: bool [B].
  """
  records.check_batch(batch_size)
  index, count = records.host(process_index, process_count)
  canvas_h, canvas_w = (int(c) for c in canvas)
  part = records.host_split(builder, split, index, count)
  if names is None:
    examples = records.encoded(builder, part)
    real = records.num_examples(builder, part)
    padded_count = inference_num_batches(builder, split, batch_size, count) * batch_size
  else:
    from affinity_jax.data import split_names  # pylint: disable=g-import-not-at-top
    stored = split_names(builder, split)
    wanted = set(names) & set(stored)
    if not wanted:
      return iter(())
    examples = records.named(records.encoded(builder, split), wanted)
    real = sum(n in wanted for n in stored)  # the records the filter lets through
    padded_count = math.ceil(real / batch_size) * batch_size

  def preprocess(example):
    example = records.decode(example)
    image_size = tf.shape(example["image"])[:2]
    fits = tf.reduce_all(image_size <= [canvas_h, canvas_w])
    image, mask = tf.cond(fits, lambda: (example["image"], example["mask"]),
                          lambda: (tf.zeros([1, 1, 3], tf.uint8),
                                   tf.fill([1, 1, 1], tf.constant(IGNORE, tf.uint8))))
    out = inference_inputs(image, scales=scales, canvas=(canvas_h, canvas_w),
                           convention=convention)
    out["image_size"] = image_size
    out["mask"] = transforms.pad_to(mask, canvas_h, canvas_w, IGNORE)[..., 0]
    out["name"] = example["name"]
    out["label"] = example["label"]
    out["valid"] = fits
    return out

  ds = examples.map(preprocess, num_parallel_calls=AUTOTUNE, deterministic=True)
  dummy = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec)
  dummy["mask"] = tf.fill(ds.element_spec["mask"].shape, tf.constant(IGNORE, tf.uint8))
  missing = padded_count - real
  ds = ds.concatenate(tf.data.Dataset.from_tensors(dummy).repeat(missing))
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  return _numpy_batches(ds)
