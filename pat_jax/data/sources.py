"""Dataset access: TFDS datasets, the local digits builder and image folders, read by index.

The pipeline addresses examples by their index in the split, so the order of an epoch is a pure
function of (seed, epoch) and any step can be resumed exactly. Two readers provide that:
- 'memory' (default): the split is read once, in file order, into host RAM (decoded uint8 when
  TFDS knows a fixed image shape, else the encoded bytes) and looked up with `tf.gather`.
  CIFAR-100 train is 150 MB; digits are small. Image folders are the exception: only their
  file paths are held, and each example's file is read (`tf.io.read_file`, local or gs://) when
  the pipeline looks its index up, so a host reads only the files of its own indices.
- 'random_access': `tfds.data_source` over ArrayRecord files (ImageNet prepared with
  `--file_format=array_record`), one example read per index; nothing is held in memory.
Sources: any TFDS name, 'digits' (data/digits.py), 'folder:/root' (image folders) and 'idx:DIR'
(MNIST-format files, data/idx.py: Fashion-MNIST, MNIST). Splits may be sliced as in TFDS
('train[:90%]', 'train[90%:]'), which is how a validation split is held out of 'train'.
TFDS is never allowed to download: an unprepared dataset raises in well under a second with the
command that prepares it.
"""
import dataclasses
import os
import re
from typing import Optional

import numpy as np
from etils import epath
import tensorflow as tf
import tensorflow_datasets as tfds

from pat_jax import errors, paths
from pat_jax.data import digits
from pat_jax.data import idx

FOLDER_PREFIX = 'folder:'
IDX_PREFIX = idx.PREFIX
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
_CACHE = {}
_REGISTERED = {}


class DatasetNotPreparedError(errors.UserError, RuntimeError):
  """The dataset is not in data_dir; the message says how to prepare it."""


def _prepare_hint(name, data_dir):
  shown = data_dir or '~/tensorflow_datasets'
  if name.startswith('imagenet2012'):
    return (f"Dataset '{name}' is not prepared in data_dir={shown}. ImageNet needs a manual "
            f"download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
            f"{shown}/downloads/manual/, then run `tfds build imagenet2012 --data_dir={shown}` "
            f"(add `--file_format=array_record` for config.dataset.reader='random_access').")
  return (f"Dataset '{name}' is not prepared in data_dir={shown}, and pat_jax never downloads. "
          f"On a machine with network run `tfds build {name} --data_dir={shown}` and copy the "
          f"folder here (or set config.dataset.data_dir to where it is).")


@dataclasses.dataclass
class Split:
  """One split in memory. images: uint8 (N, H, W, 3), or encoded bytes (N,) when sizes vary,
  or (files=True, image folders) the paths (N,) of the encoded files, read per example."""
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  files: bool = False

  @property
  def encoded(self) -> bool:
    """Each image is one encoded string (bytes, or a file's path when `files`) to decode."""
    return self.images.ndim == 1

  def __len__(self):
    return len(self.labels)


def _builder(name, data_dir):
  if name == 'digits':
    return digits.prepare(data_dir)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotPreparedError(f'{_prepare_hint(name, data_dir)} ({e})') from None


def _as_dataset(builder, name, data_dir, split, decoders=None):
  try:
    return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                              read_config=tfds.ReadConfig(try_autocache=False))
  except AssertionError as e:  # tfds: "could not find data in <data_dir>"
    raise DatasetNotPreparedError(_prepare_hint(name, data_dir)) from e


def _fixed_image_shape(builder):
  shape = builder.info.features['image'].shape
  return all(d is not None for d in shape)


def _load_tfds(name, data_dir, split) -> Split:
  builder = _builder(name, data_dir)
  num_classes = builder.info.features['label'].num_classes
  if _fixed_image_shape(builder):  # decoded once, here, into one uint8 array
    if builder.info.features['image'].encoding_format == 'jpeg':
      # TFDS would decode with libjpeg's fast IDCT, not the pixels Pillow gives (see decode).
      ds = _as_dataset(builder, name, data_dir, split,
                       decoders={'image': tfds.decode.SkipDecoding()})
      ds = ds.map(lambda e: (decode(e['image']), e['label']))
    else:  # PNG, TFDS's default encoding: lossless, the same pixels either way
      ds = _as_dataset(builder, name, data_dir, split).map(lambda e: (e['image'], e['label']))
    parts = list(ds.batch(4096).as_numpy_iterator())
    images = np.concatenate([p[0] for p in parts]).astype(np.uint8)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
  else:  # variable sizes (ImageNet-like): keep the encoded bytes, decode per example
    ds = _as_dataset(builder, name, data_dir, split,
                     decoders={'image': tfds.decode.SkipDecoding()})
    parts = list(ds.map(lambda e: (e['image'], e['label'])).batch(4096).as_numpy_iterator())
    images = np.concatenate([p[0] for p in parts]).astype(object)
  labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
  return Split(images, labels, num_classes), builder.is_prepared()


def folder_classes(root, split):
  split_dir = os.path.join(root, split)
  if not paths.isdir(split_dir):
    raise DatasetNotPreparedError(
        f'Image folder {split_dir} does not exist; expected <root>/<split>/<class>/*.png|jpg.')
  return sorted(p.name for p in epath.Path(split_dir).iterdir() if p.is_dir())


def _load_folder(root, split, class_split) -> Split:
  """root/<split>/<class>/<file>: classes numbered in sorted order of the train split's folders,
  files in sorted order. Only the paths are listed (made absolute, URLs kept); the files are read
  and decoded per example in the pipeline (make_lookup)."""
  classes = folder_classes(root, class_split)
  root = paths.absolute(root)
  images, labels = [], []
  for label, cls in enumerate(classes):
    cls_dir = epath.Path(root) / split / cls
    if not cls_dir.is_dir():
      continue
    for file in sorted(cls_dir.iterdir(), key=lambda p: p.name):
      if file.name.lower().endswith(IMAGE_EXTENSIONS):
        images.append(os.fspath(file))
        labels.append(label)
  if not images:
    raise DatasetNotPreparedError(f'No images found under {os.path.join(root, split)}.')
  arr = np.empty(len(images), dtype=object)
  arr[:] = images
  return Split(arr, np.asarray(labels, np.int64), len(classes), files=True), True


_SLICE = re.compile(r'^(\w+)\[(-?\d*)(%?):(-?\d*)(%?)\]$')


def parse_split(split: str):
  """'train[:90%]' -> ('train', slice) for sources TFDS does not read; a plain name -> (name, None).

  Same meaning as TFDS's slicing: bounds in examples or in percent (rounded to the nearest
  example), either may be omitted; 'train[:90%]' and 'train[90%:]' partition 'train'.
  """
  m = _SLICE.match(split.replace(' ', ''))
  if not m:
    if '[' in split:
      raise errors.ConfigError(f'Cannot parse split {split!r}: use NAME, NAME[a:b] or NAME[a%:b%].')
    return split, None
  base, lo, lo_pct, hi, hi_pct = m.groups()
  return base, (lo, lo_pct == '%', hi, hi_pct == '%')


def _apply_slice(spec, n):
  def bound(value, pct, default):
    if value == '':
      return default
    v = int(value)
    return int(round(v * n / 100)) if pct else v
  lo, lo_pct, hi, hi_pct = spec
  return slice(bound(lo, lo_pct, 0), bound(hi, hi_pct, n))


def _sliced(whole: Split, spec) -> Split:
  if spec is None:
    return whole
  sl = _apply_slice(spec, len(whole))
  return Split(whole.images[sl], whole.labels[sl], whole.num_classes, whole.files)


def load_split(dataset_cfg, split: str) -> Split:
  """The whole split in memory (for image folders: its files' paths), in its stable file order
  (cached for prepared datasets)."""
  name, data_dir = dataset_cfg.name, dataset_cfg.data_dir
  if (name, split) in _REGISTERED:
    return _REGISTERED[(name, split)]
  key = (name, data_dir, split)
  if key in _CACHE:
    return _CACHE[key]
  if name.startswith((FOLDER_PREFIX, IDX_PREFIX)):  # TFDS slices its own splits
    base, spec = parse_split(split)
    if spec is not None:  # a slice of the whole split, which is read (and cached) once
      return _sliced(load_split(dataset_cfg, base), spec)
  if name.startswith(FOLDER_PREFIX):
    result, cacheable = _load_folder(name[len(FOLDER_PREFIX):], split,
                                     parse_split(dataset_cfg.train_split)[0])
  elif name.startswith(IDX_PREFIX):
    try:
      result, cacheable = Split(*idx.load(name[len(IDX_PREFIX):], split)), True
    except idx.IdxError as e:
      raise DatasetNotPreparedError(str(e)) from None
  else:
    result, cacheable = _load_tfds(name, data_dir, split)
  if cacheable:  # not under tfds.testing.mock_data, whose examples change per context
    _CACHE[key] = result
  return result


def clear_cache():
  _CACHE.clear()


def register_arrays(name, split, images, labels, num_classes):
  """Make numpy arrays readable as dataset `name` (e.g. 'memory:bench32'), split `split`.

  images: uint8 (N, H, W, 3); labels: int (N,). Used by the benchmark and for users' own arrays;
  everything after loading is the same code path as for TFDS datasets.
  """
  _REGISTERED[(name, split)] = Split(np.asarray(images, np.uint8), np.asarray(labels, np.int64),
                                     int(num_classes))


class RandomAccessSplit:
  """`tfds.data_source` over ArrayRecord files; examples fetched one index at a time."""

  def __init__(self, dataset_cfg, split):
    name, data_dir = dataset_cfg.name, dataset_cfg.data_dir
    builder = _builder(name, data_dir)
    try:
      self._source = builder.as_data_source(split=split,
                                            decoders={'image': tfds.decode.SkipDecoding()})
    except (AssertionError, FileNotFoundError) as e:
      raise DatasetNotPreparedError(_prepare_hint(name, data_dir)) from e
    self.num_classes = builder.info.features['label'].num_classes
    self._len = len(self._source)

  def __len__(self):
    return self._len

  def fetch(self, index):
    ex = self._source[int(index)]
    return np.asarray(ex['image'], dtype=object).item(), np.int64(ex['label'])


def split_size(dataset_cfg, split: str) -> int:
  if dataset_cfg.get('reader', 'memory') == 'random_access':
    return len(RandomAccessSplit(dataset_cfg, split))
  return len(load_split(dataset_cfg, split))


def num_classes(dataset_cfg) -> int:
  name = dataset_cfg.name
  if (name, dataset_cfg.train_split) in _REGISTERED:
    return _REGISTERED[(name, dataset_cfg.train_split)].num_classes
  if name.startswith(FOLDER_PREFIX):
    return len(folder_classes(name[len(FOLDER_PREFIX):], parse_split(dataset_cfg.train_split)[0]))
  if name.startswith(IDX_PREFIX):
    return load_split(dataset_cfg, dataset_cfg.train_split).num_classes
  return _builder(name, dataset_cfg.data_dir).info.features['label'].num_classes


def decode(encoded):
  """Encoded image bytes -> uint8 (H, W, 3), the pixels Pillow's `.convert('RGB')` gives (timm's
  loader). JPEGs with libjpeg's accurate integer IDCT, as Pillow decodes them: TF's default
  (`decode_image`, `decode_jpeg`'s dct_method '') is the fast IDCT, which differed from Pillow
  in 62% of the values of photo-like JPEGs, by up to 5 levels, at the same speed
  (docs/BENCHMARKS.md). PNG and the other lossless formats decode exactly either way."""
  def jpeg():
    return tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE')

  def other():
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return tf.ensure_shape(tf.cond(tf.io.is_jpeg(encoded), jpeg, other), [None, None, 3])


def make_lookup(dataset_cfg, split: str):
  """(num_examples, num_classes, fn(index) -> (uint8 image (H, W, 3), int32 label)) for tf.data.

  fn.static_shape is (H, W) when every image of the split has that size, else None.
  """
  if dataset_cfg.get('reader', 'memory') == 'random_access':
    src = RandomAccessSplit(dataset_cfg, split)

    def fetch(index):
      img, label = tf.numpy_function(src.fetch, [index], (tf.string, tf.int64), stateful=False)
      return decode(tf.reshape(img, [])), tf.cast(tf.reshape(label, []), tf.int32)
    fetch.static_shape = None
    return len(src), src.num_classes, fetch

  data = load_split(dataset_cfg, split)
  # Variables, not constants: a 150 MB constant would be serialised into every map function.
  with tf.device('/CPU:0'):
    values = tf.constant(list(data.images), tf.string) if data.encoded else data.images
    images = tf.Variable(values, trainable=False)
    labels = tf.Variable(data.labels.astype(np.int32), trainable=False)

  def lookup(index):
    img = tf.gather(images, index)
    if data.files:  # a path: this example's file alone is read, here (local or gs://)
      img = tf.io.read_file(img)
    img = decode(img) if data.encoded else img
    return img, tf.gather(labels, index)
  # Decoded arrays have one (H, W) for the whole split: the training crop+resize precomputes
  # its coefficient tables for it (augment.CropResizer).
  lookup.static_shape = None if data.encoded else tuple(int(d) for d in data.images.shape[1:3])
  return len(data), data.num_classes, lookup
