"""The Caffe reader on files written byte by byte from the protobuf wire format (by the test's own
encoder, tests/_vgg16_fixtures.py, not the reader's), in the V2 and V1 layouts; the converter
and `affinity-jax convert caffe`; damaged and foreign files."""

from __future__ import annotations

import os
import struct

import jax
import numpy as np
import pytest

from affinity_jax import checkpoint, cli, convert
from affinity_jax.convert import ConversionError
from tests import _vgg16_fixtures as fx

W = fx.TINY_WIDTH


def _trunk_layers(seed: int = 0) -> tuple[dict, dict]:
  """(state dict of the tiny trunk, the same as Caffe layers: name -> [weight, bias])."""
  sd = fx.random_state_dict("vgg16d", seed=seed)
  layers = {name[:-len(".weight")]: [sd[name], sd[name[:-len("weight")] + "bias"]]
            for name in sd if name.endswith(".weight")}
  return sd, layers


def test_encoder_writes_the_documented_bytes():
  # Field 1, varint 150 (the protobuf documentation's example): 08 96 01.
  assert fx.key(1, 0) + fx.varint(150) == b"\x08\x96\x01"
  assert fx.length_field(2, b"ab") == b"\x12\x02ab"
  assert fx.blob(np.array([1.5], np.float32), "v1")[-5:] == b"\x2d" + struct.pack("<f", 1.5)


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_reader_round_trip(tmp_path, layout):
  _, layers = _trunk_layers()
  path = tmp_path / "vgg.caffemodel"
  path.write_bytes(fx.caffemodel(layers, layout, extra={"relu1_1": "ReLU", "pool1": "Pooling"}))
  got = convert.read_caffemodel(str(path))
  assert list(got) == list(layers)  # blob-less layers are not listed
  for name, blobs in layers.items():
    weight, bias = got[name]
    np.testing.assert_array_equal(weight, blobs[0])
    # V1 stores a bias as 1 x 1 x 1 x O (legacy dims); V2 with its own shape.
    np.testing.assert_array_equal(bias.reshape(-1), blobs[1])
    assert bias.shape == ((1, 1, 1) + blobs[1].shape if layout == "v1" else blobs[1].shape)


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_convert_caffe_writes_the_vgg16_backbone(tmp_path, layout):
  sd, layers = _trunk_layers(seed=1)
  layers["fc8"] = [np.ones((5, 128, 1, 1), np.float32), np.zeros(5, np.float32)]
  src = tmp_path / "vgg16_20M.caffemodel"
  src.write_bytes(fx.caffemodel(layers, layout))
  meta = convert.convert_caffe(str(src), str(tmp_path / "out"))
  assert meta["dropped"] == ["fc8"] and meta["backbone"] == "vgg16" and meta["width"] == W
  variables, saved = checkpoint.load_variables(str(tmp_path / "out"))
  checkpoint.check_compatible(saved, arch="backbone", width=W, backbone="vgg16")
  want = convert.psa_state_dict_to_variables(sd, "backbone", width=W, backbone="vgg16")
  jax.tree.map(np.testing.assert_array_equal, variables, want)
  np.testing.assert_array_equal(variables["params"]["conv3_2"]["kernel"],
                                sd["conv3_2.weight"].transpose(2, 3, 1, 0))


def test_cli_convert_caffe(tmp_path, capsys):
  _, layers = _trunk_layers(seed=2)
  layers["fc8_voc12"] = [np.ones((21, 128, 1, 1), np.float32), np.zeros(21, np.float32)]
  src = tmp_path / "vgg16_20M.caffemodel"
  src.write_bytes(fx.caffemodel(layers))
  assert cli.main(["convert", "caffe", str(src), str(tmp_path / "out")]) == 0
  out = capsys.readouterr().out
  assert "left out layers outside the VGG-16 trunk: fc8_voc12" in out and "wrote" in out
  assert checkpoint.load_metadata(str(tmp_path / "out"))["source"] == "caffe vgg16_20M.caffemodel"


def test_truncated_damaged_and_foreign_files_are_named(tmp_path, capsys):
  _, layers = _trunk_layers()
  data = fx.caffemodel(layers)
  for cut in (3, 40, len(data) // 2, len(data) - 1):
    bad = tmp_path / f"cut{cut}.caffemodel"
    bad.write_bytes(data[:cut])
    with pytest.raises(ConversionError, match=f"cut{cut}.caffemodel: "):
      convert.convert_caffe(str(bad), str(tmp_path / "o"))
  prototxt = tmp_path / "vgg16.prototxt"
  prototxt.write_text('name: "VGG"\nlayer {\n  name: "conv1_1"\n}\n')
  with pytest.raises(ConversionError, match=r"vgg16.prototxt: not a Caffe model .*prototxt"):
    convert.read_caffemodel(str(prototxt))
  empty = tmp_path / "empty.caffemodel"
  empty.write_bytes(fx.length_field(1, b"net with no weights"))
  with pytest.raises(ConversionError, match="empty.caffemodel: holds no layer with weights"):
    convert.read_caffemodel(str(empty))
  del layers["conv4_2"]
  short = tmp_path / "short.caffemodel"
  short.write_bytes(fx.caffemodel(layers))
  with pytest.raises(ConversionError,
                     match=r"(?s)short.caffemodel: .*missing \(2\): conv4_2.weight"):
    convert.convert_caffe(str(short), str(tmp_path / "o"))
  with pytest.raises(ConversionError, match="no such file"):
    convert.read_caffemodel(str(tmp_path / "absent.caffemodel"))
  folder = tmp_path / "weights.caffemodel"
  folder.mkdir()
  for read in (convert.read_caffemodel, convert.read_mxnet_params):
    with pytest.raises(ConversionError, match="weights.caffemodel: a folder, not a weight file"):
      read(str(folder))
  unreadable = tmp_path / "locked.caffemodel"
  unreadable.write_bytes(data)
  unreadable.chmod(0)
  if not os.access(unreadable, os.R_OK):  # root reads it anyway
    with pytest.raises(ConversionError, match="locked.caffemodel: cannot be read"):
      convert.read_caffemodel(str(unreadable))
  argv = ["convert", "caffe", str(tmp_path / "cut40.caffemodel"), str(tmp_path / "o")]
  assert cli.main(argv) == 2
  assert "cut40.caffemodel" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o")
