"""PSA on PASCAL VOC 2012 + SBD with VGG-16: the original's VGG-16 recipe, every value named.

The recipe of configs/voc_resnet38.py (loaded below: the data, the CAM inference, the affinity
labels, AffinityNet, the random walk and the segmentation network are the same scripts with the
same defaults for both backbones) with what differs for VGG-16, each with its source
(docs/method.md; the original's README, train_cls.py, train_aff.py, network/vgg16*.py):
- the backbone: network/vgg16d.py (fc-reduced VGG-16, output stride 8) under the CAM network
  (vgg16_cls.py: fc8 without bias, CAM = sqrt(relu(fc8))), AffinityNet (vgg16_aff.py: fc6
  dilated by 4, GroupNorm heads) and the segmentation network (SegNet's head on fc7);
- its input: BGR minus the Caffe mean pixel (vgg16d.py `Normalize`), chosen by model.backbone;
- its ImageNet weights: DeepLab's vgg16_20M.caffemodel (README, "Prerequisite"), converted
  without Caffe by `affinity-jax convert caffe vgg16_20M.caffemodel DIR`;
- frozen conv1_* and conv2_* (vgg16_cls.py / vgg16_aff.py `not_training`), init.freeze_stem;
- the CAM network's learning rate 0.1: the README's command (`--lr 0.1`) and train_cls.py's
  default, whose default network is vgg16_cls (the ResNet-38 config departs from it, not this).
- AffinityNet's learning rate 0.1 (train_aff.py's default and the README's command; the
  ResNet-38 config uses 0.01 for it, psa #8, #18).
Everything else (batch 16 / 15 epochs / crop 448 for the CAM network, batch 8 / 8 epochs for
AffinityNet, weight decay 5e-4, the poly schedule and the four groups; alpha 4 / 16 / 32,
beta 8, t = 256) is the same for both backbones in the README and the scripts. The segmentation
network is not in the original repository; its section is configs/voc_resnet38.py's.

Usage:
  affinity-jax convert caffe vgg16_20M.caffemodel runs/vgg16_20M
  affinity-jax run --config configs/voc_vgg16.py --workdir runs/voc_vgg16 \
      --config.data.manual_dir=/path/to/downloads --config.init.backbone=runs/vgg16_20M
  affinity-jax run --config configs/voc_vgg16.py:tiny   # every stage in minutes, on the
                                                        # built-in synthetic data
"""

import importlib.util
import os


def _load(name: str, arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
  spec = importlib.util.spec_from_file_location(f"_{name[:-3]}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  c = _load("voc_resnet38.py")
  c.workdir = "runs/voc_vgg16"
  c.model.backbone = "vgg16"
  # The converted vgg16_20M.caffemodel (see Usage); "" = random init (only for tests).
  c.init.backbone = ""
  c.cam.lr = 0.1  # README `--lr 0.1`; train_cls.py default.
  c.aff.lr = 0.1  # README `--lr 0.1`; train_aff.py default.

  if arg == "tiny":  # checks the set-up end to end; numbers are meaningless.
    # Nothing to download: the synthetic dataset's tiny variant (64x64 images, 3 classes,
    # 16 train / 8 val), as configs/synthetic.py:tiny reads it.
    synthetic = _load("synthetic.py", "tiny")
    c.data = synthetic.data
    c.model.num_classes = synthetic.model.num_classes
    c.model.width = 0.0625
    for net in (c.cam, c.aff, c.seg):
      net.update(dict(steps=3, batch_size=2, crop_size=48, checkpoint_every=2, log_every=1))
    c.cam.resize_long = (48, 64)
    c.cam.image_every = c.aff.image_every = 0  # no TensorBoard pictures (an extra compile each)
    # A 64-px image has an 8x8 grid, narrower than the original's pair set needs (9 columns at
    # radius 5): every pair within the radius instead.
    c.aff.scheme = c.random_walk.scheme = "full"
    c.cam_infer.update(dict(scales=(1.0, 0.5), batch_size=2))
    c.random_walk.update(dict(logt=4, batch_size=2))
    c.seg_infer.update(dict(scales=(1.0,), crf=False, batch_size=2))
    c.eval.update(dict(cam_splits=("train",), seg_splits=("val",), panels=1))
  elif arg:
    raise ValueError(f"configs/voc_vgg16.py: unknown variant {arg!r} (known: tiny)")
  return c
