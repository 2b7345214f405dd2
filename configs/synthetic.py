"""The embedded default: PSA on the procedurally generated `synthetic_wsss` dataset.

The recipe of configs/voc_resnet38.py (loaded below) scaled down so that every stage runs on a
2-core CPU in minutes: a narrow ResNet-38 (same code, `width` multiplier), small images, few
steps, no ImageNet initialisation. `make demo` runs this file.

Variants: `configs/synthetic.py:tiny` (a few images and steps; what the tests run).
"""

import importlib.util
import os


def _voc_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc_resnet38.py")
  spec = importlib.util.spec_from_file_location("_voc_resnet38_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  c = _voc_config()
  c.workdir = "runs/synthetic"
  c.data.name = "synthetic_wsss"
  c.data.options = {}
  c.data.train_split = "train"
  c.data.pseudo_splits = ("train", "val")
  c.data.canvas = (128, 128)
  c.data.shuffle_buffer = 256
  c.model.num_classes = 5
  c.model.width = 0.125

  c.cam.update(dict(batch_size=16, epochs=-1, steps=600, lr=0.05, crop_size=96,
                    resize_long=(96, 144), checkpoint_every=200, log_every=50))
  c.cam_infer.update(dict(scales=(1.0, 0.5, 1.5), batch_size=8))
  c.aff_labels.update(dict(workers=2))
  c.aff.update(dict(batch_size=8, epochs=-1, steps=300, lr=0.05, crop_size=96, scheme="full",
                    checkpoint_every=100, log_every=50))
  c.random_walk.update(dict(scheme="full", batch_size=8))
  c.seg.update(dict(batch_size=8, epochs=-1, steps=400, lr=0.02, crop_size=96,
                    checkpoint_every=200, log_every=50))
  c.seg_infer.update(dict(scales=(1.0,), crf=False, batch_size=8))
  c.eval.update(dict(cam_splits=("val",), seg_splits=("val",), panels=4))

  if arg == "tiny":
    c.data.options = {"config": "tiny"}   # 64x64 images, 3 classes, 16 train / 8 val.
    c.model.num_classes = 3
    c.model.width = 0.0625
    c.data.canvas = (64, 64)
    for net in (c.cam, c.aff, c.seg):
      net.update(dict(steps=3, batch_size=2, crop_size=48, checkpoint_every=2, log_every=1))
    c.cam.resize_long = (48, 64)
    c.cam_infer.update(dict(scales=(1.0, 0.5), batch_size=2))
    c.random_walk.update(dict(logt=4, batch_size=2))
    c.seg_infer.batch_size = 2
    c.eval.panels = 1
  elif arg:
    raise ValueError(f"configs/synthetic.py: unknown variant {arg!r} (known: tiny)")
  return c
