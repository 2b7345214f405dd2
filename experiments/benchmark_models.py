"""Speed of affinity_jax's ResNet-38 networks against the PyTorch original, side by side on CPU.

Measures, in one process and on the same weights and inputs:
- CAM inference: CAMNet.cam (jitted) vs the original's resnet38_cls.Net.forward_cam under
  torch.no_grad, batch 1, at each of `--cam-sizes` (default 448x448 and 320x320), width 1.0;
- one AffinityNet training step: forward + the affinity loss + backward + SGD update.
  PyTorch: the original's resnet38_aff.Net in its train() mode (BN frozen, conv1a / b2* without
  gradients), the loss of its train_aff.py written out here and its PolyOptimizer. JAX: a jitted,
  state-donating step built from affinity_jax.train (frozen set split off, the original's
  learning-rate groups) and stages.training.make_aff_loss(5, "psa"). The original trains at
  batch 8, crop 448; `--train-batch` / `--train-crop` shrink both sides alike.

The original's code is imported from its checkout (`--psa-root`, put on sys.path, files not
edited). Weights are a seeded random state dict with non-trivial BatchNorm statistics, converted
for JAX by affinity_jax.convert; the CAMs of both sides are compared as a sanity check.

Timing: after `--warmup` untimed calls per side, the two sides run interleaved (torch, JAX,
torch, JAX, ...) `--repeats` times and the medians are reported, because the machine may be
shared. torch runs with torch.set_num_threads(--threads), default os.cpu_count(), which is the
size of XLA:CPU's intra-op thread pool. XLA_FLAGS from the environment apply to the JAX side and
are printed. Ratios are PyTorch time / JAX time (> 1: JAX faster). The last line is JSON.

Usage:
  python experiments/benchmark_models.py --psa-root /tmp/psa [--cam-sizes 448x448,320x320]
      [--train-batch 8 --train-crop 448] [--repeats 5] [--skip-cam] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

# Shared with the parity/speed comparison beside this file: the checkout check, the seeded
# state dict of the original's nets and the interleaved timer.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_pytorch as cp  # noqa: E402

RADIUS = 5
TRAIN_LR = 0.01
WEIGHT_DECAY = 5e-4


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--psa-root", required=True, help="checkout of github.com/jiwoon-ahn/psa")
  p.add_argument("--cam-sizes", default="448x448,320x320",
                 type=lambda s: tuple(cp.parse_size(v) for v in s.split(",")),
                 help="CAM inference image sizes, comma separated (default 448x448,320x320)")
  p.add_argument("--train-batch", type=int, default=8, help="AffinityNet step batch (8)")
  p.add_argument("--train-crop", type=int, default=448, help="AffinityNet step crop (448)")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per side and measurement")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls per side before timing")
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                 help="torch intra-op threads (default: all cores, as XLA:CPU)")
  p.add_argument("--skip-cam", action="store_true", help="no CAM inference measurement")
  p.add_argument("--skip-train", action="store_true", help="no training-step measurement")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    cp.check_psa_root(args.psa_root)
  except ValueError as e:
    p.error(str(e))
  if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
    p.error("--repeats and --threads must be >= 1, --warmup >= 0")
  # The psa pair set needs a feature grid of at least 5 x 9 (radius 5, stride 8).
  if args.train_batch < 1 or args.train_crop < 72:
    p.error("--train-batch must be >= 1 and --train-crop >= 72")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  import torch
  torch.set_num_threads(args.threads)
  # resnet38_aff.Net.forward moves its pair indices with .cuda(): the identity on this CPU run.
  torch.Tensor.cuda = lambda self, *a, **k: self
  sys.path.insert(0, os.path.abspath(args.psa_root))
  import network.resnet38_aff
  import network.resnet38_cls
  import tool.torchutils
  import voc12.data

  import jax
  import jax.numpy as jnp
  import optax
  from affinity_jax import models, train
  from affinity_jax.convert import psa_state_dict_to_variables
  from affinity_jax.stages.training import make_aff_loss

  rng = np.random.default_rng(args.seed)
  load = os.getloadavg()
  results = {"torch_threads": args.threads, "cpu_count": os.cpu_count(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
             "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
             "repeats": args.repeats, "loadavg_start": [round(v, 2) for v in load]}
  rows = []
  print(f"torch {torch.__version__} ({args.threads} threads), jax {jax.__version__} "
        f"({jax.default_backend()}), XLA_FLAGS={results['xla_flags']!r}, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)

  if not args.skip_cam:
    t_net = network.resnet38_cls.Net()
    state = cp.random_state_dict(t_net, args.seed)
    t_net.load_state_dict(state)
    t_net.eval()
    j_net = models.build("cam")
    j_vars = jax.device_put(psa_state_dict_to_variables(
        {k: v.numpy() for k, v in state.items()}, "cam"))
    cam_fn = jax.jit(lambda v, x: j_net.apply(v, x, method=j_net.cam))
    for h, w in args.cam_sizes:
      x = rng.standard_normal((1, h, w, 3), dtype=np.float32)
      x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
      x_j = jax.device_put(x)

      def run_torch():
        with torch.no_grad():
          return t_net.forward_cam(x_t)

      def run_jax():
        return jax.block_until_ready(cam_fn(j_vars, x_j))

      ref = run_torch().numpy().transpose(0, 2, 3, 1)
      err = float(np.max(np.abs(np.asarray(run_jax()) - ref)) / max(np.max(np.abs(ref)), 1e-12))
      tt, tj = cp.interleaved_median(run_torch, run_jax, args.repeats, args.warmup)
      key = f"cam_{h}x{w}"
      results.update({f"{key}_torch_s": tt, f"{key}_jax_s": tj, f"{key}_ratio": tt / tj,
                      f"{key}_max_rel_diff": err})
      rows.append((f"CAM inference, batch 1, {h}x{w}", tt, tj, err))
      print(f"  {rows[-1][0]}: torch {tt:.3f} s, JAX {tj:.3f} s", flush=True)
    del t_net, j_vars

  if not args.skip_train:
    b, crop = args.train_batch, args.train_crop
    t_net = network.resnet38_aff.Net()
    state = cp.random_state_dict(t_net, args.seed + 1)
    t_net.load_state_dict(state)
    t_net.train()  # the original's train(): BN stays frozen, conv1a / b2* get no gradients.
    images = rng.standard_normal((b, crop, crop, 3), dtype=np.float32)
    grid = -(-crop // 8)
    # Label grids at stride 8: two classes, background and some ignored (255) cells.
    labels = rng.choice(np.array([0, 1, 2, 255], np.int64), size=(b, grid, grid),
                        p=[0.4, 0.3, 0.2, 0.1])
    orig = types.SimpleNamespace(torch=torch, data=voc12.data, torchutils=tool.torchutils)
    run_torch = cp.torch_train_step_fn(orig, t_net, images, labels, "cpu")

    j_net, loss_fn = models.build("affinity"), make_aff_loss(RADIUS, "psa")
    j_vars = psa_state_dict_to_variables({k: v.numpy() for k, v in state.items()}, "affinity")
    params, batch_stats = j_vars["params"], jax.device_put(j_vars["batch_stats"])
    trainable, frozen, train_labels = train.split_frozen(params, models.param_labels(params))
    tx = train.make_optimizer(train.OptimConfig(lr=TRAIN_LR, total_steps=1000), train_labels)
    base_rng = jax.random.key(args.seed)

    def step(state, frozen, batch_stats, batch):
      def loss_of(trainable):
        v = {"params": train.merge_params(trainable, frozen), "batch_stats": batch_stats}
        out = j_net.apply(v, batch["image"], train=True,
                          rngs={"dropout": jax.random.fold_in(base_rng, state["step"])})
        return loss_fn(out, batch)
      (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
              "opt_state": opt_state}, loss

    step_fn = jax.jit(step, donate_argnums=(0,))
    trainable, frozen = jax.device_put(trainable), jax.device_put(frozen)
    holder = {"state": {"step": jnp.zeros((), jnp.int32), "params": trainable,
                        "opt_state": tx.init(trainable)}}
    batch = {"image": jnp.asarray(images), "aff_label": jnp.asarray(labels, jnp.int32)}

    def run_jax():
      holder["state"], loss = step_fn(holder["state"], frozen, batch_stats, batch)
      return float(loss)

    tt, tj = cp.interleaved_median(run_torch, run_jax, args.repeats, args.warmup)
    key = "aff_train_step"
    results.update({f"{key}_torch_s": tt, f"{key}_jax_s": tj, f"{key}_ratio": tt / tj,
                    f"{key}_batch": b, f"{key}_crop": crop})
    rows.append((f"AffinityNet train step, batch {b}, crop {crop}", tt, tj, None))
    print(f"  {rows[-1][0]}: torch {tt:.3f} s, JAX {tj:.3f} s", flush=True)

  load = os.getloadavg()
  results["loadavg_end"] = [round(v, 2) for v in load]
  print()
  print(f"| measurement | PyTorch (s) | JAX (s) | ratio torch/JAX | max rel diff |")
  print("|---|---|---|---|---|")
  for name, tt, tj, err in rows:
    print(f"| {name} | {tt:.3f} | {tj:.3f} | {tt / tj:.2f} | "
          f"{'-' if err is None else f'{err:.1e}'} |")
  print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  print(json.dumps(results))
  return results


if __name__ == "__main__":
  main()
