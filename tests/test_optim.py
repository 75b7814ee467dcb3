"""Schedules and optimiser updates against timm's and torch's own."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from timm.scheduler import CosineLRScheduler

from pat_jax import optim

RECIPES = {  # official-pat-code.md section 3.1
    'cnn': dict(name='sgd', lr=0.05, weight_decay=2e-3, warmup_epochs=3, warmup_lr=1e-4, min_lr=1e-3),
    'vit_mlp': dict(name='adamw', lr=5e-4, weight_decay=0.05, warmup_epochs=20, warmup_lr=5e-7,
                    min_lr=1e-5, clip_grad=5.0),
}


@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_schedule_equals_timm_cosine_per_epoch(recipe):
  cfg = optim.default_config()
  cfg.update(RECIPES[recipe])
  steps_per_epoch, epochs = 390, 300
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
  sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=cfg.min_lr, warmup_t=cfg.warmup_epochs,
                            warmup_lr_init=cfg.warmup_lr, t_in_epochs=True)
  fn = optim.schedule(cfg, epochs, steps_per_epoch)
  for epoch in [0, 1, 2, 3, 4, 19, 20, 21, 150, 298, 299]:
    want = sched._get_lr(epoch)[0]  # pylint: disable=protected-access
    for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + 389):  # constant in the epoch
      np.testing.assert_allclose(float(fn(step)), want, rtol=1e-6, err_msg=f'epoch {epoch}')


def test_step_schedule_equals_timm_step_scheduler():
  """imagenet/cnn.yaml: SGD 0.1, x0.1 every 30 epochs, 3 warm-up epochs from 1e-4."""
  from timm.scheduler import StepLRScheduler
  cfg = optim.default_config()
  cfg.update(dict(lr=0.1, schedule='step', decay_epochs=30, decay_rate=0.1, warmup_epochs=3,
                  warmup_lr=1e-4))
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
  # timm 0.6.5 (the original's) has no warm-up prefix; timm 1.0's class defaults to one.
  sched = StepLRScheduler(opt, decay_t=30, decay_rate=0.1, warmup_t=3, warmup_lr_init=1e-4,
                          warmup_prefix=False, t_in_epochs=True)
  fn = optim.schedule(cfg, 100, 5000)
  for epoch in [0, 1, 2, 3, 29, 30, 59, 60, 99]:
    np.testing.assert_allclose(float(fn(epoch * 5000 + 7)), sched._get_lr(epoch)[0], rtol=1e-6)  # pylint: disable=protected-access


def test_cnn_recipe_values_from_the_spec():
  cfg = optim.default_config()
  fn = optim.schedule(cfg, 300, 390)
  got = [float(fn(e * 390)) for e in (0, 1, 2, 3, 299)]
  np.testing.assert_allclose(got, [1e-4, 0.01673, 0.03337, 0.04999, 0.0010013], rtol=2e-4)


def test_per_step_schedule_interpolates_within_the_epoch():
  cfg = optim.default_config()
  cfg.per_step_schedule = True
  fn = optim.schedule(cfg, 300, 390)
  assert float(fn(0)) < float(fn(195)) < float(fn(390))


def _problem():
  rng = np.random.default_rng(0)
  return {'w': rng.standard_normal((4, 3)).astype(np.float32),
          'b': rng.standard_normal((3,)).astype(np.float32)}, rng.standard_normal((8, 4)).astype(np.float32)


def _torch_run(opt_name, params, x, steps, lr, wd, clip):
  tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  groups = [{'params': [tp['w']], 'weight_decay': wd}, {'params': [tp['b']], 'weight_decay': 0.0}]
  if opt_name == 'sgd':
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
  else:
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
  xt = torch.tensor(x)
  for _ in range(steps):
    opt.zero_grad()
    loss = (torch.tanh(xt @ tp['w'] + tp['b']) ** 2).sum()
    loss.backward()
    if clip:
      torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
    opt.step()
  return {k: v.detach().numpy() for k, v in tp.items()}


@pytest.mark.parametrize('opt_name,clip', [('sgd', 0.0), ('adamw', 0.0), ('adamw', 0.5)])
def test_updates_equal_torch(opt_name, clip):
  params, x = _problem()
  cfg = optim.default_config()
  cfg.update(dict(name=opt_name, lr=0.05, weight_decay=0.1, warmup_epochs=0, min_lr=0.05,
                  clip_grad=clip))
  tx, _ = optim.create(cfg, num_epochs=10, steps_per_epoch=100)
  p = jax.tree_util.tree_map(jnp.asarray, params)
  state = tx.init(p)
  loss = lambda p: jnp.sum(jnp.tanh(x @ p['w'] + p['b']) ** 2)  # pylint: disable=unnecessary-lambda-assignment
  for _ in range(5):
    g = jax.grad(loss)(p)
    upd, state = tx.update(g, state, p)
    p = optax.apply_updates(p, upd)
  want = _torch_run(opt_name, params, x, 5, 0.05, 0.1, clip)
  for k in params:  # torch clips with max_norm / (norm + 1e-6): a 1e-6 relative difference
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_decay_mask_skips_1d_and_optionally_pos_tables():
  params = {'cls_token': jnp.zeros((1, 1, 4)), 'pos_embed': jnp.zeros((1, 5, 4)),
            'blocks_0': {'kernel': jnp.zeros((4, 4)), 'bias': jnp.zeros(4), 'scale': jnp.zeros(4)}}
  faithful = optim.decay_mask(params)
  assert faithful['cls_token'] and faithful['pos_embed'] and faithful['blocks_0']['kernel']
  assert not faithful['blocks_0']['bias'] and not faithful['blocks_0']['scale']
  timm_like = optim.decay_mask(params, decay_pos_embed=False)
  assert not timm_like['cls_token'] and not timm_like['pos_embed'] and timm_like['blocks_0']['kernel']


def test_ema_averages_floats_and_copies_counters():
  ema = {'w': jnp.ones(3), 'num_batches_tracked': jnp.asarray(4, jnp.int32)}
  new = {'w': jnp.zeros(3), 'num_batches_tracked': jnp.asarray(5, jnp.int32)}
  out = optim.ema_update(ema, new, 0.9)
  np.testing.assert_allclose(out['w'], 0.9)
  assert int(out['num_batches_tracked']) == 5
