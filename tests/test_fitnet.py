"""FitNet baseline: aligner rules and shapes for the paper's pairs, parameter counts, numerics of
every aligner kind against a PyTorch re-statement of the original's modules, initialisation,
and one train step through the real trainer on 1 and 8 devices."""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import timm
import torch
from torch import nn as tnn

from pat_jax import config as base_config, convert, models, sharding, train
from pat_jax.distill import fitnet, registry


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _config():
  c = base_config.base('cnn')
  c.method = ml_collections.ConfigDict(fitnet.default_config())
  return c


def test_default_config_is_the_originals():
  assert fitnet.default_config() == dict(name='fitnet', ce_weight=1.0, kd_weight=1.0,
                                         kd_temperature=1.0, fitnet_weight=1.0,
                                         fitnet_stages=(1, 2, 3, 4))


# ---------------------------------------------------------------------------
# A PyTorch re-statement of the original's per-stage FitNet modules (PAT repo,
# distillers/fitnet.py + distillers/utils.py), in the original's layouts: maps (C, H, W),
# sequences (L, D). `num_tokens_*` is what getattr(model, 'num_tokens', 0) returns: 0 under
# timm 0.6.5 (Q9), 1 for the older timm the code was written against.

class _MyPatchMerging(tnn.Module):
  def __init__(self, out_patch_num):
    super().__init__()
    self.out_patch_num = out_patch_num

  def forward(self, x):
    b, l, d = x.shape
    side = int(l ** 0.5)
    assert side ** 2 == l
    out = int(self.out_patch_num ** 0.5)
    assert out ** 2 == self.out_patch_num
    g = side // out
    assert g * out == side
    x = x.view(b, out, g, out, g, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, out * out, -1)


class _TokenFilter(tnn.Module):  # remove_mode=True, inverse=False
  def __init__(self, number):
    super().__init__()
    self.number = number

  def forward(self, x):
    return x[:, self.number:, :]


class _Lambda(tnn.Module):
  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x):
    return self.fn(x)


class _Unpatchify(tnn.Module):
  def __init__(self, p):
    super().__init__()
    self.p = p

  def forward(self, x):
    h = int(x.shape[1] ** 0.5)
    assert h * h == x.shape[1]
    x = x.reshape(x.shape[0], h, h, self.p, self.p, -1)
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(x.shape[0], -1, h * self.p, h * self.p)


def _torch_init_weights(module):
  for m in module.modules():
    if isinstance(m, tnn.Conv2d):
      tnn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    elif isinstance(m, tnn.Linear):
      tnn.init.trunc_normal_(m.weight, std=0.02)
      if m.bias is not None:
        tnn.init.zeros_(m.bias)


def torch_stage(size_s, size_t, num_tokens_s=0, num_tokens_t=0):
  """The original's `projector[stage]` ModuleDict for one stage (torch shapes)."""
  cnn_s, cnn_t = len(size_s) == 3, len(size_t) == 3
  if cnn_s and cnn_t:
    filt_s, filt_t = tnn.Identity(), tnn.Identity()
    aligner = tnn.Conv2d(size_s[0], size_t[0], 1, 1, 0, bias=False)
  elif cnn_s:
    c, h, _ = size_s
    n, d = size_t
    grid = int((n - num_tokens_t) ** 0.5)
    filt_s = tnn.Identity()
    if h >= grid:
      filt_t = _TokenFilter(num_tokens_t)
      p = h // grid
      assert p * grid == h
      aligner = timm.layers.PatchEmbed(h, p, c, d)
    else:
      filt_t = tnn.Sequential(_TokenFilter(num_tokens_t), _MyPatchMerging(h * h))
      scale = grid // h
      assert scale * h == grid
      aligner = tnn.Sequential(tnn.Conv2d(c, d * scale ** 2, 1, 1, 0),
                               _Lambda(lambda x: torch.einsum('nchw->nhwc', x)),
                               tnn.Flatten(start_dim=1, end_dim=2))
  elif cnn_t:
    n, d = size_s
    c, h, _ = size_t
    grid = int((n - num_tokens_s) ** 0.5)
    filt_s, filt_t = _TokenFilter(num_tokens_s), tnn.Identity()
    if h >= grid:
      p = h // grid
      assert p * grid == h
      aligner = tnn.Sequential(tnn.Linear(d, p * p * c), _Unpatchify(p))
    else:
      assert grid % h == 0
      scale = grid // h
      aligner = tnn.Sequential(
          _MyPatchMerging(h * h),
          _Lambda(lambda x, h=h: torch.einsum('nhwc->nchw', x.view(x.size(0), h, h, x.size(-1)))),
          tnn.Conv2d(d * scale ** 2, c, 1, 1, 0))
  else:
    (n_s, d_s), (n_t, d_t) = size_s, size_t
    n_s -= num_tokens_s
    n_t -= num_tokens_t
    filt_s, filt_t = _TokenFilter(num_tokens_s), _TokenFilter(num_tokens_t)
    if n_t > n_s:
      scale = n_t * d_t // (n_s * d_s)
      assert scale * n_s * d_s == n_t * d_t
      aligner = tnn.Sequential(tnn.Linear(d_s, d_s * scale),
                               _Lambda(lambda x, d_t=d_t: x.reshape(x.size(0), -1, d_t)))
    else:
      assert n_s % n_t == 0
      aligner = tnn.Sequential(_MyPatchMerging(n_t), tnn.Linear(n_s * d_s // n_t, size_t[-1]))
  stage = tnn.ModuleDict({'feature_filter_s': filt_s, 'feature_filter_t': filt_t, 'aligner': aligner})
  stage.apply(_torch_init_weights)
  return stage


def torch_forward(stage, feat_s, feat_t):
  """The original forward for one stage: filters, first-token drop, aligner, F.mse_loss."""
  feat_t = stage['feature_filter_t'](feat_t)
  feat_s = stage['feature_filter_s'](feat_s)
  if feat_t.dim() == 3 and not math.sqrt(feat_t.shape[1]).is_integer():
    feat_t = feat_t[:, 1:, :]
  if feat_s.dim() == 3 and not math.sqrt(feat_s.shape[1]).is_integer():
    feat_s = feat_s[:, 1:, :]
  aligned = stage['aligner'](feat_s)
  return aligned, feat_t, torch.nn.functional.mse_loss(aligned, feat_t)


def _torch_shape(shape):
  """pat_jax per-sample shape -> the original's: (H, W, C) -> (C, H, W); (L, D) unchanged."""
  return (shape[2], shape[0], shape[1]) if len(shape) == 3 else tuple(shape)


def _num_tokens(shape):
  """num_tokens = 1 for a sequence with a cls token (non-square L), as the code intended."""
  return int(len(shape) == 2 and math.isqrt(shape[0]) ** 2 != shape[0])


def _to_torch(x):
  x = np.asarray(x)
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy() if x.ndim == 4 else x.copy())


def _from_torch(t):
  x = t.detach().numpy()
  return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def _flax_params_from_torch(stages):
  """{stage: torch ModuleDict} -> the FitNetAligners params, through convert.timm_to_flat."""
  sd = {f'projector.{s}.{k}': v.detach().numpy() for s, m in stages.items()
        for k, v in m.state_dict().items()}
  flat = convert.timm_to_flat(sd)
  assert all(k[0] == 'params' for k in flat)
  return flax.traverse_util.unflatten_dict({k[1:]: jnp.asarray(v) for k, v in flat.items()})


# ---------------------------------------------------------------------------
# Shapes and parameter counts of the paper's pairs (224x224, abstract forwards only).

def _abstract_feats(batch, shapes):
  return [jax.ShapeDtypeStruct((batch,) + tuple(s), jnp.float32) for s in shapes]


def _abstract_pair(student, teacher):
  sm, tm = models.create(student, 100), models.create(teacher, 100)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  sv = jax.eval_shape(lambda x: sm.init(jax.random.PRNGKey(0), x, train=False), x)
  tv = jax.eval_shape(lambda x: tm.init(jax.random.PRNGKey(0), x, train=False), x)
  method = fitnet.FitNet(_config(), sm, tm)
  params, stats, state = jax.eval_shape(method.init, jax.random.PRNGKey(0), x, sv, tv)
  assert stats == {} and state == {}
  shapes_s, shapes_t = method.stage_shapes(x, sv, tv)
  return method.net(shapes_s, shapes_t), params, shapes_s, shapes_t


# (kind, factor, aligned per-sample shape) per stage, and the aligner parameter count:
#   R18 -> ConvNeXt-T: Conv2d(C_s, C_t, 1, bias=False): 64*96 + 128*192 + 256*384 + 512*768.
#   DeiT-T -> ConvNeXt-T: Linear(192, p^2*C_t) for p = 4, 2, 1: 192*1536+1536, 192*768+768,
#     192*384+384; stage 4 (7 < 14): MyPatchMerging(49) + Conv2d(4*192, 768, 1): 768*768+768.
#   R18 -> ViT-S: PatchEmbed(p=4,2,1): 64*16*384+384, 128*4*384+384, 256*384+384; stage 4:
#     Conv2d(512, 384*2^2, 1) + bias: 512*1536+1536 (the teacher tokens are MyPatchMerging(49)'d).
#   DeiT-T -> ResMLP-S12: 196 = 196 tokens: MyPatchMerging(196) (identity) + Linear(192, 384), x4.
PAPER_PAIRS = {
    ('resnet18', 'convnext_tiny'): (
        [('conv', 1, (56, 56, 96)), ('conv', 1, (28, 28, 192)), ('conv', 1, (14, 14, 384)),
         ('conv', 1, (7, 7, 768))], 64 * 96 + 128 * 192 + 256 * 384 + 512 * 768),
    ('deit_tiny_patch16_224', 'convnext_tiny'): (
        [('linear_unpatchify', 4, (56, 56, 96)), ('linear_unpatchify', 2, (28, 28, 192)),
         ('linear_unpatchify', 1, (14, 14, 384)), ('merge_conv', 2, (7, 7, 768))],
        192 * 1536 + 1536 + 192 * 768 + 768 + 192 * 384 + 384 + 768 * 768 + 768),
    ('resnet18', 'vit_small_patch16_224'): (
        [('patch_embed', 4, (196, 384)), ('patch_embed', 2, (196, 384)),
         ('patch_embed', 1, (196, 384)), ('conv_merge', 2, (49, 1536))],
        64 * 16 * 384 + 384 + 128 * 4 * 384 + 384 + 256 * 384 + 384 + 512 * 1536 + 1536),
    ('deit_tiny_patch16_224', 'resmlp_12_224'): (
        [('merge_linear', 1, (196, 384))] * 4, 4 * (192 * 384 + 384)),
}


@pytest.mark.parametrize('pair', sorted(PAPER_PAIRS))
def test_paper_pairs_shapes_and_parameter_counts(pair):
  want, want_count = PAPER_PAIRS[pair]
  net, params, shapes_s, shapes_t = _abstract_pair(*pair)
  got = [(p.kind, p.factor, p.aligned_shape) for p in net.plans().values()]
  assert got == want
  assert _count(params) == want_count
  # Aligned student features have the target's shape (the target is the teacher's feature,
  # cls token dropped; MyPatchMerging'd for 'conv_merge').
  out = jax.eval_shape(lambda p, a, b: net.apply({'params': p}, a, b), params,
                       _abstract_feats(2, shapes_s), _abstract_feats(2, shapes_t))
  for (_, _, shape), a, t in zip(want, out['aligned'], out['targets']):
    assert a.shape == t.shape == (2,) + shape
  # The PyTorch re-statement of the original builds the same number of parameters.
  tstages = [torch_stage(_torch_shape(s), _torch_shape(t), _num_tokens(s), _num_tokens(t))
             for s, t in zip(shapes_s, shapes_t)]
  assert sum(p.numel() for m in tstages for p in m.parameters()) == want_count


# Pairs with models pat_jax does not have (Swin-T, Mixer-B/16), from the stage shapes of
# official-pat-code.md section 2; counts derived from the original's constructors:
#   Swin-T -> R18 (the repo's FitNet run): H = sqrt(L) at every stage: PatchEmbed(p=1):
#     (64+1)*96 + (128+1)*192 + (256+1)*384 + (512+1)*768.
#   Swin-T -> ResMLP-S12: stage 1: 3136*96 / (196*384) = 4: Linear(384, 1536); stage 2: x2:
#     Linear(384, 768); stage 3: MyPatchMerging(196) + Linear(384, 384); stage 4:
#     MyPatchMerging(49) + Linear(4*384, 768).
#   Mixer-B/16 -> DeiT-T: MyPatchMerging(196) + Linear(192, 768), x4.
SWIN_T = [(3136, 96), (784, 192), (196, 384), (49, 768)]
SHAPE_PAIRS = {
    'swin_t->resnet18': ([(56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)], SWIN_T,
                         ['patch_embed'] * 4, 65 * 96 + 129 * 192 + 257 * 384 + 513 * 768),
    'swin_t->resmlp_s12': ([(196, 384)] * 4, SWIN_T,
                           ['linear_expand', 'linear_expand', 'merge_linear', 'merge_linear'],
                           385 * 1536 + 385 * 768 + 385 * 384 + 1537 * 768),
    'mixer_b16->deit_t': ([(197, 192)] * 4, [(196, 768)] * 4, ['merge_linear'] * 4, 4 * 193 * 768),
}


@pytest.mark.parametrize('name', sorted(SHAPE_PAIRS))
def test_pairs_from_stage_shapes(name):
  shapes_s, shapes_t, kinds, want_count = SHAPE_PAIRS[name]
  net = fitnet.FitNetAligners(shapes_s, shapes_t)
  assert [p.kind for p in net.plans().values()] == kinds
  feats = functools.partial(_abstract_feats, 1)
  variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), feats(shapes_s), feats(shapes_t))
  assert _count(variables['params']) == want_count
  out = jax.eval_shape(net.apply, variables, feats(shapes_s), feats(shapes_t))
  for a, t, st in zip(out['aligned'], out['targets'], shapes_t):
    assert a.shape == t.shape == (1,) + fitnet.pj.square_shape(st)
  tstages = [torch_stage(_torch_shape(s), _torch_shape(t), _num_tokens(s), _num_tokens(t))
             for s, t in zip(shapes_s, shapes_t)]
  assert sum(p.numel() for m in tstages for p in m.parameters()) == want_count


@pytest.mark.parametrize('s,t,match', [
    ((8, 8, 4), (4, 4, 6), 'equal spatial sizes'),
    ((6, 6, 4), (16, 8), 'not a multiple'),
    ((17, 8), (3, 3, 4), 'not a multiple'),
    ((16, 10), (64, 7), 'not a multiple'),
    ((20, 8), (4, 4, 6), 'not a square grid'),
])
def test_impossible_pairs_are_named(s, t, match):
  with pytest.raises(ValueError, match=match):
    fitnet.plan_stage(s, t)


def test_bad_stages_are_rejected():
  c = _config()
  c.method.fitnet_stages = (0, 1)
  m = fitnet.FitNet(c, models.create('mini_resnet', 10), models.create('mini_convnext', 10))
  with pytest.raises(ValueError, match='fitnet_stages'):
    m.net([(8, 8, 8)] * 4, [(8, 8, 16)] * 4)


# ---------------------------------------------------------------------------
# Numerics of each aligner kind against the PyTorch re-statement (weights copied).
# (pat_jax student shape, pat_jax teacher shape, kind, num_tokens_s, num_tokens_t):
# num_tokens 0 is timm 0.6.5's behaviour; where it crashes the original, 1 is used.

KIND_CASES = {
    'conv': ((8, 8, 6), (8, 8, 10), 0, 0),
    'patch_embed': ((8, 8, 6), (17, 10), 0, 0),        # cls first, dropped by the sqrt rule
    'conv_merge': ((2, 2, 6), (17, 10), 0, 1),         # num_tokens=0 asserts in MyPatchMerging
    'linear_unpatchify': ((17, 10), (8, 8, 6), 0, 0),
    'merge_conv': ((17, 10), (2, 2, 6), 0, 0),
    'linear_expand': ((16, 10), (64, 5), 0, 0),
    'merge_linear': ((65, 8), (16, 12), 1, 0),         # num_tokens=0 fails `65 % 16 == 0`
}


def test_every_kind_is_covered():
  assert sorted(KIND_CASES) == sorted(fitnet.KINDS)


@pytest.mark.parametrize('kind', sorted(KIND_CASES))
def test_aligner_matches_the_torch_original(kind):
  shape_s, shape_t, nt_s, nt_t = KIND_CASES[kind]
  assert fitnet.plan_stage(shape_s, shape_t).kind == kind
  torch.manual_seed(0)
  tstage = torch_stage(_torch_shape(shape_s), _torch_shape(shape_t), nt_s, nt_t)
  net = fitnet.FitNetAligners([shape_s], [shape_t], stages=(1,))
  rng = np.random.default_rng(0)
  f_s = rng.standard_normal((3,) + shape_s).astype(np.float32)
  f_t = rng.standard_normal((3,) + shape_t).astype(np.float32)

  flax_init = jax.eval_shape(net.init, jax.random.PRNGKey(0), [f_s], [f_t])['params']
  params = _flax_params_from_torch({1: tstage})
  # The Flax names are the original's state-dict keys (convert.timm_to_flat maps them).
  assert jax.tree_util.tree_map(lambda a: a.shape, params) == jax.tree_util.tree_map(
      lambda a: a.shape, flax.core.unfreeze(flax_init))
  out = jax.jit(net.apply)({'params': params}, [f_s], [f_t])
  with torch.no_grad():
    a_ref, t_ref, mse_ref = torch_forward(tstage, _to_torch(f_s), _to_torch(f_t))
  np.testing.assert_allclose(np.asarray(out['aligned'][0]), _from_torch(a_ref), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out['targets'][0]), _from_torch(t_ref))
  np.testing.assert_allclose(float(out['loss']), float(mse_ref), rtol=1e-5)
  grads = jax.grad(lambda p: net.apply({'params': p}, [f_s], [f_t])['loss'])(params)
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads))

  if max(nt_s, nt_t):  # Q9: under timm 0.6.5 (num_tokens = 0) the original asserts here
    with pytest.raises(AssertionError):
      torch_forward(torch_stage(_torch_shape(shape_s), _torch_shape(shape_t)),
                    _to_torch(f_s), _to_torch(f_t))


def test_stage_losses_are_summed_and_stages_select():
  shapes_s = [(4, 4, 3), (2, 2, 5), (16, 6), (2, 2, 2)]
  shapes_t = [(4, 4, 4), (2, 2, 6), (16, 7), (2, 2, 3)]
  rng = np.random.default_rng(1)
  f_s = [rng.standard_normal((2,) + s).astype(np.float32) for s in shapes_s]
  f_t = [rng.standard_normal((2,) + s).astype(np.float32) for s in shapes_t]
  full = fitnet.FitNetAligners(shapes_s, shapes_t)
  v = full.init(jax.random.PRNGKey(0), f_s, f_t)
  out = full.apply(v, f_s, f_t)
  np.testing.assert_allclose(float(out['loss']), float(sum(out['mse'])), rtol=1e-6)
  part = fitnet.FitNetAligners(shapes_s, shapes_t, stages=(2, 4))
  p = {k: v['params'][k] for k in ('projector_2', 'projector_4')}
  assert set(jax.eval_shape(part.init, jax.random.PRNGKey(0), f_s, f_t)['params']) == set(p)
  np.testing.assert_allclose(float(part.apply({'params': p}, f_s, f_t)['loss']),
                             float(out['mse'][1] + out['mse'][3]), rtol=1e-6)


def test_init_is_init_weights():
  """Conv kernels N(0, 2/fan_out), conv biases U(+-1/sqrt(fan_in)), Linear N(0, 0.02^2) / 0."""
  net = fitnet.FitNetAligners([(16, 16, 64), (256, 32), (2, 2, 64)], [(16, 16, 128), (16, 16, 32), (16, 32)],
                              stages=(1, 2, 3))
  f = lambda shapes: [jnp.zeros((1,) + s) for s in shapes]  # pylint: disable=unnecessary-lambda-assignment
  p = jax.jit(net.init)(jax.random.PRNGKey(0), f(net.student_shapes), f(net.teacher_shapes))['params']
  assert [pl.kind for pl in net.plans().values()] == ['conv', 'linear_unpatchify', 'conv_merge']
  k = np.asarray(p['projector_1']['aligner']['kernel'])
  assert abs(k.std() - math.sqrt(2 / 128)) < 0.05 * math.sqrt(2 / 128) and abs(k.mean()) < 0.01
  lin = p['projector_2']['aligner_0']
  assert abs(float(lin['kernel'].std()) - 0.02) < 0.002 and not np.any(np.asarray(lin['bias']))
  conv = p['projector_3']['aligner_0']  # Conv2d(64, 32*4, 1) with bias
  assert abs(float(conv['kernel'].std()) - math.sqrt(2 / 128)) < 0.1 * math.sqrt(2 / 128)
  b = np.asarray(conv['bias'])
  assert np.all(np.abs(b) <= 1 / 8) and b.std() > 0.03


# ---------------------------------------------------------------------------
# The method on the mini models.

@pytest.mark.parametrize('student,teacher,kinds', [
    ('mini_deit', 'mini_convnext', ['linear_unpatchify', 'merge_conv', 'merge_conv', 'merge_conv']),
    ('mini_resnet', 'mini_deit', ['patch_embed', 'conv_merge', 'conv_merge', 'conv_merge']),
    ('mini_deit', 'mini_resmlp', ['merge_linear'] * 4),
    ('mini_resnet', 'mini_convnext', ['conv'] * 4),
])
def test_mini_pairs_kinds(student, teacher, kinds):
  sm, tm = models.create(student, 10), models.create(teacher, 10)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  sv = jax.eval_shape(functools.partial(sm.init, train=False), jax.random.PRNGKey(0), x)
  tv = jax.eval_shape(functools.partial(tm.init, train=False), jax.random.PRNGKey(0), x)
  method = fitnet.FitNet(_config(), sm, tm)
  assert [p.kind for p in method.net(*method.stage_shapes(x, sv, tv)).plans().values()] == kinds


def test_method_step_with_a_cls_token_student():
  """DeiT student (cls first) -> ResMLP teacher: terms, cls dropped, gradients reach every aligner."""
  c = _config()
  c.method.kd_temperature = 4.0
  sm, tm = models.create('mini_deit', 10), models.create('mini_resmlp', 10)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
  sv = jax.jit(functools.partial(sm.init, train=False))(jax.random.PRNGKey(0), x)
  tv = jax.jit(functools.partial(tm.init, train=False))(jax.random.PRNGKey(1), x)
  method = fitnet.FitNet(c, sm, tm)
  m_params, _, state = jax.jit(method.init)(jax.random.PRNGKey(2), x, sv, tv)
  params = {'student': sv['params'], 'method': m_params}
  stats = {'student': sv.get('batch_stats', {}), 'method': {}}
  batch = {'image': x, 'label': jax.nn.one_hot(jnp.arange(4), 10)}

  def loss(p, v):
    out = method(p, stats, state, v, batch, jax.random.PRNGKey(3))
    return sum(out.terms.values()), (out.terms, out.logits)
  (total, (terms, logits)), (grads, grads_t) = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, tv)
  assert set(terms) == {'ce', 'kd', 'fitnet'} and np.isfinite(float(total))
  # The terms, recomputed by hand: the student's and teacher's stage taps without the cls token.
  (_, fs), (lt, ft) = jax.jit(lambda: (sm.apply(sv, x, return_features=True),
                                       tm.apply(tv, x, return_features=True)))()
  net = method.net([f.shape[1:] for f in fs], [f.shape[1:] for f in ft])
  fit = net.apply({'params': m_params}, [f[:, 1:] for f in fs], ft)['loss']
  np.testing.assert_allclose(float(terms['fitnet']), float(fit), rtol=1e-5)
  np.testing.assert_allclose(float(terms['kd']), float(fitnet.losses.kd_loss(logits, lt, 4.0)), rtol=1e-5)
  assert not any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads_t))  # frozen teacher
  for path, g in flax.traverse_util.flatten_dict(grads['method']).items():
    assert np.any(np.asarray(g) != 0), path


# ---------------------------------------------------------------------------
# One train step through the real trainer, on 1 and 8 devices.

def _run_step(monkeypatch, n_devices, teacher, teacher_vars, batch_np):
  assert registry.METHODS['fitnet'] is fitnet.FitNet  # registered for configs too
  c = _config()
  c.model.name, c.teacher.name = 'mini_resnet', 'mini_convnext'
  c.dataset.image_size, c.batch_size = 32, 8
  c.optim.weight_decay = 0.0  # so that a changed aligner parameter means a gradient reached it
  mesh = sharding.make_mesh(n_devices)
  trainer = train.make_trainer(c, mesh, num_classes=10, steps_per_epoch=10, teacher=teacher,
                               teacher_vars=teacher_vars)
  state = trainer.init(jax.random.PRNGKey(0))
  before = jax.device_get(state.params['method'])
  state, metrics = trainer.train_step(state, sharding.global_batch(batch_np, mesh), teacher_vars)
  return before, jax.device_get(state.params['method']), jax.device_get(metrics)


def test_train_step_through_the_trainer_on_1_and_8_devices(monkeypatch):
  teacher = models.create('mini_convnext', num_classes=10)
  teacher_vars = jax.jit(teacher.init)(jax.random.PRNGKey(7), np.zeros((1, 32, 32, 3), np.float32))
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((8, 32, 32, 3)).astype(np.float32),
           'label': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)] * 0.9 + 0.01}
  runs = {n: _run_step(monkeypatch, n, teacher, teacher_vars, batch) for n in (1, 8)}
  before, after, m = runs[1]
  assert {'loss_ce', 'loss_kd', 'loss_fitnet'} <= set(m)
  for k in ('train_loss', 'loss_ce', 'loss_kd', 'loss_fitnet'):
    assert np.isfinite(m[k]), k
  assert m['loss_fitnet'] > 0
  np.testing.assert_allclose(m['train_loss'], m['loss_ce'] + m['loss_kd'] + m['loss_fitnet'], rtol=1e-6)
  assert set(before) == {f'projector_{s}' for s in (1, 2, 3, 4)}
  for path, b in flax.traverse_util.flatten_dict(before).items():
    a = flax.traverse_util.flatten_dict(after)[path]
    assert np.any(np.asarray(a) != np.asarray(b)), path
  for k in ('train_loss', 'loss_ce', 'loss_kd', 'loss_fitnet', 'grad_norm'):
    np.testing.assert_allclose(runs[8][2][k], m[k], rtol=0, atol=1e-5, err_msg=k)
  for x, y in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(runs[8][1])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
