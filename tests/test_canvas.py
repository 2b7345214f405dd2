"""The padded-canvas forward (models/canvas.py) equals the original's unpadded forward.

Each network runs on an image at the top-left of a larger canvas (zeros around, as the inference
pipeline pads) with `sizes`, and on the unpadded image alone (AffinityNet: the image padded to a
multiple of 8, as the original's random walk feeds it); the outputs on the image's own cells
must agree. BatchNorm statistics and biases are random, so that the canvas padding does not stay
zero through the network: without `sizes` the two differ, and the test can fail. Width 1/16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from affinity_jax import cam, models
from affinity_jax.data.pipelines import canvas_for_scale
from affinity_jax.models import canvas
from tests import reference_cam

WIDTH = 1 / 16
NUM_CLASSES = 3
CANVAS = (64, 80)
# Two images of a batch, odd and non-square: grids 6 x 8 and 5 x 4 of the canvas's 8 x 10.
SIZES = np.array([[45, 61], [37, 29]], np.int32)
TOLERANCE = 1e-5  # of the largest output, float32


def _variables(model, seed: int) -> dict:
  """Random variables of `model`: kernels N(0, 1 / fan_in), BN means and all biases
  N(0, 0.5^2), BN variances and scales (GroupNorm's too) U(0.5, 1.5). From the shapes alone
  (compiling the initialiser costs more than these tests)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    shape = leaf.shape
    if path[-1] in ("mean", "bias"):
      return rng.normal(0.0, 0.5, shape).astype(np.float32)
    if path[-1] in ("var", "scale"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return rng.normal(0.0, np.prod(shape[:-1]) ** -0.5, shape).astype(np.float32)

  return {col: traverse_util.unflatten_dict(
      {path: draw(path, leaf) for path, leaf in traverse_util.flatten_dict(tree).items()})
          for col, tree in shapes.items()}


def _images(seed: int, sizes=SIZES, scale: float = 1.0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(0.0, scale, (int(h), int(w), 3)).astype(np.float32) for h, w in sizes]


def _on_canvas(images: list[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
  out = np.zeros((len(images), *hw, 3), np.float32)
  for b, image in enumerate(images):
    out[b, :image.shape[0], :image.shape[1]] = image
  return out


def _compiled(fn, *args):
  """jit(fn) compiled for the shapes of `args`, without XLA:CPU's backend optimisations: a
  compile of ResNet-38 then costs about half, less than running it op by op at a new shape."""
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _run(fn, *args) -> np.ndarray:
  return np.asarray(_compiled(fn, *args)(*args))


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  scale = np.abs(want).max()
  assert scale > 1e-3, "degenerate reference output"
  return float(np.abs(got - want).max() / scale)


def test_valid_cells_extent_per_stride():
  valid = np.asarray(canvas.valid_cells(SIZES, (8, 10), 8))[..., 0]
  assert valid.shape == (2, 8, 10)
  assert valid[0].sum() == 6 * 8 and valid[0, :6, :8].all()
  assert valid[1].sum() == 5 * 4 and valid[1, :5, :4].all()
  assert canvas.valid_cells(None, (8, 10), 8) is None
  x = jnp.ones((2, 8, 10, 1))
  assert canvas.zero_outside(x, None) is x


NETWORKS = [  # (backbone, arch, method, padded to a multiple of 8 as the original)
    ("resnet38", "cam", "cam", False),
    ("resnet38", "cam", "__call__", False),
    ("resnet38", "affinity", "__call__", True),
    ("resnet38", "seg", "__call__", False),
    ("vgg16", "cam", "cam", False),
    ("vgg16", "affinity", "__call__", True),
    ("vgg16", "seg", "__call__", False),
    ("resnet50", "cam", "cam", False),
    ("resnet50", "seg", "__call__", False),
]


@pytest.mark.parametrize("backbone,arch,method,pad8", NETWORKS)
def test_canvas_forward_equals_unpadded(backbone, arch, method, pad8):
  model = models.build(arch, num_classes=NUM_CLASSES, width=WIDTH, backbone=backbone)
  variables = _variables(model, seed=len(arch) + len(backbone))
  # VGG-16 sees BGR minus the mean pixel: tens of units.
  images = _images(1, scale=1.0 if backbone == "resnet38" else 40.0)
  sizes = SIZES
  if pad8:  # The original's AffinityNet input: the image padded with zeros to a multiple of 8.
    sizes = -(-SIZES // 8) * 8
    images = [_on_canvas([x], tuple(s))[0] for x, s in zip(images, sizes)]

  def forward(x, sizes=None):  # Op by op: the shapes recur from network to network.
    return np.asarray(model.apply(variables, jnp.asarray(x), sizes=sizes, method=method))

  on_canvas = _on_canvas(images, CANVAS)
  got = forward(on_canvas, sizes)
  plain = forward(on_canvas)
  # Images that fill the canvas: the mask changes nothing (pooled statistics may differ in the
  # order of their sums).
  assert _rel(forward(on_canvas, np.array([CANVAS] * len(images))), plain) < 1e-6
  worst_plain = 0.0
  for b, image in enumerate(images):
    want = forward(image[None])[0]
    if method == "cam" or arch != "cam":  # grids: compare the image's own cells
      gh, gw = -(-SIZES[b] // (getattr(model, "stride", 8) if arch == "cam" else 8))
      assert want.shape[:2] == (gh, gw)
      assert _rel(got[b, :gh, :gw], want) < TOLERANCE
      worst_plain = max(worst_plain, _rel(plain[b, :gh, :gw], want))
    else:  # logits: global average pooling over the image's cells only
      assert _rel(got[b], want) < TOLERANCE
      worst_plain = max(worst_plain, _rel(plain[b], want))
  # Without `sizes` the canvas padding leaks into the image: the check above can fail. (The
  # segmentation logits are dominated by seg_conv2's random bias, hence 100x, not more.)
  assert worst_plain > 100 * TOLERANCE, worst_plain


def _resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  return np.asarray(jax.image.resize(image, (*hw, 3), "bicubic"), np.float32)


def test_multiscale_flip_sum_equals_per_image_unpadded_passes():
  scales = (1.0, 0.5, 1.5, 2.0)
  model = models.build("cam", num_classes=NUM_CLASSES, width=WIDTH)
  variables = _variables(model, seed=4)
  originals = _images(5)
  # An inference batch as data.pipelines.inference gives it; the resized images are the same
  # arrays on both sides, so only the canvas differs.
  batch = {"orig_size": SIZES, "raw": np.zeros((2, *CANVAS, 3), np.uint8)}
  resized = []
  for i, s in enumerate(scales):
    scaled = np.maximum(np.round(SIZES * s), 1).astype(np.int32)
    resized.append([_resize(x, tuple(hw)) for x, hw in zip(originals, scaled)])
    batch[f"image_s{i}"] = _on_canvas(resized[-1], canvas_for_scale(CANVAS, s))
    batch[f"size_s{i}"] = scaled
  cam_fn = cam.multiscale_flip_sum(lambda v, x, sizes: model.apply(v, x, sizes, method="cam"))
  total = _run(cam_fn, variables, cam.pass_inputs(batch, scales))
  assert total.shape == (2, *CANVAS, NUM_CLASSES)

  for b, (h, w) in enumerate(SIZES):
    want = 0.0
    for per_scale in resized:
      image = per_scale[b]
      grids = _run(lambda v, x: model.apply(v, x, method="cam"), variables,
                   np.stack([image, image[:, ::-1]]))
      want = want + reference_cam.upsample_cam(grids[0], (h, w))
      want = want + reference_cam.upsample_cam(grids[1], (h, w), flipped=True)
    assert _rel(total[b, :h, :w], want) < TOLERANCE
    assert not total[b, h:].any() and not total[b, :, w:].any()
