"""PAT modules beyond the golden vectors: quirk switches, real-pair shapes and parameter
counts, initialisers, gradients, and jit on a batch sharded over 8 devices."""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pat_jax.distill import losses
from pat_jax.distill import pat_modules as pm


def _rand(key, shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _init(module, *args, seed=0, **kw):
  """module.init under jit (one compile instead of op-by-op dispatch)."""
  return jax.jit(functools.partial(module.init, **kw))(jax.random.key(seed), *args)


def _apply(module, variables, *args, **kw):
  return jax.jit(functools.partial(module.apply, **kw))(variables, *args)


def _with_beta(variables, beta):
  params = flax.core.unfreeze(variables['params'])
  params['beta'] = jnp.full((1,), beta, jnp.float32)
  return {**variables, 'params': params}


# ---------------------------------------------------------------------------
# Resampling, pooling, losses.

@pytest.mark.parametrize('n_in,n_out,want', [
    (4, 7, [0, 0, 1, 1, 2, 2, 3]),
    (7, 10, [0, 0, 1, 2, 2, 3, 4, 4, 5, 6]),
    (6, 14, [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5]),
    # src = floor(i*in/out) duplicates cell 0 for 7->8 (and cells 0 and 7 for 14->16),
    # as torch.nn.functional.interpolate(mode='nearest') does: not the last cell.
    (7, 8, [0, 0, 1, 2, 3, 4, 5, 6]),
    (14, 16, [0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11, 12, 13]),
    (4, 14, [0] * 4 + [1] * 3 + [2] * 4 + [3] * 3),
])
def test_nearest_resize_legacy_indices(n_in, n_out, want):
  x = jnp.arange(n_in, dtype=jnp.float32)
  grid = x[None, :, None, None] * 100 + x[None, None, :, None]
  y = pm.nearest_resize_legacy(grid, n_out)
  np.testing.assert_array_equal(y[0, :, 0, 0], np.array(want) * 100.0)
  np.testing.assert_array_equal(y[0, 0, :, 0], np.array(want, np.float32))


def test_adaptive_avg_pool_overlapping_windows():
  x = jnp.arange(7, dtype=jnp.float32)[None, :, None, None] * jnp.ones((1, 7, 7, 1))
  y = losses.adaptive_avg_pool(x, 4)
  np.testing.assert_allclose(y[0, :, 0, 0], [0.5, 2.0, 4.0, 5.5])   # [0,2) [1,4) [3,6) [5,7)


def test_hcl_skips_levels_without_halving():
  fs, ft = _rand(0, (2, 3, 3, 5)), _rand(1, (2, 3, 3, 5))
  mse = lambda a, b: jnp.mean(jnp.square(a - b))
  want = (mse(fs, ft) + 0.5 * mse(losses.adaptive_avg_pool(fs, 2), losses.adaptive_avg_pool(ft, 2))
          + 0.25 * mse(fs.mean((1, 2)), ft.mean((1, 2)))) / 1.75
  np.testing.assert_allclose(losses.hcl_loss(fs, ft), want, rtol=1e-6)
  # A (B, L, D) sequence is the row-major (B, h, h, D) map.
  s, t = _rand(2, (2, 49, 4)), _rand(3, (2, 49, 4))
  np.testing.assert_allclose(losses.hcl_loss(s, t),
                             losses.hcl_loss(s.reshape(2, 7, 7, 4), t.reshape(2, 7, 7, 4)), rtol=1e-6)


def test_kd_and_soft_target_ce():
  zs, zt = _rand(0, (4, 10)), _rand(1, (4, 10))
  assert float(losses.kd_loss(zt, zt, 4.0)) == pytest.approx(0.0, abs=1e-6)
  onehot = jax.nn.one_hot(jnp.array([1, 2, 3, 4]), 10)
  ce = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(zs), -1))
  np.testing.assert_allclose(losses.soft_target_cross_entropy(zs, onehot), ce, rtol=1e-6)
  assert losses.kd_loss(zs.astype(jnp.bfloat16), zt, 2.0).dtype == jnp.float32


# ---------------------------------------------------------------------------
# Q1: seq_layout.

@pytest.mark.parametrize('length', [49, 50])
@pytest.mark.parametrize('with_feedback', [False, True])
def test_seq_layout_transpose_is_identity_at_beta0(length, with_feedback):
  x, fb = _rand(0, (2, length, 32)), _rand(1, (2, 49, 32))
  args = (x, fb) if with_feedback else (x,)
  good = pm.PromptBlock((49, 32), (length, 32), seq_layout='transpose')
  bug = pm.PromptBlock((49, 32), (length, 32))
  variables = _init(good, *args, train=True)
  assert float(variables['params']['beta'][0]) == 0.0          # beta initialised to 0
  y_good, _ = _apply(good, variables, *args, train=True, mutable=['batch_stats'])
  y_bug, _ = _apply(bug, variables, *args, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(y_good, x)
  # The faithful default scrambles tokens and channels even at beta == 0 ...
  assert not np.allclose(y_bug, x)
  # ... exactly as `transpose(grid, (0, 3, 1, 2)).reshape(B, h*w, D)`, cls re-appended last.
  grid = x[:, :49].reshape(2, 7, 7, 32)
  want = jnp.transpose(grid, (0, 3, 1, 2)).reshape(2, 49, 32)
  want = jnp.concatenate([want, x[:, 49:]], axis=1)
  np.testing.assert_array_equal(y_bug, want)


def test_cnn_prompt_block_is_identity_at_beta0():
  x, fb = _rand(0, (2, 8, 8, 32)), _rand(1, (2, 4, 4, 48))
  block = pm.PromptBlock((4, 4, 48), (8, 8, 32))
  variables = block.init(jax.random.key(0), x, fb, train=True)
  y, _ = block.apply(variables, x, fb, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(y, x)


# ---------------------------------------------------------------------------
# Q2: se_mode.

def test_se_mode_scale_returns_x_times_gate():
  x = _rand(0, (3, 5, 5, 32))
  gate_mod, scale_mod = pm.SEBlock(32), pm.SEBlock(32, se_mode='scale')
  variables = gate_mod.init(jax.random.key(1), x)
  gate = gate_mod.apply(variables, x)
  assert gate.shape == (3, 1, 1, 32)
  assert np.all((gate > 0) & (gate < 1))
  np.testing.assert_allclose(scale_mod.apply(variables, x), x * gate, rtol=1e-6)


def test_se_mode_scale_gives_spatial_prompt():
  x = _rand(0, (2, 6, 6, 32))
  kw = dict(in_shape=(6, 6, 32), out_shape=(6, 6, 32))
  gate_blk, scale_blk = pm.PromptBlock(**kw), pm.PromptBlock(**kw, se_mode='scale')
  variables = _with_beta(gate_blk.init(jax.random.key(0), x, train=True), 1.0)
  d_gate = gate_blk.apply(variables, x, train=True, mutable=['batch_stats'])[0] - x
  d_scale = scale_blk.apply(variables, x, train=True, mutable=['batch_stats'])[0] - x
  # Faithful: the prompt is a per-sample per-channel offset, constant over space.
  np.testing.assert_allclose(d_gate, jnp.broadcast_to(d_gate[:, :1, :1], d_gate.shape), atol=1e-6)
  assert float(jnp.abs(d_scale - d_scale[:, :1, :1]).max()) > 1e-3


# ---------------------------------------------------------------------------
# Q3: pos_encoding.

def _raa_outputs(pos_encoding, feats, variables=None):
  shapes = [f.shape[1:] for f in feats]
  module = pm.RegionAttention(shapes, dim=64, heads=8, pos_encoding=pos_encoding)
  if variables is None:
    variables = _init(module, feats)
  return jnp.stack(_apply(module, variables, feats)), variables


def test_pos_encoding_token_is_batch_permutation_equivariant():
  feats = [_rand(0, (4, 28, 28, 8)), _rand(1, (4, 196, 16)), _rand(2, (4, 7, 7, 32)),
           _rand(3, (4, 197, 16))]
  perm = np.array([2, 0, 3, 1])
  permuted = [f[perm] for f in feats]
  out, variables = _raa_outputs('token', feats)
  out_p, _ = _raa_outputs('token', permuted, variables)
  np.testing.assert_allclose(out_p, out[:, perm], atol=1e-5)
  # The faithful batch-index encoding depends on the position in the batch.
  out, _ = _raa_outputs('batch_index', feats, variables)
  out_p, _ = _raa_outputs('batch_index', permuted, variables)
  assert float(jnp.abs(out_p - out[:, perm]).max()) > 1e-3


def test_sinusoid_table_rows():
  pe = pm.sinusoid_table(3, 8)
  np.testing.assert_allclose(pe[0], [0, 1, 0, 1, 0, 1, 0, 1])
  np.testing.assert_allclose(pe[2, 2], math.sin(2 * math.exp(2 * -(math.log(10000.0) / 8))), rtol=1e-6)


# ---------------------------------------------------------------------------
# Q5: cls_token.

def test_cls_token_first_keeps_cls_out_of_the_grid():
  x = _rand(0, (2, 50, 32))
  bump = lambda x, i: x.at[:, i].add(10.0)
  # PromptBlock: the real (first) cls token is set aside and put back in front, untouched.
  blk_first = pm.PromptBlock((49, 32), (50, 32), cls_token='first', seq_layout='transpose')
  variables = _with_beta(blk_first.init(jax.random.key(0), x, train=True), 0.7)
  y, _ = blk_first.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(y[:, 0], x[:, 0])
  y2, _ = blk_first.apply(variables, bump(x, 0), train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y2[:, 1:], y[:, 1:], atol=1e-6)      # cls does not enter the grid
  blk_last = pm.PromptBlock((49, 32), (50, 32), seq_layout='transpose')
  y, _ = blk_last.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(y[:, -1], x[:, -1])              # faithful: last token aside
  # RAProjector: which token is ignored.
  for mode, ignored, used in (('first', 0, 49), ('last', 49, 0)):
    proj = pm.RAProjector((50, 32), embed_dim=16, cls_token=mode)
    v = proj.init(jax.random.key(0), x)
    e = proj.apply(v, x)
    np.testing.assert_array_equal(proj.apply(v, bump(x, ignored)), e)
    assert not np.allclose(proj.apply(v, bump(x, used)), e)
  # L_FD target: the dropped token.
  t = _rand(1, (2, 197, 12))
  np.testing.assert_array_equal(pm.drop_cls(t, 'first'), t[:, 1:])
  np.testing.assert_array_equal(pm.drop_cls(t), t[:, :-1])


def test_feature_loss_target_drop_follows_cls_token():
  feats_s = [_rand(i, (2, 197, 16)) for i in range(4)]
  feats_t = [_rand(10 + i, (2, 197, 12)) for i in range(4)]
  for mode, sl in (('last', slice(0, 196)), ('first', slice(1, 197))):
    m = pm.PATFeatureLoss([(197, 16)] * 4, [(196, 12)] * 4, dim=32, heads=4, cls_token=mode)
    variables = _init(m, feats_s, feats_t)
    res, _ = _apply(m, variables, feats_s, feats_t, mutable=['batch_stats'])
    for s in range(4):
      np.testing.assert_array_equal(res['targets'][s], feats_t[s][:, sl])
      np.testing.assert_allclose(res['hcl'][s], losses.hcl_loss(res['aligned'][s], feats_t[s][:, sl]),
                                 rtol=1e-6)
    np.testing.assert_allclose(res['loss'], sum(res['hcl']), rtol=1e-6)


# ---------------------------------------------------------------------------
# Shapes and parameter counts of the paper's pairs (§1.4-1.6 of the code audit).

@pytest.mark.parametrize('oc,count', [(96, 286_765), (192, 1_140_313), (384, 4_547_761),
                                      (768, 18_164_065)])
def test_prompt_block_parameter_count(oc, count):
  x = jax.ShapeDtypeStruct((1, 7, 7, oc), jnp.float32)
  v = jax.eval_shape(lambda x: pm.PromptBlock((7, 7, oc), (7, 7, oc)).init(jax.random.key(0), x), x)
  assert _count(v['params']) == count
  assert 'fb_aligner' not in v['params'] and 'batch_stats' not in v


def _convnext_prompts():
  """ConvNeXt-T teacher: feedback = stage outputs, x = stage inputs (§1.5)."""
  outs = [(56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768)]
  ins = [(56, 56, 96), (56, 56, 96), (28, 28, 192), (14, 14, 384)]
  return outs, ins


def test_convnext_teacher_prompts_and_deit_student_shapes():
  outs, ins = _convnext_prompts()
  total = 0
  for s, (fb_shape, x_shape) in enumerate(zip(outs, ins)):
    blk = pm.PromptBlock(fb_shape, x_shape)
    x = jax.ShapeDtypeStruct((2,) + x_shape, jnp.float32)
    fb = jax.ShapeDtypeStruct((2,) + fb_shape, jnp.float32)
    v = jax.eval_shape(lambda x, fb: blk.init(jax.random.key(0), x, fb, train=True), x, fb)
    assert ('fb_aligner' in v['params']) == (s > 0)
    y = jax.eval_shape(lambda v, x, fb: blk.apply(v, x, fb, train=True, mutable=['batch_stats'])[0],
                       v, x, fb)
    assert y.shape == x.shape
    total += _count(v['params'])
  assert total == 6_651_364                          # "prompts (M) 6.65" for ConvNeXt-T pairs
  # DeiT-T student -> RAA (dim 512) -> ViT2CNN aligners to the ConvNeXt-T stage outputs.
  m = pm.PATFeatureLoss([(197, 192)] * 4, outs)
  fs = [jax.ShapeDtypeStruct((2, 197, 192), jnp.float32)] * 4
  ft = [jax.ShapeDtypeStruct((2,) + o, jnp.float32) for o in outs]
  v = jax.eval_shape(lambda fs, ft: m.init(jax.random.key(0), fs, ft), fs, ft)
  raa = v['params']['attention_blending']
  attn = {k: raa[k] for k in ('norm', 'to_q', 'to_kv')}
  assert _count(attn) == 788_992
  assert _count(raa) == 7_082_496                    # "RAA (M) 7.08" for DeiT-T
  assert raa['projector_s_0']['projector']['proj']['kernel'].shape == (4, 4, 192, 512)
  assert _count({k: v['params'][f'aligners_{k}'] for k in range(4)}) == 741_376  # 0.74 M
  res = jax.eval_shape(lambda v, fs, ft: m.apply(v, fs, ft, mutable=['batch_stats'])[0], v, fs, ft)
  assert [a.shape for a in res['aligned']] == [(2,) + o for o in outs]
  assert all(c.shape == (2, 16, 512) for c in res['chunks'])


def test_swin_teacher_prompts_and_aligners():
  shapes = [(3136, 96), (784, 192), (196, 384), (49, 768)]
  total = 0
  for shp in shapes:
    x = jax.ShapeDtypeStruct((1,) + shp, jnp.float32)
    v = jax.eval_shape(lambda x: pm.PromptBlock(shp, shp).init(jax.random.key(0), x), x)
    total += _count(v['params'])
  assert total == 24_138_904                         # "prompts (M) 24.14" for Swin-T
  aligners = [pm.get_projector((16, 512), s) for s in shapes]
  assert all(isinstance(a, pm.ViT2ViTProjector) for a in aligners)
  n = 0
  for a in aligners:
    x = jax.ShapeDtypeStruct((2, 16, 512), jnp.float32)
    v = jax.eval_shape(lambda x: a.init(jax.random.key(0), x, train=True), x)
    n += _count(v['params'])
  assert n == 812_533                                # "aligners (M) 0.81" for Swin-T


@pytest.mark.parametrize('h,tokens,patch', [(56, 196, 4), (7, 196, 1), (14, 49, 2)])
def test_cnn2vit_projector_shapes(h, tokens, patch):
  proj = pm.get_projector((h, h, 8), (tokens, 24))
  assert isinstance(proj, pm.CNN2ViTProjector)
  x = jax.ShapeDtypeStruct((2, h, h, 8), jnp.float32)
  v = jax.eval_shape(lambda x: proj.init(jax.random.key(0), x), x)
  assert v['params']['proj']['kernel'].shape == (patch, patch, 8, 24)
  y = jax.eval_shape(lambda v, x: proj.apply(v, x), v, x)
  assert y.shape == (2, tokens, 24)


# ---------------------------------------------------------------------------
# Initialisers (§1.7).

def test_initialisers():
  x, fb = _rand(0, (2, 8, 8, 64)), _rand(1, (2, 4, 4, 128))
  p = _init(pm.PromptBlock((4, 4, 128), (8, 8, 64)), x, train=True)['params']
  assert float(p['beta'][0]) == 0.0
  for name, fan_in in (('fusion_block_0', 128), ('fusion_block_1', 64 * 25), ('prompt_block_0', 16),
                       ('prompt_block_1', 25), ('prompt_block_4', 16)):
    bound = 1 / math.sqrt(fan_in)
    for leaf in ('kernel', 'bias'):
      w = np.asarray(p[name][leaf])
      assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound, (name, leaf)
  assert np.abs(p['fusion_block_3']['compress']['kernel']).max() <= 1 / math.sqrt(64)
  # fb_aligner (get_projector -> init_weights): kaiming normal fan_out, BN 1/0.
  k = np.asarray(p['fb_aligner']['conv_1']['kernel'])
  assert k.shape == (1, 1, 128, 64) and abs(k.std() - math.sqrt(2 / 64)) < 0.02
  np.testing.assert_array_equal(p['fb_aligner']['conv_0']['scale'], 1.0)
  np.testing.assert_array_equal(p['fb_aligner']['conv_0']['bias'], 0.0)
  v = _init(pm.get_projector((16, 64), (49, 96)), _rand(2, (2, 16, 64)), train=True)
  w = np.asarray(v['params']['mlp_d_1']['kernel'])
  assert abs(w.std() - 0.02) < 0.002
  np.testing.assert_array_equal(v['params']['mlp_d_1']['bias'], 0.0)
  np.testing.assert_array_equal(v['batch_stats']['mlp_l_0']['num_batches_tracked'], 0)
  r = _init(pm.RegionAttention([(7, 7, 32)] * 4, dim=64), [_rand(3, (2, 7, 7, 32))] * 4)
  r = r['params']
  assert np.abs(r['to_kv']['kernel']).max() <= 1 / 8 and np.abs(r['to_kv']['bias']).max() <= 1 / 8
  assert np.abs(r['projector_s_0']['projector']['proj']['kernel']).max() <= 1 / math.sqrt(32 * 4)
  np.testing.assert_array_equal(r['norm']['scale'], 1.0)


@pytest.mark.parametrize('se_mode', ['gate', 'scale'])
def test_feedback_valid_flag_gives_the_output_without_or_with_feedback(se_mode):
  """A traced `feedback_valid` (a run's first step inside the one train-step program): False
  equals the block without feedback, True the block with it, values and gradients (beta 0.5,
  so that the prompt branch shows; 'gate' takes the nn.cond, 'scale' the jnp.where)."""
  x, fb = _rand(0, (4, 8, 8, 32)), _rand(1, (4, 4, 4, 48))
  blk = pm.PromptBlock((4, 4, 48), (8, 8, 32), se_mode=se_mode)
  variables = _with_beta(_init(blk, x, fb, train=True), 0.5)

  def loss(params, x, feedback, valid):
    y, _ = blk.apply({**variables, 'params': params}, x, feedback, True, valid,
                     mutable=['batch_stats'])
    return jnp.sum(jnp.square(y))

  grad = jax.value_and_grad(loss, argnums=(0, 1))
  with jax.default_matmul_precision('highest'):
    for valid in (False, True):
      want = jax.jit(lambda p, x, v=valid: grad(p, x, fb if v else None, None))(
          variables['params'], x)
      got = jax.jit(lambda p, x, v: grad(p, x, fb, v))(variables['params'], x,
                                                       jnp.asarray(valid))
      jax.tree_util.tree_map(
          lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), want, got)


def test_init_without_feedback_creates_every_parameter():
  x, fb = _rand(0, (2, 8, 8, 32)), _rand(1, (2, 4, 4, 48))
  blk = pm.PromptBlock((4, 4, 48), (8, 8, 32))
  a = jax.tree_util.tree_map(jnp.shape, jax.eval_shape(blk.init, jax.random.key(0), x))
  b = jax.tree_util.tree_map(jnp.shape, jax.eval_shape(blk.init, jax.random.key(0), x, fb))
  assert a == b


# ---------------------------------------------------------------------------
# BatchNorm train/eval, gradients, jit on a sharded batch.

def test_projector_train_updates_stats_eval_uses_them():
  proj = pm.get_projector((16, 32), (7, 7, 8))
  x = _rand(0, (4, 16, 32)) * 3 + 1
  v = proj.init(jax.random.key(0), x, train=True)
  y_train, st = proj.apply(v, x, train=True, mutable=['batch_stats'])
  assert int(st['batch_stats']['conv_0']['num_batches_tracked']) == 1
  assert not np.allclose(st['batch_stats']['conv_0']['mean'], 0.0)
  y_eval = proj.apply(v, x, train=False)       # running stats 0/1: no normalisation
  assert not np.allclose(y_eval, y_train)


def test_gradient_reaches_every_prompt_block_parameter():
  x, fb = _rand(0, (4, 14, 14, 64)), _rand(1, (4, 7, 7, 96))
  blk = pm.PromptBlock((7, 7, 96), (14, 14, 64))
  variables = _with_beta(_init(blk, x, fb, train=True), 0.5)

  def loss(params):
    y, _ = blk.apply({**variables, 'params': params}, x, fb, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.square(y))

  grads = jax.jit(jax.grad(loss))(variables['params'])
  flat = flax.traverse_util.flatten_dict(grads)
  assert ('fb_aligner', 'conv_1', 'kernel') in flat and ('beta',) in flat
  for path, g in flat.items():
    assert np.all(np.isfinite(g)), path
    assert float(jnp.abs(g).max()) > 0, f'no gradient reaches {"/".join(path)}'


def test_jit_on_sharded_batch_matches_single_device():
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ('data',))
  batch = NamedSharding(mesh, P('data'))
  b = 16
  feats_s = [_rand(0, (b, 28, 28, 8)), _rand(1, (b, 14, 14, 16)), _rand(2, (b, 197, 24)),
             _rand(3, (b, 4, 4, 32))]
  feats_t = [_rand(4, (b, 14, 14, 12)), _rand(5, (b, 197, 32)), _rand(6, (b, 7, 7, 24)),
             _rand(7, (b, 4, 48))]
  m = pm.PATFeatureLoss([f.shape[1:] for f in feats_s], [(14, 14, 12), (196, 32), (7, 7, 24), (4, 48)],
                        dim=64, heads=8)
  blk = pm.PromptBlock((196, 32), (197, 32))   # a ViT-like teacher stage with its prompt
  variables = _init(m, feats_s, feats_t)
  pvars = _with_beta(_init(blk, feats_t[1], feats_t[1][:, :196], seed=1), 0.7)

  def step(variables, pvars, feats_s, feats_t):
    t1, _ = blk.apply(pvars, feats_t[1], feats_t[1][:, :196], train=True, mutable=['batch_stats'])
    res, state = m.apply(variables, feats_s, [feats_t[0], t1] + list(feats_t[2:]), train=True,
                         mutable=['batch_stats'])
    return res['loss'], res['aligned'], state

  want = jax.jit(step)(variables, pvars, feats_s, feats_t)
  shard = lambda xs: [jax.device_put(x, batch) for x in xs]
  sharded_s, sharded_t = shard(feats_s), shard(feats_t)
  assert len(sharded_s[0].sharding.device_set) == 8
  got = jax.jit(step)(variables, pvars, sharded_s, sharded_t)
  assert len(got[1][0].sharding.device_set) == 8
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
  assert int(got[2]['batch_stats']['aligners_1']['mlp_d_0']['num_batches_tracked']) == 1
