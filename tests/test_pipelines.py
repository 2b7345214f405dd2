"""Joint transforms (eagerly and inside tf.data) and the four pipelines on tiny synthetic data."""

import itertools
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from affinity_jax import data
from affinity_jax.data import pipelines, transforms
from affinity_jax.errors import UserError

SEED = tf.constant([3, 7], tf.int64)
ONE_HOST = dict(process_index=0, process_count=1)
BLACK = transforms.normalize(np.zeros(3, np.uint8)).numpy()  # a black pixel, normalised


def _black(images):
  """[..., 3] -> [...]: where a normalised image is black (AffinityNet's crop padding)."""
  return np.isclose(images, BLACK, rtol=0, atol=1e-6).all(-1)


def _coords(height, width):
  """float32 [H, W, 3] image whose pixels encode their own (y, x), and an int label twin."""
  yy, xx = np.mgrid[0:height, 0:width]
  image = np.stack([yy, xx, np.full_like(yy, 7)], -1).astype(np.float32) + 1.0
  label = (yy * 1000 + xx + 1).astype(np.int32)[..., None]
  return image, label


def _both_ways(fn, *args):
  """fn(*args) eagerly and inside a tf.data map (graph mode)."""
  eager = fn(*args)
  ds = tf.data.Dataset.from_tensors(tuple(args)).map(lambda *a: fn(*a))
  graph = next(iter(ds))
  return tf.nest.map_structure(np.asarray, eager), tf.nest.map_structure(np.asarray, graph)


# ----------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.parametrize("height, width", [(30, 50), (12, 9)])
def test_random_crop_joint_window_and_fill(height, width):
  image, label = _coords(height, width)
  crop = 16
  fn = lambda im, lb, s: transforms.random_crop([im, lb], [0.0, 255], crop, s)
  for seed in ([1, 2], [5, 9], [11, 4]):
    eager, graph = _both_ways(fn, image, label, tf.constant(seed, tf.int64))
    for (im, lb) in (eager, graph):
      assert im.shape == (crop, crop, 3) and lb.shape == (crop, crop, 1)
      inside = lb[..., 0] != 255
      # Filled where outside the image: image 0, label 255, in the same places.
      assert (im[~inside] == 0).all() and (im[inside] > 0).all()
      assert inside.sum() == min(height, crop) * min(width, crop)
      # Inside: a contiguous window of the original, the same window for image and label.
      ys, xs = np.nonzero(inside)
      y0, x0 = int(im[ys[0], xs[0], 0] - 1), int(im[ys[0], xs[0], 1] - 1)
      window = (slice(y0, y0 + min(height, crop)), slice(x0, x0 + min(width, crop)))
      np.testing.assert_array_equal(im[inside].reshape(-1, 3),
                                    image[window].reshape(-1, 3))
      np.testing.assert_array_equal(lb[inside][:, 0], label[window].reshape(-1))
    for a, b in zip(eager, graph):
      np.testing.assert_array_equal(a, b)


def test_random_crop_covers_offsets():
  image, label = _coords(20, 20)
  starts = set()
  for i in range(40):
    im, _ = transforms.random_crop([image, label], [0.0, 255], 16, tf.constant([i, 0]))
    starts.add(int(im.numpy()[0, 0, 0]))
  assert starts == set(range(1, 6))  # every start 0..4 occurs (encoded +1)


def test_random_flip_joint():
  image, label = _coords(6, 9)
  seen = set()
  for i in range(12):
    eager, graph = _both_ways(lambda im, lb, s: transforms.random_flip([im, lb], s),
                              image, label, tf.constant([i, 1], tf.int64))
    for a, b in zip(eager, graph):
      np.testing.assert_array_equal(a, b)
    im, lb = eager
    flipped = bool(im[0, 0, 1] != 1)
    seen.add(flipped)
    want_im, want_lb = (image[:, ::-1], label[:, ::-1]) if flipped else (image, label)
    np.testing.assert_array_equal(im, want_im)
    np.testing.assert_array_equal(lb, want_lb)
  assert seen == {True, False}


def test_random_resize_long_keeps_aspect_and_label_values():
  image = np.random.default_rng(0).uniform(0, 255, (30, 60, 3)).astype(np.float32)
  label = np.zeros((30, 60, 1), np.uint8)
  label[:, 30:] = 3
  label[0] = 255
  fn = lambda im, lb, s: transforms.random_resize_long([im, lb], ["bilinear", "nearest"],
                                                        40, 90, s)
  longs = set()
  for i in range(6):
    eager, graph = _both_ways(fn, image, label, tf.constant([i, 2], tf.int64))
    np.testing.assert_allclose(eager[0], graph[0], atol=1e-3)
    np.testing.assert_array_equal(eager[1], graph[1])
    im, lb = eager
    h, w = im.shape[:2]
    assert 40 <= w <= 90 and h == round(w / 2) and lb.shape[:2] == (h, w)
    assert lb.dtype == np.uint8 and set(np.unique(lb)) == {0, 3, 255}
    longs.add(w)
  assert len(longs) > 1


def test_color_jitter_range_determinism_and_identity():
  image = np.random.default_rng(1).uniform(0, 255, (8, 8, 3)).astype(np.float32)
  eager, graph = _both_ways(lambda im, s: transforms.color_jitter(im, s), image, SEED)
  np.testing.assert_allclose(eager, graph, atol=1e-3)
  assert eager.min() >= 0 and eager.max() <= 255 and not np.allclose(eager, image, atol=1)
  other = transforms.color_jitter(image, tf.constant([4, 4], tf.int64)).numpy()
  assert not np.allclose(eager, other, atol=1)
  same = transforms.color_jitter(image, SEED, brightness=0, contrast=0, saturation=0,
                                 hue=0).numpy()
  np.testing.assert_allclose(same, image, atol=0.05)


def test_scaled_size_rounds_half_to_even():
  sizes = [transforms.scaled_size(h, w, 0.5).numpy().tolist() for h, w in ((125, 375), (3, 1))]
  assert sizes == [[62, 188], [2, 1]]  # 62.5 -> 62, 187.5 -> 188, 1.5 -> 2; at least 1


def test_normalize_and_pad_to():
  pixel = np.array([[[255, 0, 124]]], np.uint8)
  want = (np.array([1.0, 0.0, 124 / 255]) - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD
  for out in _both_ways(transforms.normalize, pixel):
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], want, rtol=1e-6)
  eager, graph = _both_ways(lambda x: transforms.pad_to(x, 4, 5, 255),
                            np.ones((2, 3, 1), np.uint8))
  for p in (eager, graph):
    assert p.shape == (4, 5, 1) and p[:2, :3].sum() == 6 and (p[2:] == 255).all()
    assert (p[:, 3:] == 255).all()


# ----------------------------------------------------------------------------------------------
# Pipelines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return data.get_builder("synthetic_wsss", tmp_path_factory.mktemp("tfds"), config="tiny")


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
  return data.get_builder("synthetic_wsss", tmp_path_factory.mktemp("tfds_varied"),
                          config="tiny", size_range=(36, 60), num_train=6, num_val=7)


def _take(it, n):
  return list(itertools.islice(it, n))


def test_cls_train_shapes_range_determinism_resume(tiny):
  kw = dict(batch_size=4, crop_size=48, resize_long=(40, 56), seed=5, **ONE_HOST)
  run1 = _take(pipelines.cls_train(tiny, "train", **kw), 5)
  run2 = _take(pipelines.cls_train(tiny, "train", **kw), 5)
  for b in run1:
    assert b["image"].shape == (4, 48, 48, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (4, 3) and b["label"].dtype == np.float32
    lo = (0 - np.array(transforms.IMAGENET_MEAN)) / transforms.IMAGENET_STD
    hi = (1 - np.array(transforms.IMAGENET_MEAN)) / transforms.IMAGENET_STD
    assert (b["image"] >= lo.min() - 1e-5).all() and (b["image"] <= hi.max() + 1e-5).all()
  for a, b in zip(run1, run2):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # 5 batches of 4 cross the epoch boundary (16 images); resuming at step 3 continues exactly.
  resumed = _take(pipelines.cls_train(tiny, "train", start_step=3, **kw), 2)
  for a, b in zip(run1[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  other = next(pipelines.cls_train(tiny, "train", **{**kw, "seed": 6}))
  assert not np.array_equal(other["image"], run1[0]["image"])
  # A long side of at most 40 is shorter than the 48 crop: every crop has zero fill, none is
  # all fill.
  small = next(pipelines.cls_train(tiny, "train", **{**kw, "resize_long": (32, 40)}))
  padding = (small["image"] == 0).all(-1)
  assert padding.any(axis=(1, 2)).all()
  assert not padding.all(axis=(1, 2)).any()


def _write_scores(builder, split, folder, kind):
  """la / ha per image: uniform maps with a known affinity label (see test)."""
  os.makedirs(folder, exist_ok=True)
  for ex in tfds.as_numpy(builder.as_dataset(split=split)):
    h, w = ex["image"].shape[:2]
    k = int(ex["label"].sum())
    la = np.full((h, w, k + 1), 0.1, np.float32)
    ha = la.copy()
    if kind == "fg":      # confident foreground, last present class
      la[..., k] = 0.9
      ha[..., k] = 0.9
    elif kind == "bg":    # confident background
      ha[..., 0] = 0.9
    # "unsure": la's argmax is background, ha's is not -> 255
    elif kind == "unsure":
      la[..., 0] = 0.9
      ha[..., k] = 0.9
    np.savez(os.path.join(folder, ex["name"].decode() + ".npz"), la=la, ha=ha)


def _stored_images(builder, split, size=None):
  """The images of a split, PIL-resized to size = (h, w) when given, normalised, each also
  flipped: float32 [h, w, 3]."""
  images = []
  for ex in tfds.as_numpy(builder.as_dataset(split=split)):
    image = ex["image"]
    if size is not None:
      image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BICUBIC))
    image = transforms.normalize(image).numpy()
    images += [image, image[:, ::-1]]
  return images


def _window(crop, images):
  """(top, left, h, w) such that crop[top:top + h, left:left + w] is one of `images`."""
  for im in images:
    h, w = im.shape[:2]
    for top in range(crop.shape[0] - h + 1):
      for left in range(crop.shape[1] - w + 1):
        if (np.abs(crop[top, left] - im[0, 0]).max() < 1e-5
            and np.abs(crop[top:top + h, left:left + w] - im).max() < 1e-5):
          return top, left, h, w
  raise AssertionError("no stored image in this crop")


@pytest.mark.parametrize("kind", ["fg", "bg", "unsure"])
def test_aff_train_labels_and_padding(tiny, tmp_path, kind):
  _write_scores(tiny, "train", tmp_path, kind)
  # Without colour jitter, so that the crops show the stored pixels (_window).
  kw = dict(batch_size=4, crop_size=80, seed=1, color_jitter=None, **ONE_HOST)
  batches = _take(pipelines.aff_train(tiny, "train", str(tmp_path), **kw), 2)
  again = _take(pipelines.aff_train(tiny, "train", str(tmp_path), **kw), 2)
  images = _stored_images(tiny, "train")
  for b, c in zip(batches, again):
    np.testing.assert_array_equal(b["image"], c["image"])
    np.testing.assert_array_equal(b["aff_label"], c["aff_label"])
    assert b["image"].shape == (4, 80, 80, 3)
    assert b["aff_label"].shape == (4, 10, 10) and b["aff_label"].dtype == np.uint8
    for image, label in zip(b["image"], b["aff_label"]):
      # A 64x64 image in an 80 crop. Its padding is black, normalised, as the original crops
      # the 0..255 image and normalises after; not 0, the mean colour.
      top, left, h, w = _window(image, images)
      padding = np.ones((80, 80), bool)
      padding[top:top + h, left:left + w] = False
      assert _black(image[padding]).all() and not (image[padding] == 0).any()
      # Each 8x8 cell that is all padding has no score, so its label is 255.
      padding_cell = padding.reshape(10, 8, 10, 8).all(axis=(1, 3))
      assert padding_cell.any()
      np.testing.assert_array_equal(label[padding_cell], 255)
      inside = label[~padding_cell]
      if kind == "fg":
        assert ((inside >= 1) & (inside <= 3)).all()
      else:
        assert (inside == {"bg": 0, "unsure": 255}[kind]).all()


def test_aff_train_image_scale(tiny, tmp_path):
  """image_scale resizes the image (PIL bicubic, as inference) and both score maps before the
  crop: a 64x64 image at 1.5 is 96x96 in a 128 crop, so 12x12 to 13x13 of its 16x16 cells
  (placement) are labelled."""
  _write_scores(tiny, "train", tmp_path, "fg")
  kw = dict(batch_size=4, crop_size=128, seed=1, color_jitter=None, **ONE_HOST)
  images = _stored_images(tiny, "train", size=(96, 96))
  for b in _take(pipelines.aff_train(tiny, "train", str(tmp_path), image_scale=1.5, **kw), 2):
    assert b["image"].shape == (4, 128, 128, 3) and b["aff_label"].shape == (4, 16, 16)
    for image in b["image"]:
      top, left, _, _ = _window(image, images)  # PIL's pixels, exactly
      padding = np.ones((128, 128), bool)
      padding[top:top + 96, left:left + 96] = False
      assert _black(image[padding]).all()
    labelled = b["aff_label"] != 255
    count = labelled.sum(axis=(1, 2))
    assert ((count >= 12 * 12) & (count <= 13 * 13)).all()
    assert ((b["aff_label"][labelled] >= 1) & (b["aff_label"][labelled] <= 3)).all()
  with pytest.raises(ValueError, match="image_scale"):
    pipelines.aff_train(tiny, "train", str(tmp_path), image_scale=0.0, **kw)


def test_aff_train_missing_or_bad_score_files(tiny, tmp_path):
  _write_scores(tiny, "train", tmp_path, "fg")
  kw = dict(batch_size=16, crop_size=64, seed=1, **ONE_HOST)
  os.remove(tmp_path / "train_00005.npz")
  with pytest.raises(UserError, match="train_00005.npz"):
    pipelines.aff_train(tiny, "train", str(tmp_path), **kw)
  # Without the up-front check the reader names it too (one batch holds every image).
  with pytest.raises(UserError, match="train_00005.npz"):
    next(pipelines.aff_train(tiny, "train", str(tmp_path), check=False, **kw))
  np.savez(tmp_path / "train_00005.npz", la=np.zeros((5, 5, 2), np.float32),
           ha=np.zeros((5, 5, 2), np.float32))
  with pytest.raises(UserError, match="train_00005.npz.*must both be"):
    next(pipelines.aff_train(tiny, "train", str(tmp_path), **kw))


def test_seg_train_own_masks_and_pseudo_labels(tiny, tmp_path):
  kw = dict(batch_size=4, crop_size=72, scale_range=(0.9, 1.1), seed=2, **ONE_HOST)
  b = next(pipelines.seg_train(tiny, "train", None, **kw))
  assert b["image"].shape == (4, 72, 72, 3) and b["label"].shape == (4, 72, 72)
  assert b["label"].dtype == np.int32
  assert set(np.unique(b["label"])) <= {0, 1, 2, 3, 255}
  padding = (b["image"] == 0).all(-1)
  assert padding.any() and (b["label"][padding] == 255).all()
  # Pseudo labels from files: a constant per image shows that the right file is read.
  for ex in tfds.as_numpy(tiny.as_dataset(split="train")):
    value = 1 + int(ex["name"].decode()[-1]) % 3
    Image.fromarray(np.full(ex["image"].shape[:2], value, np.uint8)).save(
        tmp_path / (ex["name"].decode() + ".png"))
  runs = [next(pipelines.seg_train(tiny, "train", str(tmp_path), **kw)) for _ in range(2)]
  np.testing.assert_array_equal(runs[0]["label"], runs[1]["label"])
  for label, image in zip(runs[0]["label"], runs[0]["image"]):
    values = set(np.unique(label)) - {255}
    assert len(values) == 1 and values <= {1, 2, 3}
    assert ((label == 255) == (image == 0).all(-1)).all()
  os.remove(tmp_path / "train_00002.png")
  with pytest.raises(UserError, match="train_00002.png"):
    pipelines.seg_train(tiny, "train", str(tmp_path), **kw)


def test_inference_shapes_padding_and_values(varied):
  scales = (1.0, 0.5, 1.5)
  batches = list(pipelines.inference(varied, "val", scales=scales, canvas=(60, 60),
                                     batch_size=3, **ONE_HOST))
  assert len(batches) == 3  # 7 images -> 3 batches, the last with 2 dummies
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.tolist() == [True] * 7 + [False] * 2
  stored = {ex["name"].decode(): ex for ex in tfds.as_numpy(varied.as_dataset(split="val"))}
  for b in batches:
    assert b["image_s0"].shape == (3, 64, 64, 3)   # ceil(60 / 8) * 8
    assert b["image_s1"].shape == (3, 32, 32, 3)   # ceil(30 / 8) * 8
    assert b["image_s2"].shape == (3, 96, 96, 3)   # ceil(90 / 8) * 8
    assert b["raw"].shape == (3, 60, 60, 3) and b["mask"].shape == (3, 60, 60)
    for j in range(3):
      if not b["valid"][j]:
        assert b["name"][j] == b"" and (b["mask"][j] == 255).all()
        continue
      ex = stored[b["name"][j].decode()]
      h, w = ex["image"].shape[:2]
      assert b["orig_size"][j].tolist() == [h, w]
      np.testing.assert_array_equal(b["raw"][j, :h, :w], ex["image"])
      assert (b["raw"][j, h:] == 0).all() and (b["raw"][j, :, w:] == 0).all()
      np.testing.assert_array_equal(b["mask"][j, :h, :w], ex["mask"][..., 0])
      assert (b["mask"][j, h:] == 255).all() and (b["mask"][j, :, w:] == 255).all()
      np.testing.assert_array_equal(b["label"][j], ex["label"])
      for i, s in enumerate(scales):
        sh, sw = b[f"size_s{i}"][j]
        assert (sh, sw) == (round(h * s), round(w * s))  # Python 3 rounding, as the original
        im = b[f"image_s{i}"][j]
        assert (im[sh:] == 0).all() and (im[:, sw:] == 0).all()
        assert not (im[:sh, :sw] == 0).all(-1).any()
      np.testing.assert_allclose(b["image_s0"][j, :h, :w],
                                 transforms.normalize(ex["image"]).numpy(), atol=1e-5)


def test_inference_canvas_too_small(varied):
  # Images larger than the canvas are not resized (that is the memory cap): each comes as an
  # invalid 1x1 stand-in with its own size, for the stage to report (tests/test_hostile_inputs).
  sizes = {ex["name"]: ex["image"].shape[:2]
           for ex in tfds.as_numpy(varied.as_dataset(split="val"))}
  seen = 0
  for b in pipelines.inference(varied, "val", scales=(1.0, 2.0), canvas=(40, 40),
                               batch_size=2, **ONE_HOST):
    for j, name in enumerate(b["name"]):
      if not name:
        continue
      seen += 1
      h, w = sizes[name]
      assert b["image_size"][j].tolist() == [h, w]
      assert bool(b["valid"][j]) == (h <= 40 and w <= 40)
      if not b["valid"][j]:
        assert b["orig_size"][j].tolist() == [1, 1] and b["size_s1"][j].tolist() == [2, 2]
        assert (b["raw"][j] == 0).all() and (b["mask"][j] == 255).all()
  assert seen == len(sizes) and any(max(s) > 40 for s in sizes.values())


def test_two_hosts_disjoint_covering_same_batch_count(varied):
  names, counts = [], []
  for index in range(2):
    batches = list(pipelines.inference(varied, "val", scales=(1.0,), canvas=(60, 60),
                                       batch_size=2, process_index=index, process_count=2))
    counts.append(len(batches))
    host = [n.decode() for b in batches for n, v in zip(b["name"], b["valid"]) if v]
    names.append(set(host))
    assert len(host) == len(set(host))
  assert counts[0] == counts[1] == 2  # 7 images: 4 + 3, padded to 2 batches of 2 each
  assert not names[0] & names[1]
  assert names[0] | names[1] == set(data.split_names(varied, "val"))


def _host_shares_make_the_global_batch(make, hosts, global_batch, steps=3):
  """Batches at steps 0..steps-1 and, resumed, at step 2: each host's rows, concatenated in host
  order, are the one-host global batch, to the bit."""
  for start in (0, 2):
    whole = _take(make(start, global_batch, 0, 1), steps)
    shares = [_take(make(start, global_batch // hosts, i, hosts), steps) for i in range(hosts)]
    for step, expected in enumerate(whole):
      for key, value in expected.items():
        joined = np.concatenate([share[step][key] for share in shares])
        np.testing.assert_array_equal(joined, value, err_msg=f"{key} at step {start + step}")


@pytest.mark.parametrize("hosts", [2, 4])
def test_training_batches_are_the_same_on_any_number_of_hosts(tiny, tmp_path, hosts):
  _write_scores(tiny, "train", tmp_path, "fg")

  def cls(start, b, i, n):
    return pipelines.cls_train(tiny, "train", batch_size=b, crop_size=32, resize_long=(32, 48),
                               seed=7, start_step=start, process_index=i, process_count=n)

  def aff(start, b, i, n):
    return pipelines.aff_train(tiny, "train", str(tmp_path), batch_size=b, crop_size=32,
                               seed=7, start_step=start, process_index=i, process_count=n,
                               exclude=frozenset({"train_00001"}))

  def seg(start, b, i, n):
    return pipelines.seg_train(tiny, "train", None, batch_size=b, crop_size=32, seed=7,
                               start_step=start, process_index=i, process_count=n)

  for make in (cls, aff, seg):
    _host_shares_make_the_global_batch(make, hosts, global_batch=4)


def test_bad_arguments(tiny):
  with pytest.raises(UserError, match="multiple of 8"):
    pipelines.cls_train(tiny, "train", batch_size=2, crop_size=50, **ONE_HOST)
  with pytest.raises(UserError, match="no split 'test'"):
    pipelines.cls_train(tiny, "test", batch_size=2, crop_size=48, **ONE_HOST)
  with pytest.raises(UserError, match="process_index"):
    pipelines.cls_train(tiny, "train", batch_size=2, crop_size=48, process_index=2,
                        process_count=2)
