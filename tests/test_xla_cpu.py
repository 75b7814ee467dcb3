"""pat_jax.xla_cpu: which XLA:CPU flags the entry points add, and that the user's win."""
import os

import ml_collections

from pat_jax import config as base_config
from pat_jax import xla_cpu


def _config(remat_student, remat_teacher):
  c = base_config.base('vit_mlp')
  c.model.remat, c.teacher.remat = remat_student, remat_teacher
  return c


def test_remat_adds_the_memory_minimising_scheduler():
  assert xla_cpu.flags_for(_config(False, False)) == xla_cpu.FLAGS
  for remat in ((True, False), (False, True)):
    assert set(xla_cpu.REMAT_FLAGS) <= set(xla_cpu.flags_for(_config(*remat)))
  assert xla_cpu.flags_for(ml_collections.ConfigDict()) == xla_cpu.FLAGS


def test_apply_keeps_user_flags_and_can_be_turned_off(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot --foo=1')
  monkeypatch.delenv('PAT_JAX_XLA_CPU_FLAGS', raising=False)
  xla_cpu.apply(_config(True, True))
  flags = os.environ['XLA_FLAGS'].split()
  assert '--xla_cpu_experimental_ynn_fusion_type=dot' in flags and '--foo=1' in flags
  assert not any(f.endswith('=individual_dot') for f in flags)      # the user's value stays
  assert '--xla_cpu_enable_concurrency_optimized_scheduler=false' in flags
  monkeypatch.setenv('XLA_FLAGS', '--foo=1')
  monkeypatch.setenv('PAT_JAX_XLA_CPU_FLAGS', '0')
  xla_cpu.apply(_config(True, True))
  assert os.environ['XLA_FLAGS'] == '--foo=1'


def test_cpu_only_follows_jax_platforms():
  assert xla_cpu.cpu_only({'JAX_PLATFORMS': 'cpu'})
  assert not xla_cpu.cpu_only({'JAX_PLATFORMS': 'cuda'})
  assert not xla_cpu.cpu_only({'JAX_PLATFORMS': 'tpu,cpu'})
  assert xla_cpu.cpu_only({})  # this test image has no accelerator plugin


def test_keep_freed_memory_is_opt_in_and_sets_glibc():
  calls = []

  class FakeLibc:
    def mallopt(self, param, value):
      calls.append((param, value))
      return 1
  # Opt-in: one arena slows compiling and small models' steps (lock contention).
  assert not xla_cpu.keep_freed_memory({}, FakeLibc())
  assert not xla_cpu.keep_freed_memory({'PAT_JAX_KEEP_FREED_MEMORY': '0'}, FakeLibc())
  assert not calls
  assert xla_cpu.keep_freed_memory({'PAT_JAX_KEEP_FREED_MEMORY': '1'}, FakeLibc())
  assert calls == [(xla_cpu.M_ARENA_MAX, 1), (xla_cpu.M_MMAP_MAX, 0), (xla_cpu.M_TRIM_THRESHOLD, -1)]


_REALLOCATE = '''
import ctypes, resource, sys
from pat_jax import xla_cpu
assert xla_cpu.keep_freed_memory({'PAT_JAX_KEEP_FREED_MEMORY': sys.argv[1]}) == (sys.argv[1] == '1')
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
def touch():
  p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(ctypes.c_void_p(p))
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def test_keep_freed_memory_stops_refaulting_a_large_block():
  """A 256 MB block freed and allocated again: glibc unmaps and page-faults it in again
  (65,536 faults of 4 kB pages, 128 with transparent huge pages always on) unless its freed
  memory is kept."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  faults = {}
  for keep in ('0', '1'):
    out = subprocess.run([sys.executable, '-c', _REALLOCATE, keep], check=True,
                         capture_output=True, text=True).stdout
    faults[keep] = int(out.split()[-1])
  assert faults['0'] >= 100 and faults['1'] * 10 < faults['0'], faults


def test_huge_pages_env_only_where_it_changes_something(tmp_path):
  mode = tmp_path / 'enabled'
  mode.write_text('always [madvise] never\n')
  env = {'JAX_PLATFORMS': 'cpu'}
  new = xla_cpu.huge_pages_env(env, str(mode), 'glibc 2.36')
  assert new['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1' and new['JAX_PLATFORMS'] == 'cpu'
  # The user's other tunables are kept; a set hugetlb (the new process's own) is not repeated.
  kept = xla_cpu.huge_pages_env({**env, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'},
                                str(mode), 'glibc 2.36')
  assert kept['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert xla_cpu.huge_pages_env(new, str(mode), 'glibc 2.36') is None
  assert xla_cpu.huge_pages_env({**env, 'PAT_JAX_HUGE_PAGES': '0'}, str(mode), 'glibc 2.36') is None
  assert xla_cpu.huge_pages_env({'JAX_PLATFORMS': 'cuda'}, str(mode), 'glibc 2.36') is None
  assert xla_cpu.huge_pages_env(env, str(mode), 'glibc 2.31') is None  # no such tunable yet
  assert xla_cpu.huge_pages_env(env, str(mode), '') is None            # musl and others
  assert xla_cpu.huge_pages_env(env, str(tmp_path / 'missing'), 'glibc 2.36') is None
  for other in ('[always] madvise never\n', 'always madvise [never]\n'):
    mode.write_text(other)
    assert xla_cpu.huge_pages_env(env, str(mode), 'glibc 2.36') is None


_REEXEC = '''
import os, sys
print('start', os.getpid(), flush=True)
from pat_jax import xla_cpu
xla_cpu.reexec_with_huge_pages()
print('running', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])
'''


def test_reexec_with_huge_pages_starts_the_same_process_again():
  """Same PID and arguments, the tunable set once; and with it a 256 MB block faults in with
  a fraction of the faults (huge pages)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'PAT_JAX_HUGE_PAGES')}
  env['JAX_PLATFORMS'] = 'cpu'
  expected = xla_cpu.huge_pages_env(env) is not None  # this kernel and glibc
  out = subprocess.run([sys.executable, '-c', _REEXEC, 'a b', '--c=1'], check=True, env=env,
                       capture_output=True, text=True).stdout.split('\n')
  starts = [l for l in out if l.startswith('start')]
  running, = [l for l in out if l.startswith('running')]
  assert running.endswith("['a b', '--c=1']")
  if not expected:
    assert len(starts) == 1 and 'hugetlb' not in running
    return
  assert len(starts) == 2 and starts[0].split()[1] == starts[1].split()[1] == running.split()[1]
  assert running.split()[2] == 'glibc.malloc.hugetlb=1'
  faults = {}
  for tunables in ('', 'glibc.malloc.hugetlb=1'):
    out = subprocess.run([sys.executable, '-c', _REALLOCATE, '0'], check=True, capture_output=True,
                         text=True, env={**env, 'GLIBC_TUNABLES': tunables}).stdout
    faults[tunables] = int(out.split()[-1])
  assert faults['glibc.malloc.hugetlb=1'] * 10 < faults[''], faults
