"""The input pipelines give the original's pixels: JPEGs decoded as PIL decodes them, images
resized with PIL's bicubic (multi-scale inference, CAM training's `RandomResizeLong`).

Real code paths: a generated VOC tree (tests/_voc_tree.py) with VOC-sized JPEGs as PIL writes
them (4:2:0 chroma subsampling, qualities 75 to 90), built by the real `voc2012_aug` builder and
read through the real pipelines. Each check also shows that what the pipelines did before (tf's
fast DCT, tf.image.resize) gives other pixels, so the test fails on that code.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from affinity_jax.data import pipelines, transforms, voc
from tests import _voc_tree

ONE_HOST = dict(process_index=0, process_count=1)
SCALES = (1.0, 0.5, 1.5, 2.0)
# name: (height, width, JPEG quality, mode); all in VOC's val list.
JPEGS = {
    "2012_000001": (375, 500, 75, "RGB"),   # VOC's most common size
    "2012_000002": (281, 500, 90, "RGB"),
    "2012_000003": (281, 500, 85, "L"),     # greyscale: three equal channels, as PIL's convert
    "2012_000004": (137, 211, 80, "RGB"),   # odd, not square
}


def _photo(height: int, width: int, seed: int) -> np.ndarray:
  """uint8 [H, W, 3]: smooth colour fields plus noise, which compresses like a photograph."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  base = np.stack([128 + 100 * np.sin(xx / 17 + seed), 128 + 90 * np.cos(yy / 23),
                   (xx + 2 * yy) % 256], -1)
  return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _pil_rgb(path: str) -> np.ndarray:
  """What the original reads: voc12/data.py opens each image with PIL and converts to RGB."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory):
  """(builder, {name: path of its JPEG}) of the val split."""
  root = str(tmp_path_factory.mktemp("voc_manual"))
  _voc_tree.make_voc_tree(root, with_sbd=False)
  for i, (name, (height, width, quality, mode)) in enumerate(JPEGS.items()):
    paths = _voc_tree.add_image(root, name, "val", height=height, width=width, cls=1 + i)
    Image.fromarray(_photo(height, width, i)).convert(mode).save(paths["jpeg"],
                                                                 quality=quality)
  builder = voc.Voc2012Aug(config="xml_labels", data_dir=str(tmp_path_factory.mktemp("tfds")))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=root))
  folder = os.path.join(root, "VOCdevkit", "VOC2012", "JPEGImages")
  names = _voc_tree.VOC_VAL + tuple(JPEGS)
  return builder, {n: os.path.join(folder, n + ".jpg") for n in names}


def _inference(builder):
  """{name: (batch, index)} of every valid image of val, at SCALES, one image per batch."""
  out = {}
  for b in pipelines.inference(builder, "val", scales=SCALES, canvas=(375, 500), batch_size=1,
                               **ONE_HOST):
    if b["valid"][0]:
      out[b["name"][0].decode()] = b
  return out


@pytest.fixture(scope="module")
def inference_batches(voc_tree):
  return _inference(voc_tree[0])


def test_jpegs_are_written_as_pil_writes_them(voc_tree):
  _, paths = voc_tree
  with Image.open(paths["2012_000001"]) as im:
    assert im.format == "JPEG" and im.layer[0][1:3] == (2, 2)  # luma sampled 2x2: 4:2:0
    assert (im.height, im.width) == (375, 500)


def test_jpegs_decode_to_pils_pixels(voc_tree, inference_batches):
  builder, paths = voc_tree
  stored = {ex["name"].decode(): ex["image"]
            for ex in tfds.as_numpy(builder.as_dataset(split="val"))}
  assert set(inference_batches) == set(paths) == set(stored)
  for name, path in paths.items():
    want = _pil_rgb(path)
    h, w = want.shape[:2]
    # The pipelines (records.decode: the dCRF's `raw` image and every scale) and the builder's
    # own feature (the affinity-label stage's dCRF, evaluation) both give PIL's pixels.
    b = inference_batches[name]
    np.testing.assert_array_equal(b["raw"][0, :h, :w], want, err_msg=name)
    np.testing.assert_array_equal(stored[name], want, err_msg=name)
    if name in JPEGS:
      # tf's default decoding (fast integer DCT) does not.
      with open(path, "rb") as f:
        fast = tf.io.decode_image(f.read(), channels=3, expand_animations=False).numpy()
      share = (fast != want).mean()
      assert share > 0.2, (name, share)


def test_inference_scales_are_pils_bicubic(voc_tree, inference_batches):
  _, paths = voc_tree
  for name in JPEGS:
    image = _pil_rgb(paths[name])
    h, w = image.shape[:2]
    b = inference_batches[name]
    for i, s in enumerate(SCALES):
      sh, sw = round(h * s), round(w * s)  # voc12/data.py: Python's round of w * s, h * s
      assert b[f"size_s{i}"][0].tolist() == [sh, sw]
      want = _pil_resize(image, sh, sw)
      np.testing.assert_allclose(b[f"image_s{i}"][0, :sh, :sw],
                                 transforms.normalize(want).numpy(), rtol=0, atol=1e-6,
                                 err_msg=f"{name} at scale {s}")
      if s != 1.0:
        # The resize of tf (bicubic, antialiased when shrinking, rounded) differs from PIL's.
        old = tf.image.resize(tf.cast(image, tf.float32), (sh, sw), "bicubic",
                              antialias=s < 1)
        old = tf.clip_by_value(tf.round(old), 0, 255).numpy().astype(np.uint8)
        assert (old != want).mean() > 0.01, (name, s)


@pytest.mark.parametrize("height, width", [(137, 211), (211, 137), (90, 90), (3, 40)])
def test_random_resize_long_is_the_originals(height, width):
  """CAM training's resize: the original's `RandomResizeLong` on a uint8 image, eagerly and in
  tf.data: long side uniform in [low, high], short side round(short * long / ...), PIL bicubic."""
  image = _photo(height, width, 3)
  fn = lambda im, seed: transforms.random_resize_long([im], ["pil_bicubic"], 60, 260, seed)[0]
  targets = set()
  for seed in ([0, 1], [5, 2], [7, 7]):
    seed = tf.constant(seed, tf.int64)
    eager = fn(image, seed).numpy()
    graph = next(iter(tf.data.Dataset.from_tensors((image, seed)).map(fn))).numpy()
    np.testing.assert_array_equal(eager, graph)
    target = max(eager.shape[:2])
    assert 60 <= target <= 260
    targets.add(target)
    size = _long_side_wh(height, width, target)
    assert eager.dtype == np.uint8 and eager.shape == (size[1], size[0], 3)
    np.testing.assert_array_equal(
        eager, np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)))
  assert len(targets) > 1


def _long_side_wh(h, w, target):
  """(width, height) with the long side `target` (the width on a tie) and the other side
  Python's round of other * target / long, the rule of the original's RandomResizeLong."""
  long_is_height = h > w
  other = round((w if long_is_height else h) * target / (h if long_is_height else w))
  return (other, target) if long_is_height else (target, other)


def test_long_side_size_rounds_as_python():
  # Exact integer rounding: ties (e.g. 375 * 258 / 500 = 193.5) go to the even side, as
  # Python's round does; a float32 product could land on either side of .5.
  heights, widths = np.meshgrid(np.arange(1, 60), np.arange(1, 60), indexing="ij")
  for target in (57, 258, 512):
    got = transforms.long_side_size(heights.ravel(), widths.ravel(), target).numpy()
    for (h, w), (gh, gw) in zip(zip(heights.ravel(), widths.ravel()), got):
      want_w, want_h = _long_side_wh(h, w, target)
      assert (gh, gw) == (max(want_h, 1), max(want_w, 1)), (h, w, target)
  assert transforms.long_side_size(375, 500, 258).numpy().tolist() == [194, 258]


def test_cls_train_crops_the_pil_resized_image(voc_tree):
  """CAM training end to end on the VOC tree: with a fixed long side and no jitter, each crop
  holds the PIL-resized image (flipped or not), normalised; its padding is 0, the mean colour,
  since the original normalises before cropping."""
  builder, paths = voc_tree
  candidates = []
  for path in paths.values():
    image = _pil_rgb(path)
    h, w = image.shape[:2]
    size = transforms.long_side_size(h, w, 96).numpy()
    resized = transforms.normalize(_pil_resize(image, *size)).numpy()
    candidates += [resized, resized[:, ::-1]]
  batches = pipelines.cls_train(builder, "val", batch_size=2, crop_size=96, resize_long=(96, 96),
                                color_jitter=None, seed=4, **ONE_HOST)
  found = 0
  for _ in range(len(paths) // 2):  # one epoch: each image once
    for crop in next(batches)["image"]:
      for want in candidates:
        h, w = want.shape[:2]
        top = np.argmax(np.abs(crop - want[0, 0]).max(-1).ravel() < 1e-5)
        top, left = divmod(int(top), 96)
        if (top + h <= 96 and left + w <= 96
            and np.abs(crop[top:top + h, left:left + w] - want).max() < 1e-5):
          padding = np.ones((96, 96), bool)
          padding[top:top + h, left:left + w] = False
          assert (crop[padding] == 0).all()
          found += 1
          break
  assert found == len(paths)
