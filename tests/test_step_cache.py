"""The train step's lowered program kept between starts (pat_jax/step_cache.py): read back, it runs
the same program as the traced step (outputs equal bit for bit, same shardings); a damaged file is
replaced, never run; the key follows what the program depends on."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pat_jax import config as base_config, models, sharding, step_cache, train


def _config(**overrides):
  c = base_config.base('vit_mlp')
  c.model.name, c.teacher.name = 'mini_deit', 'mini_convnext'
  c.dataset.image_size, c.batch_size = 32, 8
  c.method.name = 'kd'
  c.update(overrides)
  return c


def _setup(config, n_devices=2, steps_per_epoch=10):
  teacher = models.create(config.teacher.name, num_classes=10)
  mesh = sharding.make_mesh(n_devices)
  tv = jax.jit(teacher.init, out_shardings=sharding.replicated(mesh))(
      jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
  trainer = train.make_trainer(config, mesh, 10, steps_per_epoch=steps_per_epoch, teacher=teacher,
                               teacher_vars=tv)
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch(
      {'image': rng.standard_normal((8, 32, 32, 3), dtype=np.float32),
       'label': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]}, mesh) for _ in range(2)]
  return trainer, tv, batches


def _two_steps(step, trainer, tv, batches):
  """Two steps from the initial state: every output leaf, on the host, and their shardings."""
  state = trainer.init(jax.random.PRNGKey(0))
  for batch in batches:
    state, metrics = step(state, batch, tv)
  leaves = jax.tree_util.tree_leaves((state, metrics))
  return [np.asarray(x) for x in leaves], [x.sharding for x in leaves]


@pytest.fixture(scope='module')
def plain():
  trainer, tv, batches = _setup(_config())
  return _two_steps(trainer.train_step, trainer, tv, batches)


def _assert_same(result, plain):
  values, shardings = result
  assert len(values) == len(plain[0])
  for got, want in zip(values, plain[0]):
    np.testing.assert_array_equal(got, want)
  assert shardings == plain[1]


def test_kept_step_is_read_back_and_equals_the_traced_step(plain, tmp_path):
  folder = str(tmp_path / 'steps')
  trainer, tv, batches = _setup(_config())
  first = step_cache.CachedStep(trainer.train_step, trainer.fingerprint, folder)
  _assert_same(_two_steps(first, trainer, tv, batches), plain)
  assert first.status == 'exported'
  assert os.listdir(folder) == [os.path.basename(first.path)]

  # A new start (a new trainer from the same config) reads the program back instead of tracing.
  trainer, tv, batches = _setup(_config())
  again = step_cache.CachedStep(trainer.train_step, trainer.fingerprint, folder)
  _assert_same(_two_steps(again, trainer, tv, batches), plain)
  assert (again.status, again.path) == ('hit', first.path)
  assert set(again.times) == {'trace_s', 'lower_s', 'backend_compile_s'}

  # A damaged file (here cut short, as by a full disk) is reported and replaced, never run.
  with open(first.path, 'rb') as f:
    data = f.read()
  with open(first.path, 'wb') as f:
    f.write(data[:len(data) // 2])
  damaged = step_cache.CachedStep(trainer.train_step, trainer.fingerprint, folder)
  _assert_same(_two_steps(damaged, trainer, tv, batches), plain)
  assert damaged.status == 'exported'
  assert step_cache._read(first.path) is not None  # exported again, whole  # pylint: disable=protected-access
  assert os.listdir(folder) == [os.path.basename(first.path)]  # no temporary file left


def test_off_without_a_folder_is_the_plain_step(plain):
  trainer, tv, batches = _setup(_config())
  step = step_cache.CachedStep(trainer.train_step, trainer.fingerprint, None)
  _assert_same(_two_steps(step, trainer, tv, batches), plain)
  assert step.status == 'off' and step.path is None


def test_a_step_that_cannot_be_exported_runs_traced(tmp_path):
  """A host callback has no serialized form: the export fails, the plain step runs, nothing is
  kept."""
  def step(state, batch, unused):
    jax.debug.callback(lambda x: None, batch)
    return {'w': state['w'] + batch}, {'loss': jnp.sum(batch)}

  cached = step_cache.CachedStep(jax.jit(step, donate_argnums=(0,)), {}, str(tmp_path))
  state, metrics = cached({'w': jnp.zeros(3)}, jnp.ones(3), None)
  assert cached.status == 'failed' and os.listdir(tmp_path) == []
  np.testing.assert_array_equal(state['w'], np.ones(3))
  assert float(metrics['loss']) == 3.0


def test_processes_read_back_only_when_every_one_can(tmp_path, monkeypatch):
  """Several processes: one without the kept step makes all of them export (here 2 processes
  are pretended, and the collective that asks them is replaced by its answer)."""
  def step(state, batch, unused):
    return {'w': state['w'] + batch}, {'loss': jnp.sum(batch)}

  monkeypatch.setattr(step_cache.jax, 'process_count', lambda: 2)
  answers = []

  def start(everyone_has_it):
    monkeypatch.setattr(step_cache, '_everyone', lambda flag: answers.append(flag) or (
        flag and everyone_has_it))
    cached = step_cache.CachedStep(jax.jit(step, donate_argnums=(0,)), {}, str(tmp_path))
    state, _ = cached({'w': jnp.zeros(3)}, jnp.ones(3), None)
    np.testing.assert_array_equal(state['w'], np.ones(3))
    return cached.status

  assert start(True) == 'exported'  # nobody has it yet
  assert start(True) == 'hit'
  assert start(False) == 'exported'  # this one has it, another process has not
  assert answers == [False, True, True]


def test_key_follows_config_schedule_shapes_and_devices():
  trainer, tv, batches = _setup(_config())
  state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
  args = (state, batches[0], tv)
  base = step_cache.key(trainer.fingerprint, args)
  assert step_cache.key(_setup(_config())[0].fingerprint, args) == base  # a new start: same key
  # A resume with a longer run or another teacher file finds the step kept by the first start.
  longer = _config(total_steps=99)
  longer.teacher.checkpoint = '/elsewhere'
  assert step_cache.key(_setup(longer)[0].fingerprint, args) == base
  assert step_cache.key(_setup(_config(ema_decay=0.5))[0].fingerprint, args) != base
  assert step_cache.key(_setup(_config(), steps_per_epoch=11)[0].fingerprint, args) != base
  assert step_cache.key(_setup(_config(), n_devices=1)[0].fingerprint, args) != base
  half = jax.tree_util.tree_map(lambda x: x[:4], batches[0])
  assert step_cache.key(trainer.fingerprint, (state, half, tv)) != base


def test_code_digest_follows_every_source_file(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'a.py').write_text('x = 1\n')
  (tmp_path / 'sub' / 'b.py').write_text('y = 2\n')
  (tmp_path / 'notes.txt').write_text('not code')
  digest = step_cache.code_digest.__wrapped__
  before = digest(str(tmp_path))
  assert digest(str(tmp_path)) == before
  (tmp_path / 'notes.txt').write_text('still not code')
  assert digest(str(tmp_path)) == before
  (tmp_path / 'sub' / 'b.py').write_text('y = 3\n')
  assert digest(str(tmp_path)) != before


def test_folder_is_off_by_config_and_without_a_compilation_cache(tmp_path):
  assert step_cache.directory(_config(), str(tmp_path)) == os.path.join(str(tmp_path), 'pat_jax_steps')
  assert step_cache.directory(_config(step_cache=False), str(tmp_path)) is None
  assert step_cache.directory(_config(), '') is None
  # The tests' own cache folder (conftest.py) by default.
  assert step_cache.directory(_config()) == os.path.join(os.environ['JAX_COMPILATION_CACHE_DIR'],
                                                         'pat_jax_steps')
