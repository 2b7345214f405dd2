"""IRN's relation-network input pipeline (pipelines.relation_train) and its two label ops:
transforms.resize_label (PIL's nearest) and transforms.reduce_label_tf (the stride grid)."""

import inspect
import itertools
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from affinity_jax import constants, data
from affinity_jax.data import pipelines, transforms
from affinity_jax.errors import UserError
from tests import reference_relation_labels

ONE_HOST = dict(process_index=0, process_count=1)
VALUES = (0, 5, 9)  # what the label files hold (no 255: there 255 means padding)


def _both_ways(fn, *args):
  """fn(*args) eagerly and inside a tf.data map (graph mode), as numpy."""
  eager = fn(*args)
  graph = next(iter(tf.data.Dataset.from_tensors(tuple(args)).map(lambda *a: fn(*a))))
  return np.asarray(eager), np.asarray(graph)


def _take(it, n):
  return list(itertools.islice(it, n))


# ----------------------------------------------------------------------------------------------
# The label ops


@pytest.mark.parametrize("height, width", [(26, 30), (30, 26), (50, 510), (510, 50), (7, 9),
                                           (13, 11), (3, 5), (512, 512), (66, 102)])
def test_reduce_label_tf_is_reduce_label(height, width):
  # 26 / 4 = 6.5 -> 6, 30 / 4 = 7.5 -> 8, 50 / 4 -> 12, 510 / 4 -> 128 (half to even).
  label = np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width),
                                                                dtype=np.uint8)
  want = reference_relation_labels.reduce_label(label)
  assert want.shape == (round(height / 4), round(width / 4))
  for got in _both_ways(lambda t: transforms.reduce_label_tf(t, 4), label):
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
  # Trailing axes ride along: [H, W, 1] gives [h, w, 1].
  with_channel = transforms.reduce_label_tf(label[..., None], 4).numpy()
  np.testing.assert_array_equal(with_channel[..., 0], want)


def test_reduce_label_tf_by_hand():
  # At a multiple of the stride, cell i takes the row of its centre's lower neighbour: 2, 6, ...
  label = (np.arange(24 * 32).reshape(24, 32) % 256).astype(np.uint8)
  np.testing.assert_array_equal(transforms.reduce_label_tf(label, 4).numpy(), label[2::4, 2::4])
  np.testing.assert_array_equal(transforms.reduce_label_tf(label, 2).numpy(), label[1::2, 1::2])
  np.testing.assert_array_equal(transforms.reduce_label_tf(label, 1).numpy(), label)


def test_reduce_label_tf_static_shape():
  spec = tf.TensorSpec([30, 26], tf.uint8)
  out = tf.function(lambda t: transforms.reduce_label_tf(t, 4)).get_concrete_function(spec)
  assert out.output_shapes.as_list() == [8, 6]


def test_stride_rule_is_pils_for_every_size_up_to_2048():
  """reduce_label_tf's rule, row i <- floor((2i + 1) H / 2h), against PIL's nearest resize of
  an index row to h = round(H / 4), for every H: PIL's double-precision stepping never puts a
  centre on the other side of an edge (see reduce_label_tf)."""
  for size in range(3, 2049):  # 1 and 2 have no cell
    reduced = round(size / 4)
    row = Image.fromarray(np.arange(size, dtype=np.int32)[None], mode="I")
    pil = np.asarray(row.resize((reduced, 1), Image.Resampling.NEAREST))[0]
    rule = (2 * np.arange(reduced) + 1) * size // (2 * reduced)
    np.testing.assert_array_equal(pil, rule, err_msg=f"H = {size}")


@pytest.mark.parametrize("size, new_size", [((40, 60), (60, 90)), ((37, 51), (19, 26)),
                                            ((20, 20), (20, 20))])
def test_resize_label_is_pils_nearest(size, new_size):
  # 40 -> 60 puts centres exactly on edges (row 1: 1.5 * 40 / 60 = 1), where PIL's stepping in
  # doubles decides; 37 -> 19 shrinks, 20 -> 20 is the identity.
  label = np.random.default_rng(1).integers(0, 256, size + (1,), dtype=np.uint8)
  want = np.asarray(Image.fromarray(label[..., 0]).resize(new_size[::-1],
                                                           Image.Resampling.NEAREST))
  for got in _both_ways(lambda t: transforms.resize([t], new_size, ["pil_nearest"])[0],
                        label):
    assert got.shape == new_size + (1,) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], want)
  with pytest.raises(TypeError, match="uint8"):
    transforms.resize_label(label.astype(np.int32), new_size)


# ----------------------------------------------------------------------------------------------
# The pipeline


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
  """6 train images of 36 to 60 pixels a side, each with a random label file of VALUES."""
  builder = data.get_builder("synthetic_wsss", tmp_path_factory.mktemp("tfds_relation"),
                             config="tiny", size_range=(36, 60), num_train=6, num_val=1)
  return builder


def _stored(builder):
  return {ex["name"].decode(): ex["image"]
          for ex in tfds.as_numpy(builder.as_dataset(split="train"))}


def _write_labels(builder, folder):
  """Random per-pixel labels from VALUES, a different map per image: {name: uint8 [H, W]}."""
  os.makedirs(folder, exist_ok=True)
  labels = {}
  for i, (name, image) in enumerate(sorted(_stored(builder).items())):
    labels[name] = np.random.default_rng(i).choice(np.array(VALUES, np.uint8),
                                                   image.shape[:2])
    Image.fromarray(labels[name]).save(os.path.join(folder, name + ".png"))
  return labels


def _padding(image):
  """[S, S, 3] normalised crop -> bool [S, S], where it is fill. A normalised uint8 pixel is
  never exactly 0 in all channels (255 * mean is not an integer), so fill alone is 0."""
  return (image == 0).all(-1)


def test_shapes_values_padding_and_determinism(varied, tmp_path):
  _write_labels(varied, tmp_path)
  # Scaled 0.5..1.5, images are 18 to 90 a side: some crops are windows, some padded.
  kw = dict(batch_size=4, crop_size=48, seed=3, **ONE_HOST)
  run = _take(pipelines.relation_train(varied, "train", str(tmp_path), **kw), 4)
  again = _take(pipelines.relation_train(varied, "train", str(tmp_path), **kw), 4)
  padded = windowed = 0
  for b, c in zip(run, again):
    assert set(b) == {"image", "relation_label"}
    assert b["image"].shape == (4, 48, 48, 3) and b["image"].dtype == np.float32
    assert b["relation_label"].shape == (4, 12, 12) and b["relation_label"].dtype == np.uint8
    for key in b:
      np.testing.assert_array_equal(b[key], c[key])
    for image, label in zip(b["image"], b["relation_label"]):
      padding = _padding(image)
      padded += padding.any()
      windowed += not padding.any()
      # Cell (i, j) samples pixel (4i + 2, 4j + 2): 255 exactly where that is padding, else a
      # value of the file.
      np.testing.assert_array_equal(label == 255, padding[2::4, 2::4])
      assert set(np.unique(label[label != 255])) <= set(VALUES)
  assert padded and windowed
  # Resuming at step 2 continues the run exactly; another seed gives other batches.
  resumed = _take(pipelines.relation_train(varied, "train", str(tmp_path), start_step=2, **kw),
                  2)
  for a, b in zip(run[2:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = next(pipelines.relation_train(varied, "train", str(tmp_path), **{**kw, "seed": 4}))
  assert not np.array_equal(other["image"], run[0]["image"])


@pytest.mark.parametrize("scale", [1.0, 0.75, 1.5])
def test_batches_are_irns_rescale_flip_crop_and_reduction(varied, tmp_path, scale):
  """With a fixed scale and a crop larger than every scaled image, each example is rebuilt
  from its files as IRN builds it: PIL bicubic (image) and nearest (label) to round(h * s),
  maybe flipped, normalised, placed in the crop (fill 0 and 255), the label reduced by
  PIL (tests/reference_relation_labels.py). Exact, pixel for pixel."""
  labels = _write_labels(varied, tmp_path)
  stored = _stored(varied)
  crop = 96  # 60 * 1.5 = 90 fits
  kw = dict(batch_size=3, crop_size=crop, scale_range=(scale, scale), seed=11, **ONE_HOST)
  seen = set()
  for b in _take(pipelines.relation_train(varied, "train", str(tmp_path), **kw), 2):
    for image, reduced in zip(b["image"], b["relation_label"]):
      rows, cols = np.nonzero(~_padding(image))
      top, left = rows.min(), cols.min()
      h, w = rows.max() + 1 - top, cols.max() + 1 - left
      window = image[top:top + h, left:left + w]
      matches = []
      for name, raw in stored.items():
        if (round(raw.shape[0] * scale), round(raw.shape[1] * scale)) != (h, w):
          continue
        want = np.asarray(Image.fromarray(raw).resize((w, h), Image.Resampling.BICUBIC))
        want = transforms.normalize(want).numpy()
        label = np.asarray(Image.fromarray(labels[name]).resize((w, h),
                                                                Image.Resampling.NEAREST))
        for flip in (False, True):
          if np.array_equal(window, want[:, ::-1] if flip else want):
            matches.append((name, flip, label[:, ::-1] if flip else label))
      assert len(matches) == 1, f"{len(matches)} stored images fit this crop"
      name, flip, label = matches[0]
      seen.add((name, flip))
      full = np.full((crop, crop), 255, np.uint8)
      full[top:top + h, left:left + w] = label
      np.testing.assert_array_equal(reduced, reference_relation_labels.reduce_label(full))
  assert len({name for name, _ in seen}) >= 3 and {flip for _, flip in seen} == {False, True}


def test_missing_label_file_is_named(varied, tmp_path):
  _write_labels(varied, tmp_path)
  kw = dict(batch_size=6, crop_size=64, seed=1, **ONE_HOST)
  os.remove(tmp_path / "train_00003.png")
  with pytest.raises(UserError, match="train_00003.png"):
    pipelines.relation_train(varied, "train", str(tmp_path), **kw)
  # Without the up-front check the reader names it, and the stage that writes it (one batch
  # holds every image).
  with pytest.raises(UserError, match="train_00003.png.*aff_labels"):
    next(pipelines.relation_train(varied, "train", str(tmp_path), check=False, **kw))
  # Left out, it is not needed.
  b = next(pipelines.relation_train(varied, "train", str(tmp_path), **{**kw, "batch_size": 5},
                                    exclude=frozenset({"train_00003"})))
  assert b["relation_label"].shape == (5, 16, 16)


def test_same_batches_on_two_hosts(varied, tmp_path):
  _write_labels(varied, tmp_path)

  def make(start, batch_size, index, count):
    return pipelines.relation_train(varied, "train", str(tmp_path), batch_size=batch_size,
                                    crop_size=32, seed=7, start_step=start,
                                    process_index=index, process_count=count)

  for start in (0, 2):
    whole = _take(make(start, 4, 0, 1), 2)
    shares = [_take(make(start, 2, i, 2), 2) for i in range(2)]
    for step, expected in enumerate(whole):
      for key, value in expected.items():
        joined = np.concatenate([share[step][key] for share in shares])
        np.testing.assert_array_equal(joined, value, err_msg=f"{key} at step {start + step}")


def test_arguments(varied, tmp_path):
  default = inspect.signature(pipelines.relation_train).parameters["stride"].default
  assert default == constants.IRN_STRIDE
  with pytest.raises(UserError, match="multiple of 4"):
    pipelines.relation_train(varied, "train", str(tmp_path), batch_size=2, crop_size=30,
                             **ONE_HOST)
  with pytest.raises(ValueError, match="stride"):
    pipelines.relation_train(varied, "train", str(tmp_path), batch_size=2, crop_size=32,
                             stride=0, **ONE_HOST)
