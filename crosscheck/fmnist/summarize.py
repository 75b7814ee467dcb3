"""Tables for README.md from the run JSONs (train_torch.py), next to pat_jax's own miniature runs.

  python3 summarize.py [RUNS_DIR]                        ViT student (mini_deit), as before
  STUDENT=mini_resmlp python3 summarize.py [RUNS_DIR]    MLP student (mini_resmlp)
Env: STUDENT (mini_deit, the default, or mini_resmlp; as run_all.sh) picks the defaults:
  RUNS_DIR   $XCHECK_DATA/runs            | $XCHECK_DATA/runs_mlp
  results    ./results/ (JSONs copied)    | ./results/mlp/
  PAT_JAX_MINIATURE (pat_jax's runs {student,kd,default}/seedN/result.json, tabulated alongside
  when present)  ../../workdirs/miniature/vit | ../../workdirs/miniature/mlp
PAT_JAX_MINIATURE and RESULTS_DIR override the last two.
All accuracies are top-1 %: "best" and "final" on the 6,000-image validation split (best = max over
epochs of max(raw, EMA)), "test" = the final students on the 10,000-image test split.
"""
import glob
import json
import math
import os
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
STUDENT = os.environ.get('STUDENT', 'mini_deit')
if STUDENT not in ('mini_deit', 'mini_resmlp'):
  sys.exit(f'unknown STUDENT={STUDENT!r} (mini_deit or mini_resmlp)')
SUFFIX, JAX_SUB, RES_SUB = {'mini_deit': ('', 'vit', ''), 'mini_resmlp': ('_mlp', 'mlp', 'mlp')}[STUDENT]
RUNS = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ['XCHECK_DATA'], 'runs' + SUFFIX)
JAX = os.environ.get('PAT_JAX_MINIATURE', os.path.join(HERE, '..', '..', 'workdirs', 'miniature', JAX_SUB))
RESULTS = os.environ.get('RESULTS_DIR', os.path.join(HERE, 'results', RES_SUB))
os.makedirs(RESULTS, exist_ok=True)

runs = {}
for p in sorted(glob.glob(os.path.join(RUNS, '*.json'))):
  r = json.load(open(p))
  if 'method' not in r:
    continue
  # Run JSONs from before --student existed are ViT runs.
  if r.get('student', 'mini_deit') != STUDENT:
    sys.exit(f'{p} is a {r.get("student", "mini_deit")} run, not {STUDENT}: set STUDENT or RUNS_DIR')
  runs[(r['method'], r['seed'])] = r
  shutil.copy(p, os.path.join(RESULTS, os.path.basename(p)))

METHODS = ['none', 'kd', 'fitnet', 'pat']
LABEL = {'none': 'student alone', 'kd': 'KD', 'fitnet': 'FitNet', 'pat': 'PAT'}
JAX_DIR = {'none': 'student', 'kd': 'kd', 'fitnet': 'fitnet', 'pat': 'default'}
METRICS = [('best_val_top1', 'best val'), ('final_val_raw_top1', 'final val raw'),
           ('final_val_ema_top1', 'final val EMA'), ('test_raw_top1', 'test raw'),
           ('test_ema_top1', 'test EMA')]
# pat_jax result.json names of the same quantities
JAX_KEY = {'best_val_top1': 'best_top1', 'final_val_raw_top1': 'final_top1',
           'final_val_ema_top1': 'final_ema_top1', 'test_raw_top1': 'test_top1',
           'test_ema_top1': 'test_ema_top1', 'wall_s': 'wall_s'}
seeds = sorted({s for _, s in runs})


def sd(v):
  return statistics.stdev(v) if len(v) > 1 else float('nan')


def ms(v):
  return f'{statistics.mean(v):.2f} ± {sd(v):.2f}' if v else '-'


jax = {}
for m in METHODS:
  for p in sorted(glob.glob(os.path.join(JAX, JAX_DIR[m], 'seed*', 'result.json'))):
    r = json.load(open(p))
    if r.get('status') == 'done':
      jax[(m, int(os.path.basename(os.path.dirname(p))[4:]))] = r

print(f'## Per run, original PAT code (torch), student {STUDENT}\n')
print('| method | seed | best val (src, epoch) | final val raw / EMA | test raw / EMA | wall s |')
print('|---|---|---|---|---|---|')
for m in METHODS:
  for s in seeds:
    r = runs.get((m, s))
    if r is None:
      continue
    print(f"| {LABEL[m]} | {s} | {r['best_val_top1']:.2f} ({r['best_source']}, {r['best_epoch']}) | "
          f"{r['final_val_raw_top1']:.2f} / {r['final_val_ema_top1']:.2f} | "
          f"{r['test_raw_top1']:.2f} / {r['test_ema_top1']:.2f} | {r['wall_s']:.0f} |")

print(f'\n## Mean ± sd over seeds (pat_jax: {os.path.relpath(JAX, HERE)})\n')
print('| side | method | n | ' + ' | '.join(n for _, n in METRICS) + ' | wall s |')
print('|---|---|---|' + '---|' * len(METRICS) + '---|')
for side, table, keymap in (('original (torch)', runs, None), ('pat_jax', jax, JAX_KEY)):
  for m in METHODS:
    rs = [table[(m, s)] for s in sorted({s for mm, s in table if mm == m})]
    if not rs:
      continue
    k = (lambda key: key) if keymap is None else (lambda key: keymap[key])
    cells = [ms([r[k(key)] for r in rs if r.get(k(key)) is not None]) for key, _ in METRICS]
    wall = [r[k('wall_s')] for r in rs if r.get(k('wall_s')) is not None]
    wall_cell = f'{statistics.mean(wall):.0f}' if wall else '-'
    print(f"| {side} | {LABEL[m]} | {len(rs)} | " + ' | '.join(cells) + f' | {wall_cell} |')

T975 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}
print('\n## Paired differences, original (same seed: same student init, same data stream)\n')
print('| pair | metric | n | mean | sd | 95% CI (t) | a > b / ties / a < b | per seed |')
print('|---|---|---|---|---|---|---|---|')
for a, b in (('pat', 'none'), ('pat', 'kd'), ('kd', 'none')):
  for metric, mname in (('best_val_top1', 'best val'), ('final_val_raw_top1', 'final val raw'),
                        ('test_raw_top1', 'test raw'), ('test_ema_top1', 'test EMA')):
    ss = [s for s in seeds if (a, s) in runs and (b, s) in runs]
    d = [runs[(a, s)][metric] - runs[(b, s)][metric] for s in ss]
    if not d:
      continue
    m = statistics.mean(d)
    if len(d) > 1:
      sdv = statistics.stdev(d)
      h = T975.get(len(d) - 1, 2.0) * sdv / math.sqrt(len(d))
      ci = f'[{m - h:+.2f}, {m + h:+.2f}]'
    else:
      sdv, ci = float('nan'), '-'
    w = sum(x > 1e-9 for x in d); l = sum(x < -1e-9 for x in d)
    print(f'| {LABEL[a]} − {LABEL[b]} | {mname} | {len(d)} | {m:+.2f} | {sdv:.2f} | {ci} | '
          f'{w} / {len(d) - w - l} / {l} | ' + ', '.join(f's{s} {x:+.2f}' for s, x in zip(ss, d)) + ' |')

if jax:
  print('\n## Same differences, pat_jax (mean over its seeds, for comparison)\n')
  print('| pair | best val | test raw |')
  print('|---|---|---|')
  for a, b in (('pat', 'none'), ('pat', 'kd'), ('kd', 'none')):
    cells = []
    for key in ('best_top1', 'test_top1'):
      d = [jax[(a, s)][key] - jax[(b, s)][key] for s in sorted({s for _, s in jax})
           if (a, s) in jax and (b, s) in jax and jax[(a, s)].get(key) is not None
           and jax[(b, s)].get(key) is not None]
      cells.append(f'{statistics.mean(d):+.2f} (n {len(d)})' if d else '-')
    print(f'| {LABEL[a]} − {LABEL[b]} | ' + ' | '.join(cells) + ' |')

print('\n## Wall time per run (s; 1 torch thread, shared 2-core CPU)\n')
print('| method | mean | min | max |')
print('|---|---|---|---|')
for m in METHODS:
  w = [runs[(m, s)]['wall_s'] for s in seeds if (m, s) in runs]
  if w:
    print(f'| {LABEL[m]} | {statistics.mean(w):.0f} | {min(w):.0f} | {max(w):.0f} |')

pat_runs = [runs[('pat', s)] for s in seeds if ('pat', s) in runs]
if pat_runs:
  r0 = pat_runs[0]
  print(f"\n## Per-epoch mean loss terms, original PAT seed {r0['seed']}\n")
  print('| epoch | loss_gt | loss_kd | loss_pat_mse | loss_pat_reg | grad_norm | val raw / EMA |')
  print('|---|---|---|---|---|---|---|')
  for e, ev in zip(r0['epoch_mean_losses'], r0['evals']):
    print(f"| {e['epoch']} | {e['loss_gt']:.4f} | {e['loss_kd']:.4f} | {e['loss_pat_mse']:.4f} | "
          f"{e['loss_pat_reg']:.4f} | {e['grad_norm']:.3f} | {ev['val_raw_top1']:.2f} / {ev['val_ema_top1']:.2f} |")
  print('\nPAT beta (prompt scale) per stage at the end of training: ' +
        '; '.join(f"seed {r['seed']}: " + ', '.join(f'{b:+.3f}' for b in r['evals'][-1]['beta'])
                  for r in pat_runs))

sc = os.path.join(RESULTS, 'student_check.json')
if STUDENT == 'mini_resmlp' and os.path.exists(sc):
  S = json.load(open(sc))
  print(f"\nStudent check (check_student.py: pat_jax's trained mini_resmlp in the torch MlpMixer): "
        f"parameters torch {S['params_torch']:,} / pat_jax {S['params_pat_jax']:,}; validation top-1 "
        f"torch {S['val_top1_torch_on_torch_images']:.2f}, pat_jax forward {S['val_top1_pat_jax_forward']:.2f}; "
        f"max |Δlogit| {S['logits_max_abs_diff_vs_pat_jax']:.1e}; max |Δ stage tap| "
        f"{max(d['max_abs_diff'] for d in S['stage_taps_first500']):.1e}.")

tc = os.path.join(HERE, 'results', 'teacher_check.json')
if os.path.exists(tc):
  T = json.load(open(tc))
  v = T['val']
  print(f"\nTeacher (validation): torch {v['teacher_top1_torch_timm065']:.2f}, pat_jax forward "
        f"{v['teacher_top1_pat_jax_forward']:.2f}, pat_jax result.json final_top1 "
        f"{T['pat_jax_result_json']['final_top1']}; max |Δlogit| {v['logits_max_abs_diff_vs_pat_jax']:.2e}; "
        f"eval preprocessing bit-identical: {v['preprocessing_bit_identical']}.")
