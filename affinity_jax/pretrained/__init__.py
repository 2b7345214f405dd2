"""Weights shipped with the package: the synthetic world's stand-ins for ImageNet.

`SYNTHETIC_RESNET38`: the backbone of the synthetic demo's narrow ResNet-38 (width 1/16);
`SYNTHETIC_RESNET50`: the backbone of the synthetic IRN demo's narrow ResNet-50 (width 1/16,
IRN's strides). Both were pretrained on a separate synthetic world (shapes of 12 hues and neutral
ones on cluttered backgrounds, no image of the WSSS dataset) by their `*_COMMAND`, and are
checkpoint folders in the format `affinity-jax convert mxnet` / `convert torchvision` write, so
`init.backbone` loads them as it loads ImageNet weights: `configs/synthetic.py` (the demo) and
`configs/synthetic_irn.py` start every network from them (experiments/RESULTS.md, "A pretrained
backbone for the synthetic world", "The demo on the original's recipe" and "IRN's pipeline on
the synthetic data"). `*_SHA256` is `folder_digest` of each folder as shipped.
"""

from __future__ import annotations

import hashlib
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

SYNTHETIC_RESNET38 = os.path.join(_HERE, "synthetic_resnet38")
SYNTHETIC_RESNET38_COMMAND = ("python experiments/pretrain_backbone.py "
                              "--out affinity_jax/pretrained/synthetic_resnet38 --steps 1200")
SYNTHETIC_RESNET38_SHA256 = "954a625b0f276fd6594529c20eae4df693b64df28d8d0614c578969c80c39502"

SYNTHETIC_RESNET50 = os.path.join(_HERE, "synthetic_resnet50")
SYNTHETIC_RESNET50_COMMAND = ("python experiments/pretrain_backbone.py --backbone resnet50 "
                              "--out affinity_jax/pretrained/synthetic_resnet50 --steps 2400")
SYNTHETIC_RESNET50_SHA256 = "3b19b3c31567f9e79bbae8e254bcfaffa469361cebb191cbc31d8d0f146388d7"


def folder_digest(path: str) -> str:
  """sha256 over a folder's files: each file's path relative to `path`, then its bytes, in
  sorted order (folders walked in sorted order)."""
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      digest.update(os.path.relpath(full, path).replace(os.sep, "/").encode())
      with open(full, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()
