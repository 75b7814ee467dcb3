"""The model zoo: a registry of backbones with one calling convention.

    model = pat_jax.models.create('deit_tiny_patch16_224', num_classes=100)
    logits = model.apply(variables, images_nhwc, train=False)
    logits, [f1, f2, f3, f4] = model.apply(variables, images_nhwc, return_features=True)

Every backbone is stem -> 4 stages -> head. `return_features=True` also returns the
outputs of the four stages at the original PAT code's `stage_info` taps (CNN stages
NHWC, token stages (B, L, D) with the cls token first where the model has one), and
`stage_hook(i, x) -> x`, when given, is applied to the input of stage i: the one place
where PAT's prompts enter a teacher, with no per-architecture code.

Each entry also names the timm model it reproduces (`Spec.timm`); the `mini_*` entries
are small variants of the same architectures for fast tests (32x32 inputs).
"""
import dataclasses
from typing import Any, Callable, Dict, Tuple

from pat_jax import errors
from pat_jax.models.convnext import ConvNeXt
from pat_jax.models.resmlp import ResMLP
from pat_jax.models.resnet import ResNet
from pat_jax.models.vit import VisionTransformer


@dataclasses.dataclass(frozen=True)
class Spec:
  module: Callable[..., Any]
  kwargs: Dict[str, Any]
  # (timm architecture, timm kwargs). The architecture is a timm model name, or
  # 'resmlp' for timm's MlpMixer with ResBlock/Affine at non-registered sizes.
  timm: Tuple[str, Dict[str, Any]]
  # Keys of the Flax module that also exist, with the same meaning, on the timm model.
  shared_overrides: Tuple[str, ...] = ('drop_path_rate',)


_VIT_KEYS = ('drop_path_rate', 'img_size')

REGISTRY: Dict[str, Spec] = {
    'resnet18': Spec(ResNet, dict(depths=(2, 2, 2, 2)), ('resnet18', {})),
    'resnet34': Spec(ResNet, dict(depths=(3, 4, 6, 3)), ('resnet34', {})),
    'resnet50': Spec(ResNet, dict(depths=(3, 4, 6, 3), bottleneck=True), ('resnet50', {})),
    'convnext_tiny': Spec(ConvNeXt, dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
                          ('convnext_tiny', {})),
    'deit_tiny_patch16_224': Spec(
        VisionTransformer, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
        ('deit_tiny_patch16_224', {}), _VIT_KEYS),
    'vit_small_patch16_224': Spec(
        VisionTransformer, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
        ('vit_small_patch16_224', {}), _VIT_KEYS),
    'resmlp_12_224': Spec(ResMLP, dict(patch_size=16, embed_dim=384, depth=12),
                          ('resmlp_12_224', {}), _VIT_KEYS),
    # Small variants of the same architectures, for tests and the offline demo.
    'mini_resnet': Spec(
        ResNet, dict(depths=(1, 1, 1, 1), channels=(8, 16, 32, 64)),
        ('resnet18', dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)))),
    'mini_resnet_bottleneck': Spec(
        ResNet, dict(depths=(1, 1, 1, 1), channels=(8, 16, 32, 64), bottleneck=True),
        ('resnet50', dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)))),
    'mini_convnext': Spec(
        ConvNeXt, dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48)),
        ('convnext_tiny', dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48)))),
    'mini_deit': Spec(
        VisionTransformer,
        dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, stage_ends=(0, 1, 2, 3)),
        ('deit_tiny_patch16_224', dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2)),
        _VIT_KEYS),
    'mini_resmlp': Spec(
        ResMLP, dict(img_size=32, patch_size=4, embed_dim=32, depth=4, stage_ends=(0, 1, 2, 3)),
        ('resmlp', dict(img_size=32, patch_size=4, embed_dim=32, num_blocks=4)), _VIT_KEYS),
}


def names():
  return sorted(REGISTRY)


def spec(name: str) -> Spec:
  if name not in REGISTRY:
    raise errors.ConfigError(f'Unknown model {name!r}. Valid names: {", ".join(names())}.')
  return REGISTRY[name]


def create(name: str, num_classes: int, **overrides):
  """Returns the Linen module `name` with `num_classes` outputs.

  `overrides` replace the module's fields (e.g. img_size=32, drop_path_rate=0.1,
  dtype=jnp.bfloat16); an unknown field is an error that lists the valid ones.
  """
  s = spec(name)
  fields = {f.name for f in dataclasses.fields(s.module)} - {'parent', 'name', 'num_classes'}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise errors.ConfigError(f'Model {name!r} has no option(s) {unknown}. Valid options: {sorted(fields)}.')
  return s.module(num_classes=num_classes, **{**s.kwargs, **overrides})
