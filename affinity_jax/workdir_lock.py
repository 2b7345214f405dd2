"""One run per workdir: an exclusive lock on `{workdir}/.lock`, naming its holder.

The lock is the kernel's (`fcntl.flock`, LOCK_EX | LOCK_NB, also honoured over NFS by Linux): it
is taken atomically and dropped by the kernel when the holding process ends, however it ends,
so a crashed or killed run never blocks the next one and two runs can never both hold it. The
file's content, {"host", "pid", "started", "command"}, only names the holder in the message a
second run gets; a holder that ended without clearing it (SIGKILL) is mentioned with a note.
This module imports no JAX.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

from affinity_jax.errors import UserError

LOCK_FILE = ".lock"


def _holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    return json.loads(os.read(fd, 1 << 16).decode() or "{}")
  except ValueError:
    return {}


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the lock of `workdir` for the duration of the block; a UserError naming the holder
  if another process holds it."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd)
      raise UserError(
          f"workdir {workdir} is in use by process {holder.get('pid', '?')} on "
          f"{holder.get('host', '?')} since {holder.get('started', '?')} "
          f"({holder.get('command', '?')}); wait for it to finish, or use another "
          "--workdir") from None
    previous = _holder(fd)
    if previous:
      print(f"affinity-jax: taking over the stale lock of process {previous.get('pid', '?')} "
            f"on {previous.get('host', '?')} (it ended without releasing it) in {workdir}",
            file=sys.stderr, flush=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode())
    os.fsync(fd)
    try:
      yield
    finally:
      # Cleared, not deleted: deleting would let a run that opened the old file and one that
      # creates a new one both take "the" lock.
      os.ftruncate(fd, 0)
  finally:
    os.close(fd)  # releases the flock
