"""Atomic file writes (and checked reads) under every output of the pipeline.

Every file a stage produces goes through `atomic_write`: the bytes land in a temporary file in
the destination folder, are flushed to disk, and are renamed into place. A stage killed at any
point therefore leaves only complete files, and a rerun can trust that a file which exists is
whole (it only has to redo what is missing). What each stage writes, and where, is
artifacts.py's business; this module only knows bytes, arrays and images.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np

from affinity_jax.errors import UserError

_TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
  """Opens a temporary file beside `path`; renames it to `path` only if the block succeeds."""
  path = os.fspath(path)
  folder = os.path.dirname(path) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=folder)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """Writes a compressed .npz atomically."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  atomic_write(path, buf.getvalue())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .npz written by `save_npz`, with an error naming the file if it is unreadable."""
  try:
    with np.load(os.fspath(path), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except FileNotFoundError:
    raise
  except Exception as e:  # zipfile / pickle / value errors all mean the same to a user.
    raise UserError(f"{os.fspath(path)}: not a readable .npz file ({e}); delete it and rerun "
                    "the stage that writes it") from e


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes a uint8 [H, W] or [H, W, 3] array as PNG atomically."""
  from PIL import Image  # Pillow is a dependency; imported lazily to keep `import` light.
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"{os.fspath(path)}: PNG output must be uint8, got {array.dtype}")
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  atomic_write(path, buf.getvalue())


def load_png(path: str | os.PathLike) -> np.ndarray:
  from PIL import Image
  try:
    with Image.open(os.fspath(path)) as im:
      return np.asarray(im)
  except FileNotFoundError:
    raise
  except Exception as e:
    raise UserError(f"{os.fspath(path)}: not a readable PNG ({e})") from e


def save_json(path: str | os.PathLike, obj: Mapping[str, Any]) -> None:
  atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_text(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, text.encode())


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
  """Deletes temporary files a killed writer left in `folder`; returns how many."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    return 0
  n = 0
  for name in os.listdir(folder):
    if name.startswith(_TMP_PREFIX):
      with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, name))
        n += 1
  return n
