"""The trainer: optimiser groups, frozen set, multi-device equivalence, exact resume, NaN guard.

A small real Flax model stands in for ResNet-38 so these tests isolate the training loop; the
stages' tests run the loop with the real networks.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from affinity_jax import train
from affinity_jax.errors import NonFiniteLossError, TrainingInterrupted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
  """conv (frozen) -> conv (pretrained) -> dropout -> head (new, with bias)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="conv1a")(x))
    x = nn.relu(nn.Conv(8, (3, 3), use_bias=True, name="b3")(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3, name="fc8")(x.mean(axis=(1, 2)))


def tiny_labels(params):
  names = {"conv1a": "frozen", "b3": "pretrained", "fc8": "new"}
  return {m: {k: (names[m] if names[m] == "frozen" else
                  f"{names[m]}_{'bias' if k == 'bias' else 'weight'}") for k in p}
          for m, p in params.items()}


def tiny_setup(seed=0):
  model = TinyNet()
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)))
  variables = {"params": variables["params"], "batch_stats": {}}
  return model, variables


def batches_from(seed, batch_size):
  def make(start):
    step = start
    while True:
      rng = np.random.default_rng([seed, step])
      yield {"image": rng.normal(size=(batch_size, 8, 8, 3)).astype(np.float32),
             "label": rng.integers(0, 2, size=(batch_size, 3)).astype(np.float32)}
      step += 1
  return make


def bce_loss(logits, batch):
  return optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean(), {}


def run_tiny(workdir, total_steps, *, batch_size=4, lr=0.1, checkpoint_every=2, loss_fn=bce_loss,
             momentum_quirk=True, batches=None):
  model, variables = tiny_setup()
  return train.train(
      name="tiny", model=model, variables=variables, labels=tiny_labels(variables["params"]),
      loss_fn=loss_fn, batches=batches or batches_from(1, batch_size),
      optim=train.OptimConfig(lr=lr, total_steps=total_steps, momentum_quirk=momentum_quirk),
      workdir=str(workdir), batch_size=batch_size, checkpoint_every=checkpoint_every,
      log_every=100)


def test_poly_schedule_matches_formula():
  sched = train.poly_schedule(0.01, 100, 0.9)
  for step in (0, 1, 50, 99, 100, 150):
    want = 0.01 * max(0.0, 1 - step / 100) ** 0.9
    assert float(sched(step)) == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_optimizer_groups_multipliers_and_decay():
  """One step of plain SGD (no momentum): update = -lr * mult * (g + wd * p [weights only])."""
  params = {"w": jnp.full((2,), 2.0), "b": jnp.full((2,), 2.0), "nw": jnp.full((2,), 2.0),
            "nb": jnp.full((2,), 2.0)}
  labels = {"w": "pretrained_weight", "b": "pretrained_bias", "nw": "new_weight",
            "nb": "new_bias"}
  cfg = train.OptimConfig(lr=0.1, total_steps=10, weight_decay=0.5, momentum_quirk=False,
                          momentum=0.0)
  tx = train.make_optimizer(cfg, labels)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates["w"][0]) == pytest.approx(-0.1 * 1 * (1 + 0.5 * 2))
  assert float(updates["b"][0]) == pytest.approx(-0.1 * 2 * 1)
  assert float(updates["nw"][0]) == pytest.approx(-0.1 * 10 * (1 + 0.5 * 2))
  assert float(updates["nb"][0]) == pytest.approx(-0.1 * 20 * 1)
  # pretrained_lr_mult scales the pretrained groups only.
  tx = train.make_optimizer(dataclasses.replace(cfg, pretrained_lr_mult=0.1), labels)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates["w"][0]) == pytest.approx(-0.1 * 0.1 * (1 + 0.5 * 2))
  assert float(updates["b"][0]) == pytest.approx(-0.1 * 0.2 * 1)
  assert float(updates["nw"][0]) == pytest.approx(-0.1 * 10 * (1 + 0.5 * 2))
  assert float(updates["nb"][0]) == pytest.approx(-0.1 * 20 * 1)


def test_momentum_quirk_uses_weight_decay_as_momentum():
  cfg = train.OptimConfig(lr=1.0, total_steps=1000, weight_decay=5e-4)
  assert cfg.effective_momentum == 5e-4
  tx = train.make_optimizer(cfg, {"b": "pretrained_bias"})
  params = {"b": jnp.zeros(())}
  state = tx.init(params)
  g = {"b": jnp.ones(())}
  u1, state = tx.update(g, state, params)
  u2, state = tx.update(g, state, params)
  # Second update carries 5e-4 of the first (torch SGD: buf = m * buf + g).
  ratio = float(u2["b"]) / float(u1["b"])
  lr_ratio = (1 - 1 / 1000) ** 0.9
  assert ratio == pytest.approx(lr_ratio * (1 + 5e-4), rel=1e-6)


def test_frozen_parameters_do_not_move_and_others_do(tmp_path):
  model, variables = tiny_setup()
  out = run_tiny(tmp_path, 3)
  before, after = variables["params"], out["params"]
  np.testing.assert_array_equal(before["conv1a"]["kernel"], after["conv1a"]["kernel"])
  assert not np.allclose(before["b3"]["kernel"], after["b3"]["kernel"])
  assert not np.allclose(before["fc8"]["kernel"], after["fc8"]["kernel"])


def test_sigterm_saves_and_rerun_resumes_to_same_parameters(tmp_path):
  straight = run_tiny(tmp_path / "a", 7, checkpoint_every=100)

  def preempted_at_step_3(start):
    for i, batch in enumerate(batches_from(1, 4)(start)):
      if start + i == 3:  # the pre-emption notice arrives while step 4 is being fed.
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  with pytest.raises(TrainingInterrupted, match="step 4"):
    run_tiny(tmp_path / "b", 7, checkpoint_every=100, batches=preempted_at_step_3)
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["4"]
  resumed = run_tiny(tmp_path / "b", 7, checkpoint_every=100)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               straight["params"], resumed["params"])


def test_nonfinite_loss_names_step_and_checkpoint(tmp_path):
  def nan_after_two(logits, batch):
    loss = optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean()
    return loss * jnp.where(batch["image"][0, 0, 0, 0] > 5.0, jnp.nan, 1.0), {}

  def batches(start):
    step = start
    while True:
      img = np.zeros((4, 8, 8, 3), np.float32)
      img[0, 0, 0, 0] = 10.0 if step >= 2 else 0.0
      yield {"image": img, "label": np.ones((4, 3), np.float32)}
      step += 1

  model, variables = tiny_setup()
  with pytest.raises(NonFiniteLossError, match=r"step 3.*last good checkpoint is step 2"):
    train.train(name="tiny", model=model, variables=variables,
                labels=tiny_labels(variables["params"]), loss_fn=nan_after_two,
                batches=batches, optim=train.OptimConfig(lr=0.1, total_steps=5),
                workdir=str(tmp_path), batch_size=4, checkpoint_every=2, log_every=100)


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_train import run_tiny
    out = run_tiny({workdir!r}, 3, batch_size=8)
    leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(out["params"])]
    print(json.dumps({{"devices": jax.device_count(),
                       "params": np.concatenate(leaves).tolist()}}))
""")


def _run_with_devices(n, workdir):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
             JAX_PLATFORMS="cpu")
  script = _MULTI_DEVICE_SCRIPT.format(tests=os.path.join(REPO, "tests"), workdir=str(workdir))
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_four_devices_match_one_device(tmp_path):
  one = _run_with_devices(1, tmp_path / "one")
  four = _run_with_devices(4, tmp_path / "four")
  assert (one["devices"], four["devices"]) == (1, 4)
  np.testing.assert_allclose(one["params"], four["params"], rtol=1e-5, atol=1e-6)


def test_adam_option_keeps_group_multipliers_and_rejects_unknown_names():
  params = {"w": jnp.full((2,), 2.0), "nb": jnp.full((2,), 2.0)}
  labels = {"w": "pretrained_weight", "nb": "new_bias"}
  cfg = train.OptimConfig(lr=0.1, total_steps=10, weight_decay=0.0, optimizer="adam")
  tx = train.make_optimizer(cfg, labels)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  # Adam's first step moves each weight by lr * multiplier (bias-corrected m / sqrt(v) = 1).
  assert float(updates["w"][0]) == pytest.approx(-0.1, rel=1e-4)
  assert float(updates["nb"][0]) == pytest.approx(-0.1 * 20, rel=1e-4)
  with pytest.raises(ValueError, match="rmsprop"):
    train.make_optimizer(train.OptimConfig(lr=0.1, total_steps=10, optimizer="rmsprop"), labels)
