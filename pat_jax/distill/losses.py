"""Distillation losses, written to match the original PyTorch code (PAT / OFA-KD).

All losses compute in float32 whatever the input dtype. Feature maps are NHWC,
token sequences (B, L, D).
"""
import math
from typing import Sequence

import jax
import jax.numpy as jnp


def soft_target_cross_entropy(logits, targets):
  """timm SoftTargetCrossEntropy: mean over the batch of sum_c -t_c * log_softmax(z)_c."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(-targets.astype(jnp.float32) * logp, axis=-1))


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0):
  """KL(softmax(z_t/T) || softmax(z_s/T)), 'batchmean' reduction, times T^2.

  `F.kl_div(log_softmax(z_s/T), softmax(z_t/T), reduction='batchmean') * T**2`: summed
  over classes, averaged over the batch (the leading axis).
  """
  t = float(temperature)
  zs = student_logits.astype(jnp.float32) / t
  zt = teacher_logits.astype(jnp.float32) / t
  log_ps = jax.nn.log_softmax(zs, axis=-1)
  log_pt = jax.nn.log_softmax(zt, axis=-1)
  pt = jnp.exp(log_pt)
  kl = jnp.sum(pt * (log_pt - log_ps), axis=-1)
  return jnp.mean(kl) * (t * t)


def _windows(size: int, l: int):
  """PyTorch adaptive-pool windows: [floor(i*size/l), ceil((i+1)*size/l)) (may overlap)."""
  return [((i * size) // l, -((-(i + 1) * size) // l)) for i in range(l)]


def adaptive_avg_pool(x_nhwc, l: int):
  """PyTorch `adaptive_avg_pool2d(x, (l, l))` on an NHWC map -> (B, l, l, C).

  Output cell (i, j) averages rows floor(i*H/l) .. ceil((i+1)*H/l)-1 and the same
  for columns; windows overlap when l does not divide H (7->4: [0,2) [1,4) [3,6) [5,7)).
  """
  _, h, w, _ = x_nhwc.shape
  x = x_nhwc.astype(jnp.float32)
  rows = []
  for r0, r1 in _windows(h, l):
    cols = [x[:, r0:r1, c0:c1, :].mean(axis=(1, 2)) for c0, c1 in _windows(w, l)]
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


def _as_map(f):
  """(B, L, D) -> (B, h, h, D) with h = int(sqrt(L)), token t -> cell (t // h, t % h)."""
  if f.ndim == 3:
    b, l, d = f.shape
    h = math.isqrt(l)
    if h * h != l:
      raise ValueError(f'hcl_loss: a token sequence must have a square length, got L={l}.')
    return f.reshape(b, h, h, d)
  if f.ndim != 4:
    raise ValueError(f'hcl_loss expects NHWC maps or (B, L, D) sequences, got shape {f.shape}.')
  return f


def hcl_loss(f_s, f_t, levels: Sequence[int] = (4, 2, 1)):
  """ReviewKD's hierarchical context loss as the PAT code computes it, for one stage.

  Accepts NHWC maps or (B, L, D) sequences (viewed as (B, h, h, D), row-major tokens).
  loss = MSE(f_s, f_t), w = 1, tot = 1; for l in (4, 2, 1): a level with l >= H is
  skipped WITHOUT halving w; otherwise w /= 2, loss += w * MSE(pool_l(f_s), pool_l(f_t)),
  tot += w. Returns loss / tot (float32). MSE is the mean over all elements.
  """
  fs = _as_map(f_s).astype(jnp.float32)
  ft = _as_map(f_t).astype(jnp.float32)
  if fs.shape != ft.shape:
    raise ValueError(f'hcl_loss: shapes differ: {fs.shape} vs {ft.shape}.')
  h = fs.shape[1]
  loss = jnp.mean(jnp.square(fs - ft))
  w, tot = 1.0, 1.0
  for l in levels:
    if l >= h:
      continue
    w /= 2.0
    ps, pt = adaptive_avg_pool(fs, l), adaptive_avg_pool(ft, l)
    loss = loss + w * jnp.mean(jnp.square(ps - pt))
    tot += w
  return loss / tot
