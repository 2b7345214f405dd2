"""All eight stages end to end on the tiny synthetic config, through the real CLI."""

import json
import os
import shutil

import numpy as np
import pytest

from affinity_jax import cli, io
from tests import _runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "synthetic.py:tiny")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("e2e")
  argv = ["run", "--config", TINY, "--workdir", str(workdir),
          f"--config.data.data_dir={workdir / 'tfds'}"]
  assert cli.main(argv) == 0
  return workdir, argv


def test_every_stage_wrote_its_outputs(run_dir):
  workdir, _ = run_dir
  for net in ("cam_net", "aff_net", "seg_net"):
    assert os.path.isdir(workdir / net / "final"), net
  n_train, n_val = 16, 8  # the tiny synthetic config
  assert len(os.listdir(workdir / "cams")) == n_train + n_val
  assert len(os.listdir(workdir / "cam_pred")) == n_train + n_val
  assert len(os.listdir(workdir / "aff_labels")) == n_train + n_val
  assert len(os.listdir(workdir / "pseudo_labels")) == n_train + n_val
  assert len(os.listdir(workdir / "seg_pred")) == n_val
  assert any(f.endswith(".png") and not f.startswith("rw_") for f in os.listdir(workdir / "panels"))


def test_outputs_have_the_documented_format(run_dir):
  workdir, _ = run_dir
  name = sorted(os.listdir(workdir / "cams"))[0][:-4]
  cam = io.load_npz(workdir / "cams" / f"{name}.npz")
  assert cam["cam"].dtype == np.float32 and cam["cam"].shape[-1] == len(cam["class_ids"])
  assert cam["cam"].min() >= 0 and cam["cam"].max() <= 1
  scores = io.load_npz(workdir / "aff_labels" / f"{name}.npz")
  assert scores["la"].shape == scores["ha"].shape == cam["cam"].shape[:2] + (
      len(cam["class_ids"]) + 1,)
  # dCRF marginals sum to one over the labels.
  np.testing.assert_allclose(scores["la"].sum(-1), 1.0, atol=1e-3)
  label = io.load_png(workdir / "pseudo_labels" / f"{name}.png")
  assert label.shape == cam["cam"].shape[:2] and label.dtype == np.uint8
  allowed = {0} | {int(c) + 1 for c in cam["class_ids"]}
  assert set(np.unique(label)) <= allowed
  # The CAM-only label map: argmax over (background 0.2, the CAMs), 0 background, c + 1 class c.
  cam_pred = io.load_png(workdir / "cam_pred" / f"{name}.png")
  stack = np.concatenate([np.full(cam["cam"].shape[:2] + (1,), 0.2), cam["cam"]], axis=-1)
  ids = np.concatenate([[0], cam["class_ids"] + 1])
  np.testing.assert_array_equal(cam_pred, ids[np.argmax(stack, axis=-1)])


def test_cam_predictions_are_made_again_from_existing_cams(run_dir, capsys):
  workdir, argv = run_dir
  pred_dir = workdir / "cam_pred"
  victim = sorted(os.listdir(pred_dir))[0]
  before = (pred_dir / victim).read_bytes()
  os.unlink(pred_dir / victim)
  assert cli.main(argv + ["--stages", "infer_cam"]) == 0
  assert "wrote 1 CAM-only label maps from existing CAM files" in capsys.readouterr().out
  assert (pred_dir / victim).read_bytes() == before


def test_results_json_and_table(run_dir):
  workdir, _ = run_dir
  results = json.loads((workdir / "results.json").read_text())
  for key in ("cam_miou", "rw_miou", "seg_miou"):
    assert 0.0 <= results[key] <= 1.0
  assert results["seconds"] > 0
  # The tiny dataset's three classes are named after their parts' hues: 0, 120, 240 degrees.
  assert results["class_names"] == ["background", "red", "green", "blue"]
  assert len(results["splits"]["val"]["rw"]["iou"]) == len(results["class_names"])
  table = (workdir / "results.md").read_text()
  # The rows say which outputs went through dCRF (tiny: the segmentation's, not the walk's).
  assert "| CAM + RW | val |" in table and "| Segmentation + dCRF | val |" in table


def test_rerun_skips_complete_stages_and_redoes_only_missing_files(run_dir, capsys):
  workdir, argv = run_dir
  label_dir = workdir / "pseudo_labels"
  victim = sorted(os.listdir(label_dir))[0]
  before = {f: (label_dir / f).stat().st_mtime_ns for f in os.listdir(label_dir)}
  os.unlink(label_dir / victim)
  (label_dir / ".tmp-leftover").write_bytes(b"half a file")  # as a killed writer leaves it
  assert cli.main(argv + ["--stages", "random_walk"]) == 0
  out = capsys.readouterr().out
  assert "wrote 1 pseudo labels" in out
  after = {f: (label_dir / f).stat().st_mtime_ns for f in os.listdir(label_dir)}
  assert set(after) == set(before)  # the temporary file is gone, the missing label is back
  assert all(after[f] == before[f] for f in before if f != victim)
  assert cli.main(argv + ["--stages", "train_cam"]) == 0
  assert "skipping" in capsys.readouterr().out


def test_unknown_config_key_is_a_clear_error(run_dir, capsys):
  _, argv = run_dir
  assert cli.main(argv + ["--config.cam.learning_rate=0.1"]) == 2
  err = capsys.readouterr().err
  assert "cam.learning_rate" in err and "Traceback" not in err


def test_unknown_stage_is_a_clear_error(run_dir, capsys):
  _, argv = run_dir
  assert cli.main(argv + ["--stages", "train_cam,make_coffee"]) == 2
  assert "make_coffee" in capsys.readouterr().err


def test_bad_image_scale_is_a_clear_error(run_dir, tmp_path, capsys):
  copy, argv = _runs.copy_run(run_dir, tmp_path, "pseudo_labels", "aff_net")
  for stage in ("train_aff", "random_walk"):
    assert cli.main(argv + ["--stages", stage, "--config.aff.image_scale=0"]) == 2
    assert "config key aff.image_scale must be > 0" in capsys.readouterr().err
  assert not (copy / "pseudo_labels").exists() or not os.listdir(copy / "pseudo_labels")


def test_random_walk_crf_refines_the_pseudo_labels(run_dir, tmp_path):
  copy, argv = _runs.copy_run(run_dir, tmp_path, "pseudo_labels", "panels")
  assert cli.main(argv + ["--stages", "random_walk", "--config.random_walk.crf=True"]) == 0
  workdir, _ = run_dir
  assert _runs.changed_pseudo_labels(copy, workdir) > 0  # dCRF moved the outlines of some image


def test_crf_label_cleans_a_noisy_walk_along_the_image_edges():
  from affinity_jax import random_walk  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  h, w = 40, 48
  truth = np.zeros((h, w), np.int64)
  truth[8:32, 10:30] = 1                                 # the object: class 2 of 3 -> label 3
  image = np.where(truth[..., None] == 1, [200, 40, 40], [30, 60, 200]).astype(np.uint8)
  p_obj = np.clip(np.where(truth == 1, 0.7, 0.3) + rng.uniform(-0.35, 0.35, (h, w)), 0.01, 0.99)
  # walk_batch's layout: the background and the image's classes first, then padding.
  share = np.zeros((h, w, 4), np.float32)
  share[..., 0], share[..., 1] = 1 - p_obj, p_obj
  noisy = np.where(p_obj > 0.5, 3, 0)
  label = random_walk.crf_label(image, share, np.array([0, 3]), iters=10)
  assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 3}
  want = np.where(truth == 1, 3, 0)
  assert np.mean(noisy == want) < 0.9
  assert np.mean(label == want) > 0.99


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_random_walk_image_scale_keeps_the_geometry(run_dir, tmp_path, scale):
  """With beta huge the walk is the identity, so the pseudo label is the CAM stack's argmax seen
  through the walk's resize -> pool by 8 -> upsample path: at any aff.image_scale it must land
  on the image where the full-resolution argmax is (a misplaced or misscaled grid would not)."""
  copy, argv = _runs.copy_run(run_dir, tmp_path, "pseudo_labels", "panels")
  assert cli.main(argv + ["--stages", "random_walk", "--config.random_walk.beta=1e6",
                          f"--config.aff.image_scale={scale}"]) == 0
  agree = total = 0
  for f in sorted(os.listdir(copy / "cams")):
    cam = io.load_npz(copy / "cams" / f)
    stack = np.concatenate([(1 - cam["cam"].max(-1, keepdims=True)) ** 16, cam["cam"]], -1)
    want = np.concatenate([[0], cam["class_ids"] + 1])[stack.argmax(-1)]
    label = io.load_png(copy / "pseudo_labels" / (f[:-4] + ".png"))
    assert label.shape == want.shape
    agree += (label == want).sum()
    total += want.size
  assert agree / total > 0.9, agree / total


def _files(folder):
  return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def test_changed_config_is_never_silently_reused(run_dir, tmp_path, capsys):
  copy, argv = _runs.copy_run(run_dir, tmp_path)
  labels = _files(copy / "pseudo_labels")
  results = (copy / "results.json").read_bytes()
  changed = ["--stages", "random_walk,evaluate", "--config.random_walk.beta=16"]
  assert cli.main(argv + changed) == 2
  err = capsys.readouterr().err
  assert "random_walk: its outputs" in err and "--config.random_walk.beta: 32.0 -> 16.0" in err
  assert "--config.on_change=redo" in err and "Traceback" not in err
  assert _files(copy / "pseudo_labels") == labels  # nothing was touched
  assert (copy / "results.json").read_bytes() == results
  # redo: the walk again, and what was made from its old labels is gone, not mixed.
  assert cli.main(argv + changed + ["--config.on_change=redo"]) == 2
  err = capsys.readouterr().err
  assert "seg_pred" in err and "run the infer_seg stage first" in err
  assert _files(copy / "pseudo_labels") != labels
  for gone in ("seg_net", "seg_pred", "results.json"):
    assert not (copy / gone).exists(), gone
  record = json.loads((copy / "fingerprints" / "random_walk.json").read_text())
  assert record["complete"] and record["inputs"]["config"]["random_walk.beta"] == 16.0
  # With the rest redone, the table is whole again and records what it scored.
  assert cli.main(argv + ["--stages", "train_seg,infer_seg,evaluate",
                          "--config.random_walk.beta=16"]) == 0
  results = json.loads((copy / "results.json").read_text())
  assert results["fingerprints"]["random_walk"] == record["fingerprint"]


def test_stages_never_mix_runs(run_dir, tmp_path, capsys):
  copy, argv = _runs.copy_run(run_dir, tmp_path)
  # keep: the user adopts the old pseudo labels under the new beta; seg_net was trained on
  # the labels of the earlier record, so evaluating would mix two runs of random_walk.
  assert cli.main(argv + ["--stages", "random_walk", "--config.random_walk.beta=16",
                          "--config.on_change=keep"]) == 0
  assert cli.main(argv + ["--stages", "evaluate"]) == 2
  err = capsys.readouterr().err
  assert "would mix runs" in err and "train_seg" in err and "random_walk" in err


def test_partial_rerun_keeps_the_record_of_the_whole_run(run_dir, tmp_path):
  copy, argv = _runs.copy_run(run_dir, tmp_path)
  whole = json.loads((copy / "results.json").read_text())
  assert set(whole["stage_seconds"]) == {"train_cam", "infer_cam", "aff_labels", "train_aff",
                                         "random_walk", "train_seg", "infer_seg", "evaluate"}
  assert whole["seconds"] == pytest.approx(sum(whole["stage_seconds"].values()), abs=0.2)
  recorded = {s: json.loads((copy / "fingerprints" / f"{s}.json").read_text())["seconds"]
              for s in whole["stage_seconds"]}
  assert cli.main(argv + ["--stages", "random_walk,evaluate"]) == 0
  again = json.loads((copy / "results.json").read_text())
  assert set(again["stage_seconds"]) == set(whole["stage_seconds"])
  for stage in ("train_cam", "random_walk"):  # random_walk found all done: its time stays
    assert again["stage_seconds"][stage] == recorded[stage]
  assert again["fingerprints"] == whole["fingerprints"]
  assert again["cam_miou"] == whole["cam_miou"]


def test_evaluate_draws_per_class_charts_beside_the_table(run_dir):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, _ = run_dir
  for name in ("results_iou.png", "results_confusion.png"):  # every row; segmentation's
    with Image.open(workdir / name) as im:
      im.load()
      assert im.format == "PNG" and im.width >= 400 and im.height >= 300, name
      assert np.asarray(im.convert("L")).std() > 10, name  # something is drawn


@pytest.mark.parametrize("folder,key", [("seg_pred", "seg_miou"), ("cam_pred", "cam_miou"),
                                        ("pseudo_labels", "rw_miou")])
def test_evaluate_command_scores_as_the_stage_does(run_dir, tmp_path, capsys, folder, key):
  """`affinity-jax evaluate` on the stage's own outputs gives the stage's mIoU (cam_pred and
  pseudo_labels also hold train images, which --partial leaves out)."""
  workdir, _ = run_dir
  results = json.loads((workdir / "results.json").read_text())
  argv = ["evaluate", "--pred", str(workdir / folder), "--gt-dataset", "synthetic_wsss",
          "--split", "val", "--data-dir", str(workdir / "tfds"), "--out", str(tmp_path)]
  assert cli.main(argv + (["--partial"] if folder != "seg_pred" else [])) == 0
  out = capsys.readouterr().out
  report = json.loads((tmp_path / f"{folder}_eval.json").read_text())
  assert report["miou"] == pytest.approx(results[key], rel=1e-12)
  assert report["images"] == 8 and len(report["classes"]) == 4  # tiny: 8 val, 3 classes + bg
  assert f"mIoU {100 * results[key]:.1f}% over 4 classes" in out
  assert report["ground_truth"].startswith("dataset synthetic_wsss/tiny/")


# ---------------------------------------------------------------------------------------------
# affinity-jax predict with the tiny run's networks and the config it recorded.


def _odd_images(folder):
  """What a user's folder may hold: odd sizes, modes and formats, and a broken file. Returns
  {stem: (h, w) upright} of the readable ones."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (37, 53, 3), np.uint8)).save(folder / "rgb.jpg")
  Image.fromarray(rng.integers(0, 256, (70, 45), np.uint8)).save(folder / "grey.png")
  Image.new("CMYK", (61, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
  Image.fromarray(rng.integers(0, 256, (50, 50, 4), np.uint8)).save(folder / "alpha.png")
  exif = Image.Exif()
  exif[0x0112] = 6  # stored 40 wide and 24 high, shown turned a quarter clockwise
  Image.fromarray(rng.integers(0, 256, (24, 40, 3), np.uint8)).save(folder / "rotated.jpg",
                                                                      exif=exif)
  Image.fromarray(rng.integers(0, 65536, (33, 66)).astype(np.uint16)).save(folder / "grey16.png")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG cut short")
  return {"rgb": (37, 53), "grey": (70, 45), "cmyk": (40, 61), "alpha": (50, 50),
          "rotated": (40, 24), "grey16": (33, 66)}


def _label(path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    assert im.mode == "P" and im.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC's
    return np.asarray(im)


def test_predict_labels_odd_images_and_skips_a_broken_one(run_dir, tmp_path, capsys):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, _ = run_dir
  sizes = _odd_images(tmp_path / "in")
  (tmp_path / "more").mkdir()
  Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "more" / "rgb.png")
  before = sorted(os.listdir(workdir))
  out = tmp_path / "out"
  assert cli.main(["predict", "--workdir", str(workdir), "--images", str(tmp_path / "in"),
                   str(tmp_path / "more" / "rgb.png"), "--out", str(out),
                   "--batch-size", "8", "--max-side", "64"]) == 0
  printed = capsys.readouterr().out
  broken = str(tmp_path / "in" / "broken.jpg")
  assert "[predict] labelled 7 image(s)" in printed and "skipped 1" in printed
  assert f"  {broken} cannot be decoded" in printed
  report = json.loads((out / "predict.json").read_text())
  assert report["method"] == "seg" and report["written"] == 7
  assert list(report["skipped_files"]) == [broken]
  sizes["more_rgb"] = (64, 64)  # a second rgb.* from another folder: renamed, not overwritten
  assert report["images"][str(tmp_path / "more" / "rgb.png")]["outputs"]["label"] == (
      "more_rgb.png")
  # Longer than --max-side: the networks see it resized, its label map has its own size.
  assert report["images"][str(tmp_path / "in" / "grey.png")]["inferred_at"] == [64, 41]
  assert "inferred_at" not in report["images"][str(tmp_path / "in" / "rgb.jpg")]
  for stem, hw in sizes.items():
    label = _label(out / f"{stem}.png")
    assert label.shape == hw, stem  # the rotated image's label map is upright too
    assert label.max() <= 3  # 0 background, 1..3 the tiny config's classes
    with Image.open(out / f"{stem}_overlay.jpg") as im:
      assert im.mode == "RGB" and im.size == (hw[1], hw[0])
  assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
  assert sorted(os.listdir(workdir)) == before


def _val_images(workdir, folder):
  """The tiny run's val images as the files the dataset stores; their names."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from affinity_jax import config, data  # pylint: disable=g-import-not-at-top
  cfg = config.load_config(TINY)
  cfg.data.data_dir = str(workdir / "tfds")
  ds = data.from_config(cfg).as_dataset(split="val", shuffle_files=False,
                                        decoders={"image": tfds.decode.SkipDecoding()})
  folder.mkdir()
  names = []
  for ex in tfds.as_numpy(ds):
    names.append(ex["name"].decode())
    (folder / f"{names[-1]}.png").write_bytes(ex["image"])
  assert len(names) == 8
  return names


def test_predict_labels_equal_the_infer_seg_stage(run_dir, tmp_path):
  workdir, _ = run_dir
  names = _val_images(workdir, tmp_path / "val")
  out = tmp_path / "out"
  assert cli.main(["predict", "--workdir", str(workdir), "--images", str(tmp_path / "val"),
                   "--out", str(out)]) == 0
  for name in names:
    np.testing.assert_array_equal(_label(out / f"{name}.png"),
                                  io.load_png(workdir / "seg_pred" / f"{name}.png"), name)


def test_predict_over_two_devices_gives_the_same_labels(run_dir, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir, _ = run_dir
  names = _val_images(workdir, tmp_path / "val")
  out = tmp_path / "out"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  # Three images a batch: four over two devices, the last batch padded with dummies.
  done = subprocess.run([sys.executable, "-m", "affinity_jax.cli", "predict", "--workdir",
                         str(workdir), "--images", str(tmp_path / "val"), "--out", str(out),
                         "--batch-size", "3"], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "on 2 device(s)" in done.stdout
  for name in names:
    np.testing.assert_array_equal(_label(out / f"{name}.png"),
                                  io.load_png(workdir / "seg_pred" / f"{name}.png"), name)


def test_predict_walk_picks_the_classes_it_walks_and_draws_heat_maps(run_dir, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, _ = run_dir
  sizes = {"a": (37, 53), "b": (64, 48)}
  rng = np.random.default_rng(1)
  (tmp_path / "in").mkdir()
  for stem, (h, w) in sizes.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(tmp_path / "in" / f"{stem}.png")
  out = tmp_path / "out"
  assert cli.main(["predict", "--workdir", str(workdir), "--method", "walk", "--heatmaps",
                   "--images", str(tmp_path / "in"), "--out", str(out)]) == 0
  report = json.loads((out / "predict.json").read_text())
  assert report["method"] == "walk" and report["written"] == 2
  for stem, hw in sizes.items():
    record = report["images"][str(tmp_path / "in" / f"{stem}.png")]
    scores = np.asarray(record["class_scores"])
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    chosen = {int(c) + 1 for c in np.flatnonzero(scores > 0.5)} | {int(np.argmax(scores)) + 1}
    label = _label(out / f"{stem}.png")
    assert label.shape == hw and set(np.unique(label)) <= {0} | chosen
    for kind in ("cam", "rw"):
      heat = np.asarray(Image.open(out / record["outputs"][kind]))
      assert heat.shape == hw + (3,)
  # The only PNGs are the label maps: `evaluate --pred out` scores the folder as it is.
  assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["a.png", "b.png"]


def test_predict_names_the_stage_to_run_when_a_network_is_missing(run_dir, tmp_path, capsys):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  copy, _ = _runs.copy_run(run_dir, tmp_path, "seg_net", "aff_net", "cams", "aff_labels",
                      "pseudo_labels", "panels")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
  argv = ["predict", "--workdir", str(copy), "--images", str(tmp_path / "a.png"),
          "--out", str(tmp_path / "out")]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "no trained network" in err and "train_seg stage" in err and "train_aff stage" in err
  assert "Traceback" not in err
  assert cli.main(argv + ["--method", "seg"]) == 2
  assert "seg_net/final does not exist: run the train_seg stage" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_predict_with_an_explicit_config_and_overrides(run_dir, tmp_path, capsys):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  copy, _ = _runs.copy_run(run_dir, tmp_path, "config.json", "cams", "aff_labels", "pseudo_labels",
                      "panels")  # a workdir whose run recorded no config
  Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(tmp_path / "a.png")
  argv = ["predict", "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
  assert cli.main(argv + ["--workdir", str(copy)]) == 2
  err = capsys.readouterr().err
  assert "config.json does not exist" in err and "--config" in err
  assert cli.main(argv + ["--seg-net", str(copy / "seg_net" / "final"), "--config", TINY,
                          "--config.seg_infer.scales=(2.0,)"]) == 0
  report = json.loads((tmp_path / "out" / "predict.json").read_text())
  assert "scales 2 + flips" in report["described"] and report["config"] == TINY
  assert _label(tmp_path / "out" / "a.png").shape == (30, 20)


def test_a_run_records_its_config_for_predict(run_dir):
  workdir, _ = run_dir
  from affinity_jax import config  # pylint: disable=g-import-not-at-top
  recorded = json.loads((workdir / "config.json").read_text())
  want = json.loads(json.dumps(config.load_config(TINY).to_dict()))
  want["data"]["data_dir"] = str(workdir / "tfds")
  del want["workdir"]  # the folder the record is in
  assert recorded == want


def test_predict_takes_the_settings_that_made_the_networks(run_dir, tmp_path):
  """config.json is the latest command's config, which may have changed keys its stages never
  read (an evaluate-only run) or stopped at; predict takes the stages' recorded values, and a
  command-line override last."""
  from affinity_jax import predict  # pylint: disable=g-import-not-at-top
  workdir, _ = run_dir
  wd = tmp_path / "w"
  shutil.copytree(workdir / "fingerprints", wd / "fingerprints")
  recorded = json.loads((wd / "fingerprints" / "random_walk.json").read_text())["inputs"]["config"]
  changed = json.loads((workdir / "config.json").read_text())
  changed["aff"]["image_scale"] = recorded["aff.image_scale"] + 1.0
  changed["random_walk"]["beta"] = recorded["random_walk.beta"] * 2
  (wd / "config.json").write_text(json.dumps(changed))
  cfg, _ = predict.load_config(None, [], str(wd), [])
  assert cfg.aff.image_scale == recorded["aff.image_scale"]
  assert cfg.random_walk.beta == recorded["random_walk.beta"]
  cfg, _ = predict.load_config(None, ["--config.random_walk.beta=5.0"], str(wd), [])
  assert cfg.random_walk.beta == 5.0


def test_predict_with_nothing_readable_fails_and_leaves_no_stale_report(run_dir, tmp_path,
                                                                        capsys):
  workdir, _ = run_dir
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  out = tmp_path / "out"
  out.mkdir()
  (out / "predict.json").write_text('{"written": 7}')  # an earlier run's
  assert cli.main(["predict", "--workdir", str(workdir), "--images", str(tmp_path / "in"),
                   "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert "no image could be labelled" in err and "broken.jpg" in json.loads(
      (out / "predict.json").read_text())["skipped_files"].__str__()


def test_the_demo_path_from_the_pretrained_backbone(tmp_path):
  """The demo's own init and optimisers (configs/synthetic.py without :tiny: the shipped
  backbone, frozen stem and BatchNorm, SGD with the original's groups) at the tiny size: the
  trained CAM network and AffinityNet keep the backbone's stem and statistics and move the rest."""
  from affinity_jax import checkpoint, config  # pylint: disable=g-import-not-at-top
  demo = config.load_config(os.path.join(REPO, "configs", "synthetic.py"))
  assert demo.init.backbone and demo.init.freeze_stem and not demo.init.from_cam_net
  assert demo.cam.optimizer == demo.aff.optimizer == "sgd"
  workdir = tmp_path / "w"
  argv = ["run", "--config", TINY, "--workdir", str(workdir),
          f"--config.data.data_dir={tmp_path / 'tfds'}",
          f"--config.init.backbone={demo.init.backbone}", "--config.init.freeze_stem=True",
          "--config.init.from_cam_net=False"]
  for net in ("cam", "aff"):
    argv += [f"--config.{net}.optimizer={demo[net].optimizer}", f"--config.{net}.lr={demo[net].lr}",
             f"--config.{net}.pretrained_lr_mult={demo[net].pretrained_lr_mult}"]
  assert cli.main(argv + ["--stages", "train_cam,infer_cam,aff_labels,train_aff"]) == 0
  backbone, _ = checkpoint.load_variables(demo.init.backbone)
  for net in ("cam_net", "aff_net"):
    trained, _ = checkpoint.load_variables(str(workdir / net / "final"))
    for name in ("conv1a", "b2", "b2_1", "b2_2"):  # the frozen stem
      for a, b in zip(jax_leaves(backbone["params"][name]), jax_leaves(trained["params"][name])):
        np.testing.assert_array_equal(a, b)
    for name in backbone["batch_stats"]:  # frozen BatchNorm
      for a, b in zip(jax_leaves(backbone["batch_stats"][name]),
                      jax_leaves(trained["batch_stats"][name])):
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in zip(jax_leaves(backbone["params"]["b3"]),
                                                     jax_leaves(trained["params"]["b3"]))]
    assert any(moved), net


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)
