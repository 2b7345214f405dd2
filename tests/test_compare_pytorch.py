"""The scripts that compare with the PyTorch original: argument checks and parity.

experiments/compare_pytorch.py (parity) and experiments/benchmark_models.py (speed) check their
arguments before torch is imported, so those tests need no torch.

The parity tests need torch and a checkout of github.com/jiwoon-ahn/psa named by the
environment variable PSA_ROOT; without them they are skipped. They run the script's own code
paths (a subprocess, so that its process-wide torch patch stays out of this one) with the
original's full-width networks on random weights: the networks at one small non-square size,
checking the targets of the comparison; and `--stages --quick`, the original's infer_cls.py and
infer_aff.py against our stages through our CLI on four small VOC-shaped JPEGs (a few minutes
on two cores), checking that every figure is reported.
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
  for flag in ("--psa-root", "--parts", "--settings", "--cam-batch", "--cam-crop", "--aff-batch",
               "--aff-crop", "--infer-size", "--dtypes", "--peak-tflops", "--steps", "--repeats",
               "--warmup", "--threads", "--json", "--flops-only"):
    assert flag in res.stdout


def test_speed_script_runs_without_tensorflow_or_the_original(tmp_path):
  """What a GPU machine without TensorFlow and tfds runs: ours only, figures in the JSON."""
  out = tmp_path / "speed.json"
  args = ["--parts", "cam_train,aff_infer", "--width", "0.03125", "--cam-batch", "2",
          "--cam-crop", "72", "--infer-size", "72x80", "--repeats", "1", "--warmup", "0",
          "--peak-tflops", "1"]
  res = _run_speed_script(*args, "--json", str(out))
  results = json.loads(out.read_text())
  assert results["torch"] is None and results["settings"]["cam_batch"] == 2
  rows = {(r["part"], r["dtype"]): r for r in results["rows"]}
  assert set(rows) == {(p, d) for p in ("cam_train", "aff_infer") for d in ("float32", "bfloat16")}
  for row in rows.values():
    assert row["jax_s"] > 0 and row["ratio"] is None and row["gflop"] > 0
    assert 0 < row["jax_mfu"] < 1
  # The same arithmetic in either dtype: XLA counts about the same FLOPs.
  f32, bf16 = rows[("cam_train", "float32")]["gflop"], rows[("cam_train", "bfloat16")]["gflop"]
  assert abs(f32 - bf16) / f32 < 0.1
  assert "| measurement | dtype |" in res.stdout
  # --flops-only: the same counts (3 training steps: 3 times one step's), nothing run.
  counted = tmp_path / "flops.json"
  _run_speed_script(*args, "--steps", "3", "--flops-only", "--json", str(counted))
  count_rows = {(r["part"], r["dtype"]): r for r in json.loads(counted.read_text())["rows"]}
  assert set(count_rows) == set(rows)
  for key, row in count_rows.items():
    assert row["jax_s"] is None and row["jax_mfu"] is None
    steps = 3 if key[0] == "cam_train" else 1
    assert row["gflop"] == pytest.approx(steps * rows[key]["gflop"], rel=1e-6)
    if key[0] == "cam_train":
      assert row["first_loss_jax"] is None and "3 steps" in row["name"]


def _run_speed_script(*args):
  """The speed script in a child process where TensorFlow, tfds and ml_collections cannot be
  imported, as on a GPU machine that has none of them."""
  code = ("import runpy, sys\n"
          "for m in ('tensorflow', 'tensorflow_datasets', 'ml_collections'): sys.modules[m] = None\n"
          f"sys.argv = [{SPEED_SCRIPT!r}, *{list(args)!r}]\n"
          f"sys.path.insert(0, {os.path.dirname(SPEED_SCRIPT)!r})\n"
          f"runpy.run_path({SPEED_SCRIPT!r}, run_name='__main__')\n")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("PSA_ROOT", None)
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=env, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def test_help_describes_the_comparison():
  res = _run("--help")
  assert res.returncode == 0
  for flag in ("--psa-root", "--weights-cam", "--weights-aff", "--device", "--quick",
               "--stages", "--canvas", "--workdir", "--json", "--parallel"):
    assert flag in res.stdout


def test_stage_options_are_checked_before_any_work(tmp_path):
  root = _fake_checkout(tmp_path)
  res = _run("--psa-root", root, "--canvas", "512x512")
  assert res.returncode == 2 and "go with --stages" in res.stderr
  for name in ("network/vgg16d.py", "network/vgg16_cls.py", "network/vgg16_aff.py"):
    (tmp_path / name).write_text("")
  res = _run("--psa-root", root, "--stages", "--backbone", "vgg16")
  assert res.returncode == 2 and "leave --backbone" in res.stderr
  res = _run("--psa-root", root, "--stages", "--sizes", "600x400")
  assert res.returncode == 2 and "--canvas" in res.stderr and "512x512" in res.stderr


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


def test_stage_parity_with_the_original(tmp_path):
  psa_root = os.environ.get("PSA_ROOT")
  if not psa_root:
    pytest.skip("set PSA_ROOT to a checkout of github.com/jiwoon-ahn/psa to compare with it")
  pytest.importorskip("torch", reason="the comparison with the PyTorch original needs torch")
  pytest.importorskip("pydensecrf", reason="both sides' dCRF needs pydensecrf (pydensecrf2)")
  out = tmp_path / "figures.json"
  res = _run("--psa-root", psa_root, "--stages", "--quick", "--parallel", "--workdir",
             str(tmp_path / "work"), "--json", str(out), timeout=1200)
  assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
  lines = res.stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("image "))
  names = [f"2011_{i:06d}" for i in range(4)]
  for name, line in zip(names, lines[header + 2: header + 6]):
    assert line.startswith(name), line
  assert any(line.startswith("targets (") for line in lines)
  results = json.loads(lines[-1])
  assert results == json.loads(out.read_text())
  assert results["mode"] == "stages" and sorted(results["images"]) == names
  for name, r in results["images"].items():
    assert len(r["classes"]) == 1 + int(name[-1]) % 2 == len(r["cam_max_rel"]), (name, r)
    for v in r["cam_max_rel"].values():
      assert 0 <= v["border"] <= v["all"] < float("inf"), (name, r)
    for key in ("la_equal_pct", "ha_equal_pct", "rw_equal_pct"):
      assert 0 <= r[key]["all"] <= 100 and 0 <= r[key]["border"] <= 100, (name, key, r)
  # The original's walk must move labels for equal walks to mean something.
  assert max(r["rw_moved_pct"] for r in results["images"].values()) > 1.0
  # CAMs within 1e-4, la / ha / random-walk labels equal on >= 99.9% of every image and band.
  assert results["targets_met"] == dict.fromkeys(("cam", "la", "ha", "rw", "all"), True), results
