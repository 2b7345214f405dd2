"""Converters: the original's state dicts (names, shapes, layouts, errors), MXNet .params files."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from affinity_jax import checkpoint, convert, models
from affinity_jax.convert import ConversionError
from tests import _psa_fixtures as fx

W = fx.TINY_WIDTH
ARCH_OF = {"resnet38_cls": "cam", "resnet38_aff": "affinity"}


@pytest.mark.parametrize("key", ["resnet38_cls", "resnet38_aff"])
def test_full_width_layout_is_the_manifest_and_the_model(key):
  manifest = {n: s for n, s, _ in fx.manifest(key) if not n.endswith("num_batches_tracked")}
  expected = convert.psa_state_dict_shapes(ARCH_OF[key])
  assert list(expected.items()) == list(manifest.items())
  # The width-1.0 model's variables (shapes only) are exactly the renamed, transposed manifest.
  model = models.build(ARCH_OF[key])
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  got = {"/".join(p): a.shape for p, a in traverse_util.flatten_dict(shapes).items()}
  want = {}
  bn = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
  for name, shape in manifest.items():
    *modules, leaf = name.split(".")
    if modules[-1].startswith("bn"):
      want["/".join(["batch_stats", *modules, bn[leaf]])] = shape
    else:
      o, i, kh, kw = shape
      want["/".join(["params", *modules, "kernel"])] = (kh, kw, i, o)
  assert got == want


def test_backbone_layout_is_cam_without_fc8():
  cam = convert.psa_state_dict_shapes("cam")
  del cam["fc8.weight"]
  assert convert.psa_state_dict_shapes("backbone") == cam


def test_conversion_places_and_transposes_every_tensor():
  sd = fx.random_state_dict("resnet38_aff", num_batches_tracked=False)
  v = convert.psa_state_dict_to_variables(sd, "affinity", width=W)
  np.testing.assert_array_equal(v["params"]["b4_3"]["conv_branch2a"]["kernel"],
                                sd["b4_3.conv_branch2a.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["f9"]["kernel"][0, 0],
                                sd["f9.weight"][:, :, 0, 0].T)
  bn = v["batch_stats"]["b6"]["bn_branch2b2"]
  for ours, theirs in [("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                       ("var", "running_var")]:
    np.testing.assert_array_equal(bn[ours], sd[f"b6.bn_branch2b2.{theirs}"])
  n_leaves = len(jax.tree.leaves(v))
  assert n_leaves == len(sd)


def test_num_batches_tracked_and_module_prefix_are_accepted():
  with_nbt = fx.random_state_dict("resnet38_cls", num_batches_tracked=True)
  without = fx.random_state_dict("resnet38_cls", num_batches_tracked=False)
  assert len(with_nbt) > len(without)
  a = convert.psa_state_dict_to_variables(with_nbt, "cam", width=W)
  b = convert.psa_state_dict_to_variables(without, "cam", width=W)
  c = convert.psa_state_dict_to_variables({"module." + k: v for k, v in with_nbt.items()},
                                          "cam", width=W)
  for x, y in [(a, b), (a, c)]:
    jax.tree.map(np.testing.assert_array_equal, x, y)


def test_missing_unexpected_and_wrong_shape_are_named():
  sd = fx.random_state_dict("resnet38_cls")
  broken = dict(sd)
  del broken["b4_2.bn_branch2b1.running_var"]
  broken["b9.conv_branch2a.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(ConversionError) as e:
    convert.psa_state_dict_to_variables(broken, "cam", width=W, source="x.pth")
  msg = str(e.value)
  assert "x.pth" in msg and "missing (1): b4_2.bn_branch2b1.running_var" in msg
  assert "unexpected (1): b9.conv_branch2a.weight" in msg

  wrong = dict(sd)
  wrong["b3.conv_branch1.weight"] = np.zeros((8, 4, 3, 3), np.float32)
  with pytest.raises(ConversionError, match=r"\(b3.conv_branch1.weight, \(8, 4, 1, 1\), "
                                            r"\(8, 4, 3, 3\)\)"):
    convert.psa_state_dict_to_variables(wrong, "cam", width=W)
  # A cam file converted as an affinity network: fc8 left over, the f8/f9 heads missing.
  with pytest.raises(ConversionError, match="is --arch right"):
    convert.psa_state_dict_to_variables(sd, "affinity", width=W)
  # The original's files are width 1.0: a narrow state dict fails on shapes, not silently.
  with pytest.raises(ConversionError, match="wrong shapes"):
    convert.psa_state_dict_to_variables(sd, "cam")
  with pytest.raises(ConversionError, match="unknown architecture"):
    convert.psa_state_dict_to_variables(sd, "deeplab")


def test_convert_psa_pytorch_writes_a_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  sd = fx.random_state_dict("resnet38_aff")
  pth = tmp_path / "res38_aff.pth"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, pth)
  meta = convert.convert_psa_pytorch(str(pth), str(tmp_path / "out"), "affinity")
  assert meta["width"] == W and meta["arch"] == "affinity"
  variables, saved = checkpoint.load_variables(str(tmp_path / "out"))
  assert saved["source"] == "psa-pytorch res38_aff.pth"
  want = convert.psa_state_dict_to_variables(sd, "affinity", width=W)
  jax.tree.map(np.testing.assert_array_equal, variables, want)
  checkpoint.check_compatible(saved, arch="affinity", width=W)

  with pytest.raises(ConversionError, match="wrong shapes|missing"):
    convert.convert_psa_pytorch(str(pth), str(tmp_path / "out2"), "cam")
  garbage = tmp_path / "notes.pth"
  garbage.write_text("not a checkpoint")
  with pytest.raises(ConversionError, match="notes.pth: not a PyTorch checkpoint"):
    convert.convert_psa_pytorch(str(garbage), str(tmp_path / "out3"), "cam")
  with pytest.raises(ConversionError, match="no such file"):
    convert.convert_psa_pytorch(str(tmp_path / "absent.pth"), str(tmp_path / "out4"), "cam")
  assert not os.path.exists(tmp_path / "out2") and not os.path.exists(tmp_path / "out3")


def test_missing_torch_gives_install_hint(monkeypatch, tmp_path):
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # makes `import torch` fail
  pth = tmp_path / "x.pth"
  pth.write_bytes(b"PK\x03\x04 not read without torch")
  with pytest.raises(ConversionError, match=r"x\.pth: .*pip install 'affinity_jax\[torch\]'"):
    convert.convert_psa_pytorch(str(pth), str(tmp_path / "out"), "cam")


# --- MXNet ---------------------------------------------------------------------------------------

def _mxnet_arrays(seed: int = 0) -> dict[str, np.ndarray]:
  sd = fx.random_state_dict("backbone", seed=seed, num_batches_tracked=False)
  arrays = {fx.psa_to_mxnet_name(k): v for k, v in sd.items()}
  rng = np.random.default_rng(seed)
  arrays["arg:linear1000_weight"] = rng.normal(size=(1000, 128)).astype(np.float32)
  arrays["arg:linear1000_bias"] = np.zeros((1000,), np.float32)
  return arrays


@pytest.mark.parametrize("version", [2, 1, 0])
def test_mxnet_reader_round_trip(tmp_path, version):
  arrays = {"arg:a": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
            "aux:b": np.array([1.5, -2.0], np.float64),
            "arg:c": np.arange(6, dtype=np.int64).reshape(3, 2),
            "arg:d": np.ones((1, 2, 1, 1), np.float16)}
  path = tmp_path / "x.params"
  fx.write_mxnet_params(str(path), arrays, version=version)
  got = convert.read_mxnet_params(str(path))
  assert list(got) == list(arrays)
  for k in arrays:
    assert got[k].dtype == arrays[k].dtype
    np.testing.assert_array_equal(got[k], arrays[k])


def test_mxnet_names_follow_ademxapp_a1():
  assert convert.mxnet_name_to_psa("arg:res2a_branch1_weight") == "b2.conv_branch1.weight"
  assert convert.mxnet_name_to_psa("arg:res4b5_branch2b1_weight") == "b4_5.conv_branch2b1.weight"
  assert convert.mxnet_name_to_psa("arg:bn5b2_branch2a_gamma") == "b5_2.bn_branch2a.weight"
  assert convert.mxnet_name_to_psa("aux:bn7_moving_var") == "bn7.running_var"
  assert convert.mxnet_name_to_psa("bn6a_branch2b2_mean") == "b6.bn_branch2b2.running_mean"
  assert convert.mxnet_name_to_psa("arg:linear1000_weight") is None
  with pytest.raises(ConversionError, match="res9z"):
    convert.mxnet_name_to_psa("arg:res9z_branch2a_weight")


def test_convert_mxnet_end_to_end(tmp_path):
  arrays = _mxnet_arrays()
  src = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
  fx.write_mxnet_params(str(src), arrays)
  meta = convert.convert_mxnet(str(src), str(tmp_path / "backbone"))
  assert meta["dropped"] == ["arg:linear1000_bias", "arg:linear1000_weight"]
  variables, saved = checkpoint.load_variables(str(tmp_path / "backbone"))
  checkpoint.check_compatible(saved, arch="backbone", width=W)
  sd = fx.random_state_dict("backbone", seed=0)
  want = convert.psa_state_dict_to_variables(sd, "backbone", width=W)
  jax.tree.map(np.testing.assert_array_equal, variables, want)
  # The backbone checkpoint fits every network's backbone part.
  shapes = jax.eval_shape(models.SegNet(width=W).init, jax.random.key(0),
                          jnp.zeros((1, 16, 16, 3)))
  for coll in ("params", "batch_stats"):
    for name, sub in variables[coll].items():
      assert jax.tree.map(np.shape, sub) == jax.tree.map(lambda a: a.shape, shapes[coll][name])

  extra = dict(arrays, **{"arg:res2a_branch3_weight": np.zeros((1,), np.float32)})
  fx.write_mxnet_params(str(tmp_path / "extra.params"), extra)
  with pytest.raises(ConversionError, match="res2a_branch3_weight"):
    convert.convert_mxnet(str(tmp_path / "extra.params"), str(tmp_path / "o1"))
  del arrays["aux:bn7_moving_mean"]
  fx.write_mxnet_params(str(tmp_path / "short.params"), arrays)
  with pytest.raises(ConversionError, match="missing \\(1\\): bn7.running_mean"):
    convert.convert_mxnet(str(tmp_path / "short.params"), str(tmp_path / "o2"))


def test_mxnet_truncated_and_foreign_files(tmp_path):
  good = tmp_path / "good.params"
  fx.write_mxnet_params(str(good), {"arg:conv1a_weight": np.ones((2, 3, 3, 3), np.float32)})
  data = good.read_bytes()
  for cut in (4, 30, 60, len(data) - 3):
    bad = tmp_path / f"cut{cut}.params"
    bad.write_bytes(data[:cut])
    with pytest.raises(ConversionError, match=f"cut{cut}.params: truncated MXNet file"):
      convert.read_mxnet_params(str(bad))
  foreign = tmp_path / "model.pth"
  foreign.write_bytes(b"PK\x03\x04" + bytes(100))
  with pytest.raises(ConversionError, match="model.pth: not an MXNet .params file"):
    convert.convert_mxnet(str(foreign), str(tmp_path / "out"))
  wrong_array_magic = bytearray(data)
  wrong_array_magic[24:28] = (0xDEADBEEF).to_bytes(4, "little")
  bad = tmp_path / "magic.params"
  bad.write_bytes(bytes(wrong_array_magic))
  with pytest.raises(ConversionError, match="neither an NDArray magic"):
    convert.read_mxnet_params(str(bad))
  with pytest.raises(ConversionError, match="no such file"):
    convert.read_mxnet_params(str(tmp_path / "absent.params"))
  assert not os.path.exists(tmp_path / "out")
