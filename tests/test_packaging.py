"""The wheel, installed outside the checkout, runs every stage with its shipped configs.

Builds the wheel from a copy of the source tree (`pip wheel --no-build-isolation`: offline),
installs it into a fresh virtual environment made without pip, and runs the installed
`affinity-jax` console script from another directory. The heavy dependencies are not installed
again: a .pth file appends the project venv's site-packages to the new venv's sys.path. Paths a
.pth adds are not scanned for .pth files themselves, so the project's editable install (its
finder is started by a .pth) stays out, and `affinity_jax` must come from the wheel.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What .gitignore leaves out, plus git itself: the wheel is built from what a clone holds.
NOT_SOURCE = (".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__",
              ".pytest_cache", "*.pyc")
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
ENV.update(TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")


def _run(cmd, cwd, timeout=300) -> subprocess.CompletedProcess:
  out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
  return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "-q", "-w", tmp / "dist", src], cwd=tmp)
  (path,) = glob.glob(str(tmp / "dist" / "affinity_jax-*.whl"))
  return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
  """A fresh venv holding only the wheel; (its python, its bin folder)."""
  root = tmp_path_factory.mktemp("venv")
  _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], cwd=root)
  bindir = root / "venv" / ("Scripts" if os.name == "nt" else "bin")
  python = bindir / ("python.exe" if os.name == "nt" else "python")
  site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
              cwd=root).stdout.strip()
  ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
  with open(os.path.join(site, "_affinity_jax_test_deps.pth"), "w") as f:
    f.write("".join(p + "\n" for p in ours))
  # pip itself comes through the .pth; --ignore-installed: never touch the project venv.
  _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
        wheel], cwd=root)
  return python, bindir


def test_the_wheel_holds_the_package_and_its_configs_only(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split("/")[0] for n in names}
  assert tops == {"affinity_jax", os.path.basename(wheel).split("-py")[0] + ".dist-info"}, tops
  for config in glob.glob(os.path.join(REPO, "configs", "*.py")):
    assert f"affinity_jax/configs/{os.path.basename(config)}" in names
  # Every subpackage of the source tree (setup.cfg lists them) is in the wheel.
  for init in glob.glob(os.path.join(REPO, "affinity_jax", "**", "__init__.py"), recursive=True):
    assert os.path.relpath(init, REPO).replace(os.sep, "/") in names, init
  # The dependencies made it into the metadata (a section header misplaced in setup.cfg once
  # moved install_requires out of [options], and a fresh install had no numpy).
  (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
  requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
              if line.startswith("Requires-Dist:")]
  for dep in ("jax", "flax", "numpy", "ml-collections", "tensorflow-datasets", "onednn-cpu-gomp"):
    assert any(line.split()[1].startswith(dep) for line in requires), (dep, requires)
  # oneDNN's handlers' source, compiled at first use (without it: XLA's convolutions, a warning).
  assert "affinity_jax/models/onednn.cc" in names
  # And every shipped weight file (setup.cfg's package_data).
  shipped = [f for f in glob.glob(os.path.join(REPO, "affinity_jax", "pretrained", "**", "*"),
                                  recursive=True) if os.path.isfile(f) and "__pycache__" not in f]
  assert len(shipped) > 5
  for f in shipped:
    assert os.path.relpath(f, REPO).replace(os.sep, "/") in names, f


def test_the_installed_package_is_the_wheel_not_the_checkout(venv, tmp_path):
  python, _ = venv
  out = _run([python, "-c", "import affinity_jax, affinity_jax.config as c; "
              "print(affinity_jax.__file__); print(c.shipped_configs()['synthetic'])"],
             cwd=tmp_path).stdout.split()
  prefix = os.path.dirname(os.path.dirname(str(python)))
  for path in out:
    assert os.path.realpath(path).startswith(os.path.realpath(prefix) + os.sep), path
    assert not os.path.realpath(path).startswith(os.path.realpath(REPO) + os.sep), path


def test_the_console_script_runs_every_stage_outside_the_checkout(venv, tmp_path):
  _, bindir = venv
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  workdir = tmp_path / "run"
  _run([bindir / "affinity-jax", "run", "--config", "synthetic:tiny", "--workdir", workdir,
        f"--config.data.data_dir={tmp_path / 'tfds'}"], cwd=elsewhere, timeout=1200)
  for net in ("cam_net", "aff_net", "seg_net"):
    assert os.path.isdir(workdir / net / "final"), net
  assert len(os.listdir(workdir / "pseudo_labels")) == 16 + 8  # tiny: 16 train, 8 val
  assert len(os.listdir(workdir / "seg_pred")) == 8
  with open(workdir / "results.json") as f:
    assert json.load(f)
  assert os.listdir(elsewhere) == []  # nothing written where it ran


def test_the_demo_finds_its_config_in_the_installed_package(venv, tmp_path):
  # A bad override stops the demo before any work, once its config has loaded.
  _, bindir = venv
  out = subprocess.run([str(bindir / "affinity-jax"), "demo", "--workdir", str(tmp_path / "d"),
                        "--config.cam.lr=abc"], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert "--config.cam.lr: cannot parse 'abc'" in out.stderr, out.stderr
