"""affinity_jax against the PyTorch original (github jiwoon-ahn/psa): parity, side by side.

Both sides run in this process on the same weights and the same input arrays:
- PyTorch: the original's own networks, imported from its checkout (`--psa-root`) by
  psa_original.py: network.resnet38_cls.Net (CAM) and network.resnet38_aff.Net (AffinityNet),
  or with `--backbone vgg16` network.vgg16_cls.Net and network.vgg16_aff.Net, with their
  released checkpoints (`--weights-cam`, `--weights-aff`) or, without them, a seeded random
  state dict with non-trivial BatchNorm statistics (VGG-16: GroupNorm scales and shifts). Their
  files are not edited. On the CPU, `torch.Tensor.cuda` is the identity in this process only,
  because AffinityNet.forward moves its pair indices with `.cuda()`.
- JAX: affinity_jax.models (CAMNet, AffinityNet; VGG16CAMNet, VGG16AffinityNet) with the same
  state dicts converted by affinity_jax.convert.psa_state_dict_to_variables.

Parity (max abs difference, and max relative difference = max abs difference / max |PyTorch|):
- logits (forward), CAMs (forward_cam / CAMNet.cam) and affinities in the original's pair order
  (AffinityNet.forward vs geometry.to_psa_vector(geometry.pair_affinities(..., scheme="psa")))
  at several image sizes, non-square and odd ones included; for VGG-16 also the squared CAMs
  (relu(fc8), before the square root that VGG-16's CAM takes);
- multi-scale + flip CAMs: the original's infer_cls procedure written here in torch around its
  forward_cam (scales 1, 0.5, 1.5, 2, each with its flip; bilinear upsample, align_corners=False;
  label mask; flip back; sum; / (max + 1e-5)) vs the per-image oracle tests/reference_cam.py
  (multiscale_cam). Both sides get the same already-resized images (PIL bicubic, as the
  original's loader) so resizing code does not enter;
- random walk (infer_aff's dense procedure written here in torch around forward(x, to_dense=True):
  A^beta, column normalisation, logt = 8 squarings, cam_vec @ T, bilinear upsample, argmax) vs
  random_walk.random_walk and the per-image oracle tests/reference_walk.py (random_walk_labels)
  with scheme "psa", on the same CAM: max abs difference of the walked scores and the share of
  identical pseudo-label pixels.
The images are synthetic (coloured ellipses on a gradient, with noise), normalised once with the
original's Normalize (resnet38d.py's, or vgg16d.py's BGR minus the mean) and fed to both sides
as the same float32 array.

With `--stages` it compares the stages around the networks instead (experiments/stage_parity.py):
the original's own infer_cls.py and infer_aff.py, run unmodified in subprocesses, against our
infer_cam, aff_labels and random_walk run through our CLI, on the same small VOC tree of JPEGs
(`--sizes`, default 375x500,500x375,333x500,281x500) and the same full-width ResNet-38 weights
(converted with `affinity-jax convert psa-pytorch`): per image the CAMs of the present classes
(max relative difference), the la / ha dCRF label maps and the random-walk pseudo labels
(share of equal pixels), over the image and its 32-px border band, against the targets (CAMs
within 1e-4; label maps equal on >= 99.9% of every image, band included).

Speed against the original is measured by experiments/benchmark_models.py.

Usage:
  python experiments/compare_pytorch.py --psa-root /tmp/psa [--backbone resnet38|vgg16]
      [--weights-cam F.pth --weights-aff F.pth] [--device cpu|cuda] [--quick]
      [--sizes 320x320,281x353] [--ms-size 121x153]
  python experiments/compare_pytorch.py --psa-root /tmp/psa --stages [--quick]
      [--sizes 375x500,500x375] [--canvas 512x512] [--workdir DIR] [--json F.json]
      [--weights-cam F.pth --weights-aff F.pth] [--seed 0] [--parallel]
`--quick` shrinks the work for a small CPU (fewer parity sizes, a small multi-scale image; with
`--stages`, images of a fifth of the size on a canvas that just holds them). Sizes are HxW. The
last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import psa_original as po  # noqa: E402

# The per-image oracles live under tests/, not in the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = ((320, 320), (448, 448), (375, 500), (281, 353))
QUICK_SIZES = ((320, 320), (281, 353))
MS_SIZE, QUICK_MS_SIZE = (281, 353), (121, 153)
SCALES = (1.0, 0.5, 1.5, 2.0)
PRESENT_CLASSES = 3


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--psa-root", required=True,
                 help="checkout of github.com/jiwoon-ahn/psa (its network/, tool/, voc12/)")
  p.add_argument("--backbone", choices=po.BACKBONES, default="resnet38",
                 help="the original's networks to compare: resnet38_* (default) or vgg16_*")
  p.add_argument("--weights-cam", help="the original's resnet38_cls / vgg16_cls .pth (else "
                                       "random weights)")
  p.add_argument("--weights-aff", help="the original's resnet38_aff / vgg16_aff .pth (else "
                                       "random weights)")
  p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device")
  p.add_argument("--quick", action="store_true",
                 help="less work for a small CPU: 2 parity sizes, small multi-scale image")
  p.add_argument("--sizes", type=lambda s: tuple(po.parse_size(v) for v in s.split(",")),
                 help="parity image sizes, e.g. 320x320,281x353 (default: by --quick); with "
                      "--stages the images' sizes")
  p.add_argument("--ms-size", type=po.parse_size, help="image size of the multi-scale CAM check")
  p.add_argument("--seed", type=int, default=0)
  stages = p.add_argument_group(
      "stage parity (--stages)", "the original's infer_cls.py / infer_aff.py against our "
      "infer_cam, aff_labels and random_walk (experiments/stage_parity.py); --sizes are then "
      "the images' sizes, --quick makes them a fifth as large")
  stages.add_argument("--stages", action="store_true",
                      help="compare the stages around the networks instead of the networks")
  stages.add_argument("--canvas", type=po.parse_size,
                      help="our inference canvas, config key data.canvas (default: the "
                           "config's 512x512; with --quick the smallest that holds the images)")
  stages.add_argument("--workdir", help="folder for the tree, weights and both sides' outputs "
                                        "(default: a new temporary folder); a rerun with the "
                                        "same sizes and seed reuses the original's outputs")
  stages.add_argument("--json", help="also write every figure to this JSON file")
  stages.add_argument("--parallel", action="store_true",
                      help="run the original's scripts and ours at the same time (less wall "
                           "time; their seconds then overlap)")
  args = p.parse_args(argv)
  try:
    args.psa_root = po.check_psa_root(args.psa_root, args.backbone)
    for flag in ("weights_cam", "weights_aff"):
      path = getattr(args, flag)
      if path is not None and not os.path.isfile(path):
        raise ValueError(f"--{flag.replace('_', '-')} {path!r}: no such file")
  except ValueError as e:
    p.error(str(e))
  if args.stages:
    import stage_parity
    if args.backbone != "resnet38" or args.device != "cpu":
      p.error("--stages compares the original's ResNet-38 scripts on the CPU: leave --backbone "
              "and --device at their defaults")
    args.sizes = args.sizes or (stage_parity.QUICK_SIZES if args.quick else stage_parity.SIZES)
    if args.quick and not args.canvas:
      args.canvas = tuple(max(s[i] for s in args.sizes) for i in (0, 1))
    canvas = args.canvas or tuple(stage_parity.load_config().data.canvas)
    if any(h > canvas[0] or w > canvas[1] for h, w in args.sizes):
      p.error(f"--sizes: an image larger than the canvas {canvas[0]}x{canvas[1]}; "
              "give a larger --canvas")
    return args
  if args.canvas or args.workdir or args.json or args.parallel:
    p.error("--canvas, --workdir, --json and --parallel go with --stages")
  args.sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
  args.ms_size = args.ms_size or (QUICK_MS_SIZE if args.quick else MS_SIZE)
  # The walk runs on the last parity size (non-square in both default lists).
  args.rw_size = args.sizes[-1]
  return args


# ---------------------------------------------------------------------------------------------
# The original's inference procedures, written in torch around its networks.


def multiscale_inputs(orig, img_uint8: np.ndarray):
  """The 8 passes of infer_cls in its order (each scale, then its flip), as the original's
  loader makes them: PIL bicubic resize to round(W s) x round(H s), normalise, flip."""
  from PIL import Image
  h, w = img_uint8.shape[:2]
  passes, flips = [], []
  for s in SCALES:
    resized = np.asarray(Image.fromarray(img_uint8).resize((round(w * s), round(h * s)),
                                                           resample=Image.BICUBIC))
    x = po.normalise(orig, resized)
    passes += [x, np.ascontiguousarray(x[:, :, ::-1])]
    flips += [False, True]
  return passes, flips


def torch_multiscale_cam(orig, net, passes, flips, image_hw, label, device):
  """infer_cls's CAM of one image: [C, H, W] numpy. `passes`: [1, h, w, 3] normalised inputs."""
  torch, F = orig.torch, orig.torch.nn.functional
  total = 0.0
  with torch.no_grad():
    for x, flipped in zip(passes, flips):
      cam = net.forward_cam(po.to_torch(orig, x, device))
      cam = F.interpolate(cam, image_hw, mode="bilinear", align_corners=False)[0]
      cam = cam.cpu().numpy() * label.reshape(-1, 1, 1)
      total = total + (np.flip(cam, -1) if flipped else cam)
  return total / (np.max(total, (1, 2), keepdims=True) + 1e-5)


def torch_random_walk(orig, aff_net, image, cam_chw, device):
  """infer_aff's walk of one image.

  image: [1, H, W, 3] normalised; cam_chw: [C, H, W] normalised CAMs (absent classes 0).
  Returns (walked scores [C+1, h, w] before upsampling, pseudo label [H, W]).
  """
  torch, F = orig.torch, orig.torch.nn.functional
  height, width = image.shape[1:3]
  ph, pw = -(-height // 8) * 8 - height, -(-width // 8) * 8 - width
  x = F.pad(po.to_torch(orig, image, device), (0, pw, 0, ph))
  scores = np.zeros((cam_chw.shape[0] + 1, height, width), np.float32)
  scores[1:] = cam_chw
  scores[0] = (1 - np.max(cam_chw, 0)) ** po.RW_ALPHA
  scores = np.pad(scores, ((0, 0), (0, ph), (0, pw)))
  with torch.no_grad():
    aff_mat = torch.pow(aff_net.forward(x, True), po.BETA)
    trans = aff_mat / torch.sum(aff_mat, dim=0, keepdim=True)
    for _ in range(po.LOGT):
      trans = torch.matmul(trans, trans)
    vec = F.avg_pool2d(torch.from_numpy(scores), 8, 8)
    gh, gw = vec.shape[1:]
    walked = torch.matmul(vec.reshape(vec.shape[0], -1).to(device), trans)
    walked = walked.reshape(1, -1, gh, gw)
    up = F.interpolate(walked, (height + ph, width + pw), mode="bilinear", align_corners=False)
    label = torch.argmax(up, 1)[0, :height, :width]
  return walked[0].cpu().numpy(), label.cpu().numpy()


# ---------------------------------------------------------------------------------------------
# The JAX side.


class JaxSide:
  """affinity_jax's CAM and affinity networks on converted weights, with jitted entry points."""

  def __init__(self, cam_state: dict, aff_state: dict, backbone: str = "resnet38"):
    import jax
    from affinity_jax import models
    from affinity_jax.convert import psa_state_dict_to_variables
    cam_net = models.build("cam", backbone=backbone)
    aff_net = models.build("affinity", backbone=backbone)
    self.cam_vars = jax.device_put(psa_state_dict_to_variables(cam_state, "cam",
                                                               backbone=backbone))
    self.aff_vars = jax.device_put(psa_state_dict_to_variables(aff_state, "affinity",
                                                               backbone=backbone))
    self._logits = jax.jit(lambda v, x: cam_net.apply(v, x))
    self._cam = jax.jit(lambda v, x: cam_net.apply(v, x, method="cam"))
    self._features = jax.jit(lambda v, x: aff_net.apply(v, x))

  def logits(self, x):
    return self._logits(self.cam_vars, x)

  def cam(self, x):
    return self._cam(self.cam_vars, x)

  def features(self, x):
    return self._features(self.aff_vars, x)


# ---------------------------------------------------------------------------------------------
# Parity.


def run_parity(args, orig, t_cam, t_aff, js, results, rows):
  import jax.numpy as jnp
  from affinity_jax import geometry, random_walk as rw
  from tests import reference_cam, reference_walk
  torch, dev = orig.torch, args.device
  radius = po.RADIUS
  cams_for_walk = {}
  for i, (h, w) in enumerate(args.sizes):
    x = po.normalise(orig, po.synthetic_image(h, w, args.seed + 1 + i))
    xt, xj = po.to_torch(orig, x, dev), jnp.asarray(x)
    with torch.no_grad():
      logits_t = t_cam(xt).cpu().numpy()
      cam_t = t_cam.forward_cam(xt).cpu().numpy()
      aff_t = t_aff(xt).cpu().numpy().reshape(1, -1)
    logits_j = np.asarray(js.logits(xj))
    cam_j = np.asarray(js.cam(xj)).transpose(0, 3, 1, 2)
    aff_j = np.asarray(geometry.to_psa_vector(
        geometry.pair_affinities(js.features(xj), radius=radius, scheme="psa"), radius))
    tag = f"{h}x{w}"
    compared = [("logits", logits_j, logits_t), ("cam", cam_j, cam_t),
                ("affinity", aff_j, aff_t)]
    if args.backbone == "vgg16":
      # VGG-16's CAM is sqrt(relu(fc8)): a float32 difference d of fc8 near 0 becomes up to
      # sqrt(d) (|sqrt a - sqrt b| <= sqrt|a - b|), so the squared CAM, relu(fc8), is what
      # measures the networks; the CAM's own difference is bounded by the root of its.
      compared.insert(2, ("cam_squared", cam_j ** 2, cam_t ** 2))
    for name, ours, ref in compared:
      err, rel = po.diff(ours, ref)
      results[f"{name}_{tag}_max_abs"], results[f"{name}_{tag}_max_rel"] = err, rel
      rows.append((f"{name} max abs / rel", tag, f"{np.max(np.abs(ref)):.3g} (max |x|)",
                   "", f"{err:.2e} / {rel:.2e}"))
    if (h, w) == args.rw_size:
      # The walk's CAM: the single-scale CAM of this image, normalised as infer_cls does, for
      # the PRESENT_CLASSES classes with the largest logits.
      label = np.zeros(po.NUM_CLASSES, np.float32)
      label[np.argsort(-logits_t[0])[:PRESENT_CLASSES]] = 1
      with torch.no_grad():
        up = torch.nn.functional.interpolate(torch.from_numpy(cam_t), (h, w), mode="bilinear",
                                             align_corners=False)[0].numpy()
      up = up * label.reshape(-1, 1, 1)
      cams_for_walk = dict(image=x, cam=up / (up.max((1, 2), keepdims=True) + 1e-5))
    print(f"  parity {tag} done", flush=True)

  # Multi-scale + flip CAM.
  mh, mw = args.ms_size
  img = po.synthetic_image(mh, mw, args.seed + 100)
  passes, flips = multiscale_inputs(orig, img)
  label = np.zeros(po.NUM_CLASSES, np.float32)
  label[[2, 7, 14]] = 1
  ms_t = torch_multiscale_cam(orig, t_cam, passes, flips, (mh, mw), label, dev)
  grids = [js.cam(jnp.asarray(p))[0] for p in passes]
  ms_j = np.asarray(reference_cam.multiscale_cam(grids, image_hw=(mh, mw),
                                                 label=jnp.asarray(label),
                                                 flips=flips)).transpose(2, 0, 1)
  err, rel = po.diff(ms_j, ms_t)
  tag = f"{mh}x{mw}"
  results["ms_cam_max_abs"], results["ms_cam_max_rel"] = err, rel
  rows.append(("multi-scale+flip CAM max abs / rel", tag, "scales 1,.5,1.5,2 x flip", "",
               f"{err:.2e} / {rel:.2e}"))
  print("  multi-scale CAM done", flush=True)

  # Random walk on the same CAM.
  h, w = args.rw_size
  image, cam_chw = cams_for_walk["image"], cams_for_walk["cam"]
  walked_t, label_t = torch_random_walk(orig, t_aff, image, cam_chw, dev)
  ph, pw = -(-h // 8) * 8, -(-w // 8) * 8
  padded = np.pad(image, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
  feats = js.features(jnp.asarray(padded))
  cam_hwc = jnp.asarray(cam_chw.transpose(1, 2, 0))
  scores = rw.prepare_cam(cam_hwc, alpha=po.RW_ALPHA)
  walk = dict(radius=radius, beta=po.BETA, t=2 ** po.LOGT, scheme="psa")
  walked_j = np.asarray(rw.random_walk(feats, scores[None], **walk)[0]).transpose(2, 0, 1)
  label_j = reference_walk.random_walk_labels(feats[0], cam_hwc, alpha=po.RW_ALPHA, **walk)
  err, _ = po.diff(walked_j, walked_t)
  same = 100.0 * float(np.mean(label_j == label_t))
  # How much the walk moved the labels, so that "identical" is not the trivial case of a walk
  # that does nothing (affinities all ~0) or floods everything.
  before = np.argmax(np.asarray(scores), -1)
  after = np.argmax(walked_t, 0)
  moved = 100.0 * float(np.mean(before != after))
  aff = np.asarray(geometry.to_psa_vector(geometry.pair_affinities(feats, radius=radius,
                                                                   scheme="psa"), radius))
  results.update(rw_scores_max_abs=err, rw_labels_identical_pct=same, rw_walk_moved_cells_pct=moved,
                 rw_mean_affinity=float(aff.mean()))
  rows.append(("random walk scores max abs", f"{h}x{w}", f"{np.abs(walked_t).max():.3g} (max)",
               "", f"{err:.2e}"))
  rows.append(("random walk identical labels", f"{h}x{w}",
               f"walk moved {moved:.1f}% of cells", f"mean affinity {aff.mean():.3f}",
               f"{same:.3f}%"))
  print("  random walk done", flush=True)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.stages:
    import stage_parity
    return stage_parity.run(args)
  orig = po.load_original(args.psa_root, args.device, backbone=args.backbone)
  import flax
  import jax
  torch = orig.torch
  t0 = time.time()
  t_cam, cam_state, cam_source = po.build_torch_net(orig, "cam", args.weights_cam, args.seed,
                                                    args.device)
  t_aff, aff_state, aff_source = po.build_torch_net(orig, "affinity", args.weights_aff,
                                                    args.seed + 1, args.device)
  js = JaxSide(cam_state, aff_state, args.backbone)
  del cam_state, aff_state
  print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}; "
        f"torch {torch.__version__} ({args.device}, {torch.get_num_threads()} threads); "
        f"jax {jax.__version__} ({jax.default_backend()}); flax {flax.__version__}")
  print(f"backbone {args.backbone}; weights: cam = {cam_source}; affinity = {aff_source}; "
        f"set up in {time.time() - t0:.0f} s", flush=True)

  results: dict = {"device": args.device, "quick": bool(args.quick), "backbone": args.backbone}
  rows: list = []
  run_parity(args, orig, t_cam, t_aff, js, results, rows)

  header = ("measure", "size", "PyTorch", "JAX", "difference")
  widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
  for r in [header, tuple("-" * n for n in widths)] + rows:
    print("  ".join(str(v).ljust(n) for v, n in zip(r, widths)))
  print(f"total {time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")
  print(json.dumps(results, sort_keys=True))
  return results


if __name__ == "__main__":
  main()
