"""experiments/irn_vs_psa.py on the tiny configs: IRN's run, then PSA's stages on its CAM files;
experiments/irn_walk_grid.py on that IRN run."""

import json
import os
import sys

from affinity_jax import io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import irn_vs_psa  # pylint: disable=g-import-not-at-top,wrong-import-position
import irn_walk_grid  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_psa_walks_the_cams_irn_made_and_the_table_compares_them(tmp_path, capsys):
  root = tmp_path / "root"
  assert irn_vs_psa.main([
      "--workdir-root", str(root), "--irn-config", "synthetic_irn:tiny",
      "--psa-config", "synthetic:tiny", "--set", f"data.data_dir={tmp_path / 'tfds'}",
      "--psa-set", "aff.crop_size=40"]) == 0
  table = capsys.readouterr().out.strip().splitlines()[-4:]
  assert table == (root / "irn_vs_psa.md").read_text().strip().splitlines()

  irn_cams = sorted(os.listdir(root / "irn" / "cams"))
  assert irn_cams and irn_cams == sorted(os.listdir(root / "psa" / "cams"))
  for name in irn_cams:  # PSA's stages read IRN's files, not CAMs of their own
    assert (root / "irn" / "cams" / name).read_bytes() == (root / "psa" / "cams" / name).read_bytes()
  for run in ("psa", "psa_nocrf"):
    assert sorted(os.listdir(root / run / "pseudo_labels")) == sorted(
        os.listdir(root / "irn" / "pseudo_labels"))
    assert not os.path.exists(root / run / "cam_net")  # no CAM network of its own
  for run in ("psa", "psa_nocrf"):  # --psa-set reaches the PSA runs only
    assert json.loads((root / run / "config.json").read_text())["aff"]["crop_size"] == 40
  assert json.loads((root / "irn" / "config.json").read_text())["aff"]["crop_size"] != 40
  for run, crf in (("psa_nocrf", False), ("irn_crf", True)):
    walk = json.loads((root / run / "fingerprints" / "random_walk.json").read_text())
    assert walk["inputs"]["config"]["random_walk.crf"] is crf
  # IRN's walk again with dCRF: the relation network and CAMs of irn/, not new ones.
  assert not os.path.exists(root / "irn_crf" / "cam_net")
  for name in irn_cams:
    assert (root / "irn_crf" / "cams" / name).read_bytes() == (
        root / "irn" / "cams" / name).read_bytes()
  assert sorted(os.listdir(root / "irn_crf" / "pseudo_labels")) == sorted(
      os.listdir(root / "irn" / "pseudo_labels"))

  runs = ("irn", "irn_crf", "psa", "psa_nocrf")
  results = {run: json.loads((root / run / "results.json").read_text()) for run in runs}
  for split, line in zip(("train", "val"), table[2:]):
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == split
    cam = 100 * results["irn"]["splits"][split]["cam"]["miou"]
    walks = [100 * results[r]["splits"][split]["rw"]["miou"] for r in runs]
    assert [float(c) for c in cells[1:]] == [
        round(v, 1) for v in (cam, 100 * results["psa"]["splits"][split]["cam"]["miou"], *walks,
                              *(w - cam for w in walks))]
  assert io.load_png(next((root / "psa" / "pseudo_labels").iterdir())).ndim == 2

  # The grid at the run's own walk values scores the train split as the evaluate stage did (a
  # row per beta), and so does the run's own network named as another run's.
  cfg = json.loads((root / "irn" / "config.json").read_text())["random_walk"]
  own = (f"{cfg['beta']:g} | {cfg['logt']} | {cfg['bg_threshold']:g} | "
         f"{100 * results['irn']['splits']['train']['rw']['miou']:.1f} | ")
  for extra in ([], ["--relation-workdir", str(root / "irn")]):
    assert irn_walk_grid.main(["--workdir", str(root / "irn"), "--betas", f"{cfg['beta']},1",
                               "--logts", str(cfg["logt"]),
                               "--bg-thresholds", str(cfg["bg_threshold"]), *extra]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if " | " in r][1:]
    assert len(rows) == 2 and rows[0].startswith(own), (rows, own)
    assert rows[1].startswith(f"1 | {cfg['logt']} | ")
