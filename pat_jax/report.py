r"""Tables and plots of training runs: python -m pat_jax.report WORKDIR... [--out DIR].

Every directory under a WORKDIR that holds a metrics.jsonl is a run, finished (it has a
result.json) or not. Runs are grouped into experiments by their path below the WORKDIR
without a final `seed<N>` (ROOT/pat/seed0 and ROOT/pat/seed1 are experiment `pat`), and
written to OUT (default: FIRST_WORKDIR/report):
  report.md     one row per experiment: runs, best and final top-1 (mean ± sample std
                over seeds), test top-1 of the final student (runs with a test split),
                epochs done, minutes per run, best top-1 of each seed
  summary.json  the same numbers for other code (or call summarize / write_report)
  accuracy.png  eval top-1 (best of raw and EMA) against epoch: mean over seeds, min-max band
  loss.png      train loss against epoch, the same way
A run still training counts with its best so far (marked `running`); `final` only counts
finished runs. Reads files only: no JAX, no TensorFlow, so it starts fast and can watch runs.
"""
import argparse
import json
import math
import os
import re
import statistics
import sys

_SEED_DIR = re.compile(r'seed(\d+)')
_SKIP_DIRS = {'checkpoints', 'tensorboard'}  # large, and never hold a run


class ReportError(ValueError):
  """A WORKDIR that is missing or holds no run (the CLI prints it in one line)."""


# ----------------------------------------------------------------------------
# One run directory.

def read_json(path):
  """The file's JSON, or None when missing or half written (a run may be writing it)."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_metrics(path):
  """(train rows, eval rows) of a metrics.jsonl, by step; a resumed run's repeats: last one wins."""
  rows = {'train': {}, 'eval': {}}
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:  # a line being written
        continue
      if not isinstance(row, dict) or 'step' not in row:
        continue
      kind = 'eval' if 'eval_top1' in row else 'train' if 'train_loss' in row else None
      if kind:
        rows[kind][row['step']] = row
  return [[r[s] for s in sorted(r)] for r in (rows['train'], rows['eval'])]


def _eval_top1(row):
  return max(row['eval_top1'], row.get('ema_eval_top1', -math.inf))


def estimated_runtime_s(train_rows):
  """Training time from the logged step times (for runs without result.json's wall_s)."""
  total, previous = 0.0, 0
  for row in train_rows:
    total += row.get('step_time_s', 0.0) * max(row['step'] - previous, 0)
    previous = row['step']
  return total


def load_run(rundir):
  """The numbers and curves of one run directory."""
  train_rows, eval_rows = read_metrics(os.path.join(rundir, 'metrics.jsonl'))
  config = read_json(os.path.join(rundir, 'config.json')) or {}
  result = read_json(os.path.join(rundir, 'result.json'))
  finished = isinstance(result, dict) and 'best_top1' in result
  best = (result['best_top1'] if finished
          else max((_eval_top1(r) for r in eval_rows), default=None))
  epochs = [r['epoch'] for r in train_rows + eval_rows if 'epoch' in r]
  wall_s = result.get('wall_s') if finished else None
  return {
      'path': rundir,
      'seed': config.get('seed'),
      'finished': finished,
      'best': best,
      'final': result.get('final_top1') if finished else None,
      # Runs with dataset.test_split: the final student on the test split, read once.
      'test': result.get('test_top1') if finished else None,
      'step': max((r['step'] for r in train_rows + eval_rows), default=0),
      'epochs': max(epochs, default=0.0),
      'runtime_s': wall_s if wall_s is not None else estimated_runtime_s(train_rows),
      'curves': {
          'accuracy': [(r['epoch'], _eval_top1(r)) for r in eval_rows if 'epoch' in r],
          'loss': [(r['epoch'], r['train_loss']) for r in train_rows if 'epoch' in r],
      },
  }


# ----------------------------------------------------------------------------
# Runs -> experiments.

def find_runs(workdir):
  """Run directories (with a metrics.jsonl) at or below `workdir`, sorted by path."""
  found = []
  for path, dirs, files in os.walk(workdir):
    dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
    if 'metrics.jsonl' in files:
      found.append(path)
  return sorted(found, key=lambda p: os.path.relpath(p, workdir).split(os.sep))


def experiment_of(rundir, workdir):
  """(experiment name, seed from a `seed<N>` folder or None) of a run found under `workdir`."""
  rel = os.path.relpath(rundir, workdir)
  parts = [] if rel == '.' else rel.split(os.sep)
  if not parts:  # WORKDIR is the run itself: name it after its folder
    workdir = os.path.abspath(workdir)
    parts = [os.path.basename(workdir)]
    if _SEED_DIR.fullmatch(parts[0]):
      parts.insert(0, os.path.basename(os.path.dirname(workdir)))
  seed = None
  match = _SEED_DIR.fullmatch(parts[-1])
  if match and len(parts) > 1:
    seed, parts = int(match.group(1)), parts[:-1]
  elif match:  # WORKDIR is one experiment's folder, its runs the seeds
    seed, parts = int(match.group(1)), [os.path.basename(os.path.abspath(workdir))]
  return '/'.join(parts), seed


def _labels(workdirs):
  """Each WORKDIR's prefix for clashing experiment names: its basename, or its path if shared."""
  names = [os.path.basename(os.path.abspath(w)) for w in workdirs]
  return {w: n if names.count(n) == 1 else os.path.normpath(w) for w, n in zip(workdirs, names)}


def _gather(workdirs):
  """[(experiment name, [run, ...])] in order of first appearance; runs by seed."""
  workdirs = list(dict.fromkeys(workdirs))  # the same WORKDIR twice: once
  found, seen = [], set()  # nested WORKDIRs: each run once
  for workdir in workdirs:
    if not os.path.isdir(workdir):
      raise ReportError(f'WORKDIR {workdir} does not exist.')
    runs = find_runs(workdir)
    if not runs:
      raise ReportError(f'WORKDIR {workdir} holds no run (no metrics.jsonl below it).')
    found.extend((workdir, run) for run in runs if os.path.abspath(run) not in seen)
    seen.update(os.path.abspath(run) for run in runs)
  named = [(workdir, *experiment_of(run, workdir), run) for workdir, run in found]
  owners = {}
  for workdir, name, _, _ in named:
    owners.setdefault(name, set()).add(workdir)
  labels = _labels(workdirs)
  experiments = {}
  for workdir, name, dir_seed, rundir in named:
    if len(owners[name]) > 1:
      name = f'{labels[workdir]}/{name}'
    run = load_run(rundir)
    if run['seed'] is None:
      run['seed'] = dir_seed
    experiments.setdefault(name, []).append(run)
  return [(name, sorted(runs, key=_seed_order)) for name, runs in experiments.items()]


def _seed_order(run):
  return (run['seed'] is None, run['seed'] if run['seed'] is not None else 0, run['path'])


def _mean_std(values):
  if not values:
    return None, None
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _summary(name, runs):
  best = [r['best'] for r in runs if r['best'] is not None]
  final = [r['final'] for r in runs if r['final'] is not None]
  best_mean, best_std = _mean_std(best)
  final_mean, final_std = _mean_std(final)
  test = [r['test'] for r in runs if r.get('test') is not None]
  test_mean, test_std = _mean_std(test)
  return {
      'name': name,
      'seeds': [r['seed'] for r in runs],
      'finished': sum(r['finished'] for r in runs),
      'total': len(runs),
      'best': best, 'best_mean': best_mean, 'best_std': best_std,
      'final': final, 'final_mean': final_mean, 'final_std': final_std,
      'test': test, 'test_mean': test_mean, 'test_std': test_std,
      'epochs': [r['epochs'] for r in runs],
      # A running run's time so far would pull the mean down: finished runs when there are some.
      'runtime_min_mean': statistics.fmean(
          r['runtime_s'] for r in runs if r['finished'] or not any(q['finished'] for q in runs)) / 60,
      'runs': [{k: v for k, v in r.items() if k != 'curves'} for r in runs],
  }


def summarize(workdirs):
  """One dict per experiment (see the module docstring); raises ReportError for a bad WORKDIR."""
  return [_summary(name, runs) for name, runs in _gather(workdirs)]


# ----------------------------------------------------------------------------
# Output: Markdown, JSON, PNG.

def _fmt(value, digits=2):
  return '–' if value is None else f'{value:.{digits}f}'


def _fmt_epochs(values):
  low, high = (f'{v:.2f}'.rstrip('0').rstrip('.') for v in (min(values), max(values)))
  return low if low == high else f'{low}–{high}'


def _pm(s, key):
  return '–' if s[f'{key}_mean'] is None else f'{_fmt(s[f"{key}_mean"])} ± {_fmt(s[f"{key}_std"])}'


def markdown_table(summaries):
  """best/final: on the split evaluated during training; test: once at the end, when runs
  have a test split (a column only then)."""
  with_test = any(s['test'] for s in summaries)
  head = ['experiment', 'runs (finished/total)', 'best top-1', 'final top-1',
          *(['test top-1 (final)'] if with_test else []), 'epochs done', 'min per run',
          'best top-1 per seed']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for s in summaries:
    per_seed = ', '.join(
        f'seed {r["seed"]}: {_fmt(r["best"])}' + ('' if r['finished'] else ' (running)')
        for r in s['runs'])
    cells = [s['name'], f'{s["finished"]}/{s["total"]}', _pm(s, 'best'), _pm(s, 'final'),
             *([_pm(s, 'test')] if with_test else []), _fmt_epochs(s['epochs']),
             _fmt(s['runtime_min_mean'], 1), per_seed]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _band(curves):
  """(x, mean, min, max) over seeds at each epoch any seed reached."""
  by_x = {}
  for curve in curves:
    for x, y in curve:
      by_x.setdefault(round(x, 6), []).append(y)
  xs = sorted(by_x)
  return (xs, [statistics.fmean(by_x[x]) for x in xs], [min(by_x[x]) for x in xs],
          [max(by_x[x]) for x in xs])


def plot(experiments, kind, ylabel, title, path):
  """One line per experiment (mean over seeds) with a min-max band; `kind` names the curve."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  cmap = plt.get_cmap('tab10' if len(experiments) <= 10 else 'tab20')
  fig, ax = plt.subplots(figsize=(7, 4.5))
  drawn = 0
  for i, (name, runs) in enumerate(experiments):
    xs, mean, low, high = _band([r['curves'][kind] for r in runs])
    if not xs:
      continue
    color = cmap(i % cmap.N)
    style = ('-', '--', ':')[(i // cmap.N) % 3]  # more experiments than colours
    ax.plot(xs, mean, style, color=color, lw=1.5, marker='.' if len(xs) < 30 else None,
            label=f'{name} (n={len(runs)})' if len(runs) > 1 else name)
    if len(runs) > 1:
      ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)
    drawn += 1
  if not drawn:
    ax.text(0.5, 0.5, 'no data yet', ha='center', va='center', transform=ax.transAxes)
  else:
    many = drawn > 10
    ax.legend(fontsize='x-small' if many else 'small', ncol=2 if drawn > 20 else 1,
              **(dict(loc='upper left', bbox_to_anchor=(1.01, 1)) if many else {}))
  ax.set_xlabel('epoch')
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize='medium')
  ax.grid(alpha=0.3)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return path


def _title(workdirs):
  text = ', '.join(workdirs)
  return text if len(text) <= 60 else ', '.join(os.path.basename(os.path.abspath(w)) for w in workdirs)


def write_report(workdirs, out_dir):
  """Writes report.md, summary.json, accuracy.png, loss.png to out_dir; returns what it wrote."""
  experiments = _gather(workdirs)
  summaries = [_summary(name, runs) for name, runs in experiments]
  table = markdown_table(summaries)
  os.makedirs(out_dir, exist_ok=True)
  files = {name: os.path.join(out_dir, name)
           for name in ('report.md', 'summary.json', 'accuracy.png', 'loss.png')}
  where = _title(workdirs)
  with open(files['report.md'], 'w', encoding='utf-8') as f:
    f.write(f'# Runs in {where}\n\nTop-1 in %, best of raw and EMA; mean ± sample std over '
            f'seeds (– with one run). A run still training counts with its best so far; final '
            f'top-1 counts finished runs only.\n\n{table}')
  with open(files['summary.json'], 'w', encoding='utf-8') as f:
    json.dump({'workdirs': list(workdirs), 'experiments': summaries}, f, indent=2)
  plot(experiments, 'accuracy', 'eval top-1 (%), best of raw and EMA', f'Eval accuracy: {where}',
       files['accuracy.png'])
  plot(experiments, 'loss', 'train loss', f'Train loss: {where}', files['loss.png'])
  return {'experiments': summaries, 'table': table, 'files': files}


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m pat_jax.report', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('workdirs', nargs='+', metavar='WORKDIR')
  parser.add_argument('--out', help='output directory (default: FIRST_WORKDIR/report)')
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.workdirs[0], 'report')
  try:
    written = write_report(args.workdirs, out)
  except ReportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(written['table'])
  for path in written['files'].values():
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
