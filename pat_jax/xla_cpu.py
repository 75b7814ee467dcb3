"""XLA flags for the CPU backend, set by the entry points before JAX starts its backends.

Always:
  --xla_cpu_experimental_ynn_fusion_type=individual_dot
      Each matrix product is its own YNNPACK call instead of being fused with the
      element-wise ops around it: XLA's default fusion made every bias add materialise a
      broadcast the size of the product.
With rematerialisation on (model.remat or teacher.remat):
  --xla_cpu_enable_concurrency_optimized_scheduler=false
      The default CPU scheduler runs the recomputed forwards early, keeping all their
      activations alive, which undoes rematerialisation. It costs some step time, so it is
      only set when memory was asked for.
Measurements of both: docs/BENCHMARKS.md ("XLA:CPU flags").

And in a CPU-only process (no CUDA, ROCm or TPU plugin installed, or JAX_PLATFORMS=cpu), with
glibc and PAT_JAX_KEEP_FREED_MEMORY=1: `keep_freed_memory`, so that XLA:CPU's per-step buffers
(over 1 GB for the paper pair's PAT step) are not page-faulted in again on every step. Opt-in:
its one arena makes threads wait for each other's allocations (see keep_freed_memory).

And in a CPU-only process where the kernel gives transparent huge pages on request (its mode
`madvise`) and glibc is 2.35 or later: `reexec_with_huge_pages`, called first by the entry
points' `__main__`, starts the process again with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so
that glibc asks for huge pages for its large blocks: 2 MB pages instead of 4 kB ones, so
XLA:CPU's per-step buffers fault in with a fraction of the faults and the paper pair's step is
faster (measured: docs/BENCHMARKS.md, "Memory the OS takes back"). PAT_JAX_HUGE_PAGES=0
turns it off.

The flags only affect the CPU backend (they are set before the backend is known; the other
CPU-only forms are chosen per backend in `pat_jax.kernels`). PAT_JAX_XLA_CPU_FLAGS=0 leaves
XLA_FLAGS alone; a flag already in XLA_FLAGS is not overridden.
"""
import ctypes
import importlib.metadata
import os
import sys

FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=individual_dot',)
REMAT_FLAGS = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',)


def flags_for(config=None):
  """The flags for an experiment config (None: the always-on ones)."""
  remat = config is not None and bool(config.get('model', {}).get('remat', False) or
                                      config.get('teacher', {}).get('remat', False))
  return FLAGS + (REMAT_FLAGS if remat else ())


def apply(config=None):
  """Adds `flags_for(config)` to XLA_FLAGS and, in a CPU-only process where
  PAT_JAX_KEEP_FREED_MEMORY=1, keeps freed memory.
  Call before the first JAX computation: XLA reads XLA_FLAGS once, when the backends start."""
  if cpu_only():
    keep_freed_memory()
  if os.environ.get('PAT_JAX_XLA_CPU_FLAGS', '1') == '0':
    return
  current = os.environ.get('XLA_FLAGS', '')
  extra = [f for f in flags_for(config) if f.split('=')[0] not in current]
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([current] + extra).strip()


_ACCELERATOR_PACKAGES = ('jax-cuda', 'jax_cuda', 'jax-rocm', 'jax_rocm', 'libtpu')


def cpu_only(environ=os.environ):
  """True where JAX will run on the CPU: JAX_PLATFORMS=cpu, or no accelerator plugin installed."""
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  names = (d.metadata['Name'] or '' for d in importlib.metadata.distributions())
  return not any(n.lower().startswith(_ACCELERATOR_PACKAGES) for n in names)


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def keep_freed_memory(environ=os.environ, libc=None):
  """Makes glibc keep freed memory for reuse: one arena, no mmap for large blocks, no trimming.

  XLA:CPU allocates each step's temporary buffers afresh (1.2 GB for the paper pair's PAT step
  at batch 8). glibc serves blocks that large with mmap and unmaps them when freed (a thread's
  arena cannot hold them), so every step page-faults ~0.8 GB back in: 196,000 minor faults per
  step on the 2-core VM. One arena, no mmap and no trimming keep that memory: the paper pair's
  step 5-11% faster (docs/BENCHMARKS.md, "Memory the OS takes back"). But one arena is one
  lock for every thread's allocations: XLA's compiler threads and its executor threads then
  wait for each other (~600,000-780,000 voluntary context switches against ~15,000-20,000),
  so the paper pair compiles in 52 s instead of 36-40 s, and a small model's step, whose
  buffers never reach mmap's size, gets slower (the digits demo's PAT step at batch 64:
  0.142-0.155 s instead of 0.112-0.120 s). Hence opt-in: PAT_JAX_KEEP_FREED_MEMORY=1 for long
  CPU runs of large models. The process then keeps its peak memory until it exits. Returns
  True when set; False when not asked for or without glibc's mallopt (e.g. musl). Call early,
  before the threads that will allocate (XLA's) start: a thread keeps the arena it first got,
  so setting it after the first compile changes nothing (measured: 196,000 faults per step)."""
  if environ.get('PAT_JAX_KEEP_FREED_MEMORY', '0') != '1':
    return False
  try:
    libc = libc or ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  # Each call returns 1 on success; -1 for the trim threshold is the largest size_t: never.
  return all(mallopt(param, value) == 1
             for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))


HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def huge_pages_env(environ=os.environ, thp_mode=_THP_MODE, libc_version=None):
  """The environment to start this process again with so that glibc backs its large blocks
  with transparent huge pages; None where that would change nothing or is not wanted.

  glibc reads GLIBC_TUNABLES once, when a process starts (mallopt has no such setting), hence
  a new start. Nothing to gain where the kernel's mode is `always` (huge pages already) or
  `never`, where glibc is older than 2.35 (no such tunable) or not glibc, on an accelerator
  (its buffers are not in host memory), or where the tunable is already set (so the new
  process does not start again)."""
  if environ.get('PAT_JAX_HUGE_PAGES', '1') == '0':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables or not cpu_only(environ):
    return None
  try:
    if libc_version is None:
      libc_version = os.confstr('CS_GNU_LIBC_VERSION') or ''  # 'glibc 2.36'
    name, version = libc_version.split()
    if name != 'glibc' or tuple(int(v) for v in version.split('.')[:2]) < (2, 35):
      return None
    with open(thp_mode) as f:
      if '[madvise]' not in f.read():
        return None
  except (ValueError, OSError, AttributeError):
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)}


def reexec_with_huge_pages():
  """Starts this process again (same PID, arguments and interpreter options) with glibc's
  huge-page tunable, where `huge_pages_env` says so; returns otherwise. Call first thing in
  an entry point's `__main__`, before other modules load (they load again)."""
  env = huge_pages_env()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError:
    pass  # carry on without huge pages
