r"""Offline quickstart: PAT on real data (scikit-learn's digits) with no network, on a laptop CPU.

Command:
  python -m pat_jax.main --config=configs/digits_demo.py --workdir=workdirs/digits_demo

What it does: if WORKDIR/teacher holds no checkpoint, first trains a small CNN teacher
(mini_convnext, supervised) on the 1,500 training digits; then distils it into a small ViT
(mini_deit) with PAT (AFP prompts with feedback inside the teacher, RAA, KD). Images are
upsampled from 8x8 to 32x32; the 297 test digits are the eval split.
The comparison (teacher, student alone, KD, PAT in one command): python -m pat_jax.demo.
Expected and runtime: docs/RESULTS.md ("pat_jax's digits demo"), measured with these commands.
Arguments: `--config=configs/digits_demo.py:kd` distils with plain KD, `:none` trains the
student alone (the baselines, for comparison).
"""
import ml_collections

from pat_jax import config as base_config
from pat_jax.distill import pat

DIGITS_MEAN = (0.3045,) * 3  # measured over the 1,797 images (0..1 units)
DIGITS_STD = (0.3760,) * 3


def _digits(c, epochs, batch_size):
  c.dataset.name = 'digits'
  c.dataset.image_size = 32
  c.dataset.mean, c.dataset.std = DIGITS_MEAN, DIGITS_STD
  c.dataset.eval_crop_pct = 1.0
  c.aug.scale = (0.6, 1.0)  # an 8x8 digit does not survive an 8% crop
  c.aug.hflip = 0.0  # nor a mirror image
  c.batch_size = batch_size
  c.num_epochs = epochs
  c.log_every_steps = 20
  c.ema_decay = 0.99
  c.optim.update(dict(warmup_epochs=1, warmup_lr=1e-4))
  return c


def teacher_config():
  c = _digits(base_config.base('cnn'), epochs=12, batch_size=64)
  c.model.name = 'mini_convnext'
  c.optim.update(dict(name='adamw', lr=2e-3, weight_decay=0.05, min_lr=1e-5, clip_grad=0.0))
  return c


def get_config(arg=None):
  method = arg or 'pat'
  c = _digits(base_config.base('vit_mlp'), epochs=30, batch_size=64)
  c.model.name = 'mini_deit'
  c.optim.update(dict(lr=2e-3, min_lr=1e-5, warmup_epochs=2, clip_grad=0.0))
  # A 4-block ViT on 1,500 images learns too slowly under the full CIFAR ViT augmentations
  # to make a short demo: crop + label smoothing only (the CNN recipe's augmentations).
  c.aug.update(dict(randaugment='', mixup=0.0, cutmix=0.0, reprob=0.0))
  c.teacher.name = 'mini_convnext' if method != 'none' else ''
  c.teacher.pretrain = teacher_config()  # trained into WORKDIR/teacher when missing
  c.teacher.min_top1 = 80.0
  c.method = ml_collections.ConfigDict(pat.default_config())
  c.method.name = method
  c.method.raa_dim = 64  # the student is 32 wide: a 512-wide RAA would dwarf it
  return c
