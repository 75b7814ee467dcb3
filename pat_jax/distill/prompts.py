"""PAT's Adaptive Feedback Prompts: `SEBlock` and `PromptBlock`.

Layout: maps NHWC, sequences (B, L, D). Constructor shapes are per-sample, in
pat_jax layout: (H, W, C) for a map, (L, D) for a sequence (the original's
(B, C, H, W) -> (H, W, C), (B, L, D) -> (L, D)).

Initialisation is PyTorch's default (the original never re-initialises these):
conv weights and biases U(+-1/sqrt(fan_in)), fan_in = in_ch/groups*kh*kw; `beta` = 0.
A non-identity feedback aligner is built by `get_projector` (the original's
`get_projector_module`, with `init_weights`).

Quirk switches (module fields; the default reproduces the original, DESIGN.md #8):
  * Q1 `seq_layout`: 'torch_bug' (faithful): a sequence input's (C, h, w) result is
    reshaped straight to (h*w, C) without transposing back, i.e. in NHWC terms
    `transpose(grid, (0, 3, 1, 2)).reshape(B, h*w, C)`: tokens and channels are
    scrambled even when beta == 0; 'transpose' (corrected): the grid is flattened back
    to the original token order (identity when beta == 0).
  * Q2 `se_mode`: 'gate' (faithful): SEBlock returns only the sigmoid gate (B, 1, 1, C),
    so the fusion/prompt outputs are a per-sample per-channel offset broadcast over
    space; 'scale' (corrected): it returns x * gate (full resolution).
  * Q5 `cls_token`: 'last' (faithful): a non-square sequence sets its LAST token aside
    (and re-appends it at the end); 'first' (corrected for timm ViT): the first token
    (the real cls) is set aside and put back in front.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pat_jax.distill import projectors
from pat_jax.models import layers


def torch_conv(features: int, kernel: int, in_ch: int, groups: int = 1, dtype=jnp.float32,
               name: Optional[str] = None):
  """Conv2d(in_ch -> features, kernel, stride 1, padding kernel//2, groups, bias) with
  PyTorch's default initialisation."""
  fan_in = in_ch // groups * kernel * kernel
  return layers.conv(features, kernel, 1, kernel // 2, groups=groups, dtype=dtype,
                     kernel_init=layers.torch_default_kernel,
                     bias_init=layers.torch_default_bias(fan_in), name=name)


class SEBlock(nn.Module):
  """Squeeze-excitation: gate = sigmoid(excitation(relu(compress(mean_hw(x))))).

  `compress`: 1x1 conv C -> C//ratio, `excitation`: 1x1 conv C//ratio -> C, both with
  bias. se_mode='gate' (faithful, Q2) returns the gate (B, 1, 1, C); 'scale' returns
  x * gate.
  """
  channels: int
  ratio: int = 16
  se_mode: str = 'gate'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = self.channels // self.ratio
    s = x.mean(axis=(1, 2), keepdims=True)
    s = torch_conv(hidden, 1, self.channels, dtype=self.dtype, name='compress')(s)
    s = torch_conv(self.channels, 1, hidden, dtype=self.dtype, name='excitation')(nn.relu(s))
    gate = nn.sigmoid(s)
    if self.se_mode == 'gate':
      return gate
    if self.se_mode == 'scale':
      return x * gate
    raise ValueError(f"se_mode must be 'gate' or 'scale', got {self.se_mode!r}.")


class PromptBlock(nn.Module):
  """The feedback prompt inserted before one teacher stage: y = block(x, feedback).

  in_shape: per-sample shape of the feedback (the teacher stage OUTPUT, cls removed);
  out_shape: per-sample shape of x (the stage INPUT; a sequence may carry a cls token).
  For a sequence shape the side is int(sqrt(L)) and the channels D.

  Submodules (named after the original's state-dict keys):
    fb_aligner: `get_projector(in_shape, out_shape)` unless side and channels agree
      (then identity, no parameters);
    fusion_block_0..4: conv1x1(2C->C), conv5x5(C->C, pad 2), conv1x1, SEBlock, conv1x1;
    prompt_block_0..4: conv1x1(groups 4), depthwise conv5x5(pad 2), conv1x1, SEBlock,
      conv1x1(groups 4);
    beta: (1,) scalar, initialised to 0.

  Forward: feedback (if given) is aligned; a sequence x (B, L, C) sets its cls token
  aside when L is not square (Q5) and becomes the (B, h, h, C) grid (feedback alike);
  x_f = fusion(concat([x, feedback], channels)) with feedback, else x itself (fusion and
  fb_aligner are then not run); y = x + beta * prompt(x_f); a sequence goes back to
  (B, h*h, C) per `seq_layout` (Q1) and gets its cls token back.

  `train` selects batch vs running statistics of the fb_aligner BatchNorm (the
  original always runs PromptBlocks in train mode). `init` always creates every
  parameter, also when called without feedback.
  """
  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  seq_layout: str = 'torch_bug'
  se_mode: str = 'gate'
  cls_token: str = 'last'
  se_ratio: int = 16
  dtype: Any = jnp.float32

  @property
  def channels(self) -> int:
    return self.out_shape[-1]

  def _aligner_needed(self) -> bool:
    side = projectors.grid_side
    return (side(self.in_shape), self.in_shape[-1]) != (side(self.out_shape), self.out_shape[-1])

  def _fusion(self, x_grid, fb, train):
    c = self.channels
    if self._aligner_needed():
      fb = projectors.get_projector(projectors.square_shape(self.in_shape),
                                    projectors.square_shape(self.out_shape), dtype=self.dtype,
                                    name='fb_aligner')(fb, train)
    if fb.ndim == 3:
      fb = projectors.tokens_to_grid(projectors.drop_cls(fb, self.cls_token))
    y = jnp.concatenate([x_grid, fb.astype(x_grid.dtype)], axis=-1)
    y = torch_conv(c, 1, 2 * c, dtype=self.dtype, name='fusion_block_0')(y)
    y = torch_conv(c, 5, c, dtype=self.dtype, name='fusion_block_1')(y)
    y = torch_conv(c, 1, c, dtype=self.dtype, name='fusion_block_2')(y)
    y = SEBlock(c, self.se_ratio, self.se_mode, dtype=self.dtype, name='fusion_block_3')(y)
    return torch_conv(c, 1, c, dtype=self.dtype, name='fusion_block_4')(y)

  def _prompt(self, y):
    c = self.channels
    y = torch_conv(c, 1, c, groups=4, dtype=self.dtype, name='prompt_block_0')(y)
    y = torch_conv(c, 5, c, groups=c, dtype=self.dtype, name='prompt_block_1')(y)
    y = torch_conv(c, 1, c, dtype=self.dtype, name='prompt_block_2')(y)
    y = SEBlock(c, self.se_ratio, self.se_mode, dtype=self.dtype, name='prompt_block_3')(y)
    return torch_conv(c, 1, c, groups=4, dtype=self.dtype, name='prompt_block_4')(y)

  @nn.compact
  def __call__(self, x, feedback=None, train: bool = True):
    if self.seq_layout not in ('torch_bug', 'transpose'):
      raise ValueError(f"seq_layout must be 'torch_bug' or 'transpose', got {self.seq_layout!r}.")
    is_seq = x.ndim == 3
    cls = None
    if is_seq:
      tokens, cls = projectors.split_cls(x, self.cls_token)
      grid = projectors.tokens_to_grid(tokens)
    else:
      grid = x
    if feedback is not None:
      x_f = self._fusion(grid, feedback, train)
    else:
      x_f = grid
      if self.is_initializing():  # create the fusion/aligner parameters too
        fb = jnp.zeros((x.shape[0],) + tuple(self.in_shape), x.dtype)
        self._fusion(grid, fb, train)
    beta = self.param('beta', nn.initializers.zeros, (1,), jnp.float32)
    y = grid + beta.astype(grid.dtype) * self._prompt(x_f)
    if not is_seq:
      return y
    b, h, w, c = y.shape
    if self.seq_layout == 'torch_bug':
      y = jnp.transpose(y, (0, 3, 1, 2)).reshape(b, h * w, c)
    else:
      y = y.reshape(b, h * w, c)
    return projectors.merge_cls(y, cls, self.cls_token)
