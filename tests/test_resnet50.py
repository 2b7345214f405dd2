"""ResNet-50 (IRN's backbone) and IRN's CAM network: against the independent NumPy forward pass,
the canvas forward, IRN's optimiser groups, the torchvision / IRN converter and its errors,
`affinity-jax convert torchvision`, and (with IRN_ROOT and torch) IRN's own modules.

Variables come from random state dicts in torchvision's names (tests/reference_resnet50.py,
width 1/16) converted by the real converter, so the models, the renaming and the layouts are
checked together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from affinity_jax import checkpoint, cli, convert, models
from affinity_jax import config as config_lib
from affinity_jax.errors import ConfigError
from affinity_jax.convert import ConversionError
from affinity_jax.models import resnet50
from tests import reference_resnet50 as ref
from tests.test_models import _close

W = 1 / 16
H, WD = 40, 56  # non-square; 20x28 -> 10x14 -> 5x7 -> 3x4 (odd sizes at stride 8 and 16)
CLASSES = 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(seed: int, shape=(2, H, WD, 3)) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def cam_net():
  """(state dict with classifier, converted variables, model, jitted logits, jitted cams)."""
  sd = ref.random_state_dict(W, seed=1, classes=CLASSES)
  variables, dropped = convert.torchvision_to_variables(sd, "cam")
  assert dropped == []
  model = models.build("cam", num_classes=CLASSES, width=W, backbone="resnet50")
  logits = jax.jit(lambda v, x, sizes=None: model.apply(v, x, sizes=sizes))
  cams = jax.jit(lambda v, x, sizes=None: model.apply(v, x, sizes, method="cam"))
  return sd, variables, model, logits, cams


# --- the networks against NumPy ------------------------------------------------------------------

@pytest.mark.parametrize("size", [(H, WD), (33, 26)])
def test_backbone_stages_match_numpy(size):
  sd = ref.random_state_dict(W, seed=0, fc=True)
  variables, dropped = convert.torchvision_to_variables(sd, "backbone")
  assert dropped == ["fc.bias", "fc.weight"]
  model = models.build("backbone", width=W, backbone="resnet50")
  x = _images(2, (2, *size, 3))
  got = jax.jit(model.apply)(variables, x)
  want = ref.stages(sd, x.transpose(0, 3, 1, 2))
  assert set(got) == set(want) == {"conv1", "stage1", "stage2", "stage3", "stage4"}
  strides = resnet50.output_strides()
  assert strides == {"conv1": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 16}
  for name, tap in got.items():
    h, w = (-(-s // strides[name]) for s in size)
    assert tap.shape == (2, h, w, want[name].shape[1]), name
    _close(tap, want[name].transpose(0, 2, 3, 1))


def test_cam_logits_and_cams_match_numpy(cam_net):
  sd, variables, model, logits, cams = cam_net
  x = _images(0)
  nchw = x.transpose(0, 3, 1, 2)
  got = logits(variables, x)
  assert got.shape == (2, CLASSES) and got.dtype == jnp.float32
  _close(got, ref.cam_logits(sd, nchw))
  maps = cams(variables, x)
  assert maps.shape == (2, 3, 4, CLASSES) and maps.dtype == jnp.float32
  assert model.stride == 16
  _close(maps, ref.cams(sd, nchw).transpose(0, 2, 3, 1))
  train = jax.jit(lambda v, x: model.apply(v, x, train=True))
  np.testing.assert_array_equal(train(variables, x), got)  # no dropout


def test_canvas_forward_equals_the_unpadded_one(cam_net):
  _, variables, _, logits, cams = cam_net
  sizes = np.array([[H, WD], [29, 37]], np.int32)
  canvas = np.full((2, 48, 64, 3), 3.0, np.float32)  # padding far from the images
  images = [_images(5, (1, H, WD, 3))[0], _images(6, (1, 29, 37, 3))[0]]
  for i, img in enumerate(images):
    canvas[i, :img.shape[0], :img.shape[1]] = img
  on_canvas_logits = logits(variables, canvas, sizes)
  on_canvas_cams = cams(variables, canvas, sizes)
  for i, img in enumerate(images):
    alone = cams(variables, img[None])[0]
    h, w = alone.shape[:2]
    _close(on_canvas_cams[i, :h, :w], alone, rtol=1e-5)
    _close(on_canvas_logits[i], logits(variables, img[None])[0], rtol=1e-5)
  assert not np.allclose(logits(variables, canvas)[1], on_canvas_logits[1], atol=1e-3)


def test_training_gradient_stops_after_stage2_as_irns_detach(cam_net):
  _, variables, model, _, _ = cam_net
  x = _images(3, (1, 32, 32, 3))

  def loss(params):
    return jnp.sum(model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               train=True) ** 2)

  grads = traverse_util.flatten_dict(jax.grad(loss)(variables["params"]))
  for path, g in grads.items():
    stops = path[0] in ("conv1", "bn1") or path[0].startswith(("layer1_", "layer2_"))
    assert (np.abs(g).max() == 0) == stops, path
  # The CAM forward (inference) is not cut: it is IRN's CAM.forward, no detach there.


def test_frozen_batch_norm_is_calibrated_too():
  model = models.build("backbone", width=W, backbone="resnet50")
  variables = models.init_variables(model, jax.random.key(0), (1, 32, 32, 3))
  calibrated = models.calibrate_batch_norm(model, variables, _images(4, (2, 32, 32, 3)))
  mean = calibrated["batch_stats"]["layer3_0"]["bn2"]["mean"]
  assert np.abs(mean).max() > 0  # was zeros
  assert set(variables["params"]["bn1"]) == {"scale", "bias"}
  assert set(variables["batch_stats"]["bn1"]) == {"mean", "var"}


# --- building, labels, config --------------------------------------------------------------------

def test_full_width_layout_is_torchvisions_and_the_models():
  manifest = ref.manifest(1.0, classes=CLASSES)
  assert list(convert.torchvision_state_dict_shapes("cam").items()) == manifest
  assert list(convert.torchvision_state_dict_shapes("backbone").items()) == manifest[:-1]
  model = models.build("cam", backbone="resnet50")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  got = {"/".join(p): a.shape for p, a in traverse_util.flatten_dict(shapes).items()}
  want = {}
  leaves = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
  for name, shape in manifest:
    *modules, leaf = name.split(".")
    if modules[0].startswith("layer"):
      modules = [f"{modules[0]}_{modules[1]}", *modules[2:]]
    if "downsample" in modules:
      modules = [*modules[:-2], f"downsample_{modules[-1]}"]
    if len(shape) == 4:
      want["/".join(["params", *modules, "kernel"])] = shape[2:] + shape[1::-1]
    else:
      collection = "params" if leaf in ("weight", "bias") else "batch_stats"
      want["/".join([collection, *modules, leaves[leaf]])] = shape
  assert got == want
  # torchvision's resnet50 has 25,557,032 parameters, of which fc 2,049,000.
  backbone = jax.eval_shape(models.build("backbone", backbone="resnet50").init,
                            jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  assert sum(a.size for a in jax.tree.leaves(backbone["params"])) == 25_557_032 - 2_049_000


def test_param_labels_are_irns_groups():
  v = jax.eval_shape(models.build("cam", width=W, backbone="resnet50").init,
                     jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  labels = traverse_util.flatten_dict(models.param_labels(v["params"]))
  by_module = {}
  for path, label in labels.items():
    by_module.setdefault(path[0], set()).add(label)
  for name, group in by_module.items():
    if name in ("conv1", "bn1") or name.startswith(("layer1_", "layer2_")):
      assert group == {"frozen"}, name
    elif name == "classifier":
      assert group == {"new_weight"}
    else:
      assert name.startswith(("layer3_", "layer4_")) and group == {"pretrained_weight"}, name
  # BatchNorm biases of layer3 / layer4 are trained at lr x1 with decay, as IRN's group 0.
  assert labels[("layer4_2", "bn3", "bias")] == "pretrained_weight"
  assert labels[("layer3_0", "downsample_1", "scale")] == "pretrained_weight"
  assert len(by_module) == 2 + 16 + 1


def test_build_and_config():
  assert isinstance(models.build("cam", backbone="resnet50"), models.ResNet50CAMNet)
  assert isinstance(models.build("cam", backbone="resnet50"), models.CAMNet)
  assert isinstance(models.build("backbone", backbone="resnet50"), models.ResNet50)
  with pytest.raises(ValueError, match="no 'affinity' network on resnet50 yet: resnet50 has "
                                       "only backbone, cam, relation, seg"):
    models.build("affinity", backbone="resnet50")
  seg = models.build("seg", num_classes=3, width=W, backbone="resnet50")
  assert isinstance(seg, models.ResNet50SegNet)
  variables = models.init_variables(seg, jax.random.key(0), (1, 32, 32, 3))
  # Output stride 8 (layer3 and layer4 dilated), the background first: 1 + 3 channels.
  assert seg.apply(variables, jnp.zeros((2, 75, 50, 3))).shape == (2, 10, 7, 4)
  labels = models.param_labels(variables["params"])
  assert labels["conv1"]["kernel"] == labels["layer2_0"]["conv1"]["kernel"] == "frozen"
  assert labels["layer4_2"]["conv3"]["kernel"] == "pretrained_weight"
  assert labels["seg_conv2"]["bias"] == "new_bias"
  cfg = ml_collections.ConfigDict({"model": {"num_classes": 3, "width": W, "dtype": "float32",
                                             "backbone": "resnet50"}})
  assert models.input_convention(cfg) == "imagenet"
  assert models.from_config(cfg, "cam").num_classes == 3
  with pytest.raises(ConfigError, match="model.backbone: there is no 'affinity' network on "
                                        "resnet50 yet"):
    models.from_config(cfg, "affinity")
  # PSA's pipeline refuses it before any work: ResNet-50 is IRN's (method irn).
  pipeline_cfg = config_lib.load_config("voc_vgg16:tiny")
  pipeline_cfg.model.backbone = "resnet50"
  with pytest.raises(ConfigError, match="model.backbone must be one of .'resnet38', 'vgg16'. "
                                        "with method psa"):
    config_lib.validate(pipeline_cfg)
  with pytest.raises(ValueError, match="strides and dilations take 4 values"):
    jax.eval_shape(resnet50.ResNet50(width=W, strides=(2, 2)).init, jax.random.key(0),
                   jnp.zeros((1, 32, 32, 3)))


def test_strides_and_dilations():
  model = resnet50.ResNet50(width=W, strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4))
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  out = jax.eval_shape(model.apply, v, jnp.zeros((1, H, WD, 3)))
  assert out["stage4"].shape == (1, 5, 7, 128)
  assert resnet50.output_strides((2, 2, 1, 1))["stage4"] == 8
  assert models.ResNet50CAMNet(strides=(1, 2, 2, 2)).stride == 16


# --- the converter -------------------------------------------------------------------------------

def test_conversion_places_and_transposes_every_tensor():
  sd = ref.random_state_dict(W, seed=2, fc=True)
  v, dropped = convert.torchvision_to_variables(sd, "backbone")
  np.testing.assert_array_equal(v["params"]["layer3_1"]["conv2"]["kernel"],
                                sd["layer3.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["layer2_0"]["downsample_1"]["scale"],
                                sd["layer2.0.downsample.1.weight"])
  np.testing.assert_array_equal(v["batch_stats"]["bn1"]["var"], sd["bn1.running_var"])
  assert len(jax.tree.leaves(v)) == len(sd) - 2 and dropped == ["fc.bias", "fc.weight"]
  # DataParallel's prefix and num_batches_tracked (torchvision >= 0.4 files) are accepted.
  wrapped = {"module." + k: val for k, val in sd.items()}
  wrapped["module.layer1.0.bn1.num_batches_tracked"] = np.zeros((), np.int64)
  again, _ = convert.torchvision_to_variables(wrapped, "backbone")
  jax.tree.map(np.testing.assert_array_equal, again, v)


def _irn_layout(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The state dict IRN's net/resnet50_cam.py Net saves: resnet50.*, the stages again (stage1 =
  conv1, bn1, relu, maxpool, layer1; stageN = layerN; backbone = the four stages; newly_added =
  the classifier) and classifier.weight, written from its module structure."""
  out = {}
  for name, value in sd.items():
    if name == "classifier.weight":
      out[name] = out["newly_added.0.weight"] = value
      continue
    out["resnet50." + name] = value
    head, rest = name.split(".", 1)
    if head in ("conv1", "bn1", "layer1"):
      stage = "stage1." + {"conv1": "0", "bn1": "1", "layer1": "4"}[head] + "." + rest
      out[stage] = out["backbone.0." + stage[len("stage1."):]] = value
    else:
      n = int(head[-1])
      out[f"stage{n}.0.{rest}"] = out[f"backbone.{n - 1}.0.{rest}"] = value
  return out


def test_irns_own_cam_file_layout():
  sd = ref.random_state_dict(W, seed=3, classes=CLASSES)
  want, _ = convert.torchvision_to_variables(sd, "cam")
  irn = _irn_layout(sd)
  got, dropped = convert.torchvision_to_variables(irn, "cam")
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert dropped == []
  backbone, dropped = convert.torchvision_to_variables(irn, "backbone")
  assert dropped == ["classifier.weight"] and "classifier" not in backbone["params"]
  irn["stage3.0.1.conv2.weight"] = irn["stage3.0.1.conv2.weight"] + 1.0
  with pytest.raises(ConversionError, match=r"stage3\.0\.1\.conv2\.weight should be the same "
                                            r"tensor as resnet50\.layer3\.1\.conv2\.weight"):
    convert.torchvision_to_variables(irn, "cam", source="res50_cam.pth")


def test_bad_state_dicts_are_named():
  sd = ref.random_state_dict(W, seed=4, fc=True)
  missing = dict(sd)
  del missing["layer2.3.bn2.running_var"], missing["layer4.0.conv1.weight"]
  with pytest.raises(ConversionError, match=r"^r50\.pth: missing layer2\.3\.bn2\.running_var "
                                            r"\(and 1 more\)"):
    convert.torchvision_to_variables(missing, "backbone", source="r50.pth")
  wrong = dict(sd, **{"layer3.2.conv3.weight": np.zeros((64, 16, 3, 3), np.float32)})
  with pytest.raises(ConversionError, match=r"r50\.pth: layer3\.2\.conv3\.weight has shape "
                                            r"\(64, 16, 3, 3\), expected \(64, 16, 1, 1\)"):
    convert.torchvision_to_variables(wrong, "backbone", source="r50.pth")
  extra = dict(sd, **{"layer4.3.conv1.weight": np.zeros((32, 128, 1, 1), np.float32)})
  with pytest.raises(ConversionError, match=r"unexpected key layer4\.3\.conv1\.weight"):
    convert.torchvision_to_variables(extra, "backbone", source="r50.pth")
  with pytest.raises(ConversionError, match="no classifier.weight, IRN's CAM classifier: "
                                            "torchvision's ImageNet file has none"):
    convert.torchvision_to_variables(sd, "cam", source="r50.pth")
  with pytest.raises(ConversionError, match="no conv1.weight"):
    convert.torchvision_to_variables({"conv1a.weight": np.zeros((4, 3, 3, 3))}, "backbone")
  with pytest.raises(ConversionError, match="unknown architecture 'affinity' for ResNet-50"):
    convert.torchvision_to_variables(sd, "affinity")


def _write_npz(path, sd):
  np.savez(path, **sd)
  return str(path)


def test_convert_torchvision_without_torch(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails: the .npz path alone
  sd = ref.random_state_dict(W, seed=5, fc=True)
  npz = _write_npz(tmp_path / "resnet50.npz", sd)
  assert cli.main(["convert", "torchvision", npz, str(tmp_path / "out")]) == 0
  variables, meta = checkpoint.load_variables(str(tmp_path / "out"))
  assert meta["arch"] == "backbone" and meta["backbone"] == "resnet50" and meta["width"] == W
  assert meta["source"] == "torchvision resnet50.npz"
  assert meta["dropped"] == ["fc.bias", "fc.weight"]
  want, _ = convert.torchvision_to_variables(sd, "backbone")
  jax.tree.map(np.testing.assert_array_equal, variables, want)
  checkpoint.check_compatible(meta, arch="backbone", width=W, backbone="resnet50")
  # What a resnet50 config's init.backbone does with it: merged into a CAM network.
  model = models.build("cam", width=W, backbone="resnet50")
  fresh = models.init_variables(model, jax.random.key(1), (1, 32, 32, 3))
  merged = checkpoint.merge_backbone(fresh, variables, "out")
  assert set(merged["params"]) == set(fresh["params"])

  irn = _write_npz(tmp_path / "res50_cam.npz", _irn_layout(
      ref.random_state_dict(W, seed=6, classes=CLASSES)))
  meta = convert.convert_torchvision(irn, str(tmp_path / "cam"), "cam")
  assert meta["num_classes"] == CLASSES and meta["source"] == "irn res50_cam.npz"

  with pytest.raises(ConversionError, match=r"absent\.pth: no such file"):  # before torch
    convert.convert_torchvision(str(tmp_path / "absent.pth"), str(tmp_path / "x"))
  (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 not read without torch")
  with pytest.raises(ConversionError, match=r"w\.pth: reading .pth files needs PyTorch: "
                                            r"pip install 'affinity_jax\[torch\]'"):
    convert.convert_torchvision(str(tmp_path / "w.pth"), str(tmp_path / "x"))


def test_bad_files_are_named(tmp_path, capsys):
  sd = ref.random_state_dict(W, seed=7)
  whole = open(_write_npz(tmp_path / "whole.npz", sd), "rb").read()
  (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])
  cases = {
      str(tmp_path / "cut.npz"): "cut.npz: not a NumPy .npz archive of arrays, or truncated",
      str(tmp_path): "a folder, not a weight file",
      str(tmp_path / "absent.npz"): "absent.npz: no such file",
  }
  (tmp_path / "notes.npz").write_text("hello")
  cases[str(tmp_path / "notes.npz")] = "notes.npz: not a NumPy .npz archive"
  for path, message in cases.items():
    with pytest.raises(ConversionError, match=message):
      convert.convert_torchvision(path, str(tmp_path / "out"))
  short = dict(sd)
  del short["layer1.1.conv3.weight"]
  bad = _write_npz(tmp_path / "short.npz", short)
  assert cli.main(["convert", "torchvision", bad, str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "short.npz: missing layer1.1.conv3.weight: not torchvision's ResNet-50" in err
  assert not os.path.exists(tmp_path / "out")


def test_convert_torchvision_pth(tmp_path):
  torch = pytest.importorskip("torch")
  sd = ref.random_state_dict(W, seed=8, fc=True)
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  tensors["bn1.num_batches_tracked"] = torch.tensor(0)
  zipped, legacy = tmp_path / "resnet50.pth", tmp_path / "resnet50-19c8e357.pth"
  torch.save(tensors, zipped)
  torch.save(tensors, legacy, _use_new_zipfile_serialization=False)  # as torchvision's 2017 file
  want, _ = convert.torchvision_to_variables(sd, "backbone")
  for i, path in enumerate((zipped, legacy)):
    out = tmp_path / f"out{i}"
    assert cli.main(["convert", "torchvision", str(path), str(out)]) == 0
    variables, meta = checkpoint.load_variables(str(out))
    jax.tree.map(np.testing.assert_array_equal, variables, want)
    assert meta["dropped"] == ["fc.bias", "fc.weight"]
  irn = tmp_path / "res50_cam.pth"
  torch.save({k: torch.from_numpy(v) for k, v in _irn_layout(
      ref.random_state_dict(W, seed=9, classes=CLASSES)).items()}, irn)
  assert cli.main(["convert", "torchvision", str(irn), str(tmp_path / "cam"), "--arch",
                   "cam"]) == 0
  whole = zipped.read_bytes()
  (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])
  with pytest.raises(ConversionError, match="cut.pth: not a PyTorch checkpoint"):
    convert.convert_torchvision(str(tmp_path / "cut.pth"), str(tmp_path / "x"))
  torch.save([1, 2, 3], tmp_path / "list.pth")
  with pytest.raises(ConversionError, match="list.pth: holds a list, not a state dict"):
    convert.convert_torchvision(str(tmp_path / "list.pth"), str(tmp_path / "x"))


# --- IRN's own modules ---------------------------------------------------------------------------

def test_parity_with_irns_networks():
  irn_root = os.environ.get("IRN_ROOT")
  if not irn_root:
    pytest.skip("set IRN_ROOT to a checkout of github.com/jiwoon-ahn/irn to compare with it")
  pytest.importorskip("torch", reason="the comparison with IRN needs torch")
  res = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "compare_irn_networks.py"),
       "--irn-root", irn_root, "--sizes", "72x104,97x66", "--skip-relation"],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert res.returncode == 0, res.stderr[-3000:]
  results = json.loads(res.stdout.strip().splitlines()[-1])
  for size in ("72x104", "97x66"):
    for key in ("logits", "cam", "conv1", "stage1", "stage2", "stage3", "stage4"):
      assert results[f"{key}_{size}_max_rel"] <= 1e-5, (key, size, results)


def test_irn_cams_shapes_classes_and_normalisation():
  """cam.irn_cams with the real CAM network (tiny width): the stride-4 and full-resolution maps
  of the chosen classes, each peaking at 1 / (1 + 1e-5); IRN_ROOT's comparison checks values."""
  from affinity_jax import cam as cam_lib  # pylint: disable=import-outside-toplevel
  model = models.build("cam", num_classes=5, width=W, backbone="resnet50")
  variables = models.init_variables(model, jax.random.key(0), (1, 32, 32, 3))
  apply = jax.jit(lambda x: model.apply(variables, x, method="cam"))
  image = np.random.default_rng(0).integers(0, 256, (37, 50, 3)).astype(np.uint8)
  out = cam_lib.irn_cams(apply, image, [0, 1, 2, 3, 4], scales=(1.0, 0.5))
  assert out["cam"].shape == (10, 13, 5) and out["high_res"].shape == (37, 50, 5)
  for maps in out.values():
    assert maps.dtype == np.float32 and maps.min() >= 0
    peaks = maps.max(axis=(0, 1))  # a class whose ReLU'd map is 0 everywhere stays 0
    assert np.all((peaks == 0) | ((peaks > 0.99) & (peaks <= 1))) and peaks.max() > 0.99, peaks
  live = int(np.argmax(out["cam"].max(axis=(0, 1))))
  single = cam_lib.irn_cams(apply, image, [live], scales=(1.0, 0.5))
  np.testing.assert_allclose(single["cam"][..., 0], out["cam"][..., live], rtol=1e-6)
  np.testing.assert_allclose(single["high_res"][..., 0], out["high_res"][..., live], rtol=1e-6)
  with pytest.raises(ValueError, match="irn_cams: image must be uint8"):
    cam_lib.irn_cams(apply, image.astype(np.float32), [1])


def test_irn_cams_on_bucketed_canvases_equal_each_image_alone():
  """infer_cam (method irn) runs each scaled image on a canvas rounded up to IRN_BUCKET pixels
  with its size given: the same CAMs as the image alone, for a few compiles per split."""
  from affinity_jax import cam as cam_lib  # pylint: disable=import-outside-toplevel
  from affinity_jax.stages import infer_cam  # pylint: disable=import-outside-toplevel
  model = models.build("cam", num_classes=4, width=W, backbone="resnet50")
  variables = models.init_variables(model, jax.random.key(1), (1, 32, 32, 3))
  plain = jax.jit(lambda x: model.apply(variables, x, method="cam"))
  bucketed = infer_cam._bucketed(  # pylint: disable=protected-access
      jax.jit(lambda v, x, sizes: model.apply(v, x, sizes, method="cam")), model.stride)
  image = np.random.default_rng(2).integers(0, 256, (45, 70, 3)).astype(np.uint8)
  want = cam_lib.irn_cams(plain, image, [0, 2, 3], scales=(1.0, 0.5, 1.5))
  got = cam_lib.irn_cams(lambda x: bucketed(variables, x), image, [0, 2, 3],
                         scales=(1.0, 0.5, 1.5))
  for key in ("cam", "high_res"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
