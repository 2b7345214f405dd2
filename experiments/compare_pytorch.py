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

For the models' speed work: `--analyse-cam` times the CAM forward per backbone stage and per
heavy convolution (forward and backward) on both sides, and rewrites of the JAX forward (BN
folding, merged 1x1 convolutions, 1x1 as matrix products, dilation by space-to-batch); it honours
XLA_FLAGS. `--matmul-1x1` runs the whole comparison with affinity_jax's 1x1 convolutions
replaced by matrix products (a prototype, patched in this process only).
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
  p.add_argument("--speed-parts", default="cam,train,rw",
                 help="speed measurements to run, comma separated: cam, train, rw")
  p.add_argument("--matmul-1x1", action="store_true",
                 help="prototype: run affinity_jax's 1x1 convolutions as matrix products")
  p.add_argument("--analyse-cam", action="store_true",
                 help="only the CAM forward: per-stage times torch vs JAX and candidate "
                      "rewrites (BN folding, merged 1x1 convolutions); honours XLA_FLAGS")
  p.add_argument("--analyse-size", type=parse_size, default=(448, 448),
                 help="image size of --analyse-cam (default 448x448)")
  p.add_argument("--analyse-parts", default="total,stages,variants",
                 help="what --analyse-cam measures, comma separated: total (whole CAM "
                      "forward), stages (per backbone stage), variants (rewrites of the JAX "
                      "forward), convs (single convolutions of the stride-8 stages)")
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
  for flag, allowed in (("speed_parts", {"cam", "train", "rw"}),
                        ("analyse_parts", {"total", "stages", "variants", "convs"})):
    if not set(getattr(args, flag).split(",")) <= allowed:
      p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: expected a comma-separated "
              f"subset of {', '.join(sorted(allowed))}")
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
  warnings.filterwarnings("ignore", message=r"Sparse invariant checks")
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
    # Files saved by PyTorch 0.4 lack BN's num_batches_tracked (unused in eval mode).
    state = {**{k: v for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")},
             **state}
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
  """The walk of infer_aff on a dense affinity matrix built as AffinityNet.forward(to_dense)
  builds it (pairs, identity, transposed pairs), from features [Cf, h, w] and scores [C, hw].

  Returns walk() -> walked scores [C, hw]: power, column normalisation, squarings, product (the
  part that is timed; the matrix is built once here).
  """
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

  def __init__(self, cam_state: dict, aff_state: dict | None):
    import jax
    from affinity_jax import models
    from affinity_jax.convert import psa_state_dict_to_variables
    self.jax = jax
    self.cam_net, self.aff_net = models.build("cam"), models.build("affinity")
    self.cam_vars = jax.device_put(psa_state_dict_to_variables(cam_state, "cam"))
    self.aff_vars = (None if aff_state is None else
                     jax.device_put(psa_state_dict_to_variables(aff_state, "affinity")))
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



def use_matmul_1x1() -> None:
  """Prototype for the models owner: every bias-free 1x1 convolution of affinity_jax.models as a
  matrix product (einsum; a strided one subsamples first), same parameter names and shapes.
  XLA:CPU differentiates a 1x1 lax.conv several times slower than the equivalent dot (see
  --analyse-parts convs). Applied by monkeypatching `conv` in models/resnet38.py and heads.py in
  this process only (--matmul-1x1)."""
  from typing import Any, Callable

  import flax.linen as nn
  import jax.numpy as jnp
  from affinity_jax.models import heads, resnet38
  original = resnet38.conv

  class Conv1x1(nn.Module):
    features: int
    stride: int
    dtype: Any
    kernel_init: Callable

    @nn.compact
    def __call__(self, x, fold=None):
      kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                          jnp.float32)[0, 0]
      shift = None
      if fold is not None:  # a frozen BN after the convolution, as models.resnet38.Conv folds it
        mult, shift = fold
        kernel = kernel * mult
      if self.stride > 1:  # PyTorch's 1x1 stride-s convolution reads rows/columns 0, s, 2s, ...
        x = x[:, ::self.stride, ::self.stride]
      y = jnp.einsum("bhwc,co->bhwo", x.astype(self.dtype), kernel.astype(self.dtype))
      return y if shift is None else y + shift.astype(self.dtype)

  def conv(features, kernel, *, stride=1, dilation=1, name, dtype, use_bias=False,
           kernel_init=resnet38.torch_default_init):
    if kernel == 1 and not use_bias:
      return Conv1x1(features, stride, dtype, kernel_init, name=name)
    return original(features, kernel, stride=stride, dilation=dilation, name=name, dtype=dtype,
                    use_bias=use_bias, kernel_init=kernel_init)

  resnet38.conv = heads.conv = conv


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


def interleaved_median(fn_torch, fn_jax, repeats: int, warmup: int = 1,
                       reduce=statistics.median) -> tuple[float, float]:
  """Median (or `reduce`) seconds per call of each, runs alternated so that load changes hit
  both alike."""
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
  return reduce(times_t), reduce(times_j)


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
  import jax.numpy as jnp
  torch, dev, reps = orig.torch, args.device, args.repeats

  def sync(out):
    if dev == "cuda":
      torch.cuda.synchronize()
    return out

  parts = set(args.speed_parts.split(","))
  for h, w in (SPEED_CAM_SIZES if "cam" in parts else ()):
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

  if "train" in parts:
    run_train_speed(args, orig, t_aff, js, results, rows)
  if "rw" in parts:
    run_walk_speed(args, orig, js, results, rows)


def run_train_speed(args, orig, t_aff, js, results, rows):
  dev, reps = args.device, args.repeats
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


def run_walk_speed(args, orig, js, results, rows):
  import jax.numpy as jnp
  from affinity_jax import random_walk as rw
  dev, reps = args.device, args.repeats
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



# ---------------------------------------------------------------------------------------------
# Where the JAX CAM forward spends its time on this machine (--analyse-cam).

STAGES = (("conv1a + b2..b2_2", ("conv1a", "b2", "b2_1", "b2_2")),
          ("b3..b3_2 (stride 4)", ("b3", "b3_1", "b3_2")),
          ("b4..b4_5 (stride 8)", ("b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5")),
          ("b5..b5_2 (dilation 2)", ("b5", "b5_1", "b5_2")),
          ("b6 (bottleneck, dilation 4)", ("b6",)),
          ("b7 (bottleneck, dilation 4)", ("b7",)),
          ("bn7 + fc8 (CAM head)", ("head",)))


def _lax_cam(variables, x, *, fold_bn: bool, merge_1x1: bool):
  """CAMNet.cam written with lax convolutions, optionally with two candidate speed-ups:

  fold_bn: a BN whose input is only the output of one convolution (bn_branch2b1, bn_branch2b2:
    19 of the 37) becomes that convolution's per-channel kernel scale and bias. The block-input
    BNs cannot be folded backwards (their input is a residual sum that also feeds the identity
    shortcut) nor forwards (a ReLU sits between them and the next convolution).
  merge_1x1: in the bottleneck blocks the shortcut projection and the first 1x1 convolution read
    the same input with the same stride: one convolution with the kernels concatenated.
  """
  import jax
  import jax.numpy as jnp
  from affinity_jax.models import resnet38
  params, stats = variables["params"], variables["batch_stats"]

  def conv(v, kernel, stride=1, dilation=1, bias=None):
    pad = dilation * (kernel.shape[0] - 1) // 2
    y = jax.lax.conv_general_dilated(v, kernel, (stride, stride), [(pad, pad), (pad, pad)],
                                     rhs_dilation=(dilation, dilation),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias

  def affine(bn):
    mult = bn["scale"] * jax.lax.rsqrt(bn["var"] + resnet38.BN_EPS)
    return mult, bn["bias"] - bn["mean"] * mult

  def bn_relu(v, bn):
    mult, shift = affine(bn)
    return jax.nn.relu(v * mult + shift)

  def conv_bn_relu(v, kernel, bn, stride=1, dilation=1):
    if fold_bn:
      mult, shift = affine(bn)
      return jax.nn.relu(conv(v, kernel * mult, stride, dilation, bias=shift))
    return bn_relu(conv(v, kernel, stride, dilation), bn)

  x = conv(x, params["conv1a"]["kernel"])
  for spec in resnet38.BLOCKS:
    p, s = params[spec.name], stats[spec.name]
    pre = bn_relu(x, s["bn_branch2a"])
    proj = resnet38.has_projection(spec)
    if spec.kind == "basic":
      shortcut = conv(pre, p["conv_branch1"]["kernel"], spec.stride) if proj else x
      y = conv_bn_relu(pre, p["conv_branch2a"]["kernel"], s["bn_branch2b1"], spec.stride,
                       spec.first_dilation)
      y = conv(y, p["conv_branch2b1"]["kernel"], dilation=spec.dilation)
    else:
      k1, k2a = p["conv_branch1"]["kernel"], p["conv_branch2a"]["kernel"]
      if merge_1x1:
        both = conv(pre, jnp.concatenate([k1, k2a], -1), spec.stride)
        shortcut, y = both[..., :k1.shape[-1]], both[..., k1.shape[-1]:]
        y = bn_relu(y, s["bn_branch2b1"])
      else:
        shortcut = conv(pre, k1, spec.stride)
        y = conv_bn_relu(pre, k2a, s["bn_branch2b1"], spec.stride)
      y = conv_bn_relu(y, p["conv_branch2b1"]["kernel"], s["bn_branch2b2"],
                       dilation=spec.dilation)
      y = conv(y, p["conv_branch2b2"]["kernel"])
    x = y + shortcut
  return jax.nn.relu(conv(bn_relu(x, stats["bn7"]), params["fc8"]["kernel"]))



# Single convolutions of the backbone on a stride-8 grid (--analyse-parts convs): name, in and
# out channels, kernel size, dilation.
CONV_SHAPES = (("b4_x conv 3x3", 512, 512, 3, 1),
               ("b5_x conv_branch2b1 3x3 d2", 512, 1024, 3, 2),
               ("b6 conv_branch2b1 3x3 d4", 512, 1024, 3, 4),
               ("b7 conv_branch2a 1x1", 2048, 1024, 1, 1),
               ("b7 conv_branch2b1 3x3 d4", 1024, 2048, 3, 4),
               ("b7 conv_branch2b2 / branch1 1x1", 2048, 4096, 1, 1))


def space_to_batch_conv(x, kernel, dilation: int):
  """A 'same' dilated 3x3 convolution as an undilated one on the dilation^2 interleaved
  sub-grids (what TensorFlow's atrous_conv2d does). x: [B, H, W, C], kernel: [3, 3, C, O]."""
  import jax
  b, h, w, c = x.shape
  d = dilation
  hp, wp = -(-(h + 2 * d) // d) * d, -(-(w + 2 * d) // d) * d
  xp = jax.numpy.pad(x, ((0, 0), (d, hp - h - d), (d, wp - w - d), (0, 0)))
  xs = xp.reshape(b, hp // d, d, wp // d, d, c).transpose(0, 2, 4, 1, 3, 5)
  xs = xs.reshape(b * d * d, hp // d, wp // d, c)
  y = jax.lax.conv_general_dilated(xs, kernel, (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  qh, qw, o = y.shape[1], y.shape[2], y.shape[3]
  y = y.reshape(b, d, d, qh, qw, o).transpose(0, 3, 1, 4, 2, 5).reshape(b, qh * d, qw * d, o)
  return y[:, :h, :w]


def run_conv_analysis(args, orig, results, rows):
  """Each heavy convolution alone: torch conv2d (NCHW) vs lax.conv (NHWC, as models/), plus
  a 1x1 convolution as a matrix product and a dilated one by space-to-batch. Minimum of the
  repeats (on a shared machine, noise only adds time)."""
  import jax
  import jax.numpy as jnp
  torch, reps = orig.torch, max(args.repeats, 3)
  h, w = (-(-v // 8) for v in args.analyse_size)
  rng = np.random.default_rng(args.seed)

  def best(fn):
    fn()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return min(times)

  for name, cin, cout, k, d in CONV_SHAPES:
    x = rng.standard_normal((1, h, w, cin), np.float32)
    kern = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    kt = torch.from_numpy(np.ascontiguousarray(kern.transpose(3, 2, 0, 1)))
    xj, kj = jnp.asarray(x), jnp.asarray(kern)
    pad = d * (k - 1) // 2
    lax_conv = jax.jit(lambda a, b: jax.lax.conv_general_dilated(
        a, b, (1, 1), [(pad, pad)] * 2, rhs_dilation=(d, d),
        dimension_numbers=("NHWC", "HWIO", "NHWC")))
    if k == 1:
      alt_name, alt = "as a matrix product", jax.jit(lambda a, b: jnp.einsum("bhwc,co->bhwo", a,
                                                                             b[0, 0]))
    elif d > 1:
      alt_name, alt = "by space-to-batch", jax.jit(lambda a, b: space_to_batch_conv(a, b, d))
    else:
      alt_name, alt = None, None

    def run_t():
      with torch.no_grad():
        return torch.nn.functional.conv2d(xt, kt, padding=pad, dilation=d)
    tt = best(run_t)
    tj = best(lambda: lax_conv(xj, kj).block_until_ready())
    tag = f"{h}x{w} grid"
    rows.append((f"{name}: torch conv2d vs lax.conv", tag, f"{tt * 1e3:.0f} ms",
                 f"{tj * 1e3:.0f} ms", f"{tt / tj:.2f}x"))
    key = name.split(":")[0].replace(" ", "_").replace("/", "")
    results[f"conv_{key}_torch_ms"], results[f"conv_{key}_jax_ms"] = tt * 1e3, tj * 1e3
    # Backward (input and kernel gradients), as in a training step.
    xg, kg = xt.clone().requires_grad_(True), kt.clone().requires_grad_(True)
    gt = torch.ones(1, cout, h, w)

    def grad_t():
      y = torch.nn.functional.conv2d(xg, kg, padding=pad, dilation=d)
      return torch.autograd.grad(y, (xg, kg), gt)
    grad_j = jax.jit(lambda a, b: jax.vjp(lax_conv, a, b)[1](jnp.ones((1, h, w, cout))))
    tgt = best(grad_t)
    tgj = best(lambda: jax.block_until_ready(grad_j(xj, kj)))
    rows.append((f"{name}: backward, torch vs lax.conv", tag, f"{tgt * 1e3:.0f} ms",
                 f"{tgj * 1e3:.0f} ms", f"{tgt / tgj:.2f}x"))
    results[f"conv_{key}_grad_torch_ms"], results[f"conv_{key}_grad_jax_ms"] = tgt * 1e3, tgj * 1e3
    if alt is not None:
      err, rel = diff(np.asarray(alt(xj, kj)), np.asarray(lax_conv(xj, kj)))
      ta = best(lambda: alt(xj, kj).block_until_ready())
      rows.append((f"{name}: lax.conv vs {alt_name}", tag, "", f"{ta * 1e3:.0f} ms",
                   f"speed-up {tj / ta:.2f}x (rel diff {rel:.0e})"))
      results[f"conv_{key}_alt_ms"] = ta * 1e3
      if k == 1:
        grad_a = jax.jit(lambda a, b: jax.vjp(alt, a, b)[1](jnp.ones((1, h, w, cout))))
        tga = best(lambda: jax.block_until_ready(grad_a(xj, kj)))
        rows.append((f"{name}: backward, lax.conv vs {alt_name}", tag, "", f"{tga * 1e3:.0f} ms",
                     f"speed-up {tgj / tga:.2f}x"))
        results[f"conv_{key}_alt_grad_ms"] = tga * 1e3
    print(f"  conv {name} done", flush=True)


def run_cam_analysis(args, orig, t_cam, js, results, rows):
  """Per-stage time of the CAM forward (torch vs JAX) and what candidate rewrites buy."""
  import jax
  import jax.numpy as jnp
  from affinity_jax.models import resnet38
  torch, dev, reps = orig.torch, args.device, args.repeats
  h, w = args.analyse_size
  x = normalise(orig, synthetic_image(h, w, args.seed + 7))
  tag = f"{h}x{w}"
  params, stats = js.cam_vars["params"], js.cam_vars["batch_stats"]
  specs = {s.name: s for s in resnet38.BLOCKS}

  def jax_stage(names):
    def run(v, a):
      for name in names:
        if name == "conv1a":
          a = jax.lax.conv_general_dilated(a, v["params"]["conv1a"]["kernel"], (1, 1),
                                           [(1, 1), (1, 1)],
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        elif name == "head":
          bn = v["batch_stats"]["bn7"]
          mult = bn["scale"] * jax.lax.rsqrt(bn["var"] + resnet38.BN_EPS)
          a = jax.nn.relu(a * mult + (bn["bias"] - bn["mean"] * mult))
          a = jax.nn.relu(jnp.einsum("bhwc,cd->bhwd", a, v["params"]["fc8"]["kernel"][0, 0]))
        else:
          block = resnet38._Block(spec=specs[name], width=1.0, dtype=jnp.float32)
          a, _ = block.apply({"params": v["params"][name], "batch_stats": v["batch_stats"][name]},
                             a, False)
      return a
    return jax.jit(run)

  def torch_stage(names):
    def run(a):
      with torch.no_grad():
        for name in names:
          if name == "head":
            a = torch.relu(torch.nn.functional.conv2d(torch.relu(t_cam.bn7(a)), t_cam.fc8.weight))
          else:
            a = getattr(t_cam, name)(a)
        return a
    return run

  parts = set(args.analyse_parts.split(","))
  if "convs" in parts:
    run_conv_analysis(args, orig, results, rows)
  a_t, a_j = to_torch(orig, x, dev), jnp.asarray(x)
  if "total" in parts:
    def run_t():
      with torch.no_grad():
        return t_cam.forward_cam(a_t)
    tt, tj = interleaved_median(run_t, lambda: js.cam(a_j).block_until_ready(), reps)
    rows.append(("CAM forward (models.CAMNet)", tag, f"{tt * 1e3:.0f} ms", f"{tj * 1e3:.0f} ms",
                 f"{tt / tj:.2f}x"))
    results["cam_torch_ms"], results["cam_jax_ms"] = tt * 1e3, tj * 1e3
    print("  total done", flush=True)
  total_t = total_j = 0.0
  for label, names in (STAGES if "stages" in parts else ()):
    ft, fj = torch_stage(names), jax_stage(names)
    tt, tj = interleaved_median(lambda: ft(a_t), lambda: fj(js.cam_vars, a_j).block_until_ready(),
                                reps)
    total_t, total_j = total_t + tt, total_j + tj
    rows.append((f"CAM stage: {label}", tag, f"{tt * 1e3:.0f} ms", f"{tj * 1e3:.0f} ms",
                 f"{tt / tj:.2f}x"))
    results[f"stage_{names[0]}_torch_ms"], results[f"stage_{names[0]}_jax_ms"] = tt * 1e3, tj * 1e3
    a_t, a_j = ft(a_t), fj(js.cam_vars, a_j)
    print(f"  stage {label} done", flush=True)
  if "stages" in parts:
    rows.append(("CAM stages, sum", tag, f"{total_t * 1e3:.0f} ms", f"{total_j * 1e3:.0f} ms",
                 f"{total_t / total_j:.2f}x"))
  if "variants" not in parts:
    return

  variants = {name: jax.jit(lambda v, a, f=fold, m=merge: _lax_cam(v, a, fold_bn=f, merge_1x1=m))
              for name, fold, merge in (("lax", False, False), ("lax + BN folding", True, False),
                                        ("lax + BN folding + merged 1x1", True, True))}
  a_j0 = jnp.asarray(x)
  flax_cam = lambda: js.cam(a_j0).block_until_ready()  # noqa: E731
  reference = np.asarray(js.cam(a_j0))
  for name, fn in variants.items():
    err, rel = diff(np.asarray(fn(js.cam_vars, a_j0)), reference)
    # Minimum: the two run the same work but for the rewrite; load only adds time.
    tf_, tv = interleaved_median(flax_cam, lambda: fn(js.cam_vars, a_j0).block_until_ready(),
                                 reps, reduce=min)
    rows.append((f"CAM forward, {name} vs models.CAMNet", tag, "", f"{tv * 1e3:.0f} ms",
                 f"{tf_ / tv:.3f}x (rel diff {rel:.1e})"))
    results[f"variant_{name.replace(' ', '_').replace('+', 'plus')}_speedup"] = tf_ / tv
    print(f"  variant {name} done", flush=True)
  del params, stats


def main(argv=None) -> dict:
  args = parse_args(argv)
  orig = load_original(args.psa_root, args.device)
  if args.matmul_1x1:
    use_matmul_1x1()
  import jax
  import flax
  torch = orig.torch
  t0 = time.time()
  t_cam, cam_state, cam_source = build_torch_net(orig, "cam", args.weights_cam, args.seed,
                                                  args.device)
  t_aff, aff_state, aff_source = (
      (None, None, "not used") if args.analyse_cam else
      build_torch_net(orig, "affinity", args.weights_aff, args.seed + 1, args.device))
  js = JaxSide(cam_state, aff_state)
  del cam_state, aff_state
  print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}; "
        f"torch {torch.__version__} ({args.device}, {torch.get_num_threads()} threads); "
        f"jax {jax.__version__} ({jax.default_backend()}); flax {flax.__version__}")
  print(f"weights: cam = {cam_source}; affinity = {aff_source}; set up in "
        f"{time.time() - t0:.0f} s", flush=True)

  results: dict = {"device": args.device, "quick": bool(args.quick),
                   "matmul_1x1": bool(args.matmul_1x1)}
  rows: list = []
  if args.analyse_cam:
    results["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    run_cam_analysis(args, orig, t_cam, js, results, rows)
  else:
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
