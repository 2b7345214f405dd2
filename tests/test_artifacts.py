"""The files stages hand each other: round trips, checked loads, reports, results, no JAX."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from affinity_jax import artifacts, io
from affinity_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cam_round_trip_and_full_layout(tmp_path):
  wd = artifacts.Workdir(tmp_path)
  cam = np.random.default_rng(0).random((5, 7, 2)).astype(np.float32)
  artifacts.save_cam(wd.cam("a"), cam, np.array([1, 3]))
  assert wd.cam("a") == str(tmp_path / "cams" / "a.npz")
  present, ids = artifacts.load_cam_present(wd.cam("a"))
  np.testing.assert_array_equal(present, cam)
  np.testing.assert_array_equal(ids, [1, 3])
  full = artifacts.load_cam(wd.cam("a"), num_classes=4)
  assert full.shape == (5, 7, 4) and not full[..., [0, 2]].any()
  np.testing.assert_array_equal(full[..., [1, 3]], cam)


@pytest.mark.parametrize("arrays,match", [
    ({"heat": np.zeros((2, 2))}, "not a CAM file"),
    ({"cam": np.zeros((4, 4)), "class_ids": np.array([0])}, r"not \[H, W, P\]"),
    ({"cam": np.zeros((4, 4, 2)), "class_ids": np.array([0])}, r"not \[H, W, P\]"),
    ({"cam": np.zeros((4, 4, 1), np.int32), "class_ids": np.array([0])}, r"not \[H, W, P\]"),
    ({"cam": np.zeros((4, 4, 1)), "class_ids": np.array([0.5])}, r"not \[H, W, P\]"),
    ({"cam": np.zeros((4, 4, 1)), "class_ids": np.array([9])}, "does not fit 4 classes"),
])
def test_malformed_cam_files_are_user_errors_naming_the_file(tmp_path, arrays, match):
  path = str(tmp_path / "bad.npz")
  io.save_npz(path, **arrays)
  with pytest.raises(UserError, match=match) as e:
    artifacts.load_cam(path, num_classes=4)
  assert path in str(e.value) and "infer_cam" in str(e.value)


def test_missing_and_unreadable_files_name_the_stage(tmp_path):
  wd = artifacts.Workdir(tmp_path)
  with pytest.raises(UserError, match=r"cams/x.npz is missing: run the infer_cam stage"):
    artifacts.load_cam(wd.cam("x"), 3)
  os.makedirs(tmp_path / "cams")
  (tmp_path / "cams" / "x.npz").write_bytes(b"not a zip")
  with pytest.raises(UserError, match="not a readable .npz"):
    artifacts.load_cam(wd.cam("x"), 3)
  with pytest.raises(UserError, match="run the aff_labels stage"):
    artifacts.load_scores(wd.scores("x"), (4, 4), 3)


def test_score_maps_round_trip_and_checks(tmp_path):
  wd = artifacts.Workdir(tmp_path)
  la = np.random.default_rng(1).random((6, 5, 3)).astype(np.float32)
  artifacts.save_scores(wd.scores("a"), la, la / 2)
  got_la, got_ha = artifacts.load_scores(wd.scores("a"), (6, 5), 3)
  np.testing.assert_array_equal(got_la, la)
  np.testing.assert_array_equal(got_ha, la / 2)
  with pytest.raises(UserError, match="must both be"):
    artifacts.load_scores(wd.scores("a"), (5, 6), 3)
  with pytest.raises(UserError, match="more than 1 \\+ 1 classes"):
    artifacts.load_scores(wd.scores("a"), (6, 5), 2)


def test_label_maps_round_trip_and_checks(tmp_path):
  wd = artifacts.Workdir(tmp_path)
  label = np.arange(12, dtype=np.uint8).reshape(3, 4)
  artifacts.save_label(wd.pseudo_label("a"), label)
  np.testing.assert_array_equal(artifacts.load_label(wd.pseudo_label("a"), "random_walk"), label)
  with pytest.raises(UserError, match="3x4, the image is 4x3; delete it and rerun random_walk"):
    artifacts.load_label(wd.pseudo_label("a"), "random_walk", (4, 3))
  io.save_png(wd.prediction("rgb"), np.zeros((3, 4, 3), np.uint8))
  with pytest.raises(UserError, match="one-channel"):
    artifacts.load_label(wd.prediction("rgb"), "infer_seg")


def test_cam_size_mismatch_names_both_sizes():
  assert artifacts.cam_size_mismatch("c.npz", (8, 8), (8, 8)) is None
  why = artifacts.cam_size_mismatch("c.npz", (8, 8), (10, 12))
  assert "c.npz" in why and "8x8" in why and "10x12" in why and "infer_cam" in why


def test_skip_report_and_its_reader(tmp_path, capsys):
  wd = artifacts.Workdir(tmp_path)
  report = artifacts.SkipReport(wd, "random_walk")
  report.skip("b", "one reason")
  report.skip("b", "another")
  report.skip("a", "why")
  assert report.finish({"written": 3}) == {"written": 3, "skipped": 2}
  with open(wd.report("random_walk")) as f:
    written = json.load(f)
  assert written == {"stage": "random_walk", "count": 2,
                     "skipped": {"a": "why", "b": "one reason; another"}}
  assert artifacts.skipped_by(wd, "random_walk") == {"a", "b"}
  assert artifacts.skipped_by(wd, "infer_cam") == frozenset()
  assert "skipping b: one reason" in capsys.readouterr().out
  # Only the main process writes.
  artifacts.SkipReport(wd, "infer_cam", main_process=False).finish({})
  assert not os.path.exists(wd.report("infer_cam"))
  (tmp_path / "reports" / "infer_cam.json").write_text("{")
  with pytest.raises(UserError, match="unreadable stage report.*rerun infer_cam"):
    artifacts.skipped_by(wd, "infer_cam")


def test_results_have_one_writer(tmp_path):
  wd = artifacts.Workdir(tmp_path)
  artifacts.save_results(wd, {"cam_miou": 0.5}, "| table |")
  artifacts.add_provenance(wd, {"infer_cam": 2.0, "evaluate": 1.25},
                           {"infer_cam": "abc", "evaluate": "def"})
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == {"cam_miou": 0.5, "seconds": 3.2,
                            "stage_seconds": {"infer_cam": 2.0, "evaluate": 1.25},
                            "fingerprints": {"infer_cam": "abc", "evaluate": "def"}}
  assert (tmp_path / "results.md").read_text() == "| table |\n"


def test_artifacts_and_the_dcrf_stage_import_no_jax():
  # The dCRF workers import these modules; JAX would cost each worker seconds and memory.
  code = ("import sys; import affinity_jax.artifacts, affinity_jax.stages.aff_labels; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'tensorflow')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


def test_outputs_cut_short_count_as_missing(tmp_path, capsys):
  wd = artifacts.Workdir(tmp_path)
  artifacts.save_cam(wd.cam("a"), np.ones((4, 4, 1), np.float32), np.array([0]))
  artifacts.save_cam(wd.cam("b"), np.ones((4, 4, 1), np.float32), np.array([0]))
  artifacts.save_label(wd.pseudo_label("a"), np.zeros((4, 4), np.uint8))
  artifacts.save_label(wd.pseudo_label("b"), np.zeros((4, 4), np.uint8))
  for path in (wd.cam("b"), wd.pseudo_label("b")):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
  assert artifacts.looks_whole(wd.cam("a")) and not artifacts.looks_whole(wd.cam("b"))
  assert artifacts.missing(["a", "b", "c"], wd.path(artifacts.CAMS), ".npz") == ["b", "c"]
  assert artifacts.missing(["a", "b"], wd.path(artifacts.PSEUDO_LABELS), ".png") == ["b"]
  assert not os.path.exists(wd.cam("b"))
  assert "is damaged (cut short)" in capsys.readouterr().out


def test_stage_outputs_of_a_workdir_whose_name_looks_like_a_pattern(tmp_path):
  wd = artifacts.Workdir(tmp_path / "run[1]")
  artifacts.save_cam(wd.cam("a"), np.ones((2, 2, 1), np.float32), np.array([0]))
  assert wd.stage_outputs("infer_cam") == [wd.path(artifacts.CAMS)]
  wd.remove_stage_outputs("infer_cam")
  assert not os.path.exists(wd.path(artifacts.CAMS))


def test_written_files_get_the_mode_open_would_give(tmp_path):
  """Not mkstemp's private 0600: others sharing a workdir can read the outputs."""
  path = tmp_path / "x.npz"
  io.save_npz(path, a=np.zeros(3))
  mode = stat.S_IMODE(os.stat(path).st_mode)
  assert mode == 0o666 & ~io._UMASK
  if io._UMASK & 0o044 == 0:  # the usual umasks (022, 002): readable by all
    assert mode & 0o044 == 0o044


def test_strided_cam_is_read_without_the_full_resolution_cam(tmp_path):
  rng = np.random.default_rng(0)
  cam, strided = rng.random((37, 50, 2), np.float32), rng.random((10, 13, 2), np.float32)
  path = str(tmp_path / "a.npz")
  artifacts.save_cam(path, cam, np.array([3, 7]), strided=strided)
  assert io.npz_shapes(path) == {"cam": (37, 50, 2), "class_ids": (2,), "strided": (10, 13, 2)}
  got, ids = artifacts.load_strided_cam(path, (37, 50), 4, num_classes=20)
  np.testing.assert_array_equal(got, strided)
  np.testing.assert_array_equal(ids, [3, 7])
  assert set(io.load_npz(path, keys=("strided", "nothing"))) == {"strided"}
  missing, why = artifacts.load_strided_cam(path, (38, 50), 4, num_classes=20)
  assert missing is None and "CAM is 37x50 but the image is 38x50" in why
  artifacts.save_cam(path, cam, np.array([3, 7]))  # method psa's file: no strided CAMs
  with pytest.raises(UserError, match=r"a\.npz: a CAM file without IRN's stride-4 CAMs"):
    artifacts.load_strided_cam(path, (37, 50), 4, num_classes=20)
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 not a zip")
  with pytest.raises(UserError, match=r"a\.npz: not a readable \.npz file"):
    io.npz_shapes(path)
