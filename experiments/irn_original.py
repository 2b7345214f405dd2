"""IRN (github jiwoon-ahn/irn), the successor of PSA, as the experiments run it beside ours.

- `check_irn_root`: the checkout, or ValueError naming the folder and what is missing;
- `load_irn`: imports its modules from the checkout, files not edited (`load_instance_step`:
  its instance step). On the CPU
  `torch.Tensor.cuda` becomes the identity in this process only, because its walk
  (misc/indexing.py: edge_to_affinity, affinity_sparse2dense) moves tensors with `.cuda()`.
Nothing here imports torch or JAX at module level, so argument checks run without them.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings

REQUIRED_FILES = ("misc/indexing.py", "net/resnet50.py", "net/resnet50_cam.py",
                  "net/resnet50_irn.py", "step/make_sem_seg_labels.py")


def check_irn_root(path: str) -> str:
  """The checkout of IRN, or ValueError naming the folder and what is missing."""
  if not os.path.isdir(path):
    raise ValueError(f"--irn-root {path!r}: no such folder (expected a checkout of "
                     "github.com/jiwoon-ahn/irn)")
  missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise ValueError(f"--irn-root {path!r} is not a checkout of jiwoon-ahn/irn: missing "
                     f"{', '.join(missing)}")
  return os.path.abspath(path)


def load_irn(irn_root: str, threads: int | None = None) -> types.SimpleNamespace:
  """IRN's modules from its checkout (misc.indexing for now), with torch, on the CPU."""
  import torch
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.set_num_threads(threads or os.cpu_count() or 1)
  # affinity_sparse2dense builds its matrix with the legacy sparse.FloatTensor constructor.
  warnings.filterwarnings("ignore", message=r"torch\.sparse\.SparseTensor")
  warnings.filterwarnings("ignore", message=r"Sparse invariant checks")
  sys.path.insert(0, check_irn_root(irn_root))
  indexing = importlib.import_module("misc.indexing")
  return types.SimpleNamespace(torch=torch, indexing=indexing, root=check_irn_root(irn_root))


def load_instance_step(irn: types.SimpleNamespace):
  """IRN's step/make_ins_seg_labels.py (its centroid, cluster and detection functions), or
  ImportError naming what it needs (scikit-image, imageio, pydensecrf: its imports). Its
  misc/pyutils.py names `np.bool` as a default argument, which NumPy 1.24-1.26 lack: there the
  alias is put back (to `bool`, what it was) in this process only."""
  import numpy as np
  if not hasattr(np, "bool"):
    np.bool = bool
  here = os.getcwd()
  os.chdir(irn.root)  # voc12/dataloader.py reads voc12/cls_labels.npy, relative, on import
  try:
    return importlib.import_module("step.make_ins_seg_labels")
  finally:
    os.chdir(here)


def dense_walk_cost(h: int, w: int, exp_times: int = 8) -> dict:
  """What IRN's `propagate_to_edge` holds and computes on an h x w grid (N = hw positions):
  while T is squared, four N x N float32 matrices are alive (the cropped affinity matrix, its
  power A^beta, T and the product), and each of the `exp_times` squarings is 2 N^3 FLOP."""
  n = h * w
  return {"positions": n, "peak_bytes": 4 * 4 * n * n, "flop": exp_times * 2 * n ** 3}
