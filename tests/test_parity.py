"""pat_jax reproduces timm: logits and the four stage features, through a converted checkpoint.

Every parameter is moved off its initial value and BatchNorm gets real running
statistics (timm_zoo.perturb_), so no path hides behind a zero or a 1e-6 layer scale.
Criterion (issue 2): max abs error <= 1e-4 x max(1, largest magnitude), float32.
"""
import numpy as np
import pytest
import torch

from pat_jax import convert, parity, timm_zoo

CASES = [
    # full-size models at the paper's 224x224
    ('resnet18', 224), ('resnet34', 224), ('resnet50', 224), ('convnext_tiny', 224),
    ('deit_tiny_patch16_224', 224), ('vit_small_patch16_224', 224), ('resmlp_12_224', 224),
    # mini variants at small sizes
    ('mini_resnet', 64), ('mini_resnet_bottleneck', 64), ('mini_convnext', 64),
    ('mini_deit', 32), ('mini_resmlp', 32),
]


@pytest.mark.parametrize('name,size', CASES)
def test_logits_and_stage_features_match_timm(name, size, tmp_path):
  result = parity.compare(name, num_classes=100, image_size=size, workdir=str(tmp_path))
  assert result['image_size'] == size
  assert len(result['feature_err']) == 4
  assert result['logit_err'] <= parity.TOLERANCE, result
  assert max(result['feature_err']) <= parity.TOLERANCE, result
  assert result['ok']


@pytest.mark.parametrize('name', [n for n, _ in CASES])
def test_round_trip_to_timm_is_exact(name):
  tmodel = timm_zoo.perturb_(timm_zoo.create(name, 100), seed=3, img_size=64 if 'mini' in name else 224)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  back = convert.to_timm(convert.from_timm(name, tmodel.state_dict(), num_classes=100))
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  # ... and timm loads it strictly.
  timm_zoo.create(name, 100).load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})


def test_relative_error_fails_on_a_real_difference():
  """The criterion itself: a 1e-3 relative change must not pass."""
  want = np.linspace(-5, 5, 100)
  assert parity.relative_error(want, want) == 0
  assert parity.relative_error(want * (1 + 1e-3), want) > parity.TOLERANCE
