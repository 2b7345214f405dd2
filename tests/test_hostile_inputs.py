"""Hostile inputs (issue 15, item 3): each one is converted, or skipped and listed, or stops with
one message naming the file or key; never a traceback, never a half-written output.

Real code paths throughout: tfds builds of a generated VOC-shaped tree (tests/_voc_tree.py),
real orbax checkpoints, the real CLI (`cli.main`, or a subprocess where exit codes, tracebacks
or resource limits matter). Everything is tiny (ResNet-38 at width 1/16, 64 x 64 canvases) so
that each test takes seconds; the 6000 x 6000 image is a real one, its memory measured.
"""

import contextlib
import io as std_io
import json
import os
import shlex
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from affinity_jax import artifacts, checkpoint, cli, config as config_lib, data, io
from affinity_jax.data import pipelines
from affinity_jax.errors import UserError
from affinity_jax.stages.training import init_variables
from tests import _voc_tree
from tests.test_train import run_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOC = os.path.join(REPO, "configs", "voc_resnet38.py")
TINY = os.path.join(REPO, "configs", "synthetic.py:tiny")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
STAGES = "infer_cam,aff_labels,random_walk,evaluate"

# The hostile images added to the miniature VOC tree of the main run, with their split.
ONE_PIXEL = "2011_000001"          # train: a 1x1 image
CMYK = ("2011_000002", "2011_000012")  # train, val: CMYK JPEGs
RANDOM_BYTES = "2011_000003"       # train: a .jpg of random bytes
EMPTY_JPEG = "2011_000004"         # val: a zero-byte .jpg
EMPTY_MASK = "2011_000007"         # train: a zero-byte SegmentationClass .png
GREY_PALETTE = "2011_000005"       # val: a mask whose palette is grey levels, not VOC's
TOO_LARGE = "2011_000006"          # val: 72 x 80, larger than the 64 x 64 canvas
UNREADABLE = (RANDOM_BYTES, EMPTY_JPEG, EMPTY_MASK)


def voc_argv(workdir, root, *extra) -> list[str]:
  """`affinity-jax run` on the VOC config at tiny sizes, over the tree at `root`."""
  return ["run", "--config", VOC, "--workdir", str(workdir),
          f"--config.data.manual_dir={root / 'manual'}",
          f"--config.data.data_dir={root / 'tfds'}", "--config.model.width=0.0625",
          "--config.data.canvas=(64, 64)", "--config.data.pseudo_splits=('train', 'val')",
          "--config.cam_infer.scales=(1.0, 0.5)", "--config.cam_infer.batch_size=2",
          "--config.aff_labels.workers=1", "--config.aff_labels.crf_iters=2",
          "--config.random_walk.logt=2", "--config.random_walk.batch_size=2",
          "--config.eval.cam_splits=('val', 'train')", "--config.eval.seg_splits=()",
          "--config.eval.panels=0", *extra]


def run_cli(argv) -> tuple[int, str]:
  """cli.main in this process; (status, stdout + stderr)."""
  out = std_io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    status = cli.main([str(a) for a in argv])
  return status, out.getvalue()


def save_tiny_networks(workdir, root) -> None:
  """Untrained CAM and affinity networks (width 1/16) where the stages look for them."""
  cfg = config_lib.load_config(VOC)
  config_lib.apply_overrides(cfg, [a for a in voc_argv(workdir, root)
                                   if a.startswith("--config.")])
  cfg.workdir = str(workdir)
  calibration = np.random.default_rng(0).normal(size=(2, 48, 48, 3)).astype(np.float32)
  for net in (artifacts.CAM_NET, artifacts.AFF_NET):
    checkpoint.save_network(cfg, net, init_variables(cfg, net.arch, 48, calibration))


def report(workdir, stage) -> dict:
  with open(os.path.join(workdir, "reports", stage + ".json")) as f:
    return json.load(f)


def no_temporaries(folder) -> bool:
  return not any(n.startswith(".tmp-") for _, _, files in os.walk(folder) for n in files)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
  """The VOC tree with every hostile image at once, built by tfds and run through infer_cam,
  aff_labels, random_walk and evaluate by the CLI."""
  root = tmp_path_factory.mktemp("hostile")
  manual = str(root / "manual")
  _voc_tree.make_voc_tree(manual, with_sbd=False)
  added = {ONE_PIXEL: _voc_tree.add_image(manual, ONE_PIXEL, "train", height=1, width=1)}
  for name, split in zip(CMYK, ("train", "val")):
    added[name] = _voc_tree.add_image(manual, name, split, cls=5, seed=1)
    _voc_tree.save_cmyk_jpeg(added[name]["jpeg"], added[name]["pixels"])
  added[RANDOM_BYTES] = _voc_tree.add_image(manual, RANDOM_BYTES, "train")
  with open(added[RANDOM_BYTES]["jpeg"], "wb") as f:
    f.write(np.random.default_rng(0).bytes(3000))
  added[EMPTY_JPEG] = _voc_tree.add_image(manual, EMPTY_JPEG, "val")
  open(added[EMPTY_JPEG]["jpeg"], "wb").close()
  added[EMPTY_MASK] = _voc_tree.add_image(manual, EMPTY_MASK, "train")
  open(added[EMPTY_MASK]["png"], "wb").close()
  added[GREY_PALETTE] = _voc_tree.add_image(manual, GREY_PALETTE, "val", cls=7)
  _voc_tree.save_palette_png(added[GREY_PALETTE]["png"], added[GREY_PALETTE]["mask"],
                             [v for k in range(256) for v in (k, k, k)])
  added[TOO_LARGE] = _voc_tree.add_image(manual, TOO_LARGE, "val", height=72, width=80)
  workdir = root / "work"
  save_tiny_networks(workdir, root)
  status, output = run_cli(voc_argv(workdir, root, "--stages", STAGES))
  return {"root": root, "workdir": workdir, "added": added, "status": status,
          "output": output}


def builder_of(run):
  return data.get_builder("voc2012_aug", run["root"] / "tfds",
                          manual_dir=run["root"] / "manual")


def test_the_run_with_every_hostile_image_succeeds(hostile_run):
  assert hostile_run["status"] == 0, hostile_run["output"][-3000:]
  assert "Traceback" not in hostile_run["output"]
  assert no_temporaries(hostile_run["workdir"])


# ---------------------------------------------------------------------------------------------
# Images the decoders can read but our format does not expect: converted, and said once.


def test_cmyk_jpegs_are_converted_to_rgb_and_said_once(hostile_run):
  output, added = hostile_run["output"], hostile_run["added"]
  assert output.count("is a CMYK JPEG: converting it") == 1
  builder = builder_of(hostile_run)
  assert builder.info.metadata["cmyk_to_rgb"] == sorted(CMYK)
  for split, name in zip(("train", "val"), CMYK):
    ex = next(e for e in tfds.as_numpy(builder.as_dataset(split=split))
              if e["name"].decode() == name)
    assert ex["image"].shape == (40, 48, 3)
    # PIL's conversion, then a quality-95 JPEG: about one grey level from the RGB original.
    assert np.abs(ex["image"].astype(int) - added[name]["pixels"]).mean() < 3
    assert os.path.isfile(artifacts.Workdir(hostile_run["workdir"]).cam(name))


def test_a_mask_with_another_palette_is_read_by_its_indices(hostile_run):
  output = hostile_run["output"]
  assert output.count("has another palette than VOC's: reading its indices") == 1
  assert GREY_PALETTE + ".png" in output
  builder = builder_of(hostile_run)
  assert builder.info.metadata["foreign_palette"] == [GREY_PALETTE]
  ex = next(e for e in tfds.as_numpy(builder.as_dataset(split="val"))
            if e["name"].decode() == GREY_PALETTE)
  np.testing.assert_array_equal(ex["mask"][..., 0], hostile_run["added"][GREY_PALETTE]["mask"])


def test_a_mask_reindexed_from_rgb_colours_is_refused(tmp_path):
  # Index 1 holds VOC's colour of person (15): the indices are not classes (an RGB mask put
  # through a quantiser, say); reading them would train on wrong labels.
  manual = str(tmp_path / "manual")
  _voc_tree.make_voc_tree(manual, with_sbd=False)
  added = _voc_tree.add_image(manual, "2011_000020", "train", cls=1)
  colours = _voc_tree.voc_palette()
  colours[3:6] = colours[15 * 3:15 * 3 + 3]
  _voc_tree.save_palette_png(added["png"], added["mask"], colours)
  with pytest.raises(UserError, match=r"2011_000020\.png holds index 1, whose palette colour is "
                     r"VOC's colour of class 15 \(person\)"):
    data.get_builder("voc2012_aug", tmp_path / "tfds", manual_dir=manual)


# ---------------------------------------------------------------------------------------------
# Files no decoder can read: the image is left out, with a line per file and a list.


def test_unreadable_files_leave_out_their_image_and_are_listed(hostile_run):
  output, added = hostile_run["output"], hostile_run["added"]
  builder = builder_of(hostile_run)
  names = set(data.split_names(builder, "train")) | set(data.split_names(builder, "val"))
  assert not names & set(UNREADABLE)
  assert {ONE_PIXEL, GREY_PALETTE, TOO_LARGE, *CMYK} <= names
  left_out = builder.info.metadata["left_out"]
  assert sorted(left_out["train"]) == sorted([RANDOM_BYTES, EMPTY_MASK])
  assert sorted(left_out["val"]) == [EMPTY_JPEG]
  expected = {RANDOM_BYTES: (added[RANDOM_BYTES]["jpeg"], "is not an image file"),
              EMPTY_JPEG: (added[EMPTY_JPEG]["jpeg"], "is an empty file"),
              EMPTY_MASK: (added[EMPTY_MASK]["png"], "is an empty file")}
  for name, (path, what) in expected.items():
    reason = {**left_out["train"], **left_out["val"]}[name]
    assert path in reason and what in reason, reason
    assert f"leaving out {name}: {reason}" in output
  assert "train: left out 2 of 7 images whose files cannot be decoded: " in output
  assert "val: left out 1 of 6 images" in output


def test_a_split_with_no_readable_image_stops_the_build(tmp_path):
  manual = tmp_path / "manual"
  _voc_tree.make_voc_tree(str(manual), with_sbd=False)
  for name in _voc_tree.VOC_VAL:
    (manual / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{name}.jpg").write_bytes(b"")
  status, output = run_cli(voc_argv(tmp_path / "w", tmp_path, "--stages", "infer_cam"))
  assert status == 2 and "Traceback" not in output
  assert "no image of split val can be read" in output and "2007_0000" in output
  assert not (tmp_path / "tfds" / "voc2012_aug" / "xml_labels" / "1.0.0").exists()


@pytest.mark.parametrize("content, what", [(b"", "is empty"), (b"\xff\xfe\x00garbage",
                                                               "is not text")])
def test_an_empty_or_binary_image_list_stops_the_build(tmp_path, content, what):
  manual = tmp_path / "manual"
  _voc_tree.make_voc_tree(str(manual), with_sbd=False)
  listing = manual / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt"
  listing.write_bytes(content)
  with pytest.raises(UserError, match=f"image list {listing} {what}"):
    data.get_builder("voc2012_aug", tmp_path / "tfds", manual_dir=manual)


def test_a_mask_with_labels_outside_the_class_range_stops_the_build(tmp_path):
  manual = tmp_path / "manual"
  _voc_tree.make_voc_tree(str(manual), with_sbd=False)
  png = manual / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000003.png"
  mask = np.asarray(Image.open(png)).copy()
  mask[0, :3] = [21, 40, 254]
  _voc_tree.save_palette_png(str(png), mask, _voc_tree.voc_palette())
  status, output = run_cli(voc_argv(tmp_path / "w", tmp_path, "--stages", "infer_cam"))
  assert status == 2 and "Traceback" not in output
  assert f"mask {png} holds values [21, 40, 254]; expected 0..20 or 255" in output
  assert not (tmp_path / "tfds" / "voc2012_aug" / "xml_labels" / "1.0.0").exists()


# ---------------------------------------------------------------------------------------------
# Sizes: a 1x1 image, an image larger than the inference canvas, a 6000 x 6000 photograph.


def test_a_one_pixel_image_goes_through_every_stage(hostile_run):
  work = artifacts.Workdir(hostile_run["workdir"])
  cam, ids = artifacts.load_cam_present(work.cam(ONE_PIXEL))
  assert cam.shape == (1, 1, 1) and ids.tolist() == [0] and np.isfinite(cam).all()
  la, ha = artifacts.load_scores(work.scores(ONE_PIXEL), (1, 1), 21)
  assert la.shape == ha.shape == (1, 1, 2)
  assert artifacts.load_label(work.pseudo_label(ONE_PIXEL), "random_walk", (1, 1)).shape == (1, 1)


def test_a_one_pixel_image_in_the_training_crops(hostile_run):
  builder = builder_of(hostile_run)
  work = artifacts.Workdir(hostile_run["workdir"])
  one_host = dict(process_index=0, process_count=1, seed=3)
  count = len(data.split_names(builder, "train"))  # one batch holds every image once
  cls = next(pipelines.cls_train(builder, "train", batch_size=count, crop_size=48, **one_host))
  assert cls["image"].shape == (count, 48, 48, 3) and np.isfinite(cls["image"]).all()
  aff = next(pipelines.aff_train(builder, "train", work.path(artifacts.AFF_LABELS),
                                 batch_size=count, crop_size=48, image_scale=0.5, **one_host))
  assert aff["aff_label"].shape == (count, 6, 6) and np.isfinite(aff["image"]).all()
  seg = next(pipelines.seg_train(builder, "train", work.path(artifacts.PSEUDO_LABELS),
                                 batch_size=count, crop_size=48, **one_host))
  assert seg["label"].shape == (count, 48, 48)
  assert set(np.unique(seg["label"])) <= set(range(21)) | {255}


def test_an_image_larger_than_the_canvas_is_skipped_and_reported(hostile_run):
  workdir = hostile_run["workdir"]
  for stage in ("infer_cam", "random_walk"):
    reason = report(workdir, stage)["skipped"][TOO_LARGE]
    assert "72x80, larger than the inference canvas 64x64 (config key data.canvas" in reason
  assert "infer_cam skipped it" in report(workdir, "aff_labels")["skipped"][TOO_LARGE]
  assert "skipped it" in report(workdir, "evaluate")["skipped"][TOO_LARGE]
  for folder in (artifacts.CAMS, artifacts.AFF_LABELS, artifacts.PSEUDO_LABELS):
    assert not any(n.startswith(TOO_LARGE) for n in os.listdir(workdir / folder))
  assert f"[infer_cam] skipping {TOO_LARGE}: the image is 72x80" in hostile_run["output"]


def _memory_kib(field: str) -> int:
  """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB."""
  with open("/proc/self/status") as f:
    return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def test_a_6000_by_6000_image_is_never_resized_in_inference(tmp_path):
  # At the VOC config's canvas (512) and scales: the image is decoded once (108 MB) and passed
  # over. Resized to its scales it would hold 3.2 GB of inputs, and ResNet-38's features at
  # scale 2 another 37 GB: more than a 24 GiB machine has.
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM, the peak, so that it measures this test alone
  except OSError as e:
    pytest.skip(f"cannot reset the peak memory of this process ({e})")
  manual = tmp_path / "manual"
  _voc_tree.make_voc_tree(str(manual), with_sbd=False)
  _voc_tree.add_image(str(manual), "2011_000030", "val", height=6000, width=6000)
  builder = data.get_builder("voc2012_aug", tmp_path / "tfds", manual_dir=manual)

  def run(split):
    return [(b["name"][0].decode(), bool(b["valid"][0]), b["image_size"][0].tolist())
            for b in pipelines.inference(builder, split, canvas=(512, 512), batch_size=1,
                                         scales=(1.0, 0.5, 1.5, 2.0), process_index=0,
                                         process_count=1)]

  run("train")  # the same pipeline on small images first: TF's pools and buffers are in place
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  before = _memory_kib("VmRSS")
  seen = run("val")
  growth_mib = (_memory_kib("VmHWM") - before) / 1024
  assert ("2011_000030", False, [6000, 6000]) in seen
  assert sum(valid for _, valid, _ in seen) == len(_voc_tree.VOC_VAL)
  print(f"inference over a 6000x6000 image: peak memory +{growth_mib:.0f} MiB")
  assert growth_mib < 600, growth_mib  # measured: about 150 (the decoded image is 103)


# ---------------------------------------------------------------------------------------------
# Workdir files: a CAM of the wrong shape or dtype.


def _bad_cam(kind):
  if kind == "shape":  # [H, W] without the class axis
    return dict(cam=np.zeros((40, 56), np.float32), class_ids=np.array([0], np.int32))
  return dict(cam=np.zeros((40, 56, 1), np.int64), class_ids=np.array([0], np.int32))


@pytest.mark.parametrize("kind", ["shape", "dtype"])
def test_a_cam_of_the_wrong_shape_or_dtype_stops_aff_labels(hostile_run, tmp_path, kind):
  workdir = tmp_path / "work"
  # copytree keeps modification times, part of the identity of the networks put in by hand.
  shutil.copytree(hostile_run["workdir"], workdir)
  work = artifacts.Workdir(workdir)
  name = "2007_000001"
  io.save_npz(work.cam(name), **_bad_cam(kind))
  os.remove(work.scores(name))  # so that aff_labels has this image to redo
  status, output = run_cli(voc_argv(workdir, hostile_run["root"], "--stages", "aff_labels"))
  assert status == 2 and "Traceback" not in output
  assert f"{work.cam(name)}: a CAM of shape" in output and "rerun infer_cam" in output
  assert not os.path.exists(work.scores(name)) and no_temporaries(workdir)


# ---------------------------------------------------------------------------------------------
# Config values of the wrong type.


def test_a_config_value_of_the_wrong_type_subprocess(tmp_path):
  cmd = [sys.executable, "-m", "affinity_jax.cli", "run", "--config", TINY, "--workdir",
         str(tmp_path), "--config.cam.lr=abc"]
  out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert "--config.cam.lr: cannot parse 'abc' as float" in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.listdir(tmp_path)  # stopped before anything was written


@pytest.mark.parametrize("override, message", [
    ("cam.steps=1.5", "--config.cam.steps: expected int, got '1.5'"),
    ("cam.lr=True", "--config.cam.lr: expected a finite float, got 'True'"),
    ("cam.lr=1e400", "--config.cam.lr: expected a finite float, got '1e400'"),
    ("data.canvas=('a', 'b')", "--config.data.canvas: expected a tuple of int"),
    ("cam_infer.scales=(1, 'x')", "--config.cam_infer.scales: expected a tuple of float"),
    ("data=3", "--config.data: expected ConfigDict, got '3'"),
])
def test_config_values_of_the_wrong_type(tmp_path, override, message):
  status, output = run_cli(["run", "--config", TINY, "--workdir", tmp_path / "w",
                            f"--config.{override}"])
  assert status == 2 and message in output and "Traceback" not in output
  assert not (tmp_path / "w").exists()


def test_numbers_given_for_a_float_tuple_become_floats():
  cfg = config_lib.load_config(TINY)
  config_lib.apply_overrides(cfg, ["cam_infer.scales=(1, 2)", "data.canvas=[64, 72]"])
  assert cfg.cam_infer.scales == (1.0, 2.0) and type(cfg.cam_infer.scales[0]) is float
  assert cfg.data.canvas == (64, 72)


# ---------------------------------------------------------------------------------------------
# A workdir that cannot be written, a full disk.


@pytest.mark.parametrize("where", ["the workdir", "a parent"])
def test_a_file_where_the_workdir_should_be(tmp_path, where):
  blocker = tmp_path / "blocker"
  blocker.write_text("not a folder")
  workdir = blocker if where == "the workdir" else blocker / "work"
  status, output = run_cli(["run", "--config", TINY, "--workdir", workdir])
  assert status == 2 and "Traceback" not in output
  assert f"cannot create the folder {workdir}: a file of that name" in output
  assert blocker.read_text() == "not a folder"


def _read_only_mount_works(folder) -> str | None:
  """None if `unshare --mount` can bind `folder` read-only here, else why not."""
  if shutil.which("unshare") is None:
    return "no unshare command"
  folder = shlex.quote(str(folder))
  probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount --bind -o ro {folder} "
                          f"{folder} && ! touch {folder}/probe"],
                         capture_output=True, text=True, timeout=30)
  return None if probe.returncode == 0 else f"no read-only bind mount: {probe.stderr.strip()}"


def test_a_workdir_on_a_read_only_path(tmp_path):
  workdir = tmp_path / "work"
  workdir.mkdir()
  if os.geteuid() != 0:  # permissions stop an ordinary user
    workdir.chmod(0o555)
    try:
      status, output = run_cli(["run", "--config", TINY, "--workdir", workdir])
    finally:
      workdir.chmod(0o755)
  else:  # root writes through permissions: a read-only bind mount in a mount namespace
    why = _read_only_mount_works(workdir)
    if why:
      pytest.skip(f"root, and {why}")
    quoted = shlex.quote(str(workdir))
    cmd = (f"mount --bind -o ro {quoted} {quoted} && exec {shlex.quote(sys.executable)} -m "
           f"affinity_jax.cli run --config {shlex.quote(TINY)} --workdir {quoted}")
    out = subprocess.run(["unshare", "--mount", "sh", "-c", cmd], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    status, output = out.returncode, out.stdout + out.stderr
  assert status == 2 and "Traceback" not in output, output[-3000:]
  assert f"cannot write {workdir}" in output and "a writable folder instead (--workdir" in output
  assert not os.listdir(workdir)


def test_a_full_disk_names_the_file_and_leaves_nothing_half_written(hostile_run, tmp_path):
  # A file-size limit (RLIMIT_FSIZE) works without privileges; past it write() fails with
  # EFBIG, as it fails with ENOSPC on a full disk (Python ignores the SIGXFSZ signal).
  workdir = tmp_path / "work"
  shutil.copytree(hostile_run["workdir"], workdir)
  cams = workdir / artifacts.CAMS
  sizes = {n: os.path.getsize(cams / n) for n in os.listdir(cams)}
  shutil.rmtree(cams)
  small = max(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(workdir)
              for n in files if n.endswith(".json"))
  limit = max(small + 1, min(s for s in sizes.values() if s > 2 * small) // 2)
  assert small < limit < max(sizes.values())

  # The limit is set by a small launcher that then becomes the CLI (exec), not by a
  # preexec_fn: forking this multithreaded (JAX) process is unsafe.
  launcher = ("import os, resource, sys; n = int(sys.argv[1]); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
              "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")
  argv = [sys.executable, "-c", launcher, str(limit), "-m", "affinity_jax.cli"] + voc_argv(
      workdir, hostile_run["root"], "--stages", "infer_cam")
  out = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  assert f"cannot write {cams}" in out.stderr and "File too large" in out.stderr
  assert "nothing half-written was left" in out.stderr
  assert no_temporaries(workdir)
  for n in os.listdir(cams):  # what was written is whole
    artifacts.load_cam_present(str(cams / n))


def test_a_full_disk_while_saving_a_network_names_it_and_leaves_no_folder(tmp_path):
  # orbax writes through tensorstore, whose error is a ValueError carrying the OS error code.
  script = f"""
import numpy as np
from affinity_jax import checkpoint
from affinity_jax.errors import UserError
variables = {{"params": {{"w": np.random.default_rng(0).normal(size=(256, 256))}},
             "batch_stats": {{}}}}
try:
  checkpoint.save_variables({str(tmp_path / 'final')!r}, variables, metadata=dict(
      arch="cam", width=1.0, num_classes=3, source="test"))
except UserError as e:
  print("USER ERROR:", e)
"""
  launcher = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
              "(100_000, 100_000)); os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
  out = subprocess.run([sys.executable, "-c", launcher, "-c", script], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"USER ERROR: cannot write {tmp_path / 'final'}: File too large" in out.stdout
  assert os.listdir(tmp_path) == []  # neither the checkpoint nor its temporary folder


# ---------------------------------------------------------------------------------------------
# An orbax checkpoint whose newest step is truncated.


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
  straight = run_tiny(tmp_path, 6, checkpoint_every=2)  # keeps the checkpoints of steps 4, 6
  ckpts = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["4", "6"]
  for folder, _, files in os.walk(ckpts / "6"):  # a copy cut short: every file half-written
    for n in files:
      path = os.path.join(folder, n)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  capsys.readouterr()
  resumed = run_tiny(tmp_path, 6, checkpoint_every=2)
  out = capsys.readouterr().out
  assert f"warning: checkpoint step 6 in {ckpts} cannot be read" in out
  assert "resuming from step 4" in out
  moved = os.listdir(str(ckpts) + ".damaged")
  assert len(moved) == 1 and moved[0].startswith("6-")
  assert sorted(os.listdir(ckpts)) == ["4", "6"]  # step 6 again, whole this time
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               straight["params"], resumed["params"])
