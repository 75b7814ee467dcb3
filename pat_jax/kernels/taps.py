"""`taps_dot`: einsum('bijc,ijco->bo', u, kernel), each sample's window sums (B, k, k, C)
through a k x k kernel (the pooled PromptBlock's fusion convolution, `prompts.conv_chain_mean`).

'rule' has its own gradient rule only so that the input gradient contracts the kernel as the
row-major left operand ((ijc, o) x (b, o) -> (ijc, b), then a small transpose). XLA's
derivative (b, o) x (ijc, o)^T made XLA:CPU copy every 5x5 fusion kernel into transposed
layouts each step (docs/BENCHMARKS.md), for a product of batch-size rows. 'xla': the einsum
and XLA's derivative.
"""
import jax
import jax.numpy as jnp

from pat_jax.kernels.forms import form


def taps_dot_xla(u, kernel):
  return jnp.einsum('bijc,ijco->bo', u, kernel)


@jax.custom_vjp
def taps_dot_rule(u, kernel):
  return taps_dot_xla(u, kernel)


def _taps_dot_fwd(u, kernel):
  return taps_dot_xla(u, kernel), (u, kernel)


def _taps_dot_bwd(res, g):
  u, kernel = res
  du = jnp.transpose(jnp.einsum('ijco,bo->ijcb', kernel, g), (3, 0, 1, 2))
  return du.astype(u.dtype), jnp.einsum('bijc,bo->ijco', u, g).astype(kernel.dtype)


taps_dot_rule.defvjp(_taps_dot_fwd, _taps_dot_bwd)


def taps_dot(u, kernel):
  """einsum('bijc,ijco->bo', u, kernel) in the form `form('taps_dot')` selects."""
  return taps_dot_rule(u, kernel) if form('taps_dot') == 'rule' else taps_dot_xla(u, kernel)
