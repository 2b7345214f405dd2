"""Networks of the pipeline (Flax linen, NHWC) and what the trainer needs to know about them.

Three backbones (`model.backbone`): the original's ResNet-38 (the default) and VGG-16, and
IRN's ResNet-50 (its backbone, CAM network and inter-pixel relation network).
- `ResNet38`: the backbone alone (taps conv4 / conv5 / conv6 at stride 8).
- `CAMNet`, `AffinityNet`, `SegNet`: backbone + head; `build(arch, ..., backbone=)` picks one by
  name, `from_config(cfg, arch)` with the config's `model` section. `VGG16*`: the same on VGG-16.
- `ResNet50` (taps conv1, stage1..stage4), `ResNet50CAMNet` (IRN's CAM network, stride 16),
  `RelationNet` (IRN's boundary and displacement network on the frozen ResNet-50, stride 4;
  arch "relation", no num_classes), `ResNet50SegNet` (the trunk at stride 8, dilated, with the
  segmentation head of the other backbones).
- `param_labels(params)`: the original's (IRN's for ResNet-50) frozen set and learning-rate
  groups.
- `normalize_images`: RGB in [0, 255] -> the input a backbone expects (`input_convention`);
  `denormalize_images` back, for pictures.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from affinity_jax.constants import (ARCHS, BACKBONES, CAFFE_MEAN_RGB, IMAGENET_MEAN,
                                    IMAGENET_STD, INPUT_CONVENTIONS)
from affinity_jax.errors import ConfigError
from affinity_jax.models import relation_net, resnet38, resnet50
from affinity_jax.models.heads import AffinityNet, CAMNet, SegNet
from affinity_jax.models.relation_net import RelationNet
from affinity_jax.models.resnet38 import BLOCKS, FrozenBatchNorm, ResNet38, BlockSpec, scaled
from affinity_jax.models.resnet50 import ResNet50, ResNet50CAMNet, ResNet50SegNet
from affinity_jax.models.vgg16 import (VGG16, VGG16AffinityNet, VGG16CAMNet, VGG16SegNet,
                                       TRUNK_CONVS)

__all__ = ["ResNet38", "CAMNet", "AffinityNet", "SegNet", "FrozenBatchNorm", "BlockSpec",
           "BLOCKS", "VGG16", "VGG16CAMNet", "VGG16AffinityNet", "VGG16SegNet", "TRUNK_CONVS",
           "ResNet50", "ResNet50CAMNet", "ResNet50SegNet", "RelationNet", "IRN_FROZEN_MODULES",
           "IRN_BACKBONE_MODULES", "RESNET50_MODULES",
           "ARCHS", "BACKBONES", "DEFAULT_BACKBONE", "IMAGENET_MEAN", "IMAGENET_STD",
           "FROZEN_MODULES", "NEW_MODULES", "backbone_name", "build", "calibrate_batch_norm",
           "denormalize_images", "from_config", "init_variables", "input_convention",
           "normalize_images", "param_labels", "scaled"]

# ARCHS and BACKBONES (constants.py): checkpoints without a "backbone" record predate VGG-16
# and hold ResNet-38.
DEFAULT_BACKBONE = "resnet38"
_NETWORKS = {
    "resnet38": {"backbone": ResNet38, "cam": CAMNet, "affinity": AffinityNet, "seg": SegNet},
    "vgg16": {"backbone": VGG16, "cam": VGG16CAMNet, "affinity": VGG16AffinityNet,
              "seg": VGG16SegNet},
    "resnet50": {"backbone": ResNet50, "cam": ResNet50CAMNet, "relation": RelationNet,
                 "seg": ResNet50SegNet},
}

# The original never trains the stem and the first stage: ResNet-38's conv1a, b2, b2_1, b2_2,
# VGG-16's conv1_* and conv2_* (vgg16_cls.py / vgg16_aff.py `not_training`, weights and
# biases). No BN at all: those live in 'batch_stats', outside params.
FROZEN_MODULES = frozenset({"conv1a", "b2", "b2_1", "b2_2",
                            "conv1_1", "conv1_2", "conv2_1", "conv2_2"})
# Layers trained from scratch (lr x10 / x20 in the original's groups; IRN's classifier x10).
NEW_MODULES = frozenset({"fc8", "f8_3", "f8_4", "f8_5", "f9", "seg_conv1", "seg_conv2",
                         "classifier"})
# IRN's CAM network on ResNet-50 (net/resnet50_cam.py, step/train_cam.py): Net.train sets
# requires_grad False on conv1 and bn1, and Net.forward detaches stage2's output, so layer1 and
# layer2 never get a gradient either (and torch's SGD skips parameters without one, weight decay
# included): all frozen. train_cam.py's groups are then the backbone (layer3, layer4: conv
# kernels and BatchNorm weight and bias alike) at lr x1 with weight decay and the classifier at
# lr x10 with weight decay (cam_learning_rate 0.1, cam_weight_decay 1e-4 in run_sample.py; its
# PolyOptimizer passes the decay to SGD's momentum slot too, as PSA's does): "pretrained_weight"
# and "new_weight" for every leaf, biases included.
IRN_FROZEN_MODULES = frozenset({"conv1", "bn1"} | {
    name for name in resnet50.block_names() if name.startswith(("layer1_", "layer2_"))})
IRN_BACKBONE_MODULES = frozenset(resnet50.block_names()) - IRN_FROZEN_MODULES
RESNET50_MODULES = IRN_FROZEN_MODULES | IRN_BACKBONE_MODULES
# IRN's relation network (net/resnet50_irn.py, step/train_irn.py): the backbone is never trained
# (Net.train keeps it in eval mode, forward detaches every level, and only the heads are
# given to the optimiser), so all of RESNET50_MODULES is frozen there, layer3 and layer4
# included. Its two groups, both with weight decay (irn_weight_decay 1e-4): the boundary branch
# (edge_layers: fc_edge1..6, GroupNorm scale and bias and fc_edge6's bias included) at lr x1,
# "pretrained_weight", and the displacement branch (dp_layers: fc_dp1..7) at lr x10,
# "new_weight". Its mean shift is in batch_stats, never trained.


def normalize_images(images: Any, convention: str = "imagenet") -> jax.Array:
  """images: [..., 3] RGB, uint8 or float in [0, 255] -> float32 network input, as
  data.transforms.normalize: "imagenet" (x / 255 - mean) / std, "caffe_bgr" BGR minus the mean
  pixel."""
  if convention == "caffe_bgr":
    x = jnp.asarray(images, jnp.float32)[..., ::-1]
    return x - jnp.asarray(CAFFE_MEAN_RGB[::-1], jnp.float32)
  if convention != "imagenet":
    raise ValueError(f"unknown input convention {convention!r}: expected one of "
                     f"{', '.join(INPUT_CONVENTIONS)}")
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def denormalize_images(images: Any, convention: str = "imagenet") -> np.ndarray:
  """The inverse of `normalize_images`, for looking at network inputs: [..., 3] float network
  input -> uint8 RGB numpy [..., 3] (rounded, clipped to 0..255)."""
  x = np.asarray(images, np.float32)
  if convention == "caffe_bgr":
    x = (x + np.asarray(CAFFE_MEAN_RGB[::-1], np.float32))[..., ::-1]
  elif convention == "imagenet":
    x = (x * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)) * 255
  else:
    raise ValueError(f"unknown input convention {convention!r}: expected one of "
                     f"{', '.join(INPUT_CONVENTIONS)}")
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def build(arch: str, num_classes: int = 20, width: float = 1.0, dtype: Any = jnp.float32,
          backbone: str = DEFAULT_BACKBONE, head_width: float | None = None):
  """A network by name: "backbone" (ResNet38 / VGG16 / ResNet50), "cam" (CAMNet / VGG16CAMNet /
  ResNet50CAMNet), "affinity" (AffinityNet / VGG16AffinityNet), "seg" (SegNet / VGG16SegNet /
  ResNet50SegNet), "relation" (RelationNet, IRN's), on `backbone` ("resnet38", "vgg16" or
  "resnet50": no affinity; relation only). num_classes is ignored by the networks without classes
  (backbone, affinity, relation); head_width (None: width) is the relation network's heads'
  width, ignored by the others."""
  if not width > 0:
    raise ValueError(f"model width must be positive, got {width!r}")
  if backbone not in _NETWORKS:
    raise ValueError(f"unknown backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
  if arch not in ARCHS:
    raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")
  if arch not in _NETWORKS[backbone]:
    raise ValueError(f"no {arch!r} network on {backbone} yet: {backbone} has only "
                     f"{', '.join(_NETWORKS[backbone])}")
  network = _NETWORKS[backbone][arch]
  if arch == "relation":
    return network(width=width, dtype=dtype, head_width=head_width)
  if arch in ("backbone", "affinity"):
    return network(width=width, dtype=dtype)
  return network(num_classes=num_classes, width=width, dtype=dtype)


def backbone_name(cfg) -> str:
  """The config's `model.backbone` ("resnet38" where the config has no such key), checked."""
  name = cfg.model.get("backbone", DEFAULT_BACKBONE)
  if name not in BACKBONES:
    raise ConfigError(f"config key model.backbone: unknown backbone {name!r} (use "
                      f"{' or '.join(BACKBONES)})")
  return name


def input_convention(cfg) -> str:
  """How the config's backbone wants its images normalised (data.transforms.normalize)."""
  return BACKBONES[backbone_name(cfg)]


def from_config(cfg, arch: str):
  """`build(arch)` with the backbone, sizes and dtype of the config's `model` section, checked."""
  backbone = backbone_name(cfg)
  try:
    dtype = jnp.dtype(cfg.model.dtype)
  except TypeError:
    raise ConfigError(f"config key model.dtype: unknown dtype {cfg.model.dtype!r} "
                      "(use float32 or bfloat16)") from None
  if not cfg.model.width > 0:
    raise ConfigError(f"config key model.width must be > 0, got {cfg.model.width!r}")
  if arch not in _NETWORKS[backbone]:
    raise ConfigError(f"config key model.backbone: there is no {arch!r} network on {backbone} "
                      f"yet (it has {', '.join(_NETWORKS[backbone])})")
  # Imported here: the networks run without ml_collections (benchmark_models.py on a GPU
  # machine), which config.py needs.
  from affinity_jax import config  # pylint: disable=g-import-not-at-top
  return build(arch, num_classes=cfg.model.num_classes, width=cfg.model.width, dtype=dtype,
               backbone=backbone, head_width=config.head_width(cfg))


def param_labels(params: Any) -> Any:
  """A pytree like `params` of group labels for `optax.multi_transform`, any backbone.

  "frozen" (conv1a, b2, b2_1, b2_2; conv1_*, conv2_*: never updated), "pretrained_weight" /
  "pretrained_bias" (the rest of the backbone), "new_weight" / "new_bias" (heads trained from
  scratch). VGG-16 AffinityNet's GroupNorms (gn8_*) count as pretrained, as in the original's
  get_parameter_groups (its from_scratch_layers are f8_* and f9 only): scale x1 with decay,
  bias x2 without. ResNet-50 has IRN's groups. Its CAM network (IRN_FROZEN_MODULES): conv1,
  bn1, layer1_*, layer2_* frozen, layer3_* and layer4_* "pretrained_weight" (BatchNorm biases
  included), classifier "new_weight". Its relation network (told by its heads, fc_edge* /
  fc_dp*): the whole backbone frozen, the boundary branch "pretrained_weight" and the
  displacement branch "new_weight", every leaf (biases, GroupNorm scale and bias) included.
  """
  flat = traverse_util.flatten_dict(params)
  relation = any(path[0] in relation_net.BOUNDARY_MODULES | relation_net.DISPLACEMENT_MODULES
                 for path in flat)
  labels = {}
  for path in flat:
    top, leaf = path[0], path[-1]
    if relation and top in relation_net.BOUNDARY_MODULES:
      labels[path] = "pretrained_weight"
    elif relation and top in relation_net.DISPLACEMENT_MODULES:
      labels[path] = "new_weight"
    elif (top in FROZEN_MODULES or top in IRN_FROZEN_MODULES
          or (relation and top in RESNET50_MODULES)):
      labels[path] = "frozen"
    elif top in IRN_BACKBONE_MODULES:
      labels[path] = "pretrained_weight"
    else:
      group = "new" if top in NEW_MODULES else "pretrained"
      labels[path] = f"{group}_{'bias' if leaf == 'bias' else 'weight'}"
  return traverse_util.unflatten_dict(labels)


def calibrate_batch_norm(model, variables: dict, images) -> dict:
  """resnet38.calibrate_batch_norm; VGG-16 has no BatchNorm, so its variables are returned."""
  if not variables.get("batch_stats"):
    return variables
  return resnet38.calibrate_batch_norm(model, variables, images)


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
