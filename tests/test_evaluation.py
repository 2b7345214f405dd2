"""`affinity-jax evaluate` and evaluation.Scores on generated label PNGs in temporary folders."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from affinity_jax import cli, evaluation
from tests import _voc_tree

# The hand example of test_metrics.py (one 255 in the ground truth), plus an image whose one
# pixel is predicted 255 ("no class").
GT_A = np.array([[0, 0, 1, 1], [2, 2, 255, 0]], np.uint8)
PRED_A = np.array([[0, 1, 1, 1], [2, 0, 2, 0]], np.uint8)
GT_B = np.array([[1, 1]], np.uint8)
PRED_B = np.array([[255, 1]], np.uint8)
NAMES = ("bg", "cat", "dog")


def _png(folder, name, label, mode="L"):
  os.makedirs(folder, exist_ok=True)
  im = Image.fromarray(np.asarray(label, np.uint8))
  if mode == "P":
    im.putpalette(_voc_tree.voc_palette())  # L -> P, indices kept: SegmentationClass style
  elif mode == "RGB":
    im = im.convert("RGB")
  path = os.path.join(folder, name + ".png")
  im.save(path)
  return path


def _hand_example(tmp_path):
  gt, pred = tmp_path / "gt", tmp_path / "pred"
  _png(gt, "a", GT_A)
  _png(gt, "b", GT_B)
  _png(pred, "a", PRED_A)
  _png(pred, "b", PRED_B)
  return str(gt), str(pred)


def _evaluate(capsys, *argv):
  code = cli.main(["evaluate", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_known_confusion_gives_known_iou(tmp_path, capsys):
  gt, pred = _hand_example(tmp_path)
  code, out, err = _evaluate(capsys, "--pred", pred, "--gt", gt, "--class-names", "bg,cat,dog")
  assert code == 0, err
  report = json.loads((tmp_path / "pred_eval.json").read_text())  # beside the predictions
  # bg: TP 2, FP 1, FN 1. cat: TP 3, FP 1, and the pixel predicted 255 is a miss: FN 1 (3/4
  # if it were ignored). dog: TP 1, FN 1. The gt 255 pixel (predicted 2) counts nowhere.
  iou = [c["iou"] for c in report["classes"]]
  np.testing.assert_allclose(iou, [2 / 4, 3 / 5, 1 / 2])
  assert report["miou"] == pytest.approx((0.5 + 0.6 + 0.5) / 3)
  assert report["confusion"] == [[2, 1, 0], [0, 3, 0], [1, 0, 1]]
  assert [c["unlabelled_pixels"] for c in report["classes"]] == [0, 1, 0]
  assert [c["name"] for c in report["classes"]] == list(NAMES)
  assert report["images"] == 2 and report["pixel_accuracy"] == pytest.approx(6 / 9)
  assert report["predictions"] == os.path.abspath(pred) and report["ground_truth"] == gt
  assert "| 1 | cat | 60.0 | 4 | 4 |" in out
  assert "mIoU 53.3% over 3 classes" in out and "1 pixels predicted 255" in out
  picture = tmp_path / "pred_confusion.png"
  with Image.open(picture) as im:
    im.load()
    assert im.format == "PNG" and 300 <= im.width <= 2000 and 300 <= im.height <= 2000
    assert np.asarray(im.convert("L")).std() > 10  # something is drawn


def test_scores_match_the_metrics_of_one_confusion():
  scores = evaluation.Scores(NAMES)
  scores.add(GT_A, PRED_A, prediction_file="p", ground_truth_file="g")
  from affinity_jax import metrics  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(scores.confusion, metrics.confusion_matrix(GT_A, PRED_A, 3))
  assert scores.miou() == metrics.mean_iou(scores.confusion)
  # A class absent from both sides has no IoU and stays out of the mean.
  scores = evaluation.Scores(("bg", "cat", "dog", "cow"))
  scores.add(GT_A, PRED_A, prediction_file="p", ground_truth_file="g")
  assert np.isnan(scores.iou()[3]) and scores.to_json()["classes"][3]["iou"] is None
  assert scores.miou() == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
  assert "| 3 | cow | n/a | 0 | 0 |" in scores.table()


def test_palette_and_greyscale_pngs_read_as_the_same_indices(tmp_path, capsys):
  rng = np.random.default_rng(0)
  label = rng.integers(0, 21, (12, 16)).astype(np.uint8)
  label[0, :4] = 255
  palette = evaluation.read_label_map(_png(tmp_path / "p", "x", label, mode="P"))
  grey = evaluation.read_label_map(_png(tmp_path / "l", "x", label))
  np.testing.assert_array_equal(palette, label)
  np.testing.assert_array_equal(grey, label)
  with Image.open(tmp_path / "p" / "x.png") as im:
    assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]  # really VOC-coloured
  # 16-bit greyscale too.
  Image.fromarray(label.astype(np.uint16)).save(tmp_path / "x16.png")
  np.testing.assert_array_equal(evaluation.read_label_map(str(tmp_path / "x16.png")), label)
  # Palette ground truth against greyscale predictions, VOC's 21 names by default.
  code, _, err = _evaluate(capsys, "--pred", str(tmp_path / "l"), "--gt", str(tmp_path / "p"),
                           "--out", str(tmp_path / "out"))
  assert code == 0, err
  report = json.loads((tmp_path / "out" / "l_eval.json").read_text())
  assert report["miou"] == 1.0 and len(report["classes"]) == 21
  assert report["classes"][15]["name"] == "person"
  with Image.open(tmp_path / "out" / "l_confusion.png") as im:
    assert im.width >= 800 and im.height >= 700  # 21 x 21 cells, legible


def test_colour_masks_are_refused_naming_the_file(tmp_path, capsys):
  gt, _ = _hand_example(tmp_path)
  rgb = _png(tmp_path / "rgb", "a", GT_A, mode="RGB")
  _png(tmp_path / "rgb", "b", GT_B)
  code, _, err = _evaluate(capsys, "--pred", str(tmp_path / "rgb"), "--gt", gt,
                           "--num-classes", "3")
  assert code == 2 and rgb in err and "RGB image" in err and "Traceback" not in err


def test_missing_files_are_counted_and_named(tmp_path, capsys):
  gt, pred = str(tmp_path / "gt"), str(tmp_path / "pred")
  for i in range(9):
    _png(gt, f"img{i}", GT_A)
  for i in (0, 1):
    _png(pred, f"img{i}", PRED_A)
  _png(pred, "stray", PRED_A)
  (tmp_path / "pred" / ".tmp-half").write_bytes(b"a killed writer's")  # not a prediction
  code, _, err = _evaluate(capsys, "--pred", pred, "--gt", gt, "--num-classes", "3")
  assert code == 2 and "Traceback" not in err
  assert f"7 of the 9 ground-truth images of {gt} have no prediction in {pred}" in err
  assert "img2.png, img3.png, img4.png, img5.png, img6.png and 2 more" in err
  assert f"1 of the 3 predictions in {pred} have no ground truth in {gt}: stray.png" in err
  assert "--partial" in err
  assert not os.path.exists(tmp_path / "pred_eval.json")  # nothing written
  # --partial: scores the two images that have both, and says what it left out.
  code, out, err = _evaluate(capsys, "--pred", pred, "--gt", gt, "--num-classes", "3",
                             "--partial")
  assert code == 0, err
  assert "left out 7 ground-truth images without a prediction" in out
  report = json.loads((tmp_path / "pred_eval.json").read_text())
  assert report["images"] == 2 and report["left_out"]["no_ground_truth"] == ["stray"]
  assert report["confusion"] == (2 * np.array([[2, 1, 0], [0, 2, 0], [1, 0, 1]])).tolist()


def test_size_mismatch_names_both_and_their_sizes(tmp_path, capsys):
  gt, pred = _hand_example(tmp_path)
  bad = _png(pred, "b", np.zeros((3, 2), np.uint8))
  code, _, err = _evaluate(capsys, "--pred", pred, "--gt", gt, "--num-classes", "3")
  assert code == 2
  assert f"{bad}: prediction is 3x2, ground truth 1x2 ({os.path.join(gt, 'b.png')})" in err


@pytest.mark.parametrize("side", ["gt", "pred"])
def test_labels_out_of_range_name_the_file_and_value(tmp_path, capsys, side):
  gt, pred = _hand_example(tmp_path)
  folder = gt if side == "gt" else pred
  bad = _png(folder, "a", np.where(GT_A == 1, 7, GT_A))
  code, _, err = _evaluate(capsys, "--pred", pred, "--gt", gt, "--class-names", "bg,cat,dog")
  assert code == 2
  what = "ground truth" if side == "gt" else "prediction"
  assert f"{bad}: {what} holds label 7, neither a class (0..2: bg .. dog) nor 255" in err
  # With the right number of classes the same files score.
  assert _evaluate(capsys, "--pred", pred, "--gt", gt, "--num-classes", "8")[0] == 0


def test_option_errors(tmp_path, capsys):
  gt, pred = _hand_example(tmp_path)
  code, _, err = _evaluate(capsys, "--pred", pred, "--gt", gt, "--num-classes", "4",
                           "--class-names", "bg,cat,dog")
  assert code == 2 and "--num-classes 4 but --class-names names 3 classes" in err
  code, _, err = _evaluate(capsys, "--pred", str(tmp_path / "nowhere"), "--gt", gt)
  assert code == 2 and f"prediction folder {tmp_path / 'nowhere'} does not exist" in err
  names = tmp_path / "names.txt"
  names.write_text("bg\ncat\ndog\n")
  code, _, err = _evaluate(capsys, "--pred", pred, "--gt", gt, "--class-names", str(names))
  assert code == 0, err
  assert json.loads((tmp_path / "pred_eval.json").read_text())["classes"][2]["name"] == "dog"


def test_voc_dataset_ground_truth_built_then_read_back(tmp_path, capsys):
  """--gt-dataset voc2012_aug: built from --manual-dir the first time, read from the prepared
  folder the next; VOC's palette masks as predictions score 100%."""
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  _voc_tree.make_voc_tree(str(manual), with_sbd=False)
  seg = manual / "VOCdevkit" / "VOC2012" / "SegmentationClass"
  pred = tmp_path / "pred"
  for name in _voc_tree.VOC_VAL:
    os.makedirs(pred, exist_ok=True)
    shutil.copy(seg / f"{name}.png", pred / f"{name}.png")
  argv = ["--pred", str(pred), "--gt-dataset", "voc2012_aug", "--split", "val",
          "--data-dir", str(data_dir), "--out", str(tmp_path / "out")]
  code, out, err = _evaluate(capsys, *argv, "--manual-dir", str(manual))
  assert code == 0, err
  assert "dataset voc2012_aug/xml_labels/1.0.0" in out and "| 0 | background | 100.0 |" in out
  first = json.loads((tmp_path / "out" / "pred_eval.json").read_text())
  assert first["miou"] == 1.0 and first["images"] == len(_voc_tree.VOC_VAL)
  assert len(first["classes"]) == 21 and first["classes"][1]["name"] == "aeroplane"
  code, _, err = _evaluate(capsys, *argv)  # prepared now: no manual dir needed
  assert code == 0, err
  assert json.loads((tmp_path / "out" / "pred_eval.json").read_text()) == first
  argv[argv.index("--split") + 1] = "train"  # no name in common
  code, _, err = _evaluate(capsys, *argv)
  assert code == 2
  assert f"no prediction in {pred} has ground truth in dataset voc2012_aug" in err


def test_which_prepared_synthetic_config_is_scored(tmp_path, capsys):
  """Two configs of synthetic_wsss prepared: the error names both; --dataset-config, or the
  record of the run that made the predictions, picks one."""
  from affinity_jax import data, fingerprints  # pylint: disable=g-import-not-at-top
  from affinity_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / "tfds"
  tiny = data.get_builder("synthetic_wsss", data_dir, config="tiny")
  data.get_builder("synthetic_wsss", data_dir, config="tiny", num_val=2, num_train=1)
  config = {c.name: c for c in synthetic.SyntheticWsss.BUILDER_CONFIGS}["tiny"]
  pred = tmp_path / "run" / "seg_pred"
  for i in range(config.num_val):
    _, mask, _ = synthetic.generate_example(config, "val", i)
    _png(pred, f"val_{i:05d}", mask)
  argv = ["--pred", str(pred), "--gt-dataset", "synthetic_wsss", "--data-dir", str(data_dir),
          "--out", str(tmp_path / "out")]
  code, _, err = _evaluate(capsys, *argv)
  assert code == 2 and "2 configs of dataset synthetic_wsss are prepared" in err
  assert "tiny, tiny_" in err and "--dataset-config" in err
  code, _, err = _evaluate(capsys, *argv, "--dataset-config", "tiny")
  assert code == 0, err
  assert json.loads((tmp_path / "out" / "seg_pred_eval.json").read_text())["miou"] == 1.0
  record = {"stage": "infer_seg", "fingerprint": "x", "complete": True,
            "inputs": {"dataset": fingerprints.dataset_digest(tiny.info)}}
  os.makedirs(tmp_path / "run" / "fingerprints")
  (tmp_path / "run" / "fingerprints" / "infer_seg.json").write_text(json.dumps(record))
  code, out, err = _evaluate(capsys, *argv)
  assert code == 0, err
  assert f"synthetic_wsss/tiny/{tiny.info.version}" in out
