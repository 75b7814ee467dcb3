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
