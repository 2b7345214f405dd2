"""Atomic file writes (and checked reads) under every output of the pipeline.

Every file a stage produces goes through `atomic_write`: the bytes land in a temporary file in
the destination folder, are flushed to disk, and are renamed into place. A stage killed at any
point therefore leaves only complete files, and a rerun can trust that a file which exists is
whole (it only has to redo what is missing). What each stage writes, and where, is
artifacts.py's business; this module only knows bytes, arrays and images.

A write that the disk refuses (full, over a quota or a file-size limit, read-only, not ours)
is the user's to fix: it becomes a `UserError` naming the file (`disk_error`), and the
temporary file is removed, so nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import tempfile
import zipfile
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from affinity_jax.errors import UserError

_TMP_PREFIX = ".tmp-"

_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
         errno.EFBIG: "a file-size limit, ulimit -f, is reached"}
_REFUSED = {errno.EROFS: "it is mounted read-only", errno.EACCES: "not writable for this user",
            errno.EPERM: "not writable for this user"}
# How tensorstore (orbax's writer) reports the OS error under its own ValueError.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")


def disk_error(path: str, e: BaseException) -> UserError | None:
  """The UserError naming `path` for a write the disk refused, or None for any other error.

  `e` is an OSError, or the ValueError of tensorstore that carries one as `os_error_code`.
  """
  code = e.errno if isinstance(e, OSError) else None
  if isinstance(e, ValueError):
    found = _TENSORSTORE_ERRNO.search(str(e))
    code = int(found.group(1)) if found else None
  if code in _FULL:
    return UserError(f"cannot write {path}: {os.strerror(code)} ({_FULL[code]}); nothing "
                     "half-written was left. Make room and rerun the same command")
  if code in _REFUSED:
    return UserError(f"cannot write {path}: {os.strerror(code)} ({_REFUSED[code]}); write "
                     "to a writable folder instead (--workdir, for a run)")
  return None


def make_dirs(folder: str | os.PathLike) -> None:
  """os.makedirs(exist_ok=True), with a UserError naming the folder when the disk refuses or a
  file stands where a folder should be."""
  folder = os.fspath(folder)
  try:
    os.makedirs(folder, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise UserError(f"cannot create the folder {folder}: a file of that name, or of one of "
                    "its parents, is in the way") from None
  except OSError as e:
    raise (disk_error(folder, e) or e) from None


def check_writable_dir(folder: str | os.PathLike) -> None:
  """Creates `folder` if needed and writes (then removes) a file in it, so that a run whose
  outputs could not be saved stops before any work, with a message naming the folder."""
  make_dirs(folder)
  try:
    fd, probe = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=os.fspath(folder))
  except OSError as e:
    raise (disk_error(os.fspath(folder), e) or e) from None
  os.close(fd)
  with contextlib.suppress(FileNotFoundError):  # swept already by another process's start
    os.unlink(probe)


def _read_umask() -> int:
  """The process's umask: from /proc where there is one (reading it with os.umask means
  setting it for a moment, which other threads' new files would get)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


# Read once, at import.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
  """Opens a temporary file beside `path`; renames it to `path` only if the block succeeds."""
  path = os.fspath(path)
  make_dirs(os.path.dirname(path) or ".")
  try:
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=os.path.dirname(path) or ".")
  except OSError as e:
    raise (disk_error(path, e) or e) from None
  try:
    # mkstemp makes the file private (0600); give it the mode open() would (0666 less umask),
    # so that others sharing a workdir or an output folder can read what we write.
    os.fchmod(fd, 0o666 & ~_UMASK)
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    refused = disk_error(path, e) if isinstance(e, OSError) else None
    if refused is not None:
      raise refused from None
    raise


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """Writes a compressed .npz atomically."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  atomic_write(path, buf.getvalue())


def load_npz(path: str | os.PathLike,
             keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """Reads a .npz written by `save_npz` (only the arrays named in `keys` that it holds, when
  given), with an error naming the file if it is unreadable."""
  try:
    with np.load(os.fspath(path), allow_pickle=False) as z:
      wanted = z.files if keys is None else [k for k in keys if k in z.files]
      return {k: z[k] for k in wanted}
  except FileNotFoundError:
    raise
  except Exception as e:  # zipfile / pickle / value errors all mean the same to a user.
    raise UserError(f"{os.fspath(path)}: not a readable .npz file ({e}); delete it and rerun "
                    "the stage that writes it") from e


def npz_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
  """{name: shape} of every array of a .npz, from the arrays' headers alone (nothing is
  decompressed past them), with an error naming the file if it is unreadable."""
  try:
    with zipfile.ZipFile(os.fspath(path)) as archive:
      shapes = {}
      for member in archive.namelist():
        with archive.open(member) as f:
          version = np.lib.format.read_magic(f)
          read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
          shape, _, _ = read(f)
        shapes[member[:-len(".npy")] if member.endswith(".npy") else member] = tuple(shape)
      return shapes
  except FileNotFoundError:
    raise
  except Exception as e:
    raise UserError(f"{os.fspath(path)}: not a readable .npz file ({e}); delete it and rerun "
                    "the stage that writes it") from e


def save_png(path: str | os.PathLike, array: np.ndarray,
             palette: np.ndarray | None = None) -> None:
  """Writes a uint8 [H, W] or [H, W, 3] array as PNG atomically; with `palette` ([N, 3] uint8
  RGB), [H, W] as a palette ('P') PNG whose indices are the array's values."""
  from PIL import Image  # Pillow is a dependency; imported lazily to keep `import` light.
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"{os.fspath(path)}: PNG output must be uint8, got {array.dtype}")
  image = Image.fromarray(array)
  if palette is not None:  # an 'L' image with a palette becomes 'P', indices unchanged
    image.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  atomic_write(path, buf.getvalue())


def save_jpeg(path: str | os.PathLike, array: np.ndarray, quality: int = 90) -> None:
  """Writes a uint8 [H, W, 3] RGB array as JPEG atomically."""
  from PIL import Image
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"{os.fspath(path)}: JPEG output must be uint8 [H, W, 3], got "
                     f"{array.dtype} {array.shape}")
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=quality)
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
