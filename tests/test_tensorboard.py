"""TensorBoard pictures of the training networks: read back from the event files.

The trainer writes `pictures` of a fixed batch (step 0's) at step 1, every `image_every` steps
and at the end, outside the training step; the CAM network shows its CAMs over the images, and
AffinityNet the boundary map of its affinities.
"""

import io
import os
import signal

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from affinity_jax import cli, config as config_lib, fingerprints, models, train
from affinity_jax.errors import TrainingInterrupted
from affinity_jax.stages import train_aff, train_cam
from tests.test_train import batches_from, bce_loss, tiny_labels, tiny_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "synthetic.py:tiny")


def event_images(logdir) -> dict[str, dict[int, list[np.ndarray]]]:
  """{tag: {step: [uint8 [H, W, C] image, ...]}} of the image summaries in `logdir`."""
  found = {}
  for name in sorted(os.listdir(logdir)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name != "images":
          continue
        tensor = tf.make_ndarray(value.tensor)  # [width, height, png, png, ...]
        images = [np.asarray(Image.open(io.BytesIO(png))) for png in tensor[2:]]
        assert all(im.shape[:2] == (int(tensor[1]), int(tensor[0])) for im in images)
        found.setdefault(value.tag, {})[event.step] = images
  return found


def event_scalar_tags(logdir) -> set[str]:
  return {v.tag for name in os.listdir(logdir)
          for e in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name))
          for v in e.summary.value if v.metadata.plugin_data.plugin_name == "scalars"}


def inputs_picture(variables, batch):
  """The batch's images as they are, and a picture that depends on the variables."""
  kernel = np.asarray(variables["params"]["fc8"]["kernel"])
  return {"inputs": np.clip(batch["image"] * 40 + 128, 0, 255).astype(np.uint8),
          "kernel": np.clip(kernel * 500 + 128, 0, 255).astype(np.uint8)[None, :, :, None]
          .repeat(3, -1)}


def _train_tiny(workdir, total_steps, image_every, batches):
  model, variables = tiny_setup()
  return train.train(
      name="tiny", model=model, variables=variables, labels=tiny_labels(variables["params"]),
      loss_fn=bce_loss, batches=batches, workdir=str(workdir), batch_size=4,
      optim=train.OptimConfig(lr=0.1, total_steps=total_steps), checkpoint_every=100,
      log_every=100, pictures=inputs_picture, image_every=image_every)


def test_pictures_of_the_fixed_batch_every_n_steps_across_a_resume(tmp_path):
  def preempted_at_step_4(start):
    for i, batch in enumerate(batches_from(1, 4)(start)):
      if start + i == 4:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  with pytest.raises(TrainingInterrupted, match="step 5"):
    _train_tiny(tmp_path, 8, 3, preempted_at_step_4)
  _train_tiny(tmp_path, 8, 3, batches_from(1, 4))  # resumes at step 5
  pictures = event_images(tmp_path / "logs")
  assert sorted(pictures) == ["tiny/inputs", "tiny/kernel"]
  assert sorted(pictures["tiny/inputs"]) == [1, 3, 6, 8]  # step 1, every 3, the last
  want = np.clip(next(batches_from(1, 4)(0))["image"] * 40 + 128, 0, 255).astype(np.uint8)
  for step, images in pictures["tiny/inputs"].items():  # step 0's batch, before and after
    np.testing.assert_array_equal(np.stack(images), want, err_msg=f"step {step}")
  kernels = pictures["tiny/kernel"]
  assert not np.array_equal(kernels[1][0], kernels[8][0])  # drawn from the current variables


def test_image_every_0_writes_no_pictures(tmp_path):
  _train_tiny(tmp_path, 2, 0, batches_from(1, 4))
  assert event_images(tmp_path / "logs") == {}
  assert "tiny/loss" in event_scalar_tags(tmp_path / "logs")


def test_image_every_changes_no_fingerprint(tmp_path):
  cfg = config_lib.load_config(TINY)
  cfg.workdir = str(tmp_path)

  def fingerprint_of(stage):
    return fingerprints.make_record(cfg, stage.__name__.rsplit(".", 1)[1], stage.READS,
                                    stage.CONSUMES, "d")["fingerprint"]

  before = [fingerprint_of(train_cam), fingerprint_of(train_aff)]
  cfg.cam.image_every, cfg.aff.image_every = 1, 0
  assert [fingerprint_of(train_cam), fingerprint_of(train_aff)] == before
  cfg.aff.lr = cfg.aff.lr * 2  # a key that matters does change it
  assert fingerprint_of(train_aff) != before[1]


def _white_gap_and_halves(picture: np.ndarray, width: int):
  assert picture.shape == (width, 2 * width + 4, 3)
  assert (picture[:, width:width + 4] == 255).all()
  return picture[:, :width], picture[:, width + 4:]


def test_cam_network_pictures_through_the_train_cam_stage(tmp_path):
  argv = ["run", "--config", TINY, "--workdir", str(tmp_path), "--stages", "train_cam",
          f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.cam.steps=2",
          "--config.cam.image_every=1"]
  assert cli.main(argv) == 0
  logdir = tmp_path / "cam_net" / "logs"
  pictures = event_images(logdir)
  assert sorted(pictures) == ["cam_net/cams"] and sorted(pictures["cam_net/cams"]) == [1, 2]
  crop = config_lib.load_config(TINY).cam.crop_size
  for images in pictures["cam_net/cams"].values():
    assert len(images) == 2  # the tiny batch; at most train.PICTURE_IMAGES
    for picture in images:
      image, overlay = _white_gap_and_halves(picture, crop)
      assert image.std() > 5  # a real image, denormalised
      assert not np.array_equal(image, overlay)
  assert "cam_net/loss" in event_scalar_tags(logdir)


def test_affinity_pictures_show_the_boundary_map(tmp_path):
  cfg = config_lib.load_config(TINY)
  model = models.from_config(cfg, "affinity")
  crop = 32
  variables = models.init_variables(model, jax.random.key(0), (1, crop, crop, 3))
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def batches(start):
    step = start
    while True:
      rng = np.random.default_rng(step)
      yield {"image": rng.normal(size=(2, crop, crop, 3)).astype(np.float32),
             "aff_label": rng.choice([0, 1, 255], size=(2, crop // 8, crop // 8)).astype(
                 np.int32)}
      step += 1

  train.train(name="aff_net", model=model, variables=variables,
              labels=models.param_labels(variables["params"]),
              loss_fn=train_aff.SPEC.loss(cfg), batches=batches,
              optim=train.OptimConfig(lr=1e-3, total_steps=2), workdir=str(tmp_path),
              batch_size=2, log_every=1, pictures=train_aff.affinity_pictures(cfg, model),
              image_every=1)
  pictures = event_images(tmp_path / "logs")
  assert sorted(pictures) == ["aff_net/boundaries"]
  assert sorted(pictures["aff_net/boundaries"]) == [1, 2]
  for picture in pictures["aff_net/boundaries"][2]:
    _, edges = _white_gap_and_halves(picture, crop)
    r, g, b = (edges[..., i].astype(int) for i in range(3))
    assert (r >= g).all() and (g >= b).all()  # heat colours, not the image


def test_boundary_map_is_high_only_where_features_change():
  features = np.zeros((1, 8, 12, 4), np.float32)
  features[:, :, 6:] = 5.0  # two regions split down the middle
  edges = np.asarray(train_aff.boundary_map(jax.numpy.asarray(features), radius=2))
  assert edges.shape == (1, 8, 12)
  np.testing.assert_allclose(edges[0, :, [0, 11]], 0.0, atol=1e-6)  # radius 2 from the split
  assert (edges[0, :, [5, 6]] > 0.2).all()
  uniform = np.asarray(train_aff.boundary_map(jax.numpy.zeros((1, 5, 5, 3)), radius=2))
  np.testing.assert_allclose(uniform, 0.0, atol=1e-6)
