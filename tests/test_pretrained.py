"""The shipped pretrained backbones of the synthetic demos, and the script that makes them."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from affinity_jax import checkpoint, config, models, pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# (folder, its digest, the command that made it, the config it serves, the classifier it lacks,
#  a BatchNorm module)
SHIPPED = {
    "resnet38": (pretrained.SYNTHETIC_RESNET38, pretrained.SYNTHETIC_RESNET38_SHA256,
                 pretrained.SYNTHETIC_RESNET38_COMMAND, "synthetic", "fc8", "bn7"),
    "resnet50": (pretrained.SYNTHETIC_RESNET50, pretrained.SYNTHETIC_RESNET50_SHA256,
                 pretrained.SYNTHETIC_RESNET50_COMMAND, "synthetic_irn", "classifier",
                 "layer4_2"),
}


@pytest.mark.parametrize("backbone", sorted(SHIPPED))
def test_the_shipped_backbone_is_intact_and_fits_its_demo(backbone):
  path, sha256, command, config_name, classifier, bn = SHIPPED[backbone]
  assert pretrained.folder_digest(path) == sha256, (
      f"{path} changed: remake it with `{command}` and record its digest in "
      "affinity_jax/pretrained/__init__.py")
  cfg = config.load_config(config_name)
  assert cfg.init.backbone == path and models.backbone_name(cfg) == backbone
  variables, meta = checkpoint.load_variables(path)
  checkpoint.check_compatible(meta, arch="backbone", width=cfg.model.width, path=path,
                              backbone=backbone)
  model = models.from_config(cfg, "cam")
  init = models.init_variables(model, np.zeros(2, np.uint32), (1, 96, 96, 3))
  merged = checkpoint.merge_backbone(
      {"params": init["params"], "batch_stats": init["batch_stats"]}, variables, path)
  # Everything but the classifier comes from the file; BatchNorm statistics are not identity.
  assert set(variables["params"]) == set(init["params"]) - {classifier}
  assert set(variables["batch_stats"]) == set(init["batch_stats"])
  var = jax.tree.leaves(merged["batch_stats"][bn])
  assert not all(np.allclose(np.asarray(v), 1.0) or np.allclose(np.asarray(v), 0.0) for v in var)


@pytest.mark.parametrize("backbone,first_conv", [("resnet38", "conv1a"), ("resnet50", "conv1")])
def test_the_pretraining_script_writes_a_backbone_init_backbone_loads(tmp_path, backbone,
                                                                      first_conv):
  out = tmp_path / "backbone"
  res = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "pretrain_backbone.py"),
                        "--backbone", backbone, "--out", str(out), "--steps", "2",
                        "--batch-size", "2"],
                       capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads(res.stdout.strip().splitlines()[-1])
  assert summary["sha256"] == pretrained.folder_digest(str(out))
  variables, meta = checkpoint.load_variables(str(out))
  assert meta["arch"] == "backbone" and meta["width"] == 0.0625
  assert meta["backbone"] == backbone and meta["pretrain"]["steps"] == 2
  assert "cell_classifier" not in variables["params"] and first_conv in variables["params"]


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
