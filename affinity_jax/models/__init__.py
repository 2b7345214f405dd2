"""Networks of the pipeline (Flax linen, NHWC) and what the trainer needs to know about them.

- `ResNet38`: the backbone alone (taps conv4 / conv5 / conv6 at stride 8).
- `CAMNet`, `AffinityNet`, `SegNet`: backbone + head; `build(arch, ...)` picks one by name.
- `param_labels(params)`: the original's frozen set and learning-rate groups.
- `normalize_images`: RGB in [0, 255] -> the ImageNet-normalised input every network expects.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from affinity_jax.constants import IMAGENET_MEAN, IMAGENET_STD
from affinity_jax.errors import ConfigError
from affinity_jax.models.heads import AffinityNet, CAMNet, SegNet
from affinity_jax.models.resnet38 import (BLOCKS, FrozenBatchNorm, ResNet38, BlockSpec,
                                          calibrate_batch_norm, scaled)

__all__ = ["ResNet38", "CAMNet", "AffinityNet", "SegNet", "FrozenBatchNorm", "BlockSpec",
           "BLOCKS", "ARCHS", "IMAGENET_MEAN", "IMAGENET_STD", "FROZEN_MODULES", "NEW_MODULES",
           "build", "calibrate_batch_norm", "from_config", "init_variables",
           "normalize_images", "param_labels", "scaled"]

# Every architecture a checkpoint can hold: "backbone" is ResNet-38 alone (the ImageNet weights
# that initialise the others), the rest are the networks of the pipeline.
ARCHS = ("backbone", "cam", "affinity", "seg")

# The original never trains the stem and the first stage (and no BN at all: those live in
# 'batch_stats', outside params).
FROZEN_MODULES = frozenset({"conv1a", "b2", "b2_1", "b2_2"})
# Layers trained from scratch (lr x10 / x20 in the original's groups).
NEW_MODULES = frozenset({"fc8", "f8_3", "f8_4", "f8_5", "f9", "seg_conv1", "seg_conv2"})


def normalize_images(images: Any) -> jax.Array:
  """images: [..., 3] RGB, uint8 or float in [0, 255] -> float32 (x / 255 - mean) / std."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def build(arch: str, num_classes: int = 20, width: float = 1.0, dtype: Any = jnp.float32):
  """A network by name: "backbone" (ResNet38), "cam" (CAMNet), "affinity" (AffinityNet),
  "seg" (SegNet)."""
  if not width > 0:
    raise ValueError(f"model width must be positive, got {width!r}")
  if arch == "backbone":
    return ResNet38(width=width, dtype=dtype)
  if arch == "cam":
    return CAMNet(num_classes=num_classes, width=width, dtype=dtype)
  if arch == "affinity":
    return AffinityNet(width=width, dtype=dtype)
  if arch == "seg":
    return SegNet(num_classes=num_classes, width=width, dtype=dtype)
  raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")


def from_config(cfg, arch: str):
  """`build(arch)` with the sizes and dtype of the config's `model` section, checked."""
  try:
    dtype = jnp.dtype(cfg.model.dtype)
  except TypeError:
    raise ConfigError(f"config key model.dtype: unknown dtype {cfg.model.dtype!r} "
                      "(use float32 or bfloat16)") from None
  if not cfg.model.width > 0:
    raise ConfigError(f"config key model.width must be > 0, got {cfg.model.width!r}")
  return build(arch, num_classes=cfg.model.num_classes, width=cfg.model.width, dtype=dtype)


def param_labels(params: Any) -> Any:
  """A pytree like `params` of group labels for `optax.multi_transform`.

  "frozen" (conv1a, b2, b2_1, b2_2: never updated), "pretrained_weight" / "pretrained_bias"
  (the rest of the backbone), "new_weight" / "new_bias" (heads trained from scratch).
  """
  flat = traverse_util.flatten_dict(params)
  labels = {}
  for path in flat:
    top, leaf = path[0], path[-1]
    if top in FROZEN_MODULES:
      labels[path] = "frozen"
    else:
      group = "new" if top in NEW_MODULES else "pretrained"
      labels[path] = f"{group}_{'bias' if leaf == 'bias' else 'weight'}"
  return traverse_util.unflatten_dict(labels)


def init_variables(model, rng: jax.Array, image_shape: tuple[int, ...] = (1, 32, 32, 3)) -> dict:
  """Random variables {"params", "batch_stats"} of `model` (float32), as `model.init` gives them.

  The draws of `jax.jit(model.init)(rng, zeros(image_shape))` (normal-distributed kernels may
  differ in the last bit), compiled faster: on CPU, XLA's optimisation of the ~100 unrolled
  threefry random-bit generators dominates (measured on the 2-core dev machine at width 1/32:
  about 40 s at the default level against 10 s at level 0), and this function runs once.
  Parameter shapes do not depend on the image size, so a small `image_shape` [1, H, W, 3]
  suffices.
  """
  images = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
  lowered = jax.jit(model.init).lower(rng, images)
  if jax.default_backend() == "cpu":
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
  else:
    compiled = lowered.compile()
  return dict(compiled(rng, jnp.zeros(image_shape, jnp.float32)))
