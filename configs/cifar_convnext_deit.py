r"""PAT: ConvNeXt-T teacher -> DeiT-T student on CIFAR-100 at 224x224 (paper Table 1: 79.59%).

Command (convert the OFA-KD CIFAR-100 teacher once, then train):
  python -m pat_jax.convert --model convnext_tiny --num-classes 100 \
      --input convnext_tiny_cifar100.pth --output teachers/convnext_tiny_cifar100
  python -m pat_jax.main --config=configs/cifar_convnext_deit.py --workdir=workdirs/pat_convnext_deit \
      --config.teacher.checkpoint=teachers/convnext_tiny_cifar100

Recipe: cifar/vit_mlp.yaml (AdamW 5e-4, 300 epochs, batch 128, RandAugment, mixup/cutmix,
erasing, clip 5, EMA 0.9998) with every PAT default (AFP on stages 1-4 with feedback, RAA
64 queries x 512 dims x 8 heads, all loss weights 1, T=1) and the original's quirks.
Expected: 79.59% top-1 (best of raw/EMA over epochs, as the original reports).

Variants (`--config=configs/cifar_convnext_deit.py:ARG`, see pat_jax/experiments.py), with the
paper's numbers (supplementary Tables 2 and 3, main table):
  :student 68.00 | :kd - | :fitnet 60.78 | :no_afp (RAA only) 70.12 | :no_raa (AFP only) 73.07
  :no_raa,no_afp 60.71 | :no_feedback 79.13 | :afp=1 75.43
  :fraction=0.25 52.23 | :fraction=0.5 68.21 | :fraction=0.75 74.58
  :student,fraction=0.25 40.74 | :student,fraction=0.5 55.98 | :student,fraction=0.75 65.28
Runtime: 117,000 steps; not measured end to end. The train step at batch 128 in bf16 took
0.057 s on one H200 (docs/BENCHMARKS.md), i.e. about 1.9 h of step time on one such GPU,
input pipeline and evaluation not counted; on a 2-core CPU the batch-8 step is 2.0 s.
Memory: batch 128 in bf16 (dtype 'auto' is bf16 on GPU/TPU) needs 7.43 GB on that GPU. With
--config.model.remat=True --config.teacher.remat=True as well: 6.0 GB by the compiled step's
analysis on the CPU backend (15.1 GB there in float32 without remat).
"""
from pat_jax import config as base_config
from pat_jax import data, experiments


def get_config(arg=None):
  c = base_config.base('vit_mlp')
  c.dtype = 'auto'  # bfloat16 on GPU/TPU (the original: fp16 AMP), float32 on CPU
  c.model.name = 'deit_tiny_patch16_224'
  c.dataset.eval_crop_pct = data.crop_pct_for(c.model.name)
  c.teacher.name = 'convnext_tiny'
  c.teacher.checkpoint = ''  # set on the command line (see above)
  c.teacher.min_top1 = 50.0  # the OFA-KD teacher reaches about 88%
  c.method = experiments.pat_method()
  return experiments.apply(c, arg)
