"""One run per workdir: a lock file naming its holder, taken atomically, released on exit.

`{workdir}/.lock` is created with O_CREAT | O_EXCL (atomic on local and NFS v3+ file systems)
and holds {"host", "pid", "started", "command"}. A second run fails at once with a message
naming the holder. A lock whose process is gone (same host, no such PID) is stale: it is
replaced, with a note. A lock of another host cannot be checked, so the message says how to
remove it by hand. This module imports no JAX.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from typing import Iterator

from affinity_jax.errors import UserError

LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user.
    return True
  return True


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}  # half-written by a holder killed while writing it: treat as unknown.


def _mtime(path: str) -> float:
  try:
    return os.stat(path).st_mtime
  except FileNotFoundError:
    return time.time()


def _try_create(path: str, holder: dict) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(holder, f)
  return True


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds `{workdir}/.lock` for the duration of the block."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  me = {"host": socket.gethostname(), "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
  if not _try_create(path, me):
    holder = _read(path)
    same_host = holder.get("host") == me["host"]
    dead = same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])
    # A holder writes its record right after creating the file; an empty one that old was
    # killed in between.
    torn = not holder and time.time() - _mtime(path) > 10
    if dead or torn:
      print(f"affinity-jax: removing the stale lock of process {holder.get('pid', '?')} (no "
            f"longer running) in {workdir}", file=sys.stderr, flush=True)
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      if _try_create(path, me):
        holder = None
    if holder is not None:
      who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} since "
             f"{holder.get('started', '?')} ({holder.get('command', '?')})")
      hint = ("wait for it to finish, or use another --workdir" if same_host else
              f"if that run is gone, delete {path} by hand")
      raise UserError(f"workdir {workdir} is in use by {who}; {hint}")
  try:
    yield
  finally:
    if _read(path).get("pid") == me["pid"]:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
