"""The console: quiet library logging, and the one progress bar every stage and command uses.

`setup(verbose)` runs first in the command line, before TensorFlow or JAX is imported. By
default it hides what tells the user nothing: TensorFlow's and XLA's C++ logs below errors,
absl's and TensorFlow's Python logs below errors (tfds' "Using custom data configuration",
printed for every builder made, orbax's step notes), and the deprecation notices libraries
address to programmers. `verbose=True` shows all of it, down to the INFO logs. Our own
messages (damaged checkpoints, skipped images, errors) are prints and always show.

`progress(total, label)` is a bar with rate and ETA:

    with console.progress(len(names), "predict") as bar:
      for batch in batches:
        ...
        bar.update(len(batch), loss=0.3)      # items just finished, fields to show

On a terminal it is one line redrawn in place; elsewhere (a log file on a cluster, a pipe) it
prints a line at the first update, at every `update(..., force=True)`, at least every
`interval` seconds, and at the end. Rate and ETA count from the first update, so start-up and
compilation do not distort them. JAX-free, so worker processes and JAX-free stages can use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from typing import Iterable, Iterator, TextIO

# Python loggers whose records below ERROR are noise to a user (absl carries tfds and orbax).
_QUIET_LOGGERS = ("absl", "tensorflow")
# Notices of deprecated or changing APIs, addressed to programmers: never the user's to act on.
_DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_BAR_WIDTH = 20


def setup(verbose: bool = False) -> None:
  """Sets the logging of TensorFlow, XLA, absl and Python warnings for a command.

  Call before TensorFlow or JAX is imported: their C++ logging reads TF_CPP_MIN_LOG_LEVEL once.
  A TF_CPP_MIN_LOG_LEVEL set by the user is kept either way.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
  level = logging.INFO if verbose else logging.ERROR
  for name in _QUIET_LOGGERS:
    logging.getLogger(name).setLevel(level)
  if verbose:
    if not logging.getLogger().handlers:  # without one, Python shows only warnings and above.
      logging.basicConfig(format="%(levelname)s:%(name)s:%(message)s")
    logging.getLogger().setLevel(logging.INFO)
    warnings.simplefilter("default")
  else:
    for category in _DEVELOPER_WARNINGS:
      warnings.filterwarnings("ignore", category=category)


def _fmt_seconds(s: float) -> str:
  if not s == s or s in (float("inf"), float("-inf")):  # NaN or infinite: not known yet.
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_value(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
  """A progress bar over `total` items; see the module docstring. Use `progress(...)`."""

  def __init__(self, total: int, label: str, *, unit: str = "image", start: int = 0,
               rate_unit: str = "img/s", rate_scale: float = 1.0, enabled: bool = True,
               interval: float = 60.0, stream: TextIO | None = None):
    self.total, self.label, self.unit = int(total), label, unit
    self.rate_unit, self.rate_scale = rate_unit, rate_scale
    self.enabled, self.interval = enabled, interval
    self.stream = stream or sys.stdout
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.done = int(start)
    self.fields: dict[str, object] = {}
    self.t_first: float | None = None   # time of the first update; rates count from it
    self.done_first = self.done
    self.t_line = 0.0                   # time of the last line (or redraw)
    self.drawn = False                  # a redrawn line is on the terminal (tty)
    self.printed = False                # the current state was printed (not tty)

  def update(self, n: int = 1, *, force: bool = False, **fields) -> None:
    """`n` more items are finished; `fields` (name -> value) are shown after the count until
    replaced. `force` prints a line now, also off a terminal."""
    self.done += n
    self.fields.update(fields)
    if not self.enabled:
      return
    now = time.time()
    if self.t_first is None:
      self.t_first, self.done_first = now, self.done
      first = True
    else:
      first = False
    finished = self.done >= self.total
    if self.tty:
      if first or force or finished or now - self.t_line >= 0.1:
        self._redraw(now)
    elif first or force or finished or now - self.t_line >= self.interval:
      self._print(now)
    else:
      self.printed = False

  def line(self, now: float | None = None) -> str:
    """`[label] [####....] unit done/total fields rate ETA eta`."""
    now = time.time() if now is None else now
    frac = min(1.0, self.done / self.total) if self.total > 0 else 1.0
    full = int(frac * _BAR_WIDTH)
    bar = "#" * full + "." * (_BAR_WIDTH - full)
    parts = [f"[{self.label}] [{bar}] {self.unit} {self.done}/{self.total}"]
    parts += [f"{k} {_fmt_value(v)}" for k, v in self.fields.items()]
    elapsed = now - self.t_first if self.t_first is not None else 0.0
    counted = self.done - self.done_first
    if counted > 0 and elapsed > 0:
      rate = counted / elapsed
      parts.append(f"{rate * self.rate_scale:.1f} {self.rate_unit}")
      parts.append(f"ETA {_fmt_seconds(max(0, self.total - self.done) / rate)}")
    elif self.done >= self.total:
      parts.append("ETA 0m00s")
    else:
      parts.append("ETA ?")
    return " ".join(parts)

  def _print(self, now: float) -> None:
    print(self.line(now), file=self.stream, flush=True)
    self.t_line, self.printed = now, True

  def _redraw(self, now: float) -> None:
    width = shutil.get_terminal_size((120, 20)).columns - 1
    self.stream.write("\r" + self.line(now)[:width] + "\033[K")
    self.stream.flush()
    self.t_line, self.drawn = now, True

  def clear(self) -> None:
    """Takes a redrawn line off the terminal (before another message is written)."""
    if self.drawn:
      self.stream.write("\r\033[K")
      self.drawn = False

  def close(self) -> None:
    """Leaves the last state on the console: the redrawn line ended, or its last line printed."""
    if not self.enabled or self.t_first is None:
      return
    if self.tty:
      self._redraw(time.time())
      self.stream.write("\n")
      self.stream.flush()
      self.drawn = False
    elif not self.printed:
      self._print(time.time())


class _ClearsBar:
  """Stands in for sys.stdout / sys.stderr while a bar is redrawn on the terminal: another
  message first takes the bar off its line, and the bar's next update draws it again below."""

  def __init__(self, stream: TextIO, bar: Progress):
    self._stream, self._bar = stream, bar

  def write(self, text: str) -> int:
    if text:
      self._bar.clear()
    return self._stream.write(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


@contextlib.contextmanager
def progress(total: int, label: str, **options) -> Iterator[Progress]:
  """A `Progress` bar for the duration of the block (options: see `Progress`). On a terminal,
  other prints during the block take the bar off its line first instead of joining it."""
  bar = Progress(total, label, **options)
  swapped = {}
  if bar.enabled and bar.tty:
    for name in ("stdout", "stderr"):
      stream = getattr(sys, name)
      on_terminal = stream is bar.stream or bool(getattr(stream, "isatty", lambda: False)())
      if on_terminal and not isinstance(stream, _ClearsBar):
        swapped[name] = stream
        setattr(sys, name, _ClearsBar(stream, bar))
  try:
    yield bar
  except BaseException:
    bar.clear()  # the error's message gets a line of its own; the bar's last state is moot.
    bar.enabled = False
    raise
  finally:
    for name, stream in swapped.items():
      setattr(sys, name, stream)
    bar.close()


def track(items: Iterable, total: int, label: str, **options) -> Iterator:
  """Yields `items`, counting each on the bar once the loop's body is done with it."""
  with progress(total, label, **options) as bar:
    for item in items:
      yield item
      bar.update(1)
