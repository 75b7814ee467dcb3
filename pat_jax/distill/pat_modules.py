"""PAT (Perspective-Aware Teaching) modules: the public entry point.

The building blocks live in three files and are re-exported here:
  * projectors.py: `nearest_resize_legacy`, `ViT2ViTProjector`, `ViT2CNNProjector`,
    `CNN2CNNProjector`, `CNN2ViTProjector`, `get_projector`, token/grid helpers;
  * raa.py: `RAProjector`, `RegionAttention` (Region-Aware Attention);
  * prompts.py: `SEBlock`, `PromptBlock` (Adaptive Feedback Prompts).
This file adds `PATFeatureLoss`, the L_FD branch of one training step.

Conventions (all modules): maps NHWC, sequences (B, L, D); constructor shapes are
per-sample (no batch axis) in pat_jax layout, (H, W, C) or (L, D). Modules with
BatchNorm take `train` (True: batch statistics, `batch_stats` updated and must be
mutable; False: running statistics). Quirks of the original code are reproduced by
default, each with a named switch for the corrected behaviour:

  switch          faithful (default)   corrected     quirk
  seq_layout      'torch_bug'          'transpose'   Q1 PromptBlock token scramble
  se_mode         'gate'               'scale'       Q2 SE returns only the gate
  pos_encoding    'batch_index'        'token'       Q3 RAA positional encoding row
  cls_token       'last'               'first'       Q5 which token of a non-square
                                                        sequence is the cls token
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pat_jax.distill import losses
from pat_jax.distill.projectors import (CNN2CNNProjector, CNN2ViTProjector, ViT2CNNProjector, ViT2ViTProjector,
                                        drop_cls, get_projector, merge_cls, nearest_resize_legacy,
                                        split_cls, square_shape, tokens_to_grid)
from pat_jax.distill.prompts import PromptBlock, SEBlock
from pat_jax.distill.raa import RAProjector, RegionAttention, sinusoid_table

__all__ = [
    'CNN2CNNProjector', 'CNN2ViTProjector', 'PATFeatureLoss', 'PromptBlock', 'RAProjector', 'RegionAttention',
    'SEBlock', 'ViT2CNNProjector', 'ViT2ViTProjector', 'drop_cls', 'get_projector', 'merge_cls',
    'nearest_resize_legacy', 'sinusoid_table', 'split_cls', 'square_shape', 'tokens_to_grid',
]


class PATFeatureLoss(nn.Module):
  """PAT's feature-distillation branch (L_FD) for one batch, as the original step does it.

  chunks = RegionAttention(student_shapes, num_queries, dim, heads)(feats_s)
  (`attention_blending`); for each stage s: aligned_s = aligners_s(chunks[s]) with
  aligners_s = get_projector((num_queries // 4, dim), teacher_shapes[s]);
  target_s = feats_t[s] with its cls token dropped if it is a non-square sequence
  (Q5: the LAST token by default); hcl_s = hcl_loss(aligned_s, target_s);
  loss = sum_s hcl_s (a sum, not a mean).

  student_shapes / teacher_shapes: per-sample pat_jax shapes; teacher_shapes are the
  stage OUTPUT shapes after the cls drop (a non-square sequence shape is also
  accepted and reduced by one token). The targets are not stop-gradient'ed (the
  original lets L_FD reach the prompts through the prompted teacher).

  Returns a dict: 'loss' (scalar), 'hcl' (4 scalars), 'aligned' (4 aligner outputs,
  teacher stage shape; the next step's student feedback), 'targets' (4 targets, the
  next step's teacher feedback), 'chunks' (4 RAA outputs (B, 16, dim)).
  """
  student_shapes: Sequence[Tuple[int, ...]]
  teacher_shapes: Sequence[Tuple[int, ...]]
  num_queries: int = 64
  dim: int = 512
  heads: int = 8
  dropout: float = 0.0
  pos_encoding: str = 'batch_index'
  cls_token: str = 'last'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_s, feats_t, train: bool = True):
    n = len(self.student_shapes)
    chunks = RegionAttention(self.student_shapes, self.num_queries, self.dim, self.heads,
                             self.dropout, self.pos_encoding, self.cls_token, dtype=self.dtype,
                             name='attention_blending')(feats_s, train)
    aligned, targets, hcl = [], [], []
    for s in range(n):
      aligner = get_projector((self.num_queries // n, self.dim),
                              square_shape(self.teacher_shapes[s]), dtype=self.dtype,
                              name=f'aligners_{s}')
      a = aligner(chunks[s], train)
      t = drop_cls(feats_t[s], self.cls_token)
      aligned.append(a)
      targets.append(t)
      hcl.append(losses.hcl_loss(a, t))
    loss = sum(hcl[1:], hcl[0])
    return {'loss': loss, 'hcl': hcl, 'aligned': aligned, 'targets': targets, 'chunks': list(chunks)}
