"""How affinity_jax compiles its programs: `jit` is `jax.jit` plus the XLA:CPU options below.

XLA:CPU (jaxlib 0.10) hands each convolution to YNNPACK by default. YNNPACK differentiates a
convolution's kernel as a convolution with an H x W window, which ran 3-9x slower than XLA's own
(Eigen) convolution of the same thing on a 2-core AMD EPYC VM without AVX-512, and its forward
convolutions were no faster. With YNNPACK kept for matrix products only, the demo's train
steps ran 1.28-1.30x faster there and the full-width ResNet-38 steps 1.20-1.23x
(experiments/RESULTS.md, "YNNPACK's convolutions"); on a 2-core Xeon with AVX-512 the
full-width ResNet-38 CAM step 1.24x ("The 1x1 kernel gradient and the bias gradient"). The
option changes which library sums the products of a convolution, so float32 results move in
their last bits, as between machines.

The options apply only on a CPU, only where the installed jaxlib knows them (checked once by
compiling a scalar program), and not where XLA_FLAGS already sets them: a user who writes
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=...` gets exactly that. The choice is made
at a function's first call, so that importing a module neither starts a backend nor fixes the
platform before `jax.distributed.initialize`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import numpy as np

# XLA:CPU's debug options for every program of the package (see the module docstring).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def compiler_options() -> dict[str, str]:
  """The options `jit` compiles with on this process's default backend ({} off a CPU)."""
  if jax.default_backend() != "cpu":
    return {}
  flags = os.environ.get("XLA_FLAGS", "")
  options = {k: v for k, v in CPU_OPTIONS.items() if f"--{k}" not in flags}
  if not options:
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
  except jax.errors.JaxRuntimeError:  # an older or newer jaxlib without these options
    return {}
  return options


class _Jitted:
  """`jax.jit(fun, **kwargs)` with `compiler_options()` where it is compiled on its own; inside
  another traced function (where jax.jit takes no compiler options, and the outer program's
  hold) the plain `jax.jit(fun, **kwargs)`. Both are made at the first use."""

  def __init__(self, fun: Callable, kwargs: dict[str, Any]):
    functools.update_wrapper(self, fun)
    self._fun, self._kwargs, self._top, self._nested = fun, kwargs, None, None

  def _get(self, nested: bool = False):
    if nested:
      if self._nested is None:
        self._nested = jax.jit(self._fun, **self._kwargs)
      return self._nested
    if self._top is None:
      options = compiler_options()
      self._top = (jax.jit(self._fun, compiler_options=options, **self._kwargs) if options
                   else self._get(nested=True))
    return self._top

  def __call__(self, *args, **kwargs):
    traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
    try:
      return self._get(nested=traced)(*args, **kwargs)
    except ValueError as e:  # traced through closed-over values only
      if traced or "top-level" not in str(e):
        raise
      return self._get(nested=True)(*args, **kwargs)

  def __getattr__(self, name):  # lower, trace, eval_shape, clear_cache, ...
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self._get(), name)


def jit(fun: Callable | None = None, **kwargs):
  """`jax.jit` with the package's compiler options; as `@jit`, `@jit(...)` or
  `functools.partial(jit, static_argnames=...)`."""
  if fun is None:
    return functools.partial(jit, **kwargs)
  return _Jitted(fun, kwargs)
