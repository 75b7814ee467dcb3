"""The fast forms (`pat_jax.kernels`) equal the plain computations they replace, values and
gradients: the pooled PromptBlock (faithful SE gate), BatchNorm and 1x1 conv before a nearest
upsampling in the aligners, 1x1 and patchify convolutions as matrix products, the depthwise
convolution's, GELU's and `taps_dot`'s own gradient rules. Which form each backend takes:
tests/test_kernels.py."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pat_jax import kernels
from pat_jax.distill import pat_modules as pm
from pat_jax.distill import prompts, projectors
from pat_jax.models import layers

HIGHEST = functools.partial(jax.default_matmul_precision, 'highest')


def _rand(key, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _perturb(tree, seed):
  """Every parameter moved off its initial value (beta = 0 would hide the prompt)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x
                            for x, k in zip(leaves, keys)])


def _assert_close(a, b, rtol=2e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(np.abs(y).max(), 1e-6)
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('in_shape,out_shape,x_shape,fb', [
    ((4, 4, 48), (8, 8, 32), (2, 8, 8, 32), True),    # map, fb_aligner upsamples 4 -> 8
    ((8, 8, 32), (8, 8, 32), (2, 8, 8, 32), True),    # map, identity feedback
    ((7, 7, 32), (7, 7, 32), (2, 7, 7, 32), False),   # map, first step (no feedback)
    ((49, 32), (50, 32), (2, 50, 32), True),          # sequence with a cls token
    ((3, 3, 32), (3, 3, 32), (2, 3, 3, 32), True),    # map smaller than the 5x5 window
])
def test_pooled_prompt_block_equals_direct(in_shape, out_shape, x_shape, fb):
  x = _rand(0, x_shape)
  feedback = _rand(1, (2,) + in_shape) if fb else None
  direct = pm.PromptBlock(in_shape, out_shape, pooled=False)
  pooled = pm.PromptBlock(in_shape, out_shape, pooled=True)
  variables = direct.init(jax.random.key(2), x, feedback, True)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      pooled.init(jax.random.key(2), x, feedback, True))
  params = _perturb(variables['params'], 3)

  def run(module, p, x):
    y, upd = module.apply({**variables, 'params': p}, x, feedback, True, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(y) * x), (y, upd)

  grad = lambda m: jax.jit(jax.value_and_grad(functools.partial(run, m), argnums=(0, 1),
                                              has_aux=True))
  with HIGHEST():
    (_, (y_d, s_d)), g_d = grad(direct)(params, x)
    (_, (y_p, s_p)), g_p = grad(pooled)(params, x)
  _assert_close(y_p, y_d)
  _assert_close(s_p, s_d)
  _assert_close(g_p, g_d, rtol=1e-4)


def test_pooled_prompt_is_not_used_for_se_scale():
  # se_mode='scale' (corrected Q2) needs the full maps: `pooled` must not change it.
  x, fb = _rand(0, (2, 6, 6, 32)), _rand(1, (2, 6, 6, 32))
  a = pm.PromptBlock((6, 6, 32), (6, 6, 32), se_mode='scale', pooled=True)
  b = pm.PromptBlock((6, 6, 32), (6, 6, 32), se_mode='scale', pooled=False)
  v = a.init(jax.random.key(0), x, fb, True)
  v = {**v, 'params': _perturb(v['params'], 1)}
  y = a.apply(v, x, fb, True, mutable=['batch_stats'])[0]
  np.testing.assert_array_equal(y, b.apply(v, x, fb, True, mutable=['batch_stats'])[0])
  assert float(jnp.std(y - x, axis=(1, 2)).max()) > 0  # a spatial prompt, not an offset


@pytest.mark.parametrize('h,w,k', [(8, 8, 5), (7, 5, 5), (2, 3, 5), (1, 1, 5), (6, 6, 3)])
def test_window_sums_match_padded_convolution_taps(h, w, k):
  x = _rand(0, (2, h, w, 3))
  sums, counts = prompts.window_sums(x, k)
  p = k // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  for i in range(k):
    for j in range(k):
      np.testing.assert_allclose(sums[:, i, j], xp[:, i:i + h, j:j + w].sum((1, 2)), atol=1e-5)
      ones = jnp.pad(jnp.ones((h, w)), p)[i:i + h, j:j + w]
      assert counts[i, j] == ones.sum()


@pytest.mark.parametrize('h,w,k', [(8, 8, 5), (7, 5, 5), (2, 3, 5), (1, 1, 5), (6, 6, 3)])
def test_window_sums_gradient_rule_equals_autodiff_of_the_taps(h, w, k):
  """window_sums' own gradient (each cell gets the cotangents of the windows covering it)
  equals the derivative of the padded convolution taps it replaces."""
  x = _rand(0, (2, h, w, 3))
  p = k // 2

  def taps(x):
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return jnp.stack([jnp.stack([xp[:, i:i + h, j:j + w].sum((1, 2)) for j in range(k)], 1)
                      for i in range(k)], 1)
  weights = _rand(1, (1, k, k, 3))
  loss = lambda f, x: jnp.sum(jnp.cos(f(x)) * weights)
  with HIGHEST():
    want = jax.grad(functools.partial(loss, taps))(x)
    got = jax.grad(functools.partial(loss, lambda x: prompts.window_sums(x, k)[0]))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # the sums round differently


def _reference_resize_bn_conv(x, params, stats, out_hw, train):
  """The original's order: resize, then BatchNorm (PyTorch semantics), then the 1x1 conv."""
  up = projectors.nearest_resize_legacy(x, *out_hw)
  bn = layers.BatchNorm()
  y, upd = bn.apply({'params': params['conv_0'], 'batch_stats': stats['conv_0']}, up, train,
                    mutable=['batch_stats'])
  return jnp.dot(y, params['conv_1']['kernel'][0, 0]), upd['batch_stats']


@pytest.mark.parametrize('cls,in_shape,out_shape', [
    (projectors.ViT2CNNProjector, (16, 12), (56, 56, 8)),   # 4 -> 56: integer factor
    (projectors.ViT2CNNProjector, (16, 12), (7, 7, 8)),     # 4 -> 7: uneven copies
    (projectors.CNN2CNNProjector, (7, 7, 6), (14, 14, 8)),
    (projectors.CNN2CNNProjector, (7, 7, 6), (10, 12, 8)),
    (projectors.CNN2CNNProjector, (8, 8, 6), (4, 4, 8)),    # downsampling: resize first
])
@pytest.mark.parametrize('train', [True, False])
def test_aligner_upsampling_last_equals_resize_first(cls, in_shape, out_shape, train):
  x = _rand(0, (3,) + in_shape, 2.0) + 1.0
  module = cls(in_shape, out_shape)
  v = module.init(jax.random.key(1), x, True)
  params = _perturb(v['params'], 2)
  stats = _perturb(v['batch_stats'], 3)
  stats = jax.tree_util.tree_map(lambda s: jnp.abs(s) if s.dtype == jnp.float32 else s, stats)
  with HIGHEST():
    y, upd = jax.jit(functools.partial(module.apply, mutable=['batch_stats']), static_argnums=2)(
        {'params': params, 'batch_stats': stats}, x, train)
    grid = projectors.tokens_to_grid(x) if x.ndim == 3 else x
    y_ref, upd_ref = _reference_resize_bn_conv(grid, params, stats, out_shape[:2], train)
  assert y.shape == (3,) + out_shape
  _assert_close(y, y_ref)
  _assert_close(upd['batch_stats'], {'conv_0': upd_ref})


def test_aligner_resize_first_equals_last():
  # The override's 'first' (the original's order) is the same function as the default 'last'.
  x = _rand(0, (3, 16, 12), 2.0) + 1.0
  module = projectors.ViT2CNNProjector((16, 12), (7, 7, 8))
  v = module.init(jax.random.key(1), x, True)
  v = {'params': _perturb(v['params'], 2), 'batch_stats': v['batch_stats']}
  run = lambda: module.apply(v, x, True, mutable=['batch_stats'])
  with HIGHEST():
    with kernels.use(aligner_resize='first'):
      want = run()
    with kernels.use(aligner_resize='last'):
      got = run()
  _assert_close(got, want)


def _assert_same_value_and_grads(loss, plain, fast, *args):
  """loss(form, *args) and its gradients to every argument, in the plain and the fast form."""
  argnums = tuple(range(len(args)))
  with HIGHEST():
    want, got = [jax.jit(jax.value_and_grad(functools.partial(loss, f), argnums=argnums))(*args)
                 for f in (plain, fast)]
  _assert_close(got, want)


def test_taps_dot_gradient_rule_equals_autodiff():
  u, kernel = _rand(0, (3, 5, 5, 4)), _rand(1, (5, 5, 4, 6))
  loss = lambda f, u, w: jnp.sum(jnp.cos(f(u, w)) * jnp.arange(6.0))
  _assert_same_value_and_grads(loss, kernels.taps_dot_xla, kernels.taps_dot_rule, u, kernel)


@pytest.mark.parametrize('shape,k,p', [((2, 9, 9, 4), 7, 3), ((2, 6, 5, 3), 5, 2), ((1, 4, 4, 2), 3, 1)])
def test_shifted_depthwise_gradients_equal_xla_convolution(shape, k, p):
  x = _rand(0, shape)
  kernel = _rand(1, (k, k, 1, shape[-1]))
  loss = lambda f, x, w: jnp.sum(jnp.cos(f(x, w, p)) * x)
  _assert_same_value_and_grads(loss, kernels.xla_depthwise, kernels.shifted_depthwise, x, kernel)


def test_shifted_depthwise_with_one_input_differentiated():
  """Gradients to the input alone (a frozen teacher's kernel) and to the kernel alone equal XLA's
  convolution's, and with the kernel frozen the backward pass keeps no copy of the input (the
  rule saves it only for the kernel's gradient: inside the scanned teacher stages XLA could not
  drop it)."""
  x, kernel = _rand(0, (2, 9, 9, 4)), _rand(1, (7, 7, 1, 4))
  loss = lambda f, x, w: jnp.sum(jnp.cos(f(x, w, 3)) * x)
  for argnums in ((0,), (1,)):
    with HIGHEST():
      want, got = [jax.jit(jax.value_and_grad(functools.partial(loss, f), argnums=argnums))(x, kernel)
                   for f in (kernels.xla_depthwise, kernels.shifted_depthwise)]
    _assert_close(got, want)
  _, vjp = jax.vjp(lambda x: kernels.shifted_depthwise(x, kernel, 3), x)
  assert all(leaf.size < x.size for leaf in jax.tree_util.tree_leaves(vjp))
  _, vjp = jax.vjp(lambda w: kernels.shifted_depthwise(x, w, 3), kernel)
  assert any(leaf.shape == x.shape for leaf in jax.tree_util.tree_leaves(vjp))


def test_shifted_depthwise_is_computed_once_for_all_its_readers():
  """The LayerNorm after a ConvNeXt block's depthwise convolution reads its output three times
  (mean, variance, normalisation). XLA:CPU had fused a copy of all k*k multiply-adds into each
  reader (3 x 49 tap multiplies in the optimised HLO, which the named scope marks); now they sit
  only in the two branches of the conditional that stores the sum (2 x 49, one branch runs)."""
  x, kernel = _rand(0, (2, 9, 9, 4)), _rand(1, (7, 7, 1, 4))

  def block(x, kernel, depthwise=kernels.shifted_depthwise):
    with jax.named_scope('dw_taps'):
      y = depthwise(x, kernel, 3)
    mean = y.mean(-1, keepdims=True)
    var = jnp.square(y).mean(-1, keepdims=True) - jnp.square(mean)
    return (y - mean) * jax.lax.rsqrt(var + 1e-6)

  hlo = jax.jit(block).lower(x, kernel).compile().as_text()
  taps = sum(1 for line in hlo.splitlines() if ' multiply(' in line and 'dw_taps' in line)
  assert 49 <= taps <= 2 * 49, f'{taps} tap multiplies in the compiled program'
  with HIGHEST():
    want = block(x, kernel, kernels.xla_depthwise)
  np.testing.assert_allclose(jax.jit(block)(x, kernel), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('x_shape,k,stride,groups,features', [
    ((2, 5, 6, 8), 1, 1, 1, 12),     # 1x1
    ((2, 5, 6, 8), 1, 1, 4, 12),     # grouped 1x1 (the prompt's groups=4)
    ((2, 8, 12, 3), 4, 4, 1, 10),    # patchify (a ConvNeXt stem, a ViT patch embedding)
    ((2, 6, 6, 5), 2, 2, 1, 7),      # ConvNeXt downsample
])
def test_matmul_convolutions_equal_xla_convolution(x_shape, k, stride, groups, features):
  x = _rand(0, x_shape)
  kernel = _rand(1, (k, k, x_shape[-1] // groups, features))
  assert kernels.matmul_conv(x, kernel, stride, 0, groups) is not None

  @functools.partial(jax.jit, static_argnums=0)
  def out_and_grads(f, x, w):   # the output, and the gradients for a random cotangent
    y, vjp = jax.vjp(lambda x, w: f(x, w, stride, 0, groups), x, w)
    return y, vjp(jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))

  with HIGHEST():
    want = out_and_grads(kernels.xla_conv, x, kernel)
    got = out_and_grads(kernels.matmul_conv, x, kernel)
  _assert_close(got, want)


def test_gelu_is_exact_erf_form_with_its_derivative():
  x = jnp.linspace(-6.0, 6.0, 1001)
  np.testing.assert_allclose(kernels.gelu_rule(x), nn.gelu(x, approximate=False), rtol=0, atol=0)
  np.testing.assert_allclose(kernels.gelu_xla(x), nn.gelu(x, approximate=False), rtol=0, atol=0)
  g = jax.vmap(jax.grad(kernels.gelu_rule))(x)
  g_ref = jax.vmap(jax.grad(functools.partial(nn.gelu, approximate=False)))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)
  # bf16 in, bf16 gradient out.
  assert jax.grad(lambda v: kernels.gelu_rule(v).sum())(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
