"""oneDNN's convolutions inside XLA:CPU programs (jax.ffi): the k x k convolutions of
`convolution.conv2d` and both their gradients, on a single-device CPU, in float32.

Why: XLA:CPU (jaxlib 0.10) runs convolutions through Eigen, whose kernels lag oneDNN's, the
library PyTorch's CPU convolutions use. On a 2-core Xeon with AVX-512 VGG-16's 3x3 layers in
AffinityNet's step took 923 ms with XLA's forward, input and kernel gradients and 752 ms with
oneDNN's (torch's own: 757 ms), and the demo's narrow layers (4-128 channels) ran 1.2-5.8x
faster forward and 1.8-5x faster with both gradients (experiments/RESULTS.md, "oneDNN's
convolutions"). The values agree with XLA's to float32 rounding (a few
1e-7 relative); which library sums the products moves results in their last bits, as between
machines.

How: `onednn.cc` (next to this file) holds three XLA FFI handlers. It is compiled once per
environment (virtualenv), at its first use, with the C++ compiler `$CXX` (else `c++`) against
jaxlib's FFI headers and the oneDNN of the `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels
(installed with the package on x86-64 Linux), into `$AFFINITY_JAX_CACHE/onednn` (default
`~/.cache/affinity_jax/onednn`); the library's name carries a hash of everything it was built
from, and it is written under a temporary name and renamed, so a half-written library is never
loaded.

When: `applies` at trace time: a CPU default backend with one device in all (XLA would
replicate a custom call's operands across a mesh; sharded programs keep XLA's convolutions),
float32 operands, no zero-size dimension, a geometry oneDNN 3.2 computes right (`fits`: every
tap meets the input, no side cropped; elsewhere XLA's), and not `AFFINITY_JAX_ONEDNN=0` in the
environment.
Where the library cannot be built or loaded (no compiler, no wheel: another CPU architecture or
OS) the reason is logged once as a warning and XLA's convolutions are used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("onednn.cc")
# FFI target names -> the handler symbols of onednn.cc.
TARGETS = {"affinity_onednn_conv_forward": "AffinityOnednnForward",
           "affinity_onednn_conv_input_grad": "AffinityOnednnInputGrad",
           "affinity_onednn_conv_kernel_grad": "AffinityOnednnKernelGrad"}
ENV_SWITCH = "AFFINITY_JAX_ONEDNN"

log = logging.getLogger(__name__)


class Unavailable(RuntimeError):
  """oneDNN's convolutions cannot be built or loaded here; the message says why."""


def _wheel_file(dist: str, suffix: str) -> pathlib.Path:
  try:
    files = importlib.metadata.distribution(dist).files or []
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable(f"the {dist} wheel is not installed (it exists for x86-64 Linux)") from None
  for f in files:
    if str(f).endswith(suffix):
      return pathlib.Path(f.locate()).resolve()
  raise Unavailable(f"the {dist} wheel has no {suffix}")


def _inputs() -> tuple[pathlib.Path, pathlib.Path, list[str]]:
  """oneDNN's include folder, its shared library, and the compiler's command."""
  header = _wheel_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
  library = _wheel_file("onednn-cpu-gomp", "/libdnnl.so.3")
  compiler = shlex.split(os.environ.get("CXX") or "c++")  # "ccache g++" too
  return header.parent.parent.parent, library, compiler


def cache_dir() -> pathlib.Path:
  root = os.environ.get("AFFINITY_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "affinity_jax")
  return pathlib.Path(root) / "onednn"


def build() -> pathlib.Path:
  """The compiled handlers for this environment, compiled now if not yet; `Unavailable` if
  they cannot be. The library's name hashes the source's text, the compiler's command (with
  jaxlib's and oneDNN's folders, so one per virtual environment) and the versions of jaxlib and
  oneDNN."""
  include, library, compiler = _inputs()
  options = ["-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
             f"-I{include}", f"-L{library.parent}", f"-l:{library.name}",
             f"-Wl,-rpath,{library.parent}"]
  try:
    source = SOURCE.read_text()
  except OSError as e:
    raise Unavailable(f"cannot read {SOURCE}: {e}") from None
  key = [source, *compiler, *options, importlib.metadata.version("jaxlib"),
         importlib.metadata.version("onednn-cpu-gomp")]
  digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
  target = cache_dir() / f"affinity_onednn_{digest}.so"
  if target.exists():
    return target
  if shutil.which(compiler[0]) is None:
    raise Unavailable(f"no C++ compiler {compiler[0]!r} on PATH (set CXX)")
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
  except OSError as e:
    raise Unavailable(f"cannot write to {target.parent} (set AFFINITY_JAX_CACHE): {e}") from None
  os.close(fd)
  try:
    try:
      done = subprocess.run([*compiler, str(SOURCE), "-o", tmp, *options], capture_output=True,
                            text=True, timeout=600)
    except subprocess.TimeoutExpired:
      raise Unavailable(f"compiling {SOURCE} took over 600 s") from None
    if done.returncode != 0:
      raise Unavailable(f"compiling {SOURCE} failed ({compiler[0]} exit {done.returncode}):\n"
                        f"{done.stderr[-2000:]}")
    os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared cache out
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


@functools.cache
def _registered() -> str | None:
  """Builds, loads and registers the handlers once: None when done, else why not."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for name, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except (Unavailable, OSError, AttributeError) as e:  # AttributeError: a symbol missing
    log.warning("oneDNN's convolutions are not available, using XLA's: %s", e)
    return str(e)
  return None


def available() -> bool:
  """Whether the handlers are built, loaded and registered in this process."""
  return _registered() is None


def fits(shape: tuple[int, ...], k: int, stride: int, dilation: int) -> bool:
  """Whether a k x k convolution of x [B, H, W, C] is one oneDNN 3.2 computes right: each tap
  meets the input somewhere ((k - 1) * dilation < H and < W) and no side is cropped (a
  non-negative right padding). Outside these, its kernel gradient wrote out of bounds (a
  dilation-12 layer on a 16 x 16 grid crashed the next call) and a 1x1 stride-2 layer's
  gradients corrupted the heap (experiments/RESULTS.md, "oneDNN's convolutions")."""
  pad = dilation * (k - 1) // 2
  for size in shape[1:3]:
    out = _output_size(size, k, stride, dilation, pad)
    if (k - 1) * dilation >= size or (out - 1) * stride + (k - 1) * dilation + 1 < size + pad:
      return False
  return True


def applies(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> bool:
  """Whether `convolution.conv2d` runs oneDNN's convolution for these operands (module
  docstring) and an odd square kernel; decided at trace time."""
  return (os.environ.get(ENV_SWITCH, "1") != "0"
          and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
          and math.prod(x.shape) > 0 and math.prod(kernel.shape) > 0
          and fits(x.shape, kernel.shape[0], stride, dilation)
          and jax.default_backend() == "cpu" and jax.device_count() == 1
          and available())


_CALL = re.compile(r"stablehlo\.custom_call @(affinity_onednn_conv_[a-z_]+)\(.*?"
                   r"dilation = (\d+) : i64, pad = (\d+) : i64, stride = (\d+) : i64.*?:\s*"
                   r"\(tensor<([0-9x]+)xf32>, tensor<([0-9x]+)xf32>\) -> tensor<([0-9x]+)xf32>")


def _taps_inside(size: int, out: int, k: int, stride: int, dilation: int, pad: int) -> int:
  """How many (output position, tap) pairs along one side read the input, not its padding."""
  return sum(1 for o in range(out) for i in range(k) if 0 <= o * stride + i * dilation - pad < size)


def flops(stablehlo: str) -> float:
  """The arithmetic of the oneDNN convolutions a lowered program's text calls, which XLA's cost
  analysis leaves out: counted as XLA counts a convolution, 2 x the multiply-adds of the taps
  that read the input (not its padding), for the forward and each gradient alike. Each call is
  counted once as written (a loop's body once)."""
  total = 0.0
  for target, dilation, pad, stride, a, b, out in _CALL.findall(stablehlo):
    dilation, pad, stride = int(dilation), int(pad), int(stride)
    a, b, out = ([int(d) for d in s.split("x")] for s in (a, b, out))
    if target.endswith("forward"):  # (x, kernel) -> y
      x, kernel, y = a, b, out
    elif target.endswith("input_grad"):  # (dy, kernel) -> dx
      x, kernel, y = out, b, a
    else:  # (x, dy) -> kernel
      x, kernel, y = a, out, b
    k = kernel[0]
    inside = (_taps_inside(x[1], y[1], k, stride, dilation, pad)
              * _taps_inside(x[2], y[2], k, stride, dilation, pad))
    total += 2.0 * x[0] * inside * kernel[2] * kernel[3]
  return total


def _output_size(size: int, k: int, stride: int, dilation: int, pad: int) -> int:
  return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def _call(target, shape, a, b, stride, dilation, pad):
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(
      a, b, stride=np.int64(stride), dilation=np.int64(dilation), pad=np.int64(pad))


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
  """x [B, H, W, C] (float32) * kernel [k, k, C, O] (odd k), padded by dilation * (k - 1) / 2
  on each side as `convolution.conv_nhwc`, by oneDNN, with oneDNN's gradients. Call only where
  `applies` (`Unavailable` where the handlers are not; ValueError outside `fits`)."""
  k = kernel.shape[0]
  if kernel.ndim != 4 or kernel.shape[1] != k or k % 2 == 0 or math.prod(x.shape) == 0:
    raise ValueError(f"oneDNN's convolution takes an odd square kernel and a non-empty input: "
                     f"got {tuple(kernel.shape)} and {tuple(x.shape)}")
  if not fits(x.shape, k, stride, dilation):
    raise ValueError(f"oneDNN's convolution of {tuple(x.shape)} with a {kernel.shape[0]}x"
                     f"{kernel.shape[1]} kernel, stride {stride}, dilation {dilation}: outside "
                     "the geometries it computes right (onednn.fits)")
  if (why := _registered()) is not None:
    raise Unavailable(why)
  return _conv(x, kernel, stride, dilation)


def _pad(kernel, dilation):
  return dilation * (kernel.shape[0] - 1) // 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, stride, dilation):
  pad = _pad(kernel, dilation)
  b, h, w, _ = x.shape
  k = kernel.shape[0]
  shape = (b, _output_size(h, k, stride, dilation, pad), _output_size(w, k, stride, dilation, pad),
           kernel.shape[3])
  return _call("affinity_onednn_conv_forward", shape, x, kernel, stride, dilation, pad)


def _conv_fwd(x, kernel, stride, dilation):
  return _conv(x, kernel, stride, dilation), (x, kernel)


def _conv_bwd(stride, dilation, saved, grad):
  x, kernel = saved
  pad = _pad(kernel, dilation)
  grad = grad.astype(jnp.float32)
  dx = _call("affinity_onednn_conv_input_grad", x.shape, grad, kernel, stride, dilation, pad)
  dk = _call("affinity_onednn_conv_kernel_grad", kernel.shape, x, grad, stride, dilation, pad)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)
