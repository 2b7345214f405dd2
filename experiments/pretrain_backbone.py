"""Pretrains the synthetic demos' small backbones on a separate synthetic world (issues 16, 21).

ImageNet's part for the synthetic dataset: the original never trains its networks from scratch;
it starts from an ImageNet backbone with frozen BatchNorm statistics. This script makes the same
kind of starting point for `configs/synthetic.py`'s narrow ResNet-38 (width 1/16) and for
`configs/synthetic_irn.py`'s narrow ResNet-50 (`--backbone resnet50`, IRN's strides) from a
world of its own, loadable through `init.backbone`:

* 96x96 images holding 1-3 objects of random hues and 0-2 neutral ones (grey, white or black)
  on a cluttered background, later objects on top. An object is a triangle, star, cross, ring,
  square or diamond, 14-40 px across, filled with its colour as a solid, stripes, dots or a
  checker lightened or darkened. 12 hue classes at (k + 0.5) / 12 of the colour wheel, none
  equal to a hue of the WSSS dataset, with saturation and value spread. Backgrounds: weakly
  coloured gradients, unsaturated noise at random scales or a muted checker. No image of the
  WSSS dataset is used.
* The task: the hue class (or none) of every stride-8 cell, the most common class of its pixels,
  by a 1x1 classifier on the CAM network's conv6 features (ResNet-38) or on the last stage at
  stride 16, its logits resized bilinearly to the stride-8 cells (ResNet-50); softmax cross-entropy with hue cells
  weighted x5. An image-level loss (the CAM network's own, 24 hues multi-label, and 12 hues
  single-label) stayed at chance for 2000 and 1200 steps from scratch (experiments/RESULTS.md);
  the dense one reaches 91% per-hue cell accuracy in 1200 steps.
* BatchNorm statistics are calibrated on the first batch and then frozen, as every stage
  trains here; Adam, learning rate 1e-3 with the poly schedule, batch 32.

The backbone (everything but the cell classifier) is written as a checkpoint folder in the
format `affinity-jax convert mxnet` (ResNet-38) or `convert torchvision` (ResNet-50) writes. The
shipped ones (affinity_jax/pretrained) were made by `pretrained.SYNTHETIC_RESNET38_COMMAND` and
`pretrained.SYNTHETIC_RESNET50_COMMAND` on a 2-core CPU in about 5 minutes each; the run is
deterministic on one machine (each command wrote equal arrays twice).

Usage: python experiments/pretrain_backbone.py --out DIR [--backbone resnet38|resnet50]
           [--steps 1200] [--batch-size 32] [--lr 1e-3] [--seed 0] [--width 0.0625]
It prints the loss every 100 steps, the held-out cell accuracy (512 images of another seed
stream) and a last JSON line with the folder's sha256 (pretrained.folder_digest).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SIZE = 96
CELLS = SIZE // 8
NUM_HUES = 12
SHAPES = ("triangle", "star", "cross", "ring", "square", "diamond")
FILLS = ("solid", "stripes", "dots", "checker")


def hue_colour(k: int, rng: np.random.Generator) -> np.ndarray:
  """RGB 0..255 of hue class k: (k + 0.5) / NUM_HUES of the wheel, with some saturation and value
  spread."""
  h = (k + 0.5) / NUM_HUES
  return 255.0 * np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0)))


def shape_mask(rng: np.random.Generator, kind: str, yy, xx, cy, cx, r) -> np.ndarray:
  theta = rng.uniform(0, 2 * np.pi)
  u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
  v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
  rho, phi = np.hypot(u, v), np.arctan2(v, u)
  if kind == "triangle":
    return rho * np.cos((phi % (2 * np.pi / 3)) - np.pi / 3) <= r / 2
  if kind == "star":
    return rho <= r * (0.55 + 0.45 * np.cos(5 * phi) ** 2)
  if kind == "cross":
    return ((np.abs(u) <= r / 3) & (np.abs(v) <= r)) | ((np.abs(v) <= r / 3) & (np.abs(u) <= r))
  if kind == "ring":
    return (rho <= r) & (rho >= 0.55 * r)
  if kind == "square":
    return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
  return np.abs(u) + np.abs(v) <= r  # diamond


def fill(rng: np.random.Generator, kind: str, colour: np.ndarray, yy, xx) -> np.ndarray:
  """[H, W, 3] of the object's pattern: its colour, lightened or darkened in a pattern."""
  other = np.full(3, 255.0) if rng.random() < 0.5 else np.zeros(3)
  other = 0.4 * other + 0.6 * colour
  if kind == "solid":
    pattern = np.zeros(yy.shape, bool)
  elif kind == "stripes":
    a, period = rng.uniform(0, np.pi), rng.uniform(4, 9)
    pattern = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0.3
  elif kind == "dots":
    period = rng.uniform(5, 9)
    pattern = (np.hypot((yy % period) - period / 2, (xx % period) - period / 2) < period / 4)
  else:
    period = int(rng.integers(3, 7))
    pattern = ((yy // period + xx // period) % 2).astype(bool)
  return np.where(pattern[..., None], other, colour)


def background(rng: np.random.Generator, yy, xx) -> np.ndarray:
  kind = rng.integers(3)
  base = rng.uniform(40, 200) + rng.uniform(-20, 20, 3)
  if kind == 0:  # weakly coloured gradient
    a = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(a) * xx + np.sin(a) * yy) / SIZE
    return base + ramp[..., None] * rng.uniform(-60, 60, 3)
  if kind == 1:  # unsaturated noise at a random scale
    scale = int(rng.integers(2, 12))
    coarse = rng.normal(0, 30, (SIZE // scale + 2, SIZE // scale + 2, 1))
    noise = np.repeat(np.repeat(coarse, scale, 0), scale, 1)[:SIZE, :SIZE]
    return base + noise
  period = int(rng.integers(6, 20))
  check = ((yy // period + xx // period) % 2)[..., None]
  return base + (check - 0.5) * rng.uniform(20, 60)


def make_example(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """One image uint8 [96, 96, 3] and its class per stride-8 cell int32 [12, 12] (0 = no hue,
  k + 1 = hue k, the most common class of the cell's pixels): 1-3 objects of random hues and
  0-2 neutral ones (grey, white or black, patterned), later ones on top."""
  yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
  image = background(rng, yy, xx)
  pixels = np.zeros((SIZE, SIZE), np.int32)
  count, neutral = int(rng.integers(1, 4)), int(rng.integers(0, 3))
  for i in range(count + neutral):
    r = rng.uniform(7, 20)  # about 14-40 px across
    cy, cx = rng.uniform(r * 0.6, SIZE - r * 0.6, 2)
    mask = shape_mask(rng, SHAPES[rng.integers(len(SHAPES))], yy, xx, cy, cx, r)
    k = int(rng.integers(NUM_HUES))
    colour = hue_colour(k, rng) if i < count else np.full(3, rng.uniform(0, 255))
    pattern = fill(rng, FILLS[rng.integers(len(FILLS))], colour, yy, xx)
    image[mask] = pattern[mask]
    pixels[mask] = k + 1 if i < count else 0
  image = image * rng.uniform(0.85, 1.15) + rng.normal(0, rng.uniform(2, 8), image.shape)
  votes = np.eye(NUM_HUES + 1, dtype=np.int32)[pixels].reshape(CELLS, 8, CELLS, 8, -1)
  return (np.clip(np.round(image), 0, 255).astype(np.uint8),
          votes.sum(axis=(1, 3)).argmax(-1).astype(np.int32))


def batches(seed: int, start: int, batch_size: int, normalise):
  """Batch i (i >= start) from its own seed, made in a background thread.

  Closing the generator (or dropping it) stops the thread and waits for it: `normalise` runs JAX,
  and a thread still inside XLA when the interpreter exits aborts the process ("terminate
  called after throwing an instance of ''", seen once in CI).
  """
  out: queue.Queue = queue.Queue(maxsize=4)
  stop = threading.Event()

  def produce():
    i = start
    while not stop.is_set():
      rng = np.random.default_rng([seed, i])
      examples = [make_example(rng) for _ in range(batch_size)]
      batch = {"image": normalise(np.stack([e[0] for e in examples])),
               "cells": np.stack([e[1] for e in examples])}
      while not stop.is_set():
        try:
          out.put(batch, timeout=0.1)
          break
        except queue.Full:
          pass
      i += 1

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      yield out.get()
  finally:
    stop.set()
    thread.join()


def _cell_classifier(backbone: str):
  import flax.linen as nn
  import jax
  from affinity_jax.models import resnet38, resnet50

  class CellClassifier(nn.Module):
    """The backbone with a 1x1 classifier of every stride-8 cell (dense labels teach the
    from-scratch backbone in a few hundred steps; an image-level loss did not move in 2000).
    ResNet-38 classifies its conv6 features (stride 8); ResNet-50 its last stage at IRN's
    strides (stride 16), the logits resized bilinearly to the stride-8 cells."""
    num_classes: int
    width: float

    @nn.compact
    def __call__(self, images, train: bool = False):
      if backbone == "resnet38":
        features = resnet38.resnet38_taps(images, self.width, "float32", train, None)["conv6"]
      else:
        features = resnet50.resnet50_taps(images, self.width, "float32")["stage4"]
      logits = resnet38.conv(self.num_classes, 1, name="cell_classifier",
                             dtype="float32")(features)
      if logits.shape[1] != CELLS:
        logits = jax.image.resize(logits, (logits.shape[0], CELLS, CELLS, logits.shape[-1]),
                                  "bilinear")
      return logits

  return CellClassifier


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="checkpoint folder to write (replaced)")
  parser.add_argument("--steps", type=int, default=1200)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--width", type=float, default=0.0625)
  parser.add_argument("--backbone", choices=("resnet38", "resnet50"), default="resnet38",
                      help="resnet38: the PSA demo's (configs/synthetic.py); resnet50: the IRN "
                           "demo's (configs/synthetic_irn.py), IRN's strides")
  args = parser.parse_args(argv)
  if os.path.exists(args.out) and not (
      os.path.isdir(args.out) and (not os.listdir(args.out) or set(os.listdir(args.out)) == {
          "metadata.json", "variables"})):
    parser.error(f"--out {args.out!r} exists and is not a checkpoint folder this script wrote; "
                 "give a new or empty folder")

  import jax
  import optax
  from affinity_jax import checkpoint, models, pretrained, train
  CellClassifier = _cell_classifier(args.backbone)

  def cell_loss(logits, batch):
    # Hue cells are ~7% of all: weighted x5 so that "no hue everywhere" is not a resting place.
    weight = 1.0 + 4.0 * (batch["cells"] > 0)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype("float32"),
                                                           batch["cells"])
    return (loss * weight).sum() / weight.sum(), {}

  def normalise(images):
    return np.asarray(models.normalize_images(images, "imagenet"))

  model = CellClassifier(num_classes=NUM_HUES + 1, width=args.width)
  variables = models.init_variables(model, jax.random.key(args.seed), (1, SIZE, SIZE, 3))
  stream = batches(args.seed, 0, args.batch_size, normalise)
  first = next(stream)
  stream.close()
  variables = models.calibrate_batch_norm(
      model, {"params": variables["params"], "batch_stats": variables["batch_stats"]},
      first["image"])
  labels = models.param_labels(variables["params"])
  # Everything is new here: the stem trains too, and at one learning rate.
  labels = jax.tree.map(lambda l: "pretrained_weight" if l == "frozen" else l, labels)
  optim = train.OptimConfig(lr=args.lr, total_steps=args.steps, weight_decay=0.0,
                            optimizer="adam")
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    trained = train.train(
        name="pretrain", model=model, variables=jax.device_get(variables), labels=labels,
        loss_fn=cell_loss,
        batches=lambda start: batches(args.seed, start, args.batch_size, normalise),
        optim=optim, workdir=tmp, batch_size=args.batch_size, seed=args.seed,
        checkpoint_every=10 ** 9, log_every=100)
  seconds = time.time() - t0

  # Held-out images (another seed stream): accuracy, and per hue.
  stream = batches(args.seed + 1_000_003, 0, 512, normalise)
  held = next(stream)
  stream.close()
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(trained, held["image"]))
  truth = held["cells"]
  right = logits.argmax(-1) == truth
  per_hue = np.array([right[truth == k + 1].mean() for k in range(NUM_HUES)])
  print(f"held-out cell accuracy {right.mean():.3f} (no hue {right[truth == 0].mean():.3f}); "
        f"per hue mean {per_hue.mean():.3f}, min {per_hue.min():.3f} (hue {int(per_hue.argmin())})")

  backbone = {c: {m: t for m, t in tree.items() if m != "cell_classifier"}
              for c, tree in trained.items()}
  if os.path.exists(args.out):
    shutil.rmtree(args.out)
  checkpoint.save_variables(args.out, jax.device_get(backbone), metadata=dict(
      arch="backbone", backbone=args.backbone, width=args.width, num_classes=None,
      source="experiments/pretrain_backbone.py " + " ".join(sys.argv[1:] if argv is None
                                                            else argv),
      pretrain={"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                "seed": args.seed, "hues": NUM_HUES, "seconds": round(seconds, 1),
                "held_out_accuracy": round(float(right.mean()), 4)}))
  print(json.dumps({"out": args.out, "seconds": round(seconds, 1),
                    "accuracy": float(right.mean()), "per_hue_min": float(per_hue.min()),
                    "sha256": pretrained.folder_digest(args.out)}))


if __name__ == "__main__":
  main()
