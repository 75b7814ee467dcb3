"""Rebuilds the Fashion-MNIST tables and plots of docs/RESULTS.md from the archived runs.

    python docs/make_results.py [ROOT]     # ROOT: the grid's folder (default workdirs/miniature)

First copies every finished run of ROOT/{vit,mlp}/<experiment>/seed<N>/ (what
`launch/miniature.sh` writes) into the archive docs/runs/ (its result.json, config.json and
metrics.jsonl: a few kB, committed, so the evidence outlives the machine that ran it; the run
folders of 2026-12-02's grid were lost that way). Then replaces the text between the
<!-- TAG --> markers of docs/RESULTS.md with tables built from the archive, and writes the PNGs
under docs/ with `pat_jax.report`'s plotting. A plot is rewritten only when every archived run
in it has its curves (metrics.jsonl); archived runs without one are the lost runs' numbers
(docs/runs/README.md). With XCHECK_DATA set (the original code's runs,
crosscheck/fmnist/README.md) it also rebuilds the cross-check table. Only finished runs count.
"""
import json
import os
import re
import shutil
import statistics as st
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
from pat_jax import report  # pylint: disable=wrong-import-position

SEEDS = (0, 1, 2)
NAMES = {'student': 'student alone', 'kd': 'KD', 'fitnet': 'FitNet', 'default': 'PAT (RAA+AFP)',
         'corrected': 'PAT, quirks corrected', 'no_afp': 'RAA only (no AFP)',
         'no_raa': 'AFP only (no RAA)'}
ARCHIVE = os.path.join(HERE, 'runs')
RUN_FILES = ('result.json', 'config.json', 'metrics.jsonl')
# The first grid's teacher; its folder was lost with the machine (docs/runs/README.md). Runs
# archived with their folder used the teacher rebuilt on 2026-12-02 (docs/runs/teacher): `†`.
FIRST_TEACHER = (85.77, 85.31)
STEPS_PER_EPOCH = 84  # 5,400 images in batches of 64 (pat_jax/miniature.py)


def archive(root):
  """Copies the finished runs under ROOT into ARCHIVE (a rerun replaces the archived one)."""
  copied = []
  for student in ('vit', 'mlp', 'vit_45ep', 'teacher'):
    for rundir in report.find_runs(os.path.join(root, student)) if os.path.isdir(os.path.join(root, student)) else []:
      result = report.read_json(os.path.join(rundir, 'result.json'))
      if not (isinstance(result, dict) and 'best_top1' in result):
        continue  # still training
      dest = os.path.join(ARCHIVE, student, os.path.relpath(rundir, os.path.join(root, student)))
      os.makedirs(dest, exist_ok=True)
      for name in os.listdir(dest):  # a lost run's numbers give way to the real run
        if name not in RUN_FILES:
          os.remove(os.path.join(dest, name))
      for name in RUN_FILES:
        if os.path.exists(os.path.join(rundir, name)):
          shutil.copyfile(os.path.join(rundir, name), os.path.join(dest, name))
      copied.append(os.path.relpath(dest, ARCHIVE))
  return copied


def runs(student, exp):
  """{seed: result.json} of the archived finished runs of one experiment."""
  out = {}
  for seed in SEEDS:
    path = os.path.join(ARCHIVE, student, exp, f'seed{seed}', 'result.json')
    if os.path.exists(path):
      out[seed] = json.load(open(path, encoding='utf-8'))
  return out


def minutes(result):
  """Wall minutes of a run; the lost runs kept only their method's mean."""
  return result['wall_s'] / 60 if result.get('wall_s') is not None else result['method_mean_wall_min']


def mean_minutes(results):
  """'12.5': mean wall minutes of {seed: result}, '–' for none."""
  return f'{st.fmean(minutes(x) for x in results.values()):.1f}' if results else '–'


def ms(values):
  if not values:
    return '–'
  return f'{st.fmean(values):.2f} ± {st.stdev(values):.2f}' if len(values) > 1 else f'{values[0]:.2f}'


def ci95(values):
  """Mean and 95% t-interval of paired differences (n = 2..5)."""
  t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}[len(values)]
  m, h = st.fmean(values), t * st.stdev(values) / len(values) ** 0.5
  return f'{m:+.2f} [{m - h:+.2f}, {m + h:+.2f}]'


def method_table(student, exps, teacher=True):
  rows = ['| method | finished seeds | val best (mean ± sd) | test (mean ± sd) | per seed: val best / test | min per run |',
          '|---|---|---|---|---|---|']
  for exp in exps:
    r = runs(student, exp)
    if not r and exp not in ('student', 'kd', 'default'):
      continue
    val = [x['best_top1'] for x in r.values()]
    test = [x['test_top1'] for x in r.values()]
    seeds = ', '.join(f's{s} {x["best_top1"]:.2f} / {x["test_top1"]:.2f}{mark(x)}' for s, x in r.items())
    rows.append(f'| {NAMES[exp]} | {len(r)} | {ms(val)} | {ms(test)} | {seeds} | {mean_minutes(r)} |')
  return '\n'.join(rows + (teacher_rows() if teacher else []))


def mark(result):
  """`†`: a run of the rebuilt teacher's grid (every run archived with its folder)."""
  return '' if 'lost_run_folder' in result else '†'


def teacher_rows():
  rows = [f'| teacher (mini ConvNeXt, all 54,000 images), first grid | 1 | {FIRST_TEACHER[0]:.2f} | '
          f'{FIRST_TEACHER[1]:.2f} | | |']
  path = os.path.join(ARCHIVE, 'teacher', 'result.json')
  if os.path.exists(path):
    t = json.load(open(path, encoding='utf-8'))
    rows.append(f'| teacher, rebuilt 2026-12-02 (the same command; runs marked †) | 1 | '
                f'{t["best_top1"]:.2f} | {t["test_top1"]:.2f} | | {t["wall_s"] / 60:.1f} |')
  return rows


def paired(student, pairs, names=NAMES):
  rows = ['| pair | seeds | val best, per seed | val: mean [95% CI] | test, per seed | test: mean [95% CI] |',
          '|---|---|---|---|---|---|']
  for a, b in pairs:
    ra, rb = runs(student, a), runs(student, b)
    common = sorted(set(ra) & set(rb))
    if len(common) < 2:
      continue
    dv = [ra[s]['best_top1'] - rb[s]['best_top1'] for s in common]
    dt = [ra[s]['test_top1'] - rb[s]['test_top1'] for s in common]
    rows.append(f'| {names.get(a, a)} − {names.get(b, b)} | {len(common)} | '
                + ', '.join(f's{s} {v:+.2f}' for s, v in zip(common, dv)) + f' | {ci95(dv)} | '
                + ', '.join(f's{s} {v:+.2f}' for s, v in zip(common, dt)) + f' | {ci95(dt)} |')
  return '\n'.join(rows)


def fraction_table(doc):
  """The Table 2 block and its plot points [(images, (mean, sd) alone, (mean, sd) PAT)].

  A fraction without archived runs keeps its row of the current RESULTS.md (the 25% and 50%
  runs of the first grid were lost with their per-seed numbers; only the row survives)."""
  rows = ['| training images | student alone: val best | PAT: val best | PAT − alone, val (per seed) | student alone: test | PAT: test | PAT − alone, test (per seed) |',
          '|---|---|---|---|---|---|---|']
  old = re.search(r'<!-- FRACTION_TABLE -->(.*?)<!-- /FRACTION_TABLE -->', doc, re.S).group(1)
  points = []
  for f in ('0.25', '0.5', '0.75', '1'):
    a_exp, p_exp = ('student', 'default') if f == '1' else (f'fraction={f}+student', f'fraction={f}')
    ra, rp = runs('vit', a_exp), runs('vit', p_exp)
    n_img = int(round(5400 * float(f)))
    label = f'{n_img:,} ({float(f):.0%})'
    if not ra and not rp:
      kept = [line for line in old.splitlines() if line.startswith(f'| {label} ')]
      if kept and '–' not in kept[0].split('|')[2]:
        rows.append(kept[0])
        cells = kept[0].split('|')
        points.append((n_img, *[tuple(map(float, cells[i].split('±'))) for i in (2, 3)]))
        continue
    common = sorted(set(ra) & set(rp))
    dv = [rp[s]['best_top1'] - ra[s]['best_top1'] for s in common]
    dt = [rp[s]['test_top1'] - ra[s]['test_top1'] for s in common]
    new = '†' if any(mark(x) for x in [*ra.values(), *rp.values()]) else ''
    rows.append(f'| {label}{new} | {ms([x["best_top1"] for x in ra.values()])} '
                f'| {ms([x["best_top1"] for x in rp.values()])} | '
                + (', '.join(f'{v:+.2f}' for v in dv) or '–') + ' | '
                f'{ms([x["test_top1"] for x in ra.values()])} | {ms([x["test_top1"] for x in rp.values()])} | '
                + (', '.join(f'{v:+.2f}' for v in dt) or '–') + ' |')
    stat = lambda v: (st.fmean(v), st.stdev(v) if len(v) > 1 else 0.0) if v else None  # pylint: disable=unnecessary-lambda-assignment
    points.append((n_img, stat([x['best_top1'] for x in ra.values()]),
                   stat([x['best_top1'] for x in rp.values()])))
  return '\n'.join(rows), points


def schedule_table():
  """The ViT student alone and PAT at 15 and 45 epochs (ROOT/vit_45ep: `--set=num_epochs=45`)."""
  rows = ['| epochs (steps) | seeds | student alone: val best / test | PAT: val best / test | PAT − alone, val (per seed) | min per run (alone, PAT) |',
          '|---|---|---|---|---|---|']
  for epochs, student in ((15, 'vit'), (45, 'vit_45ep')):
    ra, rp = runs(student, 'student'), runs(student, 'default')
    if not ra and not rp:
      continue
    seeds = sorted(set(ra) | set(rp))
    cell = lambda r, s: f'{r[s]["best_top1"]:.2f} / {r[s]["test_top1"]:.2f}{mark(r[s])}' if s in r else '–'  # pylint: disable=unnecessary-lambda-assignment
    diff = ', '.join(f's{s} {rp[s]["best_top1"] - ra[s]["best_top1"]:+.2f}' for s in seeds if s in ra and s in rp)
    rows.append(f'| {epochs} ({epochs * STEPS_PER_EPOCH:,}) | {", ".join(map(str, seeds))} | '
                + ', '.join(f's{s} {cell(ra, s)}' for s in seeds) + ' | '
                + ', '.join(f's{s} {cell(rp, s)}' for s in seeds) + f' | {diff or "–"} | {mean_minutes(ra)}, {mean_minutes(rp)} |')
  return '\n'.join(rows)


def fraction_plot(points, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, label in ((1, 'student alone'), (2, 'PAT')):
    pts = [(p[0], p[i]) for p in points if p[i]]  # (images, (mean, sd) of val best over seeds)
    ax.errorbar([n for n, _ in pts], [m for _, (m, _) in pts], yerr=[sd for _, (_, sd) in pts],
                marker='o', capsize=3, label=f'{label} (mean ± sd over seeds)')
  ax.set_xlabel('training images (nested subsets of the 5,400)')
  ax.set_ylabel('validation top-1 (%), best epoch')
  ax.set_title('Fashion-MNIST, mini ConvNeXt -> mini DeiT: less data (paper Table 2)', fontsize='medium')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


def plots(student, exps, stem):
  folders = [os.path.join(ARCHIVE, student, e) for e in exps if runs(student, e)]
  lost = [os.path.relpath(os.path.join(f, s), ARCHIVE) for f in folders for s in os.listdir(f)
          if not os.path.exists(os.path.join(f, s, 'metrics.jsonl'))]
  if lost:
    print(f'kept docs/{stem}_*.png: no curves for {", ".join(sorted(lost))}')
    return
  experiments = [(NAMES[os.path.basename(f)], r) for f in folders
                 for _, r in report._gather([f])]  # pylint: disable=protected-access
  experiments = [(n, [x for x in r if x['finished']]) for n, r in experiments]
  title = {'vit': 'mini DeiT', 'mlp': 'mini ResMLP'}[student]
  report.plot(experiments, 'accuracy', 'validation top-1 (%), best of raw and EMA',
              f'Fashion-MNIST, mini ConvNeXt -> {title}', os.path.join(HERE, f'{stem}_accuracy.png'))
  report.plot(experiments, 'loss', 'train loss', f'Fashion-MNIST, mini ConvNeXt -> {title}',
              os.path.join(HERE, f'{stem}_loss.png'))


def put(doc, tag, text):
  pat = re.compile(f'<!-- {tag} -->.*?<!-- /{tag} -->', re.S)
  if not pat.search(doc):
    raise SystemExit(f'docs/RESULTS.md has no <!-- {tag} --> ... <!-- /{tag} --> block.')
  return pat.sub(lambda m: f'<!-- {tag} -->\n{text}\n<!-- /{tag} -->', doc)


def main():
  root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, 'workdirs', 'miniature')
  for run in archive(root):
    print(f'archived docs/runs/{run}')
  methods = ('student', 'kd', 'fitnet', 'default', 'corrected')
  ablation = ('fitnet', 'no_afp', 'no_raa', 'default')
  method_pairs = [('default', 'student'), ('default', 'kd'), ('kd', 'student'), ('fitnet', 'student'),
                  ('default', 'fitnet'), ('corrected', 'default')]
  ablation_pairs = [('default', 'no_afp'), ('default', 'no_raa'), ('no_afp', 'fitnet'),
                    ('no_raa', 'fitnet'), ('default', 'fitnet')]
  doc = open(os.path.join(HERE, 'RESULTS.md'), encoding='utf-8').read()
  for student in ('vit', 'mlp'):
    tag = student.upper()
    doc = put(doc, f'{tag}_TABLE', method_table(student, methods) + '\n\nPaired by seed (same '
              'seed: same student initialisation and batches):\n\n' + paired(student, method_pairs))
    doc = put(doc, f'{tag}_ABLATION', method_table(student, ablation, teacher=False)
              + '\n\n' + paired(student, ablation_pairs))
    plots(student, methods, f'fmnist_{student}')
    plots(student, ablation, f'fmnist_{student}_ablation')
  table, points = fraction_table(doc)
  doc = put(doc, 'FRACTION_TABLE', table)
  fraction_plot(points, os.path.join(HERE, 'fmnist_vit_fractions.png'))
  doc = put(doc, 'SCHEDULE_TABLE', schedule_table())
  # The cross-check reads the pat_jax runs' final and EMA numbers, which the lost runs' stubs lack.
  lost = [e for e in ('student', 'kd', 'default', 'fitnet') if any(mark(r) == '' for r in runs('vit', e).values())]
  if os.environ.get('XCHECK_DATA') and lost:
    print(f'kept XCHECK_TABLE: the archived ViT runs {lost} are numbers of lost runs (docs/runs/README.md)')
  elif os.environ.get('XCHECK_DATA'):
    x = subprocess.run([sys.executable, 'summarize.py'], cwd=os.path.join(REPO, 'crosscheck', 'fmnist'),
                       capture_output=True, text=True, check=True,
                       env=dict(os.environ, PAT_JAX_MINIATURE=os.path.join(ARCHIVE, 'vit'))).stdout
    mean = x[x.index('## Mean'):x.index('## Paired')].split('\n', 2)[2].strip()
    pairs = x[x.index('## Paired differences, original'):x.index('## Same differences')].split('\n', 2)[2].strip()
    doc = put(doc, 'XCHECK_TABLE', mean.replace(' ± nan', '') + '\n\nPaired differences of the original '
              '(its own seeds):\n\n' + pairs.replace('\tnan', '').replace('| nan |', '| – |'))
  open(os.path.join(HERE, 'RESULTS.md'), 'w', encoding='utf-8').write(doc)
  print(doc[doc.index('## Method comparison'):doc.index('## Original code on the miniature')])


if __name__ == '__main__':
  main()
