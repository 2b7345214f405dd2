"""VGG-16: the networks against the independent NumPy forward pass, its input convention, its
optimiser groups, the converted layout, checkpoints of the wrong backbone, and the tiny VGG-16
config end to end through the CLI.

Variables come from random state dicts in the original's names (tests/_vgg16_fixtures.py, width
1/8) converted by the real converter, so the models, the renaming and the layouts are checked
together.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from flax import traverse_util

from affinity_jax import artifacts, checkpoint, cli, config, convert, models
from affinity_jax.constants import CAFFE_MEAN_RGB
from affinity_jax.data import transforms
from affinity_jax.errors import ConfigError
from affinity_jax.models.vgg16 import GroupNorm
from tests import _vgg16_fixtures as fx
from tests import numpy_reference as ref
from tests.test_models import _close

W = fx.TINY_WIDTH
H, WD = 36, 52  # non-square, not a multiple of 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(seed: int, shape=(2, H, WD, 3)) -> np.ndarray:
  return np.random.default_rng(seed).normal(0.0, 50.0, size=shape).astype(np.float32)


def _variables(key: str, arch: str, seed: int):
  sd = fx.random_state_dict(key, seed=seed)
  return sd, convert.psa_state_dict_to_variables(sd, arch, width=W, backbone="vgg16")


def test_cam_logits_and_cams_match_numpy():
  sd, variables = _variables("vgg16_cls", "cam", 1)
  model = models.build("cam", width=W, backbone="vgg16")
  x = _images(0)
  nchw = x.transpose(0, 3, 1, 2)
  _close(jax.jit(model.apply)(variables, x), ref.vgg16_cam_logits(sd, nchw))
  cams = jax.jit(lambda v, x: model.apply(v, x, method="cam"))(variables, x)
  assert cams.shape == (2, 5, 7, 20) and cams.dtype == jnp.float32
  _close(cams, ref.vgg16_cams(sd, nchw).transpose(0, 2, 3, 1))


def test_affinity_features_match_numpy():
  sd, variables = _variables("vgg16_aff", "affinity", 2)
  model = models.build("affinity", width=W, backbone="vgg16")
  x = _images(1, (2, H, WD, 3))
  got = jax.jit(model.apply)(variables, x)
  assert got.shape == (2, 5, 7, model.feature_dim) and model.feature_dim == 56
  # Width 1/8 keeps the original's 8 channels per group: 1, 2 and 4 groups.
  groups = {"gn8_3": 1, "gn8_4": 2, "gn8_5": 4}
  _close(got, ref.vgg16_affinity_features(sd, x.transpose(0, 3, 1, 2), groups)
         .transpose(0, 2, 3, 1))


def test_group_norm_statistics_over_the_valid_cells_only():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 16)).astype(np.float32)
  canvas = np.full((2, 8, 9, 16), 7.0, np.float32)  # padding far from the image's statistics
  canvas[:, :5, :7] = x
  valid = np.zeros((2, 8, 9), bool)
  valid[:, :5, :7] = True
  gn = GroupNorm(4)
  variables = {"params": {"scale": np.linspace(0.5, 1.5, 16), "bias": np.linspace(-1, 1, 16)}}
  alone = gn.apply(variables, x)
  masked = gn.apply(variables, canvas, valid)[:, :5, :7]
  np.testing.assert_allclose(masked, alone, atol=1e-5)
  assert not np.allclose(gn.apply(variables, canvas)[:, :5, :7], alone, atol=1e-2)
  empty = gn.apply(variables, canvas, np.zeros_like(valid))  # a batch's dummy example
  assert np.all(np.isfinite(empty))


@pytest.mark.parametrize("arch", ["backbone", "seg"])
@pytest.mark.parametrize("size", [(33, 47), (64, 40)])
def test_shapes_at_stride_8(arch, size):
  model = models.build(arch, num_classes=3, width=W, backbone="vgg16")
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  out = jax.eval_shape(model.apply, v, jnp.zeros((2, *size, 3)))
  h, w = (math.ceil(math.ceil(math.ceil(s / 2) / 2) / 2) for s in size)
  if arch == "seg":
    assert out.shape == (2, h, w, 4)
    assert v["params"]["seg_conv1"]["kernel"].shape == (3, 3, 128, 64)
  else:
    assert {k: a.shape for k, a in out.items()} == {
        "conv4": (2, h, w, 64), "conv5": (2, h, w, 64), "conv5fc": (2, h, w, 128)}
  assert "batch_stats" not in v  # no BatchNorm in VGG-16


def test_dropout_only_when_training():
  _, variables = _variables("vgg16_cls", "cam", 3)
  model = models.build("cam", width=W, backbone="vgg16")
  x = _images(2, (1, 40, 40, 3))
  apply = jax.jit(model.apply, static_argnames="train")
  a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)})
  b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(a, b) and not np.allclose(a, apply(variables, x))
  np.testing.assert_array_equal(apply(variables, x), apply(variables, x, train=False))


def test_param_labels_are_the_original_groups():
  aff = jax.eval_shape(models.build("affinity", width=W, backbone="vgg16").init,
                       jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  labels = traverse_util.flatten_dict(models.param_labels(aff["params"]))
  frozen = {p for p, lab in labels.items() if lab == "frozen"}
  assert frozen == {(f"conv{s}", leaf) for s in ("1_1", "1_2", "2_1", "2_2")
                    for leaf in ("kernel", "bias")}
  assert labels[("conv3_1", "bias")] == "pretrained_bias"
  assert labels[("fc7", "kernel")] == "pretrained_weight"
  assert {labels[(h, "kernel")] for h in ("f8_3", "f8_4", "f8_5", "f9")} == {"new_weight"}
  # vgg16_aff.py leaves the GroupNorms out of from_scratch_layers: groups 0 and 1.
  assert labels[("gn8_4", "scale")] == "pretrained_weight"
  assert labels[("gn8_4", "bias")] == "pretrained_bias"
  cam = jax.eval_shape(models.build("cam", width=W, backbone="vgg16").init,
                       jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert models.param_labels(cam["params"])["fc8"] == {"kernel": "new_weight"}


def test_caffe_bgr_normalisation_eagerly_in_tf_data_and_in_jax():
  rgb = np.array([[[0, 128, 255], [10, 20, 30]]], np.uint8)
  want = rgb[..., ::-1].astype(np.float64) - np.array(CAFFE_MEAN_RGB)[::-1]  # vgg16d Normalize
  eager = transforms.normalize(tf.constant(rgb), "caffe_bgr").numpy()
  in_data = next(iter(tf.data.Dataset.from_tensors(rgb).map(
      lambda x: transforms.normalize(x, "caffe_bgr")))).numpy()
  for got in (eager, in_data, np.asarray(models.normalize_images(rgb, "caffe_bgr"))):
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4)
  with pytest.raises(ValueError, match="unknown input convention 'bgr'"):
    transforms.normalize(tf.constant(rgb), "bgr")


def test_backbone_comes_from_the_config():
  cfg = ml_collections.ConfigDict({"model": {"num_classes": 3, "width": W, "dtype": "float32"}})
  assert type(models.from_config(cfg, "cam")) is models.CAMNet  # no key: ResNet-38
  assert models.input_convention(cfg) == "imagenet"
  cfg.model.backbone = "vgg16"
  assert isinstance(models.from_config(cfg, "affinity"), models.VGG16AffinityNet)
  assert isinstance(models.from_config(cfg, "seg"), models.VGG16SegNet)
  assert models.input_convention(cfg) == "caffe_bgr"
  cfg.model.backbone = "vgg19"
  with pytest.raises(ConfigError, match="model.backbone: unknown backbone 'vgg19'"):
    models.from_config(cfg, "cam")


@pytest.mark.parametrize("key,arch", [("vgg16_cls", "cam"), ("vgg16_aff", "affinity"),
                                      ("vgg16d", "backbone")])
def test_converted_layout_is_the_original_state_dict(key, arch):
  manifest = fx.manifest(key)
  assert list(convert.psa_state_dict_shapes(arch, backbone="vgg16").items()) == manifest
  model = models.build(arch, backbone="vgg16")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  got = {"/".join(p): a.shape for p, a in traverse_util.flatten_dict(shapes).items()}
  want = {}
  for name, shape in manifest:
    module, leaf = name.split(".")
    if len(shape) == 4:
      want[f"params/{module}/kernel"] = shape[2:] + shape[1::-1]  # OIHW -> HWIO
    else:
      want[f"params/{module}/{'scale' if leaf == 'weight' else 'bias'}"] = shape
  assert got == want


def test_conversion_places_every_tensor_and_names_a_wrong_backbone():
  sd, v = _variables("vgg16_aff", "affinity", 4)
  np.testing.assert_array_equal(v["params"]["conv4_2"]["kernel"],
                                sd["conv4_2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["fc6"]["bias"], sd["fc6.bias"])
  np.testing.assert_array_equal(v["params"]["gn8_5"]["scale"], sd["gn8_5.weight"])
  assert len(jax.tree.leaves(v)) == len(sd)
  assert convert.infer_backbone(sd) == "vgg16" and convert.infer_width(sd, backbone="vgg16") == W
  with pytest.raises(convert.ConversionError, match="is --backbone right"):
    convert.psa_state_dict_to_variables(sd, "affinity", width=W)  # read as ResNet-38


@pytest.mark.parametrize("key,arch", [("vgg16_cls", "cam"), ("vgg16_aff", "affinity")])
def test_convert_psa_pytorch_reads_the_vgg16_files(tmp_path, key, arch):
  torch = pytest.importorskip("torch")
  sd = fx.random_state_dict(key, seed=6)
  pth = tmp_path / f"{key}.pth"
  torch.save({"module." + k: torch.from_numpy(v) for k, v in sd.items()}, pth)
  assert cli.main(["convert", "psa-pytorch", str(pth), str(tmp_path / "a"), "--arch", arch]) == 0
  meta = convert.convert_psa_pytorch(str(pth), str(tmp_path / "b"), arch, "vgg16")
  assert meta["backbone"] == "vgg16" and meta["width"] == W
  for out in ("a", "b"):
    variables, saved = checkpoint.load_variables(str(tmp_path / out))
    assert saved["backbone"] == "vgg16"
    want = convert.psa_state_dict_to_variables(sd, arch, width=W, backbone="vgg16")
    jax.tree.map(np.testing.assert_array_equal, variables, want)
  with pytest.raises(convert.ConversionError, match="no conv1a.weight: not a resnet38 network"):
    convert.convert_psa_pytorch(str(pth), str(tmp_path / "c"), arch, "resnet38")


def test_checkpoint_of_the_other_backbone_is_refused(tmp_path):
  _, v = _variables("vgg16d", "backbone", 5)
  meta = dict(arch="backbone", backbone="vgg16", width=W, num_classes=None, source="test")
  checkpoint.save_variables(str(tmp_path / "vgg"), v, metadata=meta)
  _, saved = checkpoint.load_variables(str(tmp_path / "vgg"))
  checkpoint.check_compatible(saved, arch="backbone", width=W, backbone="vgg16")
  with pytest.raises(checkpoint.CheckpointError, match="holds a vgg16 network, but the "
                                                       "config's model.backbone is resnet38"):
    checkpoint.check_compatible(saved, arch="backbone", width=W, backbone="resnet38")
  older = {k: val for k, val in meta.items() if k != "backbone"}  # before VGG-16 existed
  checkpoint.check_compatible(older, arch="backbone", width=W, backbone="resnet38")
  with pytest.raises(checkpoint.CheckpointError, match="holds a resnet38 network"):
    checkpoint.check_compatible(older, arch="backbone", width=W, backbone="vgg16")


# --- the tiny VGG-16 config, every stage on the synthetic data, through the CLI ------------------

def test_tiny_vgg16_config_runs_every_stage(tmp_path):
  workdir = tmp_path / "run"
  argv = ["run", "--config", os.path.join(REPO, "configs", "voc_vgg16.py:tiny"),
          "--workdir", str(workdir), f"--config.data.data_dir={tmp_path / 'tfds'}"]
  assert cli.main(argv) == 0
  for net in ("cam_net", "aff_net", "seg_net"):
    meta = json.loads((workdir / net / "final" / "metadata.json").read_text())
    assert meta["backbone"] == "vgg16", net
  results = json.loads((workdir / "results.json").read_text())
  for key in ("cam_miou", "rw_miou", "seg_miou"):
    assert 0.0 <= results[key] <= 1.0
  assert len(os.listdir(workdir / "pseudo_labels")) == 24  # 16 train + 8 val images
  # The same networks under a ResNet-38 config are refused by name.
  resnet = config.load_config(os.path.join(REPO, "configs", "synthetic.py:tiny"))
  resnet.workdir = str(workdir)
  with pytest.raises(checkpoint.CheckpointError, match="holds a vgg16 network, but the "
                                                       "config's model.backbone is resnet38"):
    checkpoint.load_network(resnet, artifacts.SEG_NET)


def test_parity_with_the_original_vgg16():
  psa_root = os.environ.get("PSA_ROOT")
  if not psa_root:
    pytest.skip("set PSA_ROOT to a checkout of github.com/jiwoon-ahn/psa to compare with it")
  pytest.importorskip("torch", reason="the comparison with the PyTorch original needs torch")
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  res = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "compare_pytorch.py"), "--psa-root",
       psa_root, "--backbone", "vgg16", "--quick", "--sizes", "72x104", "--ms-size", "40x72"],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert res.returncode == 0, res.stderr[-3000:]
  results = json.loads(res.stdout.strip().splitlines()[-1])
  for k in ("logits", "cam_squared", "affinity"):
    assert results[f"{k}_72x104_max_rel"] <= 1e-5, (k, results)
  # The CAM is sqrt(relu(fc8)): its difference is bounded by the root of relu(fc8)'s.
  assert results["cam_72x104_max_abs"] <= 1.01 * results["cam_squared_72x104_max_abs"] ** 0.5
  assert results["ms_cam_max_rel"] <= 1e-4
  assert results["rw_labels_identical_pct"] >= 99.9
