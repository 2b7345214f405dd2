"""The networks against an independent NumPy forward pass, plus shapes, dropout, labels, dtypes.

Variables come from random state dicts in the original's names (tiny width), converted with the
real converter: this checks the models, the renaming and the layouts together. Compiled
functions are shared through module-scoped fixtures (compiling ResNet-38 is the main cost).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from affinity_jax import convert, models
from affinity_jax.models.resnet38 import channel_dropout
from tests import _psa_fixtures as fx
from tests import numpy_reference as ref

W = fx.TINY_WIDTH
H, WD = 36, 52  # non-square, not a multiple of 8


def _images(seed: int, shape=(2, H, WD, 3)) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _close(got, want, rtol=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  scale = np.abs(want).max()
  assert scale > 1e-3, "degenerate reference output"
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.fixture(scope="module")
def cam_setup():
  sd = fx.random_state_dict("resnet38_cls", seed=1)
  variables = convert.psa_state_dict_to_variables(sd, "cam", width=W)
  model = models.CAMNet(width=W)
  return sd, variables, model, jax.jit(model.apply, static_argnames=("train", "method"))


@pytest.fixture(scope="module")
def backbone_setup():
  sd = fx.random_state_dict("backbone", seed=2)
  variables = convert.psa_state_dict_to_variables(sd, "backbone", width=W)
  model = models.ResNet38(width=W)
  return variables, jax.jit(model.apply, static_argnames="train")


def test_cam_logits_and_cams_match_numpy(cam_setup):
  sd, variables, _, apply = cam_setup
  x = _images(0)
  nchw = x.transpose(0, 3, 1, 2)
  _close(apply(variables, x), ref.cam_logits(sd, nchw))
  cams = apply(variables, x, method="cam")
  assert cams.shape == (2, 5, 7, 20) and cams.dtype == jnp.float32
  _close(cams, ref.cams(sd, nchw).transpose(0, 2, 3, 1))


def test_affinity_features_match_numpy():
  sd = fx.random_state_dict("resnet38_aff", seed=3)
  variables = convert.psa_state_dict_to_variables(sd, "affinity", width=W)
  model = models.AffinityNet(width=W)
  x = _images(1, (1, H, WD, 3))
  got = jax.jit(model.apply)(variables, x)
  assert got.shape == (1, 5, 7, model.feature_dim) and model.feature_dim == 14
  _close(got, ref.affinity_features(sd, x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("size", [(33, 47), (64, 40)])
def test_tap_shapes_at_stride_8(backbone_setup, size):
  variables, apply = backbone_setup
  taps = apply(variables, _images(2, (1, *size, 3)))
  # Three stride-2 convolutions padded like PyTorch: ceil(H / 2) each time.
  h, w = (math.ceil(math.ceil(math.ceil(s / 2) / 2) / 2) for s in size)
  assert {k: v.shape for k, v in taps.items()} == {
      "conv4": (1, h, w, 16), "conv5": (1, h, w, 32), "conv6": (1, h, w, 128)}


def test_dropout_only_when_training(backbone_setup):
  variables, apply = backbone_setup
  x = _images(3, (1, 33, 47, 3))  # the shape of a tap test: its compilation is reused.
  eval_a, eval_b = apply(variables, x), apply(variables, x, train=False)
  np.testing.assert_array_equal(eval_a["conv6"], eval_b["conv6"])
  train_a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)})
  train_b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  # Dropout lives in b6 and b7 only: the taps before them are untouched.
  np.testing.assert_array_equal(train_a["conv4"], eval_a["conv4"])
  np.testing.assert_array_equal(train_a["conv5"], eval_a["conv5"])
  assert not np.allclose(train_a["conv6"], eval_a["conv6"])
  assert not np.allclose(train_a["conv6"], train_b["conv6"])
  with pytest.raises(Exception, match="dropout"):
    apply(variables, x, train=True)  # no rng given


def test_channel_dropout_drops_whole_channels_per_example():
  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return channel_dropout(x, 0.5, train, "drop")

  x = jnp.ones((4, 5, 6, 64))
  y = np.asarray(Drop().apply({}, x, train=True, rngs={"dropout": jax.random.key(0)}))
  per_channel = y[:, :1, :1, :]
  np.testing.assert_array_equal(y, np.broadcast_to(per_channel, y.shape))  # constant over H, W
  assert set(np.unique(y)) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
  assert not np.array_equal(per_channel[0], per_channel[1])  # a mask per example
  np.testing.assert_array_equal(Drop().apply({}, x, train=False), x)


def test_param_labels_groups():
  variables = jax.eval_shape(models.SegNet(width=W).init, jax.random.key(0),
                             jnp.zeros((1, 16, 16, 3)))
  labels = traverse_util.flatten_dict(models.param_labels(variables["params"]))
  frozen = {p[0] for p, lab in labels.items() if lab == "frozen"}
  assert frozen == {"conv1a", "b2", "b2_1", "b2_2"}
  assert labels[("seg_conv1", "kernel")] == "new_weight"
  assert labels[("seg_conv2", "bias")] == "new_bias"
  assert labels[("b4_3", "conv_branch2a", "kernel")] == "pretrained_weight"
  assert set(labels.values()) == {"frozen", "pretrained_weight", "new_weight", "new_bias"}
  # BN statistics are constants outside params; params hold convolutions only.
  assert all(p[-1] in ("kernel", "bias") for p in labels)
  assert "bn7" in variables["batch_stats"] and "bn7" not in variables["params"]
  aff = jax.eval_shape(models.AffinityNet(width=W).init, jax.random.key(0),
                       jnp.zeros((1, 16, 16, 3)))
  aff_labels = models.param_labels(aff["params"])
  assert {aff_labels[k]["kernel"] for k in ("f8_3", "f8_4", "f8_5", "f9")} == {"new_weight"}


def test_build_and_bfloat16(cam_setup):
  _, variables, _, apply = cam_setup
  assert isinstance(models.build("affinity", width=W), models.AffinityNet)
  with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
    models.build("vgg")
  seg = models.build("seg", num_classes=3, width=W)
  shapes = jax.eval_shape(seg.init, jax.random.key(0), jnp.zeros((1, H, WD, 3)))
  assert shapes["params"]["seg_conv2"]["kernel"].shape == (3, 3, 16, 4)
  assert shapes["params"]["seg_conv1"]["bias"].shape == (16,)
  out = jax.eval_shape(seg.apply, shapes, jnp.zeros((2, H, WD, 3)))
  assert out.shape == (2, 5, 7, 4)
  # bfloat16 compute on float32 parameters: same variables, float32 output, close values.
  bf16 = models.CAMNet(width=W, dtype=jnp.bfloat16)
  x = _images(4)
  got = jax.jit(bf16.apply)(variables, x)
  assert got.dtype == jnp.float32
  want = apply(variables, x)
  np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_init_keeps_parameters_float32_and_heads_initialised():
  model = models.AffinityNet(width=W, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  dtypes = {a.dtype for a in jax.tree.leaves(shapes)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert shapes["params"]["f9"]["kernel"].shape == (1, 1, 14, 14)


def test_normalize_images():
  rgb = np.array([[[0, 128, 255]]], np.uint8)
  got = models.normalize_images(rgb)
  want = (np.array([0, 128, 255]) / 255 - np.array(models.IMAGENET_MEAN)) / models.IMAGENET_STD
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)
  assert got.dtype == jnp.float32


def test_init_variables_is_model_init():
  model = models.SegNet(num_classes=3, width=W)
  variables = models.init_variables(model, jax.random.key(0))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
      lambda a: (a.shape, a.dtype), shapes)
  bn = variables["batch_stats"]["b3"]["bn_branch2a"]  # identity statistics until converted
  np.testing.assert_array_equal(bn["var"], 1.0)
  np.testing.assert_array_equal(bn["mean"], 0.0)
  np.testing.assert_array_equal(variables["params"]["seg_conv1"]["bias"], 0.0)
  kernel = variables["params"]["seg_conv1"]["kernel"]
  fan_in = np.prod(kernel.shape[:3])
  assert 0.7 < np.std(kernel) * np.sqrt(fan_in / 2.0) < 1.3


def test_strided_1x1_convolution_subsamples_behind_a_barrier():
  # XLA:GPU (jax 0.11.2) aborted fusing the subsampled input of a stride-2 1x1 convolution into
  # a Triton matrix product; the barrier keeps the slice out of the product, with the same
  # numbers as the strided convolution.
  from affinity_jax.models.resnet38 import Conv
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 7, 4))
  for stride, barrier in ((2, True), (1, False)):
    conv = Conv(3, 1, stride=stride)
    variables = conv.init(jax.random.PRNGKey(1), x)
    text = jax.jit(lambda v, x: conv.apply(v, x)).lower(variables, x).as_text()
    assert ("optimization_barrier" in text) == barrier, stride
    grad = jax.grad(lambda v, x: jnp.sum(conv.apply(v, x) ** 2), argnums=(0, 1))
    assert ("optimization_barrier" in jax.jit(grad).lower(variables, x).as_text()) == barrier
    want = jax.lax.conv_general_dilated(x, variables["params"]["kernel"], (stride, stride),
                                        "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv.apply(variables, x), want, rtol=1e-5, atol=1e-6)
