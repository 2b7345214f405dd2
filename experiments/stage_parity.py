"""Stage parity: the original's infer_cls.py and infer_aff.py against our infer_cam, aff_labels
and random_walk, on the same JPEG files and the same weights.

`python experiments/compare_pytorch.py --psa-root DIR --stages` runs this (compare_pytorch.py
parses the arguments; see its --help). In a folder (`--workdir`, else a temporary one):

1. a small VOC tree, `manual/VOCdevkit/VOC2012/` (JPEGs of the `--sizes` sizes, smooth content
   with coloured ellipses, one or two classes per image; XML annotations with those classes,
   palette-PNG masks, ImageSets/Segmentation lists): what our `voc2012_aug` builder reads and
   what the original's `--voc12_root` names. For the original also `original/infer_list.txt`
   (its list format) and `original/voc12/cls_labels.npy` (its labels, the XML's classes): its
   VOC12ClsDataset reads that file relative to the current folder, so its scripts run with
   `original/` as theirs;
2. full-width resnet38_cls and resnet38_aff state dicts (`--weights-cam/--weights-aff`, else
   seeded random ones with non-trivial BatchNorm statistics, psa_original.random_state_dict,
   the CAM network's fc8 centred on the images' features so that no CAM is flat:
   `centre_classes`) saved as `weights/*.pth`, and converted with our CLI (`affinity-jax
   convert psa-pytorch ... --arch cam|affinity`) straight into `ours/cam_net/final` and
   `ours/aff_net/final`, where the stages take trained networks (a network that no stage of
   the workdir made counts by its files, affinity_jax/fingerprints.py);
3. the original's own scripts, files untouched, in subprocesses (psa_original.run_script):
   infer_cls.py (scales 1, 0.5, 1.5, 2 with flips; --out_cam, --out_la_crf, --out_ha_crf with
   alphas 4 and 32), then infer_aff.py (beta 8, logt 8, alpha 16) on its CAMs;
4. ours through our CLI: `affinity-jax run --config configs/voc_resnet38.py --stages
   infer_cam,aff_labels,random_walk` with the data, workdir and split overrides, full width,
   and `random_walk.crf` off where the config has it (the paper's dCRF after the walk, which
   infer_aff.py does not do); config values of the original's other settings
   (ORIGINAL_SETTINGS) are not overridden: those that differ are printed and listed in the JSON
   (`config_drift`);
5. per image: the CAM of each present class (max |ours - theirs| / max |theirs|), the la and ha
   label maps (argmax of the dCRF scores, as class ids) and the random-walk pseudo labels
   (share of equal pixels), each over the image and over its border band (pixels within
   BORDER px of an edge; the CAM's band figure keeps the whole image's max |theirs| as
   denominator). Targets: CAMs within 1e-4, label maps equal on >= 99.9% of the pixels of every
   image, band included. "walk moved" is the share of pixels whose label the original's walk
   changed from the CAM argmax (with its background), so that equal walks are not trivially
   equal.

With `--workdir`, a rerun keeps the tree, the weights and the original's outputs when the
sizes and seed are the same (the original is deterministic and slow on a CPU) and redoes ours;
without it, the temporary folder (~1.6 GB at full width) is deleted at the end.
Exit status 0 whether or not the targets are met; 1 when a step fails to run (its log is in
`logs/`; the folder is then kept).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.sax.saxutils

import numpy as np
from PIL import Image

from affinity_jax import io as aj_io  # no JAX: atomic writes

import psa_original as po

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(ROOT, "configs", "voc_resnet38.py")
OUR_STAGES = "infer_cam,aff_labels,random_walk"

# The images: height x width (VOC's common shapes) and, with --quick, a fifth of them.
SIZES = ((375, 500), (500, 375), (333, 500), (281, 500))
QUICK_SIZES = ((75, 100), (100, 75), (67, 100), (56, 100))
BORDER = 32
CAM_TARGET, LABEL_TARGET_PCT = 1e-4, 99.9
# The original's infer_cls.py settings (passed explicitly; they are also its defaults).
LOW_ALPHA, HIGH_ALPHA = 4, 32
# Our config keys that hold the original's settings (infer_cls.py, imutils.crf_inference,
# infer_aff.py): a config that differs is reported, not overridden, so that drift shows.
ORIGINAL_SETTINGS = {
    "cam_infer.scales": (1.0, 0.5, 1.5, 2.0), "aff_labels.alpha_low": LOW_ALPHA,
    "aff_labels.alpha_high": HIGH_ALPHA, "aff_labels.crf_iters": 10,
    "random_walk.beta": po.BETA, "random_walk.logt": po.LOGT, "random_walk.alpha": po.RW_ALPHA,
    "random_walk.radius": po.RADIUS, "random_walk.scheme": "psa", "random_walk.tol": -1.0,
    "aff.image_scale": 1.0}
MANIFEST_VERSION = 2


class StepFailed(RuntimeError):
  """A step (a script, our CLI) exited with an error; the message names its log."""


# ---------------------------------------------------------------------------------------------
# The VOC tree.


def image_name(i: int) -> str:
  """VOC-shaped ids: the original's list reader keeps 11 characters of each."""
  return f"2011_{i:06d}"


def image_classes(i: int) -> list[int]:
  """0-based VOC classes of image i: one for even i, two for odd i."""
  first = (14 + 5 * i) % 20
  return [first] if i % 2 == 0 else sorted({first, (first + 7) % 20})


def voc_like_image(h: int, w: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """[h, w, 3] uint8 smooth content (a colour gradient, low-frequency noise, five soft-edged
  ellipses, a little pixel noise) and the boolean masks of the first two ellipses."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w] / np.array([h, w]).reshape(2, 1, 1)
  c0, c1 = rng.uniform(30, 225, (2, 3))
  img = c0 * (1 - xx[..., None]) + c1 * xx[..., None]
  coarse = rng.normal(0, 25, (6, 8, 3))
  low = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32), mode="F")
                             .resize((w, h), Image.BICUBIC)) for c in range(3)], -1)
  img = img + low
  regions = []
  for _ in range(5):
    cy, cx = rng.uniform(0.2, 0.8, 2)
    ry, rx = rng.uniform(0.12, 0.3, 2)
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    weight = np.clip((1.15 - d) / 0.3, 0, 1)[..., None]  # soft edge
    img = img * (1 - weight) + rng.uniform(0, 255, 3) * weight
    regions.append(d < 1)
  img += rng.normal(0, 3, img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8), regions[:2]


def voc_classes() -> tuple[str, ...]:
  """VOC's class names in label order (the original's CAT_LIST order too). Imported when
  needed: affinity_jax.data loads TensorFlow, which argument checks do without."""
  from affinity_jax.data.voc_files import VOC_CLASSES
  return VOC_CLASSES


def voc_palette() -> list[int]:
  from affinity_jax.pictures import palette
  return palette().reshape(-1).tolist()


def write_voc_tree(manual_dir: str, sizes, seed: int) -> list[dict]:
  """VOCdevkit/VOC2012 under `manual_dir`; returns [{"name", "size", "classes"}] per image."""
  voc = os.path.join(manual_dir, "VOCdevkit", "VOC2012")
  for sub in ("JPEGImages", "Annotations", "SegmentationClass",
              os.path.join("ImageSets", "Segmentation")):
    os.makedirs(os.path.join(voc, sub), exist_ok=True)
  images = []
  for i, (h, w) in enumerate(sizes):
    name, classes = image_name(i), image_classes(i)
    pixels, regions = voc_like_image(h, w, seed + i)
    Image.fromarray(pixels).save(os.path.join(voc, "JPEGImages", name + ".jpg"), quality=90)
    mask = np.zeros((h, w), np.uint8)
    for cls, region in zip(classes, regions):
      mask[region] = cls + 1
    png = Image.fromarray(mask, mode="P")
    png.putpalette(voc_palette())
    png.save(os.path.join(voc, "SegmentationClass", name + ".png"))
    objects = "".join(
        f"<object><name>{xml.sax.saxutils.escape(voc_classes()[c])}</name><difficult>0"
        f"</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>{w}</xmax><ymax>{h}</ymax>"
        "</bndbox></object>" for c in classes)
    with open(os.path.join(voc, "Annotations", name + ".xml"), "w") as f:
      f.write(f"<annotation><filename>{name}.jpg</filename><size><width>{w}</width><height>"
              f"{h}</height><depth>3</depth></size><segmented>1</segmented>{objects}"
              "</annotation>")
    images.append({"name": name, "size": [h, w], "classes": classes})
  lists = os.path.join(voc, "ImageSets", "Segmentation")
  for split, names in (("train", [m["name"] for m in images]), ("val", [images[0]["name"]])):
    with open(os.path.join(lists, split + ".txt"), "w") as f:
      f.write("".join(n + "\n" for n in names))
  return images


def write_original_inputs(folder: str, images: list[dict], names: list[str]) -> str:
  """`folder`/voc12/cls_labels.npy (every image) and an infer list of `names` in the original's
  list format; returns the list's path."""
  os.makedirs(os.path.join(folder, "voc12"), exist_ok=True)
  labels = {}
  for m in images:
    label = np.zeros(po.NUM_CLASSES, np.float32)
    label[m["classes"]] = 1.0
    labels[m["name"]] = label
  np.save(os.path.join(folder, "voc12", "cls_labels.npy"), labels)
  path = os.path.join(folder, "infer_list.txt")
  with open(path, "w") as f:
    f.write("".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in names))
  return path


# ---------------------------------------------------------------------------------------------
# Weights and subprocesses.


def centre_classes(orig, net, state: dict, jpegs: list[str]) -> None:
  """Makes each class's fc8 row orthogonal to the mean conv6 feature of the images (a quarter
  of their size), in `state`: conv6 features are >= 0, so a random fc8 row often gives a
  response of one sign over a whole image, hence a CAM that is 0 everywhere (relu) or nearly
  flat; centred, each class is positive on part of every image and its CAM has structure."""
  torch = orig.torch
  net.load_state_dict(state, strict=True)
  net.eval()
  means = []
  with torch.no_grad():
    for path in jpegs:
      img = Image.open(path).convert("RGB")
      img = img.resize((max(img.size[0] // 4, 65), max(img.size[1] // 4, 65)), Image.BICUBIC)
      x = po.to_torch(orig, po.normalise(orig, np.asarray(img)))
      features = orig.backbone.Net.forward(net, x)  # conv6, what forward_cam applies fc8 to
      means.append(features.mean((0, 2, 3)))
  mean = torch.stack(means).mean(0)
  w = state["fc8.weight"][:, :, 0, 0]
  w = w - (w @ mean)[:, None] * mean[None, :] / (mean @ mean)
  state["fc8.weight"] = w[:, :, None, None].contiguous()


def make_weights(args, folder: str, jpegs: list[str]) -> dict[str, str]:
  """{"cam": .pth, "affinity": .pth}: the given files, or seeded random state dicts saved (the
  CAM network's classes centred on the images' features, `centre_classes`)."""
  paths = {"cam": args.weights_cam, "affinity": args.weights_aff}
  if all(paths.values()):
    return paths
  orig = po.load_original(args.psa_root, "cpu")
  os.makedirs(folder, exist_ok=True)
  for kind, seed, file in (("cam", args.seed, "resnet38_cls.pth"),
                           ("affinity", args.seed + 1, "resnet38_aff.pth")):
    if paths[kind]:
      continue
    path = os.path.join(folder, file)
    if not os.path.isfile(path):
      net = (orig.cls if kind == "cam" else orig.aff).Net()
      state = po.random_state_dict(net, seed)
      if kind == "cam":
        centre_classes(orig, net, state, jpegs)
      net.load_state_dict(state, strict=True)
      orig.torch.save(state, path + ".tmp")
      os.replace(path + ".tmp", path)
      del net, state
    paths[kind] = path
  return paths


def run_logged(cmd: list[str], log: str, cwd: str, what: str) -> float:
  """Runs `cmd` with its output in `log`; returns its seconds, or raises StepFailed."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  print(f"  {what} (log: {log})", flush=True)
  t0 = time.time()
  with open(log, "w") as f:
    f.write("$ " + " ".join(cmd) + f"\n(cwd {cwd})\n")
    f.flush()
    res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
  seconds = time.time() - t0
  if res.returncode != 0:
    with open(log) as f:
      tail = f.read()[-3000:]
    raise StepFailed(f"{what} failed (exit status {res.returncode}); {log} ends:\n{tail}")
  print(f"  {what}: {seconds:.0f} s", flush=True)
  return seconds


def original_outputs(root: str) -> dict[str, str]:
  return {k: os.path.join(root, "original", k) for k in ("out_cam", "out_la", "out_ha", "out_rw")}


def run_original(args, root: str, images: list[dict], weights: dict) -> dict[str, float]:
  """infer_cls.py and infer_aff.py of the checkout on the images whose outputs are missing."""
  folder = os.path.join(root, "original")
  out = original_outputs(root)
  for d in out.values():
    os.makedirs(d, exist_ok=True)
  voc12_root = os.path.join(root, "manual", "VOCdevkit", "VOC2012")
  runner = [sys.executable, os.path.join(HERE, "psa_original.py"), args.psa_root]
  names = [m["name"] for m in images]
  seconds = {}
  todo = [n for n in names if not all(os.path.isfile(os.path.join(out[k], n + ".npy"))
                                      for k in ("out_cam", "out_la", "out_ha"))]
  if todo:
    infer_list = write_original_inputs(folder, images, todo)
    seconds["original infer_cls"] = run_logged(runner + [
        "infer_cls.py", "--network", "network.resnet38_cls", "--weights", weights["cam"],
        "--infer_list", infer_list, "--voc12_root", voc12_root, "--num_workers", "1",
        "--low_alpha", str(LOW_ALPHA), "--high_alpha", str(HIGH_ALPHA),
        "--out_cam", out["out_cam"], "--out_la_crf", out["out_la"],
        "--out_ha_crf", out["out_ha"]], os.path.join(root, "logs", "original_infer_cls.log"),
        folder, f"original infer_cls.py, {len(todo)} image(s)")
  todo = [n for n in names if not os.path.isfile(os.path.join(out["out_rw"], n + ".png"))]
  if todo:
    infer_list = write_original_inputs(folder, images, todo)
    seconds["original infer_aff"] = run_logged(runner + [
        "infer_aff.py", "--network", "network.resnet38_aff", "--weights", weights["affinity"],
        "--infer_list", infer_list, "--voc12_root", voc12_root, "--num_workers", "1",
        "--cam_dir", out["out_cam"], "--out_rw", out["out_rw"], "--alpha", str(po.RW_ALPHA),
        "--beta", str(po.BETA), "--logt", str(po.LOGT)],
        os.path.join(root, "logs", "original_infer_aff.log"), folder,
        f"original infer_aff.py, {len(todo)} image(s)")
  return seconds


def load_config():
  from affinity_jax import config as config_lib  # ml_collections only
  return config_lib.load_config(CONFIG)


def config_drift() -> list[str]:
  """'key: ours vs the original's' for each ORIGINAL_SETTINGS key the config sets otherwise."""
  cfg = load_config()
  out = []
  for key, theirs in ORIGINAL_SETTINGS.items():
    section, leaf = key.split(".")
    ours = cfg[section][leaf]
    same = (tuple(ours) == tuple(theirs) if isinstance(theirs, tuple)
            else (ours <= 0) if key == "random_walk.tol" else ours == theirs)
    if not same:
      out.append(f"{key}: {ours!r} vs the original's {theirs!r}")
  return out


def cli(*args) -> list[str]:
  return [sys.executable, "-m", "affinity_jax.cli", *args]


def run_ours(args, root: str, weights: dict) -> dict[str, float]:
  """Converts the weights into a fresh workdir and runs our three stages through the CLI."""
  workdir, data_dir = os.path.join(root, "ours"), os.path.join(root, "tfds")
  for d in (workdir, data_dir):  # ours is always redone: the tree is the one thing kept
    shutil.rmtree(d, ignore_errors=True)
  logs = os.path.join(root, "logs")
  seconds = {}
  for kind, net in (("cam", "cam_net"), ("affinity", "aff_net")):
    run_logged(cli("convert", "psa-pytorch", weights[kind],
                   os.path.join(workdir, net, "final"), "--arch", kind),
               os.path.join(logs, f"ours_convert_{kind}.log"), root, f"our convert ({kind})")
  overrides = [f"--config.data.manual_dir={os.path.join(root, 'manual')}",
               f"--config.data.data_dir={data_dir}", "--config.data.pseudo_splits=('train',)",
               "--config.model.width=1.0"]
  if args.canvas:
    overrides.append(f"--config.data.canvas={tuple(args.canvas)}")
  if "crf" in load_config().random_walk:
    # The paper's dCRF on the walked scores: infer_aff.py stops at the argmax.
    overrides.append("--config.random_walk.crf=False")
  seconds["ours infer_cam+aff_labels+random_walk"] = run_logged(
      cli("run", "--config", CONFIG, "--stages", OUR_STAGES, "--workdir", workdir,
          *overrides), os.path.join(logs, "ours_run.log"), root,
      f"our {OUR_STAGES} (affinity-jax run)")
  return seconds


# ---------------------------------------------------------------------------------------------
# Comparison.


def border_band(h: int, w: int, width: int = BORDER) -> np.ndarray:
  """[h, w] bool: pixels within `width` px of an edge."""
  y, x = np.arange(h)[:, None], np.arange(w)[None, :]
  return np.minimum(np.minimum(y, h - 1 - y), np.minimum(x, w - 1 - x)) < width


def label_from_scores(stack: np.ndarray, ids) -> np.ndarray:
  """[K, H, W] scores and their K class ids (0 background, c + 1 class c) -> [H, W] ids."""
  return np.asarray(ids, np.uint8)[np.argmax(stack, 0)]


def equal_pct(a: np.ndarray, b: np.ndarray, band: np.ndarray) -> dict[str, float]:
  if a.shape != b.shape:
    raise ValueError(f"label maps of shapes {a.shape} and {b.shape}")
  same = a == b
  return {"all": 100.0 * float(same.mean()), "border": 100.0 * float(same[band].mean())}


def load_dict(path: str) -> dict:
  return np.load(path, allow_pickle=True).item()


def compare_image(root: str, m: dict) -> dict:
  """Every figure of one image (see the module docstring)."""
  from affinity_jax import artifacts  # no JAX
  name, (h, w) = m["name"], m["size"]
  out = original_outputs(root)
  ours = artifacts.Workdir(os.path.join(root, "ours"))
  band = border_band(h, w)
  res = {"size": [h, w], "classes": [voc_classes()[c] for c in m["classes"]]}

  cam_t = load_dict(os.path.join(out["out_cam"], name + ".npy"))
  cam_j, ids_j = artifacts.load_cam_present(ours.cam(name))
  if sorted(cam_t) != sorted(int(i) for i in ids_j):
    raise ValueError(f"{name}: classes differ: original {sorted(cam_t)}, ours {ids_j.tolist()}")
  cam_rel = {}
  for k, cls in enumerate(ids_j):
    theirs, mine = np.asarray(cam_t[int(cls)], np.float64), cam_j[..., k].astype(np.float64)
    if theirs.shape != mine.shape:
      raise ValueError(f"{name}: CAM of class {cls}: {mine.shape} vs {theirs.shape}")
    scale = max(float(np.abs(theirs).max()), 1e-30)
    err = np.abs(mine - theirs)
    cam_rel[voc_classes()[int(cls)]] = {"all": float(err.max()) / scale,
                                      "border": float(err[band].max()) / scale}
  res["cam_max_rel"] = cam_rel

  la_j, ha_j = artifacts.load_scores(ours.scores(name), (h, w), po.NUM_CLASSES + 1)
  ids = [0] + [int(c) + 1 for c in ids_j]
  for key, mine, folder in (("la", la_j, "out_la"), ("ha", ha_j, "out_ha")):
    theirs = load_dict(os.path.join(out[folder], name + ".npy"))
    t_ids = sorted(theirs)
    label_t = label_from_scores(np.stack([theirs[k] for k in t_ids]), t_ids)
    label_j = label_from_scores(np.moveaxis(mine, -1, 0), ids)
    res[f"{key}_equal_pct"] = equal_pct(label_j, label_t, band)

  rw_t = np.asarray(Image.open(os.path.join(out["out_rw"], name + ".png")))
  rw_j = artifacts.load_label(ours.pseudo_label(name), "random_walk", (h, w))
  res["rw_equal_pct"] = equal_pct(rw_j, rw_t, band)
  # The original's labels before its walk: argmax of (bg (1 - max)^alpha, its CAMs).
  t_ids = sorted(cam_t)
  stack = np.stack([cam_t[k] for k in t_ids])
  before = label_from_scores(np.concatenate([(1 - stack.max(0, keepdims=True)) ** po.RW_ALPHA,
                                             stack]), [0] + [k + 1 for k in t_ids])
  res["rw_moved_pct"] = 100.0 * float(np.mean(before != rw_t))
  return res


def targets(per_image: dict) -> dict[str, bool]:
  def cams_ok(r):
    return all(v[p] <= CAM_TARGET for v in r["cam_max_rel"].values() for p in ("all", "border"))

  def labels_ok(r, key):
    return all(r[key][p] >= LABEL_TARGET_PCT for p in ("all", "border"))
  out = {"cam": all(cams_ok(r) for r in per_image.values())}
  for key in ("la", "ha", "rw"):
    out[key] = all(labels_ok(r, f"{key}_equal_pct") for r in per_image.values())
  out["all"] = all(out.values())
  return out


def table(per_image: dict) -> str:
  header = ("image", "HxW", "classes", "CAM max rel (all / band)", "la equal % (all / band)",
            "ha equal % (all / band)", "RW equal % (all / band)", "walk moved %")
  rows = []
  for name, r in per_image.items():
    cam_all = max(v["all"] for v in r["cam_max_rel"].values())
    cam_band = max(v["border"] for v in r["cam_max_rel"].values())
    pct = lambda key: f"{r[key]['all']:.3f} / {r[key]['border']:.3f}"  # noqa: E731
    rows.append((name, "x".join(map(str, r["size"])), ",".join(r["classes"]),
                 f"{cam_all:.2e} / {cam_band:.2e}", pct("la_equal_pct"), pct("ha_equal_pct"),
                 pct("rw_equal_pct"), f"{r['rw_moved_pct']:.1f}"))
  widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
  lines = [" | ".join(str(v).ljust(n) for v, n in zip(r, widths)).rstrip()
           for r in [header, tuple("-" * n for n in widths)] + rows]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def prepare_folder(args, root: str) -> list[dict]:
  """The tree (kept from an earlier run with the same sizes and seed, else rewritten)."""
  manifest = {"version": MANIFEST_VERSION, "sizes": [list(s) for s in args.sizes],
              "seed": args.seed, "weights_cam": args.weights_cam,
              "weights_aff": args.weights_aff}
  path = os.path.join(root, "manifest.json")
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("manifest") == manifest:
      print(f"  reusing the tree, weights and the original's outputs in {root}", flush=True)
      return old["images"]
  for d in ("manual", "original", "weights", "ours", "tfds", "logs"):
    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
  images = write_voc_tree(os.path.join(root, "manual"), args.sizes, args.seed)
  aj_io.save_json(path, {"manifest": manifest, "images": images})  # whole or absent
  return images


def run(args) -> dict:
  """The whole comparison; `args` from compare_pytorch.parse_args with --stages."""
  t0 = time.time()
  root = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(
      prefix="stage_parity_")
  os.makedirs(root, exist_ok=True)
  print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}; "
        f"folder {root}", flush=True)
  images = prepare_folder(args, root)
  sizes = ", ".join("x".join(map(str, m["size"])) for m in images)
  print(f"images (HxW): {sizes}; canvas {args.canvas or 'of the config'}", flush=True)
  drift = config_drift()
  for line in drift:
    print(f"  NOTE: {CONFIG} differs from the original's scripts: {line}", flush=True)
  try:
    jpegs = [os.path.join(root, "manual", "VOCdevkit", "VOC2012", "JPEGImages",
                          m["name"] + ".jpg") for m in images]
    weights = make_weights(args, os.path.join(root, "weights"), jpegs)
    if args.parallel:
      with concurrent.futures.ThreadPoolExecutor(2) as pool:
        theirs = pool.submit(run_original, args, root, images, weights)
        ours = pool.submit(run_ours, args, root, weights)
        seconds = {**theirs.result(), **ours.result()}
    else:
      seconds = {**run_original(args, root, images, weights), **run_ours(args, root, weights)}
  except StepFailed as e:
    print(str(e), file=sys.stderr, flush=True)
    raise SystemExit(1) from None
  per_image = {m["name"]: compare_image(root, m) for m in images}
  met = targets(per_image)
  print(table(per_image))
  print(f"targets (CAMs within {CAM_TARGET:g} relative; label maps equal on >= "
        f"{LABEL_TARGET_PCT}% of every image and of its {BORDER}-px border band): "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items() if k != "all"))
  print("seconds (unreliable on shared cores): "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
        + f"; total {time.time() - t0:.0f}")
  results = {"mode": "stages", "folder": root, "border_px": BORDER, "images": per_image,
             "targets_met": met, "seconds": {k: round(v, 1) for k, v in seconds.items()},
             "weights": dict(weights), "config": CONFIG,
             "canvas": list(args.canvas) if args.canvas else None, "config_drift": drift}
  if args.json:
    aj_io.save_json(args.json, results)
  if not args.workdir:  # ~1.6 GB of weights: a temporary folder goes once compared
    shutil.rmtree(root, ignore_errors=True)
    results["folder"] = None
  print(json.dumps(results, sort_keys=True))
  return results
