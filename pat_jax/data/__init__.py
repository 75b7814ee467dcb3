"""Input pipeline: TFDS datasets, the original recipe's augmentations, deterministic and resumable.

    info = data.get_info(config)          # DatasetInfo(num_classes, num_train, num_eval)
    it = data.train_iterator(config, batch_size=per_host_batch, start_step=step,
                             process_index=jax.process_index(), process_count=jax.process_count())
    for batch in data.eval_iterator(config, batch_size=per_host_batch, ...): ...

`config.dataset = data.default_config()`, `config.aug = data.vit_recipe()` (or `cnn_recipe()`).
"""
from pat_jax.data.pipeline import DatasetInfo
from pat_jax.data.pipeline import eval_dataset
from pat_jax.data.pipeline import eval_iterator
from pat_jax.data.pipeline import get_info
from pat_jax.data.pipeline import steps_per_epoch
from pat_jax.data.pipeline import train_dataset
from pat_jax.data.pipeline import train_iterator
from pat_jax.data.recipes import CIFAR_MEAN
from pat_jax.data.recipes import CIFAR_STD
from pat_jax.data.recipes import IMAGENET_MEAN
from pat_jax.data.recipes import IMAGENET_STD
from pat_jax.data.recipes import cnn_recipe
from pat_jax.data.recipes import crop_pct_for
from pat_jax.data.recipes import default_config
from pat_jax.data.recipes import vit_recipe
from pat_jax.data.sources import DatasetNotPreparedError
from pat_jax.data.sources import clear_cache
from pat_jax.data.sources import register_arrays
