"""PSA on PASCAL VOC 2012 + SBD with ResNet-38: the original's recipe, every value named.

Sources (docs/method.md, section by section): the paper (Ahn & Kwak, CVPR 2018) and the PyTorch
original's defaults (train_cls.py, infer_cls.py, train_aff.py, infer_aff.py).

Usage:
  affinity-jax run --config configs/voc_resnet38.py --workdir runs/voc \
      --config.data.manual_dir=/path/to/downloads --config.init.backbone=runs/ilsvrc_resnet38
  affinity-jax run --config configs/voc_resnet38.py:tiny ...   # a few steps, to check a set-up
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "psa" (AffinityNet, this file) or "irn" (IRN's relation network: configs/voc_irn_resnet50.py).
  # Each has its own backbones (config.validate), so model.backbone records the choice.
  c.method = "psa"
  c.workdir = "runs/voc_resnet38"
  # Multi-process runs (README, "Running on a TPU pod slice / GPU cluster"): True joins the run
  # that the cluster's environment describes (Cloud TPU, SLURM, Open MPI); `affinity-jax run
  # --coordinator ...` and `affinity-jax launch` do it without this key.
  c.distributed = False
  c.barrier_timeout_s = 3600.0  # longest wait for the other processes (e.g. at a stage's end)
  c.heartbeat_timeout_s = 100   # a process silent this long is dead; the others then stop
  c.debug_nans = False
  # When a stage's inputs (the config keys it reads, the dataset, the stages it consumes)
  # differ from those its existing outputs were made from: "error" stops with the changed keys,
  # "redo" deletes those outputs and everything made from them and redoes the stage, "keep"
  # adopts them as they are (e.g. to continue a training with a changed learning rate).
  c.on_change = "error"

  c.data = ml_collections.ConfigDict(dict(
      name="voc2012_aug",
      data_dir="",          # tfds data dir; "" = tfds default (~/tensorflow_datasets).
      manual_dir="",        # holds VOCdevkit/ and benchmark_RELEASE/ (see README).
      options={},
      train_split="train_aug",   # 10,582 images: VOC train + SBD train/val - VOC val.
      pseudo_splits=("train_aug",),  # CAMs, affinity labels and pseudo labels are made here.
      canvas=(512, 512),    # every VOC image (at most 500x500) fits; inference pads to it.
      shuffle_buffer=1024,
  ))
  c.model = ml_collections.ConfigDict(dict(
      num_classes=20, width=1.0,
      dtype="float32",      # "bfloat16" for TPU/GPU compute; parameters stay float32.
  ))
  c.init = ml_collections.ConfigDict(dict(
      # The ImageNet ResNet-38 converted by `affinity-jax convert mxnet
      # ilsvrc-cls_rna-a1_cls1000_ep-0001.params DIR`; "" = random init (only for tests).
      backbone="",
      # The original freezes conv1a, b2, b2_1, b2_2 (pretrained on ImageNet).
      freeze_stem=True,
      # Start AffinityNet and the segmentation network from the trained CAM network's backbone
      # (for from-scratch runs; the original starts both from ImageNet).
      from_cam_net=False,
  ))

  # Classification network (train_cls.py).
  c.cam = ml_collections.ConfigDict(dict(
      batch_size=16, epochs=15,
      # The original's scripts default to 0.1. A user found that loss rises at 0.1 and falls at
      # 0.01 with ResNet-38 (psa issue #8, asking about train_cls.py and train_aff.py); the
      # author answered that the tutorial's learning rate is only for VGG-16. ResNet-38
      # reproductions use 0.01 (psa #9, #18).
      lr=0.01, weight_decay=5e-4, poly_power=0.9,
      momentum_quirk=True,  # the original runs SGD with momentum = weight decay (5e-4).
      momentum=0.9,         # used only with momentum_quirk=False.
      optimizer="sgd",      # the original's; "adam" only for from-scratch runs.
      # The pretrained layers' learning rates are lr x (1 weights, 2 biases) x this; the new
      # layer's lr x (10, 20). 1 is the original's.
      pretrained_lr_mult=1.0,
      crop_size=448, resize_long=(256, 512),
      color_jitter=(0.3, 0.3, 0.3, 0.1),  # brightness, contrast, saturation, hue.
      checkpoint_every=500, log_every=20, steps=-1,  # steps > 0 overrides epochs.
      # Not the original's: every N steps (and at steps 1 and the last) TensorBoard
      # ({workdir}/cam_net/logs) gets the CAMs of 4 fixed training images; 0: none.
      image_every=500,
  ))
  # CAM inference (infer_cls.py): scales, each with its flip.
  c.cam_infer = ml_collections.ConfigDict(dict(scales=(1.0, 0.5, 1.5, 2.0), batch_size=1))
  # Affinity labels from dCRF on (bg, classes) with two background powers.
  c.aff_labels = ml_collections.ConfigDict(dict(alpha_low=4.0, alpha_high=32.0, crf_iters=10,
                                                workers=0))  # 0 = one per CPU core.
  # AffinityNet (train_aff.py).
  c.aff = ml_collections.ConfigDict(dict(
      batch_size=8, epochs=8,
      # 0.1 in train_aff.py, the VGG-16 value by the same answer (psa #8, see cam.lr above);
      # a ResNet-38 reproduction of AffinityNet used 0.01 and reached 59.1 val (psa #18).
      lr=0.01, weight_decay=5e-4, poly_power=0.9,
      momentum_quirk=True, momentum=0.9, optimizer="sgd", pretrained_lr_mult=1.0, crop_size=448,
      color_jitter=(0.3, 0.3, 0.3, 0.1), radius=5,
      scheme="psa",   # the original's pair set at 448/8 = 56; "full" adds the border pairs.
      # Images are resized by this factor for AffinityNet, in training and in the random walk
      # (the original: 1). > 1 gives small images a finer affinity grid (stride 8 / scale).
      image_scale=1.0,
      checkpoint_every=500, log_every=20, steps=-1,
      # Not the original's: every N steps (and at steps 1 and the last) TensorBoard
      # ({workdir}/aff_net/logs) gets the boundary map of the learned affinities (1 - mean
      # affinity to the neighbours) of 4 fixed training images; 0: none.
      image_every=500,
  ))
  # Random walk (infer_aff.py): A = W^beta, t = 2^logt steps, background (1-max)^alpha.
  c.random_walk = ml_collections.ConfigDict(dict(
      beta=8.0, logt=8, alpha=16.0, radius=5,
      scheme="psa",   # the original's pair set; "full" covers the border too.
      tol=-1.0,       # > 0: stop early once the largest change falls under it.
      # dCRF on the walked scores before they become the segmentation network's labels: the
      # paper's "CAM + RW + dCRF" (not in infer_aff.py, which stops at the argmax).
      crf=True, crf_iters=10,
      batch_size=1,
  ))
  # Segmentation network (the paper's; not in the original repository).
  c.seg = ml_collections.ConfigDict(dict(
      batch_size=16, epochs=30, lr=0.01, weight_decay=5e-4, poly_power=0.9,
      momentum_quirk=False, momentum=0.9, optimizer="sgd", pretrained_lr_mult=1.0,
      crop_size=448,
      scale_range=(0.7, 1.3),
      checkpoint_every=500, log_every=20, steps=-1,
  ))
  c.seg_infer = ml_collections.ConfigDict(dict(scales=(1.0, 0.75, 1.25), crf=True, batch_size=1))
  c.eval = ml_collections.ConfigDict(dict(
      cam_splits=("train",),  # CAM and CAM+RW quality is reported on VOC train (1,464).
      seg_splits=("val",),
      panels=8,               # picture panels written per split.
  ))

  if arg == "tiny":  # checks a set-up end to end in minutes; numbers are meaningless.
    for net in (c.cam, c.aff, c.seg):
      net.steps, net.batch_size, net.crop_size, net.checkpoint_every = 4, 2, 64, 2
    c.model.width = 0.0625
    c.cam.resize_long = (48, 96)
    c.cam.image_every = c.aff.image_every = 0  # no TensorBoard pictures (an extra compile each)
    c.cam_infer.scales = (1.0,)
    c.seg_infer.scales = (1.0,)
  elif arg:
    raise ValueError(f"configs/voc_resnet38.py: unknown variant {arg!r} (known: tiny)")
  return c
