"""The shipped pretrained backbone of the synthetic demo, and the script that makes it."""

import json
import os
import subprocess
import sys

import numpy as np

from affinity_jax import checkpoint, config, models, pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_shipped_backbone_is_intact_and_fits_the_demo():
  path = pretrained.SYNTHETIC_RESNET38
  assert pretrained.folder_digest(path) == pretrained.SYNTHETIC_RESNET38_SHA256, (
      f"{path} changed: remake it with `{pretrained.SYNTHETIC_RESNET38_COMMAND}` and record "
      "its digest in affinity_jax/pretrained/__init__.py")
  cfg = config.load_config("synthetic")
  variables, meta = checkpoint.load_variables(path)
  checkpoint.check_compatible(meta, arch="backbone", width=cfg.model.width, path=path,
                              backbone="resnet38")
  model = models.from_config(cfg, "cam")
  init = models.init_variables(model, np.zeros(2, np.uint32), (1, 96, 96, 3))
  merged = checkpoint.merge_backbone(
      {"params": init["params"], "batch_stats": init["batch_stats"]}, variables, path)
  # Everything but the classifier comes from the file; BatchNorm statistics are not identity.
  assert set(variables["params"]) == set(init["params"]) - {"fc8"}
  assert set(variables["batch_stats"]) == set(init["batch_stats"])
  var = np.asarray(merged["batch_stats"]["bn7"]["var"])
  assert not np.allclose(var, 1.0)


def test_the_pretraining_script_writes_a_backbone_init_backbone_loads(tmp_path):
  out = tmp_path / "backbone"
  res = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "pretrain_backbone.py"),
                        "--out", str(out), "--steps", "2", "--batch-size", "2"],
                       capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads(res.stdout.strip().splitlines()[-1])
  assert summary["sha256"] == pretrained.folder_digest(str(out))
  variables, meta = checkpoint.load_variables(str(out))
  assert meta["arch"] == "backbone" and meta["width"] == 0.0625
  assert meta["pretrain"]["steps"] == 2
  assert "cell_classifier" not in variables["params"] and "conv1a" in variables["params"]


def test_the_pretraining_world_is_deterministic_and_labels_its_cells():
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  try:
    import pretrain_backbone as pb  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  a = pb.make_example(np.random.default_rng([3, 4]))
  b = pb.make_example(np.random.default_rng([3, 4]))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  image, cells = a
  assert image.shape == (96, 96, 3) and image.dtype == np.uint8
  assert cells.shape == (12, 12) and 0 <= cells.min() and cells.max() <= pb.NUM_HUES
  # Over many images every hue labels some cells, and hue cells are a minority.
  rng = np.random.default_rng(0)
  counts = np.bincount(np.concatenate([pb.make_example(rng)[1].ravel() for _ in range(200)]),
                       minlength=pb.NUM_HUES + 1)
  assert np.all(counts[1:] > 0) and counts[0] > counts[1:].sum()
