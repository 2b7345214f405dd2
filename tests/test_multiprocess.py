"""Multi-process runs for real: 2 processes x 2 CPU devices (affinity-jax launch, JAX's
distributed runtime, gloo collectives) against 1 process x 4 devices, through the CLI.

The tiny synthetic config with images of 48..72 pixels on a 64 x 64 canvas, so that
infer_cam skips some images of each process's share (and the later stages skip them too):
the skip reports must merge both processes' images.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from affinity_jax import artifacts, checkpoint
from affinity_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_IMAGE = ("infer_cam", "aff_labels", "random_walk", "infer_seg", "evaluate")
NETWORKS = ("cam_net", "aff_net", "seg_net")

CONFIG = """
import importlib.util

def get_config(arg=None):
  spec = importlib.util.spec_from_file_location("_synthetic", {synthetic!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  c.data.data_dir = {data_dir!r}
  c.data.options = {{"config": "tiny", "size_range": (48, 72)}}
  for net in (c.cam, c.aff, c.seg):
    # A global batch over 4 devices. SGD: Adam's normalisation would blow the rounding of the
    # gradients' sums up to the size of a step wherever a gradient is near 0.
    net.update(dict(batch_size=4, optimizer="sgd", lr=0.01))
  # Each network from its own initialisation: a training's inputs are then the same files in
  # both runs (not a CAM network that differs in its last bits).
  c.init.from_cam_net = False
  # AffinityNet's affinities are exp(-mean |f_i - f_j|): where two features are about equal,
  # the sign of their difference, hence the gradient, follows the last bit, so from its second
  # step on a rounding difference of the gradients' sums grows to ~lr (1e-3 here). One step
  # compares the global batch and the gradient itself.
  c.aff.steps = 1
  # The CAM network from a random initialisation at this rate: its loss went 0.88, 0.71, then
  # 4.0-4.4 at step 3, and there the last-bit difference of step 1's gradient sums had grown to
  # 1.3e-6 of a parameter with YNNPACK's convolutions and 7e-5 with Eigen's, while the two
  # layouts ran the same compiled step (RESULTS.md, "YNNPACK's convolutions"). Its trainings are
  # compared after one step too; the segmentation network's three steps check the later global
  # batches. (The other stages keep its three steps: after one, its CAMs' low peaks enlarged the
  # layouts' rounding differences in the affinity labels to 6e-4.)
  if arg == "one_step":
    c.cam.steps = 1
  if arg == "long":  # long enough to be killed in the middle
    c.cam.update(dict(steps=12, checkpoint_every=2))
  c.heartbeat_timeout_s = 10
  c.barrier_timeout_s = 120.0
  return c
"""


def _env(devices=None):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  if devices:
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
  return env


def _one_process(config, workdir, stages="all", devices=4):
  out = subprocess.run(
      [sys.executable, "-m", "affinity_jax.cli", "run", "--config", config, "--workdir",
       str(workdir), "--stages", stages], env=_env(devices=devices), capture_output=True,
      text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def _launch_argv(config, workdir, stages="all"):
  return [sys.executable, "-m", "affinity_jax.cli", "launch", "--processes", "2",
          "--cpu-devices", "2", "--grace", "60", "--", "run", "--config", config,
          "--workdir", str(workdir), "--stages", stages]


def _two_processes(config, workdir, stages="all"):
  out = subprocess.run(_launch_argv(config, workdir, stages), env=_env(), capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def _variables(workdir, net):
  variables, _ = checkpoint.load_variables(os.path.join(workdir, net, "final"))
  return variables


def _max_difference(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _copy_without(source, target, stages):
  shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock*"))
  workdir = artifacts.Workdir(str(target))
  for stage in stages:
    workdir.remove_stage_outputs(stage)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  folder = tmp_path_factory.mktemp("multiprocess")
  path = folder / "config.py"
  path.write_text(CONFIG.format(synthetic=os.path.join(REPO, "configs", "synthetic.py"),
                                data_dir=str(folder / "tfds")))
  return str(path)


@pytest.fixture(scope="module")
def single(config, tmp_path_factory):
  """All stages on 1 process x 4 devices."""
  workdir = tmp_path_factory.mktemp("one_process")
  _one_process(config, workdir)
  return workdir


@pytest.mark.xdist_group("multiprocess")  # one worker: one single-process run
def test_trainings_on_two_processes_give_the_single_process_parameters(config, single,
                                                                         tmp_path):
  """The same global batches on 2 x 2 devices as on 1 x 4: AffinityNet and the segmentation
  network from the single-process run's inputs (its affinity labels and pseudo labels), the
  CAM network for one step in a run of its own on each layout."""
  workdir, cam_one, cam_two = tmp_path / "two", tmp_path / "cam_one", tmp_path / "cam_two"
  later = ("train_aff", "train_seg")
  _copy_without(single, workdir, later)
  log = _two_processes(config, workdir, ",".join(later))
  assert "== 2 processes, 4 devices (2 per process)" in log
  _one_process(config + ":one_step", cam_one, "train_cam")
  _two_processes(config + ":one_step", cam_two, "train_cam")
  runs = {"cam_net": (cam_one, cam_two), "aff_net": (single, workdir),
          "seg_net": (single, workdir)}
  for net in NETWORKS:
    a, b = runs[net]
    difference = _max_difference(_variables(a, net), _variables(b, net))
    print(f"{net}: largest parameter difference {difference:.2e}")
    # Only the order of the gradients' cross-device sums differs.
    assert difference < 1e-5, net


def _files(folder):
  return sorted(f for f in os.listdir(folder) if not f.startswith("."))


def _largest_difference(a, b, folder):
  """(files, byte-identical files, largest difference of the .npz arrays) of `folder` in two
  workdirs, which must hold the same files; label maps must be identical to the byte."""
  names = _files(a / folder)
  assert names and names == _files(b / folder), folder
  same, largest = 0, 0.0
  for name in names:
    x, y = a / folder / name, b / folder / name
    if x.read_bytes() == y.read_bytes():
      same += 1
      continue
    assert name.endswith(".npz"), f"{folder}/{name} differs"
    with np.load(x) as p, np.load(y) as q:
      assert p.files == q.files
      for key in p.files:
        assert p[key].dtype == q[key].dtype and p[key].shape == q[key].shape
        largest = max(largest, float(np.max(np.abs(p[key] - q[key]))))
  return len(names), same, largest


@pytest.mark.xdist_group("multiprocess")  # one worker: one single-process run
def test_per_image_stages_on_two_processes_write_the_single_process_files(config, single,
                                                                          tmp_path):
  """With the single-process run's networks, 2 processes x 2 devices write the files of 1
  process x 2 devices to the byte, one merged skip report per stage and the same
  results.json; and within float rounding those of 1 process x 4 devices."""
  workdir, reference = tmp_path / "two", tmp_path / "one"
  _copy_without(single, workdir, PER_IMAGE)
  _copy_without(single, reference, PER_IMAGE)
  log = _two_processes(config, workdir, ",".join(PER_IMAGE))
  assert log.count("| stage | split | mIoU (%) |") == 1  # process 0 prints, once
  _one_process(config, reference, ",".join(PER_IMAGE), devices=2)
  # The PSA config's stages write every per-image folder but IRN's instances.
  folders = [f for f in artifacts.PER_IMAGE_FOLDERS if f != artifacts.INSTANCES]
  assert not (workdir / artifacts.INSTANCES).exists()
  for folder in folders:
    files, same, _ = _largest_difference(reference, workdir, folder)
    print(f"{folder}: {same} of {files} files byte-identical to 1 process x 2 devices")
    assert same == files, folder
    files, same, largest = _largest_difference(single, workdir, folder)
    print(f"{folder}: against 1 process x 4 devices {same} of {files} byte-identical, largest "
          f"difference {largest:.1e}")
    # XLA:CPU compiles a process's programme a little differently for another number of
    # devices in the process (tests/test_local_devices.py): a few units in the last place of
    # the CAMs, which a class's normalisation by a low peak enlarges to ~1e-6.
    assert largest < 1e-5, folder
  skipped = {}
  for stage in ("infer_cam", "aff_labels", "random_walk"):
    reports = [json.loads((w / "reports" / f"{stage}.json").read_text())
               for w in (single, reference, workdir)]
    assert reports[0] == reports[1] == reports[2], stage
    skipped[stage] = set(reports[2]["skipped"])
  # Images larger than the canvas in both processes' shares, in one report.
  assert skipped["infer_cam"] and skipped["infer_cam"] <= skipped["random_walk"]
  assert any(n.startswith("train") for n in skipped["infer_cam"])
  assert any(n.startswith("val") for n in skipped["infer_cam"])
  results = [json.loads((w / "results.json").read_text()) for w in (single, reference, workdir)]
  for r in results:
    for key in ("seconds", "stage_seconds", "fingerprints"):
      r.pop(key)
  assert results[0] == results[1] == results[2]


@pytest.mark.xdist_group("multiprocess")  # one worker: one single-process run
def test_a_killed_process_stops_the_run_and_a_rerun_resumes(config, tmp_path):
  """Kill process 1 in the middle of training: process 0 stops by itself (JAX's heartbeat,
  10 s here), the launcher says which process died; both again resume from the last
  checkpoint to the parameters of an uninterrupted run."""
  long = config + ":long"
  reference = tmp_path / "uninterrupted"
  _two_processes(long, reference, "train_cam")
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_launch_argv(long, workdir, "train_cam"), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines, pids, killed_at = [], {}, None
  for line in proc.stdout:
    lines.append(line)
    if m := re.match(r"\[launch\] process (\d) of 2: pid (\d+)", line):
      pids[int(m[1])] = int(m[2])
    m = re.search(r"\[cam_net\].* step (\d+)/12", line)
    if m and int(m[1]) >= 5 and killed_at is None:
      os.kill(pids[1], signal.SIGKILL)
      killed_at = time.monotonic()
  proc.wait(timeout=120)
  text = "".join(lines)
  assert killed_at is not None, text[-3000:]
  assert proc.returncode != 0
  print(f"the run stopped {time.monotonic() - killed_at:.1f} s after the kill")
  assert time.monotonic() - killed_at < 60, text[-3000:]
  assert "process 1 killed by signal SIGKILL" in text
  assert "killing process 0" not in text  # it stopped by itself, before the launcher's grace
  log = _two_processes(long, workdir, "train_cam")
  # The last checkpoint both processes finished (orbax commits in the background: the one of
  # the step just before the kill may be cut off).
  assert re.search(r"resuming from step (2|4|6|8|10)\b", log), log[-3000:]
  for a, b in zip(jax.tree.leaves(_variables(reference, "cam_net")),
                  jax.tree.leaves(_variables(workdir, "cam_net"))):
    np.testing.assert_array_equal(a, b)


RENDEZVOUS = """
import sys, time
from affinity_jax import distributed
port, me, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.initialize(f"localhost:{port}", 2, me, barrier_timeout_s=5, heartbeat_timeout_s=30)
failing = {"fail": 1, "fail0": 0, "busy": 1}.get(mode)
try:  # a failure may reach the other process at any of these
  assert distributed.gather("who", {"me": me}) == [{"me": 0}, {"me": 1}]
  assert distributed.broadcast("what", lambda: f"from {me}") == "from 0"
  assert distributed.share(list(range(5))) == [[0, 1], [2, 3, 4]][me]
  if me == failing:
    distributed.stop(2, "this image is unreadable")
  if me == 1 and mode == "late":
    time.sleep(20)
  if me == 0 and mode == "busy":  # a long stage: no barrier for 60 s
    for _ in range(600):
      time.sleep(0.1)
      distributed.check_peers()
  distributed.barrier("stage done")
except distributed.PeerFailure as e:
  print(e, flush=True)
  distributed.stop(3, None if e.heard else str(e))
print("passed", flush=True)
distributed.shutdown()
"""


@pytest.mark.parametrize("mode", ["ok", "fail", "fail0", "busy", "late"])
def test_barriers_name_the_process_that_failed_or_is_missing(tmp_path, mode):
  """A process that stops with an error (process 1, or process 0 which serves the key-value
  store) ends the other with its message, at a barrier or while it works between barriers;
  a process that does not come is named after the timeout (5 s)."""
  from affinity_jax import launch
  script = tmp_path / "rendezvous.py"
  script.write_text(RENDEZVOUS)
  port = str(launch.free_port())
  procs = [subprocess.Popen([sys.executable, str(script), port, str(i), mode], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=90) for p in procs]
  finally:
    for p in procs:
      p.kill()
  codes = [p.returncode for p in procs]
  stdout = [o for o, _ in outs]
  # JAX's own end when a process vanishes: not what our processes should meet.
  assert not any("Terminating process" in e for _, e in outs), outs
  if mode == "ok":
    assert codes == [0, 0] and all("passed" in o for o in stdout), outs
  elif mode == "late":
    assert codes == [3, 3], outs
    assert "process(es) 1 of 2 did not reach 'stage done' within 5 s" in stdout[0]
    assert "process 0 of 2 stopped: process(es) 1 of 2 did not reach" in stdout[1]
  else:
    told = 1 if mode == "fail0" else 0
    assert codes[told] == 3 and codes[1 - told] == 2, outs
    assert f"process {1 - told} of 2 stopped: this image is unreadable" in stdout[told]


def test_launch_passes_the_command_on_untouched():
  from affinity_jax import cli, launch
  run = ["run", "--config", "synthetic:tiny", "--config.cam.steps=5", "--workdir", "w"]
  for argv in (["launch", "--processes", "2", "--", *run], ["launch", "--processes", "2", *run],
               ["--verbose", "launch", "--processes", "2", "--cpu-devices", "1", "--", *run]):
    own, command = cli.split_launch(argv)
    assert command == run and own == argv[:len(argv) - len(run) - ("--" in argv)]
  assert cli.split_launch(["run", "--config", "x"]) == (["run", "--config", "x"], [])
  assert cli.main(["launch", "--processes", "2", "--config.seed=1", "--", *run]) == 2
  with pytest.raises(UserError, match="give `-- run --config"):
    launch.main(2, ["prepare", "--config", "x"])
  with pytest.raises(UserError, match="sets --coordinator"):
    launch.main(2, ["run", "--config", "x", "--process-id", "1"])
