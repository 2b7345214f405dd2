"""voc2012_aug on a generated miniature VOCdevkit + SBD tree, through tfds' real build path."""

import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from affinity_jax import data
from affinity_jax.data import voc
from affinity_jax.errors import UserError
from tests import _voc_tree


def _prepare(manual_dir, data_dir, config="xml_labels"):
  builder = voc.Voc2012Aug(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _examples(builder, split):
  return {ex["name"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("voc_manual")
  expected = _voc_tree.make_voc_tree(str(root))
  return root, expected


@pytest.fixture(scope="module")
def xml_builder(tree, tmp_path_factory):
  return _prepare(tree[0], tmp_path_factory.mktemp("tfds_xml"))


def test_split_membership_and_counts(xml_builder):
  assert xml_builder.info.splits["train"].num_examples == len(_voc_tree.VOC_TRAIN)
  assert xml_builder.info.splits["val"].num_examples == len(_voc_tree.VOC_VAL)
  assert xml_builder.info.splits["train_aug"].num_examples == len(_voc_tree.TRAIN_AUG)
  assert sorted(data.split_names(xml_builder, "train")) == sorted(_voc_tree.VOC_TRAIN)
  assert sorted(data.split_names(xml_builder, "val")) == sorted(_voc_tree.VOC_VAL)
  train_aug = set(data.split_names(xml_builder, "train_aug"))
  assert train_aug == set(_voc_tree.TRAIN_AUG)
  assert not train_aug & set(_voc_tree.VOC_VAL)  # SBD ids that are VOC val are left out.


def test_images_masks_and_xml_labels(tree, xml_builder):
  root, expected = tree
  examples = _examples(xml_builder, "train_aug")
  examples.update(_examples(xml_builder, "val"))
  for name, ex in examples.items():
    height, width = expected["sizes"][name]
    assert ex["image"].shape == (height, width, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (height, width, 1) and ex["mask"].dtype == np.uint8
    assert ex["has_mask"]
    # VOC's palette PNG when it exists (255 boundary kept), else SBD's GTcls.Segmentation.
    np.testing.assert_array_equal(ex["mask"][..., 0], expected["masks"][name], err_msg=name)
    assert ex["label"].dtype == np.float32 and ex["label"].shape == (20,)
    np.testing.assert_array_equal(ex["label"], expected["xml_labels"][name], err_msg=name)
  # The difficult object of 2007_000002 counts in the XML label although no pixel shows it.
  potted = voc.VOC_CLASSES.index("pottedplant")
  assert examples["2007_000002"]["label"][potted] == 1.0
  assert potted + 1 not in examples["2007_000002"]["mask"]
  # The SBD-only image is read from SBD's img folder, decoded to PIL's pixels (voc.VocImage).
  sbd_jpeg = os.path.join(root, "benchmark_RELEASE", "dataset", "img", "2008_000100.jpg")
  np.testing.assert_array_equal(examples["2008_000100"]["image"],
                                np.asarray(Image.open(sbd_jpeg).convert("RGB")))


def test_mask_labels_config(tree, tmp_path):
  root, expected = tree
  builder = _prepare(root, tmp_path, config="mask_labels")
  examples = _examples(builder, "train_aug")
  for name, ex in examples.items():
    np.testing.assert_array_equal(ex["label"], expected["mask_labels"][name], err_msg=name)
  assert examples["2007_000002"]["label"][voc.VOC_CLASSES.index("pottedplant")] == 0.0


def test_without_sbd_only_train_and_val(tmp_path):
  _voc_tree.make_voc_tree(str(tmp_path / "manual"), with_sbd=False)
  builder = data.get_builder("voc2012_aug", tmp_path / "tfds", manual_dir=tmp_path / "manual")
  assert set(builder.info.splits) == {"train", "val"}
  assert data.class_names(builder) == voc.VOC_CLASSES and data.num_classes(builder) == 20
  with pytest.raises(UserError, match="no split 'train_aug'"):
    data.split_names(builder, "train_aug")


def test_unprepared_without_manual_dir_says_which_key(tmp_path):
  with pytest.raises(UserError, match="data.manual_dir"):
    data.get_builder("voc2012_aug", tmp_path)


def _broken_tree(tmp_path, breakage):
  root = tmp_path / "manual"
  _voc_tree.make_voc_tree(str(root), with_sbd=False)
  return root, breakage(root / "VOCdevkit" / "VOC2012")


def _remove_folder(voc_root):
  shutil.rmtree(voc_root / "SegmentationClass")
  return str(voc_root / "SegmentationClass")


def _remove_listed_image(voc_root):
  os.remove(voc_root / "JPEGImages" / "2007_000003.jpg")
  return "2007_000003.jpg"


def _corrupt_image(voc_root):
  path = voc_root / "JPEGImages" / "2007_000010.jpg"
  path.write_bytes(path.read_bytes()[:200])  # A truncated JPEG.
  return "2007_000010.jpg"


def _rgb_mask(voc_root):
  path = voc_root / "SegmentationClass" / "2007_000001.png"
  Image.open(path).convert("RGB").save(path)
  return "2007_000001.png"


def _unknown_class_in_xml(voc_root):
  path = voc_root / "Annotations" / "2007_000001.xml"
  path.write_text(path.read_text().replace("<name>", "<name>unicorn", 1))
  return "2007_000001.xml"


@pytest.mark.parametrize("breakage", [_remove_folder, _remove_listed_image, _rgb_mask,
                                      _unknown_class_in_xml])
def test_bad_tree_errors_name_the_file(tmp_path, breakage):
  root, culprit = _broken_tree(tmp_path, breakage)
  with pytest.raises(UserError) as info:
    _prepare(root, tmp_path / "tfds")
  assert culprit in str(info.value)


def test_an_undecodable_image_is_left_out_and_named(tmp_path, capsys):
  # A damaged file costs its image, not the build (more: tests/test_hostile_inputs.py).
  root, culprit = _broken_tree(tmp_path, _corrupt_image)
  builder = _prepare(root, tmp_path / "tfds")
  assert data.split_names(builder, "val") == ["2007_000011"]
  reason = builder.info.metadata["left_out"]["val"]["2007_000010"]
  assert culprit in reason and "cannot be decoded" in reason
  assert f"leaving out 2007_000010: {reason}" in capsys.readouterr().out


def test_label_from_mask_ignores_boundary_and_background():
  mask = np.array([[0, 255, 3], [20, 3, 0]], np.uint8)
  label = voc.label_from_mask(mask, 20)
  assert label.tolist() == [1.0 if c in (3, 20) else 0.0 for c in range(1, 21)]
