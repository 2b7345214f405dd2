"""One trainer for the three networks (CAM, AffinityNet, segmentation).

Data parallel over every device through a one-axis `("data",)` mesh: the global batch is split
over devices, parameters and optimiser state are replicated. Each host feeds its own slice of the
batch (`jax.make_array_from_process_local_data`), so the same code runs on one CPU, one GPU or a
TPU pod. The optimiser is the original's: SGD with a poly schedule and four learning-rate groups
(pretrained weights x1, pretrained biases x2, new weights x10, new biases x20; decay on weights
only), the frozen set excluded from differentiation altogether, every BatchNorm a constant.

Checkpoints are written with an orbax `CheckpointManager` every `checkpoint_every` steps, at the
end, and when the process receives SIGTERM/SIGINT (the pre-emption path; in a multi-process
run all processes stop after the same step, that of the first signal any of them got). A rerun of the same
command resumes from the newest checkpoint and, the input being deterministic in the step, ends
with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from affinity_jax import console, distributed, io
from affinity_jax.compilation import jit
from affinity_jax.errors import NonFiniteLossError, TrainingInterrupted, UserError

PyTree = Any
Batch = Mapping[str, np.ndarray]
# loss_fn(model_output, batch) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]
# pictures(variables, host batch) -> {tag: uint8 [N, H, W, 3]}: what TensorBoard shows of the
# network at a step (its own jitted forward, outside the training step).
PictureFn = Callable[[Mapping[str, PyTree], Batch], Mapping[str, np.ndarray]]

GROUP_MULTIPLIERS = {  # label -> (lr multiplier, weight decay applies)
    "pretrained_weight": (1.0, True),
    "pretrained_bias": (2.0, False),
    "new_weight": (10.0, True),
    "new_bias": (20.0, False),
}


OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float
  total_steps: int
  weight_decay: float = 5e-4
  poly_power: float = 0.9
  # The original hands its weight decay to SGD's momentum slot, so it trains with momentum
  # 5e-4 (i.e. none). True reproduces that; False uses `momentum` below.
  momentum_quirk: bool = True
  momentum: float = 0.9
  # "sgd" is the original's. "adam" is for training from scratch (the synthetic default has
  # no ImageNet initialisation, and SGD with frozen BatchNorm learns it very slowly); the
  # groups' multipliers and decoupled decay on weights apply to it the same way.
  optimizer: str = "sgd"
  # Scales the pretrained groups' multipliers (x1 weights, x2 biases); the new layers' keep
  # x10 / x20. 1 is the original's.
  pretrained_lr_mult: float = 1.0

  @property
  def effective_momentum(self) -> float:
    return self.weight_decay if self.momentum_quirk else self.momentum


def poly_schedule(base_lr: float, total_steps: int, power: float) -> optax.Schedule:
  """lr * (1 - step / total_steps) ** power, as the original's PolyOptimizer (0 past the end)."""
  def schedule(count):
    frac = jnp.clip(1.0 - count / total_steps, 0.0, 1.0)
    return base_lr * frac ** power
  return schedule


def make_optimizer(cfg: OptimConfig, labels: PyTree) -> optax.GradientTransformation:
  """SGD with the original's parameter groups over a params tree labelled by `param_labels`.

  `labels` must not contain "frozen" leaves: frozen parameters are split off before
  differentiation (see `split_frozen`).
  """
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd or adam)")
  momentum = cfg.effective_momentum or None
  transforms = {}
  for label, (mult, decay) in GROUP_MULTIPLIERS.items():
    if label.startswith("pretrained"):
      mult *= cfg.pretrained_lr_mult
    schedule = poly_schedule(cfg.lr * mult, cfg.total_steps, cfg.poly_power)
    if cfg.optimizer == "adam":
      transforms[label] = optax.adamw(schedule, weight_decay=cfg.weight_decay if decay else 0.0)
      continue
    sgd = optax.sgd(schedule, momentum=momentum)
    transforms[label] = (optax.chain(optax.add_decayed_weights(cfg.weight_decay), sgd)
                         if decay and cfg.weight_decay else sgd)
  return optax.multi_transform(transforms, labels)


def split_frozen(params: PyTree, labels: PyTree) -> tuple[dict, dict, dict]:
  """Splits params into (trainable, frozen) flat dicts and the trainable labels."""
  flat = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  trainable = {k: v for k, v in flat.items() if flat_labels[k] != "frozen"}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] == "frozen"}
  train_labels = {k: flat_labels[k] for k in trainable}
  return trainable, frozen, train_labels


def merge_params(trainable: dict, frozen: dict) -> PyTree:
  return traverse_util.unflatten_dict({**trainable, **frozen})


def data_mesh() -> jax.sharding.Mesh:
  # Auto axes: XLA propagates the batch sharding through the model (GSPMD), so model code
  # needs no sharding annotations. (make_mesh defaults to Explicit axes in current JAX.)
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def global_batch(local: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
  """Turns this host's numpy slice of the batch into global arrays split over the mesh."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if v.dtype.kind in "biuf":  # names and other strings stay on the host.
      out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def _agreed_stop(mesh: jax.sharding.Mesh) -> Callable[[bool], bool]:
  """flag -> whether any process has it. A signal reaches the processes of a multi-process run
  at different steps, but the last checkpoint is a collective write: all must stop after the
  same step. One process: the flag itself."""
  if jax.process_count() == 1:
    return bool
  sharding = NamedSharding(mesh, P("data"))
  any_of = jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

  def agree(flag: bool) -> bool:
    local = np.full((jax.local_device_count(),), int(flag), np.int32)
    return bool(any_of(jax.make_array_from_process_local_data(sharding, local)))
  return agree


class _Summaries:
  """TensorBoard event files of a training (process 0 only): scalars and pictures."""

  def __init__(self, name: str, logdir: str):
    import tensorflow as tf  # only for the event-file writer.
    self.name, self.tf = name, tf
    self.writer = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
    with self.writer.as_default(step=step):
      for k, v in metrics.items():
        self.tf.summary.scalar(f"{self.name}/{k}", v)
    self.writer.flush()

  def images(self, step: int, pictures: Mapping[str, np.ndarray]) -> None:
    """pictures: tag -> uint8 [N, H, W, 3], shown as `{name}/{tag}`."""
    with self.writer.as_default(step=step):
      for tag, images in pictures.items():
        self.tf.summary.image(f"{self.name}/{tag}", images, max_outputs=len(images))
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


# Images of the fixed batch that the TensorBoard pictures show.
PICTURE_IMAGES = 4


def _picture_batch(batches: Callable[[int], Iterator[Batch]]) -> Batch:
  """The first PICTURE_IMAGES examples of the batch of step 0: the same images at every step
  and after a resume (the input is deterministic in the step)."""
  it = batches(0)
  batch = next(it)
  if hasattr(it, "close"):
    it.close()
  return {k: np.asarray(v)[:PICTURE_IMAGES] for k, v in batch.items()}


def _local_variables(state: dict, constants: dict) -> dict[str, PyTree]:
  """The network's variables as this process's own copy (each replicated array's shard on its
  first device), so that one process can run a forward without the others."""
  def local(tree):
    return jax.tree.map(lambda x: x.addressable_data(0), tree)
  return {"params": merge_params(local(state["params"]), local(constants["frozen"])),
          "batch_stats": local(constants["batch_stats"])}


def init_state(variables: Mapping[str, PyTree], labels: PyTree, optim: OptimConfig,
               mesh: jax.sharding.Mesh | None = None
               ) -> tuple[dict, dict, optax.GradientTransformation]:
  """The training state of `variables`, replicated over `mesh` (default: `data_mesh()`).

  Returns:
    (state, constants, tx): state = {"step", "params" (the trainable ones), "opt_state"};
    constants = {"frozen": frozen params, "batch_stats": frozen BatchNorm}, never updated;
    tx the optimiser of `make_optimizer` over the trainable params.
  """
  replicated = NamedSharding(mesh or data_mesh(), P())
  trainable, frozen, train_labels = split_frozen(variables["params"], labels)
  tx = make_optimizer(optim, train_labels)
  trainable = jax.device_put(trainable, replicated)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
           "params": trainable,
           "opt_state": jit(tx.init, out_shardings=replicated)(trainable)}
  constants = {"frozen": jax.device_put(frozen, replicated),
               "batch_stats": jax.device_put(variables.get("batch_stats", {}), replicated)}
  return state, constants, tx


def make_train_step(model, loss_fn: LossFn, tx: optax.GradientTransformation,
                    optim: OptimConfig, *, seed: int = 0,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
  """The jitted step `(state, constants, batch) -> (state, metrics)` that `train` runs.

  `state` and `constants` as `init_state` makes them; `batch` a dict of global arrays (the
  image under "image"). The state is donated and comes back replicated over `mesh`; dropout
  keys are `fold_in(key(seed), step)`. Metrics: "loss", the loss function's own, and "lr" (the
  base learning rate of the step).
  """
  replicated = NamedSharding(mesh or data_mesh(), P())
  base_rng = jax.random.key(seed)
  schedule = poly_schedule(optim.lr, optim.total_steps, optim.poly_power)

  # Frozen params and BN statistics are arguments, not closure constants: XLA would otherwise
  # bake them into the executable.
  def train_step(state, constants, batch):
    rng = jax.random.fold_in(base_rng, state["step"])

    def loss_of(trainable):
      v = {"params": merge_params(trainable, constants["frozen"]),
           "batch_stats": constants["batch_stats"]}
      out = model.apply(v, batch["image"], train=True, rngs={"dropout": rng})
      return loss_fn(out, batch)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **metrics, "lr": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return jit(train_step, out_shardings=(replicated, replicated), donate_argnums=(0,))


def _checkpoint_manager(ckpt_dir: str, max_to_keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def _resume(name: str, ckpt_dir: str, state: dict, max_to_keep: int
            ) -> tuple[ocp.CheckpointManager, dict, int]:
  """(manager, state, step) of the newest checkpoint in `ckpt_dir` that restores, else of the
  initial `state` at step 0.

  A step that does not restore (truncated or damaged files) is moved to
  `{ckpt_dir}.damaged/` with a warning and the one before it is tried: losing a few steps
  beats losing the run, and the files stay for a look.
  """
  manager = _checkpoint_manager(ckpt_dir, max_to_keep)
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(state))
    except (ValueError, OSError) as e:  # what orbax and tensorstore raise for damaged files
      damaged.append(step)
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      print(f"[{name}] warning: checkpoint step {step} in {ckpt_dir} cannot be read "
            f"({type(e).__name__}: {reason}); trying the one before", flush=True)
      continue
    if jax.process_index() == 0:
      print(f"[{name}] resuming from step {step} ({ckpt_dir})", flush=True)
    start, state = step, restored
    break
  else:
    start = 0
    if damaged:
      print(f"[{name}] warning: no checkpoint in {ckpt_dir} can be read; starting from step 0",
            flush=True)
  if jax.process_count() > 1:
    # Every process must go on from the same step, and all must have read the checkpoints
    # before process 0 moves any aside.
    seen = distributed.gather(f"{name} checkpoints read", [int(start), damaged])
    if any(s != seen[0] for s in seen):
      raise UserError(
          f"the processes read the checkpoints in {ckpt_dir} differently ("
          + "; ".join(f"process {p}: step {s}, unreadable {d or 'none'}"
                      for p, (s, d) in enumerate(seen))
          + "): the workdir must be on a file system every process sees alike")
  if damaged:
    manager.close()
    if jax.process_index() == 0:
      aside = ckpt_dir + ".damaged"
      os.makedirs(aside, exist_ok=True)
      for step in damaged:
        target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(os.path.join(ckpt_dir, str(step)), target)
        print(f"[{name}] moved the unreadable step {step} to {target}", flush=True)
    distributed.barrier(f"{name} damaged checkpoints moved aside")
    manager = _checkpoint_manager(ckpt_dir, max_to_keep)
  return manager, state, int(start)


def train(*, name: str, model, variables: Mapping[str, PyTree], labels: PyTree,
          loss_fn: LossFn, batches: Callable[[int], Iterator[Batch]], optim: OptimConfig,
          workdir: str, batch_size: int, seed: int = 0, checkpoint_every: int = 100,
          log_every: int = 10, max_to_keep: int = 2, pictures: PictureFn | None = None,
          image_every: int = 0) -> dict[str, PyTree]:
  """Trains `model` from `variables` for `optim.total_steps` steps, resuming if it can.

  Args:
    name: the network's name, used in log lines and messages.
    model: a Flax module whose `apply(variables, images, train=True, rngs={"dropout": ...})`
      returns what `loss_fn` takes.
    variables: {"params": ..., "batch_stats": ...}; batch_stats are constants.
    labels: `affinity_jax.models.param_labels(params)`.
    loss_fn: (model output, device batch) -> (loss, metrics).
    batches: start_step -> iterator of host batches for steps start_step, start_step+1, ...
      (global batch size / process_count examples each, numpy).
    workdir: checkpoints go to `{workdir}/checkpoints`, event files to `{workdir}/logs`.
    log_every: steps between console lines off a terminal and TensorBoard scalars.
    pictures, image_every: with image_every > 0, `pictures` of the first PICTURE_IMAGES
      examples of step 0's batch go to TensorBoard (as `{name}/{tag}`) at step 1, every
      `image_every` steps and at the end.
  Returns:
    The trained {"params", "batch_stats"} as host numpy arrays.
  """
  mesh = data_mesh()
  if batch_size % jax.device_count():
    raise UserError(f"{name}: global batch size {batch_size} is not divisible by the "
                    f"{jax.device_count()} devices")
  data_sharding = NamedSharding(mesh, P("data"))
  state, constants, tx = init_state(variables, labels, optim, mesh)
  step_fn = make_train_step(model, loss_fn, tx, optim, seed=seed, mesh=mesh)

  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  manager, state, start = _resume(name, ckpt_dir, state, max_to_keep)

  stop = {"signal": None}
  def on_signal(signum, frame):
    stop["signal"] = signum
  old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

  main = jax.process_index() == 0
  agree = _agreed_stop(mesh)
  summaries = None
  last_saved = start if start else None
  try:
    summaries = _Summaries(name, os.path.join(workdir, "logs")) if main else None
    fixed = (_picture_batch(batches) if main and pictures is not None and image_every > 0
             else None)
    it = batches(start)
    with console.progress(optim.total_steps, name, unit="step", start=start,
                          rate_scale=batch_size, enabled=main) as bar:
      for step in range(start, optim.total_steps):
        try:
          host_batch = next(it)
        except StopIteration:
          raise RuntimeError(f"{name}: the input pipeline ended at step {step} of "
                             f"{optim.total_steps}; it must repeat") from None
        state, metrics = step_fn(state, constants, global_batch(host_batch, data_sharding))
        done = step + 1
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
          where = (f"the last good checkpoint is step {last_saved} in {ckpt_dir}"
                   if last_saved is not None else "no checkpoint was saved yet")
          raise NonFiniteLossError(
              f"{name}: loss is {loss} at step {done}; {where}. Lower the learning rate or "
              "check the input data.")
        # Before the bar counts the step, so that its rate leaves out the first compilation.
        if fixed is not None and (done == 1 or done % image_every == 0
                                  or done == optim.total_steps):
          summaries.images(done, pictures(_local_variables(state, constants), fixed))
        log = done % log_every == 0 or done == optim.total_steps or done == start + 1
        # The loss is on the host already; the other metrics only cross over when logged.
        fields = {"loss": loss, **({k: float(v) for k, v in metrics.items()} if log else {})}
        bar.update(1, force=log, **fields)
        if log and summaries is not None:
          summaries.scalars(done, fields)
        stopping = agree(stop["signal"] is not None)
        if stopping and stop["signal"] is None:
          stop["signal"] = "of another process"
        if done % checkpoint_every == 0 or done == optim.total_steps or stopping:
          try:
            manager.save(done, args=ocp.args.StandardSave(state), force=True)
          except (OSError, ValueError) as e:  # a full disk is the user's to fix, not a bug.
            refused = io.disk_error(ckpt_dir, e)
            if refused is None:
              raise
            raise refused from e
          last_saved = done
        if stopping and done < optim.total_steps:
          manager.wait_until_finished()
          raise TrainingInterrupted(
              f"{name}: stopped by signal {stop['signal']} at step {done}; checkpoint saved in "
              f"{ckpt_dir}. Run the same command again to resume.")
  finally:
    manager.wait_until_finished()
    manager.close()
    if summaries is not None:
      summaries.close()
    for s, h in old_handlers.items():
      signal.signal(s, h)

  params = merge_params(state["params"], constants["frozen"])
  return jax.device_get({"params": params, "batch_stats": constants["batch_stats"]})
