"""pat_jax.weights: the one loader of teacher, init_checkpoint and --mode=eval weights.

What multi-host needs of it: the arrays land on the given (global, replicated) sharding
directly, from a timm file or a pat_jax checkpoint, never via one process's device."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from pat_jax import checkpoint, convert, errors, models, weights

NAME, CLASSES = 'mini_convnext', 10


@pytest.fixture(scope='module')
def variables():
  model = models.create(NAME, num_classes=CLASSES)
  return jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32)))


@pytest.fixture(scope='module')
def replicated():
  return NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)), P())


def _check_on(tree, expected, sharding):
  got = jax.tree_util.tree_leaves_with_path(tree)
  assert len(got) == len(jax.tree_util.tree_leaves(expected))
  for (path, leaf), want in zip(got, jax.tree_util.tree_leaves(expected)):
    assert leaf.sharding == sharding, path
    np.testing.assert_array_equal(np.asarray(leaf), want)


@pytest.mark.parametrize('kind', ['checkpoint', 'safetensors'])
def test_weights_land_on_the_given_sharding(variables, replicated, tmp_path, kind):
  if kind == 'checkpoint':
    path = checkpoint.save_variables(str(tmp_path / 'ckpt'), variables, {'model': NAME})
  else:
    path = str(tmp_path / 'w.safetensors')
    save_file(convert.to_timm(variables), path)
  loaded = weights.load(path, NAME, CLASSES, replicated)
  _check_on(loaded, variables, replicated)
  assert len(jax.devices()) > 1  # a sharding over several devices, not one process's first


def test_drop_head_and_shape_check(variables, replicated, tmp_path):
  path = checkpoint.save_variables(str(tmp_path / 'ckpt'), variables, {'model': NAME})
  body = weights.load(path, NAME, CLASSES, replicated, drop_head=True)
  assert 'head' not in body['params'] and 'stem' in str(list(body['params']))
  with pytest.raises(errors.UserError, match=r'head/fc/kernel.*expected \(48, 7\).*found \(48, 10\)'):
    weights.load(path, NAME, 7, replicated)
  with pytest.raises(errors.UserError, match='does not exist'):
    weights.load(str(tmp_path / 'nowhere'), NAME, CLASSES, replicated)
