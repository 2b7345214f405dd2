"""Speed of affinity_jax against the PyTorch original, side by side on CPU.

Measures, in one process and on the same weights and inputs (`--parts`, default all three), on
the ResNet-38 networks or, with `--backbone vgg16`, the VGG-16 ones (network/vgg16_cls.py,
vgg16_aff.py against VGG16CAMNet, VGG16AffinityNet; inputs normalised by vgg16d.py's Normalize):
- cam: CAM inference, batch 1, at each of `--cam-sizes` (default 448x448 and 320x320), width
  1.0: the jitted `model.apply(v, x, sizes, method="cam")` (with the image's size, as the
  pipeline's multi-scale CAM sum affinity_jax.cam.multiscale_flip_sum calls it), vs the original's resnet38_cls.Net.forward_cam
  under torch.no_grad. The CAMs of the two sides are compared as a sanity check.
- train: one AffinityNet training step, forward + the affinity loss + backward + SGD update.
  PyTorch: the original's resnet38_aff.Net in its train() mode (BN frozen, conv1a / b2* without
  gradients), the loss of its train_aff.py and its PolyOptimizer (psa_original.py). JAX: the
  trainer's own step, `train.make_train_step` on `train.init_state` (frozen set split off, the
  original's learning-rate groups, state donated) with `stages.train_aff.make_loss(5, "psa")`,
  fed a global batch as the trainer feeds it. The original trains at batch 8, crop 448;
  `--train-batch` / `--train-crop` shrink both sides alike.
- rw: the random walk of one 56x56 grid (a 448x448 image) from its affinities: the original's
  dense procedure in torch (the HW x HW matrix as AffinityNet.forward(to_dense=True) builds it,
  then power beta, column normalisation, 8 squarings, product with the 21-channel CAM) vs
  `affinity_jax.random_walk.propagate` (256 stencil steps, jitted). The walked scores of the two
  sides are compared.

The original's code is imported from its checkout (`--psa-root`, files not edited) by
psa_original.py. Weights are seeded random state dicts with non-trivial BatchNorm statistics,
converted for JAX by affinity_jax.convert; images are synthetic (psa_original.synthetic_image).

Timing: after `--warmup` untimed calls per side, the two sides run interleaved (torch, JAX,
torch, JAX, ...) `--repeats` times and the medians are reported, because the machine may be
shared. torch runs with torch.set_num_threads(--threads), default os.cpu_count(), which is the
size of XLA:CPU's intra-op thread pool. XLA_FLAGS from the environment apply to the JAX side and
are printed. Ratios are PyTorch time / JAX time (> 1: JAX faster). The last line is JSON.

Usage:
  python experiments/benchmark_models.py --psa-root /tmp/psa [--backbone resnet38|vgg16]
      [--parts cam,train,rw]
      [--cam-sizes 448x448,320x320] [--train-batch 8 --train-crop 448] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import psa_original as po  # noqa: E402

PARTS = ("cam", "train", "rw")
RW_GRID = (56, 56)  # the stride-8 grid of a 448x448 image


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--psa-root", required=True, help="checkout of github.com/jiwoon-ahn/psa")
  p.add_argument("--backbone", choices=po.BACKBONES, default="resnet38",
                 help="the networks of cam and train: resnet38 (default) or vgg16")
  p.add_argument("--parts", default=",".join(PARTS),
                 help="what to time, comma separated: cam (CAM inference), train (AffinityNet "
                      "training step), rw (random walk of one grid); default all")
  p.add_argument("--cam-sizes", default="448x448,320x320",
                 type=lambda s: tuple(po.parse_size(v) for v in s.split(",")),
                 help="CAM inference image sizes, comma separated (default 448x448,320x320)")
  p.add_argument("--train-batch", type=int, default=8, help="AffinityNet step batch (8)")
  p.add_argument("--train-crop", type=int, default=448, help="AffinityNet step crop (448)")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per side and measurement")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls per side before timing")
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                 help="torch intra-op threads (default: all cores, as XLA:CPU)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    args.psa_root = po.check_psa_root(args.psa_root, args.backbone)
  except ValueError as e:
    p.error(str(e))
  if not set(args.parts.split(",")) <= set(PARTS):
    p.error(f"--parts {args.parts!r}: expected a comma-separated subset of {', '.join(PARTS)}")
  args.parts = tuple(name for name in PARTS if name in args.parts.split(","))
  if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
    p.error("--repeats and --threads must be >= 1, --warmup >= 0")
  # The psa pair set needs a feature grid of at least 5 x 9 (radius 5, stride 8).
  if args.train_batch < 1 or args.train_crop < 72:
    p.error("--train-batch must be >= 1 and --train-crop >= 72")
  return args


# ---------------------------------------------------------------------------------------------
# The three measurements. Each adds its figures to `results` and returns its table rows.


def report(name: str, tt: float, tj: float, err: float | None) -> tuple:
  """A table row (name, PyTorch s, JAX s, sanity difference or None), printed as it comes."""
  print(f"  {name}: torch {tt:.3f} s, JAX {tj:.3f} s", flush=True)
  return name, tt, tj, err


def time_cam(args, orig, results: dict) -> list:
  """CAM inference, batch 1, at each of --cam-sizes."""
  import jax
  from affinity_jax import models
  from affinity_jax.convert import psa_state_dict_to_variables
  torch = orig.torch
  t_net, state, _ = po.build_torch_net(orig, "cam", None, args.seed)
  model = models.build("cam", backbone=args.backbone)
  variables = jax.device_put(psa_state_dict_to_variables(state, "cam", backbone=args.backbone))
  cam_fn = jax.jit(lambda v, x: model.apply(v, x, np.array([x.shape[1:3]], np.int32),
                                            method="cam"))
  rows = []
  for h, w in args.cam_sizes:
    x = po.normalise(orig, po.synthetic_image(h, w, args.seed + 7))
    x_t, x_j = po.to_torch(orig, x), jax.device_put(x)

    def run_torch():
      with torch.no_grad():
        return t_net.forward_cam(x_t)

    def run_jax():
      return jax.block_until_ready(cam_fn(variables, x_j))

    _, rel = po.diff(np.asarray(run_jax()), run_torch().numpy().transpose(0, 2, 3, 1))
    tt, tj = po.interleaved_median(run_torch, run_jax, args.repeats, args.warmup)
    key = f"cam_{h}x{w}"
    results.update({f"{key}_torch_s": tt, f"{key}_jax_s": tj, f"{key}_ratio": tt / tj,
                    f"{key}_max_rel_diff": rel})
    rows.append(report(f"{args.backbone} CAM inference, batch 1, {h}x{w}", tt, tj, rel))
  return rows


def affinity_label_grids(batch: int, h: int, w: int, seed: int) -> np.ndarray:
  """[B, h, w] uint8 affinity labels: background, two classes and unconfident (255) blocks."""
  rng = np.random.default_rng(seed)
  grids = np.zeros((batch, h, w), np.uint8)
  for g in grids:
    for value in (3, 12, 255):
      y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
      g[y:y + rng.integers(2, h // 2 + 2), x:x + rng.integers(2, w // 2 + 2)] = value
  return grids


def time_train_step(args, orig, results: dict) -> list:
  """One AffinityNet training step at --train-batch x --train-crop."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from affinity_jax import models, train
  from affinity_jax.convert import psa_state_dict_to_variables
  from affinity_jax.stages import train_aff
  b, crop = args.train_batch, args.train_crop
  images = np.concatenate([po.normalise(orig, po.synthetic_image(crop, crop, args.seed + 20 + i))
                           for i in range(b)])
  grid = -(-crop // 8)  # the network's stride-8 output
  labels = affinity_label_grids(b, grid, grid, args.seed)
  t_net, state, _ = po.build_torch_net(orig, "affinity", None, args.seed + 1)
  losses = {"torch": [], "jax": []}
  step_t = po.torch_train_step_fn(orig, t_net, images, labels)

  def run_torch():
    losses["torch"].append(step_t())

  model = models.build("affinity", backbone=args.backbone)
  variables = psa_state_dict_to_variables(state, "affinity", backbone=args.backbone)
  optim = train.OptimConfig(lr=po.TRAIN_LR, total_steps=1000)
  train_state, constants, tx = train.init_state(
      variables, models.param_labels(variables["params"]), optim)
  step_j = train.make_train_step(model, train_aff.make_loss(radius=po.RADIUS, scheme="psa"), tx,
                                 optim, seed=args.seed)
  # The batch as the trainer gets it: global arrays split over the data mesh, labels uint8 as
  # the input pipeline makes them.
  batch = train.global_batch({"image": images, "aff_label": labels},
                             NamedSharding(train.data_mesh(), P("data")))
  holder = {"state": train_state}

  def run_jax():
    holder["state"], metrics = step_j(holder["state"], constants, batch)  # state donated
    losses["jax"].append(float(metrics["loss"]))

  tt, tj = po.interleaved_median(run_torch, run_jax, args.repeats, args.warmup)
  key = "aff_train_step"
  # First losses: equal up to the two sides' different dropout masks.
  results.update({f"{key}_torch_s": tt, f"{key}_jax_s": tj, f"{key}_ratio": tt / tj,
                  f"{key}_batch": b, f"{key}_crop": crop,
                  f"{key}_first_loss_torch": losses["torch"][0],
                  f"{key}_first_loss_jax": losses["jax"][0]})
  return [report(f"{args.backbone} AffinityNet train step, batch {b}, crop {crop}", tt, tj,
                 None)]


def torch_dense_walk_fn(orig, feats_chw: np.ndarray, cam_vec: np.ndarray):
  """The walk of infer_aff on a dense affinity matrix built as AffinityNet.forward(to_dense)
  builds it (pairs, identity, transposed pairs), from features [Cf, h, w] and scores [C, hw].

  Returns walk() -> walked scores [C, hw]: power, column normalisation, squarings, product (the
  part that is timed; the matrix is built once here).
  """
  torch = orig.torch
  c, h, w = feats_chw.shape
  ind_from, ind_to = orig.pyutils.get_indices_of_pairs(po.RADIUS, (h, w))
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
  matrix = torch.sparse_coo_tensor(idx, val, (n, n)).to_dense()
  vec = torch.from_numpy(cam_vec)

  def walk():
    with torch.no_grad():
      a = torch.pow(matrix, po.BETA)
      trans = a / torch.sum(a, dim=0, keepdim=True)
      for _ in range(po.LOGT):
        trans = torch.matmul(trans, trans)
      return torch.matmul(vec, trans)
  return walk


def time_random_walk(args, orig, results: dict) -> list:
  """The random walk of one RW_GRID grid from its affinity features."""
  import jax.numpy as jnp
  from affinity_jax import geometry, random_walk as rw
  gh, gw = RW_GRID
  rng = np.random.default_rng(args.seed)
  # The walk's cost does not depend on the values; piecewise-constant regions plus noise, 448
  # channels as AffinityNet's, give it a non-trivial graph.
  region = (np.arange(gh)[:, None] // 14) * 4 + np.arange(gw)[None, :] // 14
  feats = (rng.normal(size=(16, 448)) * 0.3)[region] + rng.normal(size=(gh, gw, 448)) * 0.02
  feats = feats.astype(np.float32)
  cam = rng.random((gh, gw, po.NUM_CLASSES + 1)).astype(np.float32)
  walk_t = torch_dense_walk_fn(orig, np.ascontiguousarray(feats.transpose(2, 0, 1)),
                               np.ascontiguousarray(cam.reshape(-1, cam.shape[-1]).T))
  aff_sym = geometry.neighbourhood_affinities(jnp.asarray(feats[None]), radius=po.RADIUS,
                                              scheme="psa")
  cam_j = jnp.asarray(cam[None])

  def walk_j():
    return rw.propagate(aff_sym, cam_j, radius=po.RADIUS, beta=po.BETA,
                        t=2 ** po.LOGT).block_until_ready()

  _, rel = po.diff(np.asarray(walk_j())[0].reshape(-1, cam.shape[-1]).T, walk_t().numpy())
  tt, tj = po.interleaved_median(walk_t, walk_j, args.repeats, args.warmup)
  key = f"rw_{gh}x{gw}"
  results.update({f"{key}_torch_s": tt, f"{key}_jax_s": tj, f"{key}_ratio": tt / tj,
                  f"{key}_max_rel_diff": rel})
  return [report(f"random walk of one {gh}x{gw} grid (dense torch, sparse JAX)", tt, tj, rel)]


def main(argv=None) -> dict:
  args = parse_args(argv)
  orig = po.load_original(args.psa_root, "cpu", args.threads, args.backbone)
  import jax
  torch = orig.torch
  load = os.getloadavg()
  results = {"backbone": args.backbone, "torch_threads": args.threads,
             "cpu_count": os.cpu_count(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
             "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
             "repeats": args.repeats, "parts": list(args.parts),
             "loadavg_start": [round(v, 2) for v in load]}
  print(f"torch {torch.__version__} ({args.threads} threads), jax {jax.__version__} "
        f"({jax.default_backend()}), XLA_FLAGS={results['xla_flags']!r}, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)

  measures = {"cam": time_cam, "train": time_train_step, "rw": time_random_walk}
  rows = [row for part in args.parts for row in measures[part](args, orig, results)]

  load = os.getloadavg()
  results["loadavg_end"] = [round(v, 2) for v in load]
  print()
  print("| measurement | PyTorch (s) | JAX (s) | ratio torch/JAX | max rel diff |")
  print("|---|---|---|---|---|")
  for name, tt, tj, err in rows:
    print(f"| {name} | {tt:.3f} | {tj:.3f} | {tt / tj:.2f} | "
          f"{'-' if err is None else f'{err:.1e}'} |")
  print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  print(json.dumps(results))
  return results


if __name__ == "__main__":
  main()
