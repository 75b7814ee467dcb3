"""pat_jax.report on fake run directories: numbers, resume duplicates, plots, CLI errors."""
import json
import os
import subprocess
import sys

import pytest

from pat_jax import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b'\x89PNG\r\n\x1a\n'


def _write_run(rundir, evals, seed=None, result=None, stale_evals=()):
  """A run directory like pat_jax.main leaves: 10 steps per epoch, one eval per epoch.

  evals: [(raw top-1, EMA top-1)] per epoch. stale_evals: rows a killed run wrote before
  resuming and rewriting the same steps (the later rows must win).
  """
  os.makedirs(rundir)
  rows = []
  for epoch, (raw, ema) in enumerate(evals, start=1):
    step = 10 * epoch
    rows.append({'step': step, 'train_loss': 3.0 / epoch, 'loss_ce': 1.0, 'lr': 0.1,
                 'step_time_s': 0.5, 'img_per_s': 100.0, 'eta_s': 1.0, 'epoch': float(epoch)})
    rows.append({'step': step, 'eval_top1': raw, 'eval_top5': 99.0, 'ema_eval_top1': ema,
                 'ema_eval_top5': 99.0, 'epoch': float(epoch), 'best_top1': 0.0})
  stale = [{'step': 10 * epoch, 'eval_top1': raw, 'ema_eval_top1': ema, 'epoch': float(epoch)}
           for epoch, (raw, ema) in stale_evals]
  with open(os.path.join(rundir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    for row in stale + rows:
      f.write(json.dumps(row) + '\n')
  if seed is not None:
    with open(os.path.join(rundir, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump({'seed': seed, 'model': {'name': 'mini_deit'}}, f)
  if result is not None:
    with open(os.path.join(rundir, 'result.json'), 'w', encoding='utf-8') as f:
      json.dump({'status': 'done', 'step': 10 * len(evals), 'best_source': 'ema', **result}, f)


@pytest.fixture
def roots(tmp_path):
  """Two WORKDIRs: a/ with pat (2 finished seeds), kd (1 finished, 1 running), a teacher; b/ with pat."""
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _write_run(f'{a}/pat/seed0', [(50, 55), (70, 72)], seed=0,
             result={'best_top1': 72.0, 'final_top1': 70.0, 'wall_s': 120.0})
  _write_run(f'{a}/pat/seed1', [(60, 61), (74, 73)], seed=1,
             result={'best_top1': 74.0, 'final_top1': 71.0, 'wall_s': 180.0})
  _write_run(f'{a}/kd/seed0', [(58, 60), (58, 59)], seed=0,
             result={'best_top1': 60.0, 'final_top1': 58.0})  # no wall_s: from step times
  # Running, no config.json (seed from the folder); killed once after writing 90% at step 20.
  _write_run(f'{a}/kd/seed1', [(40, 45), (50, 52)], stale_evals=[(2, (90, 10))])
  _write_run(f'{a}/teacher', [(80, 81)], seed=42, result={'best_top1': 81.0, 'final_top1': 80.0})
  _write_run(f'{b}/pat/seed3', [(10, 11)], seed=3, result={'best_top1': 11.0, 'final_top1': 10.0})
  return a, b


def test_summary_numbers_and_files(roots, tmp_path):
  a, _ = roots
  written = report.write_report([a], str(tmp_path / 'out'))
  with open(tmp_path / 'out' / 'summary.json', encoding='utf-8') as f:
    summary = {e['name']: e for e in json.load(f)['experiments']}
  assert list(summary) == ['kd', 'pat', 'teacher']  # sorted by path

  pat, kd = summary['pat'], summary['kd']
  assert pat['seeds'] == [0, 1] and (pat['finished'], pat['total']) == (2, 2)
  assert pat['best'] == [72.0, 74.0] and pat['best_mean'] == pytest.approx(73.0)
  assert pat['best_std'] == pytest.approx(2 ** 0.5)  # sample std (ddof=1)
  assert pat['final_mean'] == pytest.approx(70.5) and pat['final_std'] == pytest.approx(0.5 ** 0.5)
  assert pat['runtime_min_mean'] == pytest.approx(2.5)

  assert kd['seeds'] == [0, 1] and (kd['finished'], kd['total']) == (1, 2)
  assert kd['best'] == [60.0, 52.0]  # the running seed: its best so far, the resumed step 20 row
  assert kd['best_std'] == pytest.approx(32 ** 0.5)
  assert kd['final'] == [58.0] and kd['final_std'] is None
  assert kd['runtime_min_mean'] == pytest.approx(10 / 60)  # 20 steps x 0.5 s, finished run only
  assert kd['epochs'] == [2.0, 2.0]
  assert summary['teacher']['seeds'] == [42]

  with open(written['files']['report.md'], encoding='utf-8') as f:
    md = f.read()
  pat_row = next(line for line in md.splitlines() if line.startswith('| pat |'))
  assert '| 2/2 | 73.00 ± 1.41 | 70.50 ± 0.71 | 2 | 2.5 |' in pat_row
  assert 'seed 0: 72.00, seed 1: 74.00' in pat_row
  kd_row = next(line for line in md.splitlines() if line.startswith('| kd |'))
  assert '| 1/2 | 56.00 ± 5.66 | 58.00 ± – |' in kd_row
  assert 'seed 1: 52.00 (running)' in kd_row
  for name in ('accuracy.png', 'loss.png'):
    with open(tmp_path / 'out' / name, 'rb') as f:
      data = f.read()
    assert data.startswith(PNG) and len(data) > 1000


def test_clashing_names_of_two_workdirs_are_prefixed(roots):
  a, b = roots
  names = [e['name'] for e in report.summarize([a, b])]
  assert names == ['kd', 'a/pat', 'teacher', 'b/pat']
  # A WORKDIR that is one experiment's folder, or one run, is named after that folder.
  assert [e['name'] for e in report.summarize([f'{a}/pat'])] == ['pat']
  [one] = report.summarize([f'{a}/pat/seed1'])
  assert (one['name'], one['seeds']) == ('pat', [1])


def _cli(*args):
  # Also checks the fast start: no JAX or TensorFlow behind the report.
  code = ('import sys; from pat_jax import report; rc = report.main(sys.argv[1:]); '
          'assert not {"jax", "tensorflow"} & set(sys.modules), "imported jax/tf"; sys.exit(rc)')
  return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True,
                        cwd=REPO, timeout=120)


def test_cli_prints_the_table_and_writes_to_workdir_report(roots):
  a, _ = roots
  proc = _cli(a)
  assert proc.returncode == 0, proc.stderr
  assert '| pat | 2/2 | 73.00 ± 1.41 |' in proc.stdout
  assert f'wrote {os.path.join(a, "report", "accuracy.png")}' in proc.stdout
  assert os.path.getsize(os.path.join(a, 'report', 'loss.png')) > 1000


@pytest.mark.parametrize('what', ['missing', 'empty'])
def test_bad_workdir_is_one_line_and_exit_2(tmp_path, what):
  path = tmp_path / 'nothing'
  if what == 'empty':
    (path / 'sub').mkdir(parents=True)
  proc = subprocess.run([sys.executable, '-m', 'pat_jax.report', str(path)], capture_output=True,
                        text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and str(path) in proc.stderr


def test_test_split_column(tmp_path):
  """Runs with a test split (result.json test_top1) get a test column; others do not."""
  root = str(tmp_path / 'r')
  for seed, test in ((0, 80.0), (1, 84.0)):
    _write_run(f'{root}/pat/seed{seed}', [(70, 71)], seed=seed,
               result={'best_top1': 71.0, 'final_top1': 70.0, 'test_top1': test})
  [pat] = report.summarize([root])
  assert pat['test'] == [80.0, 84.0] and pat['test_mean'] == pytest.approx(82.0)
  assert pat['test_std'] == pytest.approx(8 ** 0.5)
  table = report.markdown_table([pat])
  assert 'test top-1 (final)' in table and '82.00 ± 2.83' in table
  pat['test'], pat['test_mean'], pat['test_std'] = [], None, None
  assert 'test top-1' not in report.markdown_table([pat])
