"""IRN's pipeline (method irn) end to end on the tiny synthetic IRN config, through the real CLI:
IRN's CAMs, relation labels, the relation network, the walk at stride 4, the segmentation
network on ResNet-50, evaluate."""

import json
import os

import jax
import numpy as np
import pytest

from affinity_jax import artifacts, checkpoint, cli, config, io, random_walk
from affinity_jax.errors import ConfigError
from tests import _runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "synthetic_irn.py:tiny")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("irn_e2e")
  argv = ["run", "--config", TINY, "--workdir", str(workdir),
          f"--config.data.data_dir={workdir / 'tfds'}"]
  assert cli.main(argv) == 0
  return workdir, argv


def test_every_stage_wrote_its_outputs(run_dir):
  workdir, _ = run_dir
  n_train, n_val = 16, 8  # the tiny synthetic config
  for folder in ("cams", "cam_pred", "aff_labels", "pseudo_labels"):
    assert len(os.listdir(workdir / folder)) == n_train + n_val, folder
  assert len(os.listdir(workdir / "seg_pred")) == n_val
  _, meta = checkpoint.load_variables(str(workdir / "aff_net" / "final"))
  assert meta["arch"] == "relation" and meta["backbone"] == "resnet50"
  _, meta = checkpoint.load_variables(str(workdir / "seg_net" / "final"))
  assert meta["arch"] == "seg" and meta["backbone"] == "resnet50"


def test_outputs_have_irn_formats(run_dir):
  workdir, _ = run_dir
  for name in sorted(f[:-4] for f in os.listdir(workdir / "cams"))[:6]:
    cam = io.load_npz(workdir / "cams" / f"{name}.npz")
    h, w, k = cam["cam"].shape
    # IRN's two CAMs: full resolution and the stride-4 grid, each class peaking at <= 1.
    assert cam["strided"].shape == (-(-h // 4), -(-w // 4), k) == (16, 16, k)
    for maps in (cam["cam"], cam["strided"]):
      assert maps.dtype == np.float32 and maps.min() >= 0 and maps.max() <= 1
    ids = {int(c) + 1 for c in cam["class_ids"]}
    relation = io.load_png(workdir / "aff_labels" / f"{name}.png")
    assert relation.shape == (h, w) and set(np.unique(relation)) <= {0, 255} | ids
    label = io.load_png(workdir / "pseudo_labels" / f"{name}.png")
    assert label.shape == (h, w) and set(np.unique(label)) <= {0} | ids
    # The CAM-only map takes IRN's background 0.15 (eval.cam_background), not PSA's 0.2.
    stack = np.concatenate([np.full((h, w, 1), 0.15, np.float32), cam["cam"]], axis=-1)
    keys = np.concatenate([[0], cam["class_ids"] + 1])
    np.testing.assert_array_equal(io.load_png(workdir / "cam_pred" / f"{name}.png"),
                                  keys[np.argmax(stack, axis=-1)])


def test_results_and_a_rerun_that_does_nothing(run_dir, capsys):
  workdir, argv = run_dir
  results = json.loads((workdir / "results.json").read_text())
  for key in ("cam_miou", "rw_miou", "seg_miou"):
    assert 0.0 <= results[key] <= 1.0
  before = {f: (workdir / "pseudo_labels" / f).stat().st_mtime_ns
            for f in os.listdir(workdir / "pseudo_labels")}
  assert cli.main(argv + ["--stages", "random_walk"]) == 0
  assert "all outputs present" in capsys.readouterr().out
  assert before == {f: (workdir / "pseudo_labels" / f).stat().st_mtime_ns
                    for f in os.listdir(workdir / "pseudo_labels")}


def test_instances_from_the_displacement_field(run_dir):
  """random_walk's instances (method irn, random_walk.instances) fit their images and the
  images' classes; the relation network carries the mean displacement it measured; evaluate
  scores the instances (the synthetic data's objects are known)."""
  workdir, _ = run_dir
  variables, _ = checkpoint.load_variables(str(workdir / "aff_net" / "final"))
  mean = np.asarray(variables["batch_stats"]["mean_shift"]["mean"])
  assert mean.shape == (2,) and np.all(np.isfinite(mean)) and np.any(mean != 0)
  names = sorted(f[:-4] for f in os.listdir(workdir / "pseudo_labels"))
  assert sorted(f[:-4] for f in os.listdir(workdir / "instances")) == names
  found = 0
  for name in names:
    label = io.load_png(workdir / "pseudo_labels" / f"{name}.png")
    ids = set(io.load_npz(workdir / "cams" / f"{name}.npz")["class_ids"].tolist())
    instance_map, classes, scores = artifacts.load_instances(
        str(workdir / "instances" / f"{name}.npz"), label.shape, 3)
    assert set(classes.tolist()) <= ids and np.all((scores >= 0) & (scores <= 1))
    assert set(np.unique(instance_map)) <= set(range(len(classes) + 1))
    found += len(classes)
  assert found >= len(names)  # every image's class is somewhere
  results = json.loads((workdir / "results.json").read_text())
  ap = results["splits"]["val"]["instances"]["ap50"]
  assert len(ap) == 3 and 0.0 <= results["instance_map50"] <= 1.0
  assert "mAP at IoU 0.5" in (workdir / "results.md").read_text()


def test_an_image_without_its_instances_is_walked_again(run_dir, tmp_path, capsys):
  workdir, argv = _runs.copy_run(run_dir, tmp_path)
  argv = argv + ["--stages", "random_walk"]
  name = sorted(os.listdir(workdir / "instances"))[0][:-4]
  before = (workdir / "instances" / f"{name}.npz").read_bytes()
  os.remove(workdir / "instances" / f"{name}.npz")
  assert cli.main(argv) == 0
  assert "wrote 1 pseudo labels" in capsys.readouterr().out
  assert (workdir / "instances" / f"{name}.npz").read_bytes() == before


def test_a_changed_irn_key_is_named_not_reused(run_dir, capsys):
  """random_walk.bg_threshold is a key of IRN's configs only (IRN_READS): its change is caught."""
  workdir, argv = run_dir
  before = config.load_config(TINY).random_walk.bg_threshold
  assert cli.main(argv + ["--stages", "random_walk",
                          f"--config.random_walk.bg_threshold={before + 0.1}"]) == 2
  err = capsys.readouterr().err
  assert f"random_walk.bg_threshold: {before} -> {before + 0.1}" in err and "Traceback" not in err
  record = json.loads((workdir / "fingerprints" / "random_walk.json").read_text())
  assert record["inputs"]["config"]["random_walk.bg_threshold"] == before


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_irn_walk_image_scale_keeps_the_geometry(run_dir, tmp_path, scale):
  """With beta huge IRN's walk is the identity, so where the label is a class it is the class
  whose stride-4 CAM, upsampled by 4 as IRN does, is largest there (the boundary map scales
  every class of a cell alike): through the CAMs' resampling to the grid of the image resized
  by aff.image_scale and the walked scores' resampling back, the classes must land where they
  were (a misplaced or misscaled grid would move them)."""
  copy, argv = _runs.copy_run(run_dir, tmp_path, "pseudo_labels", "panels", "instances")
  assert cli.main(argv + ["--stages", "random_walk", "--config.random_walk.beta=1e6",
                          f"--config.aff.image_scale={scale}"]) == 0
  agree = total = 0
  for f in sorted(os.listdir(copy / "cams")):
    cam = io.load_npz(copy / "cams" / f)
    if len(cam["class_ids"]) < 2:
      continue  # one class: any grid gives it
    h, w = cam["cam"].shape[:2]
    strided = cam["strided"]
    up = random_walk.boundary_walk_scores(strided, (h, w), threshold=0.0)[..., 1:]
    want = (cam["class_ids"] + 1)[up.argmax(-1)]
    label = io.load_png(copy / "pseudo_labels" / (f[:-4] + ".png"))
    assert label.shape == (h, w)
    agree += np.sum((label == want) & (label > 0))
    total += np.sum(label > 0)
  assert total > 500 and agree / total > 0.95, (total, agree / total)


def test_irn_walk_with_crf_refines_its_labels(run_dir, tmp_path, monkeypatch):
  """random_walk.crf with method irn (not IRN's own; for comparing with PSA's walk + dCRF):
  dCRF on IRN's label scores, each image's labels still its own classes."""
  calls = []
  real = random_walk.crf_label

  def recording(image, share, channels, iters):  # the real dCRF, its inputs kept
    calls.append((image.copy(), share.copy(), np.array(channels), iters))
    return real(image, share, channels, iters)
  monkeypatch.setattr(random_walk, "crf_label", recording)
  workdir, _ = run_dir
  copy, argv = _runs.copy_run(run_dir, tmp_path, "pseudo_labels")
  assert cli.main(argv + ["--stages", "random_walk", "--config.random_walk.crf=True",
                          "--config.on_change=redo"]) == 0
  assert _runs.changed_pseudo_labels(copy, workdir) > 0  # dCRF moved the outlines of some image
  record = json.loads((copy / "fingerprints" / "random_walk.json").read_text())
  assert record["inputs"]["config"]["random_walk.crf"] is True
  # What the dCRF was given: the image itself, and per pixel the constant background and the
  # image's classes' normalised scores divided by their sum, in the label's channel order.
  cfg = config.load_config(TINY)
  with_class = [f for f in os.listdir(copy / "cams")
                if len(io.load_npz(copy / "cams" / f)["class_ids"])]
  assert len(calls) == len(with_class)
  for image, share, channels, iters in calls:
    h, w, k = share.shape
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    assert iters == cfg.random_walk.crf_iters
    assert len(channels) == k >= 2 and channels[0] == 0
    np.testing.assert_allclose(share.sum(-1), 1.0, rtol=1e-5)
    # Channel 0 is bg / (bg + sum of classes), and the classes peak at 1 over the image.
    classes = share[..., 1:] / share[..., :1] * cfg.random_walk.bg_threshold
    assert np.isclose(classes.max(), 1.0, rtol=1e-4) or classes.max() == 0  # 0: nothing walked


def test_irn_walk_with_crf_needs_a_positive_background():
  cfg = config.load_config("synthetic_irn:tiny")
  cfg.random_walk.update(dict(crf=True, bg_threshold=0.0))
  with pytest.raises(ConfigError, match=r"random_walk.bg_threshold must be in \(0, 1\] with "
                                        r"random_walk.crf"):
    config.validate(cfg)
  cfg.random_walk.crf = False
  config.validate(cfg)
  cfg.random_walk.bg_threshold = 1.5
  with pytest.raises(ConfigError, match=r"random_walk.bg_threshold must be in \[0, 1\]"):
    config.validate(cfg)
  cfg.random_walk.bg_threshold = 0.25
  cfg.random_walk.instance_bg_threshold = -0.1
  with pytest.raises(ConfigError, match=r"random_walk.instance_bg_threshold must be in \[0, 1\]"):
    config.validate(cfg)


def test_method_and_backbone_must_agree():
  cfg = config.load_config("synthetic_irn:tiny")
  cfg.model.backbone = "resnet38"
  with pytest.raises(ConfigError, match="model.backbone must be resnet50 with method irn"):
    config.validate(cfg)
  cfg = config.load_config("synthetic:tiny")
  cfg.model.backbone = "resnet50"
  with pytest.raises(ConfigError, match="with method psa"):
    config.validate(cfg)
  cfg.method = "dense"
  with pytest.raises(ConfigError, match="config key method must be one of"):
    config.validate(cfg)


def test_predict_uses_the_resnet50_segmentation_network(run_dir, tmp_path, capsys):
  workdir, _ = run_dir
  image = tmp_path / "mine.png"
  io.save_png(str(image), np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8))
  out = tmp_path / "out"
  assert cli.main(["predict", "--workdir", str(workdir), "--images", str(image),
                   "--out", str(out)]) == 0
  assert io.load_png(out / "mine.png").shape == (50, 70)
  # IRN's walk is the random_walk stage's; predict's walk is PSA's and says so.
  assert cli.main(["predict", "--workdir", str(workdir), "--images", str(image), "--method",
                   "walk", "--out", str(tmp_path / "walk")]) == 2
  assert "config has method irn" in capsys.readouterr().err


def test_voc_tiny_on_a_generated_tree_of_many_sizes(tmp_path):
  """configs/voc_irn_resnet50.py:tiny on a generated VOC tree (every image of its own size, on
  the 512 canvas): every stage writes one output per image at the image's size."""
  from tests import _voc_tree  # pylint: disable=import-outside-toplevel
  expected = _voc_tree.make_voc_tree(str(tmp_path / "manual"))
  workdir = tmp_path / "run"
  assert cli.main(["run", "--config", "voc_irn_resnet50:tiny", "--workdir", str(workdir),
                   f"--config.data.manual_dir={tmp_path / 'manual'}",
                   f"--config.data.data_dir={tmp_path / 'tfds'}"]) == 0
  names = sorted(f[:-4] for f in os.listdir(workdir / "pseudo_labels"))
  assert names == sorted(_voc_tree.TRAIN_AUG)
  for name in names:
    h, w = expected["sizes"][name]
    cam = io.load_npz(workdir / "cams" / f"{name}.npz")
    assert cam["cam"].shape[:2] == (h, w)
    assert cam["strided"].shape[:2] == (-(-h // 4), -(-w // 4))
    assert io.load_png(workdir / "aff_labels" / f"{name}.png").shape == (h, w)
    assert io.load_png(workdir / "pseudo_labels" / f"{name}.png").shape == (h, w)
    instance_map, _, _ = artifacts.load_instances(str(workdir / "instances" / f"{name}.npz"),
                                                  (h, w), 20)
    assert instance_map.shape == (h, w)
  results = json.loads((workdir / "results.json").read_text())
  assert 0.0 <= results["rw_miou"] <= 1.0 and 0.0 <= results["seg_miou"] <= 1.0
  # VOC's object maps (SegmentationObject) score the instances of its train images.
  train = results["splits"]["train"]["instances"]
  assert train["images"] == len(_voc_tree.VOC_TRAIN) and 0.0 <= train["map50"] <= 1.0


def test_the_synthetic_irn_path_from_the_pretrained_backbone(tmp_path):
  """configs/synthetic_irn.py's own init and optimisers (the shipped ResNet-50, IRN's frozen
  conv1 / layer1 / layer2 and BatchNorm, SGD with IRN's groups) at the tiny size: the CAM
  network moves layer3 on and keeps the rest; the relation network keeps the whole backbone."""
  full = config.load_config(os.path.join(REPO, "configs", "synthetic_irn.py"))
  assert full.init.backbone and full.init.freeze_stem and not full.init.from_cam_net
  assert full.cam.optimizer == full.aff.optimizer == "sgd"
  workdir = tmp_path / "w"
  argv = ["run", "--config", TINY, "--workdir", str(workdir),
          f"--config.data.data_dir={tmp_path / 'tfds'}",
          f"--config.init.backbone={full.init.backbone}", "--config.init.freeze_stem=True",
          "--config.init.from_cam_net=False", "--stages", "train_cam,infer_cam,aff_labels,train_aff"]
  for net in ("cam", "aff"):
    argv += [f"--config.{net}.optimizer={full[net].optimizer}", f"--config.{net}.lr={full[net].lr}"]
  assert cli.main(argv) == 0
  backbone, _ = checkpoint.load_variables(full.init.backbone)

  def same(trained, collection, name):
    pairs = zip(jax.tree.leaves(backbone[collection][name]),
                jax.tree.leaves(trained[collection][name]))
    return all(np.array_equal(a, b) for a, b in pairs)

  cam_net, _ = checkpoint.load_variables(str(workdir / "cam_net" / "final"))
  rel_net, _ = checkpoint.load_variables(str(workdir / "aff_net" / "final"))
  frozen = ("conv1", "bn1", "layer1_0", "layer2_3")
  assert all(same(cam_net, "params", name) for name in frozen)
  assert not same(cam_net, "params", "layer3_0") and not same(cam_net, "params", "layer4_2")
  assert all(same(rel_net, "params", name) for name in backbone["params"])
  for net in (cam_net, rel_net):
    assert all(same(net, "batch_stats", name) for name in backbone["batch_stats"])
