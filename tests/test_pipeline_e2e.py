"""All eight stages end to end on the tiny synthetic config, through the real CLI."""

import json
import os

import numpy as np
import pytest

from affinity_jax import cli, io

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
  table = (workdir / "results.md").read_text()
  assert "CAM + RW" in table and "Segmentation" in table


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


def _copy_run(run_dir, tmp_path, *drop):
  """A copy of the tiny run's workdir without `drop` (and its tfds), and argv pointing at it."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir, argv = run_dir
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(*drop, "tfds"))
  return copy, [a if a != str(workdir) else str(copy) for a in argv]


def test_bad_image_scale_is_a_clear_error(run_dir, tmp_path, capsys):
  copy, argv = _copy_run(run_dir, tmp_path, "pseudo_labels", "aff_net")
  for stage in ("train_aff", "random_walk"):
    assert cli.main(argv + ["--stages", stage, "--config.aff.image_scale=0"]) == 2
    assert "config key aff.image_scale must be > 0" in capsys.readouterr().err
  assert not (copy / "pseudo_labels").exists() or not os.listdir(copy / "pseudo_labels")


def test_random_walk_crf_refines_the_pseudo_labels(run_dir, tmp_path):
  copy, argv = _copy_run(run_dir, tmp_path, "pseudo_labels", "panels")
  assert cli.main(argv + ["--stages", "random_walk", "--config.random_walk.crf=True"]) == 0
  workdir, _ = run_dir
  changed = 0
  for f in sorted(os.listdir(copy / "cams")):
    cam = io.load_npz(copy / "cams" / f)
    label = io.load_png(copy / "pseudo_labels" / (f[:-4] + ".png"))
    plain = io.load_png(workdir / "pseudo_labels" / (f[:-4] + ".png"))
    assert label.shape == plain.shape
    assert set(np.unique(label)) <= {0} | {int(c) + 1 for c in cam["class_ids"]}
    changed += int(np.any(label != plain))
  assert changed > 0  # dCRF moved the outlines of some image


def test_crf_label_cleans_a_noisy_walk_along_the_image_edges():
  from affinity_jax.stages import random_walk  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  h, w = 40, 48
  truth = np.zeros((h, w), np.int64)
  truth[8:32, 10:30] = 1                                 # the object: class 2 of 3 -> label 3
  image = np.where(truth[..., None] == 1, [200, 40, 40], [30, 60, 200]).astype(np.uint8)
  p_obj = np.clip(np.where(truth == 1, 0.7, 0.3) + rng.uniform(-0.35, 0.35, (h, w)), 0.01, 0.99)
  share = np.zeros((h, w, 4), np.float32)
  share[..., 0], share[..., 3] = 1 - p_obj, p_obj
  noisy = np.where(p_obj > 0.5, 3, 0)
  label = random_walk.crf_label(image, share, np.array([0.0, 0.0, 1.0]), iters=10)
  assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 3}
  want = np.where(truth == 1, 3, 0)
  assert np.mean(noisy == want) < 0.9
  assert np.mean(label == want) > 0.99


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_random_walk_image_scale_keeps_the_geometry(run_dir, tmp_path, scale):
  """With beta huge the walk is the identity, so the pseudo label is the CAM stack's argmax seen
  through the walk's resize -> pool by 8 -> upsample path: at any aff.image_scale it must land
  on the image where the full-resolution argmax is (a misplaced or misscaled grid would not)."""
  copy, argv = _copy_run(run_dir, tmp_path, "pseudo_labels", "panels")
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
  copy, argv = _copy_run(run_dir, tmp_path)
  labels = _files(copy / "pseudo_labels")
  results = (copy / "results.json").read_bytes()
  changed = ["--stages", "random_walk,evaluate", "--config.random_walk.beta=16"]
  assert cli.main(argv + changed) == 2
  err = capsys.readouterr().err
  assert "random_walk: its outputs" in err and "--config.random_walk.beta: 4.0 -> 16.0" in err
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
  copy, argv = _copy_run(run_dir, tmp_path)
  # keep: the user adopts the old pseudo labels under the new beta; seg_net was trained on
  # the labels of the earlier record, so evaluating would mix two runs of random_walk.
  assert cli.main(argv + ["--stages", "random_walk", "--config.random_walk.beta=16",
                          "--config.on_change=keep"]) == 0
  assert cli.main(argv + ["--stages", "evaluate"]) == 2
  err = capsys.readouterr().err
  assert "would mix runs" in err and "train_seg" in err and "random_walk" in err


def test_partial_rerun_keeps_the_record_of_the_whole_run(run_dir, tmp_path):
  copy, argv = _copy_run(run_dir, tmp_path)
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
