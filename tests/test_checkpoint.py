"""Orbax variable checkpoints: bit-identical round trip, atomic replace, compatibility checks."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from affinity_jax import checkpoint
from affinity_jax.checkpoint import CheckpointError


def _variables(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "params": {"conv1a": {"kernel": rng.normal(size=(3, 3, 3, 2)).astype(np.float32)},
                 "seg_conv2": {"kernel": rng.normal(size=(3, 3, 4, 3)).astype(np.float32),
                               "bias": np.array([np.nan, -0.0, 1e-38], np.float32)}},
      "batch_stats": {"bn7": {k: rng.normal(size=(4,)).astype(np.float32)
                              for k in ("scale", "bias", "mean", "var")}},
  }


META = dict(arch="seg", width=0.125, num_classes=2, source="test")


def test_round_trip_is_bit_identical(tmp_path):
  v = _variables()
  checkpoint.save_variables(str(tmp_path / "ck"), v, metadata=dict(META, note="extra"))
  got, meta = checkpoint.load_variables(str(tmp_path / "ck"))
  assert meta == dict(META, note="extra")
  assert jax.tree.structure(got) == jax.tree.structure(v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v)):
    assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()  # NaN and -0.0 included
  assert os.listdir(tmp_path) == ["ck"]  # no temporary folder left behind


def test_replace_is_atomic_and_refuses_foreign_folders(tmp_path):
  path = str(tmp_path / "ck")
  checkpoint.save_variables(path, _variables(0), metadata=META)
  checkpoint.save_variables(path, _variables(1), metadata=dict(META, source="second"))
  got, meta = checkpoint.load_variables(path)
  assert meta["source"] == "second"
  np.testing.assert_array_equal(got["params"]["conv1a"]["kernel"],
                                _variables(1)["params"]["conv1a"]["kernel"])
  assert os.listdir(tmp_path) == ["ck"]
  # A failing save (metadata not JSON) leaves the previous checkpoint untouched.
  with pytest.raises(TypeError):
    checkpoint.save_variables(path, _variables(2), metadata=dict(META, bad=object()))
  assert checkpoint.load_variables(path)[1]["source"] == "second"
  (tmp_path / "photos").mkdir()
  with pytest.raises(CheckpointError, match="photos exists and is not an affinity_jax"):
    checkpoint.save_variables(str(tmp_path / "photos"), _variables(), metadata=META)
  with pytest.raises(ValueError, match="lacks width"):
    checkpoint.save_variables(path, _variables(), metadata=dict(arch="cam", num_classes=2,
                                                                  source="x"))


def test_load_errors_name_the_path(tmp_path):
  with pytest.raises(CheckpointError, match="nowhere: no such checkpoint folder"):
    checkpoint.load_variables(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="empty: not an affinity_jax checkpoint"):
    checkpoint.load_variables(str(tmp_path / "empty"))
  (tmp_path / "half").mkdir()
  (tmp_path / "half" / "metadata.json").write_text(json.dumps(META))
  with pytest.raises(CheckpointError, match="half: checkpoint has no variables/"):
    checkpoint.load_variables(str(tmp_path / "half"))


def test_check_compatible():
  checkpoint.check_compatible(META, arch="seg", width=0.125, num_classes=2)
  with pytest.raises(CheckpointError, match="holds a 'seg' network, but a 'cam' network"):
    checkpoint.check_compatible(META, arch="cam", path="runs/x")
  with pytest.raises(CheckpointError, match="model width 0.125, but the model has width 1.0"):
    checkpoint.check_compatible(META, arch="seg", width=1.0)
  with pytest.raises(CheckpointError, match="has 2 classes, but the model has 20"):
    checkpoint.check_compatible(META, arch="seg", num_classes=20)
  backbone = dict(arch="backbone", width=1.0, num_classes=None, source="mxnet")
  checkpoint.check_compatible(backbone, arch="backbone", width=1.0, num_classes=20)
  with pytest.raises(CheckpointError, match="convert mxnet"):
    checkpoint.check_compatible(META, arch="backbone")
