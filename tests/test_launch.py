"""Start-up on clusters and the launch scripts, without a cluster: pat_jax.sharding's
bootstrap decisions from the environment, launch/tpu_vm.sh --dry-run, and its kill command
run for real against a fake training process."""
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest

from pat_jax import errors, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _devs(tmp_path, n):
  d = tmp_path / 'dev'
  d.mkdir()
  for i in range(n):
    (d / f'nvidia{i}').touch()
  (d / 'nvidiactl').touch()  # not a GPU
  return str(d)


def test_single_process_starts_no_distributed_client(tmp_path):
  assert sharding.distributed_arguments({}, _devs(tmp_path, 8)) is None
  # one SLURM task: one process drives all GPUs without jax.distributed
  env = {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1', 'SLURM_NTASKS_PER_NODE': '1'}
  assert sharding.distributed_arguments(env, str(tmp_path)) is None


def test_tpu_vm_slice_is_initialised_when_the_launcher_says_so():
  # A gcloud TPU VM slice sets no TPU_WORKER_HOSTNAMES: launch/tpu_vm.sh sets the switch and
  # JAX finds the workers through the metadata server.
  assert sharding.distributed_arguments({sharding.DISTRIBUTED_ENV: '1'}) == {}
  assert sharding.distributed_arguments({'TPU_WORKER_HOSTNAMES': 'a,b'}) == {}
  assert sharding.distributed_arguments({'TPU_WORKER_HOSTNAMES': 'a'}) is None
  assert sharding.distributed_arguments({sharding.DISTRIBUTED_ENV: '0',
                                         'TPU_WORKER_HOSTNAMES': 'a,b'}) is None


@pytest.mark.parametrize('per_node, expected', [
    ({'SLURM_NTASKS_PER_NODE': '1'}, {'local_device_ids': list(range(8))}),
    ({'SLURM_TASKS_PER_NODE': '1(x2)'}, {'local_device_ids': list(range(8))}),
    ({'SLURM_NTASKS_PER_NODE': '8'}, {}),  # one process per GPU: JAX's own SLURM_LOCALID choice
])
def test_slurm_one_task_per_node_uses_every_gpu(tmp_path, per_node, expected):
  env = {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2' if '1' in str(per_node) else '16', **per_node}
  assert sharding.distributed_arguments(env, _devs(tmp_path, 8)) == expected
  if expected:  # the GPUs SLURM (or the user) made visible, not all of the machine's
    visible = {**env, 'CUDA_VISIBLE_DEVICES': '0,1,2,3'}
    assert sharding.distributed_arguments(visible, str(tmp_path / 'dev')) == {
        'local_device_ids': [0, 1, 2, 3]}


def test_explicit_flags_win(monkeypatch):
  calls = []
  monkeypatch.setattr(sharding.jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  assert sharding.maybe_initialize_distributed('h:1234', 2, 1, environ={})
  assert calls == [dict(coordinator_address='h:1234', num_processes=2, process_id=1)]
  assert not sharding.maybe_initialize_distributed(environ={})
  assert sharding.maybe_initialize_distributed(environ={sharding.DISTRIBUTED_ENV: '1'})
  assert calls[-1] == {}


def test_a_process_pinned_to_one_of_eight_gpus_refuses_to_start(tmp_path, monkeypatch):
  monkeypatch.setattr(sharding.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(sharding.jax, 'local_device_count', lambda: 1)
  dev = _devs(tmp_path, 8)
  with pytest.raises(errors.ConfigError, match='sees 1 GPU.*8 for 1 process.*7 would sit idle'):
    sharding.check_platform({}, dev)
  sharding.check_platform({'SLURM_NTASKS_PER_NODE': '8'}, dev)  # one process per GPU: fine
  sharding.check_platform({'CUDA_VISIBLE_DEVICES': '3'}, dev)  # fewer on purpose
  sharding.check_platform({sharding.ALLOW_FEWER_ENV: '1'}, dev)


def test_accelerator_present_but_jax_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setattr(sharding.jax, 'default_backend', lambda: 'cpu')
  with pytest.raises(errors.ConfigError, match='GPU is present but JAX is running on the CPU'):
    sharding.check_platform({}, _devs(tmp_path, 1))
  sharding.check_platform({'JAX_PLATFORMS': 'cpu'}, str(tmp_path / 'dev'))  # on purpose


# ----------------------------------------------------------------------------
# launch/tpu_vm.sh

TPU_VM = os.path.join(REPO, 'launch', 'tpu_vm.sh')


def _words(proc):
  """A DRY_RUN=1 line (printf %q quoting) as the argv it stands for."""
  line = proc.stdout.strip().splitlines()[-1]
  words = subprocess.run(['bash', '-c', 'printf "%s\\0" ' + line], capture_output=True, text=True,
                         check=True).stdout
  return words.split('\0')[:-1]


def _tpu_vm(*args, **env):
  return subprocess.run(['bash', TPU_VM, 'my-tpu', 'us-central2-b', *args], capture_output=True,
                        text=True, timeout=60, env={**os.environ, **env}, cwd=REPO)


def test_kill_stops_training_but_not_the_shell_that_runs_it(tmp_path):
  """The remote `bash -c '<kill script>'` holds the process pattern in its own command line: the
  kill must stop the training process and still finish (it used to kill its own shell)."""
  name = f'fake{os.getpid()}_pat.main'  # what only this test runs
  fake = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', '-m', name,
                           '--workdir=x'])
  try:
    script = _tpu_vm('script', 'kill', PAT_JAX_PROCESS=name).stdout
    assert name.replace('.', '[.]')[1:] in script
    done = subprocess.run(['bash', '-c', script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(': stopped'), done.stdout
    assert fake.wait(timeout=10) != 0  # killed by the signal
  finally:
    fake.kill()


@pytest.mark.parametrize('step', ['run', 'kill'])
def test_no_remote_script_matches_its_own_kill_pattern(step):
  """What `pkill -f` sees of the remote shell is its whole script: matching it kills the shell."""
  script = _tpu_vm('script', step, '--workdir=gs://b/run').stdout
  assert "pkill -f '[p]at_jax[.]main'" in script
  assert not re.search(r'[p]at_jax[.]main', script), script


def test_dry_run_prints_the_commands_of_each_step():
  create = _tpu_vm('create', DRY_RUN='1', SPOT='1', TPU_TYPE='v5litepod-16')
  assert create.returncode == 0, create.stderr
  assert _words(create) == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu', '--zone',
                                   'us-central2-b', '--accelerator-type', 'v5litepod-16', '--version',
                                   'tpu-ubuntu2204-base', '--spot']
  setup = _tpu_vm('setup', DRY_RUN='1')
  assert setup.returncode == 0, setup.stderr
  assert 'git archive --format=tar.gz' in setup.stdout and 'HEAD' in setup.stdout
  assert '--worker=all' in _words(setup) and 'uv venv --python 3.11' in _words(setup)[-1]
  run = _tpu_vm('run', '--', '--config=configs/cifar_convnext_deit.py', '--workdir=gs://b/run',
                DRY_RUN='1')
  assert run.returncode == 0, run.stderr
  remote = _words(run)[-1]
  assert 'M=pat_jax && PAT_JAX_DISTRIBUTED=1 nohup ~/venv/bin/python -m $M.main' in remote
  assert '--workdir=gs://b/run' in remote and '--worker=all' in _words(run)
  assert _tpu_vm('run', DRY_RUN='1').returncode == 2  # no arguments for main
  assert _tpu_vm('frobnicate').returncode == 2
  logs = _tpu_vm('logs', 'all', DRY_RUN='1')
  assert '--worker=all' in _words(logs) and _words(logs)[-1].startswith('tail -n 20 ~/pat_jax.log')


# ----------------------------------------------------------------------------
# launch/slurm.sbatch, with stand-ins for srun and scontrol

def _fake_slurm(tmp_path):
  bin_dir, log = tmp_path / 'bin', tmp_path / 'calls.log'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(
      '#!/bin/bash\necho "srun $*" >> "$CALLS"\n'
      'trap \'echo "step: SIGTERM, saved" >> "$CALLS"; kill $!; exit 0\' TERM\nsleep 60 & wait\n')
  (bin_dir / 'scontrol').write_text('#!/bin/bash\necho "scontrol $*" >> "$CALLS"\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'CALLS': str(log),
         'SLURM_JOB_ID': '42', 'SLURM_SUBMIT_DIR': REPO}
  return env, log


def test_slurm_job_passes_sigterm_to_the_step_and_requeues(tmp_path):
  env, log = _fake_slurm(tmp_path)
  job = subprocess.Popen(['bash', os.path.join(REPO, 'launch', 'slurm.sbatch'), '--config=c.py',
                          '--workdir=/shared/run'], env=env, stdout=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not (log.exists() and 'srun' in log.read_text()) and time.time() < deadline:
    time.sleep(0.1)
  job.send_signal(15)  # what SLURM sends 120 s before the time limit
  out, _ = job.communicate(timeout=30)
  assert job.returncode == 0, out
  calls = log.read_text().splitlines()
  assert calls == ['srun --kill-on-bad-exit=1 launch/gpu.sh --config=c.py --workdir=/shared/run',
                   'step: SIGTERM, saved', 'scontrol requeue 42'], calls


def test_slurm_job_needs_a_workdir(tmp_path):
  env, log = _fake_slurm(tmp_path)
  job = subprocess.run(['bash', os.path.join(REPO, 'launch', 'slurm.sbatch'), '--config=c.py'],
                       env=env, capture_output=True, text=True, timeout=30)
  assert job.returncode == 2 and '--workdir' in job.stderr
  assert not log.exists()


def test_compilation_cache_default_and_switch(monkeypatch):
  from pat_jax import main  # pylint: disable=import-outside-toplevel
  assert main.compilation_cache_dir(None, {'XDG_CACHE_HOME': '/c'}) == '/c/pat_jax/jax'
  assert main.compilation_cache_dir(None, {'JAX_COMPILATION_CACHE_DIR': 'gs://b/cc'}) == 'gs://b/cc'
  assert main.compilation_cache_dir('none', {'JAX_COMPILATION_CACHE_DIR': '/x'}) is None
  assert main.compilation_cache_dir('/mine', {}) == '/mine'


def test_device_check_dry_run_lists_every_benchmark(tmp_path):
  proc = subprocess.run(['bash', os.path.join(REPO, 'launch', 'device_check.sh'), '--dry-run',
                         str(tmp_path / 'out')], capture_output=True, text=True, timeout=60,
                        env={**os.environ, 'BATCH': '128'})
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  kernels = [l for l in lines if '-m pat_jax.kernels.bench' in l]
  assert len(kernels) == 1 and '--batch=128' in kernels[0]
  lines = [l for l in lines if l not in kernels]
  assert all('-m pat_jax.bench' in l and '--json' in l for l in lines)
  # caches and traces go to the work folder, not among the results
  assert all(f'--compilation_cache={tmp_path}/out/work/jax_cache' in l for l in lines)
  configs = [re.search(r'--config=(\S+)', l).group(1) for l in lines]
  assert configs[:3] == ['configs/cifar_convnext_deit.py', 'configs/cifar_convnext_deit.py:kd',
                         'configs/cifar_convnext_deit.py:student']
  assert sum('--config.dtype=float32' in l for l in lines) == 1
  assert sum('--config.batch_size=256' in l for l in lines) == 1
  assert sum('--breakdown' in l for l in lines) == 1
  assert sum('--kernels=' in l for l in lines) == 1
  assert sum('--config.teacher.scan_blocks=False' in l for l in lines) == 1
  assert sum(f'--profile_dir={tmp_path}/out/work/profile' in l for l in lines) == 1
  assert '--breakdown' in lines[-1]  # the least important run last
  assert not os.path.exists(tmp_path / 'out' / 'device_check.jsonl')  # nothing ran


FAKE_PYTHON = r'''#!/usr/bin/env bash
# Stands in for the interpreter: imports fail when FAKE_IMPORTS=fail; a bench at batch
# FAKE_HANG_BATCH (16) hangs (a compile that outlasts the budget); the first bench takes
# FAKE_FIRST_S seconds (0); the other benches print a result at once.
case "$1" in
  -c) [ "${FAKE_IMPORTS:-ok}" = ok ] || { echo "ModuleNotFoundError: ml_collections" >&2; exit 1; }
      exit 0 ;;
  -) exec "$REAL_PYTHON" "$@" ;;
  -m) ;;
esac
batch=8
for a in "$@"; do case "$a" in --config.batch_size=*) batch=${a#*=} ;; esac; done
if [ "$2" = pat_jax.kernels.bench ]; then
  echo '{"kind": "header"}'
  echo '{"case": "gelu", "what": "GELU", "dtype": "bfloat16", "ms": {"xla": 1.5, "rule": 2.0}, "default": "xla", "fastest": "xla"}'
  exit 0
fi
[ "$batch" = "${FAKE_HANG_BATCH:-16}" ] && exec sleep 120
[ -e "$FAKE_STATE" ] || { touch "$FAKE_STATE"; sleep "${FAKE_FIRST_S:-0}"; }
echo "{\"device\": \"fake\", \"batch_size\": $batch, \"dtype\": \"bfloat16\", \"step_time_s\": 0.5, \"step_time_min_s\": 0.4, \"step_time_max_s\": 0.6, \"img_per_s\": 16.0, \"compile_s\": 3.0, \"trace_s\": 1.0, \"lower_s\": 0.5, \"backend_compile_s\": 1.5, \"setup_s\": 2.0, \"step_cache\": \"exported\", \"peak_bytes\": 1e9, \"profile\": {\"error\": \"no trace in the fake\"}}"
'''


def _device_check(tmp_path, out, **env):
  fake = tmp_path / 'fakepy'
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  env = {**os.environ, 'PYTHON': str(fake), 'REAL_PYTHON': sys.executable, 'BATCH': '8',
         'BUDGET_S': '8', 'MIN_RUN_S': '3', 'FAKE_STATE': str(tmp_path / 'first_bench_ran'),
         **env}
  env.pop('OUT', None)
  return subprocess.run(['bash', os.path.join(REPO, 'launch', 'device_check.sh'), str(out)],
                        capture_output=True, text=True, timeout=120, env=env)


def test_device_check_keeps_to_its_time_budget_and_always_writes_the_tables(tmp_path):
  """The runs before the budget is spent give rows; the one running when it ends is stopped
  (batch 16 hangs in the fake); the rest are listed as skipped; the tables and logs come out."""
  out = tmp_path / 'out'
  proc = _device_check(tmp_path, out)
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(l) for l in open(out / 'device_check.jsonl')]
  labels = [r['label'] for r in rows]
  assert labels[:6] == ['pat_bf16', 'kd_bf16', 'student_bf16', 'pat_bf16_cached',
                        'pat_bf16_profiled', 'pat_bf16_batch16']
  assert all(r['step_time_s'] == 0.5 for r in rows[:5])
  assert 'stopped after' in rows[5]['error']
  assert 'pat_bf16_batch32' not in labels  # the largest batch stops at the first that fails
  assert all('skipped' in r for r in rows[6:]) and labels[-1] == 'pat_bf16_breakdown'
  assert set(labels[6:]) == {'pat_fp32', 'pat_bf16_cpu_forms', 'pat_bf16_unrolled', 'kernels',
                             'pat_bf16_breakdown'}
  table = (out / 'device_check.md').read_text()
  assert '| pat_bf16 | fake | 8 | bfloat16 | 0.5000 (0.4000-0.6000) | 16 |' in table
  assert '| pat_fp32 | skipped: time budget' in table
  assert 'Profile summary: no trace in the fake' in table
  assert ('XLA (or loading from the cache): pat_bf16 1.0 + 0.5 + 1.5 (set-up before it 2.0; kept '
          'step: exported);') in table
  assert sorted(os.listdir(out)) == ['device_check.jsonl', 'device_check.md', 'logs.tar.gz',
                                     'work']
  with tarfile.open(out / 'logs.tar.gz') as logs:
    assert {'./pat_bf16.log', './pat_bf16.json', './pat_bf16_batch16.log'} <= set(logs.getnames())
  # A second call with ONLY adds what the first skipped.
  proc = _device_check(tmp_path, out, ONLY='kernels pat_fp32', BUDGET_S='60')
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(l) for l in open(out / 'device_check.jsonl')]
  assert rows[-1]['label'] == 'pat_fp32' and rows[-1]['step_time_s'] == 0.5  # kernels: no row
  table = (out / 'device_check.md').read_text()
  assert '| gelu | GELU | bfloat16 | xla 1.500, rule 2.000 | xla | xla |' in table
  assert '| pat_fp32 | fake | 8 |' in table and '| pat_fp32 | skipped' not in table


def test_device_check_starts_no_pat_compile_it_cannot_finish(tmp_path):
  """Once pat_bf16 has shown how long a PAT compile takes (3 s in the fake), a run that compiles
  a new PAT program is not started with less time left; the cheap runs after it still run."""
  out = tmp_path / 'out'
  proc = _device_check(tmp_path, out, BUDGET_S='5', MIN_RUN_S='1', FAKE_FIRST_S='3',
                       FAKE_HANG_BATCH='none')
  assert proc.returncode == 0, proc.stderr
  rows = {r['label']: r for r in map(json.loads, open(out / 'device_check.jsonl'))}
  for label in ('pat_bf16', 'kd_bf16', 'student_bf16', 'pat_bf16_cached', 'pat_bf16_profiled'):
    assert rows[label]['step_time_s'] == 0.5, label
  for label in ('pat_bf16_batch16', 'pat_fp32', 'pat_bf16_cpu_forms', 'pat_bf16_unrolled',
                'pat_bf16_breakdown'):
    assert rows[label]['skipped'].startswith('needs about'), label
  assert 'pat_bf16_batch32' not in rows
  assert 'kernels' not in rows and (out / 'kernels.jsonl').exists()  # ran, with time to spare


def test_device_check_stops_at_once_when_imports_fail(tmp_path):
  proc = _device_check(tmp_path, tmp_path / 'out', FAKE_IMPORTS='fail')
  assert proc.returncode == 2
  assert 'ml_collections' in proc.stderr and 'launch/device_wheels.sh' in proc.stderr
  assert not (tmp_path / 'out' / 'device_check.md').exists()
