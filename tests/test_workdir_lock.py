"""One run per workdir: a second run fails at once; stale and foreign locks."""

import json
import os
import socket
import subprocess
import sys

import pytest

from affinity_jax import workdir_lock
from affinity_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "synthetic.py:tiny")


def test_second_run_on_a_held_workdir_fails_at_once_naming_the_holder(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    out = subprocess.run(
        [sys.executable, "-m", "affinity_jax.cli", "run", "--config", TINY, "--workdir",
         str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"workdir {tmp_path} is in use by process {os.getpid()}" in out.stderr
    assert "Traceback" not in out.stderr
    with pytest.raises(UserError, match="in use"):  # also within one process
      with workdir_lock.hold(str(tmp_path)):
        pass
  assert not (tmp_path / ".lock").exists()  # released on exit


def test_lock_is_released_when_the_run_fails(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir_lock.hold(str(tmp_path)):
      raise RuntimeError("a stage failed")
  assert not (tmp_path / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_replaced(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
  with workdir_lock.hold(str(tmp_path)):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert f"stale lock of process {dead.pid}" in capsys.readouterr().err


def test_lock_of_another_host_names_the_file_to_delete(tmp_path):
  (tmp_path / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
  with pytest.raises(UserError, match=r"on elsewhere .*delete .*\.lock by hand"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  assert (tmp_path / ".lock").exists()  # not ours to remove
