"""Input-pipeline throughput: pat_jax (tf.data) against timm's PyTorch loader, same recipe.

    python -m pat_jax.data.bench --recipe vit --image-size 224 --batch 128 --seconds 20 [--timm] --json

Both sides read the same in-memory 32x32 RGB source (random pixels, 100 classes; 224x224 output
as in the paper's CIFAR runs) and use the same number of workers: tf.data gets a private
threadpool of `--workers` threads, timm's DataLoader `--workers` processes. timm's side is
`create_transform(is_training=True, ...)` per image, FastCollateMixup-equivalent `Mixup` on the
batch, then normalisation + RandomErasing as in its prefetcher, so both produce normalised float
batches with soft targets. The first batches (tracing / worker start-up) are excluded.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _source(n=10000, size=32, num_classes=100, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, num_classes, n)


def _time(batches, batch, seconds, warmup=2):
  for _ in range(warmup):
    next(batches)
  t0, n = time.perf_counter(), 0
  while time.perf_counter() - t0 < seconds:
    next(batches)
    n += batch
  return n / (time.perf_counter() - t0)


def bench_pat_jax(recipe, image_size, batch, seconds, workers):
  import ml_collections
  from pat_jax import data
  images, labels = _source()
  data.register_arrays('memory:bench32', 'train', images, labels, 100)
  config = ml_collections.ConfigDict({'seed': 0})
  config.dataset = data.default_config()
  config.dataset.name = 'memory:bench32'
  config.dataset.image_size = image_size
  config.dataset.threads = workers
  config.aug = data.vit_recipe() if recipe == 'vit' else data.cnn_recipe()
  return _time(data.train_iterator(config, batch_size=batch), batch, seconds)


class _ArrayDataset:
  def __init__(self, images, labels, transform):
    self.images, self.labels, self.transform = images, labels, transform

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    from PIL import Image
    return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def bench_timm(recipe, image_size, batch, seconds, workers):
  import torch
  from timm.data import Mixup, create_transform
  from timm.data.random_erasing import RandomErasing
  from pat_jax.data.recipes import CIFAR_MEAN, CIFAR_STD
  torch.set_num_threads(1)
  _patch_timm_posterize()
  vit = recipe == 'vit'
  tf = create_transform(image_size, is_training=True, auto_augment='rand-m9-mstd0.5-inc1' if vit
                        else None, color_jitter=0.0 if not vit else 0.4, interpolation='random',
                        mean=CIFAR_MEAN, std=CIFAR_STD, re_prob=0.0, use_prefetcher=True)
  images, labels = _source()
  loader = torch.utils.data.DataLoader(_ArrayDataset(images, labels, tf), batch_size=batch,
                                       shuffle=True, num_workers=workers, drop_last=True,
                                       collate_fn=_uint8_collate, persistent_workers=True)
  mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=100) \
      if vit else None
  erase = RandomErasing(0.25, mode='pixel', device='cpu') if vit else None
  mean = torch.tensor([255 * m for m in CIFAR_MEAN]).view(1, 3, 1, 1)
  std = torch.tensor([255 * s for s in CIFAR_STD]).view(1, 3, 1, 1)

  def batches():
    while True:
      for x, y in loader:
        x = x.float()
        if mixup is not None:
          x, y = mixup(x, y)  # batch mode: one lambda, i mixed with b-1-i
        else:
          y = torch.nn.functional.one_hot(y, 100).float() * 0.9 + 0.001
        x = (x - mean) / std
        if erase is not None:
          x = erase(x)
        yield x, y
  return _time(batches(), batch, seconds)


def _patch_timm_posterize():
  """Pillow >= 10 rejects posterize(bits=0), which timm's PosterizeIncreasing asks for at
  magnitude 10 (about 2% of draws with mstd 0.5). Older Pillow returned black; do that."""
  from timm.data import auto_augment
  original = auto_augment.posterize

  def posterize(img, bits_to_keep, **kwargs):
    if bits_to_keep <= 0:
      return img.point(lambda _: 0)
    return original(img, bits_to_keep, **kwargs)
  for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    auto_augment.NAME_TO_OP[name] = posterize


def _uint8_collate(samples):
  import torch
  x = torch.stack([torch.as_tensor(np.asarray(s[0])) for s in samples])
  return x, torch.tensor([s[1] for s in samples])


def _timm_in_subprocess(args):
  """torch must be imported before TensorFlow (the reverse order segfaults here), and this
  package imports TF, so timm runs in a fresh interpreter that imports torch first."""
  code = ('import torch, timm, json; from pat_jax.data import bench; '
          f'print(json.dumps(bench.bench_timm({args.recipe!r}, {args.image_size}, {args.batch}, '
          f'{args.seconds}, {args.workers})))')
  out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True)
  return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--recipe', choices=['vit', 'cnn'], default='vit')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--seconds', type=float, default=20)
  p.add_argument('--workers', type=int, default=os.cpu_count())
  p.add_argument('--timm', action='store_true', help='also time timm\'s PyTorch loader')
  p.add_argument('--json', action='store_true')
  args = p.parse_args(argv)
  result = {'recipe': args.recipe, 'image_size': args.image_size, 'batch': args.batch,
            'workers': args.workers}
  if args.timm:
    result['timm_img_per_s'] = round(_timm_in_subprocess(args), 1)
  result['pat_jax_img_per_s'] = round(bench_pat_jax(args.recipe, args.image_size, args.batch,
                                                    args.seconds, args.workers), 1)
  print(json.dumps(result) if args.json else result)


if __name__ == '__main__':
  main()
