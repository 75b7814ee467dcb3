"""The PyTorch/timm side of the model zoo: the timm model behind each registry entry,
its stage taps, and test weights that exercise every path. Needs the [torch] extra.
"""
from typing import List, Tuple

import numpy as np
import torch

from pat_jax import models


def create(name: str, num_classes: int, **overrides) -> torch.nn.Module:
  """The timm model that pat_jax model `name` reproduces (random init, eval mode)."""
  import timm  # pylint: disable=g-import-not-at-top
  spec = models.spec(name)
  arch, kwargs = spec.timm
  kwargs = dict(kwargs, num_classes=num_classes,
                **{k: v for k, v in overrides.items() if k in spec.shared_overrides})
  if arch == 'resmlp':
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock  # pylint: disable=g-import-not-at-top
    model = MlpMixer(mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine, **kwargs)
  else:
    model = timm.create_model(arch, pretrained=False, **kwargs)
  return model.eval()


def stage_modules(name: str, model: torch.nn.Module) -> List[torch.nn.Module]:
  """The four timm modules whose outputs are the stage taps of `name`."""
  flax_model = models.create(name, num_classes=1)
  if hasattr(model, 'layer1'):  # ResNet
    return [model.layer1, model.layer2, model.layer3, model.layer4]
  if hasattr(model, 'stages'):  # ConvNeXt
    return list(model.stages)
  return [model.blocks[i] for i in flax_model.stage_ends]  # ViT, ResMLP


def forward_with_features(name: str, model: torch.nn.Module, x: torch.Tensor
                          ) -> Tuple[np.ndarray, List[np.ndarray]]:
  """timm logits and stage features for NCHW `x`, features in pat_jax layout (NHWC / BLD)."""
  feats = []
  handles = [m.register_forward_hook(lambda _m, _i, out: feats.append(out))
             for m in stage_modules(name, model)]
  try:
    with torch.no_grad():
      logits = model(x)
  finally:
    for h in handles:
      h.remove()
  feats = [f.permute(0, 2, 3, 1) if f.ndim == 4 else f for f in feats]
  return logits.numpy(), [f.contiguous().numpy() for f in feats]


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, calib_batches: int = 2, img_size: int = 224):
  """Moves every parameter off its initial value and gives BatchNorm real statistics.

  timm zero-initialises some heads and residual-branch norms and starts layer scales at
  1e-6/1e-4; compared at init those paths would be invisible. Weights get noise of the
  size of their fan-in init; norm scales U(0.6, 1.4); layer scales U(0.2, 0.8); biases and
  tables N(0, 0.1^2). BatchNorm running statistics are then measured on random batches
  (cumulative average), so they are non-trivial and keep activations in range.
  """
  g = torch.Generator().manual_seed(seed)
  for key, p in model.named_parameters():
    leaf = key.rsplit('.', 1)[-1]
    if p.ndim >= 2 and leaf == 'weight':
      fan_in = p[0].numel()
      p.add_(torch.randn(p.shape, generator=g) * 0.5 / fan_in ** 0.5)
    elif leaf in ('weight', 'alpha'):
      p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.6)
    elif leaf in ('gamma', 'ls1', 'ls2'):
      p.copy_(torch.rand(p.shape, generator=g) * 0.6 + 0.2)
    else:
      p.add_(torch.randn(p.shape, generator=g) * 0.1)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]  # pylint: disable=protected-access
  if bns:
    for m in bns:
      m.reset_running_stats()
      m.momentum = None  # cumulative moving average
    model.train()
    for _ in range(calib_batches):
      model(torch.randn(4, 3, img_size, img_size, generator=g))
    for m in bns:
      m.momentum = 0.1
  model.eval()
  return model
