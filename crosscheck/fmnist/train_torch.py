"""Step 2 (peer venv): pat_jax's Fashion-MNIST miniature student recipe (configs/fmnist_vit.py,
pat_jax/miniature.py), driven the way the ORIGINAL train.py drives a distiller, with the ORIGINAL
distiller classes (distillers.Vanilla / KD / PAT, unmodified, imported from $PAT_OFFICIAL_REPO).
Adapted from the digits cross-check harness (shared/peer/digits_crosscheck/train_torch.py).

  $PEER_PY train_torch.py --method {none,kd,pat,fitnet} --seed 0 --out DIR [--epochs 15]
                         [--student {mini_deit,mini_resmlp}]   (default mini_deit)

The student is pat_jax's configs/fmnist_vit.py (mini_deit) or configs/fmnist_mlp.py (mini_resmlp)
student (common.make_student); both configs share the recipe below (pat_jax/miniature.py
student_config). Output: OUT/{method}_seed{S}.json for either student (keep the students' runs in
separate folders: run_all.sh uses runs/ and runs_mlp/).

Recipe: AdamW lr 2e-3, wd 0.05 on every trainable tensor with ndim > 1 (timm create_optimizer_v2
on the whole distiller, as train.py: a distiller has no no_weight_decay(), so the student's
cls/pos are decayed; pat_jax decay_pos_embed=True does the same; mini_resmlp's (1, 1, D) Affine
alpha/beta are decayed too, as by pat_jax's ndim > 1 mask); timm CosineLRScheduler per epoch
(warmup 2 epochs from 1e-4, cosine to 1e-5 over 15 epochs, cooldown 0); 15 epochs x 84 steps
(5,400 // 64, drop_last); batch 64; LabelSmoothingCrossEntropy(0.1); RandomResizedCrop 32 scale
(0.5, 1) ratio (3/4, 4/3) random bilinear/bicubic on the 28x28 image, then horizontal flip p 0.5;
no RandAugment/mixup/cutmix/erasing; fp32; no grad clipping; ModelEmaV2(student, 0.99) updated
after every step; raw + EMA evaluated on the 6,000 VALIDATION images after every epoch;
best = max over epochs of max(raw, EMA) on validation; at the end the final raw and EMA students
are evaluated once on the 10,000 TEST images.
Per step, as train_one_epoch: distiller.train() once per epoch; output, losses = distiller(x, y,
epoch=epoch); loss = sum(losses.values()); zero_grad; backward; step; ema.update(student).
PAT args: defaults of train.py (afp stages 1-4, mse/reg weights 1, 64 queries) except raa_dim 64
(pat_jax's miniature raa_dim=64); gt/kd weights 1, T 1.

Seeding: the student is created right after seeding (same init for every method at a seed); the
data stream (shuffle: its own torch.Generator; crops and flips: python `random`, which no
distiller touches) is also identical across methods at a seed, so runs at one seed are paired.
"""
import argparse
import json
import os
import random
import sys
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import CosineLRScheduler  # noqa: E402
from timm.utils import ModelEmaV2  # noqa: E402

from distillers import get_distiller  # noqa: E402  (original repo, unmodified)


def parse():
  p = argparse.ArgumentParser()
  p.add_argument('--method', choices=['none', 'kd', 'pat', 'fitnet'], required=True)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--epochs', type=int, default=15)
  p.add_argument('--threads', type=int, default=1)
  p.add_argument('--out', default=os.path.join(os.environ.get('XCHECK_DATA', '.'), 'runs'))
  p.add_argument('--raa-dim', type=int, default=64)
  p.add_argument('--student', choices=list(common.STUDENTS), default='mini_deit')
  return p.parse_args()


def main():
  a = parse()
  torch.set_num_threads(a.threads)
  common.cpu_only_patches()
  t_start = time.time()

  # timm.utils.random_seed(seed, rank=0), as train.py
  random.seed(a.seed); np.random.seed(a.seed); torch.manual_seed(a.seed)

  xtr, ytr, xva, yva, xte, yte = common.load_split()
  x_val, y_val = common.eval_images(xva), torch.from_numpy(yva)
  y_train = torch.from_numpy(ytr)
  aug = common.TrainAug(hflip=0.5)

  student = common.make_student(a.student)
  teacher = None
  t_acc = None
  if a.method != 'none':
    teacher = common.make_teacher(os.path.join(common.DATA, 'teacher_timm.npz'))
    teacher.requires_grad_(False)
    teacher.eval()
    t_acc = common.top1(teacher, x_val, y_val)
    teacher.eval()
  args = types.SimpleNamespace(
      gt_loss_weight=1.0, kd_loss_weight=1.0, kd_temperature=1,
      pat_afp_stage=[1, 2, 3, 4], pat_mse_loss_weight=1.0, pat_reg_loss_weight=1.0,
      pat_raa_num_queries=64, pat_raa_dim=a.raa_dim,
      fitnet_stages=[1, 2, 3, 4], fitnet_loss_weight=1.0, rank=0)  # train.py's FitNet defaults
  criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
  if a.method == 'fitnet':
    # ADAPTATION: the original's ConvNeXt stage_info returns convnext_tiny's shapes at 224x224
    # ((96, 56, 56) ... (768, 7, 7)); FitNet builds its aligners from them (PAT measures the
    # shapes with a dummy forward instead). The mini teacher at 32x32 has (16, 8, 8), (24, 4, 4),
    # (32, 2, 2), (48, 1, 1): the same indices, its real shapes.
    real = {1: (16, 8, 8), 2: (24, 4, 4), 3: (32, 2, 2), 4: (48, 1, 1), -1: 48}
    original = teacher.stage_info
    teacher.stage_info = lambda stage: (original(stage)[0], real[stage])
  Distiller = get_distiller({'none': 'vanilla', 'kd': 'kd', 'pat': 'pat', 'fitnet': 'fitnet'}[a.method])
  distiller = Distiller(student, teacher=teacher, criterion=criterion, args=args,
                        num_data=len(ytr), input_size=(3, 32, 32))
  if a.method == 'fitnet':
    # ADAPTATION: FitNet's CNN-teacher/token-student aligner for a teacher map smaller than the
    # token grid reshapes with `lambda x: ... x.view(B, H, H, C)`, a closure over the loop
    # variable H: every stage's lambda sees the LAST stage's H. In the paper's setting only
    # stage 4 takes that branch, so it never shows; here stages 2-4 do (H = 4, 2, 1) and the
    # original crashes. Each lambda is rebound to its own stage's H (what the code means, and
    # what pat_jax computes).
    from distillers.utils import LambdaModule  # pylint: disable=import-outside-toplevel
    for stage in args.fitnet_stages:
      aligner = distiller.projector[str(stage)]['aligner']
      if isinstance(aligner, torch.nn.Sequential) and isinstance(aligner[1], LambdaModule):
        h = real[stage][1]
        aligner[1].fn = lambda x, h=h: torch.einsum('nhwc->nchw', x.view(x.size(0), h, h, x.size(-1))).contiguous()
  n_student, n_extra = distiller.get_learnable_parameters()
  distiller = distiller.cuda()  # no-op on CPU (common.cpu_only_patches)

  optimizer = create_optimizer_v2(distiller, opt='adamw', lr=2e-3, weight_decay=0.05)
  ema = ModelEmaV2(student, decay=0.99)
  sched = CosineLRScheduler(optimizer, t_initial=a.epochs, lr_min=1e-5, warmup_lr_init=1e-4,
                            warmup_t=2, cycle_mul=1.0, cycle_decay=0.1, cycle_limit=1,
                            k_decay=1.0, t_in_epochs=True)
  decay_names = []
  for g in optimizer.param_groups:
    if g['weight_decay'] > 0:
      ids = {id(p) for p in g['params']}
      decay_names = [n for n, p in distiller.named_parameters() if id(p) in ids]

  gen = torch.Generator().manual_seed(a.seed)
  bs, n = 64, len(ytr)
  steps_per_epoch = n // bs
  total = steps_per_epoch * a.epochs
  log_steps = set(range(20, total + 1, 20)) | {1, 2, 3, total}
  step, best = 0, {'top1': -1.0}
  log, evals = [], []
  for epoch in range(a.epochs):
    distiller.train()
    perm = torch.randperm(n, generator=gen)
    for b in range(steps_per_epoch):
      idx = perm[b * bs:(b + 1) * bs].numpy()
      x, y = aug(xtr[idx]), y_train[idx]
      output, losses = distiller(x, y, epoch=epoch)
      loss = sum(losses.values())
      optimizer.zero_grad()
      loss.backward()
      gn = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in distiller.parameters()
                          if p.grad is not None))
      optimizer.step()
      ema.update(distiller.student)
      step += 1
      row = {'step': step, 'epoch': epoch, 'lr': optimizer.param_groups[0]['lr'],
             'loss': float(loss), 'grad_norm': float(gn),
             'train_top1': float(100.0 * (output.argmax(-1) == y).float().mean())}
      row.update({k: float(v) for k, v in losses.items()})
      log.append(row)
      if not np.isfinite(row['loss']):
        raise FloatingPointError(row)
    raw = common.top1(distiller.student, x_val, y_val)
    emv = common.top1(ema.module, x_val, y_val)
    e = {'epoch': epoch + 1, 'step': step, 'lr': log[-1]['lr'], 'val_raw_top1': raw, 'val_ema_top1': emv}
    if a.method == 'pat':
      e['beta'] = [float(m.beta) for m in distiller.prompt_blocks]
    evals.append(e)
    cand = max((raw, 'raw'), (emv, 'ema'))
    if cand[0] > best['top1']:
      best = {'top1': cand[0], 'source': cand[1], 'epoch': epoch + 1}
    ep_rows = [r for r in log if r['epoch'] == epoch]
    mean = {k: float(np.mean([r[k] for r in ep_rows])) for k in ep_rows[0] if k.startswith('loss')}
    print(f'[{a.method} s{a.seed}] ep {epoch + 1:2d} lr {ep_rows[0]["lr"]:.2e} val raw {raw:5.2f} '
          f'ema {emv:5.2f} best {best["top1"]:5.2f} | ' + ' '.join(f'{k} {v:.4f}' for k, v in mean.items())
          + f' | {time.time() - t_start:.0f}s', flush=True)
    sched.step(epoch + 1, raw)

  # ---- the test split, read once, by the final raw and EMA students ----
  del x_val
  x_test, y_test = common.eval_images(xte), torch.from_numpy(yte)
  test_raw = common.top1(distiller.student, x_test, y_test)
  test_ema = common.top1(ema.module, x_test, y_test)
  t_test = common.top1(teacher, x_test, y_test) if teacher is not None else None

  wall = time.time() - t_start
  res = {'method': a.method, 'seed': a.seed, 'student': a.student, 'epochs': a.epochs, 'steps': step,
         'steps_per_epoch': steps_per_epoch, 'num_train': n,
         'best_val_top1': best['top1'], 'best_source': best['source'], 'best_epoch': best['epoch'],
         'final_val_raw_top1': evals[-1]['val_raw_top1'], 'final_val_ema_top1': evals[-1]['val_ema_top1'],
         'test_raw_top1': test_raw, 'test_ema_top1': test_ema,
         'wall_s': wall, 'threads': a.threads, 'student_params': n_student, 'extra_params': n_extra,
         'teacher_val_top1': t_acc, 'teacher_test_top1': t_test,
         'decayed_params': decay_names, 'evals': evals,
         'log_at': [r for r in log if r['step'] in log_steps],
         'epoch_mean_losses': [
             {'epoch': ep + 1, **{k: float(np.mean([r[k] for r in log if r['epoch'] == ep]))
                                  for k in log[0] if k.startswith('loss') or k in ('grad_norm', 'train_top1')}}
             for ep in range(a.epochs)]}
  if a.method == 'pat':
    res['pat_modules'] = {
        'prompt_blocks': str(distiller.prompt_blocks)[:4000],
        'attention_blending_projectors': [str(p.projector.proj) for p in distiller.attention_blending.projector_s],
        'aligners': [str(m) for m in distiller.aligners]}
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, f'{a.method}_seed{a.seed}.json')
  json.dump(res, open(path, 'w'), indent=1)
  print(json.dumps({k: res[k] for k in ('method', 'seed', 'student', 'best_val_top1', 'best_source', 'best_epoch',
                                         'final_val_raw_top1', 'final_val_ema_top1', 'test_raw_top1',
                                         'test_ema_top1', 'wall_s', 'student_params', 'extra_params')}),
        flush=True)


if __name__ == '__main__':
  main()
