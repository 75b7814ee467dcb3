"""Building blocks shared by the backbones, written to match PyTorch/timm numerics.

Each piece here exists because the Flax default differs from what timm computes:
BatchNorm (momentum convention and the unbiased running variance), GELU (Flax
defaults to the tanh approximation), torch-style symmetric conv padding, and the
PyTorch default initialisers used where timm leaves a layer at its default.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pat_jax import kernels

Dtype = Any


# torch.nn.GELU(): the exact erf form (flax.linen.gelu defaults to tanh), in the form
# `kernels.form('gelu')` selects for the backend.
gelu = kernels.gelu

# timm's LayerNorm eps for ViT/DeiT/ConvNeXt/Mixer.
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-6)

# timm's trunc_normal_(std=.02) truncates at +-2 absolute, i.e. +-100 std: a
# plain normal is the same distribution for all practical purposes.
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)

# PyTorch's default Linear/Conv weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_default_bias(fan_in: int):
  """PyTorch's default bias init for Linear/Conv: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def conv(features, kernel, stride=1, padding=0, groups=1, use_bias=True, dtype=jnp.float32,
         name=None, kernel_init=torch_default_kernel, bias_init=nn.initializers.zeros):
  """A Conv2d with PyTorch's symmetric integer padding (Flax 'SAME' differs at stride 2)."""
  return Conv(features, kernel, stride, padding, groups, use_bias, kernel_init, bias_init, dtype,
              name=name)


class Conv(nn.Module):
  """Conv2d, NHWC, with nn.Conv's parameters (kernel (k, k, I/groups, O), bias (O,)).

  The computation is `conv_apply`'s (each convolution in the form `kernels` selects for the
  backend).
  """
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  use_bias: bool = True
  kernel_init: Any = torch_default_kernel
  bias_init: Any = nn.initializers.zeros
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel, bias = _conv_params(self, x.shape[-1])
    return conv_apply(x, kernel, bias, self.stride, self.padding, self.groups, self.dtype)


def _conv_params(module, in_features: int):
  """(kernel, bias) of a `Conv` or `ConvWeights`, declared on `module` (inside its compact call)."""
  k, g = module.kernel, module.groups
  kernel = module.param('kernel', module.kernel_init, (k, k, in_features // g, module.features),
                        jnp.float32)
  bias = (module.param('bias', module.bias_init, (module.features,), jnp.float32)
          if module.use_bias else None)
  return kernel, bias


class ConvWeights(nn.Module):
  """A `Conv`'s parameters alone (same names, shapes and initialisers): `(kernel, bias)`,
  for modules that compute with them in a form of their own (`conv_apply` or algebra)."""
  features: int
  kernel: int
  groups: int = 1
  use_bias: bool = True
  kernel_init: Any = torch_default_kernel
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, in_features: int):
    return _conv_params(self, in_features)


def conv_apply(x, kernel, bias=None, stride: int = 1, padding: int = 0, groups: int = 1,
               dtype: Dtype = jnp.float32):
  """Conv2d (NHWC, kernel (k, k, I/groups, O), PyTorch's symmetric integer padding), in the
  forms `kernels.conv2d` selects for the backend (1x1 and patchify convolutions as matrix
  products and depthwise ones as shifted multiply-adds on CPU; the same function)."""
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  y = kernels.conv2d(x, kernel, stride, padding, groups)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch semantics over the last axis.

  Train mode normalises with the biased batch variance and updates the running
  variance with the unbiased one (x n/(n-1)), momentum 0.1 in PyTorch's
  convention, and counts `num_batches_tracked`; flax.linen.BatchNorm updates with
  the biased variance. Under jit with a batch sharded over devices the mean is
  over the global batch.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  scale_init: Any = nn.initializers.ones
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, counts=None):
    """`counts` (optional, a static array of x's per-sample spatial shape x.shape[1:-1]): how
    many times each cell counts in the batch statistics, as if x had first been resampled
    into a map where it appears that often (e.g. nearest upsampling). None: once each."""
    c = x.shape[-1]
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    count = self.variable('batch_stats', 'num_batches_tracked', jnp.zeros, (), jnp.int32)
    if train:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      if counts is None:
        n = x.size // c
        mean = xf.mean(axes)
        var = jnp.square(xf - mean).mean(axes)  # two-pass: no cancellation
      else:
        counts = np.asarray(counts, np.float32)
        if counts.shape != x.shape[1:-1]:
          raise ValueError(f'BatchNorm counts of shape {counts.shape} for input {x.shape}.')
        w = counts[None, ..., None]
        n = int(round(float(counts.sum()))) * x.shape[0]
        mean = (xf * w).sum(axes) / n
        var = (jnp.square(xf - mean) * w).sum(axes) / n
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        count.value = count.value + 1
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = (x.astype(jnp.float32) - mean) * mul + bias
    return y.astype(self.dtype)


class DropPath(nn.Module):
  """Stochastic depth per sample (timm DropPath): needs the 'dropout' rng in train mode."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Mlp(nn.Module):
  """timm's Mlp: fc1 -> exact GELU -> fc2 (dropout rates are 0 in every recipe here)."""
  hidden: int
  out: int
  kernel_init: Any = trunc_normal_02
  bias_init: Any = nn.initializers.zeros
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, kernel_init=self.kernel_init, bias_init=self.bias_init,
                              dtype=self.dtype)
    return dense(self.out, name='fc2')(gelu(dense(self.hidden, name='fc1')(x)))


def drop_path_rates(rate: float, depth: int):
  """timm's linearly increasing per-block drop-path rates."""
  if depth <= 1:
    return [0.0] * depth
  return [rate * i / (depth - 1) for i in range(depth)]


def maybe_remat(block_cls, remat: bool):
  """The block class, rematerialised (activations recomputed in the backward pass) if asked.

  `train` (the call's second positional argument) is static.
  """
  return nn.remat(block_cls, static_argnums=(2,)) if remat else block_cls


def hook(stage_hook, index, x):
  """Applies the optional stage-input hook (the AFP prompt insertion point)."""
  return x if stage_hook is None else stage_hook(index, x)
