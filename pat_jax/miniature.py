"""The paper's experiments in miniature on Fashion-MNIST: recipe shared by configs/fmnist_*.py.

Fashion-MNIST (60,000 train / 10,000 test grey 28x28 photographs of clothing, 10 classes) read
offline from its IDX files (`data/idx.py`; `FASHION_MNIST_DIR`, default
/usr/share/datasets/fashion-mnist, where `apt-get install dataset-fashion-mnist` puts them), or
through TFDS with `--config.dataset.name=fashion_mnist`. Images are upsampled to 32x32 for the
mini models (patch 4: an 8x8 token grid; the mini ConvNeXt's stages see 8, 4, 2, 1 pixels).

Splits: the last 10% of 'train' (6,000) is the validation split, evaluated every epoch
(`best_top1` and the curves); the first 90% (54,000) is what `train_fraction` draws the training
subset from; 'test' is read once, by the final student (result.json `test_top1`). Settings are
chosen on validation, never on test.

Recipe: the teacher (mini ConvNeXt) is trained once per sweep folder (teacher.workdir) on the
same training subset; the students follow the digits demo's recipe (AdamW 2e-3, wd 0.05, cosine,
crop + flip + label smoothing 0.1, EMA 0.99), scaled to a fixed budget of steps.
"""
import os

import ml_collections

from pat_jax import config as base_config
from pat_jax import experiments

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
MEAN = (0.2860,) * 3  # measured over the 60,000 training images (0..1 units)
STD = (0.3530,) * 3
TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT = 'train[:90%]', 'train[90%:]', 'test'
# The miniature's training subset: 10% of the 54,000 (5,400 images; paper Table 2 fractions
# are fractions of it). Sized so the grid of configs/fmnist_*.py fits in hours on 2 cores.
SUBSET = 0.1


def fashion_mnist(c, epochs, batch_size=64):
  """Points config `c` at Fashion-MNIST with the miniature's splits, augmentation and schedule."""
  c.dataset.name = 'idx:' + os.environ.get('FASHION_MNIST_DIR', DEFAULT_DIR)
  c.dataset.train_split, c.dataset.eval_split, c.dataset.test_split = TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT
  c.dataset.train_fraction = SUBSET
  c.dataset.fraction_seed = 0  # one nested family of subsets for every seed and the teacher
  c.dataset.image_size = 32
  c.dataset.mean, c.dataset.std = MEAN, STD
  c.dataset.eval_crop_pct = 1.0
  c.aug.update(dict(randaugment='', mixup=0.0, cutmix=0.0, reprob=0.0, scale=(0.5, 1.0), hflip=0.5))
  c.batch_size = batch_size
  c.eval_batch_size = 500
  c.num_epochs = epochs
  c.log_every_steps = 20
  c.ema_decay = 0.99
  c.keep_checkpoints = 1
  return c


def teacher_config():
  """The teacher sees all 54,000 training images, the students a subset of them: as the paper's
  teachers, it knows more than the student's own data can teach (a 5,400-image teacher reaches
  only ~80% on validation, no better than the students)."""
  c = fashion_mnist(base_config.base('cnn'), epochs=10)
  c.dataset.train_fraction = 1.0
  c.model.name = 'mini_convnext'
  c.optim.update(dict(name='adamw', lr=2e-3, weight_decay=0.05, warmup_epochs=1, warmup_lr=1e-4,
                      min_lr=1e-5, clip_grad=0.0))
  return c


def student_config(student: str, arg: str, epochs: int) -> ml_collections.ConfigDict:
  """A student `student` distilled from the mini ConvNeXt with PAT, varied by `arg`
  (pat_jax/experiments.py: student, kd, fitnet, no_raa, no_afp, fraction=F, corrected, ...)."""
  c = fashion_mnist(base_config.base('vit_mlp'), epochs=epochs)
  c.model.name = student
  c.optim.update(dict(lr=2e-3, min_lr=1e-5, warmup_epochs=2, warmup_lr=1e-4, clip_grad=0.0))
  c.teacher.name = 'mini_convnext'
  c.teacher.pretrain = teacher_config()  # trained into teacher.workdir (or WORKDIR/teacher) once
  c.teacher.min_top1 = 70.0
  c.method = experiments.pat_method()
  c.method.raa_dim = 64  # the students are 32 wide: a 512-wide RAA would dwarf them
  c.dataset.train_fraction = 1.0
  c = experiments.apply(c, arg)
  # A fraction is of the miniature's subset (Table 2: 25/50/75/100% of the training data).
  c.dataset.train_fraction = SUBSET * c.dataset.train_fraction
  return c
