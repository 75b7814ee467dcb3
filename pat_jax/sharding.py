"""Mesh, shardings, multi-host start-up and global-batch assembly (DESIGN decision 3).

One mesh axis, `data`: the batch is split over it and the train state is replicated.
Parameter sharding (FSDP-style) would add a second axis and change only
`state_shardings`.
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed.initialize when running on several processes.

  Explicit arguments win; otherwise TPU pods and SLURM jobs with more than one task
  are detected by JAX itself (initialize() without arguments). A single process
  does nothing.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
  multi_slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  tpu_pod = len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1
  if multi_slurm or tpu_pod:
    jax.distributed.initialize()
    return True
  return False


def check_platform():
  """Fails loudly when an accelerator is present but JAX runs on the CPU.

  Typical causes: jax installed without its CUDA/TPU plugin, or a stale process
  holding the TPU ("already in use by process ...").
  """
  if jax.default_backend() != 'cpu' or os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    return
  gpu = os.path.exists('/dev/nvidia0')
  tpu = os.path.exists('/dev/accel0') or os.path.exists('/dev/vfio/0')
  if gpu or tpu:
    kind = 'GPU' if gpu else 'TPU'
    raise RuntimeError(
        f'A {kind} is present but JAX is running on the CPU. Install the matching extra '
        f"(pip install -e '.[{'cuda' if gpu else 'tpu'}]'), and check that no other process holds "
        f"the {kind} (e.g. `sudo lsof -w /dev/{'nvidia0' if gpu else 'accel0'}`). Set "
        'JAX_PLATFORMS=cpu to run on the CPU on purpose.')


def make_mesh(num_devices: int = 0) -> Mesh:
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1:
      raise ValueError('num_devices may only restrict the devices of a single-process run.')
    if num_devices > len(devices):
      raise ValueError(f'num_devices={num_devices} but only {len(devices)} devices exist.')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ('data',))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P('data'))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(f'batch_size={global_batch_size} is not divisible by the {n} devices of the mesh.')
  return global_batch_size // jax.process_count()


def global_batch(local_batch, mesh):
  """Per-host numpy batch -> global jax arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
