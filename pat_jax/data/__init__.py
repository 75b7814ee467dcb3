"""Input pipeline: TFDS datasets, the original recipe's augmentations, deterministic and resumable.

    info = data.get_info(config)          # DatasetInfo(num_classes, num_train, num_eval)
    it = data.train_iterator(config, batch_size=per_host_batch, start_step=step,
                             process_index=jax.process_index(), process_count=jax.process_count())
    for batch in data.eval_iterator(config, batch_size=per_host_batch, ...): ...

`config.dataset = data.default_config()`, `config.aug = data.vit_recipe()` (or `cnn_recipe()`).
With `dataset.transfer` 'uint8' (the default on GPU/TPU) the train batches are uint8 with their
draws, and the train step calls `data.on_device.prepare(batch, mean, std, groups)`.
"""
import importlib

from pat_jax.data import on_device  # pure jnp (the train and eval steps call it), no TF
from pat_jax.data.recipes import CIFAR_MEAN
from pat_jax.data.recipes import CIFAR_STD
from pat_jax.data.recipes import IMAGENET_MEAN
from pat_jax.data.recipes import IMAGENET_STD
from pat_jax.data.recipes import cnn_recipe
from pat_jax.data.recipes import crop_pct_for
from pat_jax.data.recipes import default_config
from pat_jax.data.recipes import vit_recipe

# The pipeline's names load on first use, and TensorFlow with them: configs, models, the
# train step and `pat_jax.bench` import this package without TensorFlow installed.
_LAZY = {
    'DatasetInfo': 'pipeline', 'eval_dataset': 'pipeline', 'eval_iterator': 'pipeline',
    'get_info': 'pipeline', 'steps_per_epoch': 'pipeline', 'train_dataset': 'pipeline',
    'train_iterator': 'pipeline', 'DatasetNotPreparedError': 'sources',
    'clear_cache': 'sources', 'register_arrays': 'sources',
}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
  globals()[name] = value
  return value
