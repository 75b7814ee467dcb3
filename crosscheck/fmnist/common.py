"""Shared pieces of the torch side (peer venv: torch 2.14.1 + timm 0.6.5 + the original PAT code).

Adapted from the digits cross-check harness (shared/peer/digits_crosscheck/common.py).
- data: pat_jax's Fashion-MNIST miniature split exported by export_jax.py (grey 28x28 replicated to
  RGB uint8), turned into 32x32 as pat_jax does (pat_jax/miniature.py): train = timm
  RandomResizedCropAndInterpolation(32, scale (0.5, 1), ratio (3/4, 4/3), interpolation 'random')
  on the 28x28 PIL image, then a horizontal flip with p 0.5; eval = PIL bilinear resize 28 -> 32
  (crop_pct 1.0); both then (x - 255*mean) / (255*std) with mean 0.2860, std 0.3530 on 3 channels.
- models: timm 0.6.5 ConvNeXt(depths (1,1,2,1), dims (16,24,32,48)) teacher and one of two
  students (`make_student(name)`): 'mini_deit' = VisionTransformer(img 32, patch 4, embed 32,
  depth 4, heads 2), or 'mini_resmlp' = MlpMixer(img 32, patch 4, embed 32, 4 blocks, mlp_ratio 4,
  block_layer ResBlock, norm_layer Affine), i.e. timm 0.6.5's resmlp_12_224 recipe at pat_jax's
  mini_resmlp size; all with the original repo's custom forwards
  (custom_forward.register_new_forward).
"""
import os
import random
import sys
import types

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

PAT_SRC = os.environ['PAT_OFFICIAL_REPO']  # the extracted original code, imported, never copied
if PAT_SRC not in sys.path:
  sys.path.insert(0, PAT_SRC)

import timm  # noqa: E402,F401
from timm.data.transforms import RandomResizedCropAndInterpolation  # noqa: E402
from timm.models.convnext import ConvNeXt  # noqa: E402
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from custom_forward import register_new_forward  # noqa: E402  (original repo)

MEAN, STD = 0.2860, 0.3530
DATA = os.environ['XCHECK_DATA']  # work folder: export_jax.py writes fmnist.npz, teacher_timm.npz here


# ---------------------------------------------------------------- CPU-only machine
def cpu_only_patches():
  """The original PAT.__init__ calls `.to("cuda")` / `.cuda()` (no GPU here): map them to CPU.
  Nothing else of the original code is touched."""
  if torch.cuda.is_available():
    return
  orig_to = nn.Module.to

  def to(self, *args, **kwargs):
    args = tuple('cpu' if (isinstance(a, str) and a.startswith('cuda')) or
                 (isinstance(a, torch.device) and a.type == 'cuda') else a for a in args)
    if 'device' in kwargs and str(kwargs['device']).startswith('cuda'):
      kwargs['device'] = 'cpu'
    return orig_to(self, *args, **kwargs)

  nn.Module.to = to
  nn.Module.cuda = lambda self, *a, **k: self
  torch.Tensor.cuda = lambda self, *a, **k: self


# ---------------------------------------------------------------- data
def load_split():
  """uint8 (N, 28, 28, 3) images and int64 labels: train subset (5,400), validation (6,000),
  test (10,000)."""
  d = np.load(os.path.join(DATA, 'fmnist.npz'))
  return (d['x_train'], d['y_train'], d['x_val'], d['y_val'], d['x_test'], d['y_test'])


def normalize_uint8(batch_hwc_uint8):
  """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, timm prefetcher normalisation."""
  x = torch.from_numpy(np.ascontiguousarray(batch_hwc_uint8)).float()
  x = (x - 255.0 * MEAN) / (255.0 * STD)
  return x.permute(0, 3, 1, 2).contiguous()


def eval_images(x_uint8):
  """PIL bilinear resize 28x28 -> 32x32 (timm eval, crop_pct 1.0: Resize(32) + CenterCrop(32))."""
  out = [np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in x_uint8]
  return normalize_uint8(np.stack(out))


class TrainAug:
  """timm transforms_imagenet_train order: RandomResizedCropAndInterpolation, then
  RandomHorizontalFlip(0.5). The flip draws from python `random` (as the crop does) instead of
  torchvision's torch.rand: the global torch RNG is consumed differently by each distiller's
  construction, python `random` by none of them, so the data stream stays paired across methods."""

  def __init__(self, hflip=0.5):
    self.rrc = RandomResizedCropAndInterpolation(32, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                                                 interpolation='random')
    self.hflip = hflip

  def one(self, im):
    img = self.rrc(Image.fromarray(im))
    if random.random() < self.hflip:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img)

  def __call__(self, x_uint8):
    return normalize_uint8(np.stack([self.one(im) for im in x_uint8]))


# ---------------------------------------------------------------- models
def make_teacher(state_dict_npz=None):
  t = ConvNeXt(num_classes=10, depths=(1, 1, 2, 1), dims=(16, 24, 32, 48))
  if state_dict_npz is not None:
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in np.load(state_dict_npz).items()}
    t.load_state_dict(sd, strict=True)  # raises on any missing/unexpected/mis-shaped key
  # The original's ConvNeXt stage_info keys on pretrained_cfg['architecture']; 'convnext_tiny'
  # maps stage s -> feature index s-1 (the 4 stage outputs), which is exactly what this
  # 4-stage mini ConvNeXt needs (PAT measures the shapes itself with its dummy forward).
  t.pretrained_cfg = t.default_cfg = {'architecture': 'convnext_tiny'}
  register_new_forward(t)
  return t


def _mini_vit_stage_info(self, stage):
  """ADAPTATION: the original ViT stage_info only knows vit_small/vit_base/deit_tiny (12 blocks,
  taps after blocks 1,3,9,11). For the 4-block mini ViT the taps are after blocks 0,1,2,3."""
  shape = (self.patch_embed.num_patches + 1, self.embed_dim)
  if stage in (1, 2, 3, 4):
    return stage - 1, shape
  if stage == -1:
    return -1, self.embed_dim
  raise RuntimeError(f'Stage {stage} out of range (1-4)')


def _mini_resmlp_stage_info(self, stage):
  """ADAPTATION: the original MlpMixer stage_info (custom_forward/mlp_mixer.py) only knows
  mixer_b16_224 and resmlp_12_224 (12 blocks, taps after blocks 1,3,9,11, shape (196, 384)).
  For the 4-block mini ResMLP the taps are after blocks 0,1,2,3, each (64, 32): the raw block
  outputs of the original's forward_features(requires_feat=True) (before the final Affine norm;
  no cls token, 64 = 8x8 is square, so PAT removes no token). Index -1 (the pooled, normed
  features) keeps the original's meaning. pat_jax taps the same points
  (pat_jax/models/resmlp.py, stage_ends=(0,1,2,3))."""
  shape = (self.stem.num_patches, self.embed_dim)
  if stage in (1, 2, 3, 4):
    return stage - 1, shape
  if stage == -1:
    return -1, self.embed_dim
  raise RuntimeError(f'Stage {stage} out of range (1-4)')


STUDENTS = ('mini_deit', 'mini_resmlp')


def make_student(name='mini_deit'):
  """pat_jax's miniature students (pat_jax/models/__init__.py registry), as timm 0.6.5 builds them.
  mini_deit: 54,890 parameters; mini_resmlp: 52,778 (same as pat_jax's count of each)."""
  if name == 'mini_deit':
    s = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                          num_classes=10)
    info = _mini_vit_stage_info
  elif name == 'mini_resmlp':
    # timm 0.6.5 resmlp_12_224: MlpMixer(patch_size=16, num_blocks=12, embed_dim=384, mlp_ratio=4,
    # block_layer=ResBlock, norm_layer=Affine) (stem_norm False, global_pool 'avg', drop 0,
    # init_values 1e-4 for ls1/ls2), here at pat_jax's mini_resmlp size.
    s = MlpMixer(num_classes=10, img_size=32, patch_size=4, num_blocks=4, embed_dim=32,
                 mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine, stem_norm=False)
    info = _mini_resmlp_stage_info
  else:
    raise ValueError(f'unknown student {name!r}; one of {STUDENTS}')
  s.pretrained_cfg = s.default_cfg = {'architecture': name}
  register_new_forward(s)
  s.stage_info = types.MethodType(info, s)
  return s


@torch.no_grad()
def top1(model, x, y, bs=500):
  model.eval()
  correct = 0
  for i in range(0, len(y), bs):
    out = model(x[i:i + bs])
    if isinstance(out, (tuple, list)):
      out = out[0]
    correct += (out.argmax(-1) == y[i:i + bs]).sum().item()
  return 100.0 * correct / len(y)


@torch.no_grad()
def logits(model, x, bs=500):
  model.eval()
  outs = []
  for i in range(0, len(x), bs):
    out = model(x[i:i + bs])
    outs.append(out[0] if isinstance(out, (tuple, list)) else out)
  return torch.cat(outs)
