"""pat_jax.sweep: a real tiny sweep (run, resume, skip), dry run, failures and Ctrl-C/SIGTERM."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import xla_flags

from pat_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'digits_demo.py')
# The student alone on the digits, 4 steps: a few seconds of training after compilation.
TINY = ['--set=total_steps=4', '--set=batch_size=16', '--set=log_every_steps=1',
        '--set=eval_every_steps=2', '--set=checkpoint_every_steps=2', '--set=model.name=mini_resnet']


def _sweep(root, data_dir, *extra, timeout=600):
  # One device; the rest (fast compilation, the session's compilation cache, offline, CPU) is
  # inherited from tests/conftest.py.
  env = dict(os.environ, XLA_FLAGS=xla_flags.flags(1))
  return subprocess.run([sys.executable, '-m', 'pat_jax.sweep', f'--config={CONFIG}', '--arg=none',
                         '--seeds=0', f'--workdir={root}', *TINY, f'--set=dataset.data_dir={data_dir}',
                         *extra], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def _read(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def test_run_then_resume_then_skip(tmp_path):
  root, data_dir = str(tmp_path / 'root'), str(tmp_path / 'tfds')
  rundir = os.path.join(root, 'none', 'seed0')
  first = _sweep(root, data_dir)
  assert first.returncode == 0, first.stdout + first.stderr + _read(os.path.join(rundir, 'log.txt'))[-3000:]
  assert f'run none seed 0 in {rundir}' in first.stdout
  assert 'done none seed 0: best ' in first.stdout
  result = json.loads(_read(os.path.join(rundir, 'result.json')))
  assert result['step'] == 4
  config = json.loads(_read(os.path.join(rundir, 'config.json')))
  assert config['seed'] == 0 and config['total_steps'] == 4
  assert config['teacher']['workdir'] == os.path.join(root, 'teacher')

  # Unfinished: the run "died" after its step-2 checkpoint.
  os.remove(os.path.join(rundir, 'result.json'))
  shutil.rmtree(os.path.join(rundir, 'checkpoints', '4'))
  second = _sweep(root, data_dir, '--report')
  log = _read(os.path.join(rundir, 'log.txt'))
  assert second.returncode == 0, second.stdout + second.stderr + log[-3000:]
  assert 'resume none seed 0' in second.stdout
  assert 'Resumed from' in log and log.count('==== ') == 2  # one header per sweep
  again = json.loads(_read(os.path.join(rundir, 'result.json')))
  assert again['best_top1'] == result['best_top1'] and again['final_top1'] == result['final_top1']
  assert '| none | 1/1 |' in second.stdout  # --report
  assert os.path.isfile(os.path.join(root, 'report', 'accuracy.png'))

  mtime = os.path.getmtime(os.path.join(rundir, 'result.json'))
  third = _sweep(root, data_dir, timeout=120)
  assert third.returncode == 0, third.stderr
  assert f'skip none seed 0: done, best {result["best_top1"]:.2f}' in third.stdout
  assert os.path.getmtime(os.path.join(rundir, 'result.json')) == mtime
  assert _read(os.path.join(rundir, 'log.txt')).count('==== ') == 2  # nothing was started


def test_dry_run_prints_the_commands(tmp_path, capsys):
  root = str(tmp_path / 'root')
  code = sweep.main(['--config=configs/x.py', '--arg=no_raa,no_afp', '--arg=fraction=0.25,student',
                     '--arg=', '--seeds=0,2', f'--workdir={root}', '--set=num_epochs=3', '--dry_run'])
  assert code == 0
  lines = capsys.readouterr().out.strip().splitlines()
  teacher = f'--config.teacher.workdir={root}/teacher'
  def line(arg, seed):
    folder = arg.replace(',', '+') or 'default'
    config = f'configs/x.py:{arg}' if arg else 'configs/x.py'
    return (f'{sys.executable} -m pat_jax.main --config={config} --workdir={root}/{folder}/seed{seed} '
            f'--config.seed={seed} {teacher} --config.num_epochs=3')
  # Seed-major: every argument at seed 0 first, so a grid stopped half-way holds paired runs.
  assert lines == [line(arg, seed) for seed in (0, 2)
                   for arg in ('no_raa,no_afp', 'fraction=0.25,student', '')]
  assert not os.path.exists(root)


def test_a_failed_run_does_not_stop_the_sweep(tmp_path, monkeypatch, capsys):
  def fake(config, arg, seed, rundir, root, sets):
    del config, root, sets
    if seed == 0:
      body = 'print("\\n".join(f"line {i}" for i in range(9))); raise SystemExit(3)'
    else:
      body = ('import json, sys; json.dump({"best_top1": 50.0, "final_top1": 49.0, "wall_s": 60}, '
              f'open({os.path.join(rundir, "result.json")!r}, "w"))')
    return [sys.executable, '-c', body, arg]

  monkeypatch.setattr(sweep, 'command', fake)
  assert sweep.run_sweep('x.py', ['a,b'], [0, 1], str(tmp_path)) == 1
  out = capsys.readouterr().out
  log = os.path.join(str(tmp_path), 'a+b', 'seed0', 'log.txt')
  assert f'FAILED a+b seed 0 (exit code 3), see {log}:\n  line 4\n' in out
  assert 'line 3' not in out and 'line 8' in out  # the last 5 lines
  assert 'done a+b seed 1: best 50.00, final 49.00, 1.0 min' in out


_STOPPABLE = r'''
import os, signal, sys, time
from pat_jax import sweep

def command(config, arg, seed, rundir, root, sets):
  # A run that checkpoints and exits 0 on SIGTERM, like pat_jax.main.
  body = ('import signal, sys, time, pathlib; p = pathlib.Path(sys.argv[1]); '
          'signal.signal(signal.SIGTERM, lambda *_: (p.joinpath("got_sigterm").touch(), sys.exit(0))); '
          'p.joinpath("started").touch(); time.sleep(60)')
  return [sys.executable, '-c', body, rundir]

sweep.command = command
sys.exit(sweep.main(sys.argv[1:]))
'''


def test_sigterm_stops_the_child_and_the_sweep(tmp_path):
  root = str(tmp_path / 'root')
  proc = subprocess.Popen([sys.executable, '-c', _STOPPABLE, '--config=x.py', '--seeds=0,1',
                           f'--workdir={root}'], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  started = os.path.join(root, 'default', 'seed0', 'started')
  deadline = time.time() + 60
  while not os.path.exists(started):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 130, out
  assert os.path.exists(os.path.join(root, 'default', 'seed0', 'got_sigterm'))
  assert not os.path.exists(os.path.join(root, 'default', 'seed1'))  # no new run
  assert 'stopped default seed 0 before the end (checkpoint saved)' in out



def test_progress_line_reads_the_newest_metrics(tmp_path):
  rundir = str(tmp_path)
  assert sweep._progress(rundir) is None  # nothing written yet
  rows = [{'step': 20, 'train_loss': 2.5, 'epoch': 1.0, 'eta_s': 130.0},
          {'step': 20, 'eval_top1': 40.0, 'ema_eval_top1': 45.5, 'epoch': 1.0},
          {'step': 40, 'train_loss': 1.25, 'epoch': 2.0, 'eta_s': 65.0}]
  with open(os.path.join(rundir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  assert sweep._progress(rundir) == 'epoch 2.0, loss 1.250, eval top-1 45.5, ETA 1:05'


def test_runs_share_a_compilation_cache(tmp_path, monkeypatch):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  assert sweep._child_env(str(tmp_path))['JAX_COMPILATION_CACHE_DIR'] == str(tmp_path / '.jax_cache')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/elsewhere')  # the user's choice wins
  assert sweep._child_env(str(tmp_path))['JAX_COMPILATION_CACHE_DIR'] == '/elsewhere'
