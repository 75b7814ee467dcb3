"""IDX (MNIST-format) datasets and sliced splits, on tiny IDX files written here (no apt, no network)."""
import gzip
import os

import ml_collections
import numpy as np
import pytest

from pat_jax import data
from pat_jax.data import idx, pipeline, sources


def _write_idx(path, array, magic=None, truncate=0):
  array = np.asarray(array, np.uint8)
  magic = magic if magic is not None else (0x0803 if array.ndim == 3 else 0x0801)
  raw = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  raw += array.tobytes()
  raw = raw[:len(raw) - truncate]
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(raw)


def _make_dataset(root, n_train=20, n_test=10, gz=True):
  rng = np.random.default_rng(0)
  arrays = {'train': (rng.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10),
            'test': (rng.integers(0, 256, (n_test, 28, 28)), (np.arange(n_test) * 3) % 10)}
  ext = '.gz' if gz else ''
  for split, (images, labels) in arrays.items():
    image_stem, label_stem = idx.FILES[split]
    _write_idx(os.path.join(root, image_stem + ext), images)
    _write_idx(os.path.join(root, label_stem + ext), labels)
  return arrays


@pytest.mark.parametrize('gz', [True, False])
def test_reads_good_files(tmp_path, gz):
  arrays = _make_dataset(str(tmp_path), gz=gz)
  for split in ('train', 'test'):
    images, labels, num_classes = idx.load(str(tmp_path), split)
    assert images.shape == (len(arrays[split][1]), 28, 28, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], arrays[split][0])
    np.testing.assert_array_equal(images[..., 2], arrays[split][0])  # grey -> RGB
    np.testing.assert_array_equal(labels, arrays[split][1])
    assert num_classes == 10


def test_truncated_file_is_a_clear_error(tmp_path):
  _make_dataset(str(tmp_path), gz=False)
  path = os.path.join(str(tmp_path), 'train-images-idx3-ubyte')
  images = idx.read_idx(path, 3)
  _write_idx(path, images, truncate=100)
  with pytest.raises(idx.IdxError, match='truncated') as e:
    idx.load(str(tmp_path), 'train')
  assert 'apt-get' in str(e.value)  # says how to get the files again


def test_truncated_gzip_stream_is_a_clear_error(tmp_path):
  _make_dataset(str(tmp_path))
  path = os.path.join(str(tmp_path), 'train-images-idx3-ubyte.gz')
  raw = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(raw[:len(raw) // 2])
  with pytest.raises(idx.IdxError, match='damaged or truncated'):
    idx.load(str(tmp_path), 'train')


def test_wrong_magic_number(tmp_path):
  _make_dataset(str(tmp_path))
  # A label file where the image file should be: a 1-d magic number in a 3-d file's place.
  _write_idx(os.path.join(str(tmp_path), 'train-images-idx3-ubyte.gz'),
             np.zeros((20, 28, 28)), magic=0x0801)
  with pytest.raises(idx.IdxError, match='magic number 0x00000801, expected 0x00000803'):
    idx.load(str(tmp_path), 'train')


def test_missing_file_and_dir(tmp_path):
  _make_dataset(str(tmp_path))
  os.remove(os.path.join(str(tmp_path), 't10k-labels-idx1-ubyte.gz'))
  with pytest.raises(idx.IdxError, match=r't10k-labels-idx1-ubyte\[.gz\] not found'):
    idx.load(str(tmp_path), 'test')
  with pytest.raises(idx.IdxError, match='does not exist'):
    idx.load(str(tmp_path / 'nowhere'), 'train')


def test_parse_split():
  assert sources.parse_split('train') == ('train', None)
  n = 60000
  head = sources._apply_slice(sources.parse_split('train[:90%]')[1], n)
  tail = sources._apply_slice(sources.parse_split('train[90%:]')[1], n)
  assert (head.start, head.stop, tail.start, tail.stop) == (0, 54000, 54000, 60000)
  count = sources._apply_slice(sources.parse_split('train[10:25]')[1], n)
  assert (count.start, count.stop) == (10, 25)
  with pytest.raises(ValueError, match='Cannot parse split'):
    sources.parse_split('train[90%]')


def _config(root, **dataset):
  c = ml_collections.ConfigDict({'seed': 1, 'dataset': data.default_config(),
                                 'aug': data.cnn_recipe()})
  c.dataset.update(dict(name='idx:' + root, image_size=32, eval_crop_pct=1.0), **dataset)
  return c


def test_validation_split_through_the_pipeline(tmp_path):
  """train[:90%] and train[90%:] partition train; the eval pipeline reads the held-out part."""
  root = str(tmp_path)
  arrays = _make_dataset(root, n_train=40)
  data.clear_cache()
  c = _config(root, train_split='train[:90%]', eval_split='train[90%:]')
  info = data.get_info(c)
  assert (info.num_classes, info.num_train, info.num_eval) == (10, 36, 4)
  labels = np.concatenate([b['label'][b['mask']] for b in data.eval_iterator(c, batch_size=3)])
  np.testing.assert_array_equal(labels, arrays['train'][1][36:])
  batch = next(data.train_iterator(c, batch_size=4))
  assert batch['image'].shape == (4, 32, 32, 3)


def test_fraction_seed_gives_nested_subsets(tmp_path):
  c = _config(str(tmp_path), fraction_seed=0)
  subsets = []
  for seed, fraction in ((1, 0.25), (2, 0.5), (3, 1.0 - 1e-9)):
    c.seed, c.dataset.train_fraction = seed, fraction
    subsets.append(set(pipeline.train_indices(c, 1000).tolist()))
  assert subsets[0] < subsets[1] < subsets[2]  # independent of the run's seed
  c.dataset.fraction_seed = None
  c.seed, c.dataset.train_fraction = 1, 0.25
  other = set(pipeline.train_indices(c, 1000).tolist())
  c.seed = 2
  assert other != set(pipeline.train_indices(c, 1000).tolist())  # default: follows the seed


def test_not_prepared_error(tmp_path):
  data.clear_cache()
  c = _config(str(tmp_path / 'missing'))
  with pytest.raises(data.DatasetNotPreparedError, match='dataset-fashion-mnist'):
    data.get_info(c)
