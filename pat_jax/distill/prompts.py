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
import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pat_jax import kernels
from pat_jax.distill import projectors
from pat_jax.models import layers


def _torch_init(kernel: int, in_ch: int, groups: int):
  """PyTorch's default Conv2d initialisers: U(+-1/sqrt(fan_in)), fan_in = in_ch/groups*k*k."""
  fan_in = in_ch // groups * kernel * kernel
  return dict(kernel_init=layers.torch_default_kernel,
              bias_init=layers.torch_default_bias(fan_in))


def torch_conv(features: int, kernel: int, in_ch: int, groups: int = 1, dtype=jnp.float32,
               name: Optional[str] = None):
  """Conv2d(in_ch -> features, kernel, stride 1, padding kernel//2, groups, bias) with
  PyTorch's default initialisation."""
  return layers.conv(features, kernel, 1, kernel // 2, groups=groups, dtype=dtype, name=name,
                     **_torch_init(kernel, in_ch, groups))


def torch_conv_weights(features: int, kernel: int, in_ch: int, groups: int = 1,
                       name: Optional[str] = None):
  """`torch_conv`'s (kernel, bias) alone, for `conv_chain` and `conv_chain_mean`."""
  return layers.ConvWeights(features, kernel, groups, name=name,
                            **_torch_init(kernel, in_ch, groups))(in_ch)


def _groups(kernel, in_ch: int) -> int:
  return in_ch // kernel.shape[2]


def conv_chain(x, weights, dtype=jnp.float32):
  """conv1x1 -> conv kxk (padding k//2) -> conv1x1, stride 1, each (kernel, bias)."""
  for kernel, bias in weights:
    x = layers.conv_apply(x, kernel, bias, 1, kernel.shape[0] // 2,
                          _groups(kernel, x.shape[-1]), dtype)
  return x


def _clipped_sums(x, axis: int, k: int):
  """Sums of x along `axis` over the k windows of a size-k, padding-k//2 convolution tap,
  stacked on that axis: window d covers indices [d - k//2, d - k//2 + n) clipped to [0, n).
  Computed as the full sum minus the few border slices each window leaves out (no
  full-size intermediates in the forward pass; its derivative would pad each border slice to
  full size, hence `_window_sums_bwd`)."""
  n, p = x.shape[axis], k // 2
  total = x.sum(axis)
  edge = lambda j: jnp.take(x, j, axis=axis)
  out = []
  for d in range(k):
    o = d - p
    if abs(o) >= n:
      out.append(jnp.zeros_like(total))
    elif o == 0:
      out.append(total)
    else:
      left_out = range(n + o, n) if o < 0 else range(o)   # the indices window d misses
      out.append(total - sum(edge(j) for j in left_out))
  return jnp.stack(out, axis=axis)


def window_sums(x, k: int):
  """(B, H, W, C) -> (B, k, k, C): entry (di, dj) is the sum of x over the cells that tap
  (di, dj) of a k x k convolution with zero padding k//2 reads, i.e. x shifted by
  (di - k//2, dj - k//2) and clipped to the map. Also returns their counts (k, k)."""
  _, h, w, _ = x.shape
  sums = _window_sums(x, k)
  return sums, np.outer(_covers(h, k).sum(1), _covers(w, k).sum(1))


def _covers(n: int, k: int):
  """(k, n) 0/1: window d of `_clipped_sums` covers index i."""
  i, d = np.arange(n)[None, :], np.arange(k)[:, None] - k // 2
  return ((i >= d) & (i < d + n)).astype(np.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _window_sums(x, k: int):
  return _clipped_sums(_clipped_sums(x, 2, k), 1, k)


def _window_sums_fwd(x, k):
  return _window_sums(x, k), jnp.zeros((0,) + x.shape[1:3], x.dtype)  # empty: H, W and dtype


def _window_sums_bwd(k, res, g):
  """dx[b, h, w] = sum over the windows (i, j) covering (h, w) of g[b, i, j], as two short
  sums of broadcasts (XLA fuses each into one loop). Differentiating the clipped sums gave one
  full-size padded tensor per border slice (20+ at the prompted teacher's first stage), which
  XLA kept in memory at once next to the scanned teacher's backward loop (+200 MB at batch 8)."""
  rows, cols = _covers(res.shape[1], k), _covers(res.shape[2], k)
  a = sum(g[:, :, j, None, :] * cols[j][None, None, :, None] for j in range(k))  # (B, k, W, C)
  dx = sum(a[:, i, None, :, :] * rows[i][None, :, None, None] for i in range(k))  # (B, H, W, C)
  return (dx.astype(res.dtype),)


_window_sums.defvjp(_window_sums_fwd, _window_sums_bwd)


def conv_chain_mean(x, weights, dtype=jnp.float32):
  """mean over space of `conv_chain(x, weights)`, as (B, 1, 1, C), without the full maps.
  x: a map, or a tuple of maps that `conv_chain` would see concatenated over channels.

  All three convolutions are affine (no activation between them), so the spatial mean of
  the output is the last 1x1 conv of the mean of the kxk conv's output, and that mean is a
  sum over the k*k taps of (the sum of its input over the window that tap reads) times the
  tap's weights. The windows are clipped sums of x (`window_sums`), taken through the first
  1x1 conv (its bias counted once per cell). Cost O(HWC + k^2 C^2) instead of O(HW k^2 C^2).
  """
  (k0, b0), (k1, b1), (k2, b2) = weights
  k = k1.shape[0]
  parts = x if isinstance(x, (tuple, list)) else (x,)
  _, h, w, _ = parts[0].shape
  sums, counts = zip(*[window_sums(p.astype(jnp.float32), k) for p in parts])
  sums, counts = jnp.concatenate(sums, axis=-1), counts[0]                  # (B, k, k, Cin)
  cin = sums.shape[-1]
  u = layers.conv_apply(sums, k0, None, groups=_groups(k0, cin), dtype=dtype)
  u = u + jnp.asarray(counts, u.dtype)[None, :, :, None] * b0.astype(u.dtype)  # (B, k, k, C)
  if k1.shape[2] == 1 and k1.shape[3] == u.shape[-1] > 1:                    # depthwise
    v = jnp.einsum('bijc,ijc->bc', u, k1[:, :, 0, :].astype(u.dtype))
  else:
    v = kernels.taps_dot(u, k1.astype(u.dtype))
  v = v / (h * w) + b1.astype(v.dtype)
  return layers.conv_apply(v[:, None, None, :], k2, b2, dtype=dtype)


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

  `feedback_valid` (a traced boolean scalar, with feedback): False gives the output without
  feedback (a run's first step, in the same program as the rest): the fusion branch runs but
  x itself is used (with se_mode='gate', an nn.cond runs the prompt branch on x or on the
  fused input); the caller keeps the fusion branch's BatchNorm statistics (pat.py).

  Forward: feedback (if given) is aligned; a sequence x (B, L, C) sets its cls token
  aside when L is not square (Q5) and becomes the (B, h, h, C) grid (feedback alike);
  x_f = fusion(concat([x, feedback], channels)) with feedback, else x itself (fusion and
  fb_aligner are then not run); y = x + beta * prompt(x_f); a sequence goes back to
  (B, h*h, C) per `seq_layout` (Q1) and gets its cls token back.

  `train` selects batch vs running statistics of the fb_aligner BatchNorm (the
  original always runs PromptBlocks in train mode). `init` always creates every
  parameter, also when called without feedback.

  `pooled` (used with se_mode='gate'): True computes the fusion and prompt branches through
  their spatial means (`conv_chain_mean`), the same function without the full-resolution
  convolutions; False computes them directly; None (default) takes
  `kernels.form('prompt_chain')` ('pooled' on every backend unless overridden).
  """
  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  seq_layout: str = 'torch_bug'
  se_mode: str = 'gate'
  cls_token: str = 'last'
  se_ratio: int = 16
  pooled: Optional[bool] = None  # se_mode='gate' only: through spatial means (same function)
  dtype: Any = jnp.float32

  @property
  def channels(self) -> int:
    return self.out_shape[-1]

  def _aligner_needed(self) -> bool:
    side = projectors.grid_side
    return (side(self.in_shape), self.in_shape[-1]) != (side(self.out_shape), self.out_shape[-1])

  def _pooled(self) -> bool:
    """Faithful SE (Q2) makes each conv chain's output matter only through its spatial
    mean, which `conv_chain_mean` computes exactly without the full-resolution maps."""
    pooled = (kernels.form('prompt_chain') == 'pooled') if self.pooled is None else self.pooled
    return self.se_mode == 'gate' and pooled

  def _fusion(self, x_grid, fb, train):
    c = self.channels
    if self._aligner_needed():
      fb = projectors.get_projector(projectors.square_shape(self.in_shape),
                                    projectors.square_shape(self.out_shape), dtype=self.dtype,
                                    name='fb_aligner')(fb, train)
    if fb.ndim == 3:
      fb = projectors.tokens_to_grid(projectors.drop_cls(fb, self.cls_token))
    y = (x_grid, fb.astype(x_grid.dtype))
    chain = [torch_conv_weights(c, 1, 2 * c, name='fusion_block_0'),
             torch_conv_weights(c, 5, c, name='fusion_block_1'),
             torch_conv_weights(c, 1, c, name='fusion_block_2')]
    y = conv_chain_mean(y, chain, self.dtype) if self._pooled() else conv_chain(
        jnp.concatenate(y, axis=-1), chain, self.dtype)
    y = SEBlock(c, self.se_ratio, self.se_mode, dtype=self.dtype, name='fusion_block_3')(y)
    return torch_conv(c, 1, c, dtype=self.dtype, name='fusion_block_4')(y)

  def _prompt(self, y):
    c = self.channels
    chain = [torch_conv_weights(c, 1, c, groups=4, name='prompt_block_0'),
             torch_conv_weights(c, 5, c, groups=c, name='prompt_block_1'),
             torch_conv_weights(c, 1, c, name='prompt_block_2')]
    y = (conv_chain_mean if self._pooled() else conv_chain)(y, chain, self.dtype)
    y = SEBlock(c, self.se_ratio, self.se_mode, dtype=self.dtype, name='prompt_block_3')(y)
    return torch_conv(c, 1, c, groups=4, dtype=self.dtype, name='prompt_block_4')(y)

  @nn.compact
  def __call__(self, x, feedback=None, train: bool = True, feedback_valid=None):
    if self.seq_layout not in ('torch_bug', 'transpose'):
      raise ValueError(f"seq_layout must be 'torch_bug' or 'transpose', got {self.seq_layout!r}.")
    is_seq = x.ndim == 3
    cls = None
    if is_seq:
      tokens, cls = projectors.split_cls(x, self.cls_token)
      grid = projectors.tokens_to_grid(tokens)
    else:
      grid = x
    if feedback is None:
      prompt = self._prompt(grid)
      if self.is_initializing():  # create the fusion/aligner parameters too
        fb = jnp.zeros((x.shape[0],) + tuple(self.in_shape), x.dtype)
        self._fusion(grid, fb, train)
    else:
      x_f = self._fusion(grid, feedback, train)
      if feedback_valid is None:
        prompt = self._prompt(x_f)
      elif x_f.shape == grid.shape:  # a run's first step (traced flag) takes x unfused
        prompt = self._prompt(jnp.where(feedback_valid, x_f, grid))
      else:
        # se_mode='gate' (Q2): the fused input is the (B, 1, 1, C) gate, the unfused one the
        # whole map, and the prompt branch's padded 5x5 convolution treats them differently.
        # A run-time branch runs only the one needed: selecting between both outputs gave
        # the unused branch a gradient path into the teacher's activations, +26% peak memory.
        prompt = nn.cond(feedback_valid, lambda mdl, fused, _: mdl._prompt(fused),  # pylint: disable=protected-access
                         lambda mdl, _, unfused: mdl._prompt(unfused), self, x_f, grid)  # pylint: disable=protected-access
    beta = self.param('beta', nn.initializers.zeros, (1,), jnp.float32)
    y = grid + beta.astype(grid.dtype) * prompt
    if not is_seq:
      return y
    b, h, w, c = y.shape
    if self.seq_layout == 'torch_bug':
      y = jnp.transpose(y, (0, 3, 1, 2)).reshape(b, h * w, c)
    else:
      y = y.reshape(b, h * w, c)
    return projectors.merge_cls(y, cls, self.cls_token)
