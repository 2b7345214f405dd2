"""models/onednn.py: oneDNN's convolutions build on this machine, agree with XLA's in value and
both gradients, are what `convolution.conv2d` runs on a single-device CPU in float32 (and
only there), and a machine that cannot build them gets a warning and XLA's convolutions."""

import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affinity_jax import compilation
from affinity_jax.models import convolution, onednn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = tuple(onednn.TARGETS)


def test_the_handlers_build_and_load_on_x86_64_linux_with_a_compiler():
  # The wheels exist for x86-64 Linux only (setup.cfg), and `make test` needs a C++ compiler
  # anyway (pydensecrf2 builds from source): there they must build.
  buildable = (sys.platform == "linux" and platform.machine() == "x86_64"
               and shutil.which(os.environ.get("CXX") or "c++") is not None)
  assert onednn.available() == buildable
  if buildable:
    built = onednn.build()
    assert built.is_file() and built.parent == onednn.cache_dir()
    assert onednn.build() == built  # compiled once, then found


def _arrays(k, c, o, shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(*shape, c)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, c, o)) / np.sqrt(k * k * c), jnp.float32)
  return x, kernel


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("k,stride,dilation", [(1, 1, 1), (3, 1, 1), (3, 1, 2), (3, 1, 4),
                                               (3, 2, 1), (5, 1, 2), (7, 2, 1)])
@pytest.mark.parametrize("shape,c,o", [((2, 9, 13), 5, 4), ((1, 5, 7), 16, 24)])
def test_the_convolution_and_its_gradients_are_xla_s(k, stride, dilation, shape, c, o):
  x, kernel = _arrays(k, c, o, shape)
  if not onednn.fits(x.shape, k, stride, dilation):  # a tap beyond the grid (below)
    assert (k - 1) * dilation >= min(shape[1:])
    with pytest.raises(ValueError, match="outside the geometries"):
      onednn.conv2d(x, kernel, stride, dilation)
    return
  grad = jnp.cos(convolution.conv_nhwc(x, kernel, stride, dilation))
  conv = lambda x, k: onednn.conv2d(x, k, stride, dilation)  # noqa: E731
  xla = lambda x, k: convolution.conv_nhwc(x, k, stride, dilation)  # noqa: E731
  got, vjp = jax.vjp(jax.jit(conv), x, kernel)
  want, xla_vjp = jax.vjp(xla, x, kernel)
  assert got.shape == want.shape
  _close(got, want)
  for g, w in zip(vjp(grad), xla_vjp(grad)):
    assert g.shape == w.shape and g.dtype == jnp.float32
    _close(g, w)
  # The same numbers on every call (oneDNN's sums in a fixed order for a fixed thread count).
  again = jax.jit(lambda x, k, g: jax.vjp(conv, x, k)[1](g))(x, kernel, grad)
  for a, b in zip(again, vjp(grad)):
    np.testing.assert_array_equal(a, b)


def test_fits_leaves_out_the_geometries_onednn_gets_wrong():
  # Every tap meets the input: a dilation-12 3x3 kernel needs a grid over 24 wide.
  assert onednn.fits((8, 32, 32, 256), 3, 1, 12)
  assert not onednn.fits((8, 24, 32, 256), 3, 1, 12)
  assert not onednn.fits((8, 32, 16, 256), 3, 1, 8)
  # No side cropped: a 1x1 stride-2 kernel skips the last row and column of an even grid.
  assert onednn.fits((1, 5, 7, 3), 1, 2, 1)
  assert not onednn.fits((1, 4, 7, 3), 1, 2, 1)
  assert onednn.fits((1, 4, 6, 3), 3, 2, 1)  # padded: nothing cropped


def _compiled(fun, *args) -> str:
  return compilation.jit(fun).lower(*args).compile().as_text()


def _targets(hlo: str) -> list[str]:
  return sorted(re.findall(r'custom_call_target="(affinity_onednn_[a-z_]+)"', hlo))


def _loss_grad(argnums):
  return jax.grad(lambda x, k: jnp.sum(convolution.conv2d(x, k, 1, 2) ** 2), argnums=argnums)


def test_conv2d_runs_onednn_on_one_cpu_device_in_float32(monkeypatch):
  x, kernel = _arrays(3, 8, 16, (2, 10, 12))
  assert jax.device_count() == 1 and jax.default_backend() == "cpu"
  assert _targets(_compiled(_loss_grad((0, 1)), x, kernel)) == sorted(TARGETS)
  # A gradient nobody asks for is not computed: the kernel's alone has no input gradient.
  assert _targets(_compiled(_loss_grad(1), x, kernel)) == [
      "affinity_onednn_conv_forward", "affinity_onednn_conv_kernel_grad"]
  assert _targets(_compiled(_loss_grad(0), x, kernel)) == [
      "affinity_onednn_conv_forward", "affinity_onednn_conv_input_grad"]
  # bfloat16 stays XLA's; so does everything when switched off.
  assert _targets(_compiled(_loss_grad((0, 1)), x.astype(jnp.bfloat16),
                            kernel.astype(jnp.bfloat16))) == []
  monkeypatch.setenv(onednn.ENV_SWITCH, "0")
  assert _targets(_compiled(_loss_grad((0, 1)), x, kernel)) == []


@pytest.mark.parametrize("stride,dilation", [(1, 2), (2, 1)])
def test_flops_counts_as_xla_counts_a_convolution(stride, dilation, monkeypatch):
  x, kernel = _arrays(3, 8, 16, (2, 10, 13))
  grad = jax.grad(lambda x, k: jnp.sum(convolution.conv2d(x, k, stride, dilation) ** 2),
                  argnums=(0, 1))
  ours = onednn.flops(jax.jit(grad).lower(x, kernel).as_text())
  monkeypatch.setenv(onednn.ENV_SWITCH, "0")  # the same program with XLA's convolutions
  xla = jax.jit(lambda x, k: grad(x, k)).lower(x, kernel).cost_analysis()["flops"]
  # XLA's count adds the elementwise work (a few per cent here) to the convolutions'.
  assert 0.9 * xla < ours <= xla
  assert onednn.flops(jax.jit(lambda x: x + 1).lower(x).as_text()) == 0


def test_empty_batches_and_vmap_go_through():
  x, kernel = _arrays(3, 4, 6, (0, 5, 7))
  assert convolution.conv2d(x, kernel).shape == (0, 5, 7, 6)  # XLA's: nothing to convolve
  x, kernel = _arrays(3, 4, 6, (3, 5, 7))
  got = jax.vmap(lambda x: convolution.conv2d(x[None], kernel)[0])(x)
  _close(got, convolution.conv_nhwc(x, kernel))


def test_a_failed_build_names_the_source_and_leaves_no_file(tmp_path, monkeypatch):
  bad = tmp_path / "onednn.cc"
  bad.write_text("this is not C++;\n")
  monkeypatch.setattr(onednn, "SOURCE", bad)
  monkeypatch.setenv("AFFINITY_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(onednn.Unavailable, match=r"compiling .*onednn\.cc failed"):
    onednn.build()
  assert list((tmp_path / "cache" / "onednn").iterdir()) == []  # no half-written library
  bad.write_text(pathlib.Path(onednn.__file__).with_name("onednn.cc").read_text())
  built = onednn.build()  # the same source elsewhere: built into this cache, loadable by all
  assert built.parent == tmp_path / "cache" / "onednn" and built.stat().st_mode & 0o044 == 0o044


_SCRIPT = textwrap.dedent("""
    import re, sys
    import jax, jax.numpy as jnp, numpy as np
    from affinity_jax.models import convolution, onednn
    x = jnp.ones((2, 6, 6, 4), jnp.float32)
    k = jnp.ones((3, 3, 4, 8), jnp.float32)
    hlo = jax.jit(jax.grad(lambda x, k: convolution.conv2d(x, k).sum(), argnums=(0, 1))
                 ).lower(x, k).compile().as_text()
    assert float(convolution.conv2d(x, k)[0, 2, 2, 0]) == 36.0
    print(jax.device_count(), onednn.available(), "affinity_onednn" in hlo)
""")


def _run(env):
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=dict(os.environ, **env),
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.split(), out.stderr


_OUTSIDE = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from affinity_jax.models import convolution, onednn
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 16, 16, 64)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 64, 32)), jnp.float32)
    assert onednn.available() and not onednn.fits(x.shape, 3, 1, 12)
    # Op by op, as it crashed (a jitted program ran three times without crashing).
    grad = jax.grad(lambda k: jnp.sum(convolution.conv2d(x, k, 1, 12) ** 2))
    want = jax.grad(lambda k: jnp.sum(convolution.conv_nhwc(x, k, 1, 12) ** 2))(k)
    for _ in range(3):
      np.testing.assert_allclose(grad(k), want, rtol=1e-4, atol=1e-3)
    print("ok")
""")


def test_a_geometry_outside_fits_gets_xla_s_convolution_and_no_crash():
  # oneDNN 3.2's kernel gradient of this layer (the segmentation head's on the demo's 16 x 16
  # grids) wrote out of bounds: the next oneDNN call crashed the process.
  out = subprocess.run([sys.executable, "-c", _OUTSIDE], capture_output=True, text=True,
                       cwd=REPO, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0 and out.stdout.split()[-1] == "ok", out.stderr[-3000:]


def test_several_devices_keep_xla_s_convolutions():
  # XLA would replicate a custom call's operands across the devices of a sharded program.
  (devices, available, used), _ = _run({
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
  assert (devices, used) == ("2", "False")


def test_no_compiler_gives_a_warning_and_xla_s_convolutions(tmp_path):
  (devices, available, used), err = _run({
      "CXX": "no-such-compiler", "AFFINITY_JAX_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"})
  assert (devices, available, used) == ("1", "False", "False")
  assert "oneDNN's convolutions are not available, using XLA's" in err
  assert "no C++ compiler 'no-such-compiler'" in err
