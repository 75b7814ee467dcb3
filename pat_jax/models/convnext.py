"""ConvNeXt as timm builds it (patchify stem, LN + 2x2 conv downsample, 7x7 depthwise blocks).

Stage taps: the outputs of stages[0..3], NHWC. timm's channels-first LayerNorm2d is
an ordinary last-axis LayerNorm in NHWC. Module names mirror timm's keys.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pat_jax.models import layers


class Block(nn.Module):
  """dwconv 7x7 -> LN -> Mlp(4x) -> layer scale `gamma` -> drop path -> residual."""
  dim: int
  drop_path: float = 0.0
  ls_init_value: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    y = layers.conv(self.dim, 7, 1, 3, groups=self.dim, dtype=self.dtype,
                    kernel_init=layers.trunc_normal_02, name='conv_dw')(x)
    y = layers.LayerNorm(dtype=self.dtype, name='norm')(checkpoint_name(y, 'dwconv'))
    y = layers.Mlp(4 * self.dim, self.dim, dtype=self.dtype, name='mlp')(y)
    gamma = self.param('gamma', nn.initializers.constant(self.ls_init_value), (self.dim,))
    # gamma in the compute dtype keeps a bf16 residual stream bf16 (half the saved activations).
    return x + layers.DropPath(self.drop_path)(y * gamma.astype(y.dtype), train)


class Stage(nn.Module):
  """timm ConvNeXtStage: optional (LN, 2x2 stride-2 conv) downsample, then blocks."""
  dim: int
  depth: int
  downsample: bool
  drop_paths: Sequence[float]
  ls_init_value: float = 1e-6
  dtype: Any = jnp.float32
  remat: bool = False

  scan: bool = False  # eval mode: the blocks as one lax.scan (see _scanned_blocks)

  @nn.compact
  def __call__(self, x, train):
    block = layers.maybe_remat(Block, self.remat)
    if self.downsample:
      x = layers.LayerNorm(dtype=self.dtype, name='downsample_0')(x)
      x = layers.conv(self.dim, 2, 2, 0, dtype=self.dtype, kernel_init=layers.trunc_normal_02,
                      name='downsample_1')(x)
    if self.scan and not train and self.depth > 1 and not self.is_initializing():
      return self._scanned_blocks(x)
    for b in range(self.depth):
      x = block(self.dim, self.drop_paths[b], self.ls_init_value, self.dtype, name=f'blocks_{b}')(x, train)
    return x

  def _scanned_blocks(self, x):
    """The stage's blocks as one loop over their stacked weights: XLA compiles one block
    instead of `depth` copies (a frozen teacher runs in eval mode, twice per PAT step: the
    paper pair's program is 31% smaller, docs/BENCHMARKS.md). The weights come stacked
    (`blocks`, made once by `stack_blocks`) or as timm's `blocks_<b>`, then stacked here on
    every call (a copy of the stage's weights per forward: ~100 MB for ConvNeXt-T). Same
    function; eval mode only, where no block draws randomness (drop path). With remat, each
    iteration's activations are recomputed in the backward pass."""
    params = self.variables['params']
    stacked = params.get('blocks')
    if stacked is None:
      stacked = _stack([params[f'blocks_{b}'] for b in range(self.depth)])
    proto = Block(self.dim, 0.0, self.ls_init_value, self.dtype)

    def body(y, block_params):
      return proto.apply({'params': block_params}, y, False), None
    if self.remat:
      body = jax.checkpoint(body)
    else:
      # Save what an unrolled network keeps for the backward pass (the depthwise output and
      # the matrix products; XLA recomputes the LayerNorm's element-wise parts inside its
      # fusions there) and recompute the rest: scan stacks every residual it is given, and
      # left alone it kept the LayerNorm's intermediates too (+20% activation memory).
      body = jax.checkpoint(body, policy=_SCAN_SAVES)
    return jax.lax.scan(body, x, stacked)[0]


_SCAN_SAVES = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names('dwconv'))


def _stack(trees):
  return jax.tree_util.tree_map(lambda *p: jnp.stack(p), *trees)


def stack_blocks(variables):
  """ConvNeXt variables with each stage's `blocks_<b>` (b < depth, depth > 1) stacked into one
  `blocks` entry along a new leading axis: the layout a scan_blocks model runs without copying
  its weights on every forward. For a frozen teacher, once after loading; checkpoints and timm
  conversion keep the per-block layout."""
  out = dict(variables)
  params = dict(out['params'])
  for name, stage in params.items():
    if not name.startswith('stages_'):
      continue
    blocks = sorted((k for k in stage if k.startswith('blocks_')), key=lambda k: int(k[7:]))
    if len(blocks) > 1:
      stage = {k: v for k, v in stage.items() if k not in blocks}
      params[name] = {**stage, 'blocks': _stack([variables['params'][name][k] for k in blocks])}
  out['params'] = params
  return out


class Head(nn.Module):
  """timm NormMlpClassifierHead: global average pool -> LayerNorm -> fc."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = layers.LayerNorm(name='norm')(x.astype(jnp.float32).mean(axis=(1, 2)))
    return nn.Dense(self.num_classes, kernel_init=layers.trunc_normal_02, name='fc')(x)


class ConvNeXt(nn.Module):
  num_classes: int
  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  drop_path_rate: float = 0.0
  ls_init_value: float = 1e-6
  dtype: Any = jnp.float32
  remat: bool = False  # recompute block activations in the backward pass (less memory)
  scan_blocks: bool = False  # eval mode: each stage's blocks as one loop (Stage._scanned_blocks)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False, stage_hook=None):
    x = layers.conv(self.dims[0], 4, 4, 0, dtype=self.dtype, kernel_init=layers.trunc_normal_02,
                    name='stem_0')(x.astype(self.dtype))
    x = layers.LayerNorm(dtype=self.dtype, name='stem_1')(x)

    dpr = layers.drop_path_rates(self.drop_path_rate, sum(self.depths))
    features, k = [], 0
    for s, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      # The prompt sees the stage input, before the stage's own downsample
      # (official-pat-code.md section 1.5).
      x = layers.hook(stage_hook, s, x)
      x = Stage(dim, depth, s > 0, dpr[k:k + depth], self.ls_init_value, self.dtype, self.remat,
                self.scan_blocks, name=f'stages_{s}')(x, train)
      k += depth
      features.append(x)

    logits = Head(self.num_classes, name='head')(x)
    return (logits, features) if return_features else logits
