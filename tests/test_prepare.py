"""`affinity-jax prepare`: builds a config's dataset once and says where and how large it is."""

import os

import pytest

from affinity_jax import cli
from tests import _voc_tree


def _prepare(capsys, *argv) -> tuple[int, str, str]:
  status = cli.main(["prepare", *map(str, argv)])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def test_the_tiny_synthetic_dataset_is_built_once_and_described(tmp_path, capsys):
  argv = ["--config", "synthetic:tiny", f"--config.data.data_dir={tmp_path}"]
  status, out, _ = _prepare(capsys, *argv)
  assert status == 0
  where = os.path.join(tmp_path, "synthetic_wsss", "tiny")
  assert "dataset synthetic_wsss/tiny " in out and f" in {where}" in out
  assert "  train: 16 examples\n" in out and "  val: 8 examples\n" in out
  assert os.path.isdir(where)
  # The second call finds it prepared and says the same.
  built = sorted(os.listdir(where))
  status, again, _ = _prepare(capsys, *argv)
  assert status == 0 and again.splitlines()[-3:] == out.splitlines()[-3:]
  assert sorted(os.listdir(where)) == built


def test_a_voc_tree_is_built_from_data_manual_dir(tmp_path, capsys):
  manual = tmp_path / "manual"
  _voc_tree.make_voc_tree(str(manual))
  # One JPEG that no decoder reads: its image is left out, and the summary says so.
  jpeg = manual / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{_voc_tree.VOC_VAL[0]}.jpg"
  jpeg.write_bytes(jpeg.read_bytes()[:200])
  status, out, _ = _prepare(capsys, "--config", "voc_resnet38", f"--config.data.manual_dir={manual}",
                            f"--config.data.data_dir={tmp_path / 'tfds'}")
  assert status == 0
  assert "dataset voc2012_aug/xml_labels " in out
  assert f" in {tmp_path / 'tfds' / 'voc2012_aug' / 'xml_labels'}" in out
  lines = out.splitlines()
  assert f"  train: {len(_voc_tree.VOC_TRAIN)} examples" in lines
  assert f"  train_aug: {len(_voc_tree.TRAIN_AUG)} examples" in lines
  assert f"  val: {len(_voc_tree.VOC_VAL) - 1} examples (1 left out: unreadable files)" in lines


@pytest.mark.parametrize("manual", ["missing", "empty", "other"])
def test_a_wrong_manual_dir_is_one_message_naming_the_path_and_key(tmp_path, capsys, manual):
  path = tmp_path / manual
  if manual != "missing":
    path.mkdir()
  if manual == "other":  # something, but not VOCdevkit/
    (path / "VOC2012").mkdir()
  status, _, err = _prepare(capsys, "--config", "voc_resnet38:tiny",
                            f"--config.data.manual_dir={path}",
                            f"--config.data.data_dir={tmp_path / 'tfds'}")
  assert status == 2
  assert str(path) in err and "data.manual_dir" in err and "Traceback" not in err
  assert not list((tmp_path / "tfds").rglob("dataset_info.json"))  # nothing looks prepared


def test_voc_without_a_manual_dir_names_the_key(tmp_path, capsys):
  status, _, err = _prepare(capsys, "--config", "voc_resnet38",
                            f"--config.data.data_dir={tmp_path}")
  assert status == 2 and "data.manual_dir" in err and "Traceback" not in err


def test_an_unknown_config_name_lists_the_shipped_ones(capsys):
  status, _, err = _prepare(capsys, "--config", "synthetc:tiny")
  assert status == 2
  assert "unknown config 'synthetc'" in err
  assert "synthetic, synthetic_irn, voc_irn_resnet50, voc_resnet38, voc_vgg16" in err


def test_runs_started_side_by_side_build_a_missing_dataset_once(tmp_path):
  # Two processes (two seeds or workdirs started together) on a dataset not yet built: the
  # second waits for the first's build and reads it, instead of stopping on tfds's rename.
  import subprocess
  import sys
  code = ("import sys; from affinity_jax import data; "
          "b = data.get_builder('synthetic_wsss', sys.argv[1], config='tiny', num_train=200); "
          "print(b.info.splits['train'].num_examples)")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
  for out, err, code_ in results:
    assert code_ == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == "200"
  built = [c for c in os.listdir(tmp_path / "synthetic_wsss") if c.startswith("tiny_")]
  assert len(built) == 2  # the config's folder and its lock
  config_dir = tmp_path / "synthetic_wsss" / sorted(built)[0]
  assert os.listdir(config_dir) == ["1.2.0"]  # no half-built copy left beside it


def test_a_data_dir_in_a_bucket_takes_no_local_lock(tmp_path, monkeypatch):
  # flock needs a local file: for gs://... the preparation runs unlocked, and no folder named
  # "gs:" appears in the working directory.
  import types
  from affinity_jax import data
  monkeypatch.chdir(tmp_path)
  bucket = types.SimpleNamespace(data_dir="gs://bucket/tfds/synthetic_wsss/tiny/1.2.0")
  with data._preparing(bucket):
    pass
  assert os.listdir(tmp_path) == []
  local = types.SimpleNamespace(data_dir=str(tmp_path / "tfds/synthetic_wsss/tiny/1.2.0"))
  with data._preparing(local):
    pass
  assert os.listdir(tmp_path / "tfds" / "synthetic_wsss") == ["tiny.prepare.lock"]
