"""The model zoo's calling convention: registry, stage taps, hooks, train mode, BatchNorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pat_jax import models, timm_zoo
from pat_jax.models import convnext, layers

MINI = ['mini_resnet', 'mini_resnet_bottleneck', 'mini_convnext', 'mini_deit', 'mini_resmlp']
FULL = ['resnet18', 'resnet34', 'resnet50', 'convnext_tiny', 'deit_tiny_patch16_224',
        'vit_small_patch16_224', 'resmlp_12_224']


def _init(name, size=32, num_classes=10, **overrides):
  model = models.create(name, num_classes=num_classes, **overrides)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, size, size, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
  return model, variables, x


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet19'.*resnet18.*resnet34"):
    models.create('resnet19', num_classes=10)


def test_unknown_override_lists_valid_options():
  with pytest.raises(ValueError, match=r"no option\(s\) \['depthh'\].*drop_path_rate"):
    models.create('mini_deit', num_classes=10, depthh=3)


@pytest.mark.parametrize('name', FULL)
def test_parameter_count_equals_timm(name):
  model = models.create(name, num_classes=100)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  ours = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes['params']))
  theirs = sum(p.numel() for p in timm_zoo.create(name, 100).parameters())
  assert ours == theirs


# Stage shapes at the original code's stage_info taps (official-pat-code.md section 2), 224x224.
@pytest.mark.parametrize('name,shapes', [
    ('resnet18', [(56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512)]),
    ('resnet50', [(56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)]),
    ('convnext_tiny', [(56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768)]),
    ('deit_tiny_patch16_224', [(197, 192)] * 4),
    ('vit_small_patch16_224', [(197, 384)] * 4),
    ('resmlp_12_224', [(196, 384)] * 4),
])
def test_stage_tap_shapes_match_the_original(name, shapes):
  model = models.create(name, num_classes=100)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  logits, feats = jax.eval_shape(
      lambda v, x: model.apply(v, x, return_features=True), variables, x)
  assert logits.shape == (2, 100)
  assert [f.shape[1:] for f in feats] == shapes


@pytest.mark.parametrize('name', MINI)
def test_stage_hook_sees_each_stage_input_and_changes_output(name):
  model, variables, x = _init(name)
  seen = []

  def record(i, h):
    seen.append((i, h.shape))
    return h

  plain, feats = model.apply(variables, x, return_features=True)
  same = model.apply(variables, x, stage_hook=record)
  np.testing.assert_array_equal(plain, same)
  assert [i for i, _ in seen] == [0, 1, 2, 3]
  # Stage i > 0 starts from stage i-1's output.
  for (_, shape), f in zip(seen[1:], feats[:-1]):
    assert shape == f.shape
  # Not a constant shift or scale: ConvNeXt's downsample LayerNorm would cancel those.
  _, shifted = model.apply(variables, x, return_features=True,
                           stage_hook=lambda i, h: h + 0.5 * (i == 2) * jnp.tanh(h))
  np.testing.assert_array_equal(shifted[1], feats[1])  # before the hooked stage: untouched
  assert np.abs(np.asarray(shifted[3]) - np.asarray(feats[3])).max() > 1e-3


@pytest.mark.parametrize('name', MINI)
def test_train_mode_runs_with_drop_path_and_updates_batch_stats(name):
  model, variables, x = _init(name, drop_path_rate=0.5)
  out, updates = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)},
                             mutable=['batch_stats'])
  assert out.shape == (2, 10) and np.all(np.isfinite(out))
  if 'batch_stats' in variables:
    before = variables['batch_stats']['bn1']
    after = updates['batch_stats']['bn1']
    assert int(after['num_batches_tracked']) == 1
    assert not np.allclose(before['mean'], after['mean'])
  # Eval mode is deterministic and needs no rng.
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_vit_rejects_inputs_of_another_size():
  model, variables, _ = _init('mini_deit')
  with pytest.raises(ValueError, match='img_size=64'):
    model.apply(variables, jnp.zeros((1, 64, 64, 3)))


def test_batchnorm_matches_torch_train_mode():
  x = np.random.default_rng(0).standard_normal((4, 5, 5, 3)).astype(np.float32) * 2 + 1
  bn = layers.BatchNorm()
  variables = bn.init(jax.random.key(0), x)
  y, upd = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  tbn = torch.nn.BatchNorm2d(3).train()
  ty = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(y, ty, atol=1e-5)
  stats = upd['batch_stats']
  np.testing.assert_allclose(stats['mean'], tbn.running_mean.numpy(), atol=1e-6)
  # PyTorch updates the running variance with the unbiased batch variance.
  np.testing.assert_allclose(stats['var'], tbn.running_var.numpy(), atol=1e-6)
  assert int(stats['num_batches_tracked']) == int(tbn.num_batches_tracked)


def test_drop_path_drops_whole_samples_and_rescales():
  x = jnp.ones((1000, 4))
  y = layers.DropPath(0.25).apply({}, x, train=True, rngs={'dropout': jax.random.key(0)})
  kept = np.asarray(y[:, 0]) > 0
  assert 0.7 < kept.mean() < 0.8
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75)
  assert np.all(np.asarray(y)[~kept] == 0)


def test_sharded_batch_gives_global_batchnorm_statistics():
  """Under jit with the batch split over 8 devices, BN uses the global batch (DESIGN 3)."""
  model, variables, _ = _init('mini_resnet')
  x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 32, 32, 3)), jnp.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  assert len(jax.devices()) == 8
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  ref_out, ref_upd = step(variables, x)
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  out, upd = step(variables, xs)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  chex_tree = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a, np.float64) - b).max(),
                                     upd, ref_upd)
  assert max(jax.tree_util.tree_leaves(chex_tree)) < 1e-5


def test_scanned_convnext_stages_equal_the_unrolled_blocks():
  """Eval mode runs each ConvNeXt stage's blocks as one lax.scan over their stacked weights
  (scan_blocks=True, teacher.scan_blocks): the same parameters, outputs, stage taps and
  gradients (to the input and to every weight) as the unrolled blocks, with and without remat."""
  for remat in (False, True):
    _check_scanned_convnext(remat)


def _check_scanned_convnext(remat):
  scanned = models.create('mini_convnext', num_classes=10, remat=remat, scan_blocks=True)
  unrolled = models.create('mini_convnext', num_classes=10, remat=remat)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = scanned.init(jax.random.key(1), x)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      unrolled.init(jax.random.key(1), x))

  def loss(model, v, x):
    logits, feats = model.apply(v, x, train=False, return_features=True)
    return jnp.sum(logits ** 2) + sum(jnp.sum(jnp.sin(f)) for f in feats)

  with jax.default_matmul_precision('highest'):
    fns = [jax.jit(jax.value_and_grad(lambda v, x, m=m: loss(m, v, x), argnums=(0, 1)))
           for m in (scanned, unrolled)]
    (a, b) = [f(variables, x) for f in fns]
    assert 'while' in jax.jit(lambda v, x: loss(scanned, v, x)).lower(variables, x).as_text()
  for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-5,
                               atol=1e-6 * float(np.abs(q).max()))
  # The same with the blocks stacked once beforehand (train.teacher_layout): the weights'
  # gradients come stacked the same way.
  stacked = convnext.stack_blocks(variables)
  assert 'blocks' in stacked['params']['stages_2'] and 'blocks_0' in stacked['params']['stages_0']
  with jax.default_matmul_precision('highest'):
    loss_s, (g_vars, g_x) = fns[0](stacked, x)
  (loss_u, (u_vars, u_x)) = b
  want = [loss_u, convnext.stack_blocks(u_vars), u_x]
  for p, q in zip(jax.tree_util.tree_leaves([loss_s, g_vars, g_x]), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-5,
                               atol=1e-6 * float(np.abs(q).max()))


def test_scanned_convnext_keeps_only_what_the_backward_pass_needs():
  """lax.scan stacks every value its body hands to the backward pass, and XLA cannot drop or
  recompute them across the loop as it does in the unrolled network. For input gradients
  through a frozen scanned stage (the prompted teacher), each block keeps its depthwise output
  and first MLP product only: not the depthwise input (kept for a kernel gradient nobody takes)
  nor the LayerNorm's element-wise intermediates (recomputed). Before: five per block, +20% of
  the teacher's activation memory."""
  model = models.create('mini_convnext', num_classes=10, scan_blocks=True)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = convnext.stack_blocks(model.init(jax.random.key(1), x))
  f = lambda x: jnp.sum(model.apply(variables, x, train=False))
  jaxpr = jax.make_jaxpr(lambda x: jax.vjp(f, x)[1](1.0))(x).jaxpr
  forward_scan = next(e for e in jaxpr.eqns if e.primitive.name == 'scan')  # stage 2, 2 blocks
  saved = [v.aval.shape for v in forward_scan.outvars[1:] if len(v.aval.shape) == 5]
  assert sorted(saved) == [(2, 2, 2, 2, 32), (2, 2, 2, 2, 128)], saved
