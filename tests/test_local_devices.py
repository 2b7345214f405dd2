"""The per-image inference stages (infer_cam, random_walk, infer_seg) split each batch over all of
the process's local devices, with the outputs of one device.

The device count is fixed when JAX starts, so each run is a subprocess with JAX_NUM_CPU_DEVICES
set: the three stages of the tiny synthetic config once on one device (the reference outputs),
then again on 4 forced CPU devices into fresh output folders of a copy of its workdir. The
networks are random ones put into the workdir by hand (as converted weights would be): the
stages' computations are the same for trained ones, and training takes a minute.

The inference batch size is 1, which 4 devices round up to 4: each device then runs the
programme of the one-device run on the same shapes. (XLA's float32 results for an image depend
on how many images a device processes at once, by a few units in the last place; with 2 per
batch on one device against 1 per device the random segmentation network's near-uniform scores
flip a few pixels of its argmax. The same happens on one device between batch sizes 1 and 2.)
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from affinity_jax import artifacts, io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_IMAGE = ("infer_cam", "random_walk", "infer_seg")
N_PSEUDO, N_SEG = 16 + 8, 8  # the tiny synthetic config: train + val, val

# Runs stages (argv[3], comma separated) one by one on the tiny config in workdir argv[1], data
# in argv[2], after writing random networks into the workdir if argv[4] is "init"; prints a JSON
# line: the device count, each stage's summary, for each stage the number of devices every image
# array (rank 4) that the stage's `put` placed was split over, and the cross-device operations
# in the compiled multi-scale CAM computation of a split batch (none: each device its own share).
SCRIPT = r"""
import json, re, sys
import jax
from affinity_jax import artifacts, cam, checkpoint, config, data, distributed, models, stages
from affinity_jax.data import pipelines

placement = distributed.local_placement
spans = []


def counting_placement():
  put, replicate, count = placement()

  def put_and_note(tree):
    out = put(tree)
    spans.extend(len(leaf.sharding.device_set) for leaf in jax.tree.leaves(out) if leaf.ndim == 4)
    return out
  return put_and_note, replicate, count


distributed.local_placement = counting_placement
cfg = config.load_config("synthetic:tiny")
cfg.workdir, cfg.data.data_dir = sys.argv[1], sys.argv[2]
cfg.cam_infer.batch_size = cfg.random_walk.batch_size = cfg.seg_infer.batch_size = 1
if sys.argv[4:] == ["init"]:
  for seed, net in enumerate(artifacts.NETWORKS):
    model = models.from_config(cfg, net.arch)
    checkpoint.save_network(cfg, net, models.init_variables(model, jax.random.key(seed)))
out = {"devices": jax.local_device_count(), "summaries": {}, "spans": {}}
for name in sys.argv[3].split(","):
  spans.clear()
  out["summaries"][name] = stages.run_stages(cfg, [name])[name]
  out["spans"][name] = sorted(set(spans))
if jax.local_device_count() > 1:
  put, replicate, count = placement()
  model, variables = checkpoint.load_network(cfg, artifacts.CAM_NET)
  scales = tuple(cfg.cam_infer.scales)
  batch = next(iter(pipelines.inference(
      data.from_config(cfg), "val", scales=scales, canvas=tuple(cfg.data.canvas),
      batch_size=count, convention=models.input_convention(cfg))))
  total = cam.multiscale_flip_sum(lambda v, x, s: model.apply(v, x, s, method="cam"))
  hlo = total.lower(replicate(variables), put(cam.pass_inputs(batch, scales))).compile().as_text()
  out["collectives"] = sorted(set(re.findall(
      r"all-to-all|all-gather|all-reduce|collective-permute|reduce-scatter", hlo)))
print("RESULT " + json.dumps(out))
"""


def _run(workdir, data_dir, names, devices: int, init: bool = False) -> tuple[dict, str]:
  """(the script's JSON, its stdout) of a run of SCRIPT on `devices` CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)  # its device count would take precedence
  # `-c`: aff_labels's worker processes would run a script file again (multiprocessing's spawn).
  done = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir), str(data_dir),
                         ",".join(names)] + (["init"] if init else []), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):]), done.stdout


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """(folder, workdir, result) of the three stages run on one device over random networks."""
  root = tmp_path_factory.mktemp("devices")
  workdir = root / "one"
  result, _ = _run(workdir, root / "tfds", PER_IMAGE, devices=1, init=True)
  return root, workdir, result


def _outputs(workdir) -> dict:
  """{path relative to the workdir: file} of the three stages' outputs."""
  found = {}
  for stage in PER_IMAGE:
    for pattern in artifacts.STAGE_OUTPUTS[stage]:
      for top in glob.glob(os.path.join(str(workdir), pattern)):
        paths = glob.glob(os.path.join(top, "*")) if os.path.isdir(top) else [top]
        found.update({os.path.relpath(p, str(workdir)): p for p in paths})
  return found


def test_four_devices_share_the_batches_and_give_the_one_device_outputs(one_device):
  root, one, reference = one_device
  assert reference["devices"] == 1
  for name, n in (("infer_cam", N_PSEUDO), ("random_walk", N_PSEUDO), ("infer_seg", N_SEG)):
    assert reference["summaries"][name]["images_per_device"] == [n]

  four = root / "four"
  shutil.copytree(one, four)
  for path in _outputs(four).values():  # the three stages redo exactly what is missing
    os.remove(path)
  result, stdout = _run(four, root / "tfds", PER_IMAGE, devices=4)

  assert result["devices"] == 4
  assert result["collectives"] == []
  # The inference batch of 1 becomes 4, one image per device: the 24 images of the
  # pseudo-label splits give 6 batches, the 8 of val 2, no dummy among them.
  for name, n in (("infer_cam", N_PSEUDO), ("random_walk", N_PSEUDO), ("infer_seg", N_SEG)):
    summary = result["summaries"][name]
    assert summary["written"] == n, name
    assert summary["devices"] == 4 and summary["images_per_device"] == [n // 4] * 4, summary
    assert result["spans"][name] == [4], (name, result["spans"][name])  # every image array
    assert f"[{name}] split over 4 local devices; real images on each: " in stdout

  want, got = _outputs(one), _outputs(four)
  # + 1 walk heat map (eval.panels) of each pseudo-label split
  assert sorted(got) == sorted(want) and len(want) == 3 * N_PSEUDO + N_SEG + 2
  for rel, path in want.items():
    if rel.endswith(".png"):
      with open(path, "rb") as a, open(got[rel], "rb") as b:
        assert a.read() == b.read(), rel
    else:
      a, b = io.load_npz(path), io.load_npz(got[rel])
      assert sorted(a) == sorted(b), rel
      for key in a:
        # The CAM network's float32 CAMs differ by ~1e-7 of their maximum between a process
        # with one CPU device and one with 4 (the same unsplit programme too: XLA compiles it
        # a little differently); a class whose CAM peaks low magnifies that in the normalised
        # CAM. A wrong split (another image's CAM, a shifted crop) moves them far more.
        # The walk's heat map (a picture for the demo's panels): a batch's images are walked
        # at the largest channel count among them (random_walk.walk_batch), the 4-image batch
        # at another than each image alone, and XLA:CPU's vector loops round the same sums a
        # little differently for other shapes, which the walk's 2^logt steps carry on (up to
        # ~1e-4 seen on an AVX-512 CPU). Its labels, above, stay identical.
        atol = 1e-3 if rel.startswith("panels/") and key == "heat" else 2e-5
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=atol, err_msg=f"{rel}: {key}")
