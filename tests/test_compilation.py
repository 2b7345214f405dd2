"""affinity_jax.compilation: the package's programs compile with XLA:CPU's convolutions kept
out of YNNPACK, a user's own XLA_FLAGS win, and every jit of the package goes through it."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from affinity_jax import compilation

PACKAGE = pathlib.Path(compilation.__file__).parent
YNN_CONV = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"


def _conv(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _args():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((2, 24, 24, 32), np.float32)),
          jnp.asarray(rng.standard_normal((3, 3, 32, 32), np.float32)))


def _in_ynn(jitted) -> bool:
  """Whether the compiled convolution is one of YNNPACK's fusions."""
  return "__ynn_fusion" in jitted.lower(*_args()).compile().as_text()


def test_convolutions_leave_ynnpack_and_compute_the_same():
  if not _in_ynn(jax.jit(_conv)):
    pytest.skip("this jaxlib does not give convolutions to YNNPACK")
  assert compilation.compiler_options() == compilation.CPU_OPTIONS
  ours = compilation.jit(_conv)
  assert not _in_ynn(ours)
  x, k = _args()
  np.testing.assert_allclose(ours(x, k), jax.jit(_conv)(x, k), rtol=1e-5, atol=1e-5)
  kernel_grad = jax.grad(lambda k, x: (_conv(x, k) ** 2).sum())
  want = jax.jit(kernel_grad)(k, x)
  # Each entry sums 1152 products of order 30 with cancellation: the two libraries'
  # orders of summation differ by float32 rounding of that size (up to 1.6e-3 on an entry of
  # ~4 seen on an AVX-512 CPU), so the tolerance is relative to the largest entry.
  np.testing.assert_allclose(compilation.jit(kernel_grad)(k, x), want, rtol=1e-4,
                             atol=1e-5 * np.abs(want).max())


def test_jit_keeps_jax_jit_s_interface():
  @compilation.jit
  def double(x):
    """Doubles."""
    return 2 * x

  scaled = compilation.jit(lambda x, n: x * n, static_argnames=("n",))
  assert double.__doc__ == "Doubles." and double.__name__ == "double"
  assert float(double(np.float32(3))) == 6.0
  assert float(scaled(np.float32(3), n=4)) == 12.0
  assert "multiply" in double.lower(np.float32(0)).as_text()


def test_a_users_xla_flags_win():
  """With the option in XLA_FLAGS, compilation adds nothing and the user's value holds (here:
  convolutions in YNNPACK after all)."""
  script = (
      "import json, jax\n"
      "from jax import lax\n"
      "from affinity_jax import compilation\n"
      "from tests.test_compilation import _conv, _in_ynn\n"
      "print(json.dumps([compilation.compiler_options(), _in_ynn(compilation.jit(_conv)),"
      " _in_ynn(jax.jit(_conv))]))\n")
  env = dict(os.environ, XLA_FLAGS=YNN_CONV, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  options, ours_in_ynn, plain_in_ynn = json.loads(out.stdout.strip().splitlines()[-1])
  assert options == {}
  assert ours_in_ynn == plain_in_ynn


def _jax_jit_uses(path: pathlib.Path) -> list[int]:
  """Lines of `path` that call or decorate with jax.jit (docstrings and comments aside)."""
  lines = []
  for node in ast.walk(ast.parse(path.read_text())):
    if (isinstance(node, ast.Attribute) and node.attr == "jit" and isinstance(node.value, ast.Name)
        and node.value.id == "jax"):
      lines.append(node.lineno)
  return lines


def test_every_jit_of_the_package_goes_through_compilation():
  # models/__init__.py compiles model.init alone, at optimisation level 0 (its own options).
  allowed = {"compilation.py", "models/__init__.py"}
  found = {str(p.relative_to(PACKAGE)): _jax_jit_uses(p) for p in PACKAGE.rglob("*.py")}
  offenders = {p: lines for p, lines in found.items() if lines and p not in allowed}
  assert not offenders, f"jax.jit outside affinity_jax.compilation: {offenders}"
  assert found["models/__init__.py"], "the allowance for models/__init__.py is stale"


def test_nested_in_another_jit_and_under_grad():
  """Inside a traced function jax.jit takes no compiler options: the inner function runs as a
  plain jit there, with arguments traced or (the step's constants) closed over."""
  inner = compilation.jit(lambda x, k: _conv(x, k) * 2)
  x, k = _args()

  @compilation.jit
  def outer(x):
    ones = np.ones(x.shape, np.float32), np.ones(k.shape, np.float32)  # not traced
    return inner(x, k).sum() + inner(*ones).sum()

  expected = 2 * (_conv(x, k).sum() + _conv(jnp.ones_like(x), jnp.ones_like(k)).sum())
  np.testing.assert_allclose(outer(x), expected, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(lambda x: inner(x, k).sum())(x),
                             jax.grad(lambda x: 2 * _conv(x, k).sum())(x), rtol=1e-5, atol=1e-5)
