"""PAT's feature projectors (the aligners and the PromptBlock feedback aligner).

Layout: maps are NHWC, token sequences (B, L, D). Constructor shapes are PER-SAMPLE
shapes (no batch axis) in pat_jax layout: a map is (H, W, C), a sequence is (L, D).
(The original passes PyTorch shapes with a batch axis: (B, C, H, W) -> (H, W, C),
(B, L, D) -> (L, D).)

Module and parameter names follow the original's state-dict keys, so
`convert.timm_to_flat` maps a PyTorch state dict onto these variables directly:
`conv.0` (BatchNorm2d) / `conv.1` (1x1 conv) are `conv_0` / `conv_1`, `mlp_d.0` is
`mlp_d_0`, and so on.

Initialisation is the original's `init_weights` (every aligner is built by
`get_projector_module`, which applies it): conv kernels kaiming-normal (fan_out,
ReLU gain), Linear kernels N(0, 0.02) with bias 0, BatchNorm 1/0.
"""
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from pat_jax import kernels
from pat_jax.models import layers

Shape = Tuple[int, ...]

# init_weights: nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu') (untruncated).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# nn.init.trunc_normal_(std=.02) truncates at +-2 absolute: effectively untruncated.
trunc_normal_02 = layers.trunc_normal_02


# ---------------------------------------------------------------------------
# Resampling and token/grid helpers.

def legacy_nearest_index(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch legacy `mode='nearest'` source indices: min(floor(i*in/out), in-1)."""
  return np.minimum((np.arange(out_size) * in_size) // out_size, in_size - 1)


def nearest_resize_legacy(x_nhwc, out_h: int, out_w: Optional[int] = None):
  """`F.interpolate(x, size=(out_h, out_w), mode='nearest')` on an NHWC map.

  PyTorch's legacy nearest rule (output index i reads floor(i*in/out)), NOT the half-pixel
  rule of `jax.image.resize('nearest')`. Examples: 4->7 reads 0,0,1,1,2,2,3; 7->10 reads
  0,0,1,2,2,3,4,4,5,6; 7->8 duplicates the first cell (0,0,1,...,6). Identity when the size
  is unchanged. An integer upsampling factor is a broadcast (its gradient a reshaped sum);
  other sizes are static index gathers.
  """
  out_w = out_h if out_w is None else out_w
  for axis, out in ((1, out_h), (2, out_w)):
    size = x_nhwc.shape[axis]
    if size == out:
      continue
    if out % size == 0:
      f = out // size
      x = jnp.expand_dims(x_nhwc, axis + 1)
      shape = x.shape[:axis + 1] + (f,) + x.shape[axis + 2:]
      x_nhwc = jnp.broadcast_to(x, shape).reshape(
          x_nhwc.shape[:axis] + (out,) + x_nhwc.shape[axis + 1:])
    else:
      x_nhwc = jnp.take(x_nhwc, legacy_nearest_index(size, out), axis=axis)
  return x_nhwc


def nearest_counts(in_size: int, out_size: int) -> np.ndarray:
  """How many output cells of a legacy nearest resize in_size -> out_size read each input cell."""
  return np.bincount(legacy_nearest_index(in_size, out_size), minlength=in_size)


def is_square(n: int) -> bool:
  return math.isqrt(n) ** 2 == n


def split_cls(x, cls_token: str = 'last'):
  """(B, L, D) -> (patch tokens, set-aside token or None).

  When L is not a perfect square the original code treats the LAST token as the cls
  token (Q5, `cls_token='last'`, faithful); timm ViT/DeiT put cls FIRST, which
  `cls_token='first'` follows (corrected). A square L is returned unchanged.
  """
  if is_square(x.shape[1]):
    return x, None
  if cls_token == 'last':
    return x[:, :-1], x[:, -1:]
  if cls_token == 'first':
    return x[:, 1:], x[:, :1]
  raise ValueError(f"cls_token must be 'last' or 'first', got {cls_token!r}.")


def merge_cls(x, cls, cls_token: str = 'last'):
  """Inverse of `split_cls`: puts the set-aside token back where it came from."""
  if cls is None:
    return x
  return jnp.concatenate([x, cls] if cls_token == 'last' else [cls, x], axis=1)


def drop_cls(x, cls_token: str = 'last'):
  """Drops the cls token of a non-square sequence (the L_FD target / feedback rule)."""
  if x.ndim != 3:
    return x
  return split_cls(x, cls_token)[0]


def tokens_to_grid(x):
  """(B, h*h, D) -> (B, h, h, D): token t -> cell (t // h, t % h) (PyTorch's
  `x.transpose(1, 2).reshape(B, D, h, h)` in NHWC)."""
  b, l, d = x.shape
  h = math.isqrt(l)
  if h * h != l:
    raise ValueError(f'A token sequence of length {l} is not a square grid.')
  return x.reshape(b, h, h, d)


def grid_side(shape: Sequence[int]) -> int:
  """Side of the grid of a per-sample shape: H of (H, W, C), int(sqrt(L)) of (L, D)
  (the same whichever token of a non-square sequence is the cls token)."""
  return shape[0] if len(shape) == 3 else math.isqrt(shape[0])


def square_shape(shape: Sequence[int]) -> Shape:
  """A per-sample shape with the cls token of a non-square sequence removed."""
  shape = tuple(int(s) for s in shape)
  if len(shape) == 2 and not is_square(shape[0]):
    return (shape[0] - 1, shape[1])
  return shape


def batch_norm_1d(bn: nn.Module, x, train: bool):
  """PyTorch BatchNorm1d on (B, L, D): axis 1 (L) is the channel axis."""
  return jnp.swapaxes(bn(jnp.swapaxes(x, 1, 2), train), 1, 2)


# ---------------------------------------------------------------------------
# Projectors.

class ViT2ViTProjector(nn.Module):
  """Tokens -> tokens: (B, l1, d1) -> (B, L, D) (the aligner for sequence teachers).

  in_shape = (l1, d1), out_shape = (L, D) (the original's `embed_tokens=L, embed_dim=D`).
  mlp_d = BatchNorm1d(l1) (token axis as channels, statistics over batch and features)
  then Linear(d1 -> D); mlp_l = BatchNorm1d(D) (statistics over batch and tokens) then
  Linear(l1 -> L) over the token axis. Both linears have bias.
  """
  in_shape: Shape
  out_shape: Shape
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    l1, d1 = self.in_shape
    l_out, d_out = self.out_shape
    if x.shape[1:] != (l1, d1):
      raise ValueError(f'ViT2ViTProjector expects (B, {l1}, {d1}), got {x.shape}.')
    dense = lambda n, name: nn.Dense(n, kernel_init=trunc_normal_02, bias_init=nn.initializers.zeros,
                                     dtype=self.dtype, name=name)
    x = batch_norm_1d(layers.BatchNorm(dtype=self.dtype, name='mlp_d_0'), x, train)
    x = dense(d_out, 'mlp_d_1')(x)                                  # (B, l1, D)
    # BatchNorm1d(D) on the transposed (B, D, l1) tensor == last-axis BatchNorm here.
    x = layers.BatchNorm(dtype=self.dtype, name='mlp_l_0')(x, train)
    x = dense(l_out, 'mlp_l_1')(jnp.swapaxes(x, 1, 2))              # (B, D, L)
    return jnp.swapaxes(x, 1, 2)                                    # (B, L, D)


def _resize_bn_conv(module, x, train):
  """The shared body of the map projectors: legacy nearest resize to out_shape, BatchNorm
  (`conv_0`) and a bias-free 1x1 conv (`conv_1`), called from `module`'s compact __call__,
  so they bind to it.

  When the resize enlarges the map (the RAA aligners: 4x4 tokens -> up to 56x56), it is done
  last: BatchNorm is a per-channel affine map and the conv a per-pixel one, so both commute
  with nearest resizing, provided the batch statistics count each source cell as often as it
  is copied. The same function, 50-200x fewer operations (a 56x56x512 map holds 16 distinct
  vectors; timings in docs/BENCHMARKS.md). `kernels.form('aligner_resize')`: 'last' (this,
  the default everywhere) or 'first' (the original's order, for benchmarks)."""
  h, w, c = module.out_shape
  _, hi, wi, _ = x.shape
  bn = layers.BatchNorm(dtype=module.dtype, name='conv_0')
  conv = layers.conv(c, 1, use_bias=False, dtype=module.dtype, kernel_init=kaiming_normal_fan_out,
                     name='conv_1')
  if h * w <= hi * wi or kernels.form('aligner_resize') == 'first':
    return conv(bn(nearest_resize_legacy(x, h, w), train))
  counts = np.outer(nearest_counts(hi, h), nearest_counts(wi, w))
  return nearest_resize_legacy(conv(bn(x, train, counts=counts)), h, w)


class ViT2CNNProjector(nn.Module):
  """Tokens -> map: (B, l, d) -> (B, H, W, C) (the aligner for map teachers).

  in_shape = (l, d), out_shape = (H, W, C). Tokens are viewed as an s x s grid
  (s = sqrt(l), row-major), nearest-resized (legacy rule) to (H, W), then
  BatchNorm2d(d) (train mode: statistics of the UPSAMPLED map) and a 1x1 conv d -> C
  without bias.
  """
  in_shape: Shape
  out_shape: Shape
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    return _resize_bn_conv(self, tokens_to_grid(x), train)


class CNN2CNNProjector(nn.Module):
  """Map -> map: (B, hi, wi, ci) -> (B, ho, wo, co) (the PromptBlock feedback aligner).

  in_shape = (hi, wi, ci), out_shape = (ho, wo, co). Legacy nearest resize to
  (ho, wo) (identity if equal), BatchNorm2d(ci), 1x1 conv ci -> co without bias.
  """
  in_shape: Shape
  out_shape: Shape
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    return _resize_bn_conv(self, x, train)


class CNN2ViTProjector(nn.Module):
  """Map -> tokens: (B, h, w, c) -> (B, L, D) (never built by PAT's own aligners; kept for
  the direct-alignment ablation with a map student and a sequence teacher).

  in_shape = (h, w, c), out_shape = (L, D). With g = sqrt(L) and p = ceil(h / g), a map
  smaller than g*p is nearest-resized (legacy rule) to g*p, then a timm PatchEmbed
  Conv2d(c -> D, kernel p, stride p, bias) gives the g x g token grid, flattened
  row-major. Kernel init_weights (kaiming normal fan_out), bias PyTorch default.
  Parameters: `proj/{kernel,bias}` (no golden vectors cover this module).
  """
  in_shape: Shape
  out_shape: Shape
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h, _, c = self.in_shape
    l_out, d_out = self.out_shape
    g = math.isqrt(l_out)
    if g * g != l_out:
      raise ValueError(f'CNN2ViTProjector needs a square token count, got L={l_out}.')
    p = -(-h // g)
    if x.shape[1] < g * p:
      x = nearest_resize_legacy(x, g * p)
    y = layers.conv(d_out, p, p, 0, dtype=self.dtype, kernel_init=kaiming_normal_fan_out,
                    bias_init=layers.torch_default_bias(c * p * p), name='proj')(x)
    return y.reshape(x.shape[0], l_out, d_out)


def get_projector(in_shape: Sequence[int], out_shape: Sequence[int], dtype: Any = jnp.float32,
                  name: Optional[str] = None) -> nn.Module:
  """The original `get_projector_module(in_shapes, out_shapes)` (with `init_weights`).

  Per-sample pat_jax shapes: (L, D) for sequences, (H, W, C) for maps.
  sequence -> sequence: ViT2ViTProjector; sequence -> map: ViT2CNNProjector;
  map -> map: CNN2CNNProjector; map -> sequence: CNN2ViTProjector (never built by the
  original PAT, whose aligners always take the RAA's token output).
  """
  in_shape, out_shape = tuple(int(s) for s in in_shape), tuple(int(s) for s in out_shape)
  kinds = {(2, 2): ViT2ViTProjector, (2, 3): ViT2CNNProjector, (3, 3): CNN2CNNProjector,
           (3, 2): CNN2ViTProjector}
  cls = kinds.get((len(in_shape), len(out_shape)))
  if cls is None:
    raise NotImplementedError(
        f'No projector from {in_shape} to {out_shape}: shapes are per-sample (L, D) or (H, W, C).')
  return cls(in_shape, out_shape, dtype=dtype, name=name)
