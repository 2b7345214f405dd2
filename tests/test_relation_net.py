"""IRN's inter-pixel relation network (models/relation_net.py): against the independent NumPy
forward pass (tests/reference_resnet50.py), shapes at sizes not divisible by 16, the frozen
backbone, the mean shift, IRN's optimiser groups, GroupNorm groups at narrow widths, the
converter of IRN's res50_irn.pth and its errors, and (with IRN_ROOT and torch) IRN's own Net and
EdgeDisplacement.

Variables come from random state dicts in IRN's layout (its aliases and training buffers
included, written from its module structure) converted by the real converter, so the model, the
renaming and the layout are checked together.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from affinity_jax import artifacts, checkpoint, cli, convert, models
from affinity_jax import config as config_lib
from affinity_jax.constants import ARCHS, ORIGINAL_ARCHS
from affinity_jax.convert import ConversionError
from affinity_jax.errors import ConfigError
from affinity_jax.models import relation_net
from tests import reference_resnet50 as ref
from tests.test_models import _close

W = 3 / 32  # conv1 6 channels (the width a converter reads); fc_edge* 3 channels in 3
# groups, fc_dp1 6 in 6, fc_dp3..7 24 in 12: group sizes 1 and 2, not IRN's counts
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _irn_layout(sd: dict[str, np.ndarray], buffers: bool = True) -> dict[str, np.ndarray]:
  """The state dict train_irn.py saves, from the module structure of IRN's relation Net:
  resnet50.*, the stages again (stage1 = conv1, bn1, relu, maxpool; stageN = layer{N-1};
  backbone = the five stages), the heads, edge_layers / dp_layers (the heads again), fc_dp7.4 =
  mean_shift, and with `buffers` its loss module's path_indices* and disp_target."""
  out = {}
  for name, value in sd.items():
    head, rest = name.split(".", 1)
    if head in ("conv1", "bn1") or head.startswith("layer"):
      out["resnet50." + name] = value
      if head in ("conv1", "bn1"):
        stage = f"stage1.{0 if head == 'conv1' else 1}.{rest}"
        out[stage] = out[f"backbone.0.{stage[len('stage1.'):]}"] = value
      else:
        n = int(head[-1]) + 1
        out[f"stage{n}.0.{rest}"] = out[f"backbone.{n - 1}.0.{rest}"] = value
    elif head == "mean_shift":
      out[name] = out["fc_dp7.4.running_mean"] = out["dp_layers.6.4.running_mean"] = value
    else:
      out[name] = value
      kind, k = ("edge_layers", head[7:]) if head.startswith("fc_edge") else ("dp_layers",
                                                                              head[5:])
      out[f"{kind}.{int(k) - 1}.{rest}"] = value
  if buffers:
    out["path_indices0"] = np.zeros((9, 3, 4), np.int64)
    out["path_indices1"] = np.zeros((5, 3, 4), np.int64)
    out["disp_target"] = np.zeros((1, 2, 14, 1), np.float32)
  return out


@pytest.fixture(scope="module")
def relation():
  """(canonical state dict, converted variables, model, jitted forward)."""
  sd = ref.random_relation_state_dict(W, seed=1)
  variables, dropped = convert.torchvision_to_variables(_irn_layout(sd), "relation")
  assert dropped == ["disp_target", "path_indices0", "path_indices1"]
  model = models.build("relation", width=W, backbone="resnet50")
  forward = jax.jit(model.apply, static_argnames="train")
  return sd, variables, model, forward


# --- the network against NumPy -------------------------------------------------------------------

@pytest.mark.parametrize("size", [(64, 64), (50, 70)])
def test_outputs_match_numpy(relation, size):
  sd, variables, _, forward = relation
  x = _images(0, (2, *size, 3))
  edge, dp = forward(variables, x)
  h, w = (-(-s // 4) for s in size)
  assert edge.shape == (2, h, w) and dp.shape == (2, h, w, 2)
  assert edge.dtype == dp.dtype == jnp.float32
  want_edge, want_dp = ref.relation(sd, x.transpose(0, 3, 1, 2))
  _close(edge, want_edge[:, 0], rtol=1e-5)
  _close(dp, want_dp.transpose(0, 2, 3, 1), rtol=1e-5)


def test_mean_shift_only_at_inference(relation):
  sd, variables, _, forward = relation
  x = _images(1, (1, 40, 56, 3))
  shift = sd["mean_shift.running_mean"]
  assert np.abs(shift).min() > 0.01
  np.testing.assert_array_equal(variables["batch_stats"]["mean_shift"]["mean"], shift)
  edge, dp = forward(variables, x)
  train_edge, train_dp = forward(variables, x, train=True)
  np.testing.assert_array_equal(edge, train_edge)
  np.testing.assert_allclose(np.asarray(dp), np.asarray(train_dp) - shift, rtol=0, atol=1e-6)
  _close(train_dp, ref.relation(sd, x.transpose(0, 3, 1, 2), train=True)[1].transpose(0, 2, 3, 1),
         rtol=1e-5)


def test_shapes_sizes_and_dtype():
  model = models.build("relation", width=1 / 16, backbone="resnet50", dtype=jnp.bfloat16)
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert model.stride == 4
  for size in ((64, 64), (50, 70), (33, 47), (96, 128)):
    edge, dp = jax.eval_shape(model.apply, v, jnp.zeros((2, *size, 3)))
    h, w = (-(-s // 4) for s in size)
    assert edge.shape == (2, h, w) and dp.shape == (2, h, w, 2), size
    assert edge.dtype == dp.dtype == jnp.float32
  # Parameters stay float32 in a bfloat16 network.
  assert {a.dtype for a in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_forward_is_close(relation):
  _, variables, _, forward = relation
  x = _images(2, (1, 48, 48, 3))
  edge, dp = forward(variables, x)
  low = models.build("relation", width=W, backbone="resnet50", dtype=jnp.bfloat16)
  low_edge, low_dp = jax.jit(low.apply)(variables, x)
  assert low_edge.dtype == low_dp.dtype == jnp.float32
  for a, b in ((low_edge, edge), (low_dp, dp)):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.1 * np.abs(np.asarray(b)).max()


def test_backbone_gets_no_gradient(relation):
  _, variables, model, _ = relation
  x = _images(3, (1, 40, 40, 3))

  def loss(params):
    edge, dp = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                           train=True)
    return jnp.sum(edge ** 2) + jnp.sum(dp ** 2)

  grads = traverse_util.flatten_dict(jax.grad(loss)(variables["params"]))
  heads = relation_net.BOUNDARY_MODULES | relation_net.DISPLACEMENT_MODULES
  for path, g in grads.items():
    if path[0] in heads:
      assert np.abs(g).max() > 0, path
    else:
      assert path[0] in models.RESNET50_MODULES, path
      assert np.abs(g).max() == 0, path  # exactly zero: IRN detaches every level


# --- widths, groups, labels, registry ------------------------------------------------------------

def test_group_counts_and_irns_widths():
  assert relation_net.group_count(32, 4) == 4
  assert relation_net.group_count(2, 4) == 2
  assert relation_net.group_count(3, 4) == 3
  assert relation_net.group_count(26, 16) == 13
  assert relation_net.group_count(6, 4) == 3
  assert relation_net.group_count(1, 16) == 1
  with pytest.raises(ValueError, match="positive"):
    relation_net.group_count(0, 4)
  channels = relation_net.head_channels(1.0)
  assert channels == {
      "fc_edge1": (64, 32, 4), "fc_edge2": (256, 32, 4), "fc_edge3": (512, 32, 4),
      "fc_edge4": (1024, 32, 4), "fc_edge5": (2048, 32, 4),
      "fc_dp1": (64, 64, 8), "fc_dp2": (256, 128, 16), "fc_dp3": (512, 256, 16),
      "fc_dp4": (1024, 256, 16), "fc_dp5": (2048, 256, 16), "fc_dp6": (768, 256, 16),
      "fc_dp7": (448, 256, 16), "fc_edge6": (160, 1, 0)}
  # Every GroupNorm valid at narrow widths, where IRN's counts do not divide.
  irn_groups = {name: groups for name, _, groups in ref.RELATION_EDGE + ref.RELATION_DP}
  for width in (1 / 64, 1 / 16, 0.1, 0.3):
    for name, (_, cout, groups) in relation_net.head_channels(width).items():
      if groups:
        assert cout % groups == 0, (width, name)
        assert groups == ref.groups_at(cout, irn_groups[name]), (width, name)
  tiny = models.build("relation", width=1 / 64, backbone="resnet50")
  v = models.init_variables(tiny, jax.random.key(0), (1, 32, 32, 3))
  edge, dp = jax.jit(tiny.apply)(v, _images(4, (1, 36, 44, 3)))
  assert edge.shape == (1, 9, 11) and np.isfinite(np.asarray(dp)).all()


def test_head_width_widens_the_heads_alone():
  """aff.head_width: IRN's heads (32 channels per boundary head) on a 1/16 backbone, which
  is what configs/synthetic_irn.py runs; 0 keeps the heads at model.width."""
  cfg = config_lib.load_config("synthetic_irn:tiny")
  assert cfg.aff.head_width == 1.0
  cfg.aff.head_width = 0.0
  narrow = jax.eval_shape(models.from_config(cfg, "relation").init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  cfg.aff.head_width = 1.0
  wide = jax.eval_shape(models.from_config(cfg, "relation").init, jax.random.key(0),
                        jnp.zeros((1, 32, 32, 3)))["params"]
  assert wide["fc_edge5"]["conv"]["kernel"].shape == (1, 1, 128, 32)  # 2048 / 16 in
  assert narrow["fc_edge5"]["conv"]["kernel"].shape == (1, 1, 128, 2)
  assert wide["fc_edge6"]["kernel"].shape == (1, 1, 160, 1)
  assert wide["fc_dp7"]["out"]["kernel"].shape == (1, 1, 256, 2)
  backbone = lambda p: {k: v for k, v in p.items() if not k.startswith("fc_")}  # noqa: E731
  assert jax.tree.map(np.shape, backbone(wide)) == jax.tree.map(np.shape, backbone(narrow))
  assert relation_net.head_channels(1 / 16, 1.0)["fc_edge1"] == (4, 32, 4)
  cfg.aff.head_width = -1.0
  with pytest.raises(ConfigError, match="aff.head_width"):
    models.from_config(cfg, "relation")
  with pytest.raises(ConfigError, match="aff.head_width"):
    config_lib.validate(cfg)


def test_full_width_heads_are_irns():
  model = models.build("relation", backbone="resnet50")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  flat = traverse_util.flatten_dict(shapes["params"])
  heads = {p: a.shape for p, a in flat.items() if p[0].startswith("fc_")}
  # IRN's heads, counted from the hand-written manifest: 1,394,529 parameters (the mean shift
  # is a buffer, in batch_stats).
  assert sum(int(np.prod(s)) for s in heads.values()) == sum(
      int(np.prod(s)) for n, s in ref.relation_manifest(1.0) if n != "mean_shift.running_mean")
  assert heads[("fc_dp7", "out", "kernel")] == (1, 1, 256, 2)
  assert heads[("fc_edge6", "kernel")] == (1, 1, 160, 1)
  assert shapes["batch_stats"]["mean_shift"]["mean"].shape == (2,)
  backbone = jax.eval_shape(models.build("backbone", backbone="resnet50").init,
                            jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  got = {k: v for k, v in shapes["params"].items() if not k.startswith("fc_")}
  assert jax.tree.map(np.shape, got) == jax.tree.map(np.shape, backbone["params"])


def test_param_labels_are_irns_groups():
  v = jax.eval_shape(models.build("relation", width=1 / 16, backbone="resnet50").init,
                     jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  labels = traverse_util.flatten_dict(models.param_labels(v["params"]))
  by_module = {}
  for path, label in labels.items():
    by_module.setdefault(path[0], set()).add(label)
  for name, group in by_module.items():
    if name.startswith("fc_edge"):
      assert group == {"pretrained_weight"}, name
    elif name.startswith("fc_dp"):
      assert group == {"new_weight"}, name
    else:
      assert name in models.RESNET50_MODULES and group == {"frozen"}, name
  assert labels[("layer4_2", "bn3", "bias")] == "frozen"  # "pretrained_weight" in the CAM net
  assert labels[("layer3_0", "conv1", "kernel")] == "frozen"
  assert labels[("fc_edge6", "bias")] == "pretrained_weight"
  assert labels[("fc_edge3", "norm", "scale")] == "pretrained_weight"
  assert labels[("fc_dp7", "out", "kernel")] == "new_weight"
  assert labels[("fc_dp2", "norm", "bias")] == "new_weight"
  assert len(by_module) == 2 + 16 + 6 + 7
  cam = jax.eval_shape(models.build("cam", width=1 / 16, backbone="resnet50").init,
                       jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert models.param_labels(cam["params"])["layer4_2"]["bn3"]["bias"] == "pretrained_weight"


def test_build_registry_and_config():
  model = models.build("relation", backbone="resnet50", width=0.25)
  assert isinstance(model, models.RelationNet) and model.width == 0.25
  assert "relation" in ARCHS and "relation" not in ORIGINAL_ARCHS
  for backbone in ("resnet38", "vgg16"):
    with pytest.raises(ValueError, match=f"no 'relation' network on {backbone} yet"):
      models.build("relation", backbone=backbone)
  cfg = ml_collections.ConfigDict({"model": {"num_classes": 20, "width": W,
                                             "dtype": "bfloat16", "backbone": "resnet50"}})
  built = models.from_config(cfg, "relation")
  assert isinstance(built, models.RelationNet) and built.dtype == jnp.bfloat16
  # Other strides: the upsampling factors follow (stage3 and stage4 at stride 8 here).
  other = relation_net.RelationNet(width=1 / 16, strides=(2, 2, 1, 1))
  v = jax.eval_shape(other.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  edge, dp = jax.eval_shape(other.apply, v, jnp.zeros((1, 50, 70, 3)))
  assert other.stride == 4 and edge.shape == (1, 13, 18) and dp.shape == (1, 13, 18, 2)


# --- the converter -------------------------------------------------------------------------------

def test_conversion_places_every_tensor(relation):
  sd, variables, model, _ = relation
  fresh = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, fresh)
  p = variables["params"]
  np.testing.assert_array_equal(p["fc_dp7"]["out"]["kernel"],
                                sd["fc_dp7.3.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["fc_edge4"]["norm"]["scale"], sd["fc_edge4.1.weight"])
  np.testing.assert_array_equal(p["fc_edge6"]["bias"], sd["fc_edge6.bias"])
  np.testing.assert_array_equal(p["layer3_2"]["conv2"]["kernel"],
                                sd["layer3.2.conv2.weight"].transpose(2, 3, 1, 0))
  assert len(jax.tree.leaves(variables)) == len(sd)
  # Canonical names alone (no aliases, no buffers), and DataParallel's prefix, convert the same.
  alone, dropped = convert.torchvision_to_variables(
      {"module." + k: v for k, v in _irn_layout(sd, buffers=False).items()}, "relation")
  assert dropped == []
  jax.tree.map(np.testing.assert_array_equal, alone, variables)
  shapes = convert.torchvision_state_dict_shapes("relation", W)
  assert list(shapes.items())[-len(ref.relation_manifest(W)):] == ref.relation_manifest(W)


def test_relation_file_as_backbone_fills_a_relation_net():
  sd = ref.random_relation_state_dict(W, seed=2)
  backbone, dropped = convert.torchvision_to_variables(_irn_layout(sd), "backbone")
  assert "disp_target" in dropped and "fc_dp7.3.weight" in dropped
  assert "mean_shift.running_mean" in dropped and "fc_edge6.bias" in dropped
  assert not any(k.startswith("fc_") for k in backbone["params"])
  model = models.build("relation", width=W, backbone="resnet50")
  fresh = models.init_variables(model, jax.random.key(1), (1, 32, 32, 3))
  merged = checkpoint.merge_backbone(fresh, backbone, "irn")
  assert set(merged["params"]) == set(fresh["params"])
  np.testing.assert_array_equal(merged["params"]["layer4_1"]["conv1"]["kernel"],
                                backbone["params"]["layer4_1"]["conv1"]["kernel"])
  # An ImageNet backbone (torchvision's layout) fills it too.
  imagenet, _ = convert.torchvision_to_variables(ref.random_state_dict(W, seed=3, fc=True))
  assert set(checkpoint.merge_backbone(fresh, imagenet, "r50")["params"]) == set(fresh["params"])


def test_bad_relation_state_dicts_are_named():
  sd = ref.random_relation_state_dict(W, seed=4)
  with pytest.raises(ConversionError, match=r"r50\.pth: no fc_edge1\.0\.weight, IRN's relation "
                                            r"network: torchvision's ImageNet file has none"):
    convert.torchvision_to_variables(ref.random_state_dict(W, seed=4, fc=True), "relation",
                                     source="r50.pth")
  cam = {"resnet50." + k: v for k, v in ref.random_state_dict(W, seed=4).items()}
  cam["classifier.weight"] = np.zeros((20, 192, 1, 1), np.float32)
  with pytest.raises(ConversionError, match=r"this is IRN's CAM network \(res50_cam\.pth\), "
                                            r"not its relation network"):
    convert.torchvision_to_variables(cam, "relation", source="res50_cam.pth")
  irn = _irn_layout(sd)
  with pytest.raises(ConversionError, match="no classifier.weight, IRN's CAM classifier"):
    convert.torchvision_to_variables(irn, "cam")
  changed = dict(irn, **{"edge_layers.2.1.bias": irn["edge_layers.2.1.bias"] + 1})
  with pytest.raises(ConversionError, match=r"edge_layers\.2\.1\.bias should be the same tensor "
                                            r"as fc_edge3\.1\.bias"):
    convert.torchvision_to_variables(changed, "relation", source="res50_irn.pth")
  changed = dict(irn, **{"stage5.0.1.bn2.running_var": irn["stage5.0.1.bn2.running_var"] * 2})
  with pytest.raises(ConversionError, match=r"stage5\.0\.1\.bn2\.running_var should be the same "
                                            r"tensor as resnet50\.layer4\.1\.bn2\.running_var"):
    convert.torchvision_to_variables(changed, "relation")
  changed = dict(irn, **{"fc_dp7.4.running_mean": np.ones(2, np.float32)})
  with pytest.raises(ConversionError, match=r"fc_dp7\.4\.running_mean should be the same tensor "
                                            r"as mean_shift\.running_mean"):
    convert.torchvision_to_variables(changed, "relation")
  missing = {k: v for k, v in irn.items() if k not in ("fc_dp4.1.bias", "dp_layers.3.1.bias")}
  with pytest.raises(ConversionError, match=r"x\.pth: missing fc_dp4\.1\.bias: not IRN's "
                                            r"relation network at width 0\.09375"):
    convert.torchvision_to_variables(missing, "relation", source="x.pth")
  kernel = np.zeros((24, 99, 1, 1), np.float32)
  wide = dict(irn, **{"fc_dp6.0.weight": kernel, "dp_layers.5.0.weight": kernel})
  with pytest.raises(ConversionError, match=r"fc_dp6\.0\.weight has shape \(24, 99, 1, 1\), "
                                            r"expected \(24, 72, 1, 1\)"):
    convert.torchvision_to_variables(wide, "relation")
  extra = dict(irn, fc_dp8_weight=np.zeros(3, np.float32))
  with pytest.raises(ConversionError, match="unexpected key fc_dp8_weight"):
    convert.torchvision_to_variables(extra, "relation")


def test_convert_relation_npz_without_torch(tmp_path, monkeypatch, relation):
  monkeypatch.setitem(sys.modules, "torch", None)
  sd, variables, _, _ = relation
  path = tmp_path / "res50_irn.npz"
  np.savez(path, **_irn_layout(sd))
  assert cli.main(["convert", "torchvision", str(path), str(tmp_path / "irn"), "--arch",
                   "relation"]) == 0
  loaded, meta = checkpoint.load_variables(str(tmp_path / "irn"))
  assert meta["arch"] == "relation" and meta["backbone"] == "resnet50"
  assert meta["num_classes"] is None and np.isclose(meta["width"], W)
  assert meta["source"] == "irn res50_irn.npz"
  assert meta["dropped"] == ["disp_target", "path_indices0", "path_indices1"]
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  checkpoint.check_compatible(meta, arch="relation", width=W, backbone="resnet50")


def test_heads_wider_than_the_backbone_convert_and_are_checked_on_load(tmp_path):
  """A relation network with heads at 1/4 on a 3/32 backbone (aff.head_width) converts with
  its heads' width recorded; a config with other heads is refused by name before any shape
  fails, and checkpoints that record no head width have heads at their width."""
  sd = ref.random_relation_state_dict(W, seed=6, head_width=0.25)
  assert sd["fc_edge1.0.weight"].shape == (8, 6, 1, 1)
  path = tmp_path / "wide.npz"
  np.savez(path, **_irn_layout(sd))
  out = str(tmp_path / "wide")
  assert cli.main(["convert", "torchvision", str(path), out, "--arch", "relation"]) == 0
  loaded, meta = checkpoint.load_variables(out)
  assert np.isclose(meta["width"], W) and meta["head_width"] == 0.25
  model = models.build("relation", width=W, backbone="resnet50", head_width=0.25)
  fresh = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(np.shape, loaded) == jax.tree.map(np.shape, fresh)
  np.testing.assert_array_equal(loaded["params"]["fc_dp7"]["conv"]["kernel"],
                                sd["fc_dp7.0.weight"].transpose(2, 3, 1, 0))
  checkpoint.check_compatible(meta, arch="relation", width=W, head_width=0.25)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"wide: has its relation heads at width 0\.25, but the config's give "
                           r"0\.09375 \(set aff\.head_width to 0\.25\)"):
    checkpoint.check_compatible(meta, arch="relation", width=W, head_width=W, path="wide")
  old = {k: v for k, v in meta.items() if k != "head_width"}
  checkpoint.check_compatible(old, arch="relation", width=W, head_width=W)
  with pytest.raises(checkpoint.CheckpointError, match="aff.head_width"):
    checkpoint.check_compatible(old, arch="relation", width=W, head_width=0.25)
  # A head tensor of another width is named with both widths.
  kernel = np.zeros((5, 24, 1, 1), np.float32)
  irn = dict(_irn_layout(sd), **{"fc_dp2.0.weight": kernel, "dp_layers.1.0.weight": kernel})
  with pytest.raises(ConversionError, match=r"fc_dp2\.0\.weight has shape \(5, 24, 1, 1\), "
                                            r"expected \(32, 24, 1, 1\) at width 0\.09375, "
                                            r"heads at 0\.25"):
    convert.torchvision_to_variables(irn, "relation")


def test_a_workdirs_relation_network_records_its_heads(tmp_path):
  """save_network writes the config's head width; load_network with other heads names the key."""
  cfg = config_lib.load_config("synthetic_irn:tiny")
  cfg.workdir = str(tmp_path)
  model = models.from_config(cfg, "relation")
  variables = models.init_variables(model, jax.random.key(0), (1, 32, 32, 3))
  checkpoint.save_network(cfg, artifacts.RELATION_NET, variables)
  _, meta = checkpoint.load_variables(artifacts.Workdir(str(tmp_path)).network(
      artifacts.RELATION_NET))
  assert meta["head_width"] == 1.0
  checkpoint.load_network(cfg, artifacts.RELATION_NET)
  cfg.aff.head_width = 0.0
  with pytest.raises(checkpoint.CheckpointError, match=r"set aff\.head_width to 1\b"):
    checkpoint.load_network(cfg, artifacts.RELATION_NET)


def test_convert_relation_pth(tmp_path, relation):
  torch = pytest.importorskip("torch")
  sd, variables, _, _ = relation
  path = tmp_path / "res50_irn.pth"
  torch.save({k: torch.from_numpy(v) for k, v in _irn_layout(sd).items()}, path)
  assert cli.main(["convert", "torchvision", str(path), str(tmp_path / "irn"), "--arch",
                   "relation"]) == 0
  loaded, meta = checkpoint.load_variables(str(tmp_path / "irn"))
  assert meta["arch"] == "relation"
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)


# --- PyTorch and IRN's own modules ---------------------------------------------------------------

def test_upsampling_is_pytorchs_bilinear():
  torch = pytest.importorskip("torch")
  x = _images(5, (2, 5, 7, 3))
  for factor in (2, 4):
    want = torch.nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False)(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(relation_net.upsample_bilinear(jnp.asarray(x), factor))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ref.upsample_bilinear(x.transpose(0, 3, 1, 2), factor),
                               want.transpose(0, 3, 1, 2), rtol=0, atol=1e-6)


def test_parity_with_irns_relation_network():
  irn_root = os.environ.get("IRN_ROOT")
  if not irn_root:
    pytest.skip("set IRN_ROOT to a checkout of github.com/jiwoon-ahn/irn to compare with it")
  torch = pytest.importorskip("torch", reason="the comparison with IRN needs torch")
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import compare_irn_networks  # pylint: disable=import-outside-toplevel,import-error
  torch.set_num_threads(2)
  backbone = ref.random_state_dict(1.0, seed=0, fc=True)
  # IRN's Net's own names and order, our manifest of its heads, our converter's layout.
  _, net = compare_irn_networks.irn_relation_net(torch, irn_root, backbone, seed=0)
  heads = [(k, tuple(v.shape)) for k, v in net.state_dict().items()
           if k.startswith(("fc_edge", "fc_dp", "mean_shift")) and k != "fc_dp7.4.running_mean"]
  assert heads == ref.relation_manifest(1.0)
  assert list(convert.torchvision_state_dict_shapes("relation").items())[-len(heads):] == (
      ref.relation_manifest(1.0))
  results = compare_irn_networks.compare_relation(
      torch, irn_root, backbone, sizes=[(96, 128), (75, 102)], flip_size=(75, 102),
      crop_size=128, seed=0)
  assert len(results) == 12
  for key, value in results.items():
    if key.endswith("_max_rel"):
      assert value <= 1e-5, (key, results)
