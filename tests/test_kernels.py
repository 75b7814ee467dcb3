"""pat_jax.kernels: which form each op takes on which backend, the overrides, and that the
plain forms (the accelerators' defaults) give the same parameters and numbers as the CPU's
fast forms. Each fast form against its plain form, op by op: tests/test_fast_forms.py."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pat_jax import kernels, models
from pat_jax.distill import pat_modules as pm
from pat_jax.kernels import bench, matmuls
from pat_jax.models import layers

FAST_ON_CPU = {'gelu': 'rule', 'depthwise_conv': 'shift', 'pointwise_conv': 'matmul', 'patchify_conv': 'matmul', 'taps_dot': 'rule',
               'prompt_chain': 'pooled', 'aligner_resize': 'last'}
ON_ACCELERATORS = {'gelu': 'xla', 'depthwise_conv': 'xla', 'pointwise_conv': 'xla', 'patchify_conv': 'xla', 'taps_dot': 'xla',
                   'prompt_chain': 'pooled', 'aligner_resize': 'last'}


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
  monkeypatch.delenv(kernels.ENV, raising=False)


def _backend(monkeypatch, name):
  monkeypatch.setattr(jax, 'default_backend', lambda: name)


@pytest.mark.parametrize('backend,want', [
    ('cpu', FAST_ON_CPU), ('gpu', ON_ACCELERATORS), ('cuda', ON_ACCELERATORS),
    ('tpu', ON_ACCELERATORS), ('some_new_backend', kernels.PLAIN)])
def test_table_resolves_per_backend(monkeypatch, backend, want):
  _backend(monkeypatch, backend)
  assert kernels.resolved() == want
  assert all(kernels.form(op) == f for op, f in want.items())


def test_every_row_names_its_forms_and_a_default_per_backend():
  for op, (forms, *defaults) in kernels.TABLE.items():
    assert len(forms) == len(set(forms)) >= 2, op
    assert len(defaults) == len(kernels.BACKENDS) and set(defaults) <= set(forms), op


def test_environment_override(monkeypatch):
  _backend(monkeypatch, 'cpu')
  monkeypatch.setenv(kernels.ENV, 'depthwise_conv=xla, gelu=xla')
  assert kernels.resolved() == {**FAST_ON_CPU, 'depthwise_conv': 'xla', 'gelu': 'xla'}
  monkeypatch.setenv(kernels.ENV, 'plain,prompt_chain=pooled')
  assert kernels.resolved() == {**kernels.PLAIN, 'prompt_chain': 'pooled'}
  monkeypatch.setenv(kernels.ENV, 'default')
  assert kernels.resolved() == FAST_ON_CPU
  for bad in ('gelu=fast', 'no_such_op=xla', 'gelu'):
    monkeypatch.setenv(kernels.ENV, bad)
    with pytest.raises(ValueError, match=kernels.ENV):
      kernels.form('gelu')


def test_use_overrides_the_environment_and_nests(monkeypatch):
  _backend(monkeypatch, 'gpu')
  monkeypatch.setenv(kernels.ENV, 'gelu=rule')
  assert kernels.form('gelu') == 'rule'
  with kernels.use(gelu='xla', patchify_conv='matmul'):
    assert kernels.form('gelu') == 'xla' and kernels.form('patchify_conv') == 'matmul'
    with kernels.use('plain'):
      assert kernels.resolved() == kernels.PLAIN
    assert kernels.form('patchify_conv') == 'matmul'
  assert kernels.form('gelu') == 'rule' and kernels.form('patchify_conv') == 'xla'
  with pytest.raises(ValueError, match='depthwise_conv'):
    with kernels.use(depthwise_conv='matmul'):
      pass


def _primitives(f, *args):
  # A fresh function each time: JAX caches traces by function, and forms are read when tracing.
  return {str(e.primitive) for e in jax.make_jaxpr(lambda *a: f(*a))(*args).jaxpr.eqns}


@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
def test_the_ops_trace_to_the_backends_form(monkeypatch, backend):
  _backend(monkeypatch, backend)
  cpu = backend == 'cpu'
  x = jnp.ones((1, 8, 8, 8))
  conv = lambda w, g, s=1: _primitives(lambda x, w: layers.conv_apply(x, w, stride=s, groups=g), x, w)
  assert ('conv_general_dilated' in conv(jnp.ones((1, 1, 8, 4)), 1)) != cpu     # 1x1
  assert ('conv_general_dilated' in conv(jnp.ones((1, 1, 2, 8)), 4)) != cpu     # grouped 1x1
  assert ('conv_general_dilated' in conv(jnp.ones((4, 4, 8, 4)), 1, 4)) != cpu  # patchify
  assert ('conv_general_dilated' in conv(jnp.ones((7, 7, 1, 8)), 8)) != cpu     # depthwise
  assert 'conv_general_dilated' in conv(jnp.ones((3, 3, 8, 4)), 1)              # 3x3: XLA's
  custom = lambda f, *a: any('custom_vjp' in p for p in _primitives(f, *a))
  assert custom(layers.gelu, x) == cpu
  assert custom(kernels.taps_dot, jnp.ones((2, 5, 5, 3)), jnp.ones((5, 5, 3, 4))) == cpu


def _loss_and_grads(module, variables, args, argnums, **kwargs):
  def loss(v, a):
    out = module.apply(v, *a, **kwargs, mutable=['batch_stats'])[0]
    return sum(jnp.sum(jnp.sin(y)) for y in jax.tree_util.tree_leaves(out))
  return jax.jit(jax.value_and_grad(loss, argnums=argnums))(variables, args)


def _assert_trees_close(a, b, rtol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(np.abs(y).max(), 1e-6),
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('name', ['mini_convnext', 'mini_deit'])
def test_models_plain_forms_same_parameters_and_numbers(name):
  model = models.create(name, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  init = lambda: jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x)
  variables = init()
  with kernels.use('plain'):
    plain_variables = init()
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(plain_variables)
  _assert_trees_close(plain_variables, variables, 0)
  with jax.default_matmul_precision('highest'):
    fast = _loss_and_grads(model, variables, (x,), (0, 1), train=False, return_features=True)
    with kernels.use('plain'):
      plain = _loss_and_grads(model, variables, (x,), (0, 1), train=False, return_features=True)
  _assert_trees_close(fast, plain, 1e-4)


def _golden_cases(*modules):
  folder = os.environ.get('PAT_GOLDEN_DIR', os.path.join(os.path.dirname(__file__), '..', '..',
                                                         'shared', 'golden'))
  return sorted(p for m in modules for p in glob.glob(os.path.join(folder, f'{m}__*.npz')))


@pytest.mark.parametrize('path', _golden_cases('PromptBlock', 'CNN2CNNProjector', 'ViT2CNNProjector'),
                         ids=lambda p: os.path.basename(p)[:-4])
def test_golden_cases_in_plain_forms(path):
  """The accelerators' forms (every op plain) reproduce the original's golden vectors too."""
  import test_golden  # pylint: disable=g-import-not-at-top  (tests/ is on sys.path)
  with kernels.use('plain'):
    test_golden.test_golden_case(path)


def test_prompt_block_follows_the_table_unless_told():
  gate, scale = pm.PromptBlock((4, 4, 8), (4, 4, 8)), pm.PromptBlock((4, 4, 8), (4, 4, 8),
                                                                    se_mode='scale')
  assert gate._pooled() and not scale._pooled()  # pylint: disable=protected-access
  with kernels.use(prompt_chain='direct'):
    assert not gate._pooled()  # pylint: disable=protected-access
    assert pm.PromptBlock((4, 4, 8), (4, 4, 8), pooled=True)._pooled()  # pylint: disable=protected-access


def test_kernel_bench_runs_and_records_each_form():
  records = bench.run(['gelu_mlp', 'taps_s3'], batch=1, image_size=32, repeats=1, warmup=0)
  assert {r['case'] for r in records} == {'gelu_mlp', 'taps_s3'}
  for r in records:
    assert set(r['ms']) == set(kernels.TABLE[r['op']][0])
    assert all(v > 0 for v in r['ms'].values())
    assert r['default'] == kernels.form(r['op'])


def test_matmul_rates_cover_the_pairs_products_in_xla_and_torch():
  # The shapes follow batch and image size: ConvNeXt-T stage 0 at 32 px has 8x8 positions per
  # image; DeiT-T has (32/16)^2 + 1 = 5 tokens of 192 in 3 heads of 64.
  shapes = matmuls.cases(batch=2, image_size=32)
  assert shapes['convnext_s0_fc1'] == ((2 * 8 * 8, 96), (96, 384))
  assert shapes['convnext_s3_fc2'] == ((2 * 1 * 1, 3072), (3072, 768))
  assert shapes['deit_qkv'] == ((2 * 5, 192), (192, 576))
  assert shapes['deit_attn_scores'] == ((2 * 3, 5, 64), (2 * 3, 64, 5))
  records = matmuls.run(['convnext_s0_fc2', 'deit_attn_values'], batch=2, image_size=32, repeats=1)
  by_case = {r['case']: r for r in records}
  assert by_case['convnext_s0_fc2']['flops'] == 2 * 128 * 384 * 96
  assert by_case['deit_attn_values']['flops'] == 2 * 6 * 5 * 5 * 64
  for r in records:
    assert len(r['xla']) == 3 and all(v > 0 for v in r['xla'])
    assert len(r['torch']) == 3 and all(v > 0 for v in r['torch'])  # torch is in the test extra
  with pytest.raises(ValueError, match='Unknown cases'):
    matmuls.run(['resnet_fc'])
