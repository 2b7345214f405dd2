"""The networks' k x k convolutions (NHWC, HWIO, padded as PyTorch) and how they are differentiated.

`conv2d` is `jax.lax.conv_general_dilated` with PyTorch's symmetric padding. On a CPU that is the
only device, in float32, it is oneDNN's convolution with oneDNN's gradients where the package
could build them (`onednn`, which says why and when). Everywhere else its value is XLA's
convolution and its gradients are chosen per platform, all the same numbers up to float
rounding:

- input gradient, stride 1 on a CPU: the convolution of the output gradient with the kernel's
  channels swapped, on both sides mirrored in H and W (instead of the kernel mirrored). XLA:CPU
  (jaxlib 0.10) builds its own input gradient from a copy of the kernel mirrored and transposed
  in one loop, which ran at ~0.4 GB/s: 212 ms per step for ResNet-38's b7 kernel (3x3, 1024 ->
  2048) on a 2-core AMD EPYC without AVX-512, where the plain transpose takes 41 ms and the
  mirrored activations are small (experiments/RESULTS.md, "The kernel's mirrored copy").
  Where the output gradient has fewer positions (B * H * W) than channels, as in ResNet-38's
  dilated blocks at batch 1, even the plain transpose costs more than half the product it
  feeds: there (with affinity_jax.compilation's options) the input gradient is one matrix
  product with the kernel read as stored and its k * k column blocks added back at their shifts
  (`input_grad_products`; RESULTS.md, "The input gradient without the kernel's transpose").
  Elsewhere, and for strided convolutions, XLA's own.
- kernel gradient: XLA's own, or with `kernel_grad="products"` the k * k matrix products of the
  shifted inputs and the output gradient (each a sum over B, H, W), which beat cuDNN's on an H200
  GPU (VGG-16's AffinityNet step 1.29x in float32, 1.51x in bfloat16; RESULTS.md, "On a GPU,
  second lease") and YNNPACK's on a CPU; on a CPU where affinity_jax.compilation keeps YNNPACK
  to matrix products XLA's own is faster still (RESULTS.md, "YNNPACK's convolutions"), so there
  it is XLA's in either case, except with few positions (as above), where it is one product of
  the k * k shifted inputs side by side and the output gradient, written as the kernel is
  stored (`kernel_grad_columns`), instead of XLA's transposes of both. A CPU without those
  options keeps XLA's kernel gradient (or the products where asked) and the mirrored input
  gradient whatever the positions: the products were measured only with them.

`pointwise` (a 1x1 convolution as a product over the channels) and `add_bias` give their
kernel and bias gradients as matrix products laid out as XLA:CPU reads them best (their
docstrings), on every platform; their values are `jnp.dot`'s and `+`'s.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from affinity_jax import compilation
from affinity_jax.models import onednn

KERNEL_GRADS = ("xla", "products")


def _rows(x: jax.Array) -> jax.Array:
  """x [..., C] as [positions, C] (zero-size dimensions included)."""
  return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _summed_over_positions(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [..., C] and b [..., O] (the same positions) -> [C, O]: the sum over the positions of
  their outer products, one matrix product laid out as a kernel is stored."""
  return jax.lax.dot_general(_rows(a), _rows(b), (((0,), (0,)), ((), ())))


def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 1x1 convolution: x [..., C] times kernel [C, O] over the channels, as `jnp.dot`, with the
  kernel gradient as the product of x and the output gradient summed over every position,
  [C, O] as the kernel is stored.

  JAX differentiates `jnp.dot` into the product [O, C] transposed, which XLA:CPU (jaxlib 0.10)
  folds into the product by wanting the output gradient's channels major: it then writes the
  output gradient's whole fusion once more in that order, reading each of its inputs across the
  channels. Behind AffinityNet's pair affinities (a sum of 68 shifted terms), a 4096 -> 448 1x1
  convolution's and the affinities' gradients at batch 1, 20 x 20 positions took 83 ms with
  `jnp.dot` and 29 ms with this form on a 2-core Xeon with AVX-512 (experiments/RESULTS.md,
  "The 1x1 kernel gradient and the bias gradient"). Both sum the same products alike: the
  gradients are the same numbers. On every platform (not measured on a GPU or TPU, where the
  products run at the backend's default precision, as `jnp.dot`'s own).
  """
  return _pointwise(x, kernel)


@jax.custom_vjp
def _pointwise(x, kernel):
  return jnp.dot(x, kernel)


def _pointwise_fwd(x, kernel):
  return jnp.dot(x, kernel), (x, kernel)


def _pointwise_bwd(saved, grad):
  x, kernel = saved
  dx = jax.lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
  return dx.astype(x.dtype), _summed_over_positions(x, grad).astype(kernel.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y [..., O] + bias [O] (both in their common dtype), with the bias gradient as the product
  of a row of ones and the output gradient [positions, O], accumulated in float32 or wider at
  the highest precision (a GPU's or TPU's default would round each term first).

  The same sum as XLA's reduction of the output gradient over its positions, which XLA:CPU
  (jaxlib 0.10) fuses into the optimiser's update of the bias, one strided column per channel:
  17.6 ms for VGG-16's conv5_3 (1568 positions x 512 channels) in the trace of AffinityNet's
  step, whose update fusions fell from 134 to 47 ms with this form; alone, that bias's gradient
  and update take 4.7 ms, 0.5 ms as a product (experiments/RESULTS.md, "The 1x1 kernel gradient
  and the bias gradient"). Not measured on a GPU or TPU."""
  if bias.shape != y.shape[-1:]:
    raise ValueError(f"a bias of shape {tuple(bias.shape)} for an output with {y.shape[-1]} "
                     "channels: expected one value per channel")
  dtype = jnp.result_type(y, bias)
  return _add_bias(y.astype(dtype), bias.astype(dtype))


@jax.custom_vjp
def _add_bias(y, bias):
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, bias


def _add_bias_bwd(bias, grad):
  rows = _rows(grad)
  ones = jnp.ones((rows.shape[0],), rows.dtype)
  db = jax.lax.dot_general(ones, rows, (((0,), (0,)), ((), ())),
                           precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.promote_types(rows.dtype, jnp.float32))
  return grad, db.astype(bias.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def conv_nhwc(x: jax.Array, kernel: jax.Array, stride: int = 1, dilation: int = 1) -> jax.Array:
  """x [B, H, W, C] * kernel [k, k, C, O] (odd k), padded by dilation * (k - 1) / 2 on each
  side as PyTorch (stride 2 gives ceil(H / 2) rows), XLA's gradients."""
  pad = dilation * (kernel.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      rhs_dilation=(dilation, dilation),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, dilation: int = 1,
           kernel_grad: str = "xla") -> jax.Array:
  """`conv_nhwc` by oneDNN where `onednn.applies`, else with the gradients of the module
  docstring; `kernel_grad` "xla" or "products" (a stride-1 convolution's kernel gradient on a
  GPU, or on a CPU without oneDNN and without affinity_jax.compilation's options)."""
  if kernel_grad not in KERNEL_GRADS:
    raise ValueError(f"kernel_grad {kernel_grad!r}: expected one of {KERNEL_GRADS}")
  if kernel.shape[0] % 2 == 0 or kernel.shape[0] != kernel.shape[1]:
    return conv_nhwc(x, kernel, stride, dilation)
  if onednn.applies(x, kernel, stride, dilation):
    return onednn.conv2d(x, kernel, stride, dilation)
  if stride != 1:
    return conv_nhwc(x, kernel, stride, dilation)
  return _conv(x, kernel, dilation, kernel_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, dilation, kernel_grad):
  return conv_nhwc(x, kernel, 1, dilation)


def _conv_fwd(x, kernel, dilation, kernel_grad):
  return conv_nhwc(x, kernel, 1, dilation), (x, kernel)


def input_grad_xla(grad, kernel, dilation):
  """XLA's own input gradient of a stride-1 `conv_nhwc` (it does not depend on x's values)."""
  x = jax.ShapeDtypeStruct(grad.shape[:-1] + kernel.shape[2:3], grad.dtype)
  return jax.linear_transpose(lambda x: conv_nhwc(x, kernel, 1, dilation), x)(grad)[0]


def input_grad_mirrored(grad, kernel, dilation):
  """The input gradient as the convolution of the mirrored output gradient with the kernel's
  channels swapped, mirrored back: the kernel is transposed but never mirrored."""
  mirrored = conv_nhwc(grad[:, ::-1, ::-1], jnp.swapaxes(kernel, 2, 3), 1, dilation)
  return mirrored[:, ::-1, ::-1]


def input_grad_products(grad, kernel, dilation):
  """The input gradient as one matrix product: the output gradient [positions, O] times the
  kernel as stored ([k * k * C, O], O contracted), whose k * k blocks of C columns are then
  added back at their taps' shifts (col2im). The kernel is never copied; the product's result
  is k * k times the input gradient's size, so this pays only where there are fewer positions
  than the kernel's output channels (`_conv_bwd`). The blocks are products and sums in float32
  or wider, rounded to the gradient's dtype once at the end, as a convolution's result."""
  b, h, w, o = grad.shape
  k, c = kernel.shape[0], kernel.shape[2]
  pad = dilation * (k - 1) // 2
  cols = jax.lax.dot_general(_rows(grad), kernel.reshape(k * k * c, o), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.promote_types(grad.dtype, jnp.float32))
  cols = jnp.pad(cols.reshape(b, h, w, k, k, c), ((0, 0), (pad, pad), (pad, pad), (0, 0), (0, 0),
                                                  (0, 0)))
  # x at p met tap (i, j) in the output at p + pad - (i, j) * dilation.
  taps = [cols[:, 2 * pad - i * dilation:2 * pad - i * dilation + h,
               2 * pad - j * dilation:2 * pad - j * dilation + w, i, j]
          for i in range(k) for j in range(k)]
  return functools.reduce(jnp.add, taps).astype(grad.dtype)


def _few_positions(grad: jax.Array) -> bool:
  """Whether the output gradient [B, H, W, O] has fewer positions (B * H * W) than channels:
  where a CPU's gradients read the kernel as stored (module docstring)."""
  return math.prod(grad.shape[:-1]) < grad.shape[-1]


def input_grad_cpu(grad, kernel, dilation):
  """A CPU's input gradient: `input_grad_products` with few positions (and
  affinity_jax.compilation's options), else `input_grad_mirrored` (module docstring)."""
  if _few_positions(grad) and compilation.compiler_options():
    return input_grad_products(grad, kernel, dilation)
  return input_grad_mirrored(grad, kernel, dilation)


def kernel_grad_xla(x, grad, kernel, dilation):
  return jax.vjp(lambda kernel: conv_nhwc(x, kernel, 1, dilation), kernel)[1](grad)[0]


def _shifted_inputs(x: jax.Array, k: int, dilation: int) -> list[jax.Array]:
  """The k * k views of x [B, H, W, C], zero-padded as the convolution, that tap (i, j) of a k x
  k kernel meets at each output position, in the kernel's row-major tap order."""
  h, w = x.shape[1:3]
  pad = dilation * (k - 1) // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return [xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w]
          for i in range(k) for j in range(k)]


def kernel_grad_products(x, grad, kernel, dilation):
  """The kernel gradient as k * k matrix products of shifted inputs and the output gradient."""
  taps = [jnp.einsum("bhwc,bhwo->co", shifted, grad)
          for shifted in _shifted_inputs(x, kernel.shape[0], dilation)]
  return jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)


def kernel_grad_columns(x, grad, kernel, dilation):
  """The kernel gradient as one matrix product: the k * k shifted inputs side by side
  [positions, k * k * C] times the output gradient [positions, O], summed over the positions,
  which is [k * k * C, O] as the kernel is stored."""
  columns = jnp.stack(_shifted_inputs(x, kernel.shape[0], dilation), axis=3)
  columns = columns.reshape(x.shape[:3] + (columns.shape[3] * columns.shape[4],))
  return _summed_over_positions(columns, grad).reshape(kernel.shape).astype(kernel.dtype)


def kernel_grad_cpu(x, grad, kernel, dilation):
  """A CPU's kernel gradient (with affinity_jax.compilation's options): `kernel_grad_columns`
  with few positions, else XLA's own (module docstring)."""
  if _few_positions(grad):
    return kernel_grad_columns(x, grad, kernel, dilation)
  return kernel_grad_xla(x, grad, kernel, dilation)


def _conv_bwd(dilation, kernel_grad, saved, grad):
  x, kernel = saved
  dx = jax.lax.platform_dependent(grad, kernel, default=functools.partial(input_grad_xla,
                                                                            dilation=dilation),
                                  cpu=functools.partial(input_grad_cpu, dilation=dilation))
  kernel_grads = {"xla": kernel_grad_xla, "products": kernel_grad_products}
  default = functools.partial(kernel_grads[kernel_grad], dilation=dilation)
  cpu = (functools.partial(kernel_grad_cpu, dilation=dilation)
         if compilation.compiler_options() else default)
  dk = jax.lax.platform_dependent(x, grad, kernel, default=default, cpu=cpu)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)
