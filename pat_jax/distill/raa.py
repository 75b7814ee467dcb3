"""PAT's Region-Aware Attention (RAA): `RAProjector` and `RegionAttention`.

Layout: maps NHWC, sequences (B, L, D); constructor shapes are per-sample, in
pat_jax layout: (H, W, C) for a map, (L, D) for a sequence (the original's
(B, C, H, W) -> (H, W, C), (B, L, D) -> (L, D)).

Initialisation is PyTorch's default (the original never re-initialises the RAA):
conv/linear weights and biases U(+-1/sqrt(fan_in)), LayerNorm 1/0 (eps 1e-5).

Quirk switches (module fields; the default reproduces the original, see DESIGN.md #8):
  * Q3 `pos_encoding`: 'batch_index' (faithful): row b of the sinusoid table is added
    to all 64 q and k tokens of sample b, so outputs depend on the sample's position in
    the batch; 'token' (corrected): row t is added to token t of every sample.
  * Q5 `cls_token`: 'last' (faithful): a non-square sequence drops its LAST token;
    'first' (corrected for timm ViT/DeiT): it drops the first (the real cls token).
"""
import math
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pat_jax.distill import projectors
from pat_jax.models import layers

PE_MAX_LEN = 5000


def sinusoid_table(n: int, dim: int) -> np.ndarray:
  """Rows 0..n-1 of the original's (5000, 1, dim) table, as (n, dim) float32.

  Column 2i = sin(p * exp(2i * -(ln(10000)/dim))), column 2i+1 = cos(same), computed in
  float32 as PyTorch does. A constant, not a variable (the original's buffer is never
  trained; it is omitted from state dicts here).
  """
  if n > PE_MAX_LEN:
    raise ValueError(f'The positional-encoding table has {PE_MAX_LEN} rows, {n} requested.')
  pos = np.arange(n, dtype=np.float32)[:, None]
  div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
  pe = np.zeros((n, dim), np.float32)
  pe[:, 0::2] = np.sin(pos * div)
  pe[:, 1::2] = np.cos(pos * div)
  return pe


def torch_dense(features: int, fan_in: int, dtype, name: str):
  return nn.Dense(features, kernel_init=layers.torch_default_kernel,
                  bias_init=layers.torch_default_bias(fan_in), dtype=dtype, name=name)


class PatchEmbed(nn.Module):
  """timm PatchEmbed without norm: Conv2d(C -> dim, kernel p, stride p) then flatten."""
  in_chans: int
  patch: int
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = self.in_chans * self.patch * self.patch
    y = layers.conv(self.dim, self.patch, self.patch, 0, dtype=self.dtype,
                    kernel_init=layers.torch_default_kernel,
                    bias_init=layers.torch_default_bias(fan_in), name='proj')(x)
    return y.reshape(y.shape[0], -1, self.dim)  # row-major over the grid


class RAProjector(nn.Module):
  """One student stage -> (B, 16, dim) tokens (the original's RAProjector).

  feat_shape: per-sample (H, W, C) or (L, C). A sequence with non-square L first drops
  its cls token (`cls_token`), then becomes an h x h grid (h = int(sqrt(L))). With
  p = ceil(H/4): a grid of side < 4 is nearest-resized to 4, one of side < 4p to 4p
  (legacy nearest), then Conv2d(C -> dim, kernel p, stride p) gives a 4x4 grid,
  flattened row-major. Parameters: `projector/proj/{kernel,bias}`.
  """
  feat_shape: Tuple[int, ...]
  embed_dim: int = 512
  patch_length: int = 16
  cls_token: str = 'last'
  dtype: Any = jnp.float32

  @property
  def side_and_channels(self):
    shape = projectors.square_shape(self.feat_shape)
    if len(shape) == 3:
      return shape[0], shape[2]
    return math.isqrt(shape[0]), shape[1]

  @nn.compact
  def __call__(self, x):
    h, c = self.side_and_channels
    grid = math.isqrt(self.patch_length)
    p = -(-h // grid)
    if x.ndim == 3:
      x = projectors.tokens_to_grid(projectors.split_cls(x, self.cls_token)[0])
    if x.shape[1:] != (h, h, c):
      raise ValueError(f'RAProjector built for side {h}, {c} channels, got {x.shape}.')
    if h < grid:
      x = projectors.nearest_resize_legacy(x, grid)
    if x.shape[1] < grid * p:
      x = projectors.nearest_resize_legacy(x, grid * p)
    return PatchEmbed(c, p, self.embed_dim, dtype=self.dtype, name='projector')(x)


class RegionAttention(nn.Module):
  """Region-aware attention over the 4 student stages (the original's RegionAttention).

  student_shapes: 4 per-sample shapes ((H, W, C) or (L, D)). Each stage is projected
  to 16 tokens (`projector_s_<i>`); one shared LayerNorm (`norm`, eps 1e-5), then
  q = to_q(LN(e)), [k | v] = to_kv(LN(e)); the 4 stages are concatenated stage-major
  to (B, 64, dim); the sinusoidal encoding is added to q and k only (see Q3 above);
  multi-head softmax attention (scale (dim/heads)^-0.5), heads merged; no output
  projection, residual or MLP. Returns a tuple of 4 chunks (B, 16, dim), chunk i =
  tokens [16i, 16i+16) (the original returns them with a leading axis of size 1,
  which its caller squeezes). The teacher features the original also accepts are
  ignored there (Q6), so they are not an argument here.
  """
  student_shapes: Sequence[Tuple[int, ...]]
  num_queries: int = 64
  dim: int = 512
  heads: int = 8
  dropout: float = 0.0
  pos_encoding: str = 'batch_index'
  cls_token: str = 'last'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, train: bool = True):
    n_stages = len(self.student_shapes)
    per_stage = self.num_queries // n_stages
    if len(feats) != n_stages:
      raise ValueError(f'RegionAttention expects {n_stages} stage features, got {len(feats)}.')
    norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm')
    to_q = torch_dense(self.dim, self.dim, self.dtype, 'to_q')
    to_kv = torch_dense(2 * self.dim, self.dim, self.dtype, 'to_kv')
    qs, ks, vs = [], [], []
    for i, (shape, f) in enumerate(zip(self.student_shapes, feats)):
      e = RAProjector(tuple(shape), self.dim, per_stage, self.cls_token, dtype=self.dtype,
                      name=f'projector_s_{i}')(f)
      e = norm(e)
      kv = to_kv(e)
      qs.append(to_q(e))
      ks.append(kv[..., :self.dim])
      vs.append(kv[..., self.dim:])
    q, k, v = (jnp.concatenate(t, axis=1) for t in (qs, ks, vs))   # (B, 64, dim)
    b, n, _ = q.shape
    if self.pos_encoding == 'batch_index':
      pe = jnp.asarray(sinusoid_table(b, self.dim))[:, None, :]      # (B, 1, dim)
    elif self.pos_encoding == 'token':
      pe = jnp.asarray(sinusoid_table(n, self.dim))[None, :, :]      # (1, 64, dim)
    else:
      raise ValueError(f"pos_encoding must be 'batch_index' or 'token', got {self.pos_encoding!r}.")
    q, k = q + pe.astype(q.dtype), k + pe.astype(k.dtype)
    dh = self.dim // self.heads
    split = lambda t: t.reshape(b, n, self.heads, dh)
    logits = jnp.einsum('bqhd,bkhd->bhqk', split(q), split(k)) * (dh ** -0.5)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    attn = nn.Dropout(self.dropout)(attn, deterministic=not train or self.dropout == 0.0)
    out = jnp.einsum('bhqk,bkhd->bqhd', attn, split(v)).reshape(b, n, self.dim)
    return tuple(out[:, i * per_stage:(i + 1) * per_stage] for i in range(n_stages))
