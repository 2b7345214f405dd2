"""The PyTorch original (github jiwoon-ahn/psa) as the experiments run it, beside affinity_jax.

Shared by compare_pytorch.py (parity) and benchmark_models.py (speed), which import it as a
sibling module (`python experiments/x.py` puts experiments/ first on sys.path):
- the checkout: `check_psa_root` (REQUIRED_FILES, plus VGG16_FILES for `backbone="vgg16"`),
  `load_original` (imports its modules from the checkout, files not edited; on the CPU
  `torch.Tensor.cuda` becomes the identity in this process only, because AffinityNet.forward
  moves its pair indices with `.cuda()`);
- its networks, ResNet-38 (network/resnet38_*.py) or VGG-16 (network/vgg16_*.py):
  `build_torch_net` with the released weights or `random_state_dict` (seeded, with non-trivial
  BatchNorm statistics and GroupNorm scales and shifts), `to_torch`, and one step of its
  train_aff.py (`torch_train_step_fn`);
- inputs and measures: `parse_size`, `synthetic_image`, `normalise`, `diff`,
  `interleaved_median`;
- its inference scripts as they are (infer_cls.py, infer_aff.py): `run_script`, also the entry
  point of this file, `python experiments/psa_original.py PSA_ROOT SCRIPT.py [ARGS...]`, which
  runs SCRIPT.py of the checkout as `__main__` with ARGS after `patch_for_scripts` has made, in
  its own process only, what this machine lacks behave as the script expects (no CUDA, a newer
  numpy, scipy and torch; see there). The script reads `voc12/cls_labels.npy` relative to the
  current folder, so run it from a folder of your own holding that file.
Nothing here imports torch or JAX at module level, so argument checks run without them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import runpy
import statistics
import sys
import time
import types
import warnings

import numpy as np

from affinity_jax.constants import PSA_BACKBONES  # no JAX: checks stay fast

REQUIRED_FILES = ("network/resnet38d.py", "network/resnet38_cls.py", "network/resnet38_aff.py",
                  "tool/pyutils.py", "tool/torchutils.py", "voc12/data.py")
VGG16_FILES = ("network/vgg16d.py", "network/vgg16_cls.py", "network/vgg16_aff.py")
BACKBONES = PSA_BACKBONES
# The original's infer_aff.py / train_aff.py settings.
RADIUS, BETA, LOGT, RW_ALPHA = 5, 8, 8, 16
NUM_CLASSES = 20
TRAIN_LR, WEIGHT_DECAY = 0.01, 5e-4


def check_psa_root(path: str, backbone: str = "resnet38") -> str:
  """The checkout of the original, or ValueError naming the folder and what is missing."""
  if not os.path.isdir(path):
    raise ValueError(f"--psa-root {path!r}: no such folder (expected a checkout of "
                     "github.com/jiwoon-ahn/psa)")
  wanted = REQUIRED_FILES + (VGG16_FILES if backbone == "vgg16" else ())
  missing = [f for f in wanted if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise ValueError(f"--psa-root {path!r} is not a checkout of jiwoon-ahn/psa: missing "
                     f"{', '.join(missing)}")
  return os.path.abspath(path)


def parse_size(text: str) -> tuple[int, int]:
  """"HxW" -> (H, W); an argparse type."""
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW, e.g. 375x500") from None
  # The original's psa pair set needs a grid of at least 5 x 9 (radius 5).
  if h < 33 or w < 65:
    raise argparse.ArgumentTypeError(f"size {text!r}: the psa pair set needs H >= 33, W >= 65")
  return h, w


def load_original(psa_root: str, device: str = "cpu", threads: int | None = None,
                  backbone: str = "resnet38") -> types.SimpleNamespace:
  """Imports the original's modules from its checkout; returns them with torch.

  threads: torch's intra-op threads; default os.cpu_count(), the size of XLA:CPU's pool.
  backbone: "resnet38" or "vgg16": whose networks `cls`, `aff` and `backbone` are (the
  latter's `Normalize` is the input convention `normalise` applies).
  """
  import torch
  if device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("--device cuda: torch sees no CUDA device")
  if device == "cpu":
    # AffinityNet.forward calls .cuda() on its index tensors; make that a no-op in this process
    # so that the original runs unmodified on the CPU.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.set_num_threads(threads or os.cpu_count() or 1)
  # The original builds its dense matrix with the legacy sparse.FloatTensor constructor.
  warnings.filterwarnings("ignore", message=r"torch\.sparse\.SparseTensor")
  warnings.filterwarnings("ignore", message=r"Sparse invariant checks")
  sys.path.insert(0, psa_root)
  import tool.pyutils
  import tool.torchutils
  import voc12.data
  prefix = "network.resnet38" if backbone == "resnet38" else "network.vgg16"
  cls, aff, trunk = (importlib.import_module(prefix + suffix) for suffix in ("_cls", "_aff", "d"))
  return types.SimpleNamespace(torch=torch, cls=cls, aff=aff, backbone=trunk,
                               backbone_name=backbone, pyutils=tool.pyutils,
                               torchutils=tool.torchutils, data=voc12.data)


def random_state_dict(net, seed: int) -> dict:
  """A seeded state dict for `net` with non-trivial BatchNorm statistics.

  Convolutions: normal with std sqrt(1 / fan_in) (activations stay O(1) through the 17 residual
  blocks); BN: weight U(0.5, 1.5), bias N(0, 0.1), running_mean N(0, 0.1), running_var U(0.5, 2);
  VGG-16's GroupNorm likewise weight U(0.5, 1.5), bias N(0, 0.1), and its convolution biases
  N(0, 0.1).
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
    else:  # BN and GN bias, BN running_mean, convolution bias
      value = 0.1 * torch.randn(shape, generator=gen)
    out[name] = value.to(ref.dtype)
  return out


def build_torch_net(orig, kind: str, weights: str | None, seed: int, device: str = "cpu"):
  """The original's Net ("cam" or "affinity"), weights loaded strictly, in eval mode.

  Returns (net, its state dict as numpy arrays, a description of the weights' source).
  """
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


def to_torch(orig, images_nhwc: np.ndarray, device: str = "cpu"):
  """[B, H, W, 3] numpy -> [B, 3, H, W] torch tensor on `device`."""
  return orig.torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(device)


def _poly_optimizer(orig, net):
  """The original's PolyOptimizer over `net`'s four learning-rate groups, as train_cls.py and
  train_aff.py build it (lr 0.01, weight decay 5e-4 on weights)."""
  groups = net.get_parameter_groups()
  return orig.torchutils.PolyOptimizer([
      {"params": groups[0], "lr": TRAIN_LR, "weight_decay": WEIGHT_DECAY},
      {"params": groups[1], "lr": 2 * TRAIN_LR, "weight_decay": 0},
      {"params": groups[2], "lr": 10 * TRAIN_LR, "weight_decay": WEIGHT_DECAY},
      {"params": groups[3], "lr": 20 * TRAIN_LR, "weight_decay": 0},
  ], lr=TRAIN_LR, weight_decay=WEIGHT_DECAY, max_step=1000)


def torch_train_step_fn(orig, aff_net, images: np.ndarray, label_grids: np.ndarray,
                        device: str = "cpu"):
  """One step of the original's train_aff.py on a fixed batch: forward, its loss, backward, its
  PolyOptimizer with the four learning-rate groups.

  images: [B, S, S, 3] normalised float32; label_grids: [B, g, g] affinity labels at stride 8
  (0 background, classes, 255 unconfident). Puts `aff_net` in its train() mode (BN stays frozen,
  conv1a / b2* get no gradients). Returns step() -> loss (float).
  """
  torch = orig.torch
  aff_net.train()
  optimizer = _poly_optimizer(orig, aff_net)
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
    return loss.item()  # .item() waits for the step, also on a GPU.
  return step


def torch_cam_train_step_fn(orig, cls_net, images: np.ndarray, labels: np.ndarray,
                            device: str = "cpu"):
  """One step of the original's train_cls.py on a fixed batch: forward, multilabel soft margin
  loss, backward, its PolyOptimizer with the four learning-rate groups.

  images: [B, S, S, 3] normalised float32; labels: [B, 20] multi-hot. Puts `cls_net` in its
  train() mode (BN frozen, the stem without gradients). Returns step() -> loss (float).
  """
  torch = orig.torch
  cls_net.train()
  optimizer = _poly_optimizer(orig, cls_net)
  x = to_torch(orig, images, device)
  y = torch.from_numpy(np.asarray(labels, np.float32)).to(device)

  def step():
    loss = torch.nn.functional.multilabel_soft_margin_loss(cls_net(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()  # as train_cls.py's loss meter: waits for the step.
  return step


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


def diff(ours, reference) -> tuple[float, float]:
  """(max |ours - reference|, that / max |reference|)."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  if ours.shape != reference.shape:
    raise ValueError(f"shape mismatch: {ours.shape} vs {reference.shape}")
  err = float(np.max(np.abs(ours - reference)))
  return err, err / max(float(np.max(np.abs(reference))), 1e-30)


def interleaved_median(fn_torch, fn_jax, repeats: int, warmup: int = 1,
                       reduce=statistics.median) -> tuple[float, float]:
  """Median (or `reduce`) seconds per call of each, after `warmup` untimed calls of each; runs
  alternated so that load changes on a shared machine hit both alike. Each fn must return only
  once its work is done (block_until_ready, .item(), a CUDA synchronize)."""
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


# ---------------------------------------------------------------------------------------------
# The original's inference scripts, run unmodified.


def patch_for_scripts() -> None:
  """What infer_cls.py and infer_aff.py need on a CPU-only machine with current libraries, in
  this process only; the computation is untouched:
  - no CUDA: `Tensor.cuda` and `Module.cuda` return their object, `torch.cuda.device_count()` is
    1, `torch.cuda.device(i)` is an empty context, `torch.nn.parallel.replicate(model, devices)`
    returns the model itself for each device (the CPU has one copy to run);
  - DataLoader loads in the calling process (num_workers 0, no pinned memory): its order and
    batches are the same;
  - `scipy.misc.imsave` (removed from scipy) writes the array with PIL as it is: the scripts
    give it uint8 label maps, which scipy's version (bytescale, then PIL) left unscaled;
  - `np.load` allows pickles (the scripts save dicts with np.save and read them with .item());
  - `PIL.Image.CUBIC` (removed in Pillow 10) is its other name, `PIL.Image.BICUBIC`;
  - torchvision, if absent, is a stand-in module whose `transforms.Compose` applies the given
    functions in order (the only part the scripts use).
  """
  import contextlib

  import numpy
  import scipy.misc
  import torch
  import torch.utils.data
  from PIL import Image

  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.nn.Module.cuda = lambda self, *args, **kwargs: self
  torch.cuda.device_count = lambda: 1
  torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()
  torch.nn.parallel.replicate = lambda network, devices, *args, **kwargs: [network] * len(devices)

  class InProcessLoader(torch.utils.data.DataLoader):
    def __init__(self, *args, **kwargs):
      kwargs.update(num_workers=0, pin_memory=False)
      super().__init__(*args, **kwargs)
  torch.utils.data.DataLoader = InProcessLoader

  def imsave(path, array):
    Image.fromarray(numpy.asarray(array)).save(path)
  scipy.misc.imsave = imsave

  load = numpy.load

  def load_with_pickles(*args, **kwargs):
    kwargs.setdefault("allow_pickle", True)
    return load(*args, **kwargs)
  numpy.load = load_with_pickles
  if not hasattr(Image, "CUBIC"):
    Image.CUBIC = Image.BICUBIC

  if importlib.util.find_spec("torchvision") is None:
    class Compose:
      def __init__(self, transforms):
        self.transforms = transforms

      def __call__(self, x):
        for t in self.transforms:
          x = t(x)
        return x
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = Compose
    stand_in = types.ModuleType("torchvision")
    stand_in.transforms = transforms
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = stand_in, transforms
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  warnings.filterwarnings("ignore", category=UserWarning)


def run_script(psa_root: str, script: str, argv: list[str]) -> None:
  """Runs the checkout's `script` (e.g. "infer_cls.py") as `__main__` with arguments `argv`,
  after `patch_for_scripts`; its modules (network/, tool/, voc12/) come from the checkout."""
  psa_root = check_psa_root(psa_root)
  path = os.path.join(psa_root, script)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such script in the checkout")
  patch_for_scripts()
  sys.path.insert(0, psa_root)
  sys.argv = [path, *argv]
  runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":
  if len(sys.argv) < 3:
    raise SystemExit("usage: python experiments/psa_original.py PSA_ROOT SCRIPT.py [ARGS...]")
  run_script(sys.argv[1], sys.argv[2], sys.argv[3:])
