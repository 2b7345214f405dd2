"""Weights shipped with the package.

`SYNTHETIC_RESNET38`: the backbone of the synthetic demo's narrow ResNet-38 (width 1/16), the
synthetic world's stand-in for the ImageNet weights the original starts from. It was pretrained
on a separate synthetic world (shapes of 12 hues and neutral ones on cluttered backgrounds, no
image of the WSSS dataset) by `SYNTHETIC_RESNET38_COMMAND`, and is a checkpoint folder in the
format `affinity-jax convert mxnet` writes, so `init.backbone` loads it as it loads ImageNet
weights: `configs/synthetic.py` (the demo) starts every network from it (experiments/RESULTS.md,
"A pretrained backbone for the synthetic world" and "The demo on the original's recipe").
`SYNTHETIC_RESNET38_SHA256` is `folder_digest` of the folder as shipped.
"""

from __future__ import annotations

import hashlib
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

SYNTHETIC_RESNET38 = os.path.join(_HERE, "synthetic_resnet38")
SYNTHETIC_RESNET38_COMMAND = ("python experiments/pretrain_backbone.py "
                              "--out affinity_jax/pretrained/synthetic_resnet38 --steps 1200")
SYNTHETIC_RESNET38_SHA256 = "954a625b0f276fd6594529c20eae4df693b64df28d8d0614c578969c80c39502"


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
