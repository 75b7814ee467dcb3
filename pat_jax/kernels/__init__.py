"""Backend-specific fast forms, chosen per backend in one place (`forms.TABLE`).

Every fast form computes the same function as the plain form it replaces (values and
gradients; they differ by float rounding only), so the choice never changes parameters,
checkpoints or results beyond rounding (`tests/test_fast_forms.py`). Models and PAT modules
call the ops here, or ask `form(op)`; they never look at the backend themselves.

  op              plain     fast      cpu     gpu/tpu  why
  gelu            xla       rule      rule    xla      own gradient rule: one residual instead
                                                       of XLA:CPU's six full-size ones; a
                                                       workaround of XLA:CPU's fusion
  depthwise_conv  xla       shift     shift   xla      k*k shifted multiply-adds with their own
                                                       gradient rule; XLA:CPU's grouped
                                                       convolutions are slow, accelerators
                                                       have native ones
  pointwise_conv  xla       matmul    matmul  xla      1x1 convolutions (grouped too) as matrix
                                                       products (same FLOPs); XLA:CPU's
                                                       convolutions are slow
  patchify_conv   xla       matmul    matmul  xla      kernel == stride convolutions as a
                                                       reshape and a matrix product (same)
  taps_dot        xla       rule      rule    xla      a gradient rule that only chooses the
                                                       operand order XLA:CPU lays out best
  prompt_chain    direct    pooled    pooled  pooled   the faithful SE gate sees a conv chain
                                                       only through its spatial mean: O(HWC +
                                                       25C^2) instead of O(25HWC^2) FLOPs, a
                                                       saving on every backend
  aligner_resize  first     last      last    last     BatchNorm + 1x1 conv before a nearest
                                                       upsampling: 50-200x fewer FLOPs and
                                                       bytes on every backend

Overrides (tests, benchmarks): `with kernels.use('plain'):`, `kernels.use(gelu='xla')`, or
PAT_JAX_KERNELS=plain / PAT_JAX_KERNELS=depthwise_conv=xla,gelu=xla in the environment
(`forms` has the rules). `python -m pat_jax.kernels.bench --json` times each fast form
against its plain form on the current backend.

The XLA:CPU flags (`pat_jax/xla_cpu.py`) are the other CPU-only setting: they are set before
JAX starts its backends, so before the backend is known, and XLA's other backends ignore them.
"""
from pat_jax.kernels.convolutions import conv2d, matmul_conv, matmul_op, xla_conv
from pat_jax.kernels.depthwise_conv import depthwise, shifted_depthwise, xla_depthwise
from pat_jax.kernels.forms import (BACKENDS, ENV, PLAIN, TABLE, backend_name, default, form,
                                   parse, resolved, use)
from pat_jax.kernels.activations import gelu, gelu_rule, gelu_xla
from pat_jax.kernels.taps import taps_dot, taps_dot_rule, taps_dot_xla

__all__ = [
    'BACKENDS', 'ENV', 'PLAIN', 'TABLE', 'backend_name', 'conv2d', 'default', 'depthwise', 'form',
    'gelu', 'gelu_rule', 'gelu_xla', 'matmul_conv', 'matmul_op', 'parse', 'resolved', 'shifted_depthwise',
    'taps_dot', 'taps_dot_rule', 'taps_dot_xla', 'use', 'xla_conv', 'xla_depthwise',
]
