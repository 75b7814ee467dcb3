"""Optimisers and schedules equal to the original recipe's timm/torch ones (optax only).

- `sgd`: torch SGD(momentum=0.9, nesterov=True) with *coupled* L2 decay (grad += wd * p).
- `adamw`: torch AdamW(0.9, 0.999, eps=1e-8) with *decoupled* decay (p -= lr * wd * p).
- No decay for parameters with ndim <= 1 (norm affines, biases, PAT's beta), as timm's
  param_groups_weight_decay. The original decays the student's cls/pos tables (the distiller
  has no no_weight_decay(); official-pat-code.md section 1.8): `optim.decay_pos_embed=True`
  (default) reproduces that, False exempts them as plain timm training does.
- Global-norm clipping before the update when `optim.clip_grad > 0`.
- timm CosineLRScheduler with t_in_epochs=True: the lr is constant within an epoch,
  warms up linearly from `warmup_lr` over `warmup_epochs`, and the cosine counts from
  epoch 0 (not shifted by the warmup). `optim.per_step_schedule=True` evaluates the same
  formula at fractional epochs instead.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from pat_jax import errors

NAMES = ('sgd', 'adamw')
SCHEDULES = ('cosine', 'step')

_NO_DECAY_TABLES = ('cls_token', 'pos_embed', 'dist_token', 'relative_position_bias_table')


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='sgd', lr=0.05, weight_decay=2e-3, momentum=0.9,
      warmup_epochs=3, warmup_lr=1e-4, min_lr=1e-3, clip_grad=0.0,
      decay_pos_embed=True, per_step_schedule=False,
      schedule='cosine', decay_epochs=30, decay_rate=0.1))  # 'step': imagenet/cnn.yaml


def cosine_lr(epoch, *, lr, min_lr, warmup_lr, warmup_epochs, num_epochs):
  """timm CosineLRScheduler._get_lr at (possibly fractional) epoch `epoch`."""
  epoch = jnp.asarray(epoch, jnp.float32)
  warm = warmup_lr + epoch * (lr - warmup_lr) / max(warmup_epochs, 1)
  cos = min_lr + 0.5 * (lr - min_lr) * (1 + jnp.cos(math.pi * epoch / num_epochs))
  cos = jnp.where(epoch >= num_epochs, min_lr, cos)  # past the cycle: timm returns lr_min
  return jnp.where(epoch < warmup_epochs, warm, cos)


def step_lr(epoch, *, lr, warmup_lr, warmup_epochs, decay_epochs, decay_rate):
  """timm StepLRScheduler._get_lr: lr * decay_rate ** (epoch // decay_epochs) after warm-up."""
  epoch = jnp.asarray(epoch, jnp.float32)
  warm = warmup_lr + epoch * (lr - warmup_lr) / max(warmup_epochs, 1)
  return jnp.where(epoch < warmup_epochs, warm, lr * decay_rate ** jnp.floor(epoch / decay_epochs))


def schedule(cfg, num_epochs: int, steps_per_epoch: int):
  """step -> learning rate."""
  if cfg.get('schedule', 'cosine') not in SCHEDULES:
    raise errors.ConfigError(f"Unknown optim.schedule {cfg.schedule!r}: use 'cosine' or 'step'.")

  def fn(step):
    epoch = step / steps_per_epoch
    if not cfg.per_step_schedule:
      epoch = jnp.floor(epoch)
    if cfg.get('schedule', 'cosine') == 'step':
      return step_lr(epoch, lr=cfg.lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                     decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate)
    return cosine_lr(epoch, lr=cfg.lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
                     warmup_epochs=cfg.warmup_epochs, num_epochs=num_epochs)
  return fn


def decay_mask(params, decay_pos_embed: bool = True):
  """True for leaves that get weight decay: ndim > 1, optionally minus cls/pos tables."""
  def keep(path, p):
    if p.ndim <= 1:
      return False
    name = str(getattr(path[-1], 'key', path[-1]))
    return decay_pos_embed or name not in _NO_DECAY_TABLES
  return jax.tree_util.tree_map_with_path(keep, params)


def create(cfg, num_epochs: int, steps_per_epoch: int):
  """(optax GradientTransformation, lr schedule) for the config's optimiser."""
  lr = schedule(cfg, num_epochs, steps_per_epoch)
  mask = lambda p: decay_mask(p, cfg.decay_pos_embed)  # pylint: disable=unnecessary-lambda-assignment
  if cfg.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask),
                     optax.sgd(lr, momentum=cfg.momentum, nesterov=True))
  elif cfg.name == 'adamw':
    tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay, mask=mask)
  else:
    raise errors.ConfigError(f"Unknown optim.name {cfg.name!r}: use 'sgd' or 'adamw'.")
  if cfg.clip_grad and cfg.clip_grad > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_grad), tx)
  return tx, lr


def ema_update(ema, new, decay: float):
  """timm ModelEmaV2: ema = d * ema + (1 - d) * model for every float entry; counters copy."""
  def upd(e, n):
    if jnp.issubdtype(n.dtype, jnp.floating):
      return (decay * e + (1 - decay) * n).astype(e.dtype)
    return n
  return jax.tree_util.tree_map(upd, ema, new)
