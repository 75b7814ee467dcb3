"""Training and evaluation pipelines: deterministic, resumable, sharded per host.

Training (big_vision `make_for_train` in spirit, but index-based so it can resume anywhere):
  epoch e's order  = stateless_shuffle(train indices, key(seed, e))      (same on every host)
  global batch g   = order[g * P * b : (g + 1) * P * b] within the epoch (P hosts, b per host)
  host p's batch   = the p-th slice of b of it: order viewed as (steps, P, b), host p takes [:, p]
  example key      = key(seed, e, example index)  -> crop, flip, RandAugment
  batch key        = key(seed, global step, p)    -> mixup/cutmix lambda and box, erasing
so global step g always yields the same batch, whatever the threads did, and `start_step=g`
starts there (epoch g // steps_per_epoch, skipping the epoch's first (g % steps) batches, which
costs nothing because only indices are skipped). Hosts see disjoint examples within an epoch,
and drop_last drops the permutation's tail (beyond steps * P * b).

Multi-host = single-host: the examples of global batch g and their per-example augmentation
(keyed by example index, not by host) do not depend on P, so the P hosts' batches at step g,
placed side by side in host order, are exactly the one-host batch of global size P * b. This
holds bit for bit for the CNN recipe. Batch-level randomness (mixup/cutmix, random erasing) is
drawn per host batch from key(seed, g, p), as timm's per-rank Mixup and RandomErasing do, so
with the ViT/MLP recipe a P-host run mixes within each host's b examples with P lambdas and
differs from a one-host run (same examples, same per-example augmentation, other mixing).

Transfer (`dataset.transfer`, resolved by `on_device.resolve_transfer`): 'float32' yields the
normalised, mixed and erased float32 batch made here; 'uint8' stops after the per-example steps
and RandAugment and yields the uint8 images, the (mixed) soft targets and the batch's draws (the
same draws from the same keys), which `on_device.prepare` applies to the images on the
accelerator: a quarter of the bytes cross to the device, and the host no longer mixes pixels,
normalises or erases.

Evaluation (big_vision `make_for_inference`): host p reads its even, contiguous share of the
split, then zero examples with mask False, and every host yields ceil(ceil(n / P) / batch)
batches.
"""
import collections
import math

import numpy as np
import tensorflow as tf

from pat_jax import errors
from pat_jax.data import augment
from pat_jax.data import mixup
from pat_jax.data import on_device
from pat_jax.data import randaugment
from pat_jax.data import sources

DatasetInfo = collections.namedtuple('DatasetInfo', ['num_classes', 'num_train', 'num_eval'])

# Tags that separate the random streams derived from config.seed.
_SHUFFLE, _EXAMPLE, _BATCH, _FRACTION = 1, 2, 3, 4


def _hide_accelerators_from_tf():
  """TF must not reserve GPU/TPU memory that JAX needs (google/flax#445)."""
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except RuntimeError:  # already initialised: visible devices were set before, keep them
      pass


def _root_key(seed, tag):
  return tf.constant([int(seed), tag], tf.int64)


def train_indices(config, num_examples: int) -> np.ndarray:
  """Indices of the training examples used: all, or the first `train_fraction` of a seeded
  permutation (paper Table 2), returned sorted. The permutation's seed is `dataset.fraction_seed`
  (default: the run's seed); a fixed one makes smaller fractions subsets of larger ones."""
  fraction = float(config.dataset.get('train_fraction', 1.0))
  if fraction >= 1.0:
    return np.arange(num_examples, dtype=np.int64)
  if not 0.0 < fraction < 1.0:
    raise errors.ConfigError(f'dataset.train_fraction must be in (0, 1], got {fraction}')
  seed = config.dataset.get('fraction_seed')  # None: the run's seed
  seed = int(config.seed if seed is None else seed)
  perm = np.random.default_rng([seed, _FRACTION]).permutation(num_examples)
  return np.sort(perm[:int(round(fraction * num_examples))]).astype(np.int64)


def get_info(config) -> DatasetInfo:
  ds = config.dataset
  num_train = len(train_indices(config, sources.split_size(ds, ds.train_split)))
  return DatasetInfo(num_classes=sources.num_classes(ds), num_train=num_train,
                     num_eval=sources.split_size(ds, ds.eval_split))


def steps_per_epoch(config, batch_size_global: int) -> int:
  """drop_last, as the original loader: floor(num_train / global batch)."""
  return get_info(config).num_train // batch_size_global


def _options(config):
  opts = tf.data.Options()
  opts.deterministic = True
  threads = int(config.dataset.get('threads', 0) or 0)
  if threads > 0:
    opts.threading.private_threadpool_size = threads
  return opts


def _parallel(config):
  n = int(config.dataset.get('num_parallel_calls', -1))
  return tf.data.AUTOTUNE if n < 0 else n


def _fill_colour(mean):
  return tuple(min(255, round(255 * m)) for m in mean)


def _example_fn(config, lookup):
  """(epoch, index) -> augmented uint8 image at the output size, and the int label."""
  aug, size = config.aug, config.dataset.image_size
  root = _root_key(config.seed, _EXAMPLE)
  shape = getattr(lookup, 'static_shape', None)
  resizer = augment.resize_with(config.dataset, shape, size)  # 'pillow', 'tables' or 'tf'
  if resizer == 'tables':
    resizer = augment.CropResizer(shape[0], shape[1], size)
  elif resizer == 'tf':
    resizer = None  # augment's per-image TF ops

  @tf.autograph.experimental.do_not_convert  # plain Python control flow on static config
  def fn(epoch, index):
    k_crop, k_flip, k_ra = augment.split(augment.fold_in(root, epoch, index), 3)
    image, label = lookup(index)
    # Crop (or plain resize), Pillow resampling and flip in one exact step.
    image = augment.crop_resize_flip(image, k_crop, k_flip, size, tuple(aug.scale),
                                     tuple(aug.ratio), aug.interpolation, aug.hflip,
                                     random_crop=aug.random_resized_crop, resizer=resizer)
    if aug.randaugment:  # drawn here, applied per batch (randaugment.apply_batch)
      return image, label, epoch, index, randaugment.draw(k_ra, aug.randaugment,
                                                          aug.interpolation)
    return image, label, epoch, index
  return fn


def _device_batch(aug, images, labels, num_classes, k_mix, k_erase):
  """The uint8 images, the soft targets and the batch-level draws of the float32 path (the same
  draws from the same keys) for `on_device.prepare`, which applies them to the images.

  The targets are mixed here, exactly as `mixup.mix_normalize` mixes them: they are b x C
  values, nothing to save, and on the device a fused multiply-add would move them by an ulp.
  Every value has the batch as its leading axis (a batch-wide draw is repeated per example), so
  the dict shards over the data axis like the images. Erasing's noise is the one draw that
  differs: it is drawn on the device from `erase_key` (TF's stateless normal has no JAX
  equivalent), derived from this batch's key, so it is as deterministic and resumable.
  """
  b, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
  targets = mixup.smooth_one_hot(labels, num_classes, aug.label_smoothing)
  out = {'image': images, 'label': targets}
  if aug.mixup > 0 or aug.cutmix > 0:
    lam, blend, box = mixup.draw(k_mix, height, width, aug.mixup, aug.cutmix,
                                 prob=aug.get('mixup_prob', 1.0), switch_prob=aug.mixup_switch_prob)
    lam32 = tf.cast(lam, tf.float32)  # mix_normalize's
    out['label'] = mixup.mix_targets(targets, lam32)
    out['mix_lam'] = tf.fill([b], lam32)
    out['mix_blend'] = tf.fill([b], blend)
    out['mix_box'] = tf.tile(box[None], [b, 1])
  if aug.reprob > 0:
    apply, top, left, h, w, k_noise = augment.erasing_boxes(k_erase, b, height, width, aug.reprob)
    box = tf.stack([top, top + h, left, left + w], axis=1)
    out['erase_box'] = tf.where(apply[:, None], box, tf.zeros_like(box))  # empty: not erased
    out['erase_key'] = tf.random.stateless_uniform([b, 2], k_noise, minval=None, maxval=None,
                                                   dtype=tf.uint32)
  return out


def _batch_fn(config, num_classes, process_index):
  aug, ds = config.aug, config.dataset
  root = _root_key(config.seed, _BATCH)
  fill = _fill_colour(ds.mean)
  if (aug.mixup > 0 or aug.cutmix > 0) and aug.get('mixup_mode', 'batch') != 'batch':
    raise NotImplementedError("Only mixup_mode='batch' (the original's setting) is implemented.")
  if aug.reprob > 0 and aug.remode != 'pixel':
    raise NotImplementedError("Only remode='pixel' (the original's setting) is implemented.")
  uint8 = on_device.resolve_transfer(ds) == 'uint8'

  @tf.autograph.experimental.do_not_convert
  def fn(step, images, labels, epochs, indices, ra_params=None):
    if ra_params is not None:  # each image's own draws: the same as per image, see _example_fn
      images = randaugment.apply_batch(images, ra_params, fill)
    k_mix, k_erase = augment.split(augment.fold_in(root, step, process_index), 2)
    if uint8:  # the images' rest happens on the accelerator (on_device.prepare)
      return {**_device_batch(aug, images, labels, num_classes, k_mix, k_erase),
              '_epoch': epochs, '_index': indices, '_step': step}
    # = augment.normalize(*mixup.mix_batch(...)), bit for bit, as one fused pass.
    x, targets = mixup.mix_normalize(
        images, labels, k_mix, num_classes, aug.mixup, aug.cutmix, ds.mean, ds.std,
        prob=aug.get('mixup_prob', 1.0), switch_prob=aug.mixup_switch_prob,
        smoothing=aug.label_smoothing)
    if aug.reprob > 0:
      x = augment.random_erasing(x, k_erase, aug.reprob)
    return {'image': x, 'label': targets, '_epoch': epochs, '_index': indices, '_step': step}
  return fn


def train_dataset(config, batch_size, start_step=0, process_index=0, process_count=1,
                  with_ids=False) -> tf.data.Dataset:
  """The infinite per-host training stream as a tf.data.Dataset of dicts (see train_iterator)."""
  _hide_accelerators_from_tf()
  ds_cfg = config.dataset
  num_examples, num_classes, lookup = sources.make_lookup(ds_cfg, ds_cfg.train_split)
  subset = train_indices(config, num_examples)
  n = len(subset)
  steps = n // (batch_size * process_count)
  if steps == 0:
    raise errors.ConfigError(f'{n} training examples cannot fill one global batch of '
                     f'{batch_size} x {process_count} hosts.')
  per_host = steps * batch_size
  start_epoch, skip_steps = divmod(int(start_step), steps)
  shuffle_root = _root_key(config.seed, _SHUFFLE)
  subset_t = tf.constant(subset)

  def epoch_indices(epoch):
    key = augment.fold_in(shuffle_root, epoch)
    perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), key)
    # Global batch g of the epoch is perm[g*P*b : (g+1)*P*b]; host p takes its p-th slice.
    grid = tf.reshape(perm[:steps * process_count * batch_size],
                      [steps, process_count, batch_size])
    mine = tf.gather(subset_t, tf.reshape(grid[:, process_index], [-1]))
    return tf.data.Dataset.from_tensor_slices((tf.fill([per_host], epoch), mine))

  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_indices)
  ds = ds.skip(skip_steps * batch_size)
  ds = ds.map(_example_fn(config, lookup), num_parallel_calls=_parallel(config),
              deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.enumerate(start=int(start_step))
  batch_fn = _batch_fn(config, num_classes, process_index)
  ds = ds.map(lambda step, b: batch_fn(step, *b), num_parallel_calls=_parallel(config),
              deterministic=True)
  if not with_ids:
    ds = ds.map(lambda d: {k: v for k, v in d.items() if not k.startswith('_')})
  ds = ds.prefetch(int(ds_cfg.get('prefetch', 2)))
  return ds.with_options(_options(config))


def train_iterator(config, batch_size, start_step=0, process_index=0, process_count=1):
  """Infinite iterator of numpy dicts {'image': float32 (b, S, S, 3), 'label': float32 (b, C)};
  with dataset.transfer 'uint8': {'image': uint8, 'label': float32 (b, C), + the batch's draws}
  for `on_device.prepare` (see `_device_batch`).

  Global step g reads epoch g // steps_per_epoch with steps_per_epoch =
  num_train // (batch_size * process_count); start_step=g resumes exactly there.
  """
  return train_dataset(config, batch_size, start_step, process_index,
                       process_count).as_numpy_iterator()


def host_range(num_examples, process_index, process_count):
  """[start, end) of host p's share, sizes differing by at most one (as tfds.even_splits)."""
  base, extra = divmod(num_examples, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


def num_eval_batches(num_examples, batch_size, process_count):
  return math.ceil(math.ceil(num_examples / process_count) / batch_size)


def eval_dataset(config, batch_size, process_index=0, process_count=1,
                 with_ids=False) -> tf.data.Dataset:
  """One padded pass over this host's share of the eval split (see eval_iterator)."""
  _hide_accelerators_from_tf()
  ds_cfg = config.dataset
  size = ds_cfg.image_size
  num_examples, _, lookup = sources.make_lookup(ds_cfg, ds_cfg.eval_split)
  start, end = host_range(num_examples, process_index, process_count)
  uint8 = on_device.resolve_transfer(ds_cfg) == 'uint8'  # then normalised in the eval step
  with_pillow = augment.resize_with(ds_cfg, getattr(lookup, 'static_shape', None),
                                    size) == 'pillow'

  def fn(index):
    image, label = lookup(index)
    image = augment.eval_resize_crop(image, size, ds_cfg.eval_crop_pct,
                                     ds_cfg.get('eval_interpolation', 'bilinear'), with_pillow)
    x = image if uint8 else augment.normalize(image, ds_cfg.mean, ds_cfg.std)
    return {'image': x, 'label': label, 'mask': tf.constant(True), '_index': index}

  ds = tf.data.Dataset.range(start, end).map(fn, num_parallel_calls=_parallel(config),
                                             deterministic=True)
  pad = tf.data.Dataset.from_tensors({
      'image': tf.zeros([size, size, 3], tf.uint8 if uint8 else tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False), '_index': tf.constant(-1, tf.int64)}).repeat()
  ds = ds.concatenate(pad).batch(batch_size, drop_remainder=True)
  ds = ds.take(num_eval_batches(num_examples, batch_size, process_count))
  if not with_ids:
    ds = ds.map(lambda d: {k: d[k] for k in ('image', 'label', 'mask')})
  ds = ds.prefetch(int(ds_cfg.get('prefetch', 2)))
  return ds.with_options(_options(config))


def eval_iterator(config, batch_size, process_index=0, process_count=1):
  """numpy dicts {'image': float32 (b,S,S,3), 'label': int32 (b,), 'mask': bool (b,)}; one pass,
  last batch padded (mask False), the same number of batches on every host. With
  dataset.transfer 'uint8' the images are uint8, normalised by the eval step."""
  return eval_dataset(config, batch_size, process_index, process_count).as_numpy_iterator()
