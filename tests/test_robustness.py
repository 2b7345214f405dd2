"""Robustness: clear errors for bad inputs, resuming after SIGKILL / SIGTERM, only whole
output files, numerical guards, and skipping (with a report) images a stage cannot use.

Where exit codes, tracebacks or signals matter the real CLI runs in a subprocess; elsewhere
`cli.main` or the stage functions run in-process on the tiny synthetic config or a miniature VOC
tree. Learning rates are lowered (--config.*.lr) so that the few steps here never diverge.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from affinity_jax import artifacts, checkpoint, cli, config as config_lib, data, io
from affinity_jax import random_walk as rw
from affinity_jax.errors import UserError
from affinity_jax.stages import aff_labels, evaluate, infer_cam, random_walk
from affinity_jax.stages.training import init_variables
from tests import _voc_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "synthetic.py:tiny")
VOC = os.path.join(REPO, "configs", "voc_resnet38.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
CAM_STEPS = 6
STABLE = ["--config.cam.lr=0.002", "--config.aff.lr=0.002", "--config.seg.lr=0.002"]


def cli_command(workdir, data_dir, *extra) -> list[str]:
  return [sys.executable, "-m", "affinity_jax.cli", "run", "--config", TINY, "--workdir",
          str(workdir), f"--config.data.data_dir={data_dir}", *STABLE, *extra]


def train_cam_command(workdir, data_dir, stages: str = "train_cam") -> list[str]:
  return cli_command(workdir, data_dir, "--stages", stages, f"--config.cam.steps={CAM_STEPS}",
                     "--config.cam.checkpoint_every=2")


def start(cmd) -> subprocess.Popen:
  return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def saved_steps(workdir) -> list[int]:
  """Finished orbax checkpoints of the CAM network (orbax renames a step's folder into place)."""
  folder = os.path.join(workdir, "cam_net", "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def wait_for(predicate, proc, what: str, timeout: float = 300):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (status {proc.returncode}) before {what}:\n"
                           f"{proc.stdout.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


def read_line_until(proc, needle: str) -> str:
  """Reads the run's output until a line containing `needle`; returns everything read.

  Blocking reads (no select: lines already buffered by the reader would not wake it); the run
  ends, and the read with it, within the stage's few steps.
  """
  seen = []
  for line in iter(proc.stdout.readline, ""):
    seen.append(line)
    if needle in line:
      return "".join(seen)
  proc.wait()
  raise AssertionError(f"no line with {needle!r} (status {proc.returncode}) in:\n"
                       f"{''.join(seen)[-3000:]}")


def assert_same_variables(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny synthetic dataset, prepared once."""
  d = tmp_path_factory.mktemp("tfds")
  data.get_builder("synthetic_wsss", d, config="tiny")
  return d


# ---------------------------------------------------------------------------------------------
# 2 + 3. Interruption: SIGKILL and SIGTERM mid-training, SIGKILL mid-stage.


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, data_dir):
  """An uninterrupted train_cam run, and the same run killed (SIGKILL), resumed and stopped
  (SIGTERM), then resumed with infer_cam added and killed (SIGKILL) once infer_cam has written
  its first CAM file. The uninterrupted run goes alongside, in a second process.
  """
  root = tmp_path_factory.mktemp("interrupt")
  straight_dir, broken_dir = root / "straight", root / "broken"
  straight = start(train_cam_command(straight_dir, data_dir))
  log = {}

  first = start(train_cam_command(broken_dir, data_dir))
  wait_for(lambda: saved_steps(broken_dir), first, "the first checkpoint")
  first.send_signal(signal.SIGKILL)
  log["killed_status"], _ = finish(first)
  log["after_kill"] = saved_steps(broken_dir)

  second = start(train_cam_command(broken_dir, data_dir))
  text = read_line_until(second, "resuming from step")
  resumed_at = int(text.rsplit("resuming from step", 1)[1].split()[0])
  text += read_line_until(second, f"step {resumed_at + 1}/{CAM_STEPS}")
  second.send_signal(signal.SIGTERM)
  log["term_status"], rest = finish(second)
  log["term_output"] = text + rest
  log["resumed_at"] = resumed_at
  log["after_term"] = saved_steps(broken_dir)

  cams = broken_dir / "cams"
  third = start(train_cam_command(broken_dir, data_dir, "train_cam,infer_cam"))
  wait_for(lambda: cams.is_dir() and any(f.endswith(".npz") for f in os.listdir(cams)), third,
           "the first CAM file", timeout=400)
  third.send_signal(signal.SIGKILL)
  log["third_status"], log["third_output"] = finish(third)
  log["straight_status"], log["straight_output"] = finish(straight)
  return straight_dir, broken_dir, log


def test_sigkill_then_rerun_resumes_from_the_last_checkpoint(interrupted):
  _, _, log = interrupted
  assert log["killed_status"] == -signal.SIGKILL
  assert log["after_kill"] and log["resumed_at"] == max(log["after_kill"])


def test_sigterm_saves_a_checkpoint_and_exits_130(interrupted):
  _, _, log = interrupted
  assert log["term_status"] == 130, log["term_output"][-3000:]
  out = log["term_output"]
  assert "stopped by signal" in out and "Run the same command again" in out
  stopped_at = int(out.rsplit("at step", 1)[1].split(";")[0])
  assert stopped_at > log["resumed_at"] and stopped_at in log["after_term"]
  assert "Traceback" not in out


def test_interrupted_run_ends_with_the_same_parameters(interrupted):
  straight_dir, broken_dir, log = interrupted
  assert log["straight_status"] == 0, log["straight_output"][-3000:]
  assert "resuming from step" in log["third_output"]
  a, meta_a = checkpoint.load_variables(str(straight_dir / "cam_net" / "final"))
  b, meta_b = checkpoint.load_variables(str(broken_dir / "cam_net" / "final"))
  assert meta_a == meta_b
  assert_same_variables(a, b)  # bit-identical: same steps, same batches, same compiled step


def test_killed_stage_leaves_only_whole_files_and_rerun_does_the_rest(interrupted, data_dir,
                                                                     capsys):
  _, broken_dir, log = interrupted
  assert log["third_status"] == -signal.SIGKILL
  cams = broken_dir / "cams"
  whole = sorted(f for f in os.listdir(cams) if f.endswith(".npz"))
  assert 0 < len(whole) < 24, "the kill came too late to interrupt the stage"
  for f in whole:  # every file under its final name is complete
    artifacts.load_cam(str(cams / f), num_classes=3)
  before = {f: os.stat(cams / f).st_mtime_ns for f in whole}
  argv = ["run", "--config", TINY, "--workdir", str(broken_dir), "--stages", "infer_cam",
          f"--config.data.data_dir={data_dir}"]
  assert cli.main(argv) == 0
  assert f"wrote {24 - len(whole)} CAM files" in capsys.readouterr().out
  assert all(os.stat(cams / f).st_mtime_ns == t for f, t in before.items())
  assert len(os.listdir(cams)) == 24  # and no temporary file is left


# ---------------------------------------------------------------------------------------------
# 1. Bad inputs: one message naming the file or key, status 2, no traceback unless --debug.


def test_unknown_config_key_subprocess_no_traceback_unless_debug(tmp_path):
  cmd = [sys.executable, "-m", "affinity_jax.cli", "run", "--config", TINY,
         "--workdir", str(tmp_path), "--config.cam.learning_rate=0.1"]
  out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert "cam.learning_rate" in out.stderr and "does not exist" in out.stderr
  assert "Traceback" not in out.stderr and "--debug" in out.stderr
  out = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" in out.stderr and "cam.learning_rate" in out.stderr


def test_a_bug_keeps_its_traceback_and_exit_status_1(tmp_path):
  # Only user errors become one-line messages; a bug (here in a config file's own code) must
  # surface with its traceback, not pose as the user's mistake.
  assert not issubclass(UserError, ValueError)
  config = tmp_path / "buggy.py"
  config.write_text("def get_config(arg=None):\n  return {}['cam']\n")
  cmd = [sys.executable, "-m", "affinity_jax.cli", "run", "--config", str(config),
         "--workdir", str(tmp_path / "w")]
  out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "Traceback" in out.stderr and "KeyError: 'cam'" in out.stderr
  # A config file's ValueError (an unknown variant) is the user's: one message, status 2.
  out = subprocess.run(cmd[:5] + [TINY.replace(":tiny", ":huge")] + cmd[6:], cwd=REPO,
                       env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "unknown variant 'huge'" in out.stderr
  assert "Traceback" not in out.stderr


def _break_mask_size(voc):
  path = voc / "SegmentationClass" / "2007_000002.png"
  with Image.open(path) as im:
    small = im.crop((0, 0, im.width - 3, im.height))
    small.save(path)
  return "2007_000002"


def _list_missing_image(voc):
  os.remove(voc / "JPEGImages" / "2007_000010.jpg")
  return "2007_000010.jpg"


# A file that cannot be decoded costs only its image (tests/test_hostile_inputs.py).
@pytest.mark.parametrize("breakage", [_list_missing_image, _break_mask_size])
def test_bad_dataset_files_are_named_by_the_cli(tmp_path, capsys, breakage):
  root = tmp_path / "manual"
  _voc_tree.make_voc_tree(str(root), with_sbd=False)
  culprit = breakage(root / "VOCdevkit" / "VOC2012")
  argv = ["run", "--config", VOC, "--workdir", str(tmp_path / "w"), "--stages", "train_cam",
          f"--config.data.manual_dir={root}", f"--config.data.data_dir={tmp_path / 'tfds'}"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert culprit in err and "Traceback" not in err
  # Nothing half-prepared is left behind: once the file is fixed, the dataset builds.
  _voc_tree.make_voc_tree(str(root), with_sbd=False)
  builder = data.get_builder("voc2012_aug", tmp_path / "tfds", manual_dir=root)
  assert len(data.split_names(builder, "train")) == 3


def _tiny_variables(width, num_classes=3):
  return {"params": {"fc8": {"kernel": np.zeros((4, num_classes), np.float32)}},
          "batch_stats": {}}


@pytest.mark.parametrize("arch, width, expected", [("affinity", 0.0625, "'affinity' network"),
                                                   ("cam", 0.125, "width 0.125")])
def test_checkpoint_of_the_wrong_architecture_or_width(tmp_path, capsys, data_dir, arch, width,
                                                       expected):
  final = tmp_path / "cam_net" / "final"
  checkpoint.save_variables(str(final), _tiny_variables(width), metadata=dict(
      arch=arch, width=width, num_classes=3, source="test"))
  argv = ["run", "--config", TINY, "--workdir", str(tmp_path), "--stages", "infer_cam",
          f"--config.data.data_dir={data_dir}"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert str(final) in err and expected in err and "Traceback" not in err


@pytest.mark.parametrize("kind, suffix, extra", [("mxnet", ".params", []),
                                                 ("psa-pytorch", ".pth", ["--arch", "cam"])])
def test_weight_file_that_is_not_one(tmp_path, capsys, kind, suffix, extra):
  junk = tmp_path / f"weights{suffix}"
  junk.write_bytes(np.random.default_rng(0).bytes(300))
  assert cli.main(["convert", kind, str(junk), str(tmp_path / "out"), *extra]) == 2
  err = capsys.readouterr().err
  assert str(junk) in err and "Traceback" not in err
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 1. Skip and report: no positive class, a CAM of the wrong size (miniature VOC tree).


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
  """infer_cam -> aff_labels -> random_walk -> evaluate on a VOC tree where 2007_000002 has no
  object in its XML and the CAM of 2007_000001 is for a different image size."""
  root = tmp_path_factory.mktemp("voc")
  _voc_tree.make_voc_tree(str(root / "manual"), with_sbd=False)
  xml = root / "manual" / "VOCdevkit" / "VOC2012" / "Annotations" / "2007_000002.xml"
  text = xml.read_text()
  xml.write_text(text[:text.index("<object>")] + "</annotation>")
  cfg = config_lib.load_config(VOC)
  config_lib.apply_overrides(cfg, [
      f"data.manual_dir={root / 'manual'}", f"data.data_dir={root / 'tfds'}",
      "model.width=0.0625", "data.canvas=(64, 64)", "data.pseudo_splits=('train', 'val')",
      "cam_infer.scales=(1.0,)", "cam_infer.batch_size=2", "aff_labels.workers=1",
      "aff_labels.crf_iters=2", "random_walk.logt=2", "random_walk.batch_size=2",
      "eval.cam_splits=('val', 'train')", "eval.seg_splits=()", "eval.panels=0"])
  cfg.workdir = str(root / "work")
  calibration = np.random.default_rng(0).normal(size=(2, 48, 48, 3)).astype(np.float32)
  for net in (artifacts.CAM_NET, artifacts.AFF_NET):
    variables = init_variables(cfg, net.arch, 48, calibration)
    checkpoint.save_network(cfg, net, variables)
  summaries = {"infer_cam": infer_cam.run(cfg)}
  cam_path = artifacts.Workdir(cfg.workdir).cam("2007_000001")
  io.save_npz(cam_path, cam=np.full((8, 8, 1), 0.5, np.float32), class_ids=np.array([3],
                                                                                    np.int32))
  summaries["aff_labels"] = aff_labels.run(cfg)
  summaries["random_walk"] = random_walk.run(cfg)
  summaries["evaluate"] = evaluate.run(cfg)
  return cfg, summaries


def _report(cfg, stage):
  with open(os.path.join(cfg.workdir, "reports", stage + ".json")) as f:
    return json.load(f)


def test_image_without_positive_class_is_skipped_and_reported(voc_run):
  cfg, summaries = voc_run
  report = _report(cfg, "infer_cam")
  assert report["count"] == summaries["infer_cam"]["skipped"] == 1
  assert "no positive class" in report["skipped"]["2007_000002"]
  assert summaries["infer_cam"]["written"] == 4
  assert not os.path.exists(os.path.join(cfg.workdir, "cams", "2007_000002.npz"))


def test_cam_of_the_wrong_size_is_skipped_and_reported(voc_run):
  cfg, summaries = voc_run
  for stage in ("aff_labels", "random_walk"):
    report = _report(cfg, stage)
    assert summaries[stage]["skipped"] == report["count"] == 2, stage
    assert "no positive class" in report["skipped"]["2007_000002"]
    assert "8x8" in report["skipped"]["2007_000001"]
    assert summaries[stage]["written"] == 3
  assert sorted(os.listdir(os.path.join(cfg.workdir, "pseudo_labels"))) == [
      "2007_000003.png", "2007_000010.png", "2007_000011.png"]


def test_later_stages_leave_out_what_was_skipped(voc_run):
  from affinity_jax.data import pipelines, records
  cfg, summaries = voc_run
  builder = data.from_config(cfg)
  score_dir = os.path.join(cfg.workdir, "aff_labels")
  with pytest.raises(Exception, match="2007_00000"):  # without the report: missing files
    records.check_files(builder, "train", score_dir, ".npz")
  batch = next(pipelines.aff_train(builder, "train", score_dir, batch_size=3, crop_size=48,
                                   exclude=artifacts.skipped_by(artifacts.Workdir(cfg.workdir),
                                                                "aff_labels")))
  assert batch["image"].shape == (3, 48, 48, 3)
  report = _report(cfg, "evaluate")
  assert summaries["evaluate"]["skipped"] == report["count"] == 2
  assert "infer_cam skipped it" in report["skipped"]["2007_000002"]
  assert "8x8" in report["skipped"]["2007_000001"]  # the stale CAM itself, and its walk
  assert "random_walk skipped it" in report["skipped"]["2007_000001"]
  assert summaries["evaluate"]["cam_miou"] >= 0.0


# ---------------------------------------------------------------------------------------------
# 4. Numerical guards.


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path, data_dir, capsys):
  argv = ["run", "--config", TINY, "--workdir", str(tmp_path), "--stages", "train_cam",
          f"--config.data.data_dir={data_dir}", "--config.cam.lr=1e12", "--config.cam.steps=6",
          "--config.cam.checkpoint_every=1"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "loss is" in err and "at step" in err and "--config.cam.lr" in err
  assert "last good checkpoint is step" in err and "Traceback" not in err
  assert not os.path.exists(tmp_path / "cam_net" / "final")


def test_diverged_cam_network_is_refused_by_infer_cam(tmp_path, data_dir, capsys, interrupted):
  straight_dir, _, _ = interrupted
  variables, meta = checkpoint.load_variables(str(straight_dir / "cam_net" / "final"))
  variables["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), variables["params"])
  checkpoint.save_variables(str(tmp_path / "cam_net" / "final"), variables, metadata=meta)
  argv = ["run", "--config", TINY, "--workdir", str(tmp_path), "--stages", "infer_cam",
          f"--config.data.data_dir={data_dir}"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "non-finite CAMs" in err and "cam.lr" in err and "Traceback" not in err
  cams = tmp_path / "cams"
  assert not cams.exists() or not [f for f in os.listdir(cams) if not f.startswith(".")]


@pytest.mark.parametrize("case", ["zero_cam", "isolated", "far_features"])
def test_random_walk_output_is_finite(case):
  h, w, radius = 6, 7, 3
  rng = np.random.default_rng(0)
  features = rng.normal(size=(1, h, w, 8)).astype(np.float32)
  cam = rng.uniform(size=(1, h, w, 3)).astype(np.float32)
  valid = np.ones((1, h, w), bool)
  if case == "zero_cam":
    cam[:] = 0.0
  elif case == "isolated":  # one valid position with no valid neighbour
    valid[:] = False
    valid[0, 2, 3] = True
  else:  # affinities underflow to 0: a row of the transition matrix has nothing in it
    features *= 1e4
  walked = rw.random_walk(features, cam, radius=radius, beta=8.0, t=8, valid=valid)
  walked = np.asarray(walked)
  assert walked.shape == (1, h, w, 3) and np.all(np.isfinite(walked))
  if case == "zero_cam":
    np.testing.assert_array_equal(walked, 0.0)
  if case == "isolated":
    np.testing.assert_allclose(walked[0, 2, 3], cam[0, 2, 3], rtol=1e-6)
