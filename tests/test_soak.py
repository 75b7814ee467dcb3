"""pat_jax.soak: the fits on synthetic samples, and one tiny soak of a real run through the CLI."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest
import xla_flags

from pat_jax import soak

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summarize_finds_known_slopes_per_1000_steps_after_warmup():
  # Before the first metrics row: no step. Warm-up (steps <= 100): far off the line, dropped.
  samples = [{'t': t, 'rss_mib': 900.0, 'step': None} for t in range(3)]
  samples += [{'t': 3 + s, 'rss_mib': 5000.0 if s <= 100 else 1000 + 0.05 * s, 'step': s}
              for s in range(0, 1001, 10)]
  rows = [(s, 10.0 if s <= 100 else 0.2 + 1e-5 * s) for s in range(20, 1001, 20)]
  r = soak.summarize(samples, rows, total_steps=1000)
  assert r['warmup_steps'] == 100
  rss, step_time = r['rss_mib'], r['step_time_s']
  kept = [s for s in range(110, 1001, 10)]
  assert rss['n'] == len(kept)
  assert rss['growth_per_1k_steps'] == pytest.approx(50.0)  # 0.05 MiB per step
  assert rss['mean'] == pytest.approx(1000 + 0.05 * sum(kept) / len(kept))
  assert rss['growth_pct_per_1k_steps'] == pytest.approx(100 * 50.0 / rss['mean'])
  assert (rss['min'], rss['max']) == (pytest.approx(1005.5), pytest.approx(1050.0))
  assert rss['peak_all'] == 5000.0  # the whole run, warm-up included
  assert step_time['n'] == len(range(120, 1001, 20))
  assert step_time['growth_per_1k_steps'] == pytest.approx(0.01)
  assert step_time['median'] == pytest.approx(0.2 + 1e-5 * 560)
  table = soak.markdown({**r, 'config': 'c.py', 'steps': 1000, 'batch_size': 16, 'checkpoints': 3,
                         'wall_s': 1.0, 'teacher_wall_s': 0.0, 'exit_code': 0})
  assert '| RSS (MiB) | 1027.8 |' in table and '| 50.00 |' in table


def test_warmup_runs_through_the_first_evaluation():
  train_steps = list(range(20, 1001, 20))
  assert soak.warmup_end(1000, train_steps) == 100
  assert soak.warmup_end(1000, train_steps, eval_steps=[500, 1000]) == 520
  assert soak.warmup_end(1000, train_steps, eval_steps=[40]) == 100  # 10% is later
  assert soak.warmup_end(30, [5, 10, 15, 20, 25, 30], eval_steps=[30]) == 3  # nothing after it
  # Memory returned at the first evaluation (step 500) is not a trend.
  samples = [{'t': s, 'rss_mib': 2500.0 if s <= 520 else 1700 + 0.02 * s, 'step': s}
             for s in range(0, 1001, 10)]
  r = soak.summarize(samples, [(s, 0.1) for s in train_steps], 1000, eval_steps=[500, 1000])
  assert r['warmup_steps'] == 520
  assert r['rss_mib']['growth_per_1k_steps'] == pytest.approx(20.0)
  assert r['rss_mib']['max'] < 1800 and r['rss_mib']['peak_all'] == 2500.0


def test_flat_and_empty_series():
  flat = soak.summarize([{'t': 0, 'rss_mib': 100.0, 'step': s} for s in (50, 60, 70)],
                        [(50, 0.5), (60, 0.5)], total_steps=100)
  assert flat['rss_mib']['growth_per_1k_steps'] == pytest.approx(0.0)
  assert flat['step_time_s']['growth_pct_per_1k_steps'] == pytest.approx(0.0)
  empty = soak.summarize([{'t': 0, 'rss_mib': None, 'step': None}], [], total_steps=100)
  assert empty['rss_mib']['n'] == 0 and empty['rss_mib']['growth_per_1k_steps'] is None
  assert soak.fit_line([5, 5], [1.0, 2.0]) is None  # one distinct step: no slope


def test_metrics_tail_reads_complete_lines_only(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  tail = soak.MetricsTail(str(path))
  assert tail.update() == [] and tail.latest_step() is None  # not there yet
  path.write_text('{"step": 20, "step_time_s": 0.5}\n{"step": 40, "step_ti')
  assert [r['step'] for r in tail.update()] == [20]
  with open(path, 'a', encoding='utf-8') as f:
    f.write('me_s": 0.4}\n{"step": 40, "eval_top1": 90.0}\n')
  assert [r['step'] for r in tail.update()] == [20, 40, 40]
  assert tail.latest_step() == 40


def test_teacher_is_trained_first_only_when_the_config_trains_one():
  c = ml_collections.ConfigDict({'teacher': {'name': 'mini_convnext', 'checkpoint': '',
                                             'workdir': '/t', 'pretrain': {'seed': 0}}})
  assert soak.teacher_to_train(c) == '/t'
  c.teacher.checkpoint = '/given'
  assert soak.teacher_to_train(c) is None
  c.teacher.checkpoint, c.teacher.name = '', ''  # digits_demo.py:none
  assert soak.teacher_to_train(c) is None


def test_cli_help():
  out = subprocess.run([sys.executable, '-m', 'pat_jax.soak', '--help'], cwd=REPO,
                       capture_output=True, text=True, check=True, timeout=60).stdout
  for flag in ('--steps', '--batch-size', '--checkpoint-every', '--eval-every', '--log-every',
               '--sample-every', '--set', '--out', '--teacher-dir'):
    assert flag in out


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections
def test_tiny_soak_of_a_real_run(tmp_path, monkeypatch, capsys):
  """The CLI's main() in this process (whose TensorFlow import the config parsing reuses), the
  measured training run in a child process, as `python -m pat_jax.soak` does."""
  wd, data_dir = str(tmp_path / 'run'), str(tmp_path / 'tfds')
  monkeypatch.chdir(REPO)
  monkeypatch.setenv('XLA_FLAGS', xla_flags.flags(1))  # the child's
  code = soak.main([f'--workdir={wd}', '--config=configs/digits_demo.py:none', '--steps', '30',
                    '--checkpoint-every', '10', '--eval-every', '30', '--log-every', '5',
                    '--sample-every', '0.5', '--set', 'model.name=mini_resnet',
                    '--set', f'dataset.data_dir={data_dir}'])
  out = capsys.readouterr()
  assert code == 0, out.out + out.err
  assert '| RSS (MiB) |' in out.out and '| step time (s) |' in out.out
  with open(os.path.join(wd, 'soak.json'), encoding='utf-8') as f:
    result = json.load(f)
  assert {'command', 'config', 'steps', 'batch_size', 'warmup_steps', 'exit_code', 'interrupted',
          'teacher_wall_s', 'wall_s', 'checkpoints', 'rss_mib', 'step_time_s', 'samples',
          'train_rows'} <= set(result)
  assert {'mean', 'min', 'max', 'peak_all', 'growth_per_1k_steps', 'growth_pct_per_1k_steps',
          'n'} <= set(result['rss_mib'])
  assert {'mean', 'median', 'min', 'max', 'growth_per_1k_steps', 'growth_pct_per_1k_steps',
          'n'} <= set(result['step_time_s'])
  assert result['exit_code'] == 0 and not result['interrupted']
  # digits_demo.py:none has no teacher (teacher.name ''): none is trained.
  assert result['teacher_wall_s'] == 0 and not os.path.exists(os.path.join(wd, 'teacher'))
  assert [step for step, _ in result['train_rows']] == [5, 10, 15, 20, 25, 30]
  assert result['samples'] and max(s['rss_mib'] or 0 for s in result['samples']) > 100
  assert max(s['step'] or 0 for s in result['samples']) > 0
  assert result['warmup_steps'] == 3  # the only evaluation is the last step
  assert result['rss_mib']['n'] > 0 and result['step_time_s']['n'] == 6
  assert 1 <= result['checkpoints'] <= 3
  assert os.path.getsize(os.path.join(wd, 'soak_log.txt')) > 0
  with pytest.raises(SystemExit, match='earlier run'):  # a soak needs a new workdir
    soak.main([f'--workdir={wd}'])
