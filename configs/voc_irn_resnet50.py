"""IRN on PASCAL VOC 2012 + SBD with ResNet-50: the recipe of IRN's run_sample.py, every value
named.

IRN (Ahn, Cho & Kwak, CVPR 2019; github jiwoon-ahn/irn) replaces AffinityNet by an inter-pixel
relation network: a class-boundary map on a frozen ResNet-50, affinities of one minus the
strongest boundary between two positions, and the walk at stride 4 (docs/method.md §11).
Sources: run_sample.py's argument defaults and the step/*.py files they feed, named per key.
The data, the canvas and the evaluation come from configs/voc_resnet38.py (loaded below).

Usage:
  affinity-jax convert torchvision resnet50-19c8e357.pth runs/imagenet_resnet50
  affinity-jax run --config voc_irn_resnet50 --workdir runs/voc_irn \
      --config.data.manual_dir=/path/to/downloads --config.init.backbone=runs/imagenet_resnet50
  affinity-jax run --config voc_irn_resnet50:tiny ...   # a few steps, to check a set-up

Stages: train_cam (IRN's CAM network), infer_cam (IRN's CAMs: full resolution and stride 4),
aff_labels (IRN's confident-region labels), train_aff (the relation network), random_walk
(IRN's walk and labels), train_seg and infer_seg (a segmentation network on ResNet-50 at
stride 8, models.ResNet50SegNet, with configs/voc_resnet38.py's recipe: IRN stops at the pseudo
labels and its paper trains DeepLab on them), evaluate.
"""

import importlib.util
import os

import ml_collections


def _voc_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc_resnet38.py")
  spec = importlib.util.spec_from_file_location("_voc_resnet38_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  c = _voc_config()
  c.workdir = "runs/voc_irn_resnet50"
  c.method = "irn"
  c.model.backbone = "resnet50"
  # torchvision's ImageNet ResNet-50 (IRN: resnet50(pretrained=True)), converted by
  # `affinity-jax convert torchvision`; IRN never trains conv1, bn1, layer1 and layer2
  # (net/resnet50_cam.py) and no BatchNorm statistics.
  c.init.backbone = ""
  c.init.freeze_stem = True
  c.init.from_cam_net = False  # IRN's relation network starts from ImageNet too.

  # step/train_cam.py: --cam_batch_size 16, --cam_num_epoches 5, --cam_learning_rate 0.1,
  # --cam_weight_decay 1e-4, --cam_crop_size 512; VOC12ClassificationDataset(resize_long=(320,
  # 640), hor_flip=True, crop_method="random"), no colour jitter; PolyOptimizer: SGD whose
  # momentum is the weight decay (its positional argument) and poly power 0.9, the classifier
  # at 10 x the learning rate.
  c.cam.update(dict(batch_size=16, epochs=5, lr=0.1, weight_decay=1e-4, poly_power=0.9,
                    momentum_quirk=True, optimizer="sgd", crop_size=512, resize_long=(320, 640),
                    color_jitter=()))
  # step/make_cam.py: --cam_scales (1.0, 0.5, 1.5, 2.0), each with its flip.
  c.cam_infer.scales = (1.0, 0.5, 1.5, 2.0)
  # step/cam_to_ir_label.py: --conf_fg_thres 0.30, --conf_bg_thres 0.05 (dCRF on each).
  c.aff_labels = ml_collections.ConfigDict(dict(fg_threshold=0.30, bg_threshold=0.05,
                                                workers=0))  # 0 = one per CPU core.
  # step/train_irn.py: the relation network. --irn_batch_size 32, --irn_num_epoches 3,
  # --irn_learning_rate 0.1 (boundary branch x1, displacement branch x10), --irn_weight_decay
  # 1e-4, --irn_crop_size 512; VOC12AffinityDataset(rescale=(0.5, 1.5), hor_flip=True,
  # crop_method="random"), no colour jitter; PathIndex(radius=10) on the stride-4 grid: IRN's
  # pair set, "psa" here (geometry.py). PolyOptimizer as above.
  c.aff = ml_collections.ConfigDict(dict(
      batch_size=32, epochs=3, lr=0.1, weight_decay=1e-4, poly_power=0.9,
      momentum_quirk=True, momentum=0.9, optimizer="sgd", pretrained_lr_mult=1.0, crop_size=512,
      scale_range=(0.5, 1.5), color_jitter=(), radius=10, scheme="psa",
      image_scale=1.0,  # IRN: the image as it is (the relation network, its mean shift, the walk).
      # The relation network's heads' width multiplier, apart from the backbone's
      # (model.width); 0: model.width (IRN: both 1.0).
      head_width=0.0,
      checkpoint_every=500, log_every=20, steps=-1,
      # Not IRN's: every N steps TensorBoard ({workdir}/aff_net/logs) gets the boundary map of
      # 4 fixed training images; 0: none.
      image_every=500,
  ))
  # step/make_sem_seg_labels.py: --beta 10, --exp_times 8 (2^8 steps), radius 5
  # (indexing.propagate_to_edge), --sem_seg_bg_thres 0.25; no dCRF.
  c.random_walk.update(dict(beta=10.0, logt=8, radius=5, bg_threshold=0.25, crf=False,
                            tol=-1.0, batch_size=1))
  # step/make_ins_seg_labels.py (run_sample.py's --make_ins_seg_pass True): instance masks by
  # the same walk over each class's CAM within each group of the displacement field's
  # centroids, --ins_seg_bg_thres 0.25 (affinity_jax/instances.py); False: none.
  c.random_walk.update(dict(instances=True, instance_bg_threshold=0.25))
  # step/eval_cam.py: --cam_eval_thres 0.15, the constant background of CAM-only label maps
  # (PSA's is 0.2): what cam_pred/ holds and the CAM row of the table is scored with.
  c.eval.cam_background = 0.15
  # The segmentation network (not IRN's): the seg and seg_infer sections of
  # configs/voc_resnet38.py, on models.ResNet50SegNet.

  if arg == "tiny":  # checks a set-up end to end in minutes; numbers are meaningless.
    for net in (c.cam, c.aff, c.seg):
      net.steps, net.batch_size, net.crop_size, net.checkpoint_every = 4, 2, 64, 2
    c.model.width = 0.0625
    c.cam.resize_long = (48, 96)
    c.cam.image_every = c.aff.image_every = 0  # no TensorBoard pictures (an extra compile each)
    c.cam_infer.scales = (1.0,)
    c.seg_infer.scales = (1.0,)
    c.aff.radius = 5  # IRN's pair set at radius 10 needs a 76-px crop
    # lr 0.1 sends a randomly initialised CAM network to NaN within 4 steps (measured on the
    # generated VOC tree); with --config.init.backbone the recipe's 0.1 is the one to check.
    c.cam.lr = c.aff.lr = 0.01
    c.init.from_cam_net = True  # without --config.init.backbone (pass it for a real check)
    c.random_walk.logt = 4
  elif arg:
    raise ValueError(f"configs/voc_irn_resnet50.py: unknown variant {arg!r} (known: tiny)")
  return c
