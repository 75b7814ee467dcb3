"""Faults on one host: a damaged checkpoint, a kill during a save, a full disk, a NaN.

Each ends with nothing good lost: the run resumes from the newest whole checkpoint (equal to an
uninterrupted run), damaged steps are moved aside (never deleted), metrics.jsonl holds each
step once. Runs are the tiny supervised digits run (mini_resnet, batch 16) of test_train.py.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import xla_flags

from pat_jax import checkpoint, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_SCRIPT = os.path.join(REPO, 'tests', 'kill_during_save.py')


def _demo_config(arg):
  spec = importlib.util.spec_from_file_location('digits_demo', os.path.join(REPO, 'configs', 'digits_demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny(data_dir, total_steps, **overrides):
  """Supervised mini_resnet on the digits: checkpoints at every 2nd step, one evaluation at 4."""
  c = _demo_config('none')
  c.dataset.data_dir = data_dir
  c.model.name = 'mini_resnet'
  c.batch_size = 16
  c.total_steps = total_steps
  c.log_every_steps = 1
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 2
  c.update_from_flattened_dict(overrides)
  return c


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _assert_each_step_once(workdir, last_step):
  rows = _rows(workdir)
  train_steps = [r['step'] for r in rows if 'train_loss' in r]
  assert train_steps == list(range(1, last_step + 1))
  eval_steps = [r['step'] for r in rows if 'eval_top1' in r]
  assert len(eval_steps) == len(set(eval_steps))


def _final(workdir, item='variables'):
  return checkpoint.load_variables(os.path.join(workdir, 'checkpoints'), item=item)


def _assert_same_parameters(a, b):
  for item in ('variables', 'ema'):
    x, y = _final(a, item), _final(b, item)
    assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)
    for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def four_steps(data_dir, tmp_path_factory):
  """A run stopped after step 4: checkpoints at steps 2 and 4."""
  wd = str(tmp_path_factory.mktemp('four') / 'run')
  train.train_and_evaluate(tiny(data_dir, 4), wd)
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['2', '4']
  return wd


@pytest.fixture(scope='module')
def six_steps(data_dir, tmp_path_factory):
  """The uninterrupted reference: 6 steps in one go."""
  wd = str(tmp_path_factory.mktemp('six') / 'run')
  train.train_and_evaluate(tiny(data_dir, 6), wd)
  return wd


def _copy(run, tmp_path):
  wd = str(tmp_path / 'run')
  shutil.copytree(run, wd)
  return wd


def _damage(step_dir, how):
  if how == 'truncated':  # the largest array file of the training state, cut in half
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, 'train')) for f in fs]
    victim = max(files, key=os.path.getsize)
    with open(victim, 'r+b') as f:
      f.truncate(os.path.getsize(victim) // 2)
  elif how == 'missing':  # the student's array index gone
    os.remove(os.path.join(step_dir, 'variables', 'manifest.ocdbt'))
  elif how == 'garbage_json':
    with open(os.path.join(step_dir, 'meta', 'metadata'), 'w', encoding='utf-8') as f:
      f.write('{"step": 4, "best": ')
  else:
    raise ValueError(how)


@pytest.mark.parametrize('how', ['truncated', 'missing', 'garbage_json'])
def test_damaged_newest_step_falls_back_to_the_previous_one(data_dir, four_steps, six_steps,
                                                             tmp_path, how, caplog):
  wd = _copy(four_steps, tmp_path)
  _damage(os.path.join(wd, 'checkpoints', '4'), how)
  caplog.set_level('WARNING')
  result = train.train_and_evaluate(tiny(data_dir, 6), wd)
  assert result['status'] == 'done' and result['step'] == 6
  assert 'Checkpoint step 4 is damaged' in caplog.text
  aside = os.path.join(wd, 'checkpoints', 'damaged', '4')
  assert os.path.isdir(aside)  # kept, not deleted
  with open(aside + '.reason.txt', encoding='utf-8') as f:
    assert 'Cannot restore step 4' in f.read()
  _assert_same_parameters(wd, six_steps)  # resumed at step 2: as if never interrupted
  _assert_each_step_once(wd, 6)  # the rows of steps 3 and 4 of the first start were dropped


def test_no_whole_step_is_an_error_that_moves_nothing(data_dir, four_steps, tmp_path):
  wd = _copy(four_steps, tmp_path)
  for step in ('2', '4'):
    _damage(os.path.join(wd, 'checkpoints', step), 'garbage_json')
  with pytest.raises(checkpoint.CheckpointError, match=r'Cannot restore step 4 .*No older step '
                     r'restores either \(tried steps \[4, 2\]\), so nothing was moved'):
    train.train_and_evaluate(tiny(data_dir, 6), wd)
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['2', '4']


def test_strict_mode_stops_at_a_damaged_step(data_dir, four_steps, tmp_path):
  wd = _copy(four_steps, tmp_path)
  _damage(os.path.join(wd, 'checkpoints', '4'), 'missing')
  with pytest.raises(checkpoint.CheckpointError, match='Cannot restore step 4.*checkpoint_strict=True'):
    train.train_and_evaluate(tiny(data_dir, 6, checkpoint_strict=True), wd)
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['2', '4']


def test_nonfinite_loss_names_the_terms_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  wd = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match=r'Non-finite grad_norm, loss_ce, train_loss at step 3 '
                     r'\(grad_norm=nan, loss_ce=nan, train_loss=nan\).*step 2\) is from before it'):
    train.train_and_evaluate(tiny(data_dir, 4, debug_nan_at_step=3), wd)
  assert os.listdir(os.path.join(wd, 'checkpoints')) == ['2']  # the NaN state was never saved


def test_skip_nonfinite_steps_skips_the_bad_update_and_finishes(data_dir, four_steps, tmp_path):
  wd = str(tmp_path / 'skip')
  result = train.train_and_evaluate(tiny(data_dir, 4, debug_nan_at_step=3, skip_nonfinite_steps=1), wd)
  assert result['status'] == 'done' and result['skipped_nonfinite'] == [3]
  rows = [r for r in _rows(wd) if 'train_loss' in r]
  assert [r['skipped_nonfinite'] for r in rows] == [0, 0, 1, 1]
  assert not np.isfinite(rows[2]['train_loss']) and np.isfinite(rows[3]['train_loss'])
  final = _final(wd)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(final))
  # Step 3 changed nothing but the step: the run differs from the clean one from step 3 on.
  clean = _final(four_steps)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(final),
                                                       jax.tree_util.tree_leaves(clean)))


def test_full_disk_is_a_clear_error_and_the_run_resumes_after(data_dir, four_steps, tmp_path,
                                                              monkeypatch):
  """The free-space check before a save (a real small tmpfs where the machine lets us mount one)."""
  wd = _copy(four_steps, tmp_path)
  mount = str(tmp_path / 'small')
  os.makedirs(mount)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mount],
                           capture_output=True, check=False).returncode == 0
  try:
    if mounted:
      small = os.path.join(mount, 'run')
      shutil.copytree(wd, small)
    else:  # no mount permission: the same check against a disk that reports 1 MiB free
      small = wd
      real = shutil.disk_usage
      monkeypatch.setattr(checkpoint.shutil, 'disk_usage',
                          lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(checkpoint.DiskFullError, match=r'No room to save checkpoint step 6 in '
                       rf'{small}/checkpoints: it needs about .* MiB \(\d+ bytes\) and .* MiB are '
                       r'free\. The earlier checkpoints are intact \(newest: step 4\)'):
      train.train_and_evaluate(tiny(data_dir, 6), small)
    assert sorted(d for d in os.listdir(os.path.join(small, 'checkpoints'))
                  if 'tmp' not in d) == ['2', '4']
    if mounted:
      shutil.rmtree(wd)
      shutil.copytree(small, wd)  # "space freed": the workdir moved to a roomy disk
  finally:
    if mounted:
      subprocess.run(['umount', mount], check=True)
    monkeypatch.undo()
  result = train.train_and_evaluate(tiny(data_dir, 6), wd)
  assert result['step'] == 6
  _assert_each_step_once(wd, 6)


def _subprocess_flags(data_dir, wd, total_steps):
  return [f'--config={REPO}/configs/digits_demo.py:none', f'--workdir={wd}',
          f'--config.dataset.data_dir={data_dir}', '--config.model.name=mini_resnet',
          '--config.batch_size=16', f'--config.total_steps={total_steps}',
          '--config.log_every_steps=1', '--config.eval_every_steps=4',
          '--config.checkpoint_every_steps=2']


def _run(argv, file_limit=None, timeout=900):
  """(exit code, output) of `python ARGV...`; `file_limit`: RLIMIT_FSIZE in bytes (`ulimit -f`)."""
  # Output through a pipe: a file would fall under the file-size limit too.
  env = dict(os.environ, PYTHONUNBUFFERED='1', XLA_FLAGS=xla_flags.flags(2))
  cmd = [sys.executable, *argv]
  if file_limit:
    cmd = ['bash', '-c', f'ulimit -f {file_limit // 1024} && exec "$@"', 'bash', *cmd]
  proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=timeout, check=False)
  return proc.returncode, proc.stdout


def test_file_size_limit_while_saving_is_a_clear_error(data_dir, four_steps, tmp_path):
  """A write that fails for lack of room (EFBIG under RLIMIT_FSIZE): clear error, exit non-zero,
  earlier steps intact; the next start without the limit resumes and finishes."""
  wd = _copy(four_steps, tmp_path)
  limit = 64 << 10  # the metrics and logs fit, the training state's array files do not
  code, out = _run(['-m', 'pat_jax.main', *_subprocess_flags(data_dir, wd, 6)], file_limit=limit)
  assert code != 0, out[-3000:]
  # One line of its own, at the end (orbax's writer threads may still print after it).
  lines = [l for l in out.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and lines[0].startswith('error: No room to save checkpoint step 6 in '), \
      out[-3000:]
  assert 'the disk, a quota or a file-size limit ran out' in lines[0] and 'newest: step 4' in lines[0]
  steps = sorted(d for d in os.listdir(os.path.join(wd, 'checkpoints')) if d.isdigit())
  assert steps == ['2', '4']
  assert not os.path.exists(os.path.join(wd, 'checkpoints', 'damaged'))
  code, out = _run(['-m', 'pat_jax.main', *_subprocess_flags(data_dir, wd, 6)])
  assert code == 0, out[-3000:]
  assert 'Resumed from' in out


@pytest.fixture(scope='module')
def eight_steps_subprocess(data_dir, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('eight') / 'run')
  code, out = _run(['-m', 'pat_jax.main', *_subprocess_flags(data_dir, wd, 8)])
  assert code == 0, out[-3000:]
  return wd


@pytest.mark.parametrize('point', ['item_written', 'before_rename', 'after_rename'])
def test_sigkill_during_an_async_save_resumes_exactly(data_dir, eight_steps_subprocess, tmp_path,
                                                      point):
  wd = str(tmp_path / 'run')
  code, out = _run([KILL_SCRIPT, point, '4', *_subprocess_flags(data_dir, wd, 8)])
  assert code == -9, out[-3000:]  # died by SIGKILL inside the save of step 4
  complete = sorted(d for d in os.listdir(os.path.join(wd, 'checkpoints')) if d.isdigit())
  assert complete == (['2', '4'] if point == 'after_rename' else ['2'])
  code, out = _run(['-m', 'pat_jax.main', *_subprocess_flags(data_dir, wd, 8)])
  assert code == 0, out[-3000:]
  assert f'Resumed from {wd}/checkpoints at step {4 if point == "after_rename" else 2}' in out
  assert not any('orbax-checkpoint-tmp' in d for d in os.listdir(os.path.join(wd, 'checkpoints')))
  _assert_same_parameters(wd, eight_steps_subprocess)
  _assert_each_step_once(wd, 8)
