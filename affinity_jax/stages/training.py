"""What the three training stages share: a network's `TrainingSpec` and `run_training`.

Each of train_cam.py, train_aff.py and train_seg.py defines its network's spec (the network,
its loss and its input pipeline); `run_training(cfg, spec)` does the rest the same way for all:
initial variables, optimiser groups, the trainer (affinity_jax.train), the final checkpoint.
A spec may also say what TensorBoard shows of its network while it trains (`pictures`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import jax

from affinity_jax import artifacts, checkpoint, data, distributed, models, train
from affinity_jax.errors import NonFiniteLossError, UserError

# batches(cfg, builder, start_step, local_batch_size, process_index, process_count) -> endless
# host batches (numpy dicts holding "image").
Batches = Callable[..., Iterator[dict]]


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
  """How one network trains."""
  network: artifacts.Network
  loss: Callable[[object], train.LossFn]   # cfg -> loss_fn(model output, batch)
  batches: Batches
  # With `init.from_cam_net` (from-scratch configs), start from the trained CAM network's
  # backbone instead of random weights.
  backbone_from_cam_net: bool = False
  # (cfg, model) -> what TensorBoard shows of the network every `{section}.image_every`
  # steps (train.PictureFn); None: no pictures.
  pictures: Callable[[object, object], train.PictureFn] | None = None
  # The network never trains its backbone (IRN's relation network), whatever init.freeze_stem
  # says: its "frozen" parameters stay frozen.
  frozen_backbone: bool = False
  # (cfg, model, trained variables) -> the variables to save, on process 0 after training
  # (IRN's relation network measures its mean displacement); None: saved as trained.
  finish: Callable[[object, object, dict], dict] | None = None


def steps_for(net_cfg, num_examples: int) -> int:
  """`steps` when positive, else `epochs` passes over `num_examples` at the global batch size,
  each of its whole batches (the originals' (examples // batch) * epochs: PSA's train_cls.py,
  IRN's train_cam.py and train_irn.py drop each epoch's last partial batch)."""
  if net_cfg.steps > 0:
    return int(net_cfg.steps)
  return max(1, num_examples // int(net_cfg.batch_size) * int(net_cfg.epochs))


def local_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise UserError(f"batch size {global_batch} is not divisible by the {jax.process_count()} "
                    "hosts")
  return global_batch // jax.process_count()


def init_variables(cfg, arch: str, crop_size: int, calibration_images=None) -> dict:
  """Random initialisation, then the ImageNet backbone from `cfg.init.backbone` if given.

  Without a backbone, the frozen BatchNorm statistics are calibrated on `calibration_images`
  (models.calibrate_batch_norm): the original never trains from scratch, and a frozen identity
  BatchNorm would leave the network's signal unnormalised.
  """
  model = models.from_config(cfg, arch)
  variables = models.init_variables(model, jax.random.key(cfg.seed), (1, crop_size, crop_size, 3))
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  if cfg.init.backbone:
    backbone, meta = checkpoint.load_variables(cfg.init.backbone)
    checkpoint.check_compatible(meta, arch="backbone", width=cfg.model.width,
                                path=cfg.init.backbone, backbone=models.backbone_name(cfg))
    variables = checkpoint.merge_backbone(variables, backbone, cfg.init.backbone)
  elif calibration_images is not None:
    variables = models.calibrate_batch_norm(model, variables, calibration_images)
  return jax.device_get(variables)


def run_training(cfg, spec: TrainingSpec) -> dict:
  """Trains `spec.network` unless its final variables exist."""
  net = spec.network
  workdir = artifacts.Workdir(cfg.workdir)
  final = workdir.network(net)
  # Decided by process 0 for all: a process whose view of the folder lags (NFS caching) must
  # not skip the collective training steps that the others enter.
  if distributed.broadcast(f"{net.folder} trained", lambda: os.path.isdir(final)):
    print(f"[{net.folder}] {final} exists; skipping (delete it to retrain)")
    return {"skipped": True}
  net_cfg = cfg[net.section]
  builder = data.from_config(cfg)
  num_examples = len(data.split_names(builder, cfg.data.train_split))
  steps = steps_for(net_cfg, num_examples)
  local_bs = local_batch_size(net_cfg.batch_size)
  host = (jax.process_index(), jax.process_count())

  def batches(start, process_index=host[0], process_count=host[1]):
    return spec.batches(cfg, builder, start, local_bs, process_index, process_count)

  calibration = None
  from_cam = cfg.init.from_cam_net and spec.backbone_from_cam_net
  if not cfg.init.backbone and not from_cam:
    # The first global batch, on every host: the replicas start identical, and the same as on
    # any other number of hosts.
    calibration = next(spec.batches(cfg, builder, 0, net_cfg.batch_size, 0, 1))["image"]
  variables = init_variables(cfg, net.arch, net_cfg.crop_size, calibration)
  if from_cam:
    _, cam_variables = checkpoint.load_network(cfg, artifacts.CAM_NET)
    backbone = {k: {m: t for m, t in tree.items() if m not in models.NEW_MODULES}
                for k, tree in cam_variables.items()}
    variables = checkpoint.merge_backbone(variables, backbone,
                                          workdir.network(artifacts.CAM_NET))
  labels = models.param_labels(variables["params"])
  if not cfg.init.freeze_stem and not spec.frozen_backbone:
    # From scratch, the stem has nothing pretrained to keep.
    labels = jax.tree.map(lambda l: "pretrained_weight" if l == "frozen" else l, labels)
  optim = train.OptimConfig(lr=net_cfg.lr, total_steps=steps, weight_decay=net_cfg.weight_decay,
                            poly_power=net_cfg.poly_power, momentum_quirk=net_cfg.momentum_quirk,
                            momentum=net_cfg.momentum, optimizer=net_cfg.optimizer,
                            pretrained_lr_mult=net_cfg.pretrained_lr_mult)
  print(f"[{net.folder}] {steps} steps, global batch {net_cfg.batch_size}, {num_examples} "
        f"images in {cfg.data.train_split}, {jax.device_count()} device(s)", flush=True)
  model = models.from_config(cfg, net.arch)
  image_every = int(net_cfg.get("image_every", 0))
  pictures = spec.pictures(cfg, model) if spec.pictures and image_every > 0 else None
  try:
    trained = train.train(
        name=net.folder, model=model, variables=variables,
        labels=labels, loss_fn=spec.loss(cfg), batches=batches, optim=optim,
        workdir=workdir.network_dir(net), batch_size=net_cfg.batch_size, seed=cfg.seed,
        checkpoint_every=net_cfg.checkpoint_every, log_every=net_cfg.log_every,
        pictures=pictures, image_every=image_every)
  except NonFiniteLossError as e:
    raise NonFiniteLossError(f"{e} The learning rate is --config.{net.section}.lr.") from e
  if jax.process_index() == 0:
    if spec.finish is not None:
      trained = spec.finish(cfg, model, trained)
    checkpoint.save_network(cfg, net, trained)
  return {"steps": steps}
