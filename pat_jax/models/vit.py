"""ViT / DeiT as timm's VisionTransformer builds them (cls token first, learned pos_embed).

"Stages" of a plain transformer are block ranges ending at `stage_ends` (blocks 1, 3,
9, 11 for depth 12, as the original's stage_info): a stage tap is that block's output,
(B, 1 + L, D) with the cls token first, before the final norm. Position embeddings are
sized to `img_size`. Module names mirror timm's keys.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pat_jax.models import layers


class Attention(nn.Module):
  """timm Attention: fused qkv projection, softmax(q k^T / sqrt(d)) v, output proj."""
  dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    h = self.num_heads
    qkv = nn.Dense(3 * d, kernel_init=layers.trunc_normal_02, dtype=self.dtype, name='qkv')(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, h, d // h), 2, 0)  # each (B, N, H, Dh)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * (d // h) ** -0.5, k)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    y = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(b, n, d)
    return nn.Dense(d, kernel_init=layers.trunc_normal_02, dtype=self.dtype, name='proj')(y)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    drop = layers.DropPath(self.drop_path)
    y = Attention(self.dim, self.num_heads, self.dtype, name='attn')(
        layers.LayerNorm(dtype=self.dtype, name='norm1')(x))
    x = x + drop(y, train)
    y = layers.Mlp(int(self.dim * self.mlp_ratio), self.dim, dtype=self.dtype, name='mlp')(
        layers.LayerNorm(dtype=self.dtype, name='norm2')(x))
    return x + drop(y, train)


class PatchEmbed(nn.Module):
  """Non-overlapping patchify conv, flattened row-major to (B, L, D) like timm's."""
  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32
  kernel_init: Any = layers.torch_default_kernel  # timm leaves ViT's patch conv at torch's default
  bias_init: Any = None  # None: torch's default U(+-1/sqrt(fan_in))

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1] * self.patch_size ** 2
    bias_init = self.bias_init or layers.torch_default_bias(fan_in)
    x = layers.conv(self.embed_dim, self.patch_size, self.patch_size, 0, dtype=self.dtype,
                    kernel_init=self.kernel_init, bias_init=bias_init, name='proj')(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class VisionTransformer(nn.Module):
  num_classes: int
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  stage_ends: Sequence[int] = (1, 3, 9, 11)
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False  # recompute block activations in the backward pass (less memory)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False, stage_hook=None):
    if x.shape[1] != self.img_size or x.shape[2] != self.img_size:
      raise ValueError(f'{type(self).__name__} was built for {self.img_size}x{self.img_size} inputs '
                       f'(position embeddings are sized to it) but got {x.shape[1]}x{x.shape[2]}; '
                       f'create the model with img_size={x.shape[1]}.')
    num_patches = (self.img_size // self.patch_size) ** 2
    x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name='patch_embed')(x.astype(self.dtype))
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, self.embed_dim))
    pos = self.param('pos_embed', layers.trunc_normal_02, (1, num_patches + 1, self.embed_dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.embed_dim)).astype(x.dtype), x], 1)
    x = x + pos.astype(x.dtype)

    dpr = layers.drop_path_rates(self.drop_path_rate, self.depth)
    starts = [0] + [e + 1 for e in self.stage_ends[:-1]]
    block, features = layers.maybe_remat(Block, self.remat), []
    for i in range(self.depth):
      if i in starts:
        x = layers.hook(stage_hook, starts.index(i), x)
      x = block(self.embed_dim, self.num_heads, self.mlp_ratio, dpr[i], self.dtype,
                name=f'blocks_{i}')(x, train)
      if i in self.stage_ends:
        features.append(x)

    x = layers.LayerNorm(name='norm')(x.astype(jnp.float32))
    logits = nn.Dense(self.num_classes, kernel_init=layers.trunc_normal_02, name='head')(x[:, 0])
    return (logits, features) if return_features else logits
