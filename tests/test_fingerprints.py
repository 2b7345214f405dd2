"""Fingerprint records: what counts as a change, and what each on_change does."""

import os

import pytest

from affinity_jax import artifacts, config, fingerprints
from affinity_jax.errors import UserError
from affinity_jax.stages import train_cam

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cfg(tmp_path):
  c = config.load_config(os.path.join(REPO, "configs", "synthetic.py:tiny"))
  c.workdir = str(tmp_path)
  return c


def _record(cfg):
  return fingerprints.make_record(cfg, "train_cam", train_cam.READS, train_cam.CONSUMES, "d")


def test_only_keys_that_change_results_change_the_fingerprint(cfg):
  fingerprints.save_record(artifacts.Workdir(cfg.workdir), {**_record(cfg), "complete": True})
  cfg.cam.checkpoint_every, cfg.cam.log_every = 1, 1  # when to save and log: no effect
  assert fingerprints.prepare(cfg, "train_cam", _record(cfg), outputs_exist=True) == "same"
  cfg.cam.lr = cfg.cam.lr * 2
  with pytest.raises(UserError, match=r"--config.cam.lr: 0.0003 -> 0.0006"):
    fingerprints.prepare(cfg, "train_cam", _record(cfg), outputs_exist=True)
  assert fingerprints.prepare(cfg, "train_cam", _record(cfg), outputs_exist=False) == "new"
  cfg.on_change = "redo"
  assert fingerprints.prepare(cfg, "train_cam", _record(cfg), outputs_exist=True) == "redo"
  cfg.on_change = "keep"
  assert fingerprints.prepare(cfg, "train_cam", _record(cfg), outputs_exist=True) == "new"
  cfg.on_change = "sometimes"
  with pytest.raises(UserError, match="on_change"):
    fingerprints.prepare(cfg, "train_cam", _record(cfg), outputs_exist=True)


def test_outputs_without_a_record_are_not_trusted(cfg):
  with pytest.raises(UserError, match="no fingerprint record"):
    fingerprints.prepare(cfg, "train_cam", _record(cfg), outputs_exist=True)


def test_consumers_need_finished_upstream_runs(cfg):
  wd = artifacts.Workdir(cfg.workdir)
  fingerprints.save_record(wd, _record(cfg))  # complete: False, as a killed run leaves it
  with pytest.raises(UserError, match="train_cam, whose last run did not finish"):
    fingerprints.check_consumed(wd, "infer_cam", ("train_cam",))


def test_downstream_follows_consumption_in_pipeline_order():
  consumes = {"a": (), "b": ("a",), "c": (), "d": ("b", "c"), "e": ("c",)}
  assert fingerprints.downstream("a", consumes) == ["b", "d"]
  assert fingerprints.downstream("c", consumes) == ["d", "e"]


def test_pretrained_backbone_counts_by_its_files(cfg, tmp_path):
  backbone = tmp_path / "imagenet"
  backbone.mkdir()
  (backbone / "weights").write_bytes(b"one")
  cfg.init.backbone = str(backbone)
  fingerprints.save_record(artifacts.Workdir(cfg.workdir), {**_record(cfg), "complete": True})
  assert fingerprints.prepare(cfg, "train_cam", _record(cfg), outputs_exist=True) == "same"
  (backbone / "weights").write_bytes(b"two")  # replaced in place, same path
  with pytest.raises(UserError, match="the files of --config.init.backbone: '[0-9a-f]+' -> "):
    fingerprints.prepare(cfg, "train_cam", _record(cfg), outputs_exist=True)
  # The same files in another folder (a moved checkout) are the same backbone.
  moved = tmp_path / "moved" / "imagenet"
  moved.mkdir(parents=True)
  (moved / "weights").write_bytes(b"two")
  there = _record(cfg)["fingerprint"]
  cfg.init.backbone = str(moved)
  assert _record(cfg)["fingerprint"] == there


def test_outputs_of_an_older_stage_code_are_not_current(cfg):
  # A record of before code versions (version 1, no key) against the stage's VERSION now.
  old = fingerprints.make_record(cfg, "train_cam", train_cam.READS, train_cam.CONSUMES, "d")
  assert "version" not in old["inputs"]
  fingerprints.save_record(artifacts.Workdir(cfg.workdir), {**old, "complete": True})
  new = fingerprints.make_record(cfg, "train_cam", train_cam.READS, train_cam.CONSUMES, "d",
                                 train_cam.VERSION)
  assert train_cam.VERSION > 1 and new["fingerprint"] != old["fingerprint"]
  with pytest.raises(UserError, match=r"the stage's code version: 1 -> 2"):
    fingerprints.prepare(cfg, "train_cam", new, outputs_exist=True)


def test_a_change_to_irns_path_alone_leaves_psas_outputs_current():
  """A stage's IRN_VERSION (train_aff: the relation network's mean displacement) counts with
  method irn only."""
  from affinity_jax import config, stages
  from affinity_jax.stages import train_aff
  psa, irn = config.load_config("synthetic:tiny"), config.load_config("synthetic_irn:tiny")
  assert stages.version(train_aff, psa) == train_aff.VERSION == 2
  assert stages.version(train_aff, irn) == "2+irn3" and train_aff.IRN_VERSION == 3
  assert stages.version(train_cam, irn) == train_cam.VERSION


def test_the_instances_background_counts_only_with_instances():
  """random_walk.instance_bg_threshold is read only where random_walk.instances is on: with it
  off, a changed threshold leaves the walk's outputs current."""
  from affinity_jax import stages
  from affinity_jax.stages import random_walk
  irn = config.load_config("synthetic_irn:tiny")
  key = "random_walk.instance_bg_threshold"
  for on in (False, True):
    irn.random_walk.instances = on
    assert (key in stages.reads(random_walk, irn)) == on
    assert "random_walk.instances" in stages.reads(random_walk, irn)
  assert key not in stages.reads(random_walk, config.load_config("synthetic:tiny"))
