"""Conv2d (NHWC, kernel (k, k, I/groups, O), stride, PyTorch's symmetric integer padding).

Two ops have a matrix-product form ('matmul'; 'xla' is XLA's convolution):
  * pointwise_conv: a 1x1 convolution is a matrix product (grouped: one per group);
  * patchify_conv: a convolution with kernel == stride and no padding (the ConvNeXt stem and
    downsamples, the ViT patch embedding) is a reshape and a matrix product.
XLA:CPU ran these, and above all their gradients, slower than the matrix products
(docs/BENCHMARKS.md). Depthwise convolutions go to `depthwise` (their own op); other
convolutions are XLA's.
"""
import jax
import jax.numpy as jnp

from pat_jax.kernels.depthwise_conv import depthwise
from pat_jax.kernels.forms import form


def xla_conv(x, kernel, stride: int = 1, padding: int = 0, groups: int = 1):
  s, p = stride, padding
  return jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=groups)


def matmul_op(x, kernel, stride: int = 1, padding: int = 0, groups: int = 1):
  """'pointwise_conv' or 'patchify_conv' when the convolution has a matrix-product form, else
  None."""
  k, s, p, g = kernel.shape[0], stride, padding, groups
  _, h, w, _ = x.shape
  if k == 1 and s == 1 and p == 0:
    return 'pointwise_conv'
  if k == s and p == 0 and g == 1 and h % k == 0 and w % k == 0:
    return 'patchify_conv'
  return None


def matmul_conv(x, kernel, stride: int = 1, padding: int = 0, groups: int = 1):
  """The convolution as a matrix product, or None when it is not a 1x1 or patchify one."""
  op = matmul_op(x, kernel, stride, padding, groups)
  k, g = kernel.shape[0], groups
  b, h, w, cin = x.shape
  features = kernel.shape[-1]
  if op == 'pointwise_conv':
    if g == 1:
      return jnp.dot(x, kernel[0, 0])
    # block-diagonal: group i maps channels [i*cin/g, ...) to outputs [i*O/g, ...)
    xg = x.reshape(b, h, w, g, cin // g)
    wg = kernel[0, 0].reshape(cin // g, g, features // g)
    return jnp.einsum('bhwgc,cgo->bhwgo', xg, wg).reshape(b, h, w, features)
  if op == 'patchify_conv':
    patches = x.reshape(b, h // k, k, w // k, k, cin).transpose(0, 1, 3, 2, 4, 5)
    return jnp.dot(patches.reshape(b, h // k, w // k, k * k * cin), kernel.reshape(-1, features))
  return None


def conv2d(x, kernel, stride: int = 1, padding: int = 0, groups: int = 1):
  """The convolution (no bias), in the forms `form('pointwise_conv')`, `form('patchify_conv')`
  and `form('depthwise_conv')` select."""
  cin, features = x.shape[-1], kernel.shape[-1]
  if groups == cin and features == cin and stride == 1 and groups > 1:
    return depthwise(x, kernel, padding)
  op = matmul_op(x, kernel, stride, padding, groups)
  if op is not None and form(op) == 'matmul':
    return matmul_conv(x, kernel, stride, padding, groups)
  return xla_conv(x, kernel, stride, padding, groups)
