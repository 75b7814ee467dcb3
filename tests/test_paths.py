"""A run's files in a bucket (gs://): pat_jax.paths and the code that reads and writes through it.

No network: etils.epath's backends are mocked so that gs://bucket/... lands in a temporary folder
(epath.testing.mock_epath). Every file pat_jax itself reads or writes is covered; a whole
training run is not: orbax writes its arrays with tensorstore's own GCS driver, and pointed at
a local folder instead, its bucket-specific OCDBT merge fails there ("CopyRange not supported"),
so the fake would test the fake.
"""
import json
import os
import sys

import numpy as np
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from pat_jax import checkpoint, errors, metrics, paths, weights
from pat_jax.data import idx

from test_data_idx import _make_dataset


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/... -> tmp_path/bucket/... for everything that goes through etils.epath;
  returns tmp_path/bucket."""
  root = tmp_path / 'bucket'
  root.mkdir()

  def local(path):  # every backend is mocked: local paths pass through
    path = os.fspath(path)
    if not paths.is_url(path):
      return path
    assert path.startswith('gs://bucket'), f'{path}: only gs://bucket is faked'
    return os.path.join(root, path[len('gs://bucket/'):])

  def one(fn):
    return lambda original, path, *args, **kwargs: original(local(path), *args, **kwargs)

  def two(fn):
    return lambda original, path, dst, *args, **kwargs: original(local(path), local(dst), *args,
                                                                 **kwargs)

  def walk(original, top, **kwargs):
    for dirpath, dirs, files in original(local(top), **kwargs):
      yield 'gs://bucket/' + os.path.relpath(dirpath, root), dirs, files

  fns = {name: one(name) for name in ('exists', 'isdir', 'listdir', 'makedirs', 'mkdir', 'open',
                                       'remove', 'rmtree', 'stat')}
  fns.update(rename=two('rename'), replace=two('replace'), copy=two('copy'), walk=walk,
             glob=lambda original, path: ['gs://bucket/' + os.path.relpath(p, root)
                                          for p in original(local(path))])
  # With TensorFlow installed epath would take TF's real GCS client for gs://, past the mock.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  with epath_testing.mock_epath(**fns):
    yield root


def test_urls_are_not_made_local():
  assert paths.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert paths.absolute('run') == os.path.join(os.getcwd(), 'run')
  assert paths.is_url('s3://b/x') and not paths.is_url('/tmp/x')


def test_atomic_text_in_a_bucket(bucket):
  paths.makedirs('gs://bucket/run')
  paths.write_text_atomic('gs://bucket/run/result.json', '{"a": 1}')
  paths.write_text_atomic('gs://bucket/run/result.json', '{"a": 2}')
  assert paths.read_text('gs://bucket/run/result.json') == '{"a": 2}'
  assert sorted(os.listdir(bucket / 'run')) == ['result.json']  # no .tmp left behind
  assert paths.isfile('gs://bucket/run/result.json') and paths.isdir('gs://bucket/run')


def test_metrics_in_a_bucket_are_rewritten_and_resume(bucket, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # no TensorBoard: TF's GCS client is real
  writer = metrics.MetricWriter('gs://bucket/run')
  for step in (1, 2, 3):
    writer.write(step, {'train_loss': 1.0 / step})
  writer.write(2, {'eval_top1': 50.0})
  writer.close()
  rows = [json.loads(line) for line in open(bucket / 'run' / 'metrics.jsonl', encoding='utf-8')]
  assert [r['step'] for r in rows] == [1, 2, 3, 2]
  # Resumed at step 2: step 3's row goes, the rest stays, new rows follow, no row twice.
  writer = metrics.MetricWriter('gs://bucket/run', resume_step=2)
  writer.write(2, {'eval_top1': 50.0})
  writer.write(3, {'train_loss': 0.25})
  writer.close()
  rows = [json.loads(line) for line in open(bucket / 'run' / 'metrics.jsonl', encoding='utf-8')]
  assert [(r['step'], 'eval_top1' in r) for r in rows] == [(1, False), (2, False), (2, True),
                                                            (3, False)]
  assert rows[-1]['train_loss'] == 0.25


def test_damaged_step_moved_aside_in_a_bucket(bucket):
  (bucket / 'ckpt' / '7').mkdir(parents=True)
  (bucket / 'ckpt' / '7' / 'data').write_text('x')
  target = checkpoint.move_aside('gs://bucket/ckpt', 7, 'truncated')
  assert target == 'gs://bucket/ckpt/damaged/7'
  assert (bucket / 'ckpt' / 'damaged' / '7' / 'data').read_text() == 'x'
  assert 'truncated' in (bucket / 'ckpt' / 'damaged' / '7.reason.txt').read_text()
  (bucket / 'ckpt' / '7').mkdir()  # the same step damaged again: kept beside the first
  assert checkpoint.move_aside('gs://bucket/ckpt', 7, 'again') == 'gs://bucket/ckpt/damaged/7.1'
  assert not (bucket / 'ckpt' / '7').exists()


def test_missing_checkpoint_in_a_bucket_is_a_clear_error(bucket):
  with pytest.raises(checkpoint.CheckpointError, match='gs://bucket/none does not exist'):
    checkpoint.load_meta('gs://bucket/none')


def test_idx_dataset_in_a_bucket(bucket):
  (bucket / 'fmnist').mkdir()
  arrays = _make_dataset(str(bucket / 'fmnist'))
  images, labels, num_classes = idx.load('gs://bucket/fmnist', 'test')
  np.testing.assert_array_equal(labels, arrays['test'][1])
  np.testing.assert_array_equal(images[..., 0], arrays['test'][0])
  assert num_classes == 10


def test_timm_file_in_a_bucket_is_read_from_a_local_copy(bucket):
  (bucket / 'teacher.pth').write_bytes(b'weights')
  assert weights.is_timm_file('gs://bucket/teacher.pth')
  assert not weights.is_timm_file('gs://bucket/')
  local = paths.local_copy('gs://bucket/teacher.pth')
  try:
    assert not paths.is_url(local) and local.endswith('.pth')
    with open(local, 'rb') as f:
      assert f.read() == b'weights'
  finally:
    os.remove(local)


def test_a_bucket_without_google_cloud_storage_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(paths, '_importable', lambda module: False)
  with pytest.raises(errors.ConfigError, match=r"google-cloud-storage, which is not installed. "
                                                r"pip install -e '.\[gcs\]'"):
    paths.check_backend('gs://bucket/run')
  with pytest.raises(errors.ConfigError, match=r'local paths .* and gs:// buckets, not s3://'):
    paths.check_backend('s3://bucket/run')
  paths.check_backend('/local/run')  # local paths need nothing

