"""`affinity-jax predict`'s parts: reading users' image files, naming outputs, canvases, choosing
networks and config. The command itself runs end to end in tests/test_pipeline_e2e.py, after the
tiny pipeline."""

import io as pyio
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from affinity_jax import artifacts, cam, io, pictures, predict
from affinity_jax.data import image_files, pipelines, transforms
from affinity_jax.data.image_files import UnreadableImage
from affinity_jax.errors import UserError

RNG = np.random.default_rng(0)


def _rgb(h, w):
  return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, image: Image.Image, **kw):
  image.save(path, **kw)
  return str(path)


def _png16(array: np.ndarray) -> bytes:
  """A 16-bit PNG of uint16 [H, W, C] (C = 1, 3 or 4), written by hand: PIL writes no 16-bit
  colour PNGs."""
  h, w, c = array.shape
  rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

  def chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload +
            struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

  colour_type = {1: 0, 3: 2, 4: 6}[c]
  return (b"\x89PNG\r\n\x1a\n" +
          chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)) +
          chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_rgb_jpeg_and_png_have_pils_pixels(tmp_path):
  pixels = _rgb(37, 53)
  jpg = _save(tmp_path / "a.jpg", Image.fromarray(pixels), quality=90)
  png = _save(tmp_path / "a.png", Image.fromarray(pixels))
  got = image_files.read_rgb(jpg)
  assert got.shape == (37, 53, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, np.asarray(Image.open(jpg).convert("RGB")))
  np.testing.assert_array_equal(image_files.read_rgb(png), pixels)
  assert image_files.upright_size(jpg) == (37, 53)


def test_greyscale_palette_and_cmyk_become_rgb(tmp_path):
  grey = RNG.integers(0, 256, (20, 31), dtype=np.uint8)
  got = image_files.read_rgb(_save(tmp_path / "g.png", Image.fromarray(grey)))
  assert got.shape == (20, 31, 3)
  np.testing.assert_array_equal(got, np.repeat(grey[..., None], 3, -1))
  pal = Image.fromarray(grey).convert("P")
  got = image_files.read_rgb(_save(tmp_path / "p.png", pal))
  np.testing.assert_array_equal(got, np.asarray(pal.convert("RGB")))
  cmyk = _save(tmp_path / "c.jpg", Image.new("CMYK", (30, 20), (0, 255, 255, 0)))  # red
  got = image_files.read_rgb(cmyk)
  assert got.shape == (20, 30, 3)
  assert np.all(got[..., 0] > 200) and np.all(got[..., 1:] < 60)


def test_transparency_is_composited_over_white(tmp_path):
  rgba = np.zeros((4, 5, 4), np.uint8)
  rgba[..., :3] = (10, 20, 30)
  rgba[0, :, 3] = 0      # transparent: white, whatever colour is stored under it
  rgba[1, :, 3] = 255    # opaque: its own colour
  rgba[2, :, 3] = 128    # half: between
  got = image_files.read_rgb(_save(tmp_path / "a.png", Image.fromarray(rgba)))
  assert got.shape == (4, 5, 3)
  np.testing.assert_array_equal(got[0], np.full((5, 3), 255))
  np.testing.assert_array_equal(got[1], np.tile([10, 20, 30], (5, 1)))
  assert np.all((got[2] > [10, 20, 30]) & (got[2] < 255))
  la = Image.fromarray(rgba[..., [0, 3]], "LA")
  assert image_files.read_rgb(_save(tmp_path / "la.png", la))[0].min() == 255


def test_sixteen_bit_pngs_keep_their_high_byte(tmp_path):
  grey = RNG.integers(0, 65536, (9, 14), dtype=np.uint16)
  path = _save(tmp_path / "g16.png", Image.fromarray(grey))
  assert Image.open(path).mode == "I;16"  # PIL's convert("RGB") would clip this to white
  np.testing.assert_array_equal(image_files.read_rgb(path),
                                np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, -1))
  colour = RNG.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
  (tmp_path / "c16.png").write_bytes(_png16(colour))
  np.testing.assert_array_equal(image_files.read_rgb(str(tmp_path / "c16.png")),
                                (colour >> 8).astype(np.uint8))


@pytest.mark.parametrize("orientation,turn", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
  pixels = _rgb(24, 40)
  plain = _save(tmp_path / "plain.jpg", Image.fromarray(pixels), quality=95)
  exif = Image.Exif()
  exif[0x0112] = orientation
  rotated = _save(tmp_path / "rotated.jpg", Image.fromarray(pixels), quality=95, exif=exif)
  want = np.rot90(image_files.read_rgb(plain), k=turn)  # the same JPEG data, turned
  got = image_files.read_rgb(rotated)
  assert image_files.upright_size(rotated) == got.shape[:2] == want.shape[:2]
  np.testing.assert_array_equal(got, want)


def test_unreadable_files_are_errors_naming_the_file(tmp_path):
  (tmp_path / "empty.jpg").write_bytes(b"")
  (tmp_path / "notes.png").write_text("not an image")
  buf = pyio.BytesIO()
  Image.fromarray(_rgb(64, 64)).save(buf, format="JPEG")
  (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  cases = {"empty.jpg": "is an empty file", "notes.png": "not an image file that PIL knows",
           "cut.jpg": "cannot be decoded", "missing.jpg": "no such file"}
  for name, why in cases.items():
    path = str(tmp_path / name)
    with pytest.raises(UnreadableImage, match=why) as e:
      image_files.read_rgb(path)
    assert path in str(e.value) and isinstance(e.value, UserError)
  with pytest.raises(UnreadableImage, match="empty"):
    image_files.upright_size(str(tmp_path / "empty.jpg"))


def test_find_images_takes_files_folders_and_patterns_once_each(tmp_path):
  photos = tmp_path / "photos"
  (photos / "sub").mkdir(parents=True)
  for name in ("b.JPG", "a.png", "notes.txt", "sub/c.jpeg"):
    (photos / name).write_bytes(b"x")
  files, problems = image_files.find_images([
      str(photos), str(photos / "a.png"), str(photos / "**" / "*.jpeg"),
      str(photos / "notes.txt"), str(tmp_path / "gone.jpg"), str(tmp_path / "*.png"),
      str(photos / "sub" / "..")])
  assert files == [str(photos / "a.png"), str(photos / "b.JPG"), str(photos / "sub" / "c.jpeg"),
                   str(photos / "notes.txt")]  # a file named on its own is tried as it is
  assert set(problems) == {str(tmp_path / "gone.jpg"), str(tmp_path / "*.png")}
  assert problems[str(tmp_path / "gone.jpg")].startswith(str(tmp_path / "gone.jpg"))
  (tmp_path / "none").mkdir()
  _, problems = image_files.find_images([str(tmp_path / "none")])
  assert "holds no image file" in problems[str(tmp_path / "none")]


def test_output_stems_never_share_a_file_name():
  stems = predict.output_stems(["x/a.png", "y/a.jpg", "x/A.jpeg", "x/b_cam.png", "y/b.png",
                                "z/.png"])
  assert stems["x/a.png"] == "a"
  assert stems["y/a.jpg"] == "y_a"            # same name from another folder
  assert stems["x/A.jpeg"] == "x_A"           # a.png vs A.png on a case-blind disk
  assert stems["y/b.png"] == "b"              # its heat map b_cam.jpg is no label map
  outputs = [s + suffix.lower() for s in stems.values() for suffix in predict.OUTPUTS.values()]
  assert len({o.lower() for o in outputs}) == len(outputs)


def test_canvases_are_few_and_fit():
  assert [predict.canvas_side(n) for n in (1, 64, 65, 500, 512, 513, 1000, 1025)] == [
      64, 64, 128, 512, 512, 640, 1024, 1280]
  for n in range(1, 3000, 7):
    assert n <= predict.canvas_side(n) <= n * 1.25 + 64
  assert predict.fit_size((3000, 4000), 1024) == (768, 1024)
  assert predict.fit_size((37, 53), 1024) == (37, 53)
  assert predict.fit_size((3000, 4000), 0) == (3000, 4000)
  items = [predict._Item(str(i), str(i), hw) for i, hw in enumerate(
      [(500, 375), (37, 53), (375, 500), (60, 40), (500, 375)])]
  batches = predict.plan_batches(items, 2, 1024)
  assert [[it.path for it in b] for b in batches] == [["1", "3"], ["2", "0"], ["4"]]


def test_inference_inputs_eagerly_equal_inside_tf_data():
  image = _rgb(37, 53)
  kwargs = dict(scales=(1.0, 0.5, 1.5), canvas=(64, 64), convention="imagenet")
  eager = pipelines.inference_inputs(image, **kwargs)
  ds = tf.data.Dataset.from_tensors(image).map(
      lambda x: pipelines.inference_inputs(x, **kwargs))
  graph = next(iter(ds))
  assert set(eager) == set(graph)
  for key in eager:
    np.testing.assert_array_equal(np.asarray(eager[key]), np.asarray(graph[key]), err_msg=key)
  assert eager["image_s2"].shape == (96, 96, 3)
  np.testing.assert_array_equal(eager["size_s2"], [56, 80])  # round(37 * 1.5) = 56 (half even)
  resized = np.asarray(transforms.resize_image(image, [56, 80]))
  np.testing.assert_allclose(eager["image_s2"][:56, :80],
                             transforms.normalize(resized).numpy(), rtol=0, atol=0)
  assert not np.any(np.asarray(eager["image_s2"])[56:])


def test_predicted_labels_take_the_top_class_at_least():
  probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.3, 0.2], [0.5, 0.5, 0.51]], np.float32)
  np.testing.assert_array_equal(cam.predicted_labels(probs, 0.5),
                                [[1, 0, 1], [0, 1, 0], [0, 0, 1]])
  assert cam.predicted_labels(probs, 0.5).dtype == np.float32


def test_label_pictures(tmp_path):
  image = _rgb(5, 6)
  label = np.zeros((5, 6), np.uint8)
  label[2:, 3:] = 2
  over = pictures.label_overlay(image, label)
  np.testing.assert_array_equal(over[label == 0], image[label == 0])
  green = np.asarray([0, 128, 0], np.float32)  # VOC's colour of class 2
  np.testing.assert_allclose(over[label == 2], (image[label == 2] + green) / 2, atol=0.51)
  io.save_png(tmp_path / "l.png", label, palette=pictures.palette())
  with Image.open(tmp_path / "l.png") as im:
    assert im.mode == "P" and im.getpalette()[6:9] == [0, 128, 0]
  np.testing.assert_array_equal(io.load_png(tmp_path / "l.png"), label)
  assert pictures.heat_overlay(image, np.ones((5, 6))).shape == (5, 6, 3)


def test_networks_of_a_workdir_and_the_stage_to_run(tmp_path):
  wd = artifacts.Workdir(tmp_path)
  with pytest.raises(UserError, match="train_seg stage .* train_cam and train_aff"):
    predict.choose_networks(str(tmp_path), "auto", None, None, None)
  os.makedirs(wd.network(artifacts.CAM_NET))
  with pytest.raises(UserError, match="or the train_aff stage"):
    predict.choose_networks(str(tmp_path), "auto", None, None, None)
  with pytest.raises(UserError, match=r"aff_net/final does not exist: run the train_aff stage"):
    predict.choose_networks(str(tmp_path), "walk", None, None, None)
  os.makedirs(wd.network(artifacts.AFF_NET))
  assert predict.choose_networks(str(tmp_path), "auto", None, None, None) == (
      "walk", {artifacts.CAM_NET: wd.network(artifacts.CAM_NET),
               artifacts.AFF_NET: wd.network(artifacts.AFF_NET)})
  with pytest.raises(UserError, match="run the train_seg stage first"):
    predict.choose_networks(str(tmp_path), "seg", None, None, None)
  os.makedirs(wd.network(artifacts.SEG_NET))
  assert predict.choose_networks(str(tmp_path), "auto", None, None, None)[0] == "seg"
  assert predict.choose_networks(None, "auto", None, "c", "a") == (
      "walk", {artifacts.CAM_NET: "c", artifacts.AFF_NET: "a"})
  for flags, match in [((None, "auto", "s", "c", None), "not both"),
                       ((None, "auto", None, "c", None), "needs --aff-net"),
                       ((None, "seg", None, "c", "a"), "not --cam-net"),
                       ((None, "auto", None, None, None), "give --workdir")]:
    with pytest.raises(UserError, match=match):
      predict.choose_networks(*flags)


def test_run_config_round_trip_and_its_absence(tmp_path):
  wd = artifacts.Workdir(tmp_path)
  with pytest.raises(UserError, match=r"config.json does not exist.*--config"):
    artifacts.load_run_config(wd)
  artifacts.save_run_config(wd, {"workdir": "/elsewhere", "data": {"canvas": (64, 64)}})
  assert artifacts.load_run_config(wd) == {"data": {"canvas": [64, 64]}}
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="unreadable run config"):
    artifacts.load_run_config(wd)
