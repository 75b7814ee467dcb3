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

Dtype = Any

# torch.nn.GELU() is the exact erf form; flax.linen.gelu defaults to tanh.
gelu = functools.partial(nn.gelu, approximate=False)

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

  The same function is computed in the cheapest exact form: a 1x1 convolution is a matrix
  product (grouped: one per group), a patchify convolution (kernel == stride, no padding)
  is a reshape and a matrix product, a depthwise one goes to `depthwise`; the rest go to XLA's
  convolution. On XLA's CPU backend the matrix forms are 3-4x faster forward and backward.
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
    k, s, p, g = self.kernel, self.stride, self.padding, self.groups
    cin = x.shape[-1]
    if g == cin and self.features == cin and s == 1 and g > 1:
      return self._depthwise(x)
    kernel = self.param('kernel', self.kernel_init, (k, k, cin // g, self.features), jnp.float32)
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    b, h, w, _ = x.shape
    if k == 1 and s == 1 and p == 0:
      if g == 1:
        y = jnp.dot(x, kernel[0, 0])
      else:  # block-diagonal: group i maps channels [i*cin/g, ...) to outputs [i*O/g, ...)
        xg = x.reshape(b, h, w, g, cin // g)
        wg = kernel[0, 0].reshape(cin // g, g, self.features // g)
        y = jnp.einsum('bhwgc,cgo->bhwgo', xg, wg).reshape(b, h, w, self.features)
    elif k == s and p == 0 and g == 1 and h % k == 0 and w % k == 0:
      patches = x.reshape(b, h // k, k, w // k, k, cin).transpose(0, 1, 3, 2, 4, 5)
      y = jnp.dot(patches.reshape(b, h // k, w // k, k * k * cin), kernel.reshape(-1, self.features))
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                       feature_group_count=g)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y

  def _depthwise(self, x):
    k, p = self.kernel, self.padding
    c = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (k, k, 1, c), jnp.float32)
    y = depthwise(x.astype(self.dtype), kernel.astype(self.dtype), p)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (c,), jnp.float32).astype(self.dtype)
    return y


def depthwise_impl(impl: str = 'auto') -> str:
  """'auto': shifted multiply-adds on CPU, XLA's grouped convolution elsewhere."""
  if impl == 'auto':
    return 'shift' if jax.default_backend() == 'cpu' else 'xla'
  if impl not in ('shift', 'xla'):
    raise ValueError(f"depthwise conv impl must be 'auto', 'shift' or 'xla', got {impl!r}.")
  return impl


def depthwise(x, kernel, padding: int, impl: str = 'auto'):
  """k x k depthwise convolution (kernel (k, k, 1, C)), stride 1, symmetric padding.

  XLA's CPU backend runs grouped convolutions, and especially their gradients, one to two
  orders of magnitude slower than dense ones; on CPU the same sum is written as k*k shifted
  multiply-adds, which XLA fuses into one loop (and its gradient into a few).
  Accelerators keep the native grouped convolution.
  """
  k, p, c = kernel.shape[0], padding, x.shape[-1]
  if depthwise_impl(impl) == 'xla':
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=c)
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  h, w = xp.shape[1] - k + 1, xp.shape[2] - k + 1
  return sum(xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0] for i in range(k) for j in range(k))


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
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    count = self.variable('batch_stats', 'num_batches_tracked', jnp.zeros, (), jnp.int32)
    if train:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)  # two-pass: no cancellation
      if not self.is_initializing():
        n = x.size // c
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
