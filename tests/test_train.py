"""The training engine end to end on the real (offline) digits dataset.

Device-count independence, exact resume of a PAT run after SIGTERM (bit for bit on CPU; SIGKILL
is test_faults.py's), --mode=eval against the logged accuracy, two processes against one, teacher
and config errors.
"""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import xla_flags

from pat_jax import checkpoint, evaluate, models, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The digits, built here: runs started at once must not all build them into one folder."""
  from pat_jax.data import digits
  path = str(tmp_path_factory.mktemp('tfds'))
  digits.prepare(path)
  return path


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A random mini_convnext teacher saved as a pat_jax checkpoint (PAT needs one)."""
  path = str(tmp_path_factory.mktemp('teacher') / 'ckpt')
  model = models.create('mini_convnext', num_classes=10)
  variables = jax.jit(model.init)(jax.random.PRNGKey(7), np.zeros((1, 32, 32, 3), np.float32))
  checkpoint.save_variables(path, jax.device_get(variables), {'model': 'mini_convnext', 'num_classes': 10})
  return path


def _demo_config(arg):
  spec = importlib.util.spec_from_file_location('digits_demo', os.path.join(REPO, 'configs', 'digits_demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(data_dir, method='none', teacher=None, **overrides):
  """configs/digits_demo.py made tiny: a few steps of a small student on the real digits."""
  c = _demo_config(method)
  c.dataset.data_dir = data_dir
  c.model.name = 'mini_resnet' if method != 'pat' else 'mini_deit'
  c.teacher.name, c.teacher.checkpoint = ('mini_convnext', teacher) if teacher else ('', '')
  c.batch_size = 16
  c.total_steps = 6
  c.log_every_steps = 1
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 2
  c.method.raa_dim = 32
  c.update_from_flattened_dict(overrides)
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _final(workdir, item='variables'):
  return checkpoint.load_variables(os.path.join(workdir, 'checkpoints'), item=item)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def test_one_and_eight_devices_give_the_same_training(data_dir, tmp_path):
  runs = {}
  for n in (1, 8):
    wd = str(tmp_path / f'dev{n}')
    train.train_and_evaluate(tiny_config(data_dir, num_devices=n, total_steps=4), wd)
    runs[n] = wd
  l1 = [m['train_loss'] for m in _metrics(runs[1]) if 'train_loss' in m]
  l8 = [m['train_loss'] for m in _metrics(runs[8]) if 'train_loss' in m]
  assert len(l1) == 4
  np.testing.assert_allclose(l1, l8, rtol=0, atol=1e-5)
  p1, p8 = _final(runs[1]), _final(runs[8])
  # float32 sums over 1 or 8 shards differ in order: equal to ~1e-6 relative.
  for x, y in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5, atol=1e-5)


def test_workdir_contents_and_eval_mode_reproduces_logged_accuracy(data_dir, tmp_path):
  wd = str(tmp_path / 'run')
  result = train.train_and_evaluate(tiny_config(data_dir), wd)
  assert {'checkpoints', 'metrics.jsonl', 'config.json', 'result.json', 'tensorboard'} <= set(os.listdir(wd))
  rows = _metrics(wd)
  assert all('step' in r for r in rows)
  assert any('loss_ce' in r and 'lr' in r and 'img_per_s' in r for r in rows)
  last_eval = [r for r in rows if 'eval_top1' in r][-1]
  assert {'eval_top5', 'ema_eval_top1', 'ema_eval_top5'} <= set(last_eval)
  assert result['best_top1'] == max(max(r['eval_top1'], r['ema_eval_top1']) for r in rows if 'eval_top1' in r)
  cfg = tiny_config(data_dir)
  got = evaluate.evaluate_checkpoint(cfg, wd)
  assert got['step'] == 6 and got['num_examples'] == 297
  assert got['top1'] == pytest.approx(last_eval['eval_top1'], abs=1e-9)
  ema = evaluate.evaluate_checkpoint(cfg, wd, ema=True)
  assert ema['top1'] == pytest.approx(last_eval['ema_eval_top1'], abs=1e-9)
  # The CLI prints exactly one JSON line with the four keys. It keeps its compiled programs in
  # the persistent cache (--compilation_cache): a second start compiles nothing new.
  cache = tmp_path / 'jax_cache'

  def eval_cli():
    return subprocess.run([sys.executable, '-m', 'pat_jax.main', f'--config={REPO}/configs/digits_demo.py:none',
                           f'--checkpoint={wd}', '--mode=eval', f'--config.dataset.data_dir={data_dir}',
                           f'--compilation_cache={cache}'],
                          capture_output=True, text=True, check=True, cwd=REPO, timeout=300).stdout
  out = eval_cli()
  line = json.loads(out.strip().splitlines()[-1])
  assert set(line) == {'top1', 'top5', 'num_examples', 'step'}
  assert line['top1'] == pytest.approx(last_eval['eval_top1'], abs=1e-3)
  entries = sorted(os.listdir(cache))
  assert entries
  assert json.loads(eval_cli().strip().splitlines()[-1]) == line
  assert sorted(os.listdir(cache)) == entries


class _Run:
  """A training subprocess whose output goes to a file (a pipe nobody reads fills up and blocks it)."""

  def __init__(self, args, env):
    self._log = tempfile.TemporaryFile(mode='w+')
    self.proc = subprocess.Popen([sys.executable, '-m', 'pat_jax.main', *args], cwd=REPO, env=env,
                                 stdout=self._log, stderr=subprocess.STDOUT, text=True)

  def poll(self):
    return self.proc.poll()

  def send_signal(self, sig):
    self.proc.send_signal(sig)

  def kill(self):
    self.proc.kill()

  def wait(self, timeout=None):
    return self.proc.wait(timeout=timeout)

  def output(self):
    self._log.seek(0)
    return self._log.read()


def _launch(args, env_extra=None):
  # Subprocess runs use 2 fake CPU devices unless told otherwise: 8 fake devices on 2 cores
  # make the PAT step's cross-device traffic dominate the run time.
  env = dict(os.environ, PYTHONUNBUFFERED='1',
             **{'XLA_FLAGS': xla_flags.flags(2), **(env_extra or {})})
  return _Run(args, env)


def _flags(cfg_path_arg, wd, data_dir, teacher_dir, extra=()):
  return [f'--config={REPO}/{cfg_path_arg}', f'--workdir={wd}',
          f'--config.dataset.data_dir={data_dir}', f'--config.teacher.checkpoint={teacher_dir}',
          '--config.teacher.min_top1=0', '--config.total_steps=8', '--config.checkpoint_every_steps=2',
          '--config.eval_every_steps=8', '--config.log_every_steps=1', '--config.batch_size=16',
          '--config.method.raa_dim=32', *extra]


def _wait_for_step(wd, step, proc, timeout=600):
  t0 = time.time()
  while not os.path.isdir(os.path.join(wd, 'checkpoints', str(step))):
    if proc.poll() is not None:
      raise AssertionError(f'run ended early:\n{proc.output()[-3000:]}')
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError('timed out waiting for a checkpoint')
    time.sleep(0.2)


@pytest.mark.parametrize('sig', [signal.SIGTERM])
def test_killed_pat_run_resumes_to_the_same_parameters(data_dir, teacher_dir, tmp_path, sig):
  """PAT (feedback state, method BatchNorm, EMA, optimizer) resumed mid-run ends bit-equal to an
  uninterrupted 8-step run (started alongside: on 2 cores the two overlap their start-ups).

  SIGTERM (preemption notice) here; a SIGKILL at any point of a save, and the replay of the
  steps after the last checkpoint, are tests/test_faults.py's (a supervised run, which restores
  through the same code; PAT's own state is what this test adds)."""
  cfg = 'configs/digits_demo.py'
  reference, wd = str(tmp_path / 'reference'), str(tmp_path / 'killed')
  uninterrupted = _launch(_flags(cfg, reference, data_dir, teacher_dir))
  proc = _launch(_flags(cfg, wd, data_dir, teacher_dir))
  _wait_for_step(wd, 4, proc)
  proc.send_signal(sig)
  code = proc.wait(timeout=300)
  if sig == signal.SIGTERM:  # graceful: a checkpoint at the stop step, clean exit
    assert code == 0
    assert 'Preempted at step' in proc.output()
  assert not os.path.isdir(os.path.join(wd, 'checkpoints', '8'))
  proc = _launch(_flags(cfg, wd, data_dir, teacher_dir))
  code = proc.wait(timeout=900)
  out = proc.output()
  assert code == 0, out[-3000:]
  assert 'Resumed from' in out
  # The restart ran the step's program kept by the first start (step_cache.py), not traced again.
  assert 'Train step ready in' in out and '(hit;' in out, out[-3000:]
  assert uninterrupted.wait(timeout=900) == 0, uninterrupted.output()[-3000:]
  for item in ('variables', 'ema'):
    _assert_trees_equal(_final(reference, item), _final(wd, item))


def test_missing_teacher_says_how_to_get_one(data_dir, tmp_path):
  cfg = tiny_config(data_dir, 'kd', teacher=str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='python -m pat_jax.convert --model mini_convnext'):
    train.train_and_evaluate(cfg, str(tmp_path / 'wd'))


def test_teacher_of_the_wrong_shape_is_named(data_dir, tmp_path):
  model = models.create('mini_convnext', num_classes=7)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  path = str(tmp_path / 't7')
  checkpoint.save_variables(path, jax.device_get(variables), {})
  with pytest.raises(ValueError, match=r'head/fc/kernel.*expected \(48, 10\).*found \(48, 7\)'):
    train.train_and_evaluate(tiny_config(data_dir, 'kd', teacher=path), str(tmp_path / 'wd'))


def test_teacher_at_chance_level_stops_the_run(data_dir, teacher_dir, tmp_path):
  cfg = tiny_config(data_dir, 'kd', teacher=teacher_dir, **{'teacher.min_top1': 50.0})
  with pytest.raises(ValueError, match='reaches only'):
    train.train_and_evaluate(cfg, str(tmp_path / 'wd'))


def test_preempted_teacher_stops_the_run(data_dir, tmp_path, monkeypatch):
  """A SIGTERM while teacher.pretrain trains: the run exits as preempted, never distils from the
  half-trained teacher; the next start finishes the teacher first."""
  c = tiny_config(data_dir, method='kd')
  c.teacher.update(dict(name='mini_convnext', checkpoint='', workdir=str(tmp_path / 'teacher')))
  calls = []
  real = train.train_and_evaluate

  def fake(config, workdir):
    if workdir == str(tmp_path / 'teacher'):
      calls.append(workdir)
      return {'status': 'preempted', 'step': 1}
    return real(config, workdir)
  monkeypatch.setattr(train, 'train_and_evaluate', fake)
  assert real(c, str(tmp_path / 'run')) == {'status': 'preempted', 'step': 0}
  assert calls == [str(tmp_path / 'teacher')]
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')  # no student step was taken


@pytest.mark.parametrize('args, expected', [
    (['--config.optim.lrr=0.1'], "Unknown config key 'optim.lrr' in --config.optim.lrr=0.1. "
                                 'config.optim has: '),
    (['--config.model.name=resnet19'], "Unknown model 'resnet19'. Valid names: "),
    (['--config.method.name=fitnett'], "Unknown config.method.name 'fitnett'. Valid: "),
    (['--mode=eval', '--checkpoint=s3://b/run'], 's3://b/run: pat_jax runs on local paths'),
])
def test_user_error_is_one_paragraph_before_any_training(tmp_path, args, expected):
  """Bad input: exit status 2, the message without a traceback, and nothing trained first (the
  digits config would train its teacher before the student)."""
  proc = subprocess.run([sys.executable, '-m', 'pat_jax.main', f'--config={REPO}/configs/digits_demo.py',
                         f'--workdir={tmp_path}/wd', *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert f'error: {expected}' in proc.stderr
  assert not os.path.exists(tmp_path / 'wd' / 'teacher')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_sigterm_on_one_of_two_processes_stops_both_at_one_step(data_dir, tmp_path):
  """jax.distributed on localhost, 2 processes x 1 CPU device, and a preemption notice to one of
  them: JAX's preemption sync makes both save the same step and exit 0 (log_every_steps=40: the
  decision does not wait for a logging step); the restarted pair resumes there and ends where
  1 process x 2 devices ends. Then --mode=eval and KD from a teacher checkpoint on the pair.

  The 11 runs go in three waves of independent ones (each run spends much of its time starting
  up and waiting on its partner, so on 2 cores a wave takes about as long as its slowest run)."""
  common = [f'--config={REPO}/configs/digits_demo.py:none', f'--config.dataset.data_dir={data_dir}',
            '--config.total_steps=40', '--config.log_every_steps=40', '--config.eval_every_steps=40',
            '--config.checkpoint_every_steps=4', '--config.batch_size=16', '--config.teacher.name=',
            '--config.aug.mixup=0', '--config.aug.cutmix=0', '--config.aug.reprob=0',
            '--config.aug.randaugment=']
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  env = {'XLA_FLAGS': xla_flags.flags(1)}

  def pair(args):
    port = _free_port()
    return [_launch(args + [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                            f'--process_id={i}'], env) for i in range(2)]

  def finish(procs, timeout=900):
    for p in procs:
      assert p.wait(timeout=timeout) == 0, p.output()[-3000:]

  # Wave 1: the 1-process reference run, and the pair that one preemption notice stops.
  single = _launch(common + [f'--workdir={one}'])
  procs = pair(common + [f'--workdir={two}'])
  _wait_for_step(two, 4, procs[0])
  procs[1].send_signal(signal.SIGTERM)  # only the second host is told
  finish(procs, timeout=300)
  stops = [re.search(r'Preempted at step (\d+)', p.output()) for p in procs]
  assert all(stops), [p.output()[-2000:] for p in procs]
  assert stops[0].group(1) == stops[1].group(1)
  stop = int(stops[0].group(1))
  assert stop < 40 and os.path.isdir(os.path.join(two, 'checkpoints', str(stop)))
  finish([single])

  # Wave 2: the pair resumes; 1-process eval and KD runs (the references of wave 3) read `one`.
  # --mode=eval: each process reads the checkpoint onto the global mesh itself (no cross-host
  # device transfer); the JSON line comes once, equal to a 1-process evaluation.
  ev = common[:2] + ['--mode=eval', f'--checkpoint={one}']
  # KD from a teacher checkpoint, the student started from model.init_checkpoint (both the run
  # above's student): each process restores them onto the global mesh; the losses equal
  # 1 process x 2 devices.
  kd = [f'--config={REPO}/configs/digits_demo.py:kd', f'--config.dataset.data_dir={data_dir}',
        '--config.total_steps=6', '--config.log_every_steps=2', '--config.eval_every_steps=6',
        '--config.batch_size=16', '--config.teacher.name=mini_deit', '--config.teacher.min_top1=0',
        f'--config.teacher.checkpoint={one}/checkpoints',
        f'--config.model.init_checkpoint={one}/checkpoints'] + common[-4:]
  resumed = pair(common + [f'--workdir={two}'])
  singles = [_launch(ev), _launch(kd + [f'--workdir={tmp_path}/kd1'])]
  finish(resumed + singles)
  assert all('Resumed from' in p.output() for p in resumed)
  # Both processes read back the step the first pair kept (step_cache.py), and agreed to.
  assert all('(hit;' in p.output() for p in resumed), [p.output()[-2000:] for p in resumed]
  l1 = [m['train_loss'] for m in _metrics(one) if 'train_loss' in m]
  l2 = [m['train_loss'] for m in _metrics(two) if 'train_loss' in m]
  np.testing.assert_allclose(l1, l2, atol=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(_final(one)), jax.tree_util.tree_leaves(_final(two))):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5, atol=1e-5)

  # Wave 3: eval and KD on the pair.
  eval_pair, kd_pair = pair(ev), pair(kd + [f'--workdir={tmp_path}/kd2'])
  finish(eval_pair + kd_pair)
  lines = [[json.loads(l) for l in p.output().splitlines() if l.startswith('{"top1"')]
           for p in [singles[0]] + eval_pair]
  assert len(lines[0]) == 1 and len(lines[1]) == 1 and not lines[2], lines
  assert lines[1] == lines[0] and lines[0][0]['num_examples'] == 297
  rows = [[m for m in _metrics(str(tmp_path / d)) if 'loss_kd' in m] for d in ('kd1', 'kd2')]
  assert [m['step'] for m in rows[0]] == [2, 4, 6] == [m['step'] for m in rows[1]]
  for key in ('loss_kd', 'train_loss'):
    np.testing.assert_allclose([m[key] for m in rows[0]], [m[key] for m in rows[1]], atol=1e-5)
  assert all('Initialised the student from' in p.output() for p in [singles[1]] + kd_pair)


def test_processes_that_do_not_share_the_workdir_stop(tmp_path):
  """Each host writing its own local disk would scatter the run: found before any step."""
  port = _free_port()
  procs = [_launch([f'--config={REPO}/configs/digits_demo.py:none', '--config.teacher.name=',
                    f'--workdir={tmp_path}/host{i}', f'--coordinator_address=127.0.0.1:{port}',
                    '--num_processes=2', f'--process_id={i}'], {'XLA_FLAGS': xla_flags.flags(1)})
           for i in range(2)]
  for p in procs:
    assert p.wait(timeout=300) == 2, p.output()[-3000:]
  assert 'is not one folder for all 2 processes: process(es) [1]' in procs[0].output()
  assert 'Traceback' not in procs[0].output()


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators(monkeypatch):
  """dtype='auto' (the GPU/TPU configs): bfloat16 where the original used fp16 AMP, float32 on
  CPU; an unknown dtype is named with the choices."""
  c = ml_collections.ConfigDict({'dtype': 'auto'})
  assert train.compute_dtype(c) == jnp.float32
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert train.compute_dtype(c) == jnp.bfloat16
  bad = _demo_config('none')
  bad.dtype = 'float16'
  with pytest.raises(train.errors.ConfigError, match="'auto'"):
    train.check_config(bad)
  assert _demo_config('none').dtype == 'float32'
