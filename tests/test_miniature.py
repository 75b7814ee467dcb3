"""The Fashion-MNIST miniature configs, smoke-run on a tiny IDX dataset written here (no apt)."""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from pat_jax import checkpoint, data, experiments, models, train
from test_data_idx import _make_dataset  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg, directory, monkeypatch):
  monkeypatch.setenv('FASHION_MNIST_DIR', directory)
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('arg', ['', 'student', 'kd', 'fitnet', 'no_raa', 'no_afp', 'corrected',
                                 'fraction=0.25,student'])
def test_every_grid_argument_builds(arg, tmp_path, monkeypatch):
  for name in ('fmnist_vit', 'fmnist_mlp'):
    c = _config(name, arg, str(tmp_path), monkeypatch)
    assert c.dataset.name == f'idx:{tmp_path}'
    assert (c.dataset.train_split, c.dataset.eval_split, c.dataset.test_split) == (
        'train[:90%]', 'train[90%:]', 'test')
    fraction = 0.25 if 'fraction' in arg else 1.0
    assert c.dataset.train_fraction == pytest.approx(0.1 * fraction)  # of the 5,400 subset
    assert c.teacher.pretrain.dataset.train_fraction == 1.0  # the teacher sees all 54,000
  with pytest.raises(ValueError, match='Unknown config argument'):
    experiments.apply(c, 'fractoin=0.5')


def test_run_with_validation_and_test_split(tmp_path, monkeypatch):
  """A few steps of configs/fmnist_vit.py:kd (a random teacher checkpoint instead of training
  one: compiling is what costs here): validation is evaluated during training, the test split
  once at the end."""
  root = str(tmp_path / 'idx')
  os.makedirs(root)
  _make_dataset(root, n_train=400, n_test=30)
  data.clear_cache()
  teacher = models.create('mini_convnext', num_classes=10)
  variables = jax.jit(teacher.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  checkpoint.save_variables(str(tmp_path / 'teacher'), jax.device_get(variables),
                            {'model': 'mini_convnext', 'num_classes': 10})
  c = _config('fmnist_vit', 'kd', root, monkeypatch)
  c.dataset.train_fraction = 0.2  # 72 of the 360 training images
  c.update_from_flattened_dict({'batch_size': 8, 'eval_batch_size': 8, 'num_devices': 1,
                                'total_steps': 3, 'eval_every_steps': 3, 'log_every_steps': 1,
                                'teacher.min_top1': 0.0, 'teacher.checkpoint': str(tmp_path / 'teacher')})
  result = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert result['eval_split'] == 'train[90%:]' and result['test_split'] == 'test'
  assert 0.0 <= result['test_top1'] <= 100.0 and 0.0 <= result['test_ema_top1'] <= 100.0
  assert result['wall_s'] > 0
  with open(tmp_path / 'run' / 'result.json', encoding='utf-8') as f:
    assert json.load(f) == result
  with open(tmp_path / 'run' / 'metrics.jsonl', encoding='utf-8') as f:
    evals = [json.loads(line) for line in f if 'eval_top1' in line]
  # 40 validation images (the last 10% of 400): top-1 is a multiple of 2.5.
  assert evals and evals[-1]['eval_top1'] % 2.5 == pytest.approx(0.0, abs=1e-6)
