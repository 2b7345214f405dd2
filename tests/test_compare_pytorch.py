"""experiments/compare_pytorch.py: argument checks, and parity with the PyTorch original.

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


def _run(*args, timeout=60):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


def test_missing_psa_root_is_a_clear_error(tmp_path):
  missing = str(tmp_path / "no_such_checkout")
  res = _run("--psa-root", missing)
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
  for name in ("network/resnet38d.py", "network/resnet38_cls.py", "network/resnet38_aff.py",
               "tool/pyutils.py", "tool/torchutils.py", "voc12/data.py"):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("")
  return str(root)


def test_bad_size_weights_or_parts_are_clear_errors(tmp_path):
  root = _fake_checkout(tmp_path)
  res = _run("--psa-root", root, "--sizes", "16x16")
  assert res.returncode == 2 and "16x16" in res.stderr and "H >= 33" in res.stderr
  res = _run("--psa-root", root, "--sizes", "300")
  assert res.returncode == 2 and "expected HxW" in res.stderr
  missing = str(tmp_path / "res38_cls.pth")
  res = _run("--psa-root", root, "--weights-cam", missing)
  assert res.returncode == 2 and "--weights-cam" in res.stderr and missing in res.stderr
  res = _run("--psa-root", root, "--speed-parts", "cam,walk")
  assert res.returncode == 2 and "--speed-parts" in res.stderr and "'cam,walk'" in res.stderr


def test_help_describes_the_comparison():
  res = _run("--help")
  assert res.returncode == 0
  for flag in ("--psa-root", "--weights-cam", "--weights-aff", "--device", "--quick",
               "--parity-only"):
    assert flag in res.stdout


def test_parity_with_the_original():
  psa_root = os.environ.get("PSA_ROOT")
  if not psa_root:
    pytest.skip("set PSA_ROOT to a checkout of github.com/jiwoon-ahn/psa to compare with it")
  pytest.importorskip("torch", reason="the comparison with the PyTorch original needs torch")
  res = _run("--psa-root", psa_root, "--quick", "--parity-only", "--sizes", "72x104",
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
