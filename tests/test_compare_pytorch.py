"""The scripts that compare with the PyTorch original: argument checks and parity.

experiments/compare_pytorch.py (parity) and experiments/benchmark_models.py (speed) check their
arguments before torch is imported, so those tests need no torch.

The parity test needs torch and a checkout of github.com/jiwoon-ahn/psa named by the environment
variable PSA_ROOT; without them it is skipped. It runs the script's own code paths (a subprocess,
so that its process-wide torch patch stays out of this one) at one small non-square size with
the original's full-width networks on random weights, and checks the targets of the comparison.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "compare_pytorch.py")
SPEED_SCRIPT = os.path.join(ROOT, "experiments", "benchmark_models.py")


def _run(*args, timeout=60, script=SCRIPT):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("script", [SCRIPT, SPEED_SCRIPT])
def test_missing_psa_root_is_a_clear_error(tmp_path, script):
  missing = str(tmp_path / "no_such_checkout")
  res = _run("--psa-root", missing, script=script)
  assert res.returncode == 2
  assert "--psa-root" in res.stderr and missing in res.stderr and "no such folder" in res.stderr


def test_folder_that_is_not_the_original_is_named_with_its_missing_files(tmp_path):
  (tmp_path / "network").mkdir()
  (tmp_path / "network" / "resnet38d.py").write_text("")
  res = _run("--psa-root", str(tmp_path))
  assert res.returncode == 2
  assert str(tmp_path) in res.stderr
  assert "network/resnet38_cls.py" in res.stderr and "tool/pyutils.py" in res.stderr
  assert "network/resnet38d.py" not in res.stderr.split("missing", 1)[1]


def _fake_checkout(root):
  """The files the scripts check for, empty (argument checks run before they are imported)."""
  for name in ("network/resnet38d.py", "network/resnet38_cls.py", "network/resnet38_aff.py",
               "tool/pyutils.py", "tool/torchutils.py", "voc12/data.py"):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("")
  return str(root)


def test_bad_size_or_weights_are_clear_errors(tmp_path):
  root = _fake_checkout(tmp_path)
  res = _run("--psa-root", root, "--sizes", "16x16")
  assert res.returncode == 2 and "16x16" in res.stderr and "H >= 33" in res.stderr
  res = _run("--psa-root", root, "--sizes", "300")
  assert res.returncode == 2 and "expected HxW" in res.stderr
  missing = str(tmp_path / "res38_cls.pth")
  res = _run("--psa-root", root, "--weights-cam", missing)
  assert res.returncode == 2 and "--weights-cam" in res.stderr and missing in res.stderr


def test_bad_parts_is_a_clear_error(tmp_path):
  res = _run("--psa-root", _fake_checkout(tmp_path), "--parts", "cam,walk", script=SPEED_SCRIPT)
  assert res.returncode == 2 and "--parts" in res.stderr and "'cam,walk'" in res.stderr


def test_speed_script_help_lists_the_flags():
  res = _run("--help", script=SPEED_SCRIPT)
  assert res.returncode == 0
  for flag in ("--psa-root", "--parts", "--cam-sizes", "--train-batch", "--train-crop",
               "--repeats", "--warmup", "--threads", "--seed"):
    assert flag in res.stdout


def test_help_describes_the_comparison():
  res = _run("--help")
  assert res.returncode == 0
  for flag in ("--psa-root", "--weights-cam", "--weights-aff", "--device", "--quick"):
    assert flag in res.stdout


def test_parity_with_the_original():
  psa_root = os.environ.get("PSA_ROOT")
  if not psa_root:
    pytest.skip("set PSA_ROOT to a checkout of github.com/jiwoon-ahn/psa to compare with it")
  pytest.importorskip("torch", reason="the comparison with the PyTorch original needs torch")
  res = _run("--psa-root", psa_root, "--quick", "--sizes", "72x104",
             "--ms-size", "40x72", timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  results = json.loads(res.stdout.strip().splitlines()[-1])
  rel = {k: v for k, v in results.items() if k.endswith("_max_rel")}
  # logits, CAM and affinities at 72x104, and the multi-scale CAM.
  assert len(rel) == 4, sorted(results)
  for key, value in rel.items():
    assert value <= 1e-4, (key, value)
  assert results["rw_labels_identical_pct"] >= 99.9
  assert results["rw_scores_max_abs"] <= 1e-4
  # The walk must actually move labels for "identical" to mean something.
  assert results["rw_walk_moved_cells_pct"] > 1.0
