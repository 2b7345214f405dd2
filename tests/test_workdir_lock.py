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
  assert (tmp_path / ".lock").read_text() == ""  # released and cleared on exit
  with workdir_lock.hold(str(tmp_path)):  # and free again
    pass


def test_lock_is_released_when_the_run_fails(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir_lock.hold(str(tmp_path)):
      raise RuntimeError("a stage failed")
  with workdir_lock.hold(str(tmp_path)):
    pass


def test_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
  # A real holder, SIGKILLed: the kernel drops its lock, its record stays in the file.
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from affinity_jax import workdir_lock\n"
      f"with workdir_lock.hold({str(tmp_path)!r}):\n"
      "  print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True,
      cwd=REPO)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  holder.kill()
  holder.wait()
  with workdir_lock.hold(str(tmp_path)):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert f"stale lock of process {holder.pid}" in capsys.readouterr().err
