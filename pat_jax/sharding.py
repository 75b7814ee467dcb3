"""Mesh, shardings, multi-host start-up and global-batch assembly (DESIGN decision 3).

One mesh axis, `data`: the batch is split over it and the train state is replicated.
Parameter sharding (FSDP-style) would add a second axis and change only
`state_shardings`.
"""
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pat_jax import errors


# PAT_JAX_DISTRIBUTED=1: always call jax.distributed.initialize() and let JAX find the cluster
# (GCE TPU VM slices via the metadata server, GKE, SLURM, Open MPI); launch/tpu_vm.sh sets it,
# because a `gcloud compute tpus tpu-vm` slice has no environment variable that says "pod".
# 0: never (one process per machine on purpose). Unset: SLURM with several tasks, or a
# TPU_WORKER_HOSTNAMES list (GKE) with several hosts.
DISTRIBUTED_ENV = 'PAT_JAX_DISTRIBUTED'
# 1: accept a process that sees fewer local accelerators than its share of the host's.
ALLOW_FEWER_ENV = 'PAT_JAX_ALLOW_FEWER_DEVICES'


def _first_int(text):
  match = re.match(r'\s*(\d+)', text or '')
  return int(match.group(1)) if match else None


def slurm_tasks_on_this_node(environ=os.environ):
  """Processes SLURM starts on this node (1 outside SLURM)."""
  for var in ('SLURM_NTASKS_PER_NODE', 'SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE'):
    n = _first_int(environ.get(var))  # '8' or '8(x2)' or '8,4'
    if n:
      return n
  return 1


def host_gpu_count(environ=os.environ, dev_dir='/dev'):
  """NVIDIA GPUs this machine gives the job (CUDA_VISIBLE_DEVICES when set), without starting JAX."""
  visible = environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return len([d for d in visible.split(',') if d.strip()])
  return len([f for f in os.listdir(dev_dir) if re.fullmatch(r'nvidia\d+', f)]) if os.path.isdir(dev_dir) else 0


def distributed_arguments(environ=os.environ, dev_dir='/dev'):
  """The keyword arguments for jax.distributed.initialize(), or None for a single process."""
  mode = environ.get(DISTRIBUTED_ENV, '').strip().lower()
  if mode in ('0', 'false', 'no'):
    return None
  slurm = 'SLURM_JOB_ID' in environ and _first_int(environ.get('SLURM_NTASKS')) is not None
  multi_slurm = slurm and _first_int(environ.get('SLURM_NTASKS')) > 1
  tpu_pod = len([h for h in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1
  if not (mode in ('1', 'true', 'yes') or multi_slurm or tpu_pod):
    return None
  kwargs = {}
  if slurm and slurm_tasks_on_this_node(environ) == 1:
    # JAX pins a SLURM process to the GPU of its local rank (SLURM_LOCALID): with one task per
    # node that is GPU 0 of 8. One process per node drives all of the node's GPUs.
    gpus = host_gpu_count(environ, dev_dir)
    if gpus > 1:
      kwargs['local_device_ids'] = list(range(gpus))
  return kwargs


def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                                 environ=os.environ):
  """jax.distributed.initialize when running on several processes; True if it was called.

  Explicit arguments win; otherwise see DISTRIBUTED_ENV above. A single process does nothing.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
  kwargs = distributed_arguments(environ)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  return True


def check_platform(environ=os.environ, dev_dir='/dev'):
  """Fails loudly when an accelerator is present but JAX runs on the CPU, or when this
  process sees fewer GPUs than its share of the host's (a launcher that pinned it to one).

  Typical causes: jax installed without its CUDA/TPU plugin, or a stale process
  holding the TPU ("already in use by process ...").
  """
  if jax.default_backend() == 'gpu':
    gpus, tasks, seen = host_gpu_count(environ, dev_dir), slurm_tasks_on_this_node(environ), jax.local_device_count()
    expected = gpus // tasks
    if seen < expected and environ.get(ALLOW_FEWER_ENV, '') != '1':
      raise errors.ConfigError(
          f'This process sees {seen} GPU(s) but the host gives the job {gpus} for {tasks} '
          f'process(es): {expected - seen} would sit idle. Under SLURM, start one task per '
          f'node (launch/slurm.sbatch) or one per GPU; set CUDA_VISIBLE_DEVICES to use fewer on '
          f'purpose, or {ALLOW_FEWER_ENV}=1.')
    return
  if jax.default_backend() != 'cpu' or environ.get('JAX_PLATFORMS', '') == 'cpu':
    return
  gpu = os.path.exists(os.path.join(dev_dir, 'nvidia0'))
  tpu = os.path.exists(os.path.join(dev_dir, 'accel0')) or os.path.exists(os.path.join(dev_dir, 'vfio', '0'))
  if gpu or tpu:
    kind = 'GPU' if gpu else 'TPU'
    raise errors.ConfigError(
        f'A {kind} is present but JAX is running on the CPU. Install the matching extra '
        f"(pip install -e '.[{'cuda' if gpu else 'tpu'}]'), and check that no other process holds "
        f"the {kind} (e.g. `sudo lsof -w /dev/{'nvidia0' if gpu else 'accel0'}`). Set "
        'JAX_PLATFORMS=cpu to run on the CPU on purpose.')


def describe(mesh=None):
  """One line on processes, devices and the mesh, for the log of every process."""
  local = jax.local_devices()
  text = (f'process {jax.process_index()}/{jax.process_count()}: {len(local)} local of '
          f'{jax.device_count()} devices ({local[0].device_kind if local else "none"}, '
          f'{jax.default_backend()})')
  if mesh is not None:
    text += f'; mesh {dict(mesh.shape)}'
  return text


def make_mesh(num_devices: int = 0) -> Mesh:
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1:
      raise errors.ConfigError('num_devices may only restrict the devices of a single-process run.')
    if num_devices > len(devices):
      raise errors.ConfigError(f'num_devices={num_devices} but only {len(devices)} devices exist.')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ('data',))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P('data'))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  n = mesh.devices.size
  if global_batch_size % n:
    raise errors.ConfigError(f'batch_size={global_batch_size} is not divisible by the {n} devices of the mesh.')
  return global_batch_size // jax.process_count()


def global_batch(local_batch, mesh):
  """Per-host numpy batch -> global jax arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
