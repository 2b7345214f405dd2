"""A synthetic weakly supervised segmentation dataset, the tfds dataset `synthetic_wsss`.

The embedded default dataset: deterministic from a seed, no downloads, seconds to generate. It is
built so that the method has the same thing to fix as on photographs:

* Every object is a LARGE body plus a SMALL discriminative part. The body's appearance (a light
  grey with a striped texture of random angle and period) is drawn from the same distribution for
  every class, so the body alone does not tell the class. The part (a disc covering 5-15% of the
  object's area by default, placed inside it) has a saturated colour that only its class uses (hues evenly
  spaced around the colour wheel). A classifier learns the part, so its CAM covers mostly the
  part; affinity propagation has to extend it over the body.
* The background is dark, weakly coloured low-frequency blotches with fine grain, clearly unlike
  the bright striped bodies (and never as saturated as a part): the low-level cue that
  AffinityNet and the dCRF rely on.
* 1..max_objects objects per image, shapes drawn from ellipses, rotated rectangles and blobs
  (a circle with a few radial harmonics), random sizes and positions, never overlapping (a gap of
  `2 * boundary_width + 2` pixels). Classes may repeat within an image.
* Optionally (`distractors` > 0) up to that many bodies WITHOUT a part per image, labelled
  background: then neither "an object is present" nor "an object whose part is none of the other
  classes'" tells a class, so the classifier has to find the part itself (with every image
  holding an object, the last class to be learned can otherwise be read off by elimination, and
  its CAM is flat over the image).
* Optionally (`body_cue` = (lo, hi) with hi > 0) each body is tinted towards its class's part
  colour by a share drawn per object from [lo, hi]: the body becomes weak, unreliable evidence of the class,
  as the body of a photographed object is next to its most telling part (a from-ImageNet
  classifier's CAM is then strong on the part and weak, not zero, over the body).
* Optionally (`empty_fraction` > 0) some training images hold no object at all (label all 0):
  a class can then no longer be told by elimination from "no other class's part", which a
  classifier otherwise learns for the last class it finds, as a flat CAM over the whole image.
* Per image: a brightness factor, a linear illumination gradient and Gaussian pixel noise.

Ground truth: mask = whole object (body + part) with its class id 1..num_classes, 0 background,
and a band of `boundary_width` pixels just outside each object set to 255 (VOC marks its object
contours the same way; 0 turns it off). Labels are multi-hot over the classes present.
Features are those of `voc2012_aug`: image, name, label [num_classes], mask [H, W, 1], has_mask.

Knobs (fields of `SyntheticConfig`; `get_builder("synthetic_wsss", data_dir, **knobs)` makes a
config from them): image_size (H, W), size_range (lo, hi) to draw H and W per image instead
(exercises padding), num_classes (<= 20), max_objects, num_train, num_val, seed, boundary_width,
object_scale (lo, hi): object radii as fractions of the short side (default 0.12-0.3),
part_fraction (lo, hi): the part's share of its object's area (default 0.05-0.15), and
distractors: at most this many partless bodies per image (default 0), empty_fraction: the
share of training images without any object (default 0; val images always have one), and
body_cue (lo, hi): the share of the class's part colour in a body's colour (default (0, 0)).
Named configs: `default` (128x128, 5 classes, 600 / 120 images, ~10 s to generate on 2 cores)
and `tiny` (64x64, 3 classes, 16 / 8 images, for tests).
Example i of a split depends only on (seed, split, i), so growing a split keeps its first images.
"""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from affinity_jax.constants import IGNORE_LABEL as IGNORE
from affinity_jax.data.base import LocalBuilder
from affinity_jax.errors import UserError

# The first twelve name the hues 0, 30, ..., 330 degrees; the rest only tell classes apart.
_COLOUR_NAMES = (
    "red", "orange", "yellow", "lime", "green", "spring", "cyan", "azure", "blue", "violet",
    "magenta", "rose", "amber", "chartreuse", "jade", "teal", "cobalt", "indigo", "purple",
    "crimson")
_WHEEL = 12
_SPLIT_IDS = {"train": 1, "val": 2}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Knobs of the synthetic dataset; see the module docstring."""
  image_size: tuple[int, int] = (128, 128)
  size_range: tuple[int, int] | None = None
  num_classes: int = 5
  max_objects: int = 3
  num_train: int = 600
  num_val: int = 120
  seed: int = 0
  boundary_width: int = 1
  # Object radii as fractions of the image's short side, and the part's share of its object.
  object_scale: tuple[float, float] = (0.12, 0.3)
  part_fraction: tuple[float, float] = (0.05, 0.15)
  # At most this many bodies without a part (ground truth background) per image.
  distractors: int = 0
  # Share of training images with no object at all (val images always have one).
  empty_fraction: float = 0.0
  # The share (lo, hi) of each body's colour that is its class's part colour (drawn per object).
  body_cue: tuple[float, float] = (0.0, 0.0)

  def validate(self) -> None:
    if not 1 <= self.num_classes <= len(_COLOUR_NAMES):
      raise UserError(f"synthetic_wsss: num_classes must be in 1..{len(_COLOUR_NAMES)}, "
                      f"got {self.num_classes}")
    if self.max_objects < 1:
      raise UserError(f"synthetic_wsss: max_objects must be >= 1, got {self.max_objects}")
    sizes = [self.image_size] if self.size_range is None else [self.size_range]
    if any(min(s) < 32 for s in sizes) or (self.size_range and
                                           self.size_range[0] > self.size_range[1]):
      raise UserError("synthetic_wsss: image_size / size_range must be >= 32 pixels and "
                      f"lo <= hi, got image_size={self.image_size}, size_range={self.size_range}")
    if self.num_train < 1 or self.num_val < 1:
      raise UserError("synthetic_wsss: num_train and num_val must be >= 1")
    if not 0.0 <= self.empty_fraction < 1.0:
      raise UserError("synthetic_wsss: empty_fraction must be in [0, 1), "
                      f"got {self.empty_fraction}")
    lo, hi = self.body_cue
    if not 0.0 <= lo <= hi <= 1.0:
      raise UserError("synthetic_wsss: body_cue must be (lo, hi) with 0 <= lo <= hi <= 1, "
                      f"got {self.body_cue}")
    if self.distractors < 0:
      raise UserError(f"synthetic_wsss: distractors must be >= 0, got {self.distractors}")
    if self.boundary_width < 0:
      raise UserError("synthetic_wsss: boundary_width must be >= 0")
    lo, hi = self.object_scale
    if not 0.02 <= lo <= hi <= 0.45:
      raise UserError("synthetic_wsss: object_scale must be (lo, hi) with 0.02 <= lo <= hi <= "
                      f"0.45, got {self.object_scale}")
    lo, hi = self.part_fraction
    if not 0.0 < lo <= hi <= 0.5:
      raise UserError("synthetic_wsss: part_fraction must be (lo, hi) with 0 < lo <= hi <= 0.5, "
                      f"got {self.part_fraction}")


def class_names_for(num_classes: int) -> tuple[str, ...]:
  """Each class named after its part's hue (part_colours: class c at c / num_classes of the
  wheel): the nearest of twelve named hues 30 degrees apart, distinct for up to 12 classes;
  with more, the first num_classes names."""
  if num_classes > _WHEEL:
    return tuple(_COLOUR_NAMES[:num_classes])
  return tuple(_COLOUR_NAMES[round(c * _WHEEL / num_classes) % _WHEEL]
               for c in range(num_classes))


class SyntheticWsss(LocalBuilder):
  """Objects with a class-agnostic body and a class-specific part on a textured background."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Knobs distractors and empty_fraction; images without them unchanged.",
                   "1.2.0": "Knob body_cue (images without it unchanged); class names follow "
                            "the parts' hues."}
  BUILDER_CONFIGS = [
      SyntheticConfig(name="default", description="128x128, 5 classes, 600 train / 120 val."),
      SyntheticConfig(name="tiny", image_size=(64, 64), num_classes=3, num_train=16,
                      num_val=8, description="A few 64x64 images for tests."),
  ]
  DEFAULT_CONFIG_NAME = "default"

  @property
  def class_names(self) -> tuple[str, ...]:
    return class_names_for(self.builder_config.num_classes)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    config.validate()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "name": tfds.features.Text(),
            "label": tfds.features.Tensor(shape=(config.num_classes,), dtype=np.float32),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "has_mask": tfds.features.Tensor(shape=(), dtype=np.bool_),
        }),
        metadata=tfds.core.MetadataDict(class_names=list(self.class_names),
                                        knobs=_knobs(config)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {"train": self._generate_examples("train", config.num_train),
            "val": self._generate_examples("val", config.num_val)}

  def _generate_examples(self, split: str, count: int):
    for index in range(count):
      name = f"{split}_{index:05d}"
      image, mask, label = generate_example(self.builder_config, split, index)
      yield name, {"image": image, "name": name, "label": label, "mask": mask[..., None],
                   "has_mask": True}


def _knobs(config: SyntheticConfig) -> dict:
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(SyntheticConfig)
          if f.name in ("image_size", "size_range", "num_classes", "max_objects", "num_train",
                        "num_val", "seed", "boundary_width", "object_scale", "part_fraction",
                        "distractors", "empty_fraction", "body_cue")}


def part_colours(num_classes: int) -> np.ndarray:
  """float32 [num_classes, 3] RGB in 0..255: evenly spaced saturated hues."""
  return np.array([colorsys.hsv_to_rgb(c / num_classes, 0.9, 0.95) for c in range(num_classes)],
                  np.float32) * 255.0


def generate_example(config: SyntheticConfig, split: str, index: int, *,
                     with_parts: bool = False) -> tuple[np.ndarray, ...]:
  """One image: uint8 [H, W, 3], mask uint8 [H, W] (0, 1..C, 255), label float32 [C].

  With `with_parts`, also the discriminative parts: bool [H, W] (for tests and figures).
  """
  rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], index])
  if config.size_range is None:
    height, width = config.image_size
  else:
    height, width = rng.integers(config.size_range[0], config.size_range[1] + 1, size=2)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

  image = _background(rng, height, width)
  mask = np.zeros((height, width), np.uint8)
  gap = 2 * config.boundary_width + 2
  occupied = np.zeros((height, width), bool)
  parts = np.zeros((height, width), bool)
  colours = part_colours(config.num_classes)
  num_objects = int(rng.integers(1, config.max_objects + 1))
  if split == "train" and config.empty_fraction and (
      np.random.default_rng([config.seed, _SPLIT_IDS[split], index, 2]).random()
      < config.empty_fraction):
    num_objects = 0  # A negative: no object, label all 0.
  placed = []
  # The body cues' strengths from a stream of their own: with body_cue 0 the image is unchanged.
  cue = np.random.default_rng([config.seed, _SPLIT_IDS[split], index, 3])
  for _ in range(num_objects):
    obj = _place_object(rng, occupied, gap, config.object_scale)
    if obj is None:
      continue
    cls = int(rng.integers(config.num_classes))
    body = _body_texture(rng, yy, xx)[obj]
    if config.body_cue[1] > 0:
      share = cue.uniform(*config.body_cue)
      body = (1.0 - share) * body + share * colours[cls]
    image[obj] = body
    part = _part(rng, obj, config.part_fraction)
    shade = rng.uniform(0.9, 1.1)
    image[part] = np.clip(colours[cls] * shade, 0, 255)
    mask[obj] = cls + 1
    parts |= part
    occupied |= obj
    placed.append(obj)
  # Partless bodies from a stream of their own: with or without them, the rest of the image
  # (objects, background, illumination, noise) is the same.
  if config.distractors:
    extra = np.random.default_rng([config.seed, _SPLIT_IDS[split], index, 1])
    for _ in range(int(extra.integers(config.distractors + 1))):
      body = _place_object(extra, occupied, gap, config.object_scale)
      if body is not None:
        image[body] = _body_texture(extra, yy, xx)[body]
        occupied |= body
  if config.boundary_width:
    for obj in placed:
      band = ndimage.binary_dilation(obj, iterations=config.boundary_width) & ~obj
      mask[band] = IGNORE

  # Illumination: brightness, a linear gradient across the image, pixel noise.
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * (xx / width - 0.5) + np.sin(angle) * (yy / height - 0.5))
  gain = rng.uniform(0.85, 1.15) * (1.0 + rng.uniform(-0.3, 0.3) * ramp)
  image = image * gain[..., None] + rng.normal(0, rng.uniform(3, 8), image.shape)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)

  present = np.unique(mask)
  present = present[(present >= 1) & (present <= config.num_classes)]
  label = np.zeros(config.num_classes, np.float32)
  label[present.astype(np.int64) - 1] = 1.0
  return (image, mask, label, parts) if with_parts else (image, mask, label)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Dark, weakly coloured blotches plus fine grain, float32 [H, W, 3].

  Mostly luminance: saturated background colours would imitate the class parts.
  """
  coarse = rng.normal(0, 1, ((height + 15) // 16, (width + 15) // 16, 4))
  blotches = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:height, :width]
  for _ in range(2):  # Two box filters: a smooth (triangle) interpolation of the coarse grid.
    blotches = ndimage.uniform_filter(blotches, size=(16, 16, 1), mode="reflect")
  blotches *= 2.5  # Back to about unit variance after smoothing.
  base = rng.uniform(50, 90) + rng.uniform(-8, 8, size=3)
  grain = rng.normal(0, 6, (height, width, 1))
  return (base + 20 * blotches[..., :1] + 6 * blotches[..., 1:] + grain).astype(np.float32)


def _body_texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """The class-agnostic body: light grey stripes of random angle and period, [H, W, 3]."""
  angle = rng.uniform(0, np.pi)
  period = rng.uniform(5, 10)
  phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
  grey = rng.uniform(170, 205) + 22 * np.sin(phase)
  tint = rng.uniform(-6, 6, size=3)
  return (grey[..., None] + tint).astype(np.float32)


def _place_object(rng: np.random.Generator, occupied: np.ndarray, gap: int,
                  scale: tuple[float, float], tries: int = 20) -> np.ndarray | None:
  """A random shape that keeps `gap` pixels from every placed object, or None.

  Shapes are drawn in a window around their centre, which is much cheaper than the full image.
  """
  height, width = occupied.shape
  if occupied.any():
    keep_out = ndimage.binary_dilation(occupied, iterations=gap)
    room = ndimage.distance_transform_edt(~keep_out)  # Distance to the nearest kept-out pixel.
  else:
    keep_out = occupied
    room = np.full(occupied.shape, np.inf)
  short = min(height, width)
  shrink = 1.0
  for _ in range(tries):
    ry, rx = rng.uniform(*scale, size=2) * short * shrink
    reach = int(np.ceil(1.25 * max(ry, rx))) + 1  # Covers every shape below, blob wobble too.
    if 2 * reach + 2 >= short:
      reach = short // 2 - 2
    # Centres whose whole reach is free and inside the image (with a pixel to spare: a cut
    # object could lose its part), so the shape cannot touch anything.
    inner = room[reach + 1:height - reach - 1, reach + 1:width - reach - 1]
    centres = np.argwhere(inner > reach)
    if len(centres) == 0:
      shrink *= 0.85
      continue
    cy, cx = centres[rng.integers(len(centres))] + reach + 1
    theta = rng.uniform(0, np.pi)
    dy, dx = np.ogrid[-reach:reach + 1, -reach:reach + 1]
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    kind = rng.integers(3)
    if kind == 0:  # ellipse
      local = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    elif kind == 1:  # rotated rectangle
      local = (np.abs(u) <= rx * 0.8) & (np.abs(v) <= ry * 0.8)
    else:  # blob: a circle whose radius wobbles with a few harmonics
      radius = 0.5 * (rx + ry)
      phi = np.arctan2(v, u)
      wobble = sum(rng.uniform(0.05, 0.18) * np.sin(k * phi + rng.uniform(0, 2 * np.pi))
                   for k in (2, 3, 5))
      local = np.hypot(u, v) <= radius * (1.0 + wobble)
    if local.sum() < 64:
      continue
    obj = np.zeros((height, width), bool)
    obj[cy - reach:cy + reach + 1, cx - reach:cx + reach + 1] = local
    if not (obj & keep_out).any():
      return obj
  return None


def _part(rng: np.random.Generator, obj: np.ndarray,
          fraction: tuple[float, float]) -> np.ndarray:
  """A disc inside `obj` covering a `fraction` (drawn from the range) of its area."""
  area = obj.sum()
  radius = np.sqrt(rng.uniform(*fraction) * area / np.pi)
  depth = ndimage.distance_transform_edt(obj)
  inside = np.argwhere(depth >= radius + 1)
  if len(inside) == 0:  # Thin object: shrink the disc to fit at the deepest point.
    inside = np.argwhere(depth == depth.max())
    radius = max(depth.max() - 1, 1.0)
  cy, cx = inside[rng.integers(len(inside))]
  yy, xx = np.ogrid[0:obj.shape[0], 0:obj.shape[1]]
  return ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & obj
