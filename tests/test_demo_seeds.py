"""experiments/demo_seeds.py: its table, targets and reuse of finished runs, without a pipeline.

Runs are hand-made results.json dicts; the command runner is a fake that records its calls and
writes what a finished run would (results.json, and config.json as the pipeline records it).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "demo_seeds.py")

_spec = importlib.util.spec_from_file_location("demo_seeds", SCRIPT)
demo_seeds = importlib.util.module_from_spec(_spec)
sys.modules["demo_seeds"] = demo_seeds  # dataclasses look their module up there
_spec.loader.exec_module(demo_seeds)

NAMES = ["background", "red", "spring", "azure"]


def _results(cam, rw, seg, rw_iou, tag="a"):
  """A finished run's results.json: mIoUs and per-class IoU after the walk as fractions."""
  return {
      "cam_miou": cam, "rw_miou": rw, "seg_miou": seg, "seconds": 70.0,
      "splits": {"val": {"cam": {"miou": cam, "iou": [cam] * 4},
                         "rw": {"miou": rw, "iou": list(rw_iou)},
                         "seg": {"miou": seg, "iou": [seg] * 4}}},
      "fingerprints": {"evaluate": f"eval-{tag}", "train_cam": f"cam-{tag}"},
      "class_names": NAMES,
  }


def _row(seed, results):
  record = {"seed": seed, "isa": "native", "isa_used": "AVX512", "wall_s": 100.0 + seed}
  results = dict(results, seconds=70.0 + 2 * seed)
  return demo_seeds.run_row(f"seed{seed}-native", record, results, NAMES)


# Run 0 meets every target; run 1 misses the lift (9), seg >= RW (-1) and a class (red 35).
RUN0 = _results(0.40, 0.55, 0.58, [0.90, 0.50, 0.45, 0.60], "0")
RUN1 = _results(0.42, 0.51, 0.50, [0.88, 0.35, 0.50, 0.55], "1")


def test_row_mean_range_and_smallest_class():
  rows = [_row(0, RUN0), _row(1, RUN1)]
  assert rows[0]["lift"] == pytest.approx(15.0) and rows[0]["seg_minus_rw"] == pytest.approx(3.0)
  assert (rows[0]["worst_class"], rows[0]["worst_iou"]) == ("spring", pytest.approx(45.0))
  assert (rows[1]["worst_class"], rows[1]["worst_iou"]) == ("red", pytest.approx(35.0))
  mean, spread = demo_seeds.summary(rows)
  assert mean["cam"] == pytest.approx(41.0) and mean["rw"] == pytest.approx(53.0)
  assert mean["seg"] == pytest.approx(54.0) and mean["lift"] == pytest.approx(12.0)
  assert mean["wall_s"] == pytest.approx(100.5) and spread["stage_s"] == pytest.approx(2.0)
  assert spread["cam"] == pytest.approx(2.0) and spread["rw"] == pytest.approx(4.0)
  assert spread["seg"] == pytest.approx(8.0) and spread["worst_iou"] == pytest.approx(10.0)
  by_class = {name: (m, lo, run) for name, m, lo, run in demo_seeds.per_class(rows)}
  assert by_class["red"] == (pytest.approx(42.5), pytest.approx(35.0), "seed1-native")
  assert by_class["spring"] == (pytest.approx(47.5), pytest.approx(45.0), "seed0-native")


def test_targets_met_and_missed_with_their_numbers():
  lines = [c.line() for c in demo_seeds.checks([_row(0, RUN0), _row(1, RUN1)])]
  assert lines[0].startswith("- [MISSED] RW lift >= 10 on every run: min +9.0 (seed1-native)")
  assert lines[1].startswith("- [MISSED] segmentation >= CAM+RW on every run: "
                             "min Seg - RW -1.0 (seed1-native)")
  assert lines[2] == ("- [MISSED] spread of each row <= 2 points: max - min over 2 run(s): "
                      "CAM 2.0, CAM + RW 4.0, Segmentation 8.0")
  assert lines[3] == ("- [MISSED] no class under 40 IoU after the walk: "
                      "min 35.0: red in seed1-native")
  alone = demo_seeds.checks([_row(0, RUN0)])
  assert all(c.met for c in alone), [c.line() for c in alone]
  assert alone[3].line() == ("- [met] no class under 40 IoU after the walk: "
                             "min 45.0: spring in seed0-native")


def test_render_has_a_row_per_run_mean_range_classes_and_targets():
  text = demo_seeds.render([_row(0, RUN0), _row(1, RUN1)], machine="a CPU", command="cmd",
                           failed=["seed2-AVX2"])
  lines = text.splitlines()
  assert "| seed0-native | 0 | native | AVX512 | 100 | 70 | 40.0 | 55.0 | 58.0 | 15.0 | 3.0 " \
         "| 45.0 | spring |" in lines
  assert "| mean |  |  |  | 100 | 71 | 41.0 | 53.0 | 54.0 | 12.0 | 1.0 | 40.0 |  |" in lines
  assert "| range |  |  |  | 1 | 2 | 2.0 | 4.0 | 8.0 | 6.0 | 4.0 | 10.0 |  |" in lines
  assert "| red | 42.5 | 35.0 | seed1-native |" in lines
  assert sum(line.startswith("- [") for line in lines) == 4
  assert lines[0] == "Machine: a CPU" and "Failed (left out): seed2-AVX2" in lines


def test_isa_names_flags_and_what_the_cpu_allows():
  assert demo_seeds.parse_isa("avx2") == "AVX2" and demo_seeds.parse_isa("Native") == "native"
  with pytest.raises(demo_seeds.UsageError, match="AVX3"):
    demo_seeds.parse_isa("AVX3")
  env = demo_seeds.child_env("AVX2", {"XLA_FLAGS": "--xla_foo=1", "HOME": "/h"})
  assert env == {"XLA_FLAGS": "--xla_foo=1 --xla_cpu_max_isa=AVX2", "HOME": "/h",
                 "ONEDNN_MAX_CPU_ISA": "AVX2"}
  assert demo_seeds.child_env("AVX512", {})["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
  assert "ONEDNN_MAX_CPU_ISA" not in demo_seeds.child_env("SVE", {})
  assert demo_seeds.child_env("native", {"HOME": "/h"}) == {"HOME": "/h"}
  avx512 = {"sse4_2", "avx", "avx2", "avx512f", "avx512_vnni"}
  cpuinfo = "processor\t: 0\nmodel name\t: Some EPYC\nflags\t\t: " + " ".join(avx512) + "\n"
  assert demo_seeds.cpu_flags(cpuinfo) == avx512 and demo_seeds.cpu_model(cpuinfo) == "Some EPYC"
  assert demo_seeds.isa_used("", avx512) == "AVX512"
  assert demo_seeds.isa_used("--xla_cpu_max_isa=AVX2", avx512) == "AVX2"
  assert demo_seeds.isa_used("--xla_cpu_max_isa=avx --xla_cpu_max_isa=AVX512_BF16",
                             avx512) == "AVX512_VNNI"
  assert demo_seeds.isa_used("--xla_cpu_max_isa=AVX512", {"sse4_2", "avx", "avx2"}) == "AVX2"
  assert demo_seeds.isa_used("", set()) == "unknown"


class FakeRunner:
  """Records each command; writes the results.json of `results` and the config.json of the
  command's config (or fails with `status`)."""

  def __init__(self, results=RUN0, status=0):
    self.calls, self.results, self.status = [], results, status

  def __call__(self, argv, env, log_path):
    self.calls.append((argv, env))
    if self.status == 0:
      workdir = argv[argv.index("--workdir") + 1]
      config = argv[argv.index("--config") + 1]
      seed = int(argv[argv.index("--workdir") + 2].split("=")[1])
      overrides = [a[len("--config."):] for a in argv[argv.index("--workdir") + 3:]]
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(self.results, f)
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(demo_seeds.run_config(config, overrides, seed), f)
    return demo_seeds.Outcome(self.status, ["last line"])


def test_a_finished_run_is_reused_and_a_changed_one_is_run(tmp_path):
  root, spec = str(tmp_path), demo_seeds.Spec(0, "AVX2")
  runner = FakeRunner()
  environ = {"XLA_FLAGS": "--xla_foo=1"}
  record, outcome = demo_seeds.run_one(spec, root, "synthetic:tiny", ["cam.steps=5"],
                                       runner=runner, environ=environ)
  assert outcome is None and len(runner.calls) == 1
  argv, env = runner.calls[0]
  assert argv[1:] == ["-m", "affinity_jax.cli", "run", "--config", "synthetic:tiny",
                      "--workdir", os.path.join(root, "seed0-AVX2"), "--config.seed=0",
                      "--config.cam.steps=5"]
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_cpu_max_isa=AVX2"
  saved = json.loads((tmp_path / "seed0-AVX2" / "demo_seeds.json").read_text())
  assert saved == record and saved["seed"] == 0 and saved["isa"] == "AVX2"
  assert saved["xla_flags"] == env["XLA_FLAGS"] and len(saved["results_sha256"]) == 64

  def again(overrides=("cam.steps=5",), config="synthetic:tiny"):
    return demo_seeds.run_one(spec, root, config, list(overrides), runner=runner,
                              environ=environ)[0]

  # The same run again, also named by the config's path: its record, config.json and
  # results.json match, so no command.
  assert again() == record and len(runner.calls) == 1
  assert again(config=os.path.join(REPO, "configs", "synthetic.py:tiny")) == record
  assert len(runner.calls) == 1
  # Another config (as an edited config file gives), or a results.json that another run
  # replaced, or no record: run again.
  again(["cam.steps=6"])
  assert len(runner.calls) == 2
  with open(tmp_path / "seed0-AVX2" / "results.json", "w") as f:
    json.dump(RUN1, f)
  again(["cam.steps=6"])
  assert len(runner.calls) == 3
  (tmp_path / "seed0-AVX2" / "demo_seeds.json").unlink()
  again(["cam.steps=6"])
  assert len(runner.calls) == 4
  # The other ISA has a workdir of its own.
  demo_seeds.run_one(demo_seeds.Spec(0, "native"), root, "synthetic:tiny", ["cam.steps=6"],
                     runner=runner, environ=environ)
  assert len(runner.calls) == 5 and runner.calls[-1][1] == environ


def test_a_failed_run_stops_the_script_unless_keep_going(tmp_path, capsys):
  failing = FakeRunner(status=1)
  args = ["--config", "synthetic:tiny", "--seeds", "0,1", "--isa", "native,AVX2",
          "--workdir-root", str(tmp_path)]
  assert demo_seeds.main(args, runner=failing) == 1
  assert len(failing.calls) == 1 and "last line" in capsys.readouterr().err
  assert not (tmp_path / "seed0-native" / "demo_seeds.json").exists()
  failing = FakeRunner(status=1)
  assert demo_seeds.main(args + ["--keep-going"], runner=failing) == 1
  assert len(failing.calls) == 4


def test_main_runs_each_seed_and_isa_then_writes_the_table(tmp_path, capsys):
  runner = FakeRunner()
  args = ["--config", "synthetic:tiny", "--seeds", "3", "--isa", "native,sse4_2",
          "--workdir-root", str(tmp_path), "--set", "cam.steps=5", "aff.steps=4"]
  assert demo_seeds.main(args, runner=runner) == 0
  assert [a[a.index("--workdir") + 1] for a, _ in runner.calls] == [
      str(tmp_path / "seed3-native"), str(tmp_path / "seed3-SSE4_2")]
  assert all(a[-2:] == ["--config.cam.steps=5", "--config.aff.steps=4"] for a, _ in runner.calls)
  table = (tmp_path / "demo_seeds.md").read_text()
  assert table in capsys.readouterr().out
  assert "| seed3-SSE4_2 | 3 | SSE4_2 |" in table and "| range |" in table
  assert "| spring |" in table  # the class names evaluate recorded in results.json
  assert demo_seeds.main(args, runner=runner) == 0 and len(runner.calls) == 2  # all reused


def test_class_names_come_from_the_results_or_are_numbered():
  assert demo_seeds.class_names(RUN0, 4) == NAMES
  older = {k: v for k, v in RUN0.items() if k != "class_names"}  # evaluate before the record
  assert demo_seeds.class_names(older, 4) == ["class 0", "class 1", "class 2", "class 3"]
  assert demo_seeds.class_names(RUN0, 5)[-1] == "class 4"  # a list that does not fit


def test_bad_arguments_are_usage_errors(tmp_path):
  for bad in (["--seeds", "0,x"], ["--isa", "AVX3"], ["--set", "seed=1"], ["--set", "novalue"],
              ["--set", "cam.no_such_key=1"], ["--config", "no_such_config"]):
    with pytest.raises(SystemExit) as e:
      demo_seeds.main(bad + ["--workdir-root", str(tmp_path)], runner=FakeRunner())
    assert e.value.code == 2


def test_the_script_imports_neither_jax_nor_tensorflow():
  code = ("import importlib.util, sys; "
          f"s = importlib.util.spec_from_file_location('m', {SCRIPT!r}); "
          "m = sys.modules['m'] = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
          "print(sorted(k for k in ('jax', 'tensorflow', 'flax') if k in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"
