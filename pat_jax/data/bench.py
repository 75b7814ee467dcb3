"""Input-pipeline throughput: pat_jax (tf.data) against timm's PyTorch loader, same recipe.

    python -m pat_jax.data.bench --recipe vit --image-size 224 --batch 128 --seconds 20 [--timm] --json
    python -m pat_jax.data.bench --source folder:/data/imagenet --recipe cnn --workers 2 --json
    python -m pat_jax.data.bench --make-jpegs /tmp/jpegs --jpeg-size 500x375 --count 2000 --json

Sources (the training split, 'train', of each):
- default: an in-memory 32x32 RGB source (random pixels, 100 classes; 224x224 output as in the
  paper's CIFAR runs), decoded arrays looked up by index.
- `--source folder:ROOT`: an existing image folder, ROOT/train/<class>/*.jpg|png, read and
  decoded per example as in training (sources.make_lookup), i.e. ImageNet-style JPEG loading.
- `--make-jpegs DIR`: first writes `--count` synthetic JPEGs of `--jpeg-size` WxH (quality 90,
  smooth random content at several scales plus pixel noise, so they compress like photos: about
  the size of an ImageNet file) into DIR/train/<class>/, 10 classes, then reads them as
  `--source folder:DIR` (the same seed each time: a rerun rewrites the same files).
The JSON has img/s and img/s per worker thread (`img_per_s_per_worker` = pat_jax_img_per_s /
workers), and `img_per_cpu_s`, images per second of CPU time the process used (all its threads)
while timed: on a shared machine the wall rate depends on the others' load, the CPU cost less.
`--transfer uint8` times what a GPU/TPU host does by default (the batch-level steps move to the
accelerator); the default here is the CPU's 'float32'. `--resize-with` sets dataset.resize_with
(default 'auto': TF's tables for the in-memory source, Pillow for folders).
Cores one accelerator needs at R img/s: R / img_per_s_per_worker (or R / img_per_cpu_s).

Both sides read the same source and use the same number of workers: tf.data gets a private
threadpool of `--workers` threads, timm's DataLoader `--workers` processes (an image folder is
read by torchvision's ImageFolder, Pillow decoding). timm's side is
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


JPEG_CLASSES = 10


def _synthetic_photo(rng, width, height):
  """Smooth random content at several scales plus pixel noise: compresses like a photo."""
  from PIL import Image
  out = np.full((height, width, 3), 128, np.float32)
  for cells, amp in ((4, 90), (16, 45), (64, 25), (160, 35)):  # cells along the longer side
    cw, ch = (max(2, width * cells // max(width, height)), max(2, height * cells //
                                                               max(width, height)))
    low = rng.normal(0, amp, (ch, cw, 3)).astype(np.float32)
    out += np.stack([np.asarray(Image.fromarray(low[..., c], mode='F').resize(
        (width, height), Image.BICUBIC)) for c in range(3)], -1)
  out += rng.normal(0, 10, out.shape)
  return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def make_jpegs(root, count, width=500, height=375, seed=0, quality=90):
  """Writes `count` synthetic JPEGs into root/train/<class>/ (JPEG_CLASSES classes, round robin);
  returns their mean size in bytes."""
  rng = np.random.default_rng(seed)
  total = 0
  for i in range(count):
    cls_dir = os.path.join(root, 'train', f'class{i % JPEG_CLASSES:02d}')
    os.makedirs(cls_dir, exist_ok=True)
    path = os.path.join(cls_dir, f'{i:07d}.jpg')
    _synthetic_photo(rng, width, height).save(path, 'JPEG', quality=quality)
    total += os.path.getsize(path)
  return total / max(count, 1)


def _time(batches, batch, seconds, warmup=2):
  """(img/s, img per CPU-second of this process) over `seconds` after `warmup` batches."""
  for _ in range(warmup):
    next(batches)
  t0, c0, n = time.perf_counter(), time.process_time(), 0
  while time.perf_counter() - t0 < seconds:
    next(batches)
    n += batch
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return n / wall, n / max(cpu, 1e-9)


def bench_pat_jax(recipe, image_size, batch, seconds, workers, source=None, transfer=None,
                  resize_with=None):
  """(img/s, img per CPU-second) of data.train_iterator; source None: the in-memory 32x32."""
  import ml_collections
  from pat_jax import data
  config = ml_collections.ConfigDict({'seed': 0})
  config.dataset = data.default_config()
  if source is None:
    images, labels = _source()
    data.register_arrays('memory:bench32', 'train', images, labels, 100)
    config.dataset.name = 'memory:bench32'
  else:
    config.dataset.name = source
  config.dataset.image_size = image_size
  config.dataset.threads = workers
  if transfer:  # else the pipeline's default ('auto': 'float32' on CPU, 'uint8' on GPU/TPU)
    config.dataset.transfer = transfer
  if resize_with:
    config.dataset.resize_with = resize_with
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


def bench_timm(recipe, image_size, batch, seconds, workers, source=None):
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
  if source is None:
    dataset, num_classes = _ArrayDataset(*_source(), tf), 100
  else:
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(os.path.join(_folder_root(source), 'train'), tf)
    num_classes = len(dataset.classes)
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch,
                                       shuffle=True, num_workers=workers, drop_last=True,
                                       collate_fn=_uint8_collate, persistent_workers=True)
  mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes) \
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
          y = torch.nn.functional.one_hot(y, num_classes).float() * (1 - 0.1) + 0.1 / num_classes
        x = (x - mean) / std
        if erase is not None:
          x = erase(x)
        yield x, y
  return _time(batches(), batch, seconds)[0]  # CPU time: the workers are other processes


def _folder_root(source):
  prefix = 'folder:'
  if not source.startswith(prefix):
    raise SystemExit(f'--source must be folder:ROOT (ROOT/train/<class>/*.jpg), not {source!r}')
  return source[len(prefix):]


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
          f'{args.seconds}, {args.workers}, {args.source!r})))')
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
  p.add_argument('--source', default=None,
                 help='folder:ROOT, an image folder ROOT/train/<class>/* (default: in-memory 32x32)')
  p.add_argument('--make-jpegs', metavar='DIR', default=None,
                 help='write --count synthetic JPEGs into DIR/train/<class>/, then read them')
  p.add_argument('--jpeg-size', default='500x375', help='WxH of --make-jpegs')
  p.add_argument('--count', type=int, default=2000, help='number of --make-jpegs files')
  p.add_argument('--transfer', choices=['float32', 'uint8'], default=None,
                 help="dataset.transfer (default 'auto'); uint8 leaves mixup, normalisation and "
                      'erasing to the accelerator, as a GPU/TPU run does')
  p.add_argument('--resize-with', choices=['auto', 'pillow', 'tf'], default=None,
                 help="dataset.resize_with (default 'auto'): who does Pillow's resize")
  p.add_argument('--json', action='store_true')
  args = p.parse_args(argv)
  if args.make_jpegs and args.source:
    p.error('--make-jpegs writes the source it reads: give it or --source, not both')
  result = {'recipe': args.recipe, 'image_size': args.image_size, 'batch': args.batch,
            'workers': args.workers}
  if args.make_jpegs:
    try:
      width, height = (int(v) for v in args.jpeg_size.lower().split('x'))
    except ValueError:
      p.error(f'--jpeg-size must be WxH, e.g. 500x375, not {args.jpeg_size!r}')
    t0 = time.perf_counter()
    mean_bytes = make_jpegs(args.make_jpegs, args.count, width, height)
    args.source = 'folder:' + os.path.abspath(args.make_jpegs)
    result.update(jpeg_size=f'{width}x{height}', jpeg_count=args.count,
                  jpeg_mean_bytes=int(mean_bytes), jpeg_write_s=round(time.perf_counter() - t0, 1))
  if args.source:
    _folder_root(args.source)
    result['source'] = args.source
  if args.transfer:
    result['transfer'] = args.transfer
  if args.resize_with:
    result['resize_with'] = args.resize_with
  if args.timm:
    result['timm_img_per_s'] = round(_timm_in_subprocess(args), 1)
  rate, per_cpu_s = bench_pat_jax(args.recipe, args.image_size, args.batch, args.seconds,
                                  args.workers, args.source, args.transfer, args.resize_with)
  result['pat_jax_img_per_s'] = round(rate, 1)
  result['img_per_s_per_worker'] = round(rate / args.workers, 1)
  result['img_per_cpu_s'] = round(per_cpu_s, 1)
  print(json.dumps(result) if args.json else result)


if __name__ == '__main__':
  main()
