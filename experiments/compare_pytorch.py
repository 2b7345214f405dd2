"""affinity_jax against the PyTorch original (github jiwoon-ahn/psa): parity and speed, side by side.

Both sides run in this process on the same weights and the same input arrays:
- PyTorch: the original's own networks, imported from its checkout (`--psa-root`, put on
  sys.path): network.resnet38_cls.Net (CAM) and network.resnet38_aff.Net (AffinityNet), with
  their released checkpoints (`--weights-cam`, `--weights-aff`) or, without them, a seeded random
  state dict with non-trivial BatchNorm statistics (random running mean / var, weight, bias).
  Their files are not edited. On the CPU, `torch.Tensor.cuda` is replaced by the identity in this
  process only, because AffinityNet.forward moves its pair indices with `.cuda()`.
- JAX: affinity_jax.models (CAMNet, AffinityNet) with the same state dicts converted by
  affinity_jax.convert.psa_state_dict_to_variables.

Parity (max abs difference, and max relative difference = max abs difference / max |PyTorch|):
- logits (forward), CAMs (forward_cam / CAMNet.cam) and affinities in the original's pair order
  (AffinityNet.forward vs geometry.to_psa_vector(geometry.pair_affinities(..., scheme="psa")))
  at several image sizes, non-square and odd ones included;
- multi-scale + flip CAMs: the original's infer_cls procedure written here in torch around its
  forward_cam (scales 1, 0.5, 1.5, 2, each with its flip; bilinear upsample, align_corners=False;
  label mask; flip back; sum; / (max + 1e-5)) vs cam.multiscale_cam. Both sides get the same
  already-resized images (PIL bicubic, as the original's loader) so resizing code does not enter;
- random walk (infer_aff's dense procedure written here in torch around forward(x, to_dense=True):
  A^beta, column normalisation, logt = 8 squarings, cam_vec @ T, bilinear upsample, argmax) vs
  random_walk.random_walk / random_walk_labels with scheme "psa", on the same CAM: max abs
  difference of the walked scores and the share of identical pseudo-label pixels.
The images are synthetic (coloured ellipses on a gradient, with noise), normalised once with the
original's Normalize and fed to both sides as the same float32 array.

Speed (after warm-up, PyTorch and JAX runs interleaved, median of `--repeats`): CAM inference
(batch 1 at 448x448 and 320x320), one AffinityNet training step (the original's loss, backward and
PolyOptimizer step in torch; a jitted step with the trainer's optimiser and
stages.training.make_aff_loss in JAX), and the random walk of one 56x56 grid from its affinities
(dense squarings in torch, sparse stencil walk in JAX). torch uses as many threads as XLA:CPU
(torch.set_num_threads(os.cpu_count())). Ratios are JAX / PyTorch throughput (higher = JAX faster).

Usage:
  python experiments/compare_pytorch.py --psa-root /tmp/psa [--weights-cam F.pth --weights-aff F.pth]
      [--device cpu|cuda] [--quick] [--parity-only]
`--quick` shrinks the work for a small CPU (fewer parity sizes, a small multi-scale image, a
training step at batch 2 / crop 224 instead of 8 / 448, 3 repeats). The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SIZES = ((320, 320), (448, 448), (375, 500), (281, 353))
QUICK_SIZES = ((320, 320), (281, 353))
MS_SIZE, QUICK_MS_SIZE = (281, 353), (121, 153)
SCALES = (1.0, 0.5, 1.5, 2.0)
RADIUS, BETA, LOGT, RW_ALPHA = 5, 8, 8, 16
NUM_CLASSES = 20
PRESENT_CLASSES = 3
SPEED_CAM_SIZES = ((448, 448), (320, 320))
RW_SPEED_GRID = (56, 56)
TRAIN_FULL = (8, 448)   # batch, crop of the original's train_aff
TRAIN_QUICK = (2, 224)
TRAIN_LR = 0.01
REQUIRED_FILES = ("network/resnet38d.py", "network/resnet38_cls.py", "network/resnet38_aff.py",
                  "tool/pyutils.py", "tool/torchutils.py", "voc12/data.py")


# ---------------------------------------------------------------------------------------------
# Arguments.


def check_psa_root(path: str) -> str:
  """The checkout of the original, or ValueError naming the folder and what is missing."""
  if not os.path.isdir(path):
    raise ValueError(f"--psa-root {path!r}: no such folder (expected a checkout of "
                     "github.com/jiwoon-ahn/psa)")
  missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise ValueError(f"--psa-root {path!r} is not a checkout of jiwoon-ahn/psa: missing "
                     f"{', '.join(missing)}")
  return os.path.abspath(path)


def parse_size(text: str) -> tuple[int, int]:
  """"HxW" -> (H, W)."""
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW, e.g. 375x500") from None
  # The original's psa pair set needs a grid of at least 5 x 9 (radius 5).
  if h < 33 or w < 65:
    raise argparse.ArgumentTypeError(f"size {text!r}: the psa pair set needs H >= 33, W >= 65")
  return h, w


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--psa-root", required=True,
                 help="checkout of github.com/jiwoon-ahn/psa (its network/, tool/, voc12/)")
  p.add_argument("--weights-cam", help="the original's resnet38_cls .pth (else random weights)")
  p.add_argument("--weights-aff", help="the original's resnet38_aff .pth (else random weights)")
  p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device")
  p.add_argument("--quick", action="store_true",
                 help="less work for a small CPU: 2 parity sizes, small multi-scale image, "
                      f"train step at batch {TRAIN_QUICK[0]} / crop {TRAIN_QUICK[1]}, 3 repeats")
  p.add_argument("--parity-only", action="store_true", help="skip the speed measurements")
  p.add_argument("--sizes", type=lambda s: tuple(parse_size(v) for v in s.split(",")),
                 help="parity image sizes, e.g. 320x320,281x353 (default: by --quick)")
  p.add_argument("--ms-size", type=parse_size, help="image size of the multi-scale CAM check")
  p.add_argument("--repeats", type=int, help="timed repeats per measurement (default 5, quick 3)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    args.psa_root = check_psa_root(args.psa_root)
    for flag in ("weights_cam", "weights_aff"):
      path = getattr(args, flag)
      if path is not None and not os.path.isfile(path):
        raise ValueError(f"--{flag.replace('_', '-')} {path!r}: no such file")
  except ValueError as e:
    p.error(str(e))
  args.sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
  args.ms_size = args.ms_size or (QUICK_MS_SIZE if args.quick else MS_SIZE)
  args.repeats = args.repeats or (3 if args.quick else 5)
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  # The walk runs on the last parity size (non-square in both default lists).
  args.rw_size = args.sizes[-1]
  return args


# ---------------------------------------------------------------------------------------------
# The PyTorch side.


def load_original(psa_root: str, device: str) -> types.SimpleNamespace:
  """Imports the original's modules from its checkout; returns them with torch."""
  import torch
  if device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("--device cuda: torch sees no CUDA device")
  if device == "cpu":
    # AffinityNet.forward calls .cuda() on its index tensors; make that a no-op in this process
    # so that the original runs unmodified on the CPU.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.set_num_threads(os.cpu_count() or 1)  # XLA:CPU uses every core.
  # The original builds its dense matrix with the legacy sparse.FloatTensor constructor.
  warnings.filterwarnings("ignore", message=r"torch\.sparse\.SparseTensor")
  sys.path.insert(0, psa_root)
  import network.resnet38_aff
  import network.resnet38_cls
  import network.resnet38d
  import tool.pyutils
  import tool.torchutils
  import voc12.data
  return types.SimpleNamespace(torch=torch, cls=network.resnet38_cls, aff=network.resnet38_aff,
                               backbone=network.resnet38d, pyutils=tool.pyutils,
                               torchutils=tool.torchutils, data=voc12.data)


def random_state_dict(net, seed: int) -> dict:
  """A seeded state dict for `net` with non-trivial BatchNorm statistics.

  Convolutions: normal with std sqrt(1 / fan_in) (activations stay O(1) through the 17 residual
  blocks); BN: weight U(0.5, 1.5), bias N(0, 0.1), running_mean N(0, 0.1), running_var U(0.5, 2).
  """
  torch = sys.modules["torch"]
  gen = torch.Generator().manual_seed(seed)
  out = {}
  for name, ref in net.state_dict().items():
    if name.endswith("num_batches_tracked"):
      out[name] = ref.clone()
      continue
    shape = ref.shape
    if ref.ndim == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      value = torch.randn(shape, generator=gen) * (1.0 / fan_in) ** 0.5
    elif name.endswith("running_var"):
      value = 0.5 + 1.5 * torch.rand(shape, generator=gen)
    elif name.endswith("weight"):
      value = 0.5 + torch.rand(shape, generator=gen)
    else:  # BN bias and running_mean
      value = 0.1 * torch.randn(shape, generator=gen)
    out[name] = value.to(ref.dtype)
  return out


def build_torch_net(orig, kind: str, weights: str | None, seed: int, device: str):
  """The original's Net ("cam" or "affinity"), weights loaded strictly, in eval mode."""
  torch = orig.torch
  net = (orig.cls if kind == "cam" else orig.aff).Net()
  if weights:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    source = weights
  else:
    state = random_state_dict(net, seed)
    source = f"random state dict (seed {seed})"
  net.load_state_dict(state, strict=True)
  net.eval()  # The original's train() returns None: no chaining.
  net.to(device)
  return net, {k: v.detach().cpu().numpy() for k, v in state.items()}, source


def to_torch(orig, images_nhwc: np.ndarray, device: str):
  return orig.torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(device)


def torch_multiscale_cam(orig, net, passes, flips, image_hw, label, device):
  """infer_cls's CAM of one image: [C, H, W] numpy. `passes`: [1, h, w, 3] normalised inputs."""
  torch, F = orig.torch, orig.torch.nn.functional
  total = 0.0
  with torch.no_grad():
    for x, flipped in zip(passes, flips):
      cam = net.forward_cam(to_torch(orig, x, device))
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
  x = F.pad(to_torch(orig, image, device), (0, pw, 0, ph))
  scores = np.zeros((cam_chw.shape[0] + 1, height, width), np.float32)
  scores[1:] = cam_chw
  scores[0] = (1 - np.max(cam_chw, 0)) ** RW_ALPHA
  scores = np.pad(scores, ((0, 0), (0, ph), (0, pw)))
  with torch.no_grad():
    aff_mat = torch.pow(aff_net.forward(x, True), BETA)
    trans = aff_mat / torch.sum(aff_mat, dim=0, keepdim=True)
    for _ in range(LOGT):
      trans = torch.matmul(trans, trans)
    vec = F.avg_pool2d(torch.from_numpy(scores), 8, 8)
    gh, gw = vec.shape[1:]
    walked = torch.matmul(vec.reshape(vec.shape[0], -1).to(device), trans)
    walked = walked.reshape(1, -1, gh, gw)
    up = F.interpolate(walked, (height + ph, width + pw), mode="bilinear", align_corners=False)
    label = torch.argmax(up, 1)[0, :height, :width]
  return walked[0].cpu().numpy(), label.cpu().numpy()


def torch_dense_walk_fn(orig, feats_chw, cam_vec, device):
  """The walk of infer_aff from a dense affinity matrix built as AffinityNet.forward(to_dense)
  does (pairs, identity, transposed pairs); returns (matrix, fn() -> walked [C, hw])."""
  torch = orig.torch
  c, h, w = feats_chw.shape
  ind_from, ind_to = orig.pyutils.get_indices_of_pairs(RADIUS, (h, w))
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
  matrix = torch.sparse_coo_tensor(idx, val, (n, n)).to_dense().to(device)
  vec = torch.from_numpy(cam_vec).to(device)

  def walk():
    with torch.no_grad():
      a = torch.pow(matrix, BETA)
      trans = a / torch.sum(a, dim=0, keepdim=True)
      for _ in range(LOGT):
        trans = torch.matmul(trans, trans)
      out = torch.matmul(vec, trans)
      if device == "cuda":
        torch.cuda.synchronize()
      return out
  return walk


def torch_train_step_fn(orig, aff_net, images, label_grids, device):
  """One step of train_aff on a fixed batch: forward, the original's loss, backward, SGD."""
  torch = orig.torch
  aff_net.train()  # the original's train(): BN stays in eval mode, conv1a / b2* frozen.
  groups = aff_net.get_parameter_groups()
  wd = 5e-4
  optimizer = orig.torchutils.PolyOptimizer([
      {"params": groups[0], "lr": TRAIN_LR, "weight_decay": wd},
      {"params": groups[1], "lr": 2 * TRAIN_LR, "weight_decay": 0},
      {"params": groups[2], "lr": 10 * TRAIN_LR, "weight_decay": wd},
      {"params": groups[3], "lr": 20 * TRAIN_LR, "weight_decay": 0},
  ], lr=TRAIN_LR, weight_decay=wd, max_step=1000)
  extract = orig.data.ExtractAffinityLabelInRadius(cropsize=label_grids.shape[1], radius=RADIUS)
  bg, fg, neg = (torch.stack(t).to(device) for t in zip(*(extract(g) for g in label_grids)))
  x = to_torch(orig, images, device)

  def step():
    aff = aff_net(x)
    bg_loss = torch.sum(-bg * torch.log(aff + 1e-5)) / (torch.sum(bg) + 1e-5)
    fg_loss = torch.sum(-fg * torch.log(aff + 1e-5)) / (torch.sum(fg) + 1e-5)
    neg_loss = torch.sum(-neg * torch.log(1. + 1e-5 - aff)) / (torch.sum(neg) + 1e-5)
    loss = bg_loss / 4 + fg_loss / 4 + neg_loss / 2
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()
  return step


# ---------------------------------------------------------------------------------------------
# The JAX side.


class JaxSide:
  """affinity_jax's CAMNet and AffinityNet on converted weights, with jitted entry points."""

  def __init__(self, cam_state: dict, aff_state: dict):
    import jax
    from affinity_jax import models
    from affinity_jax.convert import psa_state_dict_to_variables
    self.jax = jax
    self.cam_net, self.aff_net = models.build("cam"), models.build("affinity")
    self.cam_vars = jax.device_put(psa_state_dict_to_variables(cam_state, "cam"))
    self.aff_vars = jax.device_put(psa_state_dict_to_variables(aff_state, "affinity"))
    cam_net, aff_net = self.cam_net, self.aff_net
    self._logits = jax.jit(lambda v, x: cam_net.apply(v, x))
    self._cam = jax.jit(lambda v, x: cam_net.apply(v, x, method=cam_net.cam))
    self._features = jax.jit(lambda v, x: aff_net.apply(v, x))

  def logits(self, x):
    return self._logits(self.cam_vars, x)

  def cam(self, x):
    return self._cam(self.cam_vars, x)

  def features(self, x):
    return self._features(self.aff_vars, x)

  def train_step_fn(self, images: np.ndarray, label_grids: np.ndarray):
    """A jitted AffinityNet step as affinity_jax.train builds it (frozen set split off, PSA
    optimiser groups, dropout key folded with the step), loss make_aff_loss(5, "psa")."""
    import jax
    import jax.numpy as jnp
    import optax
    from affinity_jax import models, train
    from affinity_jax.stages.training import make_aff_loss
    model, loss_fn = self.aff_net, make_aff_loss(RADIUS, "psa")
    params = self.aff_vars["params"]
    trainable, frozen, train_labels = train.split_frozen(params, models.param_labels(params))
    tx = train.make_optimizer(train.OptimConfig(lr=TRAIN_LR, total_steps=1000), train_labels)
    batch_stats = self.aff_vars["batch_stats"]
    base_rng = jax.random.key(0)

    def train_step(state, frozen, batch_stats, batch):
      rng = jax.random.fold_in(base_rng, state["step"])

      def loss_of(trainable):
        v = {"params": train.merge_params(trainable, frozen), "batch_stats": batch_stats}
        out = model.apply(v, batch["image"], train=True, rngs={"dropout": rng})
        return loss_fn(out, batch)

      (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
              "opt_state": opt_state}, loss

    step_fn = jax.jit(train_step, donate_argnums=(0,))
    # Copies: the donated state must not alias the parity weights.
    trainable = jax.tree.map(jnp.array, trainable)
    holder = {"state": {"step": jnp.zeros((), jnp.int32), "params": trainable,
                        "opt_state": tx.init(trainable)}}
    batch = {"image": jnp.asarray(images), "aff_label": jnp.asarray(label_grids, jnp.int32)}

    def step():
      holder["state"], loss = step_fn(holder["state"], frozen, batch_stats, batch)
      return float(loss)
    return step


# ---------------------------------------------------------------------------------------------
# Inputs and measurements.


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
  """[h, w, 3] uint8: a colour gradient with a few coloured ellipses and noise (regions that
  give the affinity features some structure)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w] / np.array([h, w]).reshape(2, 1, 1)
  c0, c1 = rng.uniform(0, 255, (2, 3))
  img = c0 * (1 - xx[..., None]) + c1 * xx[..., None]
  for _ in range(5):
    cy, cx = rng.uniform(0.1, 0.9, 2)
    ry, rx = rng.uniform(0.1, 0.35, 2)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    img[inside] = rng.uniform(0, 255, 3)
  img += rng.normal(0, 8, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def normalise(orig, img_uint8: np.ndarray) -> np.ndarray:
  """[H, W, 3] uint8 -> [1, H, W, 3] float32 with the original's Normalize."""
  return orig.backbone.Normalize()(img_uint8)[None].astype(np.float32)


def multiscale_inputs(orig, img_uint8: np.ndarray):
  """The 8 passes of infer_cls in its order (each scale, then its flip), as the original's
  loader makes them: PIL bicubic resize to round(W s) x round(H s), normalise, flip."""
  from PIL import Image
  h, w = img_uint8.shape[:2]
  passes, flips = [], []
  for s in SCALES:
    resized = np.asarray(Image.fromarray(img_uint8).resize((round(w * s), round(h * s)),
                                                           resample=Image.BICUBIC))
    x = normalise(orig, resized)
    passes += [x, np.ascontiguousarray(x[:, :, ::-1])]
    flips += [False, True]
  return passes, flips


def affinity_label_grids(batch: int, h: int, w: int, seed: int) -> np.ndarray:
  """[B, h, w] uint8 affinity labels: background, two classes and unconfident (255) blocks."""
  rng = np.random.default_rng(seed)
  grids = np.zeros((batch, h, w), np.uint8)
  for g in grids:
    for value in (3, 12, 255):
      y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
      g[y:y + rng.integers(2, h // 2 + 2), x:x + rng.integers(2, w // 2 + 2)] = value
  return grids


def diff(ours, reference) -> tuple[float, float]:
  """(max |ours - reference|, that / max |reference|)."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  if ours.shape != reference.shape:
    raise ValueError(f"shape mismatch: {ours.shape} vs {reference.shape}")
  err = float(np.max(np.abs(ours - reference)))
  return err, err / max(float(np.max(np.abs(reference))), 1e-30)


def interleaved_median(fn_torch, fn_jax, repeats: int, warmup: int = 1) -> tuple[float, float]:
  """Median seconds per call of each, runs alternated so that load changes hit both alike."""
  for _ in range(warmup):
    fn_torch()
    fn_jax()
  times_t, times_j = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn_torch()
    times_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    fn_jax()
    times_j.append(time.perf_counter() - t0)
  return statistics.median(times_t), statistics.median(times_j)


def run_parity(args, orig, t_cam, t_aff, js, results, rows):
  import jax.numpy as jnp
  from affinity_jax import cam as cam_lib, geometry, random_walk as rw
  torch, dev = orig.torch, args.device
  cams_for_walk = {}
  for i, (h, w) in enumerate(args.sizes):
    x = normalise(orig, synthetic_image(h, w, args.seed + 1 + i))
    xt, xj = to_torch(orig, x, dev), jnp.asarray(x)
    with torch.no_grad():
      logits_t = t_cam(xt).cpu().numpy()
      cam_t = t_cam.forward_cam(xt).cpu().numpy()
      aff_t = t_aff(xt).cpu().numpy().reshape(1, -1)
    logits_j = np.asarray(js.logits(xj))
    cam_j = np.asarray(js.cam(xj)).transpose(0, 3, 1, 2)
    aff_j = np.asarray(geometry.to_psa_vector(
        geometry.pair_affinities(js.features(xj), radius=RADIUS, scheme="psa"), RADIUS))
    tag = f"{h}x{w}"
    for name, ours, ref in (("logits", logits_j, logits_t), ("cam", cam_j, cam_t),
                            ("affinity", aff_j, aff_t)):
      err, rel = diff(ours, ref)
      results[f"{name}_{tag}_max_abs"], results[f"{name}_{tag}_max_rel"] = err, rel
      rows.append((f"{name} max abs / rel", tag, f"{np.max(np.abs(ref)):.3g} (max |x|)",
                   "", f"{err:.2e} / {rel:.2e}"))
    if (h, w) == args.rw_size:
      # The walk's CAM: the single-scale CAM of this image, normalised as infer_cls does, for
      # the PRESENT_CLASSES classes with the largest logits.
      label = np.zeros(NUM_CLASSES, np.float32)
      label[np.argsort(-logits_t[0])[:PRESENT_CLASSES]] = 1
      with torch.no_grad():
        up = torch.nn.functional.interpolate(torch.from_numpy(cam_t), (h, w), mode="bilinear",
                                             align_corners=False)[0].numpy()
      up = up * label.reshape(-1, 1, 1)
      cams_for_walk = dict(image=x, cam=up / (up.max((1, 2), keepdims=True) + 1e-5))
    print(f"  parity {tag} done", flush=True)

  # Multi-scale + flip CAM.
  mh, mw = args.ms_size
  img = synthetic_image(mh, mw, args.seed + 100)
  passes, flips = multiscale_inputs(orig, img)
  label = np.zeros(NUM_CLASSES, np.float32)
  label[[2, 7, 14]] = 1
  ms_t = torch_multiscale_cam(orig, t_cam, passes, flips, (mh, mw), label, dev)
  grids = [js.cam(jnp.asarray(p))[0] for p in passes]
  ms_j = np.asarray(cam_lib.multiscale_cam(grids, image_hw=(mh, mw), label=jnp.asarray(label),
                                           flips=flips)).transpose(2, 0, 1)
  err, rel = diff(ms_j, ms_t)
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
  scores = rw.prepare_cam(cam_hwc, alpha=RW_ALPHA)
  walked_j = np.asarray(rw.random_walk(feats, scores[None], radius=RADIUS, beta=BETA,
                                       t=2 ** LOGT, scheme="psa")[0]).transpose(2, 0, 1)
  label_j = rw.random_walk_labels(feats[0], cam_hwc, alpha=RW_ALPHA, radius=RADIUS, beta=BETA,
                                  t=2 ** LOGT, scheme="psa")
  err, _ = diff(walked_j, walked_t)
  same = 100.0 * float(np.mean(label_j == label_t))
  # How much the walk moved the labels, so that "identical" is not the trivial case of a walk
  # that does nothing (affinities all ~0) or floods everything.
  before = np.argmax(np.asarray(scores), -1)
  after = np.argmax(walked_t, 0)
  moved = 100.0 * float(np.mean(before != after))
  aff = np.asarray(geometry.to_psa_vector(geometry.pair_affinities(feats, radius=RADIUS,
                                                                   scheme="psa"), RADIUS))
  results.update(rw_scores_max_abs=err, rw_labels_identical_pct=same, rw_walk_moved_cells_pct=moved,
                 rw_mean_affinity=float(aff.mean()))
  rows.append(("random walk scores max abs", f"{h}x{w}", f"{np.abs(walked_t).max():.3g} (max)",
               "", f"{err:.2e}"))
  rows.append(("random walk identical labels", f"{h}x{w}",
               f"walk moved {moved:.1f}% of cells", f"mean affinity {aff.mean():.3f}",
               f"{same:.3f}%"))
  print("  random walk done", flush=True)


def run_speed(args, orig, t_cam, t_aff, js, results, rows):
  import jax
  import jax.numpy as jnp
  from affinity_jax import random_walk as rw
  torch, dev, reps = orig.torch, args.device, args.repeats

  def sync(out):
    if dev == "cuda":
      torch.cuda.synchronize()
    return out

  for h, w in SPEED_CAM_SIZES:
    x = normalise(orig, synthetic_image(h, w, args.seed + 7))
    xt, xj = to_torch(orig, x, dev), jnp.asarray(x)

    def run_t():
      with torch.no_grad():
        return sync(t_cam.forward_cam(xt))
    tt, tj = interleaved_median(run_t, lambda: js.cam(xj).block_until_ready(), reps)
    results[f"cam_{h}_ratio"] = tt / tj
    rows.append(("CAM inference img/s (batch 1)", f"{h}x{w}", f"{1 / tt:.3f}", f"{1 / tj:.3f}",
                 f"{tt / tj:.2f}x"))
    print(f"  speed CAM {h} done", flush=True)

  batch, crop = TRAIN_QUICK if args.quick else TRAIN_FULL
  images = np.concatenate([normalise(orig, synthetic_image(crop, crop, args.seed + 20 + i))
                           for i in range(batch)])
  grids = affinity_label_grids(batch, crop // 8, crop // 8, args.seed)
  step_t = torch_train_step_fn(orig, t_aff, images, grids, dev)
  step_j = js.train_step_fn(images, grids)
  loss_t, loss_j = step_t(), step_j()  # compile / warm up; dropout differs, so ~equal only
  tt, tj = interleaved_median(step_t, step_j, reps, warmup=0)
  t_aff.eval()
  results["train_ratio"] = tt / tj
  results["train_first_loss_torch"], results["train_first_loss_jax"] = loss_t, loss_j
  rows.append(("AffinityNet train step img/s", f"b{batch} {crop}x{crop}",
               f"{batch / tt:.3f}", f"{batch / tj:.3f}", f"{tt / tj:.2f}x"))
  print("  speed train step done", flush=True)

  gh, gw = RW_SPEED_GRID
  rng = np.random.default_rng(args.seed)
  # Features of a real 448x448 image's grid would do as well; the walk's cost does not depend
  # on the values. Piecewise-constant regions plus noise, 448 channels as AffinityNet's.
  region = (np.arange(gh)[:, None] // 14) * 4 + np.arange(gw)[None, :] // 14
  feats = (rng.normal(size=(16, 448)) * 0.3)[region] + rng.normal(size=(gh, gw, 448)) * 0.02
  feats = feats.astype(np.float32)
  cam = rng.random((gh, gw, NUM_CLASSES + 1)).astype(np.float32)
  walk_t = torch_dense_walk_fn(orig, np.ascontiguousarray(feats.transpose(2, 0, 1)),
                               np.ascontiguousarray(cam.reshape(-1, cam.shape[-1]).T), dev)
  aff_sym = rw.neighbourhood_affinities(jnp.asarray(feats[None]), radius=RADIUS, scheme="psa")
  cam_j = jnp.asarray(cam[None])

  def walk_j():
    return rw.propagate(aff_sym, cam_j, radius=RADIUS, beta=BETA, t=2 ** LOGT).block_until_ready()
  tt, tj = interleaved_median(walk_t, walk_j, reps)
  err, _ = diff(np.asarray(walk_j())[0].reshape(-1, cam.shape[-1]).T, walk_t().cpu().numpy())
  results["rw_ratio"], results["rw_56_scores_max_abs"] = tt / tj, err
  rows.append(("random walk per image (from affinities)", f"{gh}x{gw} grid",
               f"{tt * 1e3:.0f} ms dense", f"{tj * 1e3:.1f} ms sparse", f"{tt / tj:.1f}x"))
  print("  speed random walk done", flush=True)
  del jax


def main(argv=None) -> dict:
  args = parse_args(argv)
  orig = load_original(args.psa_root, args.device)
  import jax
  import flax
  torch = orig.torch
  t0 = time.time()
  t_cam, cam_state, cam_source = build_torch_net(orig, "cam", args.weights_cam, args.seed,
                                                  args.device)
  t_aff, aff_state, aff_source = build_torch_net(orig, "affinity", args.weights_aff,
                                                  args.seed + 1, args.device)
  js = JaxSide(cam_state, aff_state)
  del cam_state, aff_state
  print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}; "
        f"torch {torch.__version__} ({args.device}, {torch.get_num_threads()} threads); "
        f"jax {jax.__version__} ({jax.default_backend()}); flax {flax.__version__}")
  print(f"weights: cam = {cam_source}; affinity = {aff_source}; set up in "
        f"{time.time() - t0:.0f} s", flush=True)

  results: dict = {"device": args.device, "quick": bool(args.quick)}
  rows: list = []
  run_parity(args, orig, t_cam, t_aff, js, results, rows)
  if not args.parity_only:
    run_speed(args, orig, t_cam, t_aff, js, results, rows)

  header = ("measure", "size", "PyTorch", "JAX", "difference / JAX:PyTorch")
  widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
  for r in [header, tuple("-" * n for n in widths)] + rows:
    print("  ".join(str(v).ljust(n) for v, n in zip(r, widths)))
  print(f"total {time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")
  print(json.dumps(results, sort_keys=True))
  return results


if __name__ == "__main__":
  main()
