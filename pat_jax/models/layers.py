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

Dtype = Any


@jax.custom_vjp
def gelu(x):
  """torch.nn.GELU(): the exact erf form (flax.linen.gelu defaults to tanh).

  Its own gradient rule keeps one residual, x, and computes Phi(x) + x phi(x) in the backward
  pass: differentiating the formula made XLA keep six full-size intermediates per MLP (most
  of a ConvNeXt's activation memory, and a memory-bound backward fusion).
  """
  return nn.gelu(x, approximate=False)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
  return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)

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

  The computation is `conv_apply`'s (the cheapest exact form of each convolution).
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
  """Conv2d (NHWC, kernel (k, k, I/groups, O), PyTorch's symmetric integer padding).

  The same function is computed in the cheapest exact form: a 1x1 convolution is a matrix
  product (grouped: one per group), a patchify convolution (kernel == stride, no padding)
  is a reshape and a matrix product, a depthwise one goes to `depthwise`; the rest go to XLA's
  convolution. On XLA's CPU backend the matrix forms are 3-4x faster forward and backward.
  """
  k, s, p, g = kernel.shape[0], stride, padding, groups
  b, h, w, cin = x.shape
  features = kernel.shape[-1]
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if g == cin and features == cin and s == 1 and g > 1:
    y = depthwise(x, kernel, p)
  elif k == 1 and s == 1 and p == 0:
    if g == 1:
      y = jnp.dot(x, kernel[0, 0])
    else:  # block-diagonal: group i maps channels [i*cin/g, ...) to outputs [i*O/g, ...)
      xg = x.reshape(b, h, w, g, cin // g)
      wg = kernel[0, 0].reshape(cin // g, g, features // g)
      y = jnp.einsum('bhwgc,cgo->bhwgo', xg, wg).reshape(b, h, w, features)
  elif k == s and p == 0 and g == 1 and h % k == 0 and w % k == 0:
    patches = x.reshape(b, h // k, k, w // k, k, cin).transpose(0, 1, 3, 2, 4, 5)
    y = jnp.dot(patches.reshape(b, h // k, w // k, k * k * cin), kernel.reshape(-1, features))
  else:
    y = jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     feature_group_count=g)
  if bias is not None:
    y = y + bias.astype(dtype)
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
  multiply-adds, which XLA fuses into one loop (`shifted_depthwise`). Accelerators keep the
  native grouped convolution.
  """
  p, c = padding, x.shape[-1]
  if depthwise_impl(impl) == 'xla':
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=c)
  return shifted_depthwise(x, kernel, p)


def _shift_add(x, kernel, padding: int):
  k = kernel.shape[0]
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h, w = xp.shape[1] - k + 1, xp.shape[2] - k + 1
  return sum(xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0] for i in range(k) for j in range(k))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def shifted_depthwise(x, kernel, padding: int):
  """Depthwise convolution as k*k shifted multiply-adds, with its own gradient rule.

  The input gradient is the same shift-add with the kernel flipped (padding k-1-p);
  differentiating the forward instead gave XLA a sum of k*k padded tensors that ran 8x
  slower (40 ms per ConvNeXt-T stage-0 block at batch 8, most of the prompted teacher's
  backward). The kernel gradient is one reduction per tap (XLA drops it where the kernel
  is not differentiated, as for the frozen teacher).
  """
  return _shift_add(x, kernel, padding)


def _shifted_depthwise_fwd(x, kernel, padding):
  return _shift_add(x, kernel, padding), (x, kernel)


def _shifted_depthwise_bwd(padding, res, g):
  x, kernel = res
  k = kernel.shape[0]
  dx = _shift_add(g, kernel[::-1, ::-1], k - 1 - padding)
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h, w = g.shape[1], g.shape[2]
  dk = jnp.stack([jnp.stack([(xp[:, i:i + h, j:j + w, :] * g).astype(jnp.float32).sum((0, 1, 2))
                            for j in range(k)])
                  for i in range(k)])
  return dx.astype(x.dtype), dk[:, :, None, :].astype(kernel.dtype)


shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


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
