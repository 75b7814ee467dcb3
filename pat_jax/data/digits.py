"""A real, tiny, offline image-classification dataset as a local TFDS builder.

scikit-learn ships `load_digits` (1,797 grey 8x8 digits, values 0..16, 10 classes) inside its
wheel, so this builds with no network in well under a second. Images are made RGB uint8
(v * 255 // 16, channel replicated). The split is fixed: a permutation with
numpy `default_rng(0)`; its first 1,500 indices are 'train', the remaining 297 'test'. Examples
are written in that order (`disable_shuffling=True`), so index i of a split is stable.
"""
import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1500


def _arrays():
  from sklearn.datasets import load_digits  # imported lazily: only this builder needs it
  d = load_digits()
  images = (d.images.astype(np.int32) * 255 // 16).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  order = np.random.default_rng(0).permutation(len(images))
  return images, d.target.astype(np.int64), order


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits as 8x8 RGB images; 1,500 train / 297 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'scikit-learn load_digits, seeded 1500/297 split.'}

  def _info(self):
    # DatasetInfo(builder=self) rather than dataset_info_from_configs, which looks for a
    # metadata folder next to this module (environment.md §3).
    return tfds.core.DatasetInfo(
        builder=self,
        description='scikit-learn load_digits as 8x8 RGB uint8 images.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    images, labels, order = _arrays()
    return {
        'train': self._generate_examples(images, labels, order[:NUM_TRAIN]),
        'test': self._generate_examples(images, labels, order[NUM_TRAIN:]),
    }

  def _generate_examples(self, images, labels, indices):
    # Keys are positions in the split: TFDS writes examples sorted by key when shuffling is off.
    for position, i in enumerate(indices):
      yield position, {'image': images[i], 'label': int(labels[i])}


def prepare(data_dir=None, file_format=None):
  """Build the dataset into `data_dir` if needed and return the builder. `file_format`:
  'tfrecord' (None, for a new build) or 'array_record' (for dataset.reader='random_access');
  an existing build is read in the format it was written in."""
  builder = Digits(data_dir=data_dir, file_format=file_format)
  if file_format is None and not builder.is_prepared():
    builder = Digits(data_dir=data_dir, file_format='tfrecord')
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
