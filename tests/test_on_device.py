"""dataset.transfer='uint8': uint8 batches augmented on the device (data/on_device.py) equal the
float32 path's batches, erasing aside; the stream is deterministic and resumable; the train and
eval steps take uint8 batches."""
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from pat_jax import config as base_config
from pat_jax import data, errors, evaluate, sharding, train
from pat_jax.data import mixup, on_device

NAME = 'memory:on_device_test'


@pytest.fixture(scope='module', autouse=True)
def arrays():
  rng = np.random.default_rng(0)
  for split, n in (('train', 48), ('test', 11)):
    data.register_arrays(NAME, split, rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8),
                         rng.integers(0, 10, n), 10)


def make_config(recipe='vit', transfer='float32', reprob=0.0, image_size=16, randaugment=True):
  c = ml_collections.ConfigDict({'seed': 3})
  c.dataset = data.default_config()
  c.dataset.update(name=NAME, image_size=image_size, eval_crop_pct=1.0, transfer=transfer)
  c.aug = data.vit_recipe() if recipe == 'vit' else data.cnn_recipe()
  c.aug.reprob = reprob
  if not randaugment:  # per example, before the uint8 batch exists: only slows these tests
    c.aug.randaugment = ''
  return c


def batches(config, n, batch_size=8, **kwargs):
  return [b for _, b in zip(range(n), data.train_iterator(config, batch_size, **kwargs))]


def prepare_all(config, uint8_batches):
  prep = jax.jit(lambda b: on_device.prepare(b, config.dataset.mean, config.dataset.std))
  return [jax.device_get(prep(b)) for b in uint8_batches]


def test_auto_is_float32_on_cpu_and_bad_values_are_named():
  assert data.default_config().transfer == 'auto'
  assert on_device.resolve_transfer(data.default_config()) == 'float32'  # conftest: CPU
  assert on_device.resolve_transfer(ml_collections.ConfigDict()) == 'float32'  # older configs
  assert on_device.resolve_transfer(ml_collections.ConfigDict({'transfer': 'uint8'})) == 'uint8'
  with pytest.raises(errors.ConfigError, match='transfer'):
    on_device.resolve_transfer(ml_collections.ConfigDict({'transfer': 'bfloat16'}))


@pytest.mark.parametrize('recipe', ['cnn', 'vit'])
def test_uint8_batches_prepared_on_device_equal_the_float32_batches(recipe):
  """Erasing off: the mixed pixels are exact and the targets come from the host, so images
  agree to an ulp of the normalisation and targets exactly; mixup and cutmix both occur."""
  floats = batches(make_config(recipe), 6)
  raw = batches(make_config(recipe, 'uint8'), 6)
  assert raw[0]['image'].dtype == np.uint8 and raw[0]['label'].dtype == np.float32
  keys = {'image', 'label'} | ({'mix_lam', 'mix_blend', 'mix_box'} if recipe == 'vit' else set())
  assert set(raw[0]) == keys
  for f, p in zip(floats, prepare_all(make_config(recipe), raw)):
    assert set(p) == {'image', 'label'} and p['image'].dtype == np.float32
    np.testing.assert_allclose(p['image'], f['image'], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(p['label'], f['label'])
  if recipe == 'vit':
    modes = {('blend' if b['mix_blend'][0] else 'cut' if b['mix_box'][0, 1] else 'none')
             for b in raw}
    assert {'blend', 'cut'} <= modes, modes


def test_mix_is_exact_on_all_pixel_pairs():
  """All 65,536 (own, partner) pairs, mixup with several drawn lambdas: the device's blend is
  `mixup.mix_batch`'s uint8 result exactly (no fused multiply-add rounding, see _times)."""
  pairs = np.arange(256 * 256)
  own = np.repeat((pairs // 256).astype(np.uint8).reshape(256, 256, 1), 3, -1)
  other = np.repeat((pairs % 256).astype(np.uint8).reshape(256, 256, 1), 3, -1)
  images = np.stack([own, other])
  mix = jax.jit(on_device.mix)
  for seed in range(4):
    key = tf.constant([11, seed], tf.int64)
    ref, _ = mixup.mix_batch(tf.constant(images), tf.constant([0, 1]), key, 10, 0.8, 0.0)
    lam, blend, box = mixup.draw(key, 256, 256, 0.8, 0.0)
    out = mix(images, np.full(2, lam.numpy(), np.float32), np.full(2, blend.numpy()),
              np.tile(box.numpy()[None], (2, 1)))
    np.testing.assert_array_equal(np.asarray(out), ref.numpy())


def test_erasing_same_boxes_outside_equal_and_normal_noise_inside():
  """reprob=1: every example has one box (or none when no attempt fits); outside it the
  prepared images equal the float32 path's, the boxes are where the host erases, and the
  noise inside is N(0, 1)."""
  size = 24
  kw = dict(image_size=size, randaugment=False)
  plain = batches(make_config(reprob=0.0, **kw), 4)
  erased = batches(make_config(reprob=1.0, **kw), 4)
  raw = batches(make_config(transfer='uint8', reprob=1.0, **kw), 4)
  noise = []
  for x0, x1, r, p in zip(plain, erased, raw, prepare_all(make_config(), raw)):
    box = np.asarray(on_device.box_mask(r['erase_box'], size, size))[..., None]
    host_box = x1['image'] != x0['image']  # the host's noise never equals a pixel
    np.testing.assert_array_equal(np.broadcast_to(box, host_box.shape), host_box)
    np.testing.assert_allclose(np.where(box, 0, p['image']), np.where(box, 0, x0['image']),
                               rtol=0, atol=1e-6)
    np.testing.assert_array_equal(p['label'], x1['label'])
    noise.append(p['image'][np.broadcast_to(box, p['image'].shape)])
  noise = np.concatenate(noise)
  assert noise.size > 2000 and abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1


def test_uint8_stream_is_deterministic_and_resumes():
  """With erasing (noise drawn on the device from the batch's key): a second stream and a
  stream resumed at step 3 (48 examples, batch 8: 6 steps an epoch; 5 crosses an epoch end)
  give the same raw and prepared batches."""
  config = make_config(transfer='uint8', reprob=0.5, randaugment=False)
  fresh = batches(config, 7)
  again = batches(config, 7)
  resumed = batches(config, 4, start_step=3)
  for i, b in enumerate(fresh):
    for other in (again[i],) + ((resumed[i - 3],) if i >= 3 else ()):
      assert set(other) == set(b)
      for k in b:
        np.testing.assert_array_equal(other[k], b[k], err_msg=f'step {i} {k}')
  prepared = prepare_all(config, fresh[3:])
  for p, q in zip(prepared, prepare_all(config, resumed)):
    np.testing.assert_array_equal(p['image'], q['image'])
  assert any(b['erase_box'][:, 1].any() for b in fresh)


def test_two_hosts_mix_within_their_own_halves():
  """groups=2: the prepared global batch is the two hosts' prepared batches side by side
  (each host's examples mixed with its own partners, lambda and box)."""
  config = make_config(transfer='uint8', randaugment=False)
  hosts = [batches(config, 1, 4, process_index=p, process_count=2)[0] for p in range(2)]
  joined = {k: np.concatenate([h[k] for h in hosts]) for k in hosts[0]}
  mean, std = config.dataset.mean, config.dataset.std
  both = jax.jit(lambda b: on_device.prepare(b, mean, std, groups=2))(joined)
  each = [jax.jit(lambda b: on_device.prepare(b, mean, std))(h) for h in hosts]
  np.testing.assert_array_equal(np.asarray(both['image']),
                                np.concatenate([np.asarray(e['image']) for e in each]))


def test_eval_uint8_batches_normalised_in_the_eval_step():
  floats = list(data.eval_iterator(make_config(), 4))
  raw = list(data.eval_iterator(make_config(transfer='uint8'), 4))
  assert len(raw) == len(floats) == 3 and raw[0]['image'].dtype == np.uint8
  norm = jax.jit(lambda x: on_device.normalize(x, data.CIFAR_MEAN, data.CIFAR_STD))
  for f, r in zip(floats, raw):
    np.testing.assert_array_equal(r['mask'], f['mask'])
    np.testing.assert_array_equal(r['label'], f['label'])
    m = f['mask']
    np.testing.assert_allclose(np.asarray(norm(r['image']))[m], f['image'][m], rtol=0, atol=1e-6)


def test_train_and_eval_steps_take_uint8_batches():
  """The train step prepares a uint8 batch itself (the same state as preparing it first);
  the eval step normalises uint8 images (the same counts as the float32 images)."""
  c = base_config.base('vit_mlp')
  c.dataset = make_config(transfer='uint8', image_size=16).dataset
  c.aug = make_config(reprob=0.5, randaugment=False).aug
  c.model.name = 'mini_resnet'
  c.batch_size, c.num_epochs = 8, 1
  mesh = sharding.make_mesh(2)
  trainer = train.make_trainer(c, mesh, 10, steps_per_epoch=6)
  raw = batches(c, 1)[0]
  mean, std = c.dataset.mean, c.dataset.std
  ready = jax.device_get(jax.jit(lambda b: on_device.prepare(b, mean, std))(raw))
  states = []
  for batch in (raw, ready):
    state = trainer.init(jax.random.PRNGKey(0))
    state, metrics = trainer.train_step(state, sharding.global_batch(batch, mesh), None)
    assert np.isfinite(float(metrics['train_loss']))
    states.append(jax.device_get(state.params))
  for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  eval_step = evaluate.make_eval_step(trainer.student)
  variables = {'params': state.params['student'], 'batch_stats': state.batch_stats['student']}
  norm = (tuple(mean), tuple(std))
  c8, c32 = make_config(transfer='uint8'), make_config()
  for r, f in zip(data.eval_iterator(c8, 8), data.eval_iterator(c32, 8)):
    got = eval_step(variables, sharding.global_batch(r, mesh), norm=norm)
    want = eval_step(variables, sharding.global_batch(f, mesh), norm=norm)
    assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in want.items()}
