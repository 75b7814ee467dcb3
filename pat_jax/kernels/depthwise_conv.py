"""k x k depthwise convolution, stride 1, symmetric padding: 'xla' is XLA's grouped
convolution, 'shift' the same sum as k*k shifted multiply-adds with its own gradient rule.

XLA's CPU backend runs grouped convolutions, and above all their gradients, far slower than
dense ones (docs/BENCHMARKS.md); written as shifted multiply-adds, XLA fuses the sum into one
loop. Accelerators have native depthwise convolutions.
"""
import functools

import jax
import jax.numpy as jnp

from pat_jax.kernels.forms import form

_DN = ('NHWC', 'HWIO', 'NHWC')


def xla_depthwise(x, kernel, padding: int):
  """XLA's grouped convolution (kernel (k, k, 1, C))."""
  p = padding
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)), dimension_numbers=_DN,
                                      feature_group_count=x.shape[-1])


def _shift_add(x, kernel, padding: int):
  k = kernel.shape[0]
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h, w = xp.shape[1] - k + 1, xp.shape[2] - k + 1
  return sum(xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0] for i in range(k) for j in range(k))


def _shift_add_once(x, kernel, padding: int):
  """`_shift_add`, computed once however many ops read its result.

  XLA sees the k*k multiply-adds as cheap elementwise code and fuses a copy of them into every
  consumer: in a ConvNeXt block the LayerNorm's mean, its variance and its normalisation each
  recomputed the whole convolution (three, four where the output is also saved for the
  backward pass; `jax.lax.optimization_barrier` does not stop it: XLA:CPU removes barriers
  before fusing). A conditional's branch is a fusion boundary, so the sum runs once and is
  stored. Both branches are the same function (the predicate is false only for a NaN kernel
  entry), so the result is the same either way."""
  first = kernel.reshape(-1)[0]
  fn = functools.partial(_shift_add, padding=padding)
  return jax.lax.cond(first == first, fn, fn, x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def shifted_depthwise(x, kernel, padding: int):
  """Depthwise convolution as k*k shifted multiply-adds, with its own gradient rule.

  The input gradient is the same shift-add with the kernel flipped (padding k-1-p);
  differentiating the forward instead gave XLA a sum of k*k padded tensors that ran several
  times slower on CPU (docs/BENCHMARKS.md). The kernel gradient is XLA's own (the derivative
  of `xla_depthwise`): one reduction per tap made XLA:CPU materialise all k*k products. XLA
  drops it where the kernel is not differentiated, as for the frozen teacher.
  """
  return _shift_add_once(x, kernel, padding)


def _shifted_depthwise_fwd(x, kernel, padding):
  # Symbolic zeros tell which inputs carry gradients: x is kept only for the kernel's gradient,
  # so a frozen kernel (the teacher's) saves nothing but itself. XLA drops the unused residual
  # in an unrolled network; inside a lax.scan (teacher.scan_blocks) it could not.
  keep_x = kernel.perturbed
  x, kernel = x.value, kernel.value
  saved = x if keep_x else jnp.zeros((0,), x.dtype)  # empty: x's dtype alone
  return _shift_add_once(x, kernel, padding), (saved, kernel)


def _shifted_depthwise_bwd(padding, res, g):
  x, kernel = res
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None
  k = kernel.shape[0]
  dx = _shift_add(g, kernel[::-1, ::-1], k - 1 - padding).astype(x.dtype)
  if x.size == 0:
    return dx, None
  _, kernel_vjp = jax.vjp(lambda w: xla_depthwise(x, w, padding), kernel)
  dk, = kernel_vjp(g)
  return dx, dk.astype(kernel.dtype)


shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd, symbolic_zeros=True)


def depthwise(x, kernel, padding: int):
  """Depthwise convolution (kernel (k, k, 1, C)) in the form `form('depthwise_conv')` selects."""
  if form('depthwise_conv') == 'shift':
    return shifted_depthwise(x, kernel, padding)
  return xla_depthwise(x, kernel, padding)
