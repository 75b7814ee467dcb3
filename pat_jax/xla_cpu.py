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
glibc: `keep_freed_memory`, so that XLA:CPU's per-step buffers (over 1 GB for the paper pair's
PAT step) are not handed back to the OS and page-faulted in again on every step.

The flags only affect the CPU backend (they are set before the backend is known; the other
CPU-only forms are chosen per backend in `pat_jax.kernels`). PAT_JAX_XLA_CPU_FLAGS=0 leaves
XLA_FLAGS alone; a flag already in XLA_FLAGS is not overridden.
"""
import ctypes
import importlib.metadata
import os

FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=individual_dot',)
REMAT_FLAGS = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',)


def flags_for(config=None):
  """The flags for an experiment config (None: the always-on ones)."""
  remat = config is not None and bool(config.get('model', {}).get('remat', False) or
                                      config.get('teacher', {}).get('remat', False))
  return FLAGS + (REMAT_FLAGS if remat else ())


def apply(config=None):
  """Adds `flags_for(config)` to XLA_FLAGS and, in a CPU-only process, keeps freed memory.
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
  at batch 8). glibc serves blocks that large with mmap and unmaps them when freed (or, from a
  thread's arena, returns them with madvise), so every step page-faulted ~0.8 GB back in: on
  the 2-core VM 196,000 minor faults and 0.2-0.3 s of a 1.6-1.7 s step, with steps of 2.5 s
  now and then (docs/BENCHMARKS.md, "Memory the OS takes back"). The cost: the process keeps
  its peak memory until it exits. Returns True when set; PAT_JAX_KEEP_FREED_MEMORY=0 (or a
  libc without mallopt, e.g. musl) leaves the allocator alone. Call early, before the threads
  that will allocate (XLA's) start."""
  if environ.get('PAT_JAX_KEEP_FREED_MEMORY', '1') == '0':
    return False
  try:
    libc = libc or ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  # Each call returns 1 on success; -1 for the trim threshold is the largest size_t: never.
  return all(mallopt(param, value) == 1
             for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
