"""Exact (erf) GELU, torch.nn.GELU(): 'xla' differentiates the formula, 'rule' has its own
gradient rule."""
import math

import jax
import jax.numpy as jnp

from pat_jax.kernels.forms import form


def gelu_xla(x):
  """The erf form (flax.linen.gelu defaults to the tanh approximation), XLA's derivative."""
  return jax.nn.gelu(x, approximate=False)


@jax.custom_vjp
def gelu_rule(x):
  """`gelu_xla` with its own gradient rule: one residual, x, and Phi(x) + x phi(x) computed
  in the backward pass. Differentiating the formula made XLA:CPU keep six full-size
  intermediates per MLP (most of a ConvNeXt's activation memory, and a memory-bound backward
  fusion). Same values; the gradient differs by float rounding."""
  return gelu_xla(x)


def _gelu_fwd(x):
  return gelu_xla(x), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
  return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(g.dtype),)


gelu_rule.defvjp(_gelu_fwd, _gelu_bwd)


def gelu(x):
  """torch.nn.GELU() in the form `kernels.form('gelu')` selects."""
  return gelu_rule(x) if form('gelu') == 'rule' else gelu_xla(x)
