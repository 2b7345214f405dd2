"""models/convolution.py: `conv2d`'s value is XLA's convolution, its gradients (the mirrored input
gradient, the input gradient as a product, the kernel gradient as products) are XLA's own up to
rounding, and on a CPU its compiled input gradient copies the kernel without mirroring it, and
without transposing it where the positions are fewer than the channels; `pointwise` and
`add_bias` are `jnp.dot` and `+` with the same gradients, and on a CPU their kernel and bias
gradients are products that read the output gradient as it is laid out. All with oneDNN's
convolutions switched off: these are the forms of every other case (tests/test_onednn.py)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affinity_jax import compilation
from affinity_jax.models import convolution, onednn


@pytest.fixture(autouse=True)
def _xla_s_convolutions(monkeypatch):
  monkeypatch.setenv(onednn.ENV_SWITCH, "0")


def _arrays(dilation, c=5, o=4, k=3, shape=(2, 9, 11)):
  rng = np.random.default_rng(dilation)
  x = jnp.asarray(rng.normal(size=(*shape, c)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, c, o)), jnp.float32)
  return x, kernel


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# (grid, output channels): more positions than channels (the CPU's mirrored input gradient),
# and fewer (its product with the kernel as stored).
GRIDS = [((2, 9, 11), 4), ((1, 3, 4), 16)]


@pytest.mark.parametrize("kernel_grad", convolution.KERNEL_GRADS)
@pytest.mark.parametrize("stride,dilation", [(1, 1), (1, 2), (1, 4), (2, 1)])
@pytest.mark.parametrize("shape,o", GRIDS)
def test_conv2d_and_its_gradients_are_xla_s(stride, dilation, kernel_grad, shape, o):
  x, kernel = _arrays(dilation, o=o, shape=shape)
  ours = lambda x, k: convolution.conv2d(x, k, stride, dilation, kernel_grad)  # noqa: E731
  xla = lambda x, k: convolution.conv_nhwc(x, k, stride, dilation)  # noqa: E731
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))  # noqa: E731
  for jit in (jax.jit, compilation.jit):  # XLA's defaults, and the package's CPU options
    np.testing.assert_array_equal(jit(ours)(x, kernel), jit(xla)(x, kernel))
    got = jit(jax.grad(loss(ours), argnums=(0, 1)))(x, kernel)
    want = jit(jax.grad(loss(xla), argnums=(0, 1)))(x, kernel)
    for g, w in zip(got, want):
      _close(g, w)
  b, h, w = shape
  assert ours(x, kernel).shape == (b, -(-h // stride), -(-w // stride), o)


@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_each_gradient_form_is_the_convolution_s(dilation):
  x, kernel = _arrays(dilation)
  grad = jnp.cos(convolution.conv_nhwc(x, kernel, 1, dilation))
  want_x, want_k = jax.vjp(lambda x, k: convolution.conv_nhwc(x, k, 1, dilation),
                           x, kernel)[1](grad)
  _close(convolution.input_grad_xla(grad, kernel, dilation), want_x)
  _close(convolution.input_grad_mirrored(grad, kernel, dilation), want_x)
  _close(convolution.kernel_grad_xla(x, grad, kernel, dilation), want_k)
  _close(convolution.kernel_grad_products(x, grad, kernel, dilation), want_k)
  _close(convolution.kernel_grad_columns(x, grad, kernel, dilation), want_k)


def test_the_input_gradient_as_a_product_rounds_bfloat16_once():
  # Its k * k blocks summed in float32: as exact as XLA's own convolution in bfloat16.
  x, kernel = _arrays(1, c=32, o=64, shape=(1, 5, 6))
  grad = jnp.cos(convolution.conv_nhwc(x, kernel, 1, 1))
  exact = np.asarray(convolution.input_grad_xla(grad, kernel, 1), np.float64)
  bf16 = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
  errors = {}
  for name, form in [("xla", convolution.input_grad_xla),
                     ("products", convolution.input_grad_products)]:
    got = form(bf16(grad), bf16(kernel), 1)
    assert got.dtype == jnp.bfloat16
    errors[name] = np.sqrt(np.mean((np.asarray(got, np.float64) - exact) ** 2))
  assert errors["products"] <= 1.25 * errors["xla"], errors


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("dilation", [1, 2, 4])
@pytest.mark.parametrize("shape,o", GRIDS)
def test_the_gradients_as_one_product_are_the_convolution_s(k, dilation, shape, o):
  x, kernel = _arrays(dilation, o=o, k=k, shape=shape)
  grad = jnp.cos(convolution.conv_nhwc(x, kernel, 1, dilation))
  want = jax.vjp(lambda x: convolution.conv_nhwc(x, kernel, 1, dilation), x)[1](grad)[0]
  for jit in (jax.jit, compilation.jit):
    got = jit(convolution.input_grad_products, static_argnums=2)(grad, kernel, dilation)
    assert got.shape == x.shape
    _close(got, want)
  want = jax.vjp(lambda k: convolution.conv_nhwc(x, k, 1, dilation), kernel)[1](grad)[0]
  for jit in (jax.jit, compilation.jit):
    got = jit(convolution.kernel_grad_columns, static_argnums=3)(x, grad, kernel, dilation)
    assert got.shape == kernel.shape
    _close(got, want)


def _compiled_gradient(conv, shape=(1, 12, 12), argnum=0) -> str:
  """The compiled CPU program (text) of the gradient of sum(conv(x, kernel) ** 2) with respect
  to x (argnum 0) or the kernel (1), for x [*shape, 64] and a 3x3 kernel 64 -> 96."""
  cpu = jax.devices("cpu")[0]  # the program is compiled for the CPU on any machine
  x, kernel = jax.device_put(_arrays(1, c=64, o=96, shape=shape), cpu)
  grad = compilation.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=argnum))
  return grad.lower(x, kernel).compile().as_text()


def _mirrored_kernel_copies(conv) -> int:
  """How many arrays of a kernel's shape the compiled input gradient mirrors (reverses)."""
  return len(re.findall(r"= f32\[3,3,(?:64,96|96,64)\]\{[0-9,]*\} reverse\(",
                        _compiled_gradient(conv)))


def test_a_cpu_never_mirrors_the_kernel_for_the_input_gradient():
  # XLA:CPU's own input gradient mirrors the kernel (jaxlib 0.10); if a later jaxlib stops,
  # conv2d's mirrored activations may no longer pay: measure again (RESULTS.md).
  assert _mirrored_kernel_copies(lambda x, k: convolution.conv_nhwc(x, k)) > 0
  assert _mirrored_kernel_copies(lambda x, k: convolution.conv2d(x, k)) == 0


def _transposed_kernels(shape) -> int:
  """How many arrays of the kernel's shape with its channels swapped ([3, 3, O, C]) the compiled
  CPU input gradient of `conv2d` writes, for an input of `shape` [B, H, W] and O = 96."""
  return len(re.findall(r"= f32\[3,3,96,64\]\{[0-9,]*\} ",
                        _compiled_gradient(convolution.conv2d, shape)))


def test_a_cpu_transposes_the_kernel_only_for_more_positions_than_channels():
  # XLA:CPU writes the transposed kernel out (jaxlib 0.10); if a later jaxlib folds it into the
  # convolution instead, the products may no longer pay: measure again (RESULTS.md).
  # 144 and 96 positions >= 96 channels: the mirrored convolution, the kernel's channels swapped.
  assert _transposed_kernels((1, 12, 12)) > 0
  assert _transposed_kernels((1, 12, 8)) > 0
  # 48 < 96: one product with the kernel as stored, never transposed (with the package's compiler
  # options; without them the mirrored convolution whatever the positions).
  assert (_transposed_kernels((1, 6, 8)) == 0) == bool(compilation.compiler_options())


@pytest.mark.parametrize("kernel_grad", convolution.KERNEL_GRADS)
def test_a_cpu_kernel_gradient_is_one_product_for_fewer_positions_than_channels(kernel_grad):
  conv = functools.partial(convolution.conv2d, kernel_grad=kernel_grad)

  def convolutions(shape):  # in the compiled kernel gradient, the forward's included
    return len(re.findall(r" convolution\(", _compiled_gradient(conv, shape, argnum=1)))

  many, few = convolutions((1, 12, 12)), convolutions((1, 6, 8))
  if compilation.compiler_options():
    assert many == 2  # XLA's own for 144 positions >= 96 channels
    assert few == 1  # 48 < 96: one product (and the forward)
  else:  # the gradient asked for, whatever the positions: a convolution or nine products
    assert many == few == (2 if kernel_grad == "xla" else 1)


def test_an_unknown_kernel_gradient_is_refused():
  x, kernel = _arrays(1)
  with pytest.raises(ValueError, match="kernel_grad 'cudnn'"):
    convolution.conv2d(x, kernel, kernel_grad="cudnn")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_pointwise_and_its_gradients_are_jnp_dot_s(dtype, tol):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 6)), dtype)
  kernel = jnp.asarray(rng.normal(size=(6, 4)), dtype)
  loss = lambda mm: lambda x, k: jnp.sum(jnp.sin(mm(x, k).astype(jnp.float32)))  # noqa: E731
  for jit in (jax.jit, compilation.jit):
    np.testing.assert_array_equal(jit(convolution.pointwise)(x, kernel), jit(jnp.dot)(x, kernel))
    got = jit(jax.grad(loss(convolution.pointwise), argnums=(0, 1)))(x, kernel)
    want = jit(jax.grad(loss(jnp.dot), argnums=(0, 1)))(x, kernel)
    for g, w in zip(got, want):
      assert g.dtype == w.dtype == dtype and g.shape == w.shape
      g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
      np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


def _transposed_output_gradients(mm, o=24, n=60, c=40) -> int:
  """How many fusions of the compiled kernel gradient of `mm` write an [O, N] array: the output
  gradient (here a sum of shifted differences, as behind AffinityNet's f9) in channel-major
  order."""
  cpu = jax.devices("cpu")[0]
  rng = np.random.default_rng(0)
  x = jax.device_put(jnp.asarray(rng.normal(size=(1, 6, 10, c)), jnp.float32), cpu)
  kernel = jax.device_put(jnp.asarray(rng.normal(size=(c, o)), jnp.float32), cpu)

  def loss(kernel, x):
    f = jax.nn.elu(mm(x, kernel))
    return sum(jnp.sum(jnp.abs(f[:, :, d:] - f[:, :, :-d])) + jnp.sum(jnp.abs(f[:, d:] - f[:, :-d]))
               for d in (1, 2, 3))

  text = compilation.jit(jax.grad(loss)).lower(kernel, x).compile().as_text()
  return len(re.findall(rf"= f32\[{o},{n}\]\{{1,0\}} fusion\(", text))


def test_a_cpu_kernel_gradient_reads_the_output_gradient_as_laid_out():
  # XLA:CPU's own gradient of jnp.dot writes the output gradient channel-major (jaxlib 0.10);
  # if a later jaxlib stops, `pointwise` may no longer pay: measure again (RESULTS.md).
  assert _transposed_output_gradients(jnp.dot) > 0
  assert _transposed_output_gradients(convolution.pointwise) == 0


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_add_bias_and_its_gradients_are_plus_s(dtype, tol):
  rng = np.random.default_rng(8)
  y = jnp.asarray(rng.normal(size=(2, 5, 7, 6)), dtype)
  bias = jnp.asarray(rng.normal(size=(6,)), dtype)
  plus = lambda y, b: y + b  # noqa: E731
  loss = lambda add: lambda y, b: jnp.sum(jnp.sin(add(y, b).astype(jnp.float32)))  # noqa: E731
  for jit in (jax.jit, compilation.jit):
    np.testing.assert_array_equal(jit(convolution.add_bias)(y, bias), jit(plus)(y, bias))
    got = jit(jax.grad(loss(convolution.add_bias), argnums=(0, 1)))(y, bias)
    want = jit(jax.grad(loss(plus), argnums=(0, 1)))(y, bias)
    for g, w in zip(got, want):
      assert g.dtype == w.dtype == dtype and g.shape == w.shape
      g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
      np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


@pytest.mark.parametrize("y_dtype,bias_dtype", [(jnp.bfloat16, jnp.float32),
                                                 (jnp.float32, jnp.bfloat16)])
def test_add_bias_of_mixed_dtypes_gives_gradients_in_each_s(y_dtype, bias_dtype):
  y, bias = jnp.ones((2, 3, 4), y_dtype), jnp.ones((4,), bias_dtype)
  loss = lambda add: lambda y, b: jnp.sum(add(y, b).astype(jnp.float32))  # noqa: E731
  got = jax.grad(loss(convolution.add_bias), argnums=(0, 1))(y, bias)
  want = jax.grad(loss(lambda y, b: y + b), argnums=(0, 1))(y, bias)
  assert convolution.add_bias(y, bias).dtype == (y + bias).dtype
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_empty_positions_and_channels_have_empty_gradients():
  for shape, c, o in [((0, 3, 4), 2, 5), ((1, 3, 4), 0, 5), ((1, 3, 4), 2, 0)]:
    x, kernel = jnp.ones(shape + (c,)), jnp.ones((3, 3, c, o))
    for kernel_grad in convolution.KERNEL_GRADS:
      conv = functools.partial(convolution.conv2d, kernel_grad=kernel_grad)
      for jit in (jax.jit, compilation.jit):
        dx, dk = jit(jax.grad(lambda x, k: jnp.sum(conv(x, k)), argnums=(0, 1)))(x, kernel)
        assert dx.shape == x.shape and dk.shape == kernel.shape
        np.testing.assert_array_equal(dx, np.zeros(x.shape))  # no position or channel to meet
        np.testing.assert_array_equal(dk, np.zeros(kernel.shape))
  for shape in [(0, 3, 4), (2, 3, 0)]:
    x = jnp.ones(shape, jnp.float32)
    dx, dk = jax.grad(lambda x, k: jnp.sum(convolution.pointwise(x, k)), argnums=(0, 1))(
        x, jnp.ones((shape[-1], 5)))
    assert dx.shape == shape and dk.shape == (shape[-1], 5)
    db = jax.grad(lambda b: jnp.sum(convolution.add_bias(x, b)))(jnp.ones(shape[-1:]))
    np.testing.assert_array_equal(db, np.full(shape[-1:], 2 * 3 * (shape[0] > 0), np.float32))


def test_a_bias_must_have_one_value_per_channel():
  with pytest.raises(ValueError, match=r"a bias of shape \(3,\) for an output with 4 channels"):
    convolution.add_bias(jnp.ones((2, 4)), jnp.ones((3,)))


def _bias_gradient_reductions(add) -> tuple[int, int]:
  """How many reductions and matrix products the compiled gradient of a bias (and a step of SGD
  on it) makes."""
  cpu = jax.devices("cpu")[0]
  rng = np.random.default_rng(0)
  y, g = (jax.device_put(jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32), cpu)
          for _ in range(2))
  bias = jax.device_put(jnp.zeros((16,), jnp.float32), cpu)

  def step(bias):
    grad = jax.grad(lambda b: jnp.sum(jax.nn.relu(add(y, b)) * g))(bias)
    return bias - 0.1 * (grad + 5e-4 * bias)

  text = compilation.jit(step).lower(bias).compile().as_text()
  return (len(re.findall(r"= f32\[16\]\{0\} reduce\(", text)),
          len(re.findall(r"= f32\[[0-9,]*\]\{[0-9,]*\} dot\(", text))
          + text.count('"kind":"__ynn_fusion"'))


def test_a_cpu_bias_gradient_is_a_product_not_a_reduction():
  # XLA:CPU reduces the output gradient over its positions inside the bias's update (jaxlib
  # 0.10); if a later jaxlib stops, `add_bias` may no longer pay: measure again (RESULTS.md).
  assert _bias_gradient_reductions(lambda y, b: y + b) == (1, 0)
  assert _bias_gradient_reductions(convolution.add_bias) == (0, 1)
