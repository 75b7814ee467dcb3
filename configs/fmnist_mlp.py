r"""Miniature of the paper on Fashion-MNIST: CNN teacher (mini ConvNeXt) -> MLP student (mini ResMLP).

Command: python -m pat_jax.main --config=configs/fmnist_mlp.py[:ARG] --workdir=DIR
(grid: bash launch/miniature.sh workdirs/miniature). Data, splits and recipe: pat_jax/miniature.py;
the same teacher recipe as configs/fmnist_vit.py.

ARG (pat_jax/experiments.py), and the paper table each miniaturises:
  method comparison (paper Table 1, CNN -> MLP column): `student`, `kd`, `fitnet`, `` (PAT),
      `corrected`
  Table 3 (ablation): `fitnet`, `no_afp` (RAA only), `no_raa` (AFP only), `` (RAA+AFP)
Expected: docs/RESULTS.md. Runtime: see docs/RESULTS.md (per run, 2-core CPU).
"""
from pat_jax import miniature

EPOCHS = 15


def get_config(arg=None):
  return miniature.student_config('mini_resmlp', arg or '', EPOCHS)
