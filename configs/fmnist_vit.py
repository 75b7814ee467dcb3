r"""Miniature of the paper on Fashion-MNIST: CNN teacher (mini ConvNeXt) -> ViT student (mini DeiT).

Command (one run; ARG below; the teacher is trained first into WORKDIR/teacher when missing):
  python -m pat_jax.main --config=configs/fmnist_vit.py[:ARG] --workdir=DIR
The whole grid (every ARG x 3 seeds, one shared teacher, resumable, skips finished runs):
  bash launch/miniature.sh workdirs/miniature

Needs the Fashion-MNIST IDX files (FASHION_MNIST_DIR, default /usr/share/datasets/fashion-mnist;
`apt-get install dataset-fashion-mnist`), or `--config.dataset.name=fashion_mnist` with TFDS.
Recipe and splits: pat_jax/miniature.py (validation = last 10% of train, evaluated each epoch;
test read once at the end; training subset 5,400 images).

ARG (pat_jax/experiments.py), and the paper table each miniaturises:
  method comparison (paper Table 1, CNN -> ViT column): `student`, `kd`, `fitnet`, `` (PAT),
      `corrected` (PAT with the quirks Q1-Q5 corrected)
  Table 2 (data efficiency, DeiT student): `fraction=F,student` vs `fraction=F` for F in
      0.25, 0.5, 0.75 (1.0 = the rows above)
  Table 3 (ablation): `fitnet` (baseline), `no_afp` (RAA only), `no_raa` (AFP only), `` (RAA+AFP)
Expected: docs/RESULTS.md (mean +- std over seeds, with the command that measured it).
Runtime: see docs/RESULTS.md (per run, 2-core CPU).
"""
from pat_jax import miniature

EPOCHS = 15


def get_config(arg=None):
  return miniature.student_config('mini_deit', arg or '', EPOCHS)
