"""The pipeline end to end: determinism, exact resume, per-host sharding, padded evaluation,
train fraction, and the data sources (local digits, tfds mock data, image folders, errors)."""
import os
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pat_jax import data
from pat_jax.data import digits
from pat_jax.data import pipeline
from pat_jax.data import sources


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  path = str(tmp_path_factory.getbasetemp() / 'tfds_digits')
  digits.prepare(path)
  return path


def make_config(name='digits', data_dir=None, image_size=16, recipe='vit', **dataset):
  config = ml_collections.ConfigDict({'seed': 42})
  config.dataset = data.default_config()
  config.dataset.name = name
  config.dataset.data_dir = data_dir
  config.dataset.image_size = image_size
  config.dataset.update(dataset)
  config.aug = data.vit_recipe() if recipe == 'vit' else data.cnn_recipe()
  return config


def take(dataset, n):
  return [b for _, b in zip(range(n), dataset.as_numpy_iterator())]


def test_digits_builder_offline_and_fixed_split(tmp_path):
  t0 = time.time()
  builder = digits.prepare(str(tmp_path))
  assert time.time() - t0 < 15  # about 3 s on 2 busy cores; no network involved
  assert builder.info.splits['train'].num_examples == 1500
  assert builder.info.splits['test'].num_examples == 297
  images, labels, order = digits._arrays()
  test = list(builder.as_dataset('test', shuffle_files=False).as_numpy_iterator())
  np.testing.assert_array_equal([e['label'] for e in test], labels[order[1500:]])
  np.testing.assert_array_equal(test[5]['image'], images[order[1505]])


def test_interface_shapes_and_info(digits_dir):
  config = make_config(data_dir=digits_dir)
  info = data.get_info(config)
  assert info == data.DatasetInfo(num_classes=10, num_train=1500, num_eval=297)
  assert data.steps_per_epoch(config, 64) == 1500 // 64
  batch = next(data.train_iterator(config, batch_size=8))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8, 10) and batch['label'].dtype == np.float32
  np.testing.assert_allclose(batch['label'].sum(1), 1.0, rtol=1e-5)
  ev = next(data.eval_iterator(config, batch_size=8))
  assert set(ev) == {'image', 'label', 'mask'}
  assert ev['image'].shape == (8, 16, 16, 3) and ev['label'].dtype == np.int32
  assert ev['mask'].dtype == bool


def test_cnn_recipe_targets_are_smoothed_one_hots(digits_dir):
  config = make_config(data_dir=digits_dir, recipe='cnn')
  batch = next(data.train_iterator(config, batch_size=8))
  labels = batch['label']
  assert np.allclose(np.sort(labels, axis=1)[:, -1], 0.91)
  assert np.allclose(np.sort(labels, axis=1)[:, :-1], 0.01)


def test_same_seed_same_batches_and_seed_matters(digits_dir):
  config = make_config(data_dir=digits_dir, train_fraction=0.1)
  a = take(data.train_dataset(config, 16, with_ids=True), 3)
  b = take(data.train_dataset(config, 16, with_ids=True), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  config.seed = 43
  c = take(data.train_dataset(config, 16, with_ids=True), 1)
  assert not np.array_equal(a[0]['_index'], c[0]['_index'])


def test_resume_at_step_k_equals_uninterrupted_run(digits_dir):
  """150 examples, batch 16: 9 steps per epoch; resuming at 8 and 10 crosses an epoch end."""
  config = make_config(data_dir=digits_dir, train_fraction=0.1)
  fresh = take(data.train_dataset(config, 16, with_ids=True), 12)
  for k in (8, 10):
    resumed = take(data.train_dataset(config, 16, start_step=k, with_ids=True), 2)
    for i, batch in enumerate(resumed):
      for key in batch:
        np.testing.assert_array_equal(batch[key], fresh[k + i][key], err_msg=f'{k} {key}')
  # Epoch e uses each training example once, in a new order.
  spe = 150 // 16
  epoch0 = np.concatenate([b['_index'] for b in fresh[:spe]])
  epoch1 = np.concatenate([b['_index'] for b in fresh[spe:2 * spe]])
  assert len(set(epoch0)) == len(epoch0) and not np.array_equal(epoch0, epoch1)
  assert all(b['_epoch'][0] == i // spe for i, b in enumerate(fresh))


def test_train_fraction_subset_fixed_by_seed(digits_dir):
  config = make_config(data_dir=digits_dir, train_fraction=0.25)
  assert data.get_info(config).num_train == 375
  subset = pipeline.train_indices(config, 1500)
  np.testing.assert_array_equal(subset, pipeline.train_indices(config, 1500))
  seen = np.concatenate([b['_index'] for b in take(data.train_dataset(config, 25,
                                                                         with_ids=True), 15)])
  assert set(seen) == set(subset)  # one epoch = the subset, exactly
  half = pipeline.train_indices(make_config(train_fraction=0.5), 1500)
  assert len(half) == 750


def test_two_hosts_read_disjoint_shards_covering_the_split(digits_dir):
  """96 examples, 2 hosts x 16: 3 steps per epoch; the hosts' epoch shares are disjoint and
  together are the whole (fraction) split, every epoch."""
  config = make_config(data_dir=digits_dir, train_fraction=0.064)
  subset = set(pipeline.train_indices(config, 1500))
  assert len(subset) == 96
  hosts = [take(data.train_dataset(config, 16, process_index=p, process_count=2,
                                   with_ids=True), 6) for p in range(2)]
  for epoch in range(2):
    shares = [set(np.concatenate([b['_index'] for b in h[3 * epoch:3 * epoch + 3]]))
              for h in hosts]
    assert len(shares[0]) == len(shares[1]) == 48
    assert not shares[0] & shares[1] and shares[0] | shares[1] == subset
  # Same global step on both hosts, but each host mixes its own batch with its own lambda.
  assert not np.array_equal(hosts[0][0]['label'], hosts[1][0]['label'])


@pytest.mark.parametrize('process_count', [2, 4])
def test_hosts_batches_concatenate_to_the_single_host_global_batch(digits_dir, process_count):
  """CNN recipe (no batch-level randomness): at every global step, host 0..P-1's batches side by
  side are exactly the one-host batch of the same global size, images and labels, also across
  an epoch boundary and after resuming at start_step. 96 examples, global batch 16: 6 steps."""
  config = make_config(data_dir=digits_dir, train_fraction=0.064, recipe='cnn')
  global_batch = 16
  single = take(data.train_dataset(config, global_batch, with_ids=True), 8)
  per_host = global_batch // process_count
  for start, n in ((0, 8), (5, 3)):
    hosts = [take(data.train_dataset(config, per_host, start_step=start, process_index=p,
                                     process_count=process_count, with_ids=True), n)
             for p in range(process_count)]
    for i in range(n):
      for key in ('image', 'label', '_index', '_epoch', '_step'):
        joined = (np.concatenate([h[i][key] for h in hosts]) if key != '_step'
                  else np.array([h[i][key] for h in hosts]))
        expect = single[start + i][key] if key != '_step' else np.full(process_count,
                                                                        start + i)
        np.testing.assert_array_equal(joined, expect, err_msg=f'step {start + i} {key}')
  assert single[5]['_epoch'][0] == 0 and single[6]['_epoch'][0] == 1


def test_random_access_reader_reads_only_each_hosts_examples(digits_dir, tmp_path, monkeypatch):
  """dataset.reader='random_access' (ArrayRecord through tfds.data_source, nothing held in
  memory): two hosts' batches equal the in-memory reader's, and each host fetches exactly the
  examples of its own index stream, in order (one worker, so that fetches are sequential)."""
  array_record_dir = str(tmp_path / 'digits_array_record')
  digits.prepare(array_record_dir, file_format='array_record')
  fetched = []
  fetch = sources.RandomAccessSplit.fetch
  monkeypatch.setattr(sources.RandomAccessSplit, 'fetch',
                      lambda self, index: (fetched.append(int(index)), fetch(self, index))[1])
  kw = dict(train_fraction=0.064, recipe='cnn', num_parallel_calls=1, prefetch=1)
  for p in range(2):
    memory = take(data.train_dataset(make_config(data_dir=digits_dir, **kw), 16, process_index=p,
                                     process_count=2, with_ids=True), 6)
    assert not fetched  # the memory reader does not go through the data source
    read = take(data.train_dataset(make_config(data_dir=array_record_dir, reader='random_access',
                                               **kw), 16, process_index=p, process_count=2,
                                   with_ids=True), 3)
    for a, b in zip(memory, read):
      for key in ('image', 'label', '_index'):
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'host {p} {key}')
    stream = np.concatenate([b['_index'] for b in memory]).tolist()
    assert 48 <= len(fetched) <= len(stream) and fetched == stream[:len(fetched)]
    fetched.clear()


def _eval_ids(config, batch, process_count):
  per_host = [list(data.eval_dataset(config, batch, p, process_count, with_ids=True)
                   .as_numpy_iterator()) for p in range(process_count)]
  assert len({len(h) for h in per_host}) == 1  # the same number of batches on every host
  ids = np.concatenate([b['_index'][b['mask']] for h in per_host for b in h])
  pads = np.concatenate([b['_index'][~b['mask']] for h in per_host for b in h])
  return per_host, ids, pads


def test_padded_eval_covers_each_example_once_with_mock_data():
  """n = batch + 1 with tfds.testing.mock_data (no files, no network)."""
  with tfds.testing.mock_data(num_examples=9):
    config = make_config('cifar100', image_size=8, eval_crop_pct=0.875)
    assert data.get_info(config).num_eval == 9
    assert data.get_info(config).num_classes == 100
    per_host, ids, pads = _eval_ids(config, 8, 1)
    assert len(per_host[0]) == 2 and sorted(ids) == list(range(9)) and (pads == -1).all()
    last = per_host[0][-1]
    assert last['mask'].tolist() == [True] + [False] * 7 and (last['image'][1:] == 0).all()
    per_host, ids, _ = _eval_ids(config, 4, 2)  # 5 + 4 examples, 2 batches each
    assert len(per_host[0]) == 2 and sorted(ids) == list(range(9))
    train = next(data.train_iterator(config, batch_size=4))
    assert train['image'].shape == (4, 8, 8, 3) and train['label'].shape == (4, 100)


def test_eval_digits_three_hosts(digits_dir):
  config = make_config(data_dir=digits_dir)
  per_host, ids, _ = _eval_ids(config, 32, 3)
  assert len(per_host[0]) == 4 and sorted(ids) == list(range(297))


def test_image_folder_source(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (('train', 6), ('test', 3)):
    for cls in ('cat', 'dog'):
      os.makedirs(tmp_path / split / cls)
      for i in range(n):
        size = (int(rng.integers(10, 40)), int(rng.integers(10, 40)))
        img = Image.fromarray(rng.integers(0, 256, size + (3,)).astype(np.uint8))
        img.save(tmp_path / split / cls / f'{i}.{"png" if i % 2 else "jpg"}')
  config = make_config(f'folder:{tmp_path}', image_size=12)
  assert data.get_info(config) == data.DatasetInfo(2, 12, 6)
  batch = next(data.train_iterator(config, batch_size=4))
  assert batch['image'].shape == (4, 12, 12, 3)
  batches = list(data.eval_iterator(config, batch_size=4))
  assert sum(b['mask'].sum() for b in batches) == 6
  assert sorted(np.concatenate([b['label'][b['mask']] for b in batches])) == [0, 0, 0, 1, 1, 1]


def test_unprepared_dataset_fails_fast_with_instructions(tmp_path):
  t0 = time.time()
  with pytest.raises(data.DatasetNotPreparedError) as err:
    data.get_info(make_config('cifar100', data_dir=str(tmp_path)))
  assert time.time() - t0 < 10
  msg = str(err.value)
  assert 'cifar100' in msg and str(tmp_path) in msg and 'tfds build cifar100' in msg
  with pytest.raises(data.DatasetNotPreparedError, match='manual'):
    data.get_info(make_config('imagenet2012', data_dir=str(tmp_path)))


def test_recipes_match_the_original_configs():
  cnn, vit = data.cnn_recipe(), data.vit_recipe()
  assert (cnn.randaugment, cnn.mixup, cnn.cutmix, cnn.reprob) == ('', 0.0, 0.0, 0.0)
  assert (vit.randaugment, vit.mixup, vit.cutmix, vit.reprob) == (
      'rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.25)
  for c in (cnn, vit):
    assert c.label_smoothing == 0.1 and c.hflip == 0.5 and c.interpolation == 'random'
    assert tuple(c.scale) == (0.08, 1.0) and c.mixup_switch_prob == 0.5
  assert data.crop_pct_for('deit_tiny_patch16_224') == 0.9
  assert data.crop_pct_for('resmlp_12_224') == 0.875
  d = data.default_config()
  d.data_dir = '/some/where'  # optional string field, overridable from flags
  assert d.mean == data.CIFAR_MEAN and d.eval_crop_pct == 0.875


def test_uint8_transfer_interface(digits_dir):
  """dataset.transfer='uint8': uint8 images, the float32 path's soft targets and the batch's
  draws, one leading batch axis each (they shard like the images); eval images stay uint8."""
  config = make_config(data_dir=digits_dir, transfer='uint8')
  config.aug.randaugment = ''
  batch = next(data.train_iterator(config, batch_size=8))
  assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (8, 10) and batch['label'].dtype == np.float32
  assert set(batch) == {'image', 'label', 'mix_lam', 'mix_blend', 'mix_box', 'erase_box',
                        'erase_key'}
  assert all(v.shape[0] == 8 for v in batch.values())
  assert batch['erase_key'].dtype == np.uint32 and batch['mix_box'].dtype == np.int32
  with_ids = next(data.train_dataset(config, 8, with_ids=True).as_numpy_iterator())
  assert {'_epoch', '_index', '_step'} <= set(with_ids)
  ev = next(data.eval_iterator(config, batch_size=8))
  assert ev['image'].dtype == np.uint8 and set(ev) == {'image', 'label', 'mask'}
