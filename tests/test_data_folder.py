"""Image folders ('folder:<root>') are read per example: the split holds file paths, a host reads
only the files of its own indices, and the batches are those of the encoded bytes held in memory."""
import io
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pat_jax import data
from pat_jax.data import pipeline
from pat_jax.data import sources

CLASSES = ('b_dog', 'a_cat', 'c_fox')  # created out of order: labels follow the sorted names


def make_config(name, image_size=12, recipe='vit', **dataset):
  config = ml_collections.ConfigDict({'seed': 7})
  config.dataset = data.default_config()
  config.dataset.name = name
  config.dataset.image_size = image_size
  config.dataset.update(dataset)
  config.aug = data.vit_recipe() if recipe == 'vit' else data.cnn_recipe()
  return config


@pytest.fixture
def folder(tmp_path):
  """root/{train,test}/<class>/<i>.png|jpg, varied sizes; returns root and {split: [(path, label)]}."""
  rng = np.random.default_rng(0)
  files = {}
  for split, n in (('train', 4), ('test', 3)):
    for cls in CLASSES:
      os.makedirs(tmp_path / split / cls)
      for i in range(n):
        size = (int(rng.integers(10, 30)), int(rng.integers(10, 30)))
        img = Image.fromarray(rng.integers(0, 256, size + (3,)).astype(np.uint8))
        img.save(tmp_path / split / cls / f'{i}.{"png" if i % 2 else "jpg"}')
    (tmp_path / split / 'a_cat' / 'notes.txt').write_text('not an image')
    files[split] = [(str(tmp_path / split / cls / f'{i}.{"png" if i % 2 else "jpg"}'), label)
                    for label, cls in enumerate(sorted(CLASSES)) for i in range(n)]
  sources.clear_cache()
  yield str(tmp_path), files
  sources.clear_cache()


def _as_bytes_source(name, files):
  """The same splits as encoded bytes in memory (how folders were read before): the reference."""
  for split, entries in files.items():
    arr = np.empty(len(entries), dtype=object)
    arr[:] = [open(p, 'rb').read() for p, _ in entries]
    sources._REGISTERED[(name, split)] = sources.Split(
        arr, np.asarray([l for _, l in entries], np.int64), len(CLASSES))


def test_split_holds_sorted_paths_and_labels_not_bytes(folder):
  root, files = folder
  config = make_config(f'folder:{root}')
  split = sources.load_split(config.dataset, 'train')
  assert split.files and split.encoded
  assert list(split.images) == [p for p, _ in files['train']]  # sorted classes, sorted files
  assert list(split.labels) == [l for _, l in files['train']]
  assert data.get_info(config) == data.DatasetInfo(3, 12, 9)
  half = sources.load_split(config.dataset, 'train[:50%]')
  assert half.files and list(half.images) == list(split.images[:6])
  assert list(half.labels) == [0, 0, 0, 0, 1, 1]
  # A relative root is made absolute: reading does not depend on the working directory later.
  cwd = os.getcwd()
  try:
    os.chdir(os.path.dirname(root))
    rel = sources._load_folder(os.path.basename(root), 'test', 'train')[0]
  finally:
    os.chdir(cwd)
  assert list(rel.images) == [p for p, _ in files['test']]


def test_lookup_reads_and_decodes_each_file(folder):
  root, files = folder
  n, num_classes, lookup = sources.make_lookup(make_config(f'folder:{root}').dataset, 'test')
  assert (n, num_classes, lookup.static_shape) == (9, 3, None)
  for i, (path, label) in enumerate(files['test']):
    image, got_label = lookup(tf.constant(i, tf.int64))
    # What timm's loader sees (PIL), JPEGs included (libjpeg's accurate IDCT, sources.decode).
    np.testing.assert_array_equal(image.numpy(), np.asarray(Image.open(path).convert('RGB')))
    assert int(got_label) == label


def test_jpegs_decode_as_pillow_decodes_them():
  """Chroma subsampling 4:4:4 / 4:2:2 / 4:2:0, baseline and progressive, RGB, greyscale and
  CMYK files: sources.decode gives Pillow's `.convert('RGB')` pixels bit for bit (TF's default
  fast IDCT did not: checked here too, so that this test keeps meaning something)."""
  rng = np.random.default_rng(2)
  base = np.asarray(Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
                    .resize((61, 45), Image.BICUBIC))
  base = np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
  fast_differs = False
  for mode in ('RGB', 'L', 'CMYK'):
    for subsampling in (0, 1, 2):
      for progressive in (False, True):
        buf = io.BytesIO()
        Image.fromarray(base).convert(mode).save(buf, 'JPEG', quality=85, subsampling=subsampling,
                                                 progressive=progressive)
        want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert('RGB'))
        got = sources.decode(tf.constant(buf.getvalue())).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f'{mode} {subsampling} {progressive}')
        fast = tf.io.decode_image(buf.getvalue(), channels=3).numpy()
        fast_differs |= not np.array_equal(fast, want)
  assert fast_differs


def _photo_like(rng, shape):
  """Smooth content plus noise: what makes libjpeg's fast and accurate IDCTs differ."""
  small = rng.integers(0, 256, (shape[0] // 4, shape[1] // 4, 3), dtype=np.uint8)
  base = np.asarray(Image.fromarray(small).resize(shape[1::-1], Image.BICUBIC)).astype(int)
  return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def test_fixed_shape_tfds_jpegs_decode_as_pillow_decodes_them(tmp_path):
  """A TFDS dataset of fixed-shape JPEG images (TFDS decodes them with the fast IDCT) is read
  with the pixels Pillow gives for the stored bytes, as image folders and ImageNet-like TFDS
  datasets are."""
  import tensorflow_datasets as tfds
  images = [_photo_like(np.random.default_rng(i), (24, 32)) for i in range(6)]

  class FixedJpegs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.
                                   FeaturesDict({'image': tfds.features.Image(
                                       shape=(24, 32, 3), encoding_format='jpeg'),
                                                 'label': tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, img in enumerate(images):
        yield i, {'image': img, 'label': i % 2}

  FixedJpegs(data_dir=str(tmp_path)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  builder = tfds.builder('fixed_jpegs', data_dir=str(tmp_path))
  stored = [e['image'] for e in builder.as_dataset(
      split='train', decoders={'image': tfds.decode.SkipDecoding()}).as_numpy_iterator()]
  want = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert('RGB')) for b in stored])
  tfds_default = np.stack([e['image'] for e in builder.as_dataset(split='train').as_numpy_iterator()])
  assert not np.array_equal(tfds_default, want)  # else this test would not tell the two apart
  cfg = make_config('fixed_jpegs', data_dir=str(tmp_path))
  split = sources.load_split(cfg.dataset, 'train')
  assert split.images.dtype == np.uint8 and split.images.shape == (6, 24, 32, 3)
  np.testing.assert_array_equal(split.images, want)
  np.testing.assert_array_equal(split.labels, [i % 2 for i in range(6)])


def test_batches_equal_the_in_memory_bytes(folder):
  """Training (CNN recipe: the crop/resize/flip that reads the image; the ViT recipe's extra
  steps act on the decoded batch whatever the source) and evaluation, bit for bit."""
  root, files = folder
  _as_bytes_source('memory:folder_ref', files)
  try:
    got = make_config(f'folder:{root}', recipe='cnn')
    ref = make_config('memory:folder_ref', recipe='cnn')
    ours, theirs = data.train_iterator(got, 4), data.train_iterator(ref, 4)
    for _ in range(4):  # 3 steps per epoch: crosses into the second epoch
      a, b = next(ours), next(theirs)
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
    ours, theirs = list(data.eval_iterator(got, 4)), list(data.eval_iterator(ref, 4))
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
      for k in ('image', 'label', 'mask'):
        np.testing.assert_array_equal(a[k], b[k])
  finally:
    for split in files:
      sources._REGISTERED.pop(('memory:folder_ref', split), None)


def test_a_host_reads_only_its_own_files(folder):
  root, files = folder
  config = make_config(f'folder:{root}')
  sources.load_split(config.dataset, 'test')  # listed (and cached) while every file is there
  whole = list(data.eval_iterator(config, 8))[0]
  start, end = pipeline.host_range(9, 0, 2)
  for path, _ in files['test'][end:]:  # host 1's share vanishes: host 0 must not notice
    os.remove(path)
  mine = list(data.eval_iterator(config, 8, process_index=0, process_count=2))
  assert len(mine) == 1 and mine[0]['mask'].sum() == end - start
  np.testing.assert_array_equal(mine[0]['image'][:end], whole['image'][:end])
  # The bytes are read when the pipeline runs, not when the split is listed.
  first = files['test'][0][0]
  Image.fromarray(np.full((9, 9, 3), 200, np.uint8)).save(first, format='JPEG')
  again = list(data.eval_iterator(config, 8, process_index=0, process_count=2))[0]
  assert not np.array_equal(again['image'][0], whole['image'][0])
  with pytest.raises(tf.errors.NotFoundError):
    list(data.eval_iterator(config, 8, process_index=1, process_count=2))


def test_missing_or_empty_folders_fail_with_the_layout(tmp_path):
  sources.clear_cache()
  with pytest.raises(data.DatasetNotPreparedError, match='does not exist'):
    data.get_info(make_config(f'folder:{tmp_path}/nowhere'))
  os.makedirs(tmp_path / 'train' / 'cls')
  with pytest.raises(data.DatasetNotPreparedError, match='No images found'):
    data.get_info(make_config(f'folder:{tmp_path}'))


def test_pillow_and_tf_resizers_give_the_same_batches(folder):
  """A folder of varied sizes (10-29 px, to 12 and 20: up- and downsampling) through the whole
  pipeline: dataset.resize_with 'auto' (Pillow here), 'pillow' and 'tf' give equal batches,
  training and eval."""
  root, _ = folder
  for size in (12, 20):
    out = {}
    for mode in ('auto', 'pillow', 'tf'):
      config = make_config(f'folder:{root}', image_size=size, recipe='cnn', resize_with=mode)
      train = pipeline.train_iterator(config, batch_size=4)
      out[mode] = [next(train)['image'] for _ in range(3)]
      out[mode] += [b['image'] for b in data.eval_iterator(config, batch_size=4)]
    for mode in ('auto', 'pillow'):
      for got, want in zip(out[mode], out['tf']):
        np.testing.assert_array_equal(got, want, err_msg=f'{mode} {size}')


def test_data_bench_reads_a_folder_with_either_resizer(folder, capsys):
  """`python -m pat_jax.data.bench --source folder:ROOT --resize-with ...` times the pipeline
  and reports its options and rates as one JSON line."""
  import json
  from pat_jax.data import bench
  root, _ = folder
  for mode in ('pillow', 'tf'):
    bench.main(['--source', f'folder:{root}', '--recipe', 'cnn', '--image-size', '12',
                '--batch', '4', '--seconds', '0.5', '--workers', '1', '--transfer', 'uint8',
                '--resize-with', mode, '--json'])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['resize_with'] == mode and result['transfer'] == 'uint8'
    assert result['source'] == f'folder:{root}'
    assert result['pat_jax_img_per_s'] > 0 and result['img_per_cpu_s'] > 0
