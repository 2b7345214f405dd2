"""Speed of affinity_jax's networks: the real train steps and inference functions, in float32
and bfloat16, with the PyTorch original side by side when its checkout is given.

What is timed (`--parts`, comma separated):
- cam_train: the CAM network's training step, the trainer's own (`train.make_train_step` on
  `train.init_state`: the original's four learning-rate groups, the frozen set split off, state
  donated, `losses.cam_training_loss`). The original: resnet38_cls.Net (vgg16_cls.Net) in its
  train() mode, train_cls.py's loss and PolyOptimizer, `loss.item()` every step as its loss meter.
- aff_train: AffinityNet's training step likewise (`losses.affinity_training_loss`, radius 5,
  the psa pair set); the original: resnet38_aff.Net with train_aff.py's loss.
- cam_infer: the multi-scale + flip CAM of one image (`cam.multiscale_flip_sum` over the scales,
  each pass the network's `cam` method on the image and its mirror), as infer_cam runs it; the
  original: infer_cls.py's procedure (forward_cam of each scaled and flipped image, bilinear
  upsampling to the image, flipped back, summed).
- aff_infer: AffinityNet on one image and the affinities of its pairs within radius 5
  (`geometry.neighbourhood_affinities`); the original: resnet38_aff.Net.forward(x) (the pair
  affinities, not the dense matrix).
- seg_infer: the segmentation network's multi-scale + flip softmax (ours only: the original
  trains DeepLab elsewhere).
- rw: the random walk of one 56x56 grid (a 448x448 image) from its affinities: the original's
  dense procedure in torch (the HW x HW matrix, power beta, column normalisation, 8 squarings)
  against `random_walk.propagate` (256 sparse stencil steps). Its FLOP figure is one step's:
  XLA's cost analysis counts a loop's body once.

Settings (`--settings`): `original` is the original's recipe: CAM training batch 16, crop 448;
AffinityNet batch 8, crop 448; inference of a 448x448 image at scales 1, 0.5, 1.5, 2 with flips.
`small` (the default on a CPU) shrinks them for a laptop: batch 4 / crop 224, batch 2 / crop
224, a 320x320 image. `--cam-batch`, `--cam-crop`, `--aff-batch`, `--aff-crop`, `--infer-size`
override single values.

Each measurement runs after `--warmup` untimed calls; with the original, the two sides run
interleaved `--repeats` times (torch, JAX, torch, ...) and the medians are reported, because the
machine may be shared. `--steps N` times N back-to-back training steps instead of single calls
(the sustained rate of a training run; JAX dispatches asynchronously and waits once at the end,
the original waits at every step as its loss meter does).

Figures: seconds per call, images per second, the ratio PyTorch time / JAX time (> 1: JAX
faster), the model's FLOP per call from XLA's cost analysis of the lowered function (the same
arithmetic on both sides, and on every backend), and with `--peak-tflops P` the model FLOPs
utilisation FLOP / (seconds x P). The original always runs in float32, as it ships; our rows
run in each of `--dtypes` (parameters stay float32, compute in the dtype). The last line
printed is JSON; `--json PATH` also writes it to a file. `--flops-only` counts the FLOPs and
times nothing: sizes a small machine cannot run, the utilisation of times taken elsewhere.

This script needs only jax, flax, optax, numpy and ml-collections (and torch with
`--psa-root`): no TensorFlow, no tfds, which a GPU machine may lack.

Usage:
  python experiments/benchmark_models.py [--psa-root DIR] [--backbone resnet38|vgg16]
      [--settings original|small] [--parts cam_train,aff_train,cam_infer,aff_infer]
      [--dtypes float32,bfloat16] [--peak-tflops P] [--steps N] [--repeats 5] [--json PATH]
      [--flops-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import psa_original as po  # noqa: E402

PARTS = ("cam_train", "aff_train", "cam_infer", "aff_infer", "seg_infer", "rw")
DEFAULT_PARTS = ("cam_train", "aff_train", "cam_infer", "aff_infer")
SETTINGS = {
    "original": dict(cam_batch=16, cam_crop=448, aff_batch=8, aff_crop=448,
                     infer_size=(448, 448)),
    "small": dict(cam_batch=4, cam_crop=224, aff_batch=2, aff_crop=224, infer_size=(320, 320)),
}
SCALES = (1.0, 0.5, 1.5, 2.0)  # the original's infer_cls.py
RW_GRID = (56, 56)  # the stride-8 grid of a 448x448 image
SEG_CLASSES = 21


def _size(text: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW, e.g. 448x448") from None
  if h < 72 or w < 72:  # the psa pair set needs a stride-8 grid of at least 5 x 9
    raise argparse.ArgumentTypeError(f"size {text!r}: both sides must be >= 72")
  return h, w


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--psa-root", default=os.environ.get("PSA_ROOT") or None,
                 help="checkout of github.com/jiwoon-ahn/psa (default $PSA_ROOT): time the "
                      "original side by side; without it, ours only")
  p.add_argument("--backbone", choices=po.BACKBONES, default="resnet38")
  p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                 help=f"comma separated, of {', '.join(PARTS)} (default "
                      f"{','.join(DEFAULT_PARTS)})")
  p.add_argument("--settings", choices=tuple(SETTINGS), default=None,
                 help="batch and crop sizes: the original's recipe or small ones (default: "
                      "original on a GPU or TPU, small on a CPU)")
  for key, kind in (("cam_batch", int), ("cam_crop", int), ("aff_batch", int), ("aff_crop", int)):
    p.add_argument("--" + key.replace("_", "-"), type=kind, default=None)
  p.add_argument("--infer-size", type=_size, default=None, help="inference image HxW")
  p.add_argument("--dtypes", default="float32,bfloat16",
                 help="our compute dtypes, comma separated (default float32,bfloat16)")
  p.add_argument("--width", type=float, default=1.0,
                 help="our networks' width multiplier (1.0 = the original's; must be 1.0 "
                      "with --psa-root)")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="the device's peak TFLOP/s in the dtype timed, for the FLOPs utilisation")
  p.add_argument("--steps", type=int, default=0,
                 help="time N back-to-back training steps instead of single calls")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per side (5)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls per side first (1)")
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                 help="torch intra-op threads on a CPU (default: all cores, as XLA:CPU)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write the JSON results here")
  p.add_argument("--flops-only", action="store_true",
                 help="count each part's FLOP per call and run nothing (sizes this machine "
                      "cannot run; the utilisation of times taken elsewhere)")
  args = p.parse_args(argv)
  parts = [s for s in args.parts.split(",") if s]
  if not parts or not set(parts) <= set(PARTS):
    p.error(f"--parts {args.parts!r}: expected a comma-separated subset of {', '.join(PARTS)}")
  args.parts = tuple(name for name in PARTS if name in parts)
  args.dtypes = tuple(d for d in args.dtypes.split(",") if d)
  if not args.dtypes or not set(args.dtypes) <= {"float32", "bfloat16"}:
    p.error(f"--dtypes {','.join(args.dtypes)!r}: float32 and/or bfloat16")
  if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.steps < 0:
    p.error("--repeats and --threads must be >= 1, --warmup and --steps >= 0")
  if args.psa_root:
    try:
      args.psa_root = po.check_psa_root(args.psa_root, args.backbone)
    except ValueError as e:
      p.error(str(e))
    if args.width != 1.0:
      p.error("--width must be 1.0 with --psa-root (the original's networks)")
  return args


def resolve_settings(args, backend: str) -> dict:
  settings = dict(SETTINGS[args.settings or ("small" if backend == "cpu" else "original")])
  for key in settings:
    if getattr(args, key) is not None:
      settings[key] = getattr(args, key)
  if min(settings["cam_crop"], settings["aff_crop"]) < 72:
    raise SystemExit("--cam-crop and --aff-crop must be >= 72 (the psa pair set)")
  settings["name"] = args.settings or ("small" if backend == "cpu" else "original")
  return settings


# ---------------------------------------------------------------------------------------------
# Shared pieces.


class Context:
  """What every measurement needs: the original (or None), devices, settings, figures."""

  def __init__(self, args, settings):
    import jax
    self.args, self.settings = args, settings
    self.backend = jax.default_backend()
    self.device = "cuda" if self.backend == "gpu" else "cpu"
    self.orig = (po.load_original(args.psa_root, self.device, args.threads, args.backbone)
                 if args.psa_root and not args.flops_only else None)
    self.rows: list[dict] = []
    self.results: dict = {}

  def images(self, batch: int, h: int, w: int, offset: int) -> np.ndarray:
    """[B, h, w, 3] float32 synthetic images in the backbone's input convention."""
    raw = np.stack([po.synthetic_image(h, w, self.args.seed + offset + i) for i in range(batch)])
    return normalise(raw, self.args.backbone)


def normalise(raw: np.ndarray, backbone: str) -> np.ndarray:
  """uint8 RGB -> the network input of `backbone` (data.transforms.normalize's conventions,
  in numpy: this script runs without TensorFlow)."""
  from affinity_jax.constants import BACKBONES, CAFFE_MEAN_RGB, IMAGENET_MEAN, IMAGENET_STD
  x = raw.astype(np.float32)
  if BACKBONES[backbone] == "imagenet":
    return ((x / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).astype(np.float32)
  return (x[..., ::-1] - np.float32(CAFFE_MEAN_RGB[::-1])).astype(np.float32)


_FLOPS_ERRORS: set[str] = set()


def flops_of(jitted, *args) -> float | None:
  """FLOP per call of a jitted function, from XLA's cost analysis of its lowered program.

  The program before the backend's passes, not the compiled one: on a GPU the compiled program
  calls cuDNN for each convolution, and the cost analysis counts none of their arithmetic (16 of
  the CAM train step's 34,289 GFLOP at the original's settings, on an H200). Backends reached
  through the PJRT C API (jax's CUDA plugin) have no analysis of a lowered program
  (`Lowered.cost_analysis` gives None), so there the lowered program is analysed by the CPU client:
  the same HLO cost analysis of the same program. On a CPU the lowered and the compiled counts
  are equal. oneDNN's convolutions (affinity_jax/models/onednn.py, on a single-device CPU) are
  custom calls the analysis does not count: `onednn.flops` adds theirs from the program's text.
  A failure is printed once and the count left empty.
  """
  from affinity_jax.models import onednn
  try:
    lowered = jitted.lower(*args)
    cost = lowered.cost_analysis()  # None where the backend has none
    if cost is None:
      from jax._src import xla_bridge
      from jax._src.lib import _jax
      cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"),
                                           lowered.compiler_ir("hlo").as_hlo_module())
  except Exception as e:  # noqa: BLE001  (the count is optional; say why it is missing)
    message = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if message not in _FLOPS_ERRORS:
      _FLOPS_ERRORS.add(message)
      print(f"  (no FLOP count: {message})", file=sys.stderr, flush=True)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = ((cost or {}).get("flops") or 0.0) + onednn.flops(lowered.as_text())
  return float(flops) if flops > 0 else None


def time_sides(ctx, fn_torch, fn_jax, warmup: int | None = None
               ) -> tuple[float | None, float | None]:
  """Median seconds per call of each side (interleaved when the original runs), after `warmup`
  (default --warmup) untimed calls of each; (None, None) with --flops-only."""
  args = ctx.args
  if args.flops_only:
    return None, None
  warmup = args.warmup if warmup is None else warmup
  if fn_torch is None:
    for _ in range(warmup):
      fn_jax()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      fn_jax()
      times.append(time.perf_counter() - t0)
    return None, statistics.median(times)
  return po.interleaved_median(fn_torch, fn_jax, args.repeats, warmup)


def add_row(ctx, name: str, dtype: str, images: int, t_jax: float | None,
            t_torch: float | None, flops: float | None, extra: dict | None = None) -> None:
  peak = ctx.args.peak_tflops
  if t_jax is None:  # --flops-only
    row = {"name": name, "dtype": dtype, "images": images, "jax_s": None, "jax_img_s": None,
           "torch_s": None, "torch_img_s": None, "ratio": None,
           "gflop": flops / 1e9 if flops else None, "jax_mfu": None, "torch_mfu": None,
           **(extra or {})}
    ctx.rows.append(row)
    print(f"  {name} [{dtype}]: {fmt(row['gflop'], '.1f')} GFLOP", flush=True)
    return
  row = {"name": name, "dtype": dtype, "images": images, "jax_s": t_jax,
         "jax_img_s": images / t_jax, "torch_s": t_torch,
         "torch_img_s": images / t_torch if t_torch else None,
         "ratio": t_torch / t_jax if t_torch else None, "gflop": flops / 1e9 if flops else None,
         "jax_mfu": flops / t_jax / (peak * 1e12) if flops and peak else None,
         "torch_mfu": flops / t_torch / (peak * 1e12) if flops and peak and t_torch else None,
         **(extra or {})}
  ctx.rows.append(row)
  torch_part = (f", torch {t_torch:.3f} s, ratio {row['ratio']:.2f}" if t_torch else "")
  mfu_part = (f", JAX MFU {row['jax_mfu']:.1%}" if row["jax_mfu"] is not None else "")
  # Everything on the row's own line, so a part stopped before its table still leaves it.
  print(f"  {name} [{dtype}]: JAX {t_jax:.3f} s ({fmt_rate(row['jax_img_s'])} img/s)"
        f"{torch_part}, {fmt(row['gflop'], '.1f')} GFLOP{mfu_part}", flush=True)


def jax_variables(ctx, arch: str, state: dict | None, num_classes: int = 20) -> dict:
  """The original's state dict converted, or (without the original) a random init."""
  import jax
  from affinity_jax import models
  from affinity_jax.convert import psa_state_dict_to_variables
  if state is not None:
    return jax.device_put(psa_state_dict_to_variables(state, arch, backbone=ctx.args.backbone))
  model = models.build(arch, num_classes=num_classes, width=ctx.args.width,
                       backbone=ctx.args.backbone)
  return models.init_variables(model, jax.random.key(ctx.args.seed), (1, 64, 64, 3))


def torch_net(ctx, kind: str, seed: int):
  if ctx.orig is None:
    return None, None
  net, state, _ = po.build_torch_net(ctx.orig, kind, None, seed, ctx.device)
  return net, state


def torch_sync(ctx):
  if ctx.device == "cuda":
    ctx.orig.torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Training steps.


def time_training(ctx, part: str) -> None:
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from affinity_jax import losses, models, train
  args, s = ctx.args, ctx.settings
  arch = "cam" if part == "cam_train" else "affinity"
  b, crop = (s["cam_batch"], s["cam_crop"]) if arch == "cam" else (s["aff_batch"], s["aff_crop"])
  images = ctx.images(b, crop, crop, 20)
  rng = np.random.default_rng(args.seed)
  if arch == "cam":
    targets = (rng.random((b, 20)) < 0.15).astype(np.float32)
    targets[np.arange(b), rng.integers(0, 20, b)] = 1.0
    local = {"image": images, "label": targets}
    loss_fn = losses.cam_training_loss
  else:
    grid = -(-crop // 8)
    targets = affinity_label_grids(b, grid, grid, args.seed)
    local = {"image": images, "aff_label": targets}
    loss_fn = losses.affinity_training_loss(radius=po.RADIUS, scheme="psa")
  net, state = torch_net(ctx, arch, args.seed + 1)
  step_t = None
  if net is not None:
    make = po.torch_cam_train_step_fn if arch == "cam" else po.torch_train_step_fn
    one_t = make(ctx.orig, net, images, targets, ctx.device)
    step_t = one_t if not args.steps else (lambda: [one_t() for _ in range(args.steps)])
  # On the host: each dtype's state is made from it anew (the step donates its state).
  variables = jax.tree.map(np.asarray, jax_variables(ctx, arch, state))
  batch = train.global_batch(local, NamedSharding(train.data_mesh(), P("data")))
  optim = train.OptimConfig(lr=po.TRAIN_LR, total_steps=100_000)
  for dtype in args.dtypes:
    model = models.build(arch, num_classes=20, width=args.width, dtype=dtype,
                         backbone=args.backbone)
    train_state, constants, tx = train.init_state(
        variables, models.param_labels(variables["params"]), optim)
    step_j = train.make_train_step(model, loss_fn, tx, optim, seed=args.seed)
    flops = flops_of(step_j, train_state, constants, batch)
    holder = {"state": train_state, "loss": []}

    def run_jax(n=max(args.steps, 1)):
      for _ in range(n):
        holder["state"], metrics = step_j(holder["state"], constants, batch)  # state donated
      holder["loss"].append(float(metrics["loss"]))  # waits for the last step

    torch_side = step_t if dtype == args.dtypes[0] else None
    warmup = None
    if args.steps and not args.flops_only:  # warm up with single steps, then time --steps
      for _ in range(args.warmup):
        run_jax(1)
        if torch_side is not None:
          one_t()
      warmup = 0
    t_torch, t_jax = time_sides(ctx, torch_side, run_jax, warmup)
    if step_t is not None and dtype != args.dtypes[0]:
      t_torch = ctx.results[f"{part}_torch_s"]  # the original runs once, in float32
    ctx.results[f"{part}_torch_s"] = t_torch
    n = max(args.steps, 1)
    label = "CAM network" if arch == "cam" else "AffinityNet"
    what = f"{n} steps" if args.steps else "step"
    add_row(ctx, f"{args.backbone} {label} train {what}, batch {b}, crop {crop}", dtype, n * b,
            t_jax, t_torch, flops * n if flops else None,
            {"part": part, "first_loss_jax": holder["loss"][0] if holder["loss"] else None})


def affinity_label_grids(batch: int, h: int, w: int, seed: int) -> np.ndarray:
  """[B, h, w] uint8 affinity labels: background, two classes and unconfident (255) blocks."""
  rng = np.random.default_rng(seed)
  grids = np.zeros((batch, h, w), np.uint8)
  for g in grids:
    for value in (3, 12, 255):
      y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
      g[y:y + rng.integers(2, h // 2 + 2), x:x + rng.integers(2, w // 2 + 2)] = value
  return grids


# ---------------------------------------------------------------------------------------------
# Inference.


def scaled_passes(ctx, h: int, w: int):
  """The inference image at each scale (PIL bicubic, as the pipeline resizes) for JAX's
  `cam.pass_inputs` and for the original; returns (passes, [numpy [1, hs, ws, 3]])."""
  from PIL import Image
  from affinity_jax import cam
  raw = po.synthetic_image(h, w, ctx.args.seed + 7)
  batch = {"raw": raw[None], "orig_size": np.array([[h, w]], np.int32)}
  scaled = []
  for i, scale in enumerate(SCALES):
    hs, ws = int(round(h * scale)), int(round(w * scale))
    img = np.asarray(Image.fromarray(raw).resize((ws, hs), Image.BICUBIC))
    x = normalise(img[None], ctx.args.backbone)
    batch[f"image_s{i}"], batch[f"size_s{i}"] = x, np.array([[hs, ws]], np.int32)
    scaled.append(x)
  return cam.pass_inputs(batch, SCALES), scaled


def torch_cam_inference_fn(ctx, net, scaled: list, h: int, w: int):
  """infer_cls.py's procedure on the scaled images: run() -> the summed CAM [C, h, w]."""
  torch = ctx.orig.torch
  inputs = [po.to_torch(ctx.orig, x, ctx.device) for x in scaled]
  inputs = [t for x in inputs for t in (x, torch.flip(x, (3,)))]

  def run():
    with torch.no_grad():
      total = 0
      for i, x in enumerate(inputs):
        c = torch.nn.functional.interpolate(net.forward_cam(x), (h, w), mode="bilinear",
                                            align_corners=False)[0]
        total = total + (torch.flip(c, (2,)) if i % 2 else c)
      return total.cpu()
  return run


def time_cam_inference(ctx) -> None:
  import jax
  from affinity_jax import cam, models
  args = ctx.args
  h, w = ctx.settings["infer_size"]
  passes, scaled = scaled_passes(ctx, h, w)
  net, state = torch_net(ctx, "cam", args.seed)
  run_t = None if net is None else torch_cam_inference_fn(ctx, net, scaled, h, w)
  variables = jax_variables(ctx, "cam", state)
  for dtype in args.dtypes:
    model = models.build("cam", num_classes=20, width=args.width, dtype=dtype,
                         backbone=args.backbone)
    fn = cam.multiscale_flip_sum(
        lambda v, x, sizes, model=model: model.apply(v, x, sizes, method="cam"))
    passes_j = jax.device_put(passes)
    flops = flops_of(fn, variables, passes_j)

    def run_j():
      return jax.block_until_ready(fn(variables, passes_j))

    t_torch, t_jax = time_sides(ctx, run_t if dtype == args.dtypes[0] else None, run_j)
    if run_t is not None and dtype != args.dtypes[0]:
      t_torch = ctx.results["cam_infer_torch_s"]
    ctx.results["cam_infer_torch_s"] = t_torch
    extra = {"part": "cam_infer"}
    if run_t is not None and not args.flops_only:
      _, extra["max_rel_diff"] = po.diff(np.asarray(run_j())[0],
                                         run_t().numpy().transpose(1, 2, 0))
    add_row(ctx, f"{args.backbone} CAM inference, {h}x{w}, scales {SCALES} + flips", dtype, 1,
            t_jax, t_torch, flops, extra)


def time_aff_inference(ctx) -> None:
  import jax
  from affinity_jax import geometry, models
  args = ctx.args
  h, w = ctx.settings["infer_size"]
  x = ctx.images(1, h, w, 30)
  net, state = torch_net(ctx, "affinity", args.seed + 1)
  run_t = None
  if net is not None:
    x_t = po.to_torch(ctx.orig, x, ctx.device)

    def forward_t():
      with ctx.orig.torch.no_grad():
        out = net(x_t)
      torch_sync(ctx)
      return out
    run_t = forward_t
  variables = jax_variables(ctx, "affinity", state)
  x_j = jax.device_put(x)
  for dtype in args.dtypes:
    model = models.build("affinity", width=args.width, dtype=dtype, backbone=args.backbone)

    @jax.jit
    def fn(v, images, model=model):
      features = model.apply(v, images).astype("float32")
      return geometry.neighbourhood_affinities(features, radius=po.RADIUS, scheme="psa")

    flops = flops_of(fn, variables, x_j)
    t_torch, t_jax = time_sides(ctx, run_t if dtype == args.dtypes[0] else None,
                                lambda: jax.block_until_ready(fn(variables, x_j)))
    if run_t is not None and dtype != args.dtypes[0]:
      t_torch = ctx.results["aff_infer_torch_s"]
    ctx.results["aff_infer_torch_s"] = t_torch
    add_row(ctx, f"{args.backbone} AffinityNet + pair affinities, {h}x{w}", dtype, 1, t_jax,
            t_torch, flops, {"part": "aff_infer"})


def time_seg_inference(ctx) -> None:
  import jax
  from affinity_jax import cam, models
  args = ctx.args
  h, w = ctx.settings["infer_size"]
  passes, _ = scaled_passes(ctx, h, w)
  variables = jax_variables(ctx, "seg", None, num_classes=SEG_CLASSES)
  passes_j = jax.device_put(passes)
  for dtype in args.dtypes:
    model = models.build("seg", num_classes=SEG_CLASSES, width=args.width, dtype=dtype,
                         backbone=args.backbone)
    fn = cam.multiscale_flip_sum(lambda v, x, sizes, model=model: jax.nn.softmax(
        model.apply(v, x, sizes=sizes).astype("float32"), axis=-1))
    flops = flops_of(fn, variables, passes_j)
    _, t_jax = time_sides(ctx, None, lambda: jax.block_until_ready(fn(variables, passes_j)))
    add_row(ctx, f"{args.backbone} segmentation inference, {h}x{w}, scales {SCALES} + flips",
            dtype, 1, t_jax, None, flops, {"part": "seg_infer"})


def torch_dense_walk_fn(ctx, feats_chw: np.ndarray, cam_vec: np.ndarray):
  """The walk of infer_aff on a dense affinity matrix built as AffinityNet.forward(to_dense)
  builds it (pairs, identity, transposed pairs), from features [Cf, h, w] and scores [C, hw].

  Returns walk() -> walked scores [C, hw]: power, column normalisation, squarings, product (the
  part that is timed; the matrix is built once here).
  """
  torch = ctx.orig.torch
  c, h, w = feats_chw.shape
  ind_from, ind_to = ctx.orig.pyutils.get_indices_of_pairs(po.RADIUS, (h, w))
  x = torch.from_numpy(feats_chw).reshape(c, -1)
  ind_from, ind_to = torch.from_numpy(ind_from), torch.from_numpy(ind_to)
  k = ind_to.numel() // ind_from.numel()
  ff = x[:, ind_from][:, None, :]
  ft = x[:, ind_to].reshape(c, k, -1)
  aff = torch.exp(-torch.mean(torch.abs(ft - ff), dim=0)).reshape(-1)
  frm = ind_from[None].expand(k, -1).reshape(-1)
  n = h * w
  ident = torch.arange(n)
  idx = torch.cat([torch.stack([frm, ind_to]), torch.stack([ident, ident]),
                   torch.stack([ind_to, frm])], dim=1)
  val = torch.cat([aff, torch.ones(n), aff])
  matrix = torch.sparse_coo_tensor(idx, val, (n, n)).to_dense().to(ctx.device)
  vec = torch.from_numpy(cam_vec).to(ctx.device)

  def walk():
    with torch.no_grad():
      a = torch.pow(matrix, po.BETA)
      trans = a / torch.sum(a, dim=0, keepdim=True)
      for _ in range(po.LOGT):
        trans = torch.matmul(trans, trans)
      return torch.matmul(vec, trans).cpu()
  return walk


def time_random_walk(ctx) -> None:
  import jax
  import jax.numpy as jnp
  from affinity_jax import geometry, random_walk as rw
  args = ctx.args
  gh, gw = RW_GRID
  rng = np.random.default_rng(args.seed)
  # The walk's cost does not depend on the values; piecewise-constant regions plus noise, 448
  # channels as AffinityNet's, give it a non-trivial graph.
  region = (np.arange(gh)[:, None] // 14) * 4 + np.arange(gw)[None, :] // 14
  feats = (rng.normal(size=(16, 448)) * 0.3)[region] + rng.normal(size=(gh, gw, 448)) * 0.02
  feats = feats.astype(np.float32)
  scores = rng.random((gh, gw, po.NUM_CLASSES + 1)).astype(np.float32)
  walk_t = (torch_dense_walk_fn(ctx, np.ascontiguousarray(feats.transpose(2, 0, 1)),
                                np.ascontiguousarray(scores.reshape(-1, scores.shape[-1]).T))
            if ctx.orig is not None else None)
  aff_sym = geometry.neighbourhood_affinities(jnp.asarray(feats[None]), radius=po.RADIUS,
                                              scheme="psa")
  cam_j = jnp.asarray(scores[None])
  walk = jax.jit(lambda a, c: rw.propagate(a, c, radius=po.RADIUS, beta=po.BETA,
                                           t=2 ** po.LOGT))
  flops = flops_of(walk, aff_sym, cam_j)

  def walk_j():
    return walk(aff_sym, cam_j).block_until_ready()

  extra = {"part": "rw"}
  if walk_t is not None and not args.flops_only:
    _, extra["max_rel_diff"] = po.diff(np.asarray(walk_j())[0].reshape(-1, scores.shape[-1]).T,
                                       walk_t().numpy())
  t_torch, t_jax = time_sides(ctx, walk_t, walk_j)
  add_row(ctx, f"random walk of one {gh}x{gw} grid (sparse JAX, dense original)", "float32", 1,
          t_jax, t_torch, flops, extra)


# ---------------------------------------------------------------------------------------------


def fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def fmt_rate(value) -> str:
  """Images per second: one decimal from 10 up, three significant digits below (a CPU's step
  at the original's settings takes minutes: 0.112, not 0.1)."""
  return "-" if value is None else format(value, ".1f" if value >= 10 else ".3g")


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax
  settings = resolve_settings(args, jax.default_backend())
  ctx = Context(args, settings)
  devices = jax.devices()
  load = os.getloadavg()
  torch_version = ctx.orig.torch.__version__ if ctx.orig else None
  ctx.results.update({
      "backbone": args.backbone, "settings": settings, "parts": list(args.parts),
      "dtypes": list(args.dtypes), "width": args.width, "steps": args.steps,
      "backend": ctx.backend, "device_kind": devices[0].device_kind,
      "device_count": len(devices), "cpu_count": os.cpu_count(),
      "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
      "torch": torch_version, "torch_threads": args.threads if ctx.orig else None,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "peak_tflops": args.peak_tflops,
      "repeats": args.repeats, "loadavg_start": [round(v, 2) for v in load]})
  print(f"jax {jax.__version__} on {len(devices)} x {devices[0].device_kind} "
        f"({ctx.backend}); original: "
        f"{f'torch {torch_version} on {ctx.device}' if ctx.orig else 'not given (ours only)'}; "
        f"settings {settings}; XLA_FLAGS={ctx.results['xla_flags']!r}; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
  measures = {"cam_train": lambda c: time_training(c, "cam_train"),
              "aff_train": lambda c: time_training(c, "aff_train"),
              "cam_infer": time_cam_inference, "aff_infer": time_aff_inference,
              "seg_infer": time_seg_inference, "rw": time_random_walk}
  for part in args.parts:
    measures[part](ctx)
  load = os.getloadavg()
  ctx.results["loadavg_end"] = [round(v, 2) for v in load]
  ctx.results["rows"] = ctx.rows
  print()
  print("| measurement | dtype | JAX s | JAX img/s | original s | original img/s | "
        "ratio original/JAX | GFLOP | JAX MFU | original MFU |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in ctx.rows:
    print(f"| {r['name']} | {r['dtype']} | {fmt(r['jax_s'], '.3f')} | "
          f"{fmt_rate(r['jax_img_s'])} | "
          f"{fmt(r['torch_s'], '.3f')} | {fmt_rate(r['torch_img_s'])} | "
          f"{fmt(r['ratio'], '.2f')} | {fmt(r['gflop'], '.1f')} | {fmt(r['jax_mfu'], '.1%')} | "
          f"{fmt(r['torch_mfu'], '.1%')} |")
  print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  text = json.dumps(ctx.results)
  print(text)
  if args.json:
    with open(args.json + ".tmp", "w") as f:
      f.write(text)
    os.replace(args.json + ".tmp", args.json)
  return ctx.results


if __name__ == "__main__":
  main()
