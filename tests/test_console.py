"""The console: the progress bar on and off a terminal, and a quiet command line by default
with the libraries' logs back under --verbose (the real CLI, in a subprocess: TensorFlow reads
its log level once per process)."""

import io
import os
import subprocess
import sys
import textwrap

import pytest

from affinity_jax import artifacts, checkpoint, config as config_lib, console
from affinity_jax.stages.training import init_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


def test_off_a_terminal_the_bar_prints_the_first_forced_and_last_lines():
  out = io.StringIO()
  with console.progress(6, "net", unit="step", rate_scale=4, interval=3600, stream=out) as bar:
    for step in range(1, 7):
      bar.update(1, force=step == 3, loss=1.0 / step)
  lines = out.getvalue().splitlines()
  assert [l.split("] ", 2)[2].split(" loss")[0] for l in lines] == [
      "step 1/6", "step 3/6", "step 6/6"]
  assert lines[0].startswith("[net] [###.................] step 1/6 loss 1 ")
  assert lines[0].endswith("ETA ?")  # no rate before a second update: compilation is not one
  assert "loss 0.1667" in lines[-1] and "img/s" in lines[-1] and "ETA 0m00s" in lines[-1]


def test_off_a_terminal_an_unfinished_bar_ends_with_its_last_state():
  out = io.StringIO()
  with console.progress(10, "infer", interval=3600, stream=out) as bar:
    bar.update(2)
    bar.update(3)
  assert [l.split("] ", 2)[2].split(" ")[1] for l in out.getvalue().splitlines()] == [
      "2/10", "5/10"]


def test_a_disabled_bar_prints_nothing():
  out = io.StringIO()
  for _ in console.track(range(3), 3, "other host", stream=out, enabled=False):
    pass
  assert out.getvalue() == ""


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_messages_get_their_own_line(
    monkeypatch):
  term = FakeTerminal()
  monkeypatch.setattr(sys, "stdout", term)
  for i, _ in enumerate(console.track(range(3), 3, "infer_cam")):
    if i == 1:
      print("[infer_cam] skipping x: too large")
  assert sys.stdout is term  # the stand-in is gone after the bar
  text = term.getvalue()
  # Redrawn with \r, one newline at the end; the message cleared the bar's line first.
  assert text.startswith("\r[infer_cam] [")
  assert text.count("\n") == 2
  assert "\r\x1b[K[infer_cam] skipping x: too large\n" in text
  assert text.rstrip("\n").rsplit("\r", 1)[1].startswith("[infer_cam] [####################] "
                                                         "image 3/3")


def test_an_error_inside_the_bar_leaves_no_half_line(monkeypatch):
  term = FakeTerminal()
  monkeypatch.setattr(sys, "stdout", term)
  with pytest.raises(ValueError):
    with console.progress(4, "x") as bar:
      bar.update(1)
      raise ValueError("boom")
  assert term.getvalue().endswith("\r\x1b[K")  # the bar taken off; the error prints cleanly


# ---------------------------------------------------------------------------------------------
# The command line, quiet and --verbose.

_CUSTOM_DATA = textwrap.dedent("""
    import importlib.util
    def get_config(arg=None):
      spec = importlib.util.spec_from_file_location("_synthetic", {synthetic!r})
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      c = module.get_config("tiny")
      # Options make a custom tfds config: what VOC and the synthetic default run on, and what
      # made tfds warn "Using custom data configuration" at every builder.
      c.data.options = {{"config": "tiny", "seed": 3}}
      return c
""")


def _cli(*args):
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  out = subprocess.run([sys.executable, "-m", "affinity_jax.cli", *args], cwd=REPO,
                       env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout + out.stderr


def test_the_cli_is_quiet_by_default_and_verbose_shows_the_logs(tmp_path):
  config_path = tmp_path / "custom.py"
  config_path.write_text(_CUSTOM_DATA.format(
      synthetic=os.path.join(REPO, "configs", "synthetic.py")))
  workdir = tmp_path / "run"
  cfg = config_lib.load_config(str(config_path))
  cfg.workdir = str(workdir)
  # An untrained CAM network in place of train_cam's, as a converted one would be.
  checkpoint.save_network(cfg, artifacts.CAM_NET, init_variables(cfg, "cam", 48))
  args = ["run", "--config", str(config_path), "--workdir", str(workdir),
          f"--config.data.data_dir={tmp_path / 'tfds'}", "--stages", "infer_cam"]

  quiet = _cli(*args)
  assert "Using custom data configuration" not in quiet
  assert "WARNING:absl" not in quiet and "INFO:" not in quiet
  lines = quiet.splitlines()
  assert "== infer_cam" in lines
  assert any(l.startswith("[infer_cam] [####################] image 24/24 ") for l in lines)
  assert any(l.startswith("[infer_cam] wrote 24 CAM files") for l in lines)
  assert any(l.startswith("== infer_cam done in ") for l in lines)

  loud = _cli("--verbose", *args)  # all present now: the stage only checks
  assert "Using custom data configuration" in loud
  assert "INFO:absl:" in loud  # tfds' own logs
  assert "[infer_cam] train: all outputs present" in loud
