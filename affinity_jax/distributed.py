"""One run on many processes: JAX's distributed runtime and the few things the pipeline builds
on it.

A run on N processes (the hosts of a TPU pod slice, the nodes of a GPU cluster, or N local
processes started by `affinity-jax launch`) calls `initialize` before anything touches a
device. From then on every process runs the same stages in the same order over the same
workdir and dataset, which must lie on a file system all of them see (a mounted bucket, NFS):

* a stage's inputs are decided once, by process 0 (`broadcast`), and every process waits for
  all the others at the end of each stage (`barrier`), so no stage reads a file another process
  has still to write;
* the trainings make one global batch of all processes' devices (affinity_jax.train);
* the per-image stages give each process an even share of the images still to do (`share`
  of what process 0 found missing) and batch it over the process's own devices
  (`local_placement`);
* what every process has to say in one file (the images a stage skipped) is gathered on
  process 0 (`gather`), which alone writes it and prints.

Every wait has a timeout (`barrier_timeout_s`), and a process that stops with an error tells
the others (`stop`): they stop with its message at their next `barrier`, `gather` or
`broadcast`, or at their next image in a per-image stage (`check_peers`), instead of waiting
for it; the failed process stays until each of them has heard (or a few seconds), since its
leaving looks to JAX like a death, and process 0 holds the coordination service itself. A
process that dies outright (killed, out of memory) is noticed by JAX's coordination service
after `heartbeat_timeout_s`, which ends the others with its own message ("another task
died"). The messages between processes travel through the coordination service's key-value
store.

On one process every function here is a no-op (or the identity), with no JAX runtime set up.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

from affinity_jax.errors import ConfigError, UserError

# Where a run's keys live in the coordination service's key-value store.
_PREFIX = "affinity_jax"
# How long a process waits at a barrier for the others (config key barrier_timeout_s).
DEFAULT_BARRIER_TIMEOUT_S = 3600.0
# After how long without a heartbeat JAX declares a process dead (heartbeat_timeout_s).
DEFAULT_HEARTBEAT_TIMEOUT_S = 100

# How long a process waits for the others to join the run (JAX's own default).
INITIALIZATION_TIMEOUT_S = 300
# How long a stopping process waits for the others to hear of it (`stop`).
LINGER_S = 30.0
# How often the per-image stages look for another process's failure (`check_peers`).
_CHECK_EVERY_S = 1.0

_state = {"timeout_s": DEFAULT_BARRIER_TIMEOUT_S, "sequence": 0, "multi": False, "checked": 0.0}


class PeerFailure(UserError):
  """Another process stopped with an error (`heard`), or did not arrive in time."""

  def __init__(self, message: str, heard: bool = True):
    super().__init__(message)
    self.heard = heard


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               barrier_timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> None:
  """Joins this process to the run (jax.distributed.initialize) before any device is used.

  With `coordinator`, `num_processes` and `process_id` unset, JAX finds them in the environment
  a cluster sets: Cloud TPU's metadata, SLURM's variables (srun), Open MPI's, or
  JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES / JAX_PROCESS_ID as `affinity-jax launch` sets
  them. On CPU devices the collectives run over gloo.
  """
  import jax  # pylint: disable=g-import-not-at-top
  for key, value in (("barrier_timeout_s", barrier_timeout_s),
                     ("heartbeat_timeout_s", heartbeat_timeout_s)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      raise ConfigError(f"config key {key} must be a number of seconds > 0, got {value!r}")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=INITIALIZATION_TIMEOUT_S,
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  except (ValueError, RuntimeError) as e:
    where = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the environment's"
    raise UserError(
        f"cannot join the multi-process run (coordinator {where}, {num_processes} processes, "
        f"process id {process_id}; waited up to {INITIALIZATION_TIMEOUT_S} s for all to "
        f"join): {str(e).strip().splitlines()[0][:400]}. Outside a "
        "cluster JAX detects (Cloud TPU, SLURM, Open MPI), give --coordinator HOST:PORT "
        "--num-processes N --process-id I, or start local processes with `affinity-jax "
        "launch`") from None
  _state.update(timeout_s=float(barrier_timeout_s), sequence=0,
                multi=jax.process_count() > 1)


def index() -> int:
  """This process's index (0 on one process)."""
  if not _state["multi"]:
    return 0
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def count() -> int:
  """The number of processes of the run (1 without `initialize`)."""
  if not _state["multi"]:
    return 1
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def is_main() -> bool:
  """Process 0: the one that decides, writes shared files and prints."""
  return index() == 0


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def _key(kind: str, name: str) -> str:
  """A fresh key for the next collective call; every process calls them in the same order."""
  _state["sequence"] += 1
  return f"{_PREFIX}/{kind}/{_state['sequence']}:{name.replace('/', '_')}"


def _failures(client) -> dict[int, str]:
  try:
    entries = client.key_value_dir_get(f"{_PREFIX}/failed/")
  except Exception:  # pylint: disable=broad-except
    return {}
  return {int(k.rsplit("/", 1)[1]): v for k, v in entries}


def _get_dir(client, key: str, what: str) -> list[tuple[str, str]]:
  try:
    return client.key_value_dir_get(key + "/")
  except Exception as e:  # pylint: disable=broad-except
    raise PeerFailure(f"lost the coordination service (process 0) while waiting for {what!r}: "
                      f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else e!r}",
                      heard=False) from None


def _wait_for_all(client, key: str, what: str, timeout_s: float | None) -> dict[int, str]:
  """{process: value} once every process has set `{key}/{process}`; raises PeerFailure when
  one reported a failure or the timeout passes."""
  timeout_s = _state["timeout_s"] if timeout_s is None else timeout_s
  n, me = count(), index()
  deadline = time.monotonic() + timeout_s
  pause = 0.01
  while True:
    # Failures first: a process that gave up here after arriving has left.
    failed = {p: m for p, m in _failures(client).items() if p != me}
    if failed:
      p, message = sorted(failed.items())[0]
      raise PeerFailure(f"process {p} of {n} stopped: {message}")
    entries = {int(k.rsplit("/", 1)[1]): v for k, v in _get_dir(client, key, what)}
    if len(entries) == n:
      return entries
    if time.monotonic() > deadline:
      absent = ", ".join(str(p) for p in range(n) if p not in entries)
      raise PeerFailure(
          f"process(es) {absent} of {n} did not reach {what!r} within {timeout_s:.0f} s "
          "(config key barrier_timeout_s); stopping", heard=False)
    time.sleep(pause)
    pause = min(pause * 2, 0.5)


def barrier(name: str, timeout_s: float | None = None) -> None:
  """Returns once every process has called `barrier` here (the same `name`, the n-th call on
  each); raises PeerFailure (naming the processes) after `timeout_s`
  (default: barrier_timeout_s) or when another process reported a failure."""
  if not _state["multi"]:
    return
  client = _client()
  key = _key("barrier", name)
  client.key_value_set(f"{key}/{index()}", "1")
  _wait_for_all(client, key, name, timeout_s)


def gather(name: str, value: Any, timeout_s: float | None = None) -> list[Any]:
  """Every process's JSON-able `value`, in process order, on every process ([value] on one)."""
  if not _state["multi"]:
    return [value]
  client = _client()
  key = _key("gather", name)
  client.key_value_set(f"{key}/{index()}", json.dumps(value))
  entries = _wait_for_all(client, key, name, timeout_s)
  return [json.loads(entries[p]) for p in range(count())]


def broadcast(name: str, decide: Callable[[], Any], timeout_s: float | None = None) -> Any:
  """`decide()` run on process 0 only, its JSON-able result on every process."""
  if not _state["multi"]:
    return decide()
  client = _client()
  key = _key("broadcast", name)
  if is_main():
    client.key_value_set(f"{key}/value", json.dumps(decide()))
  deadline = time.monotonic() + (_state["timeout_s"] if timeout_s is None else timeout_s)
  pause = 0.01
  while True:
    found = _get_dir(client, key, name)
    if found:
      return json.loads(found[0][1])
    failed = {p: m for p, m in _failures(client).items() if p != index()}
    if failed:
      p, message = sorted(failed.items())[0]
      raise PeerFailure(f"process {p} of {count()} stopped: {message}")
    if time.monotonic() > deadline:
      raise PeerFailure(f"process 0 did not decide {name!r} within "
                        f"{_state['timeout_s']:.0f} s (config key barrier_timeout_s); stopping",
                        heard=False)
    time.sleep(pause)
    pause = min(pause * 2, 0.5)


def check_peers() -> None:
  """Raises PeerFailure if another process has stopped with an error (looks at most once a
  second; for loops that do long work between collective calls)."""
  if not _state["multi"] or time.monotonic() - _state["checked"] < _CHECK_EVERY_S:
    return
  _state["checked"] = time.monotonic()
  failed = {p: m for p, m in _failures(_client()).items() if p != index()}
  if failed:
    p, message = sorted(failed.items())[0]
    raise PeerFailure(f"process {p} of {count()} stopped: {message}")


def _set(kind: str, message: str) -> None:
  try:
    _client().key_value_set(f"{_PREFIX}/{kind}/{index()}", message[:4000])
  except Exception:  # pylint: disable=broad-except
    pass  # the coordination service is gone too; the others find out from their heartbeats


def fail(message: str) -> None:
  """Tells the other processes that this one stops with `message` (best effort)."""
  if _state["multi"]:
    _set("failed", message)


def stop(status: int, message: str | None = None, linger_s: float = LINGER_S) -> None:
  """Ends this process of a multi-process run with `status`: tells the others why (`message`;
  None: it stops because another one failed, and says it heard), waits up to `linger_s` until
  every other process has failed or heard too, then leaves at once (`exit_now`). Waiting keeps
  the others from taking this process's exit for a death (their heartbeats) before they have
  read its message. Process 0 serves the key-value store they read it from: it leaves last,
  once the others have said they leave (or at the same bound)."""
  if not _state["multi"]:
    exit_now(status)
  if message is None:
    _set("heard", "1")
  else:
    fail(message)
  deadline = time.monotonic() + linger_s
  _wait_for_keys(("failed", "heard"), deadline)
  if is_main():  # the coordination service goes with process 0: it leaves last
    _wait_for_keys(("left",), deadline)
    time.sleep(0.3)
  else:
    _set("left", "1")
  exit_now(status)


def _wait_for_keys(kinds: tuple[str, ...], deadline: float) -> None:
  """Until every other process has set a key of one of `kinds`, or `deadline`."""
  others = set(range(count())) - {index()}
  while others and time.monotonic() < deadline:
    try:
      client = _client()
      others -= {int(k.rsplit("/", 1)[1]) for kind in kinds
                 for k, _ in client.key_value_dir_get(f"{_PREFIX}/{kind}/")}
    except Exception:  # pylint: disable=broad-except
      return  # the coordination service is gone
    if others:
      time.sleep(0.1)


def exit_now(status: int) -> None:
  """Ends a failed process of a multi-process run at once. A normal exit would wait at JAX's
  shutdown barrier for processes that may never get there."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def shutdown() -> None:
  """Leaves the run after a success (every process gets here)."""
  if _state["multi"]:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.shutdown()
    _state["multi"] = False


def local_placement() -> tuple[Callable, Callable, int]:
  """(put, replicate, devices) for data-parallel inference on this process's own devices:
  `put(tree)` splits batch-first arrays over them, `replicate(tree)` puts a copy on each; a
  batch must hold a multiple of `devices` examples. Computations on these arrays involve no
  other process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ("data",))
  split = NamedSharding(mesh, PartitionSpec("data"))
  whole = NamedSharding(mesh, PartitionSpec())
  return ((lambda tree: jax.device_put(tree, split)),
          (lambda tree: jax.device_put(tree, whole)), len(devices))


def share(items: list[Any]) -> list[Any]:
  """This process's part of `items`: consecutive, the parts of all processes as even as can be
  (sizes differ by at most one) and together `items`."""
  n, i = count(), index()
  return items[len(items) * i // n:len(items) * (i + 1) // n]


def per_device_multiple(batch_size: int, devices: int) -> int:
  """The smallest multiple of `devices` at least `batch_size` (inference batches are padded)."""
  return -(-int(batch_size) // devices) * devices
