"""ResMLP as timm builds it (MlpMixer with ResBlock and Affine 'norms').

Stage taps: block outputs at `stage_ends` (1, 3, 9, 11 for ResMLP-S12), (B, L, D),
no cls token. Module names mirror timm's keys.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from pat_jax.models import layers
from pat_jax.models.vit import PatchEmbed

_xavier = nn.initializers.xavier_uniform()
_lecun_normal = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


class Affine(nn.Module):
  """alpha * x + beta, with timm's (1, 1, D) parameter shapes."""
  dim: int

  @nn.compact
  def __call__(self, x):
    alpha = self.param('alpha', nn.initializers.ones, (1, 1, self.dim))
    beta = self.param('beta', nn.initializers.zeros, (1, 1, self.dim))
    return alpha.astype(x.dtype) * x + beta.astype(x.dtype)


class ResBlock(nn.Module):
  """x + ls1 * token-mixing Linear (over L); x + ls2 * channel Mlp."""
  dim: int
  seq_len: int
  mlp_ratio: float = 4.0
  init_values: float = 1e-4
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    drop = layers.DropPath(self.drop_path)
    ls1 = self.param('ls1', nn.initializers.constant(self.init_values), (self.dim,))
    ls2 = self.param('ls2', nn.initializers.constant(self.init_values), (self.dim,))
    y = Affine(self.dim, name='norm1')(x)
    # The token-mixing Linear acts on the token axis: transpose the activations.
    y = nn.Dense(self.seq_len, kernel_init=_xavier, dtype=self.dtype, name='linear_tokens')(
        y.transpose(0, 2, 1)).transpose(0, 2, 1)
    x = x + drop(ls1 * y, train)
    y = layers.Mlp(int(self.dim * self.mlp_ratio), self.dim, kernel_init=_xavier,
                   bias_init=nn.initializers.normal(1e-6), dtype=self.dtype,
                   name='mlp_channels')(Affine(self.dim, name='norm2')(x))
    return x + drop(ls2 * y, train)


class ResMLP(nn.Module):
  num_classes: int
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  mlp_ratio: float = 4.0
  stage_ends: Sequence[int] = (1, 3, 9, 11)
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False  # recompute block activations in the backward pass (less memory)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False, stage_hook=None):
    if x.shape[1] != self.img_size or x.shape[2] != self.img_size:
      raise ValueError(f'ResMLP was built for {self.img_size}x{self.img_size} inputs (its token '
                       f'mixing is sized to it) but got {x.shape[1]}x{x.shape[2]}; create the '
                       f'model with img_size={x.shape[1]}.')
    seq_len = (self.img_size // self.patch_size) ** 2
    # timm inits the stem conv lecun-normal with zero bias.
    x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, kernel_init=_lecun_normal,
                   bias_init=nn.initializers.zeros, name='stem')(x.astype(self.dtype))

    dpr = layers.drop_path_rates(self.drop_path_rate, self.depth)
    starts = [0] + [e + 1 for e in self.stage_ends[:-1]]
    block, features = layers.maybe_remat(ResBlock, self.remat), []
    for i in range(self.depth):
      if i in starts:
        x = layers.hook(stage_hook, starts.index(i), x)
      x = block(self.embed_dim, seq_len, self.mlp_ratio, drop_path=dpr[i], dtype=self.dtype,
                   name=f'blocks_{i}')(x, train)
      if i in self.stage_ends:
        features.append(x)

    x = Affine(self.embed_dim, name='norm')(x.astype(jnp.float32)).mean(axis=1)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head')(x)
    return (logits, features) if return_features else logits
