"""The PAT method inside the trainer: one full step on tiny models, 1 vs 8 devices, and the
feedback it carries."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pat_jax import config as base_config, models, sharding, train
from pat_jax.distill import pat


def _config(**method):
  c = base_config.base('vit_mlp')
  c.model.name, c.teacher.name = 'mini_deit', 'mini_convnext'
  c.dataset.image_size, c.batch_size = 32, 8
  c.method = ml_collections.ConfigDict(pat.default_config())
  c.method.raa_dim = 32
  c.method.update(method)
  return c


def _trainer(config, n_devices):
  teacher = models.create(config.teacher.name, num_classes=10)
  mesh = sharding.make_mesh(n_devices)
  tv = jax.jit(teacher.init, out_shardings=sharding.replicated(mesh))(
      jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
  trainer = train.make_trainer(config, mesh, 10, steps_per_epoch=10, teacher=teacher, teacher_vars=tv)
  return trainer, tv, mesh


def _batch(rng):
  return {'image': rng.standard_normal((8, 32, 32, 3), dtype=np.float32),
          'label': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]}


def _run(config, n_devices, steps=2):
  trainer, tv, mesh = _trainer(config, n_devices)
  state = trainer.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    state, m = trainer.train_step(state, sharding.global_batch(_batch(rng), mesh), tv)
    out.append(jax.device_get(m))
  # The first step (step 0, no feedback yet) and the rest are one compiled program.
  assert trainer.train_step._cache_size() == 1  # pylint: disable=protected-access
  return out, state


@pytest.fixture(scope='module')
def one_device_run():
  """Two PAT steps on one device (shared: compiling them is most of these tests' time)."""
  return _run(_config(), 1)


def test_pat_step_same_loss_on_1_and_8_devices(one_device_run):
  one, _ = one_device_run
  eight, state = _run(_config(), 8)
  for a, b in zip(one, eight):
    assert set(a) >= {'loss_ce', 'loss_kd', 'loss_pat_fd', 'loss_pat_reg'}
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
  # The carried feedback is batch-sharded, one slice per device.
  fb = state.method_state['student'][0]
  assert fb.shape[0] == 8 and len(fb.sharding.device_set) == 8


def test_first_step_has_no_feedback_then_feedback_is_carried(one_device_run):
  (m0, m1), state = one_device_run
  # Step 0 (no feedback) and prompts start at beta = 0: for a CNN teacher the prompted teacher
  # equals the plain one, so the regulariser is exactly 0 (official-pat-code.md Q1).
  assert abs(float(m0['loss_pat_reg'])) < 1e-6
  aligned, target = state.method_state['student'], state.method_state['teacher']
  assert set(aligned) == {0, 1, 2, 3}
  assert all(float(jnp.abs(aligned[s] - target[s]).max()) > 0 for s in aligned)


def test_first_step_in_the_one_program_equals_the_step_without_feedback():
  """The train step passes `first` traced (step == 0): the prompts compute their fusion branch
  and give the output without it (PromptBlock's own test covers both se_modes). Loss terms,
  gradients, BatchNorm statistics and the new feedback equal those of the feedback-free step
  (first=True, traced as such), with non-zero carried feedback that would show the wrong
  branch; and first=False those of a later step."""
  firsts = (True, False)
  trainer, tv, _ = _trainer(_config(), 1)
  state = trainer.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  carried = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), state.method_state)
  batch = _batch(rng)

  def step(params, first):
    out = trainer.method(params, state.batch_stats, carried, tv, batch, jax.random.PRNGKey(3),
                         first)
    return sum(out.terms.values()), out

  def grad(params, first):
    return jax.value_and_grad(step, has_aux=True)(params, first)

  with jax.default_matmul_precision('highest'):
    results = {(first, traced): (jax.jit(grad, static_argnums=1)(state.params, first) if not traced
                                 else jax.jit(grad)(state.params, jnp.asarray(first)))
               for first in firsts for traced in (False, True)}
  for first in firsts:
    want, got = results[(first, False)], results[(first, True)]
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6,
                                                      err_msg=jax.tree_util.keystr(path)),
        want, got)
  # The feedback did matter: the prompts' beta gradient and the fb_aligner statistics differ.
  (_, first_out), first_grads = results[(True, True)]
  (_, later_out), later_grads = results[(False, True)]
  beta = lambda g: g['method']['prompt_blocks_3']['beta']  # pylint: disable=unnecessary-lambda-assignment
  assert float(jnp.abs(beta(first_grads) - beta(later_grads)).max()) > 1e-6
  stats = lambda o: o.batch_stats['method']['prompt_blocks_3']['fb_aligner']  # pylint: disable=unnecessary-lambda-assignment
  assert jax.tree_util.tree_leaves(stats(first_out)) and any(
      float(jnp.abs(a - b).max()) > 0
      for a, b in zip(jax.tree_util.tree_leaves(stats(first_out)),
                      jax.tree_util.tree_leaves(stats(later_out))))


@pytest.mark.parametrize('ablation', [dict(raa=False, afp_stages=(1, 2)), dict(afp_stages=())])
def test_ablations_train(ablation):
  (m0, m1), _ = _run(_config(**ablation), 1)
  assert all(np.isfinite(v) for v in m1.values())
  if ablation.get('afp_stages') == ():
    assert 'loss_pat_reg' not in m1
