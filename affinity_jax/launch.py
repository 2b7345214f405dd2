"""`affinity-jax launch`: N local processes of one multi-process run, to try or test on one machine
what a TPU pod slice or a GPU cluster runs (affinity_jax/distributed.py).

  affinity-jax launch --processes 2 --cpu-devices 2 -- run --config synthetic:tiny --workdir W

starts `affinity-jax run ... --coordinator localhost:PORT --num-processes 2 --process-id i` for
i = 0, 1 (on K CPU devices each with --cpu-devices), passes their output through (process 0
speaks for the run; the others print only errors), and returns the first failed process's
status, or 0. When a process fails, the others stop by themselves (it tells them, or JAX's
coordination service notices that it is gone); whatever still runs `grace_s` later is killed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from affinity_jax.errors import UserError


def free_port() -> int:
  """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_commands(num_processes: int, command: list[str], port: int
                     ) -> list[list[str]]:
  """The command line of each process: `command` (an `affinity-jax run ...`) with its place in
  the run."""
  return [[sys.executable, "-m", "affinity_jax.cli", *command,
           "--coordinator", f"localhost:{port}", "--num-processes", str(num_processes),
           "--process-id", str(i)] for i in range(num_processes)]


def _status_text(code: int) -> str:
  if code < 0:
    try:
      return f"killed by signal {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  return f"exited with status {code}"


def main(num_processes: int, command: list[str], *, cpu_devices: int | None = None,
         port: int = 0, grace_s: float = 30.0) -> int:
  """Runs `command` (["run", "--config", ...], optionally after "--") on `num_processes` local
  processes; returns the status of the first that failed (128 + signal for a killed one), or
  0."""
  if command and command[0] == "--":
    command = command[1:]
  if not command or command[0] != "run":
    raise UserError("launch starts processes of `affinity-jax run`: give `-- run --config ...`")
  if any(a in command for a in ("--coordinator", "--num-processes", "--process-id")):
    raise UserError("launch sets --coordinator, --num-processes and --process-id itself")
  if num_processes < 1:
    raise UserError(f"--processes must be at least 1, got {num_processes}")
  env = dict(os.environ)
  if cpu_devices is not None:
    if cpu_devices < 1:
      raise UserError(f"--cpu-devices must be at least 1, got {cpu_devices}")
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(cpu_devices))
  port = port or free_port()
  children = []
  for i, argv in enumerate(process_commands(num_processes, command, port)):
    children.append(subprocess.Popen(argv, env=env))  # pylint: disable=consider-using-with
    print(f"[launch] process {i} of {num_processes}: pid {children[-1].pid}", file=sys.stderr,
          flush=True)
  first_failure = None
  deadline = None
  try:
    while any([c.poll() is None for c in children]):  # a list: poll every one
      for i, c in enumerate(children):
        if c.returncode not in (None, 0) and first_failure is None:
          first_failure = c.returncode
          deadline = time.monotonic() + grace_s
          print(f"[launch] process {i} {_status_text(c.returncode)}; the others stop (killed "
                f"after {grace_s:.0f} s if still running)", file=sys.stderr, flush=True)
      if deadline is not None and time.monotonic() > deadline:
        for i, c in enumerate(children):
          if c.poll() is None:
            print(f"[launch] killing process {i}", file=sys.stderr, flush=True)
            c.kill()
        break
      time.sleep(0.2)
  except KeyboardInterrupt:  # Ctrl-C: each process stops at its next step, or is killed
    deadline = time.monotonic() + grace_s
    for c in children:
      if c.poll() is None:
        c.send_signal(signal.SIGINT)
  for i, c in enumerate(children):
    try:
      c.wait(timeout=None if deadline is None else max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      print(f"[launch] killing process {i}", file=sys.stderr, flush=True)
      c.kill()
      c.wait()
  codes = [c.returncode for c in children]
  if first_failure is None:
    first_failure = next((c for c in codes if c != 0), 0)
  if first_failure:
    print("[launch] " + "; ".join(f"process {i} {_status_text(c)}" for i, c in enumerate(codes)),
          file=sys.stderr, flush=True)
  return 128 - first_failure if first_failure < 0 else first_failure
