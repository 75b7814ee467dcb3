r"""DeiT-T trained from scratch on CIFAR-100 at 224x224: the paper's student baseline.

Command:
  python -m pat_jax.main --config=configs/student_cifar_deit.py --workdir=workdirs/deit_cifar

Recipe: PAT's configs/cifar/vit_mlp.yaml (AdamW 5e-4, cosine to 1e-5 over 300 epochs with 20
warm-up epochs from 5e-7, weight decay 0.05, clip 5, RandAugment rand-m9-mstd0.5-inc1, mixup
0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25, EMA 0.9998, batch 128).
Expected: 68.00% top-1 (paper Table 1, DeiT-T from scratch; best of raw/EMA over epochs).
Runtime: 300 epochs x 390 steps; not measured end to end. The bf16 step at batch 128 took
0.0173 s on one H200 (about 34 min of step time for the run); about 0.55 s at batch 8 on a
2-core CPU (docs/BENCHMARKS.md).
"""
from pat_jax import config as base_config
from pat_jax import data


def get_config(arg=None):
  del arg
  c = base_config.base('vit_mlp')
  c.dtype = 'auto'  # bfloat16 on GPU/TPU (the original: fp16 AMP), float32 on CPU
  c.model.name = 'deit_tiny_patch16_224'
  c.dataset.eval_crop_pct = data.crop_pct_for(c.model.name)
  return c
