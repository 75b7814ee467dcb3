"""Each augmentation against its definition: timm/PIL for RandAugment and resizing, the timm
formulas for crop boxes, mixup/cutmix, random erasing and the eval crop."""
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
# torchvision (pulled in by timm) segfaults when imported after TensorFlow: import it first.
from timm.data import auto_augment as timm_aa
from timm.data import transforms as timm_transforms
from PIL import Image
import tensorflow as tf

from pat_jax.data import augment
from pat_jax.data import mixup
from pat_jax.data import randaugment

FILL = (129, 124, 112)  # round(255 * CIFAR mean)
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def _test_image(h=29, w=37, seed=0):
  """Half smooth (bicubic-upsampled noise), half raw noise: exercises LUTs and interpolation."""
  rng = np.random.default_rng(seed)
  smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8))
                      .resize((w, h), Image.BICUBIC))
  noise = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
  return np.concatenate([smooth[:, :w // 2], noise[:, w // 2:]], axis=1)


def _timm_op(name, img, magnitude, negate, bicubic, monkeypatch):
  # timm negates a signed argument when random.random() > 0.5.
  monkeypatch.setattr(random, 'random', lambda: 1.0 if negate else 0.0)
  level_fn = timm_aa.LEVEL_TO_ARG[name]
  args = level_fn(magnitude, {'translate_pct': 0.45}) if level_fn else ()
  out = timm_aa.NAME_TO_OP[name](Image.fromarray(img), *args, fillcolor=FILL,
                                 resample=Image.BICUBIC if bicubic else Image.BILINEAR)
  return np.asarray(out).astype(int)


@pytest.mark.parametrize('name', randaugment.INCREASING_OPS)
def test_randaugment_ops_match_timm_pil(name, monkeypatch):
  """Tolerance: exact for the colour/histogram ops (AutoContrast, Equalize, Invert, Posterize,
  Solarize, SolarizeAdd, Color, Contrast, Brightness, Sharpness); for the geometric ops (Rotate,
  ShearX/Y, TranslateX/YRel) at most 1 grey level on at most 1% of the values. Why: the
  geometric ops truncate a float64 interpolation to uint8 as PIL does, so a sample position or
  value within ~1e-15 of a boundary can go either way: PIL rounds cos/sin to 15 decimals
  (Rotate), and the ops run XLA-compiled (`apply_batch`, as in the pipeline), where LLVM may fuse
  a multiply-add into one FMA (one rounding instead of two). Measured on a 224x224 image at
  m = 3.3, 9, 10, both signs and both filters: Rotate 1 level on <= 0.0007% of values, ShearY 1
  level on <= 0.23%, all other ops exact (and all exact on this test image).
  """
  img = _test_image()
  for magnitude in (0.0, 3.3, 9.0, 10.0):
    for negate in (False, True):
      for bicubic in (False, True):
        if name == 'PosterizeIncreasing' and magnitude >= 10:
          continue  # Pillow >= 10 rejects bits=0; checked separately below
        ref = _timm_op(name, img, magnitude, negate, bicubic, monkeypatch)
        out = randaugment.apply_op(name, tf.constant(img), tf.constant(magnitude, tf.float64),
                                   tf.constant(negate), tf.constant(bicubic), FILL)
        diff = np.abs(out.numpy().astype(int) - ref)
        where = f'{name} m={magnitude} negate={negate} bicubic={bicubic}'
        if name in GEOMETRIC_OPS:
          assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, where
        else:
          assert diff.max() == 0, where


def test_posterize_zero_bits_is_black():
  """Magnitude 10 keeps 0 bits: black, as Pillow < 10 did (the original's environment)."""
  img = _test_image()
  out = randaugment.apply_op('PosterizeIncreasing', tf.constant(img),
                             tf.constant(10.0, tf.float64), tf.constant(False),
                             tf.constant(False), FILL)
  assert out.numpy().max() == 0


def test_randaugment_parse_and_statistics():
  cfg = randaugment.parse('rand-m9-mstd0.5-inc1')
  assert cfg == dict(magnitude=9.0, num_layers=2, prob=0.5, magnitude_std=0.5,
                     magnitude_max=10.0, increasing=True)
  img = tf.constant(_test_image(16, 16))
  changed = 0
  for i in range(64):
    out = randaugment.rand_augment(img, tf.constant([7, i], tf.int64), 'rand-m9-mstd0.5-inc1',
                                   FILL)
    assert out.shape == img.shape and out.dtype == tf.uint8
    changed += int(not np.array_equal(out.numpy(), img.numpy()))
  # P(no op applied) = 0.25, and a few ops are near-identity at some magnitudes.
  assert 32 <= changed <= 60


def test_randaugment_cases_skip_xla_constant_inference():
  """apply_batch's Case ops (one per layer) are told not to search their operands for
  compile-time constants: TF's XLA bridge otherwise interprets the whole image computation,
  over 40 s of a 224-pixel run's first batch on a 2-core CPU (randaugment._no_constant_operands)."""
  spec = tf.TensorSpec
  graph = randaugment._apply_batch.get_concrete_function(
      spec([2, 16, 16, 3], tf.uint8), spec([2, 2], tf.int32), spec([2, 2], tf.float64),
      spec([2, 2], tf.bool), spec([2, 2], tf.bool), spec([3], tf.float64)).graph.as_graph_def()
  cases = [n for f in graph.library.function for n in f.node_def
           if n.op in ('Case', 'StatelessCase')]
  assert len(cases) == 2
  assert all(n.attr['_xla_propagate_compile_time_consts'].b is False for n in cases)


def test_randaugment_batch_equals_per_image_and_uncompiled_ops():
  """The pipeline's path (draw per example, `apply_batch` per batch, XLA) gives each image what
  `rand_augment` gives it alone (exactly), and the ops run uncompiled (plain TF ops, one image
  at a time) give the same values up to the geometric ops' tolerance (XLA may contract a
  multiply-add into an FMA, see test_randaugment_ops_match_timm_pil)."""
  cfg = 'rand-m9-mstd0.5-inc1'
  rng = np.random.default_rng(1)
  images = tf.constant(rng.integers(0, 256, (16, 16, 16, 3)).astype(np.uint8))
  keys = [tf.constant([13, i], tf.int64) for i in range(16)]
  params = [tf.stack(v) for v in zip(*[randaugment.draw(k, cfg) for k in keys])]
  assert params[0].shape == (16, 2)
  applied = set(params[0].numpy().ravel()) - {len(randaugment.INCREASING_OPS)}
  assert len(applied) >= 8  # many ops exercised
  fill = tf.constant(FILL, tf.float64)
  batch = randaugment.apply_batch(images, params, FILL).numpy()
  for i, key in enumerate(keys):
    if i < 3:
      np.testing.assert_array_equal(batch[i], randaugment.rand_augment(images[i], key, cfg,
                                                                       FILL).numpy())
    eager = randaugment._layers(images[i], *[p[i] for p in params], fill)  # no XLA
    diff = np.abs(batch[i].astype(int) - eager.numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


@pytest.mark.parametrize('method,pil', [('bilinear', Image.BILINEAR), ('bicubic', Image.BICUBIC)])
def test_resize_matches_pil(method, pil):
  """Bit-exact: same kernels, 22-bit fixed-point coefficients and pass order as Pillow."""
  img = _test_image(32, 32)
  for (top, left, h, w) in [(0, 0, 32, 32), (3, 5, 17, 11), (10, 2, 9, 20)]:
    for size in (48, 20):
      ref = np.asarray(Image.fromarray(img).crop((left, top, left + w, top + h))
                       .resize((size, size), pil)).astype(int)
      out = augment.resize(tf.constant(img[top:top + h, left:left + w]), (size, size), method)
      np.testing.assert_array_equal(out.numpy().astype(int), ref)


def _timm_boxes(n, size, scale, ratio):
  rrc = timm_transforms.RandomResizedCropAndInterpolation(8, scale=scale, ratio=ratio)
  img = Image.new('RGB', size)
  random.seed(0)
  return np.array([rrc.get_params(img, rrc.scale, rrc.ratio) for _ in range(n)])


def _our_boxes(n, height, width, scale, ratio):
  ds = tf.data.Dataset.range(n).map(lambda i: tf.stack(augment.sample_crop_box(
      tf.stack([tf.constant(3, tf.int64), i]), height, width, scale, ratio)))
  return np.stack(list(ds.as_numpy_iterator()))


@pytest.mark.parametrize('hw', [(32, 32), (20, 48)])
def test_crop_box_distribution_matches_timm(hw):
  """Boxes lie inside the image, and the (area fraction, aspect, top/left) distributions equal
  timm's get_params (two-sample KS distance on 2,000 draws each)."""
  height, width = hw
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
  ours = _our_boxes(2000, height, width, scale, ratio)
  theirs = _timm_boxes(2000, (width, height), scale, ratio)
  top, left, h, w = ours.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all() and (h >= 1).all()

  def ks(a, b):
    grid = np.union1d(a, b)
    ca = np.searchsorted(np.sort(a), grid, side='right') / len(a)
    cb = np.searchsorted(np.sort(b), grid, side='right') / len(b)
    return np.abs(ca - cb).max()
  for stat in (lambda x: x[:, 2] * x[:, 3], lambda x: x[:, 3] / x[:, 2], lambda x: x[:, 0],
               lambda x: x[:, 1]):
    assert ks(stat(ours), stat(theirs)) < 0.06


def test_crop_box_fallback_is_central():
  """A 4x40 image never fits ratio (3/4, 4/3) at scale ~1: timm's central fallback."""
  top, left, h, w = [int(v) for v in augment.sample_crop_box(
      tf.constant([0, 1], tf.int64), 4, 40, (0.99, 1.0), (3 / 4, 4 / 3))]
  assert (h, w) == (4, round(4 * 4 / 3)) and top == 0 and left == (40 - w) // 2


@pytest.mark.parametrize('size,crop_pct', [(224, 0.875), (224, 0.9), (32, 0.875)])
def test_eval_resize_center_crop(size, crop_pct):
  """Resize(floor(size / crop_pct)) bilinear + CenterCrop(size), vs PIL/torchvision."""
  img = _test_image(32, 32)
  scale_size = math.floor(size / crop_pct)
  off = int(round((scale_size - size) / 2.0))
  ref = np.asarray(Image.fromarray(img).resize((scale_size, scale_size), Image.BILINEAR))
  ref = ref[off:off + size, off:off + size].astype(int)
  out = augment.eval_resize_crop(tf.constant(img), size, crop_pct).numpy().astype(int)
  assert out.shape == (size, size, 3)
  np.testing.assert_array_equal(out, ref)  # bit-exact with PIL
  # Geometry: a vertical edge at x = 16 of a 32-wide image stays at the centre of the crop.
  edge = np.zeros((32, 32, 3), np.uint8)
  edge[:, 16:] = 255
  row = augment.eval_resize_crop(tf.constant(edge), size, crop_pct).numpy()[0, :, 0]
  assert row[:size // 2 - 4].max() == 0 and row[size // 2 + 4:].min() == 255
  # Non-square input: shorter side to scale_size, aspect kept.
  tall = augment.eval_resize_crop(tf.zeros([40, 20, 3], tf.uint8), size, crop_pct)
  assert tall.shape == (size, size, 3)


def test_flip_probability_and_effect():
  img = tf.constant(_test_image(8, 8))
  flips = [np.array_equal(augment.random_flip(img, tf.constant([0, i], tf.int64), 0.5).numpy(),
                          img.numpy()[:, ::-1]) for i in range(200)]
  assert 70 < sum(flips) < 130


def test_random_erasing_area_and_aspect_bounds():
  b, s = 128, 32
  x = tf.zeros([b, s, s, 3])
  out = augment.random_erasing(x, tf.constant([1, 2], tf.int64), prob=1.0).numpy()
  erased = np.any(out != 0, axis=-1)
  for i in range(b):
    ys, xs = np.nonzero(erased[i])
    assert len(ys) > 0
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert erased[i].sum() == h * w  # one rectangle
    assert h < s and w < s
    # h, w are rounded from sqrt(area * aspect): bounds widened by that rounding.
    assert (math.sqrt(0.02 * s * s) - 1) ** 2 <= h * w <= (math.sqrt(s * s / 3) + 1) ** 2
    assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3
  noise = out[erased]
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
  some = augment.random_erasing(x, tf.constant([1, 3], tf.int64), prob=0.25).numpy()
  assert 0.1 < np.mean(np.any(some != 0, axis=(1, 2, 3))) < 0.4


def test_smoothed_targets_equal_label_smoothing_ce():
  t = mixup.smooth_one_hot(tf.constant([3, 0]), 100, 0.1).numpy()
  np.testing.assert_allclose(t[0, 3], 0.901, rtol=1e-6)
  np.testing.assert_allclose(t[0, 0], 0.001, rtol=1e-6)
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)


def test_mixup_and_cutmix_label_mass():
  """Batch mode: sample i mixed with b-1-i with one lambda; targets carry exactly that mass;
  cutmix's lambda equals the fraction of pixels kept from the sample itself."""
  b, s, c = 8, 16, 10
  labels = tf.range(b)
  images = tf.cast(tf.broadcast_to(tf.range(b)[:, None, None, None] * 30, [b, s, s, 3]), tf.uint8)
  seen = set()
  for seed in range(40):
    key = tf.constant([5, seed], tf.int64)
    mixed, targets = mixup.mix_batch(images, labels, key, c, 0.8, 1.0, smoothing=0.1)
    mixed, targets = mixed.numpy().astype(float), targets.numpy()
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
    lam = (targets[0, 0] - 0.01) / 0.9  # own label's mass, minus the eps/C off-value
    for i in range(b):
      j = b - 1 - i
      np.testing.assert_allclose(targets[i, i] + targets[i, j], 0.9 + 0.02, atol=1e-5)
      np.testing.assert_allclose((targets[i, i] - 0.01) / 0.9, lam, atol=1e-5)
    own = mixed[0] == 0
    other = mixed[0] == (b - 1) * 30
    if np.all(own | other) and other.any():  # cutmix: one box from the partner
      seen.add('cutmix')
      np.testing.assert_allclose(own.mean(), lam, atol=1e-5)
      ys, xs = np.nonzero(other[..., 0])
      assert other[..., 0].sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
    else:  # mixup: rint(lam * x_i + (1 - lam) * x_j) on uint8
      seen.add('mixup')
      expect = np.rint(np.float32(0) * np.float32(lam) + np.float32((b - 1) * 30)
                       * (np.float32(1) - np.float32(lam)))
      assert np.abs(mixed[0] - expect).max() <= 1
  assert seen == {'mixup', 'cutmix'}


def test_no_mixing_gives_smoothed_one_hot():
  images = tf.zeros([4, 8, 8, 3], tf.uint8)
  mixed, targets = mixup.mix_batch(images, tf.constant([1, 2, 3, 4]), tf.constant([0, 0],
                                   tf.int64), 10, 0.0, 0.0, smoothing=0.1)
  np.testing.assert_allclose(targets.numpy(), mixup.smooth_one_hot([1, 2, 3, 4], 10, 0.1))
  assert mixed is images


@pytest.mark.parametrize('source_hw,size', [((32, 32), 224), ((32, 24), 40), ((8, 8), 16),
                                            ((32, 32), 12), ((48, 20), 16)])
def test_crop_resizer_equals_crop_then_pil_resize_then_flip(source_hw, size):
  """The table path of the training crop (coefficients precomputed per crop size, the flip
  folded into the column coefficients) is the crop, Pillow resize and flip, bit for bit,
  upsampling and downsampling (48x20 -> 16 has crops where Pillow runs the vertical pass first)."""
  h_src, w_src = source_hw
  img = _test_image(h_src, w_src, seed=3)
  resizer = augment.CropResizer(h_src, w_src, size)
  rng = np.random.default_rng(0)
  boxes = [(0, 0, h_src, w_src), (0, w_src - 1, 1, 1), (h_src - 1, 0, 1, w_src)]
  for _ in range(12):
    h, w = int(rng.integers(1, h_src + 1)), int(rng.integers(1, w_src + 1))
    boxes.append((int(rng.integers(0, h_src - h + 1)), int(rng.integers(0, w_src - w + 1)), h, w))
  for top, left, h, w in boxes:
    for method_index, pil in enumerate((Image.BILINEAR, Image.BICUBIC)):
      ref = np.asarray(Image.fromarray(img).crop((left, top, left + w, top + h))
                       .resize((size, size), pil))
      for flip in (False, True):
        out = resizer(tf.constant(img), top, left, h, w, method_index, tf.constant(flip))
        np.testing.assert_array_equal(out.numpy(), ref[:, ::-1] if flip else ref,
                                      err_msg=f'{top, left, h, w} {method_index} {flip}')


def test_crop_resize_flip_table_and_per_image_paths_agree():
  """Same keys -> same crop, interpolation and flip draws, with and without the tables."""
  img = tf.constant(_test_image(32, 32, seed=4))
  resizer = augment.CropResizer(32, 32, 24)
  for i in range(40):
    args = (img, tf.constant([9, i], tf.int64), tf.constant([8, i], tf.int64), 24, (0.08, 1.0),
            (3 / 4, 4 / 3), 'random', 0.5)
    np.testing.assert_array_equal(augment.crop_resize_flip(*args, resizer=resizer).numpy(),
                                  augment.crop_resize_flip(*args).numpy())
  ref = augment.random_flip(augment.random_resized_crop(
      img, tf.constant([9, 0], tf.int64), 24, (0.08, 1.0), (3 / 4, 4 / 3), 'random'),
      tf.constant([8, 0], tf.int64), 0.5)
  out = augment.crop_resize_flip(img, tf.constant([9, 0], tf.int64), tf.constant([8, 0], tf.int64),
                                 24, (0.08, 1.0), (3 / 4, 4 / 3), 'random', 0.5, resizer=resizer)
  np.testing.assert_array_equal(out.numpy(), ref.numpy())


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0),
                                                      (0.0, 0.0)])
def test_fused_mix_normalize_equals_mix_batch_then_normalize(mixup_alpha, cutmix_alpha):
  """The tabulated, XLA-fused batch step is `normalize(mix_batch(...))` bit for bit, targets
  included, for mixup, cutmix and no mixing (all pixel pairs: the exhaustive test below)."""
  images = tf.constant(np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), np.uint8))
  labels = tf.constant([0, 1, 2, 3, 4, 5])
  mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
  modes = set()
  for seed in range(12):
    key = tf.constant([5, seed], tf.int64)
    ref_images, ref_targets = mixup.mix_batch(images, labels, key, 10, mixup_alpha, cutmix_alpha)
    ref = augment.normalize(ref_images, mean, std).numpy()
    out, targets = mixup.mix_normalize(images, labels, key, 10, mixup_alpha, cutmix_alpha, mean,
                                       std)
    np.testing.assert_array_equal(out.numpy(), ref)
    np.testing.assert_array_equal(targets.numpy(), ref_targets.numpy())
    r, x = ref_images.numpy(), images.numpy()
    modes.add('none' if np.array_equal(r, x) else
              'cut' if np.all((r == x) | (r == x[::-1])) else 'mix')
  if mixup_alpha > 0:
    assert 'mix' in modes


def test_fused_mix_normalize_exhaustive_pixel_pairs():
  """All 65,536 (own, partner) uint8 pairs in each channel, several lambdas."""
  pairs = np.arange(256 * 256)
  a = (pairs // 256).astype(np.uint8).reshape(256, 256)
  p = (pairs % 256).astype(np.uint8).reshape(256, 256)
  images = tf.constant(np.stack([np.stack([a] * 3, -1), np.stack([p] * 3, -1)]))
  labels = tf.constant([0, 1])
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  for seed in range(6):
    key = tf.constant([11, seed], tf.int64)
    ref_images, _ = mixup.mix_batch(images, labels, key, 10, 0.8, 0.0)
    out, _ = mixup.mix_normalize(images, labels, key, 10, 0.8, 0.0, mean, std)
    np.testing.assert_array_equal(out.numpy(), augment.normalize(ref_images, mean, std).numpy())


def _reference_erasing(images, key, prob):
  """The straightforward whole-batch form of `augment.random_erasing` (same draws, from
  `augment.erasing_boxes`): every example gets a mask, erased ones get the noise."""
  height, width = images.shape[1], images.shape[2]
  apply, top, left, h, w, k_noise = augment.erasing_boxes(key, tf.shape(images)[0], height,
                                                          width, prob)
  rows = tf.range(height)[None, :, None]
  cols = tf.range(width)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None])
            & apply[:, None, None])
  erased = tf.cast(tf.where(apply), tf.int32)
  noise = tf.random.stateless_normal(
      tf.concat([tf.shape(erased)[:1], tf.shape(images)[1:]], 0), k_noise, dtype=images.dtype)
  noise = tf.scatter_nd(erased, noise, tf.shape(images))
  return tf.where(inside[..., None], noise, images)


def test_random_erasing_equals_whole_batch_reference():
  x = tf.constant(np.random.default_rng(0).normal(size=(16, 20, 24, 3)).astype(np.float32))
  for seed in range(8):
    key = tf.constant([2, seed], tf.int64)
    for prob in (0.25, 1.0, 0.0):
      np.testing.assert_array_equal(augment.random_erasing(x, key, prob).numpy(),
                                    _reference_erasing(x, key, prob).numpy())


@pytest.mark.parametrize('method,pil', [('bilinear', Image.BILINEAR), ('bicubic', Image.BICUBIC)])
@pytest.mark.parametrize('h,w,oh,ow', [(37, 53, 224, 224), (53, 37, 224, 224), (37, 53, 37, 224),
                                       (199, 301, 131, 97), (5, 3, 5, 7)])
def test_resize_of_odd_sizes_matches_pil(method, pil, h, w, oh, ow):
  img = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
  ref = np.asarray(Image.fromarray(img).resize((ow, oh), pil))
  np.testing.assert_array_equal(augment.resize(tf.constant(img), (oh, ow), method).numpy(), ref)


@pytest.mark.parametrize('h,w,oh,ow', [(301, 199, 97, 131), (5, 3, 2, 7)])
def test_resize_reducing_the_height_matches_pil(h, w, oh, ow):
  """Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
  pixels as the width (301 - 97 > 2 * (199 - 131); 5 - 2 > 2 * (3 - 7))."""
  img = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
  ref = np.asarray(Image.fromarray(img).resize((ow, oh), Image.BICUBIC))
  np.testing.assert_array_equal(augment.resize(tf.constant(img), (oh, ow), 'bicubic').numpy(), ref)


@pytest.mark.parametrize('method,pil', [('bilinear', Image.BILINEAR), ('bicubic', Image.BICUBIC)])
def test_resize_of_random_shapes_matches_pil(method, pil):
  """Random small shapes, each axis reduced, kept or enlarged, with both pass orders and their
  boundary (in_h - out_h == 2 * (in_w - out_w)); eager and traced with unknown sizes."""
  rng = np.random.default_rng(7)
  shapes = [(9, 8, 3, 5), (9, 8, 2, 5), (10, 8, 4, 5), (7, 7, 7, 3), (7, 7, 3, 7), (4, 4, 9, 2)]
  while len(shapes) < 50:
    shapes.append(tuple(int(v) for v in rng.integers(1, 25, 4)))
  traced = tf.function(lambda img, size: augment.resize(img, size, method),
                       input_signature=[tf.TensorSpec([None, None, 3], tf.uint8),
                                        tf.TensorSpec([2], tf.int32)])
  for h, w, oh, ow in shapes:
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((ow, oh), pil))
    np.testing.assert_array_equal(augment.resize(tf.constant(img), (oh, ow), method).numpy(), ref,
                                  err_msg=f'{h, w} -> {oh, ow}')
    np.testing.assert_array_equal(traced(tf.constant(img), tf.constant([oh, ow])).numpy(), ref,
                                  err_msg=f'traced {h, w} -> {oh, ow}')


def test_resizing_a_photo_needs_no_dense_matrix():
  """A 2592x1944 camera JPEG to 224: host memory grows by the image and the small coefficient
  matrices, not by an (H, 224, W) float64 array (9 GB)."""
  code = '''
import resource, sys
import numpy as np, tensorflow as tf
from pat_jax.data import augment
augment.resize(tf.zeros((64, 64, 3), tf.uint8), (32, 32), 'bicubic')  # warm up TF
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = np.random.default_rng(0).integers(0, 256, (1944, 2592, 3), dtype=np.uint8)
out = augment.resize(tf.constant(img), (224, 224), 'bicubic').numpy()
print(out.shape, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
'''
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  shape, grown_mb = proc.stdout.strip().rsplit(' ', 1)
  assert shape == '(224, 224, 3)'
  assert int(grown_mb) < 500, f'peak host memory grew by {grown_mb} MB'


def _pillow_coefficients(in_size, out_size, pil_filter, support):
  """libImaging/Resample.c precompute_coeffs + normalize_coeffs_8bpc, line by line in Python
  doubles: (xmin per output, int coefficients (out, ksize))."""
  scale = filterscale = in_size / out_size
  filterscale = max(filterscale, 1.0)
  support = support * filterscale
  ksize = int(math.ceil(support)) * 2 + 1
  xmins, kk = [], np.zeros((out_size, ksize), np.int64)
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size) - xmin
    k = [pil_filter((x + xmin - center + 0.5) * ss) for x in range(xmax)]
    ww = 0.0
    for w in k:  # in window order, as Pillow
      ww += w
    for x, w in enumerate(k):
      w = w / ww if ww != 0.0 else w
      kk[xx, x] = int(-0.5 + w * (1 << 22)) if w < 0 else int(0.5 + w * (1 << 22))
    xmins.append(xmin)
  return np.array(xmins), kk


def _pillow_bilinear(x):
  x = abs(x)
  return 1.0 - x if x < 1.0 else 0.0


def _pillow_bicubic(x):
  x, a = abs(x), -0.5
  if x < 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  return (((x - 5) * x + 8) * x - 4) * a if x < 2.0 else 0.0


def _dense(start, coeffs, count, in_size):
  """`augment._pass_tables` blocks as a dense (count, in_size) matrix of Pillow's integers."""
  start, coeffs = start.numpy(), np.round(coeffs.numpy() * (1 << 22)).astype(np.int64)
  dense = np.zeros((coeffs.shape[0] * coeffs.shape[1], in_size + coeffs.shape[2]), np.int64)
  for j in range(coeffs.shape[0]):
    for b in range(coeffs.shape[1]):
      dense[j * coeffs.shape[1] + b, start[j]:start[j] + coeffs.shape[2]] = coeffs[j, b]
  assert not dense[count:].any() and not dense[:, in_size:].any()  # padding stays empty
  return dense[:count, :in_size]


@pytest.mark.parametrize('method,pil_filter,support', [('bilinear', _pillow_bilinear, 1.0),
                                                       ('bicubic', _pillow_bicubic, 2.0)])
def test_banded_coefficients_equal_pillows(method, pil_filter, support):
  """The banded tables hold Pillow's bounds and 22-bit integers, upsampling and downsampling (up
  to 2592 -> 224), window-order sums included; a slice of outputs (the eval centre crop) holds
  the same rows."""
  tables = tf.function(lambda i, o, first, count: augment._pass_tables(i, o, method, first, count),
                       input_signature=[tf.TensorSpec([], tf.int32)] * 4)
  sizes = [(i, o) for o in (1, 7, 40, 224) for i in range(1, 70, 3)]
  sizes += [(i, o) for o in (224, 256) for i in (287, 331, 375, 500, 1944, 2592)]
  for i, o in sizes:
    ref_xmin, ref = _pillow_coefficients(i, o, pil_filter, support)
    dense_ref = np.zeros((o, i + ref.shape[1]), np.int64)
    for row, (xmin, k) in enumerate(zip(ref_xmin, ref)):
      dense_ref[row, xmin:xmin + len(k)] = k
    dense_ref = dense_ref[:, :i]
    first, count = (o // 7, o - o // 3) if o > 3 else (0, o)
    for first, count in ((0, o), (first, count)):
      start, coeffs, _ = tables(i, o, first, count)
      np.testing.assert_array_equal(_dense(start, coeffs, count, i),
                                    dense_ref[first:first + count], err_msg=f'{i} -> {o}')


def test_photo_sized_random_crops_match_pil():
  """ImageNet-sized crops (many blocks per pass, spans clipped at the image border) to 224,
  both filters, traced with unknown sizes as in the input pipeline."""
  rng = np.random.default_rng(5)
  img = np.asarray(Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
                   .resize((500, 375), Image.BICUBIC))
  img = np.clip(img.astype(int) + rng.integers(-30, 31, img.shape), 0, 255).astype(np.uint8)
  for method, pil in (('bilinear', Image.BILINEAR), ('bicubic', Image.BICUBIC)):
    traced = tf.function(lambda x, s, m=method: augment.resize(x, s, m),
                         input_signature=[tf.TensorSpec([None, None, 3], tf.uint8),
                                          tf.TensorSpec([2], tf.int32)])
    for top, left, h, w in [(0, 0, 375, 500), (10, 37, 300, 400), (200, 300, 91, 123),
                            (0, 120, 375, 151), (50, 0, 220, 500)]:
      crop = img[top:top + h, left:left + w]
      ref = np.asarray(Image.fromarray(crop).resize((224, 224), pil))
      np.testing.assert_array_equal(traced(tf.constant(crop), tf.constant([224, 224])).numpy(),
                                    ref, err_msg=f'{method} {top, left, h, w}')


@pytest.mark.parametrize('h,w', [(375, 500), (500, 333), (256, 256)])
def test_eval_resize_crop_of_photo_sizes_matches_pil(h, w):
  """eval_resize_crop computes only the centre crop's pixels: same as Pillow's resize of the
  shorter side to 256 followed by the 224 centre crop."""
  img = np.random.default_rng(6).integers(0, 256, (h, w, 3), dtype=np.uint8)
  nh, nw = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
  ref = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
  top, left = int(round((nh - 224) / 2)), int(round((nw - 224) / 2))
  out = augment.eval_resize_crop(tf.constant(img), 224, 0.875).numpy()
  np.testing.assert_array_equal(out, ref[top:top + 224, left:left + 224])


def test_pillow_in_the_graph_equals_the_tf_ops():
  """dataset.resize_with='pillow' (Pillow called from the graph) and the TF ops give the same
  crops, resizes and flips from the same draws: photo-sized and tiny sources, up- and
  downsampling, both pass orders (tall crops reduce the height first), traced with unknown
  sizes as in the input pipeline."""
  rng = np.random.default_rng(8)
  spec = [tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int64),
          tf.TensorSpec([2], tf.int64)]
  for (h, w), size in (((375, 500), 224), ((97, 61), 40), ((13, 300), 24), ((9, 7), 16)):
    img = _test_image(h, w, seed=int(rng.integers(100)))
    paths = [tf.function(lambda x, k, f, r=r: augment.crop_resize_flip(
        x, k, f, size, (0.08, 1.0), (3 / 4, 4 / 3), 'random', 0.5, resizer=r),
        input_signature=spec, autograph=False) for r in (None, 'pillow')]
    for i in range(6):
      keys = (tf.constant([h, i], tf.int64), tf.constant([w, i], tf.int64))
      tf_ops, pil = (p(tf.constant(img), *keys).numpy() for p in paths)
      np.testing.assert_array_equal(pil, tf_ops, err_msg=f'{h}x{w} -> {size}, key {i}')


@pytest.mark.parametrize('h,w,interpolation', [(375, 500, 'bilinear'), (333, 500, 'bicubic'),
                                               (31, 17, 'bilinear')])
def test_pillow_eval_resize_crop_equals_the_tf_ops(h, w, interpolation):
  img = np.random.default_rng(9).integers(0, 256, (h, w, 3), dtype=np.uint8)
  size = 224 if h > 100 else 12
  out = [augment.eval_resize_crop(tf.constant(img), size, 0.875, interpolation, p).numpy()
         for p in (False, True)]
  np.testing.assert_array_equal(out[1], out[0])


def test_resize_with_picks_the_form_and_names_bad_values():
  import ml_collections
  from pat_jax import errors
  ds = ml_collections.ConfigDict({'resize_with': 'auto'})
  assert augment.resize_with(ds, (32, 32), 224) == 'tables'  # CIFAR: precomputed tables
  assert augment.resize_with(ds, None, 224) == 'pillow'  # image folders, JPEGs
  ds.resize_with = 'tf'
  assert augment.resize_with(ds, (32, 32), 224) == 'tables'
  assert augment.resize_with(ds, None, 224) == 'tf'
  ds.resize_with = 'pillow'
  assert augment.resize_with(ds, (32, 32), 224) == 'pillow'
  ds.resize_with = 'opencv'
  with pytest.raises(errors.ConfigError, match=r"resize_with='opencv'.*'pillow'"):
    augment.resize_with(ds, None, 224)
