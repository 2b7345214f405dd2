"""One training stage for the three networks: the loss and the input differ, nothing else."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from affinity_jax import geometry, losses, models, train
from affinity_jax.stages import common


def cam_loss(logits, batch):
  """Multilabel soft margin on image-level labels."""
  return losses.multilabel_soft_margin_loss(logits, batch["label"]), {}


def make_aff_loss(radius: int, scheme: str):
  def aff_loss(features, batch):
    features = features.astype(jnp.float32)
    aff = geometry.pair_affinities(features, radius=radius, scheme=scheme)
    pairs = geometry.pair_labels(batch["aff_label"], radius=radius, scheme=scheme)
    loss, parts = losses.affinity_loss(aff, pairs["fg_pos"], pairs["bg_pos"], pairs["neg"])
    return loss, parts
  return aff_loss


def seg_loss(logits, batch):
  """Cross-entropy of the stride-8 logits upsampled (bilinear) to the label, 255 ignored."""
  labels = batch["label"]
  b, h, w = labels.shape
  logits = jax.image.resize(logits.astype(jnp.float32), (b, h, w, logits.shape[-1]), "bilinear")
  return losses.segmentation_loss(logits, labels), {}


_SECTION = {common.CAM_NET: "cam", common.AFF_NET: "aff", common.SEG_NET: "seg"}


def run_training(cfg, net: str) -> dict:
  """Trains `net` (common.CAM_NET / AFF_NET / SEG_NET) unless its final variables exist."""
  from affinity_jax.data import pipelines
  final = common.final_path(cfg, net)
  if os.path.isdir(final):
    print(f"[{net}] {final} exists; skipping (delete it to retrain)")
    return {"skipped": True}
  net_cfg = cfg[_SECTION[net]]
  arch = common.ARCH[net]
  builder = common.builder(cfg)
  split = cfg.data.train_split
  num_examples = len(common.split_names(cfg, split))
  steps = common.steps_for(net_cfg, num_examples)
  local_bs = common.local_batch_size(net_cfg.batch_size)
  host = dict(process_index=jax.process_index(), process_count=jax.process_count())

  if net == common.CAM_NET:
    loss_fn = cam_loss
    batches = lambda start, **shard: pipelines.cls_train(
        builder, split, batch_size=local_bs, crop_size=net_cfg.crop_size,
        resize_long=tuple(net_cfg.resize_long), color_jitter=tuple(net_cfg.color_jitter),
        seed=cfg.seed, start_step=start, shuffle_buffer=cfg.data.shuffle_buffer, **(shard or host))
  elif net == common.AFF_NET:
    loss_fn = make_aff_loss(net_cfg.radius, net_cfg.scheme)
    image_scale = common.aff_image_scale(cfg)
    batches = lambda start, **shard: pipelines.aff_train(
        builder, split, common.path(cfg, common.AFF_LABELS), batch_size=local_bs,
        crop_size=net_cfg.crop_size, color_jitter=tuple(net_cfg.color_jitter),
        image_scale=image_scale, seed=cfg.seed, start_step=start,
        shuffle_buffer=cfg.data.shuffle_buffer, exclude=common.skipped_by(cfg, "aff_labels"),
        **(shard or host))
  else:
    loss_fn = seg_loss
    batches = lambda start, **shard: pipelines.seg_train(
        builder, split, common.path(cfg, common.PSEUDO_LABELS), batch_size=local_bs,
        crop_size=net_cfg.crop_size, scale_range=tuple(net_cfg.scale_range), seed=cfg.seed,
        start_step=start, shuffle_buffer=cfg.data.shuffle_buffer,
        exclude=common.skipped_by(cfg, "random_walk"), **(shard or host))

  calibration = None
  from_cam = cfg.init.from_cam_net and net != common.CAM_NET
  if not cfg.init.backbone and not from_cam:
    # The same images on every host, so the replicas start identical.
    calibration = next(batches(0, process_index=0, process_count=1))["image"]
  variables = common.init_variables(cfg, arch, net_cfg.crop_size, calibration)
  if from_cam:
    _, cam_variables = common.load_trained(cfg, common.CAM_NET)
    backbone = {k: {m: t for m, t in tree.items() if m not in models.NEW_MODULES}
                for k, tree in cam_variables.items()}
    variables = common.merge_backbone(variables, backbone, common.final_path(cfg, common.CAM_NET))
  labels = models.param_labels(variables["params"])
  if not cfg.init.freeze_stem:  # from scratch, the stem has nothing pretrained to keep.
    labels = jax.tree.map(lambda l: "pretrained_weight" if l == "frozen" else l, labels)
  model = common.make_model(cfg, arch)
  optim = train.OptimConfig(lr=net_cfg.lr, total_steps=steps, weight_decay=net_cfg.weight_decay,
                            poly_power=net_cfg.poly_power, momentum_quirk=net_cfg.momentum_quirk,
                            momentum=net_cfg.momentum, optimizer=net_cfg.optimizer)
  print(f"[{net}] {steps} steps, global batch {net_cfg.batch_size}, {num_examples} images in "
        f"{split}, {jax.device_count()} device(s)", flush=True)
  trained = train.train(
      name=net, model=model, variables=variables,
      labels=labels, loss_fn=loss_fn, batches=batches,
      optim=optim, workdir=common.path(cfg, net), batch_size=net_cfg.batch_size, seed=cfg.seed,
      checkpoint_every=net_cfg.checkpoint_every, log_every=net_cfg.log_every,
      lr_key=f"{_SECTION[net]}.lr")
  if jax.process_index() == 0:
    common.save_trained(cfg, net, trained)
  return {"steps": steps}
