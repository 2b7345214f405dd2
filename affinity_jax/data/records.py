"""Reading a split of a tfds dataset: this host's share, encoded records, decoding, numpy batches.

What every input pipeline (data/pipelines.py) starts and ends with. Errors that our own code
raises inside tf.data (`fail`, from a `tf.numpy_function`) come back as `tf.errors.OpError`;
`numpy_batches` recovers them as the `UserError` they were.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from affinity_jax.errors import UserError

# Marks our messages inside tf.data's error text.
MARK = "[affinity_jax.data]"

Batch = dict[str, np.ndarray]


def host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this host: JAX's process index and count where None, checked."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


def host_split(builder, split: str, process_index: int, process_count: int):
  """This host's part of `split`: the whole split on one host, else an even share."""
  if split.split("[")[0] not in builder.info.splits:
    raise UserError(f"dataset {builder.name} has no split {split!r}; it has "
                    f"{sorted(builder.info.splits)}")
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count)[process_index]


def encoded(builder, split) -> tf.data.Dataset:
  """Encoded examples in stored order; decoding happens later, in the parallel map."""
  return builder.as_dataset(split=split, shuffle_files=False, decoders={
      "image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()})


def named(examples: tf.data.Dataset, names) -> tf.data.Dataset:
  """The examples of `examples` whose name is one of `names` (before any decoding)."""
  names = sorted(set(names))
  if not names:
    return examples.take(0)
  table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      tf.constant(names), tf.ones([len(names)], tf.int32)), default_value=0)
  return examples.filter(lambda ex: table.lookup(ex["name"]) > 0)


def decode_rgb(encoded_image: tf.Tensor) -> tf.Tensor:
  """Encoded image bytes -> uint8 [H, W, 3], the pixels that PIL's `convert("RGB")` gives.

  JPEGs are decoded with libjpeg's accurate integer DCT (ISLOW), the method PIL uses, which is
  what the original reads its images with; tf's default (the fast integer DCT) moves about two
  thirds of the values of a VOC photograph by up to a few levels. Greyscale JPEGs come out as
  three equal channels (CMYK ones are converted to RGB when the dataset is built, see
  voc_files.py). Other formats (the PNGs of
  `synthetic_wsss`) are lossless and decode alike everywhere.
  """
  image = tf.cond(
      tf.io.is_jpeg(encoded_image),
      lambda: tf.io.decode_jpeg(encoded_image, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(encoded_image, channels=3, expand_animations=False))
  return tf.ensure_shape(image, [None, None, 3])


def decode(example: dict) -> dict:
  """Decodes the image (RGB, see `decode_rgb`) and the mask (one channel) of an encoded
  example."""
  out = dict(example)
  out["image"] = decode_rgb(example["image"])
  out["mask"] = tf.ensure_shape(
      tf.io.decode_png(example["mask"], channels=1), [None, None, 1])
  return out


def num_examples(builder, split) -> int:
  return builder.info.splits[split].num_examples


def numpy_batches(ds: tf.data.Dataset) -> Iterator[Batch]:
  """Numpy batches; our own errors raised inside tf.data come out as UserError."""
  it = iter(tfds.as_numpy(ds))
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      found = re.search(re.escape(MARK) + r" (.*?)" + re.escape(MARK), e.message, re.S)
      if found:
        raise UserError(found.group(1)) from None
      raise
    yield batch


def fail(message: str):
  raise UserError(f"{MARK} {message}{MARK}")


def check_batch(batch_size: int) -> None:
  if batch_size <= 0:
    raise UserError(f"batch_size must be positive, got {batch_size}")


def check_files(builder, split, folder: str, suffix: str,
                exclude: frozenset[str] = frozenset()) -> None:
  """Raises, naming them, if files `{folder}/{name}{suffix}` of the split's images are missing
  (images in `exclude` need none)."""
  from affinity_jax.data import split_names  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(folder):
    raise UserError(f"folder {folder} does not exist (run the stage that writes it first)")
  missing = [os.path.join(folder, n + suffix) for n in split_names(builder, split)
             if n not in exclude and not os.path.isfile(os.path.join(folder, n + suffix))]
  if missing:
    raise UserError(f"{len(missing)} file(s) missing, e.g. {missing[0]}" +
                    (f" and {missing[1]}" if len(missing) > 1 else ""))
