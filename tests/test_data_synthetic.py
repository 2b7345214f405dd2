"""synthetic_wsss: determinism, features, and the design (shared body, class-specific part)."""

import colorsys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import ndimage

from affinity_jax import data
from affinity_jax.data import synthetic
from affinity_jax.errors import UserError

# Small but not tiny: enough objects for the design statistics below.
_CONFIG = synthetic.SyntheticConfig(name="t", image_size=(96, 96), num_classes=5)


def _objects(mask):
  """(class id, object pixels) per connected object of the mask."""
  out = []
  for cls in range(1, 21):
    comps, n = ndimage.label(mask == cls)
    out += [(cls, comps == i) for i in range(1, n + 1)]
  return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return data.get_builder("synthetic_wsss", tmp_path_factory.mktemp("tfds"), config="tiny")


def test_deterministic_from_seed():
  a = synthetic.generate_example(_CONFIG, "train", 3)
  b = synthetic.generate_example(_CONFIG, "train", 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  other = synthetic.SyntheticConfig(name="u", image_size=(96, 96), num_classes=5, seed=1)
  assert not np.array_equal(a[0], synthetic.generate_example(other, "train", 3)[0])
  assert not np.array_equal(a[0], synthetic.generate_example(_CONFIG, "val", 3)[0])


def test_builder_features_and_splits(tiny):
  assert tiny.info.splits["train"].num_examples == 16
  assert tiny.info.splits["val"].num_examples == 8
  assert data.num_classes(tiny) == 3
  assert data.class_names(tiny) == ("red", "green", "blue")
  assert tiny.info.metadata["class_names"] == list(data.class_names(tiny))
  names = set()
  for ex in tfds.as_numpy(tiny.as_dataset(split="train")):
    names.add(ex["name"].decode())
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (64, 64, 1) and ex["has_mask"]
    values = set(np.unique(ex["mask"]).tolist())
    assert values <= {0, 1, 2, 3, 255} and 0 in values
    present = sorted(v for v in values if 1 <= v <= 3)
    assert ex["label"].tolist() == [1.0 if c in present else 0.0 for c in (1, 2, 3)]
    assert ex["label"].sum() >= 1
  assert names == {f"train_{i:05d}" for i in range(16)}


def test_stored_examples_match_the_generator(tiny):
  ex = next(iter(tfds.as_numpy(tiny.as_dataset(split="val[:1]"))))
  index = int(ex["name"].decode().split("_")[1])
  image, mask, _ = synthetic.generate_example(tiny.builder_config, "val", index)
  np.testing.assert_array_equal(ex["image"], image)  # PNG: lossless.
  np.testing.assert_array_equal(ex["mask"][..., 0], mask)


def test_design_body_shared_part_discriminative():
  colours = synthetic.part_colours(_CONFIG.num_classes)
  part_fraction, body_hues, gaps = [], [], []
  contrast = []
  for i in range(30):
    image, mask, _, parts = synthetic.generate_example(_CONFIG, "train", i, with_parts=True)
    image = image.astype(np.float32)
    objects = _objects(mask)
    assert 1 <= len(objects) <= _CONFIG.max_objects
    for cls, obj in objects:
      part = parts & obj
      part_fraction.append(part.sum() / obj.sum())
      # The part's colour is its class's: nearest of the class colours.
      mean_part = image[part].mean(0)
      assert np.argmin(np.linalg.norm(colours - mean_part, axis=1)) == cls - 1
      body = image[obj & ~ndimage.binary_dilation(part, iterations=1)].mean(0) / 255
      body_hues.append(colorsys.rgb_to_hsv(*body)[1])  # saturation
      contrast.append(body.mean() - image[mask == 0].mean() / 255)
      # A 255 band of boundary_width pixels hugs the object; nothing else touches it.
      ring = ndimage.binary_dilation(obj) & ~obj
      assert (mask[ring] == 255).all()
      far = ndimage.binary_dilation(obj, iterations=3) & ~obj
      gaps.append(set(np.unique(mask[far]).tolist()) <= {0, 255})
    assert not (parts & (mask == 0)).any()
  assert all(gaps), "objects must not touch"
  assert 0.03 <= min(part_fraction) and max(part_fraction) <= 0.17
  # Bodies are grey (class-agnostic) and brighter than the background of their image.
  assert max(body_hues) < 0.15
  assert min(contrast) > 0.2


def test_varying_sizes_and_knobs(tmp_path):
  builder = data.get_builder("synthetic_wsss", tmp_path, config="tiny", num_classes=4,
                             size_range=(40, 72), num_train=6, num_val=2, seed=3)
  assert builder.builder_config.name.startswith("tiny_")
  assert data.num_classes(builder) == 4
  sizes = set()
  for ex in tfds.as_numpy(builder.as_dataset(split="train")):
    assert ex["label"].shape == (4,)
    sizes.add(ex["image"].shape[:2])
    assert all(40 <= s <= 72 for s in ex["image"].shape[:2])
  assert len(sizes) > 1
  again = data.get_builder("synthetic_wsss", tmp_path, config="tiny", num_classes=4,
                           size_range=(40, 72), num_train=6, num_val=2, seed=3)
  assert again.builder_config.name == builder.builder_config.name


def test_object_scale_and_part_fraction_knobs():
  """Larger objects and parts than the default when asked, within the requested ranges."""
  big = synthetic.SyntheticConfig(name="b", image_size=(96, 96), num_classes=5, max_objects=2,
                                  object_scale=(0.2, 0.4), part_fraction=(0.15, 0.3))
  sizes = {"default": [], "big": []}
  fractions = []
  for i in range(20):
    for key, config in (("default", _CONFIG), ("big", big)):
      _, mask, _, parts = synthetic.generate_example(config, "train", i, with_parts=True)
      for _, obj in _objects(mask):
        sizes[key].append(obj.sum())
        if key == "big":
          fractions.append((parts & obj).sum() / obj.sum())
  assert np.median(sizes["big"]) > 1.5 * np.median(sizes["default"])
  # Discs are drawn on the pixel grid and clipped to the object: a little outside the range.
  assert 0.12 <= min(fractions) and max(fractions) <= 0.33
  assert np.mean(fractions) > 0.17


# The demo's shapes (configs/synthetic.py).
_DEMO_SHAPE = dict(image_size=(96, 96), max_objects=2, object_scale=(0.2, 0.4),
                   part_fraction=(0.15, 0.3))


def _with_and_without(config, base, index):
  """(image, mask, label, parts) of one training example under `config`, and the image under
  `base`, after checking that mask, label and parts are the same under both."""
  image, mask, label, parts = synthetic.generate_example(config, "train", index, with_parts=True)
  b_image, b_mask, b_label, b_parts = synthetic.generate_example(base, "train", index,
                                                                 with_parts=True)
  np.testing.assert_array_equal(mask, b_mask)
  np.testing.assert_array_equal(label, b_label)
  np.testing.assert_array_equal(parts, b_parts)
  return image, mask, label, parts, b_image


def test_distractors_are_partless_bodies_labelled_background():
  """distractors > 0 adds bright bodies without a part, background in the mask, and leaves the
  rest of the image as it is without them."""
  base = synthetic.SyntheticConfig(name="b", **_DEMO_SHAPE)
  with_d = synthetic.SyntheticConfig(name="d", distractors=2, **_DEMO_SHAPE)
  added, lift = 0, []
  for i in range(20):
    image, mask, _, _, b_image = _with_and_without(with_d, base, i)
    changed = (image != b_image).any(-1)
    # Only background changes, never within an object's gap, and it turns into a bright body.
    assert not (changed & ndimage.binary_dilation(mask > 0, iterations=3)).any()
    if changed.sum() > 20:
      added += 1
      lift.append(image[changed].mean() - b_image[changed].mean())
  assert added >= 10
  assert min(lift) > 40
  with pytest.raises(UserError, match="distractors"):
    synthetic.SyntheticConfig(name="x", distractors=-1).validate()


def test_empty_fraction_gives_negative_training_images_only():
  config = synthetic.SyntheticConfig(name="e", image_size=(64, 64), empty_fraction=0.5)
  base = synthetic.SyntheticConfig(name="b", image_size=(64, 64))
  empty = 0
  for i in range(40):
    image, mask, label = synthetic.generate_example(config, "train", i)
    if label.sum() == 0:
      empty += 1
      assert (mask == 0).all()
    else:  # The others are the images of the same index without the knob.
      for x, y in zip((image, mask, label), synthetic.generate_example(base, "train", i)):
        np.testing.assert_array_equal(x, y)
    assert synthetic.generate_example(config, "val", i)[2].sum() >= 1
  assert 10 <= empty <= 30
  with pytest.raises(UserError, match="empty_fraction"):
    synthetic.SyntheticConfig(name="x", empty_fraction=1.0).validate()


@pytest.mark.parametrize("options, match", [
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=21), "num_classes"),
    (dict(image_size=(16, 16)), "image_size"),
    (dict(object_scale=(0.3, 0.2)), "object_scale"),
    (dict(object_scale=(0.2, 0.6)), "object_scale"),
    (dict(part_fraction=(0.0, 0.2)), "part_fraction"),
    (dict(colour="blue"), "unknown option"),
    (dict(config="huge"), "unknown config"),
])
def test_bad_options(tmp_path, options, match):
  with pytest.raises(UserError, match=match):
    data.get_builder("synthetic_wsss", tmp_path, **options)


def test_unknown_dataset(tmp_path):
  with pytest.raises(UserError, match="unknown dataset"):
    data.get_builder("coco", tmp_path)


def test_body_cue_tints_each_body_towards_its_class_colour_by_a_drawn_share():
  """body_cue (lo, hi) moves a body's colour towards its class's part colour by a share in
  [lo, hi] drawn per object; masks, labels, parts and every other pixel stay as without it."""
  base = synthetic.SyntheticConfig(name="b", **_DEMO_SHAPE)
  cued = synthetic.SyntheticConfig(name="c", body_cue=(0.2, 0.6), **_DEMO_SHAPE)
  colours = synthetic.part_colours(base.num_classes)
  shares = []
  for i in range(12):
    image, mask, _, parts, b_image = _with_and_without(cued, base, i)
    bodies = (mask >= 1) & (mask <= base.num_classes) & ~parts
    assert not ((image != b_image).any(-1) & ~bodies).any()
    for cls, obj in _objects(mask):
      body = obj & ~parts
      was = b_image[body].astype(np.float64).mean(0)
      moved = image[body].astype(np.float64).mean(0) - was
      towards = colours[cls - 1] - was
      shares.append(moved @ towards / (towards @ towards))
  # The image's illumination gain (0.85-1.15, a ramp) scales the share a little.
  assert 0.2 * 0.8 <= min(shares) and max(shares) <= 0.6 * 1.3
  assert max(shares) - min(shares) > 0.15
  with pytest.raises(UserError, match="body_cue"):
    synthetic.SyntheticConfig(name="x", body_cue=(0.5, 0.2)).validate()


@pytest.mark.parametrize("num_classes", [1, 2, 3, 5, 7, 11, 12, 20])
def test_class_names_name_the_hue_of_the_parts(num_classes):
  names = synthetic.class_names_for(num_classes)
  assert len(set(names)) == num_classes
  # The twelve named hues 30 degrees apart, as colorsys reads them.
  wheel = {n: k * 30.0 for k, n in enumerate(("red", "orange", "yellow", "lime", "green", "spring",
                                               "cyan", "azure", "blue", "violet", "magenta",
                                               "rose"))}
  if num_classes <= 12:
    for name, rgb in zip(names, synthetic.part_colours(num_classes) / 255.0):
      hue = colorsys.rgb_to_hsv(*rgb)[0] * 360.0
      gap = abs((hue - wheel[name] + 180.0) % 360.0 - 180.0)
      assert gap <= 15.0 + 1e-3, (name, hue)
