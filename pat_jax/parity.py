"""Checks that pat_jax reproduces a timm model: logits and the four stage features.

    python -m pat_jax.parity --model convnext_tiny --num-classes 100 [--input teacher.pth]

With --input, the timm model is loaded from that file (e.g. an OFA-KD CIFAR-100
teacher); without, it gets random weights with every path active (see
timm_zoo.perturb_). The weights go through the same path a user takes: a .pth file,
`python -m pat_jax.convert`'s conversion to an orbax checkpoint, and a restore from it.
Prints one JSON line; exits 1 when an error exceeds 1e-4 x max(1, largest magnitude).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

TOLERANCE = 1e-4


def relative_error(got, want):
  """max |got - want| / max(1, max |want|): the parity criterion."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise AssertionError(f'shape {got.shape} != {want.shape}')
  return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def compare(name, num_classes, input_path=None, batch=2, seed=0, image_size=None, workdir=None,
            **overrides):
  """Runs timm and pat_jax on the same random batch; returns a dict of errors.

  `image_size` is the input size for CNNs (ViT/ResMLP use their img_size);
  `overrides` go to both models (e.g. img_size=32).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from pat_jax import checkpoint, convert, models, timm_zoo  # pylint: disable=g-import-not-at-top

  tmp = None
  if workdir is None:
    tmp = tempfile.TemporaryDirectory()
    workdir = tmp.name
  try:
    tmodel = timm_zoo.create(name, num_classes, **overrides)
    flax_model = models.create(name, num_classes=num_classes, **overrides)
    size = getattr(flax_model, 'img_size', image_size or 224)
    if input_path:
      sd = convert.load_state_dict(input_path)
      tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    else:
      timm_zoo.perturb_(tmodel, seed=seed, img_size=size)
      input_path = os.path.join(workdir, 'timm.pth')
      torch.save(tmodel.state_dict(), input_path)

    t0 = time.time()
    ckpt_dir = os.path.join(workdir, 'converted')
    variables = convert.from_timm(name, input_path, num_classes=num_classes, **overrides)
    checkpoint.save_variables(ckpt_dir, variables, {'model': name, 'num_classes': num_classes})
    variables = checkpoint.load_variables(ckpt_dir)
    convert_s = time.time() - t0

    x = np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)
    want_logits, want_feats = timm_zoo.forward_with_features(
        name, tmodel, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    with jax.default_matmul_precision('highest'):
      logits, feats = jax.jit(lambda v, x: flax_model.apply(v, x, train=False, return_features=True))(
          variables, x)
    result = {
        'model': name, 'image_size': size, 'batch': batch,
        'max_abs_logit': float(np.max(np.abs(want_logits))),
        'logit_err': relative_error(logits, want_logits),
        'feature_err': [relative_error(f, w) for f, w in zip(feats, want_feats)],
        'feature_shapes': [list(f.shape) for f in feats],
        'convert_s': round(convert_s, 2),
    }
    result['ok'] = max([result['logit_err']] + result['feature_err']) <= TOLERANCE
    return result
  finally:
    if tmp is not None:
      tmp.cleanup()


def main(argv=None):
  from pat_jax import models  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', required=True, help=f'one of: {", ".join(models.names())}')
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--input', default=None, help='timm checkpoint (.pth/.safetensors); random if absent')
  p.add_argument('--img-size', type=int, default=None,
                 help='input size (default: the model\'s own for ViT/ResMLP, 224 for CNNs)')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  has_img_size = hasattr(models.create(args.model, num_classes=1), 'img_size')
  overrides = {'img_size': args.img_size} if (args.img_size and has_img_size) else {}
  result = compare(args.model, args.num_classes, args.input, args.batch, args.seed,
                   image_size=args.img_size, **overrides)
  print(json.dumps(result))
  return 0 if result['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
