r"""PAT: ConvNeXt-T teacher -> ResMLP-S12 student on CIFAR-100 at 224x224 (paper: 83.50%).

Command:
  python -m pat_jax.main --config=configs/cifar_convnext_resmlp.py --workdir=workdirs/pat_convnext_resmlp \
      --config.teacher.checkpoint=teachers/convnext_tiny_cifar100   # from python -m pat_jax.convert

Recipe: cifar/vit_mlp.yaml, PAT defaults (as configs/cifar_convnext_deit.py).
Expected: 83.50% top-1. Variants (`:ARG`, pat_jax/experiments.py) with the paper's numbers:
  :student 66.56 | :fitnet 45.47 | :no_raa,no_afp 45.47 | :no_afp (RAA only) 75.04
  :no_raa (AFP only) 80.12
Runtime: 117,000 steps; not measured end to end, nor on a GPU (the DeiT-T pair's bf16 step
is 0.057 s at batch 128 on one H200); on a 2-core CPU the batch-8 step is 2.2 s.
"""
from pat_jax import config as base_config
from pat_jax import data, experiments


def get_config(arg=None):
  c = base_config.base('vit_mlp')
  c.dtype = 'auto'  # bfloat16 on GPU/TPU (the original: fp16 AMP), float32 on CPU
  c.model.name = 'resmlp_12_224'
  c.dataset.eval_crop_pct = data.crop_pct_for(c.model.name)
  c.teacher.name = 'convnext_tiny'
  c.teacher.min_top1 = 50.0
  c.method = experiments.pat_method()
  return experiments.apply(c, arg)
