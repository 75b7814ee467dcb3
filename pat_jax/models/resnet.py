"""ResNet-18/34/50 as timm builds them (7x7 stem + max-pool, BasicBlock / Bottleneck).

Stage taps (official-pat-code.md section 2): the outputs of layer1..layer4, NHWC.
Module names mirror timm's state_dict keys (`layer1.0.conv1` -> `layer1_0/conv1`)
so that pat_jax.convert maps weights by a mechanical rule.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from pat_jax.models import layers

# timm's ResNet init: kaiming_normal(fan_out, relu) for convs.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BasicBlock(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train):
    conv = functools.partial(layers.conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
    bn = functools.partial(layers.BatchNorm, dtype=self.dtype)
    y = nn.relu(bn(name='bn1')(conv(self.planes, 3, self.stride, 1, name='conv1')(x), train))
    # timm zero_init_last: the residual branch starts switched off.
    y = bn(scale_init=nn.initializers.zeros, name='bn2')(conv(self.planes, 3, 1, 1, name='conv2')(y), train)
    shortcut = x
    if self.downsample:
      shortcut = conv(self.planes, 1, self.stride, 0, name='downsample_0')(x)
      shortcut = bn(name='downsample_1')(shortcut, train)
    return nn.relu(layers.DropPath(self.drop_path)(y, train) + shortcut)


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train):
    conv = functools.partial(layers.conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
    bn = functools.partial(layers.BatchNorm, dtype=self.dtype)
    out = self.planes * self.expansion
    y = nn.relu(bn(name='bn1')(conv(self.planes, 1, 1, 0, name='conv1')(x), train))
    y = nn.relu(bn(name='bn2')(conv(self.planes, 3, self.stride, 1, name='conv2')(y), train))
    y = bn(scale_init=nn.initializers.zeros, name='bn3')(conv(out, 1, 1, 0, name='conv3')(y), train)
    shortcut = x
    if self.downsample:
      shortcut = conv(out, 1, self.stride, 0, name='downsample_0')(x)
      shortcut = bn(name='downsample_1')(shortcut, train)
    return nn.relu(layers.DropPath(self.drop_path)(y, train) + shortcut)


class ResNet(nn.Module):
  """timm ResNet: conv1/bn1/relu/maxpool stem -> layer1..4 -> global avg pool -> fc."""
  num_classes: int
  depths: Sequence[int] = (2, 2, 2, 2)
  channels: Sequence[int] = (64, 128, 256, 512)
  bottleneck: bool = False
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False  # recompute block activations in the backward pass (less memory)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False, stage_hook=None):
    block_cls = layers.maybe_remat(Bottleneck if self.bottleneck else BasicBlock, self.remat)
    # timm's plain 7x7 stem is always 64 wide, whatever `channels` says.
    x = layers.conv(64, 7, 2, 3, use_bias=False, dtype=self.dtype,
                    kernel_init=_conv_init, name='conv1')(x.astype(self.dtype))
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, name='bn1')(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    dpr = layers.drop_path_rates(self.drop_path_rate, sum(self.depths))
    features, in_ch, k = [], 64, 0
    for s, (depth, planes) in enumerate(zip(self.depths, self.channels)):
      x = layers.hook(stage_hook, s, x)
      for b in range(depth):
        stride = 2 if (s > 0 and b == 0) else 1
        out_ch = planes * (4 if self.bottleneck else 1)
        x = block_cls(planes, stride, downsample=(stride != 1 or in_ch != out_ch),
                      drop_path=dpr[k], dtype=self.dtype, name=f'layer{s + 1}_{b}')(x, train)
        in_ch, k = out_ch, k + 1
      features.append(x)

    pooled = x.astype(jnp.float32).mean(axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=layers.torch_default_kernel,
                      bias_init=layers.torch_default_bias(in_ch), name='fc')(pooled)
    return (logits, features) if return_features else logits
