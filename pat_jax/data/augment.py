"""Per-example and per-batch image ops in TF, matching timm/torchvision/PIL semantics.

Every random draw is a `tf.random.stateless_*` call on an explicit key, so an augmented example is
a pure function of (seed, epoch, example index) and the stream does not depend on thread
scheduling. Keys are int64 vectors of shape [2] (TF's stateless seed format).

Resizing is Pillow's resampler, bit for bit, in one of two forms (`dataset.resize_with`): Pillow
itself inside the graph (`pillow_crop_resize_flip`), or a re-implementation in TF ops (`resize`,
`CropResizer`); the crop box sampling is timm's `RandomResizedCropAndInterpolation.get_params`
with stateless draws.
"""
import math

import numpy as np
from PIL import Image
import tensorflow as tf

from pat_jax import errors


def fold_in(key, *data):
  """Derive a key from `key` and integers, e.g. fold_in(seed_key, epoch, index)."""
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


def split(key, num):
  return tf.unstack(tf.random.experimental.stateless_split(key, num))


def uniform(key, shape=(), minval=0.0, maxval=1.0, dtype=tf.float64):
  return tf.random.stateless_uniform(shape, key, minval, maxval, dtype=dtype)


def randint(key, low, high_inclusive, shape=()):
  """Python's random.randint(low, high): inclusive on both ends."""
  u = uniform(key, shape)
  span = tf.cast(high_inclusive - low + 1, tf.float64)
  return tf.cast(low, tf.int32) + tf.minimum(tf.cast(tf.floor(u * span), tf.int32),
                                              tf.cast(high_inclusive - low, tf.int32))


def sample_crop_box(key, height, width, scale, ratio, attempts=10):
  """timm RandomResizedCropAndInterpolation.get_params: (top, left, h, w) of the crop.

  Ten attempts of (area ~ U(scale) * H*W, log-aspect ~ U(log ratio)), the first that fits wins;
  otherwise a central crop clamped to the ratio range.
  """
  k_area, k_ratio, k_top, k_left = split(key, 4)
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  area = h * w
  target_area = uniform(k_area, [attempts], scale[0], scale[1]) * area
  log_r = uniform(k_ratio, [attempts], math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(log_r)
  tw = tf.round(tf.sqrt(target_area * aspect))  # round() is half-to-even, as Python's
  th = tf.round(tf.sqrt(target_area / aspect))
  ok = tf.logical_and(tw <= w, th <= h)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  any_ok = tf.reduce_any(ok)
  # Fallback: whole image if its ratio is inside the range, else clamp to the range.
  in_ratio = w / h
  fw = tf.where(in_ratio < min(ratio), w, tf.where(in_ratio > max(ratio),
                                                    tf.round(h * max(ratio)), w))
  fh = tf.where(in_ratio < min(ratio), tf.round(w / min(ratio)), h)
  crop_h = tf.cast(tf.where(any_ok, th[first], fh), tf.int32)
  crop_w = tf.cast(tf.where(any_ok, tw[first], fw), tf.int32)
  crop_h = tf.maximum(crop_h, 1)
  crop_w = tf.maximum(crop_w, 1)
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  top = tf.where(any_ok, randint(k_top, 0, height - crop_h), (height - crop_h) // 2)
  left = tf.where(any_ok, randint(k_left, 0, width - crop_w), (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def to_uint8(x):
  """Round and saturate a float image, as PIL does after resampling."""
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


_PRECISION_BITS = 22  # Pillow Resample.c: 32 - 8 - 2 for 8-bit images
_SUPPORT = {'bilinear': 1.0, 'bicubic': 2.0}
# Output pixels per block of a banded pass (`_pass_tables`). On one CPU core, for 224-pixel outputs
# from 32- to 500-pixel inputs, 8 measured about best among 4..16: larger blocks read longer
# input spans per output when reducing, smaller ones make tinier, less efficient matmuls.
_BLOCK = 8


def _pil_filter(x, method):
  x = tf.abs(x)
  zero = tf.zeros_like(x)
  if method == 'bilinear':
    return tf.maximum(zero, 1.0 - x)
  a = -0.5  # Pillow's bicubic
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, near, tf.where(x < 2.0, far, zero))


def _pass_tables(in_size, out_size, method, first=0, count=None):
  """Pillow's resampling coefficients for one axis, in_size -> out_size, laid out for a banded
  matmul: outputs [first, first + count) (all by default) in blocks of `_BLOCK`.

  Pillow (libImaging/Resample.c, precompute_coeffs + normalize_coeffs_8bpc) gives output pixel o
  the inputs [xmin, xmax) around center = (o + 0.5) * scale, weighted by the filter at
  (x - center + 0.5) / filterscale (as a product with 1 / filterscale), normalised by their sum
  and rounded half away from zero to 22-bit fixed point. Here the outputs of a block share one
  input span [start, start + span), span <= (_BLOCK - 1) * scale + 1 + ksize (Pillow's ksize =
  2 * ceil(support) + 1 bounds every window): each output's coefficients are computed at every
  span position, 0 outside its window, so a pass is a batched (nb, _BLOCK, span) x (nb, span,
  rest) matmul with about _BLOCK * scale + ksize multiply-adds per output value, not in_size as
  for a dense (out, in) matrix. The weight sum runs along the span, i.e. in window order with
  exact zeros around, as Pillow's sequential loop (cumsum is sequential; a tree reduction might
  differ in the last bit and flip a rounding).

  Each output's coefficients depend only on its index and the two sizes, so a slice of outputs
  is the full resize followed by a crop, exactly. Padding outputs (up to a block multiple) get
  zero coefficients and are sliced off by the pass.

  Returns (start (nb,) int32, coefficients (nb, _BLOCK, span) float64, count). The coefficients
  are Pillow's integers times 2**-22 (exact: a power of two): their products with uint8 pixels,
  summed in any order, are Pillow's int32 accumulator over 2**22 exactly (every partial sum is a
  multiple of 2**-22 below 2**10 in magnitude: 32 bits, inside float64's 53, not float32's 24).
  """
  if count is None:
    count = out_size
  in_f = tf.cast(in_size, tf.float64)
  scale = in_f / tf.cast(out_size, tf.float64)
  filterscale = tf.maximum(scale, 1.0)
  support = _SUPPORT[method] * filterscale
  ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  nb = (count + _BLOCK - 1) // _BLOCK
  index = tf.range(nb * _BLOCK)
  valid = tf.reshape(index < count, [nb, _BLOCK, 1])
  # Padding outputs repeat the last one, so that the block starts and spans stay as they were.
  out = tf.cast(first + tf.minimum(index, count - 1), tf.float64)
  center = tf.reshape((out + 0.5) * scale, [nb, _BLOCK, 1])
  # Pillow truncates center -/+ support + 0.5 to int; floor is the same once clamped at 0.
  xmin = tf.maximum(tf.floor(center - support + 0.5), 0.0)
  xmax = tf.minimum(tf.floor(center + support + 0.5), in_f)
  start = xmin[:, :1]  # xmin grows with the output index
  # A nonzero coefficient at start + s < in_size has s < in_size: longer spans only add zeros.
  span = tf.minimum(tf.cast(tf.reduce_max(xmin[:, -1] - xmin[:, 0]), tf.int32) + ksize,
                    tf.cast(in_size, tf.int32))
  x = start + tf.range(span, dtype=tf.float64)  # (nb, 1, span) input positions
  w = _pil_filter((x - center + 0.5) * (1.0 / filterscale), method)
  w = tf.where((x >= xmin) & (x < xmax) & valid, w, tf.zeros_like(w))
  total = tf.cumsum(w, axis=2)[:, :, -1:]
  w = w / tf.where(total != 0.0, total, tf.ones_like(total))
  fixed = w * float(1 << _PRECISION_BITS)
  fixed = tf.where(fixed < 0, tf.math.ceil(fixed - 0.5), tf.floor(fixed + 0.5))
  return (tf.cast(start[:, 0, 0], tf.int32), fixed * (1.0 / (1 << _PRECISION_BITS)), count)


def _round_pass_uint8(acc):
  """Pillow's `clip8((acc + 2**21) >> 22)` on accumulators already scaled by 2**-22:
  floor(acc + 0.5) clipped to [0, 255]. saturate_cast clips to [0, 255] and truncates, which is
  floor there (and clip(floor(v)) == clip(trunc(v)) also for v < 0)."""
  return tf.saturate_cast(acc + 0.5, tf.uint8)


def _band_pass(x, start, coeffs, out_size):
  """Resamples axis 0 of a uint8 (n, m, C) image with `_pass_tables`: (out_size, m, C) uint8
  values rounded as Pillow rounds each pass."""
  n, m, c = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
  rows = tf.minimum(start[:, None] + tf.range(tf.shape(coeffs)[2])[None, :], n - 1)
  # Gather the spans as uint8 (8x less memory traffic), then widen them to float64.
  spans = tf.cast(tf.gather(tf.reshape(x, [n, m * c]), rows), tf.float64)  # (nb, span, m*C)
  acc = tf.reshape(tf.matmul(coeffs, spans), [-1, m, c])[:out_size]
  return _round_pass_uint8(acc)


def _vertical_first(in_h, in_w, out_h, out_w):
  """Pillow's pass order (libImaging/Resample.c, ImagingResampleInner, Pillow 13.0.0): the
  vertical pass runs first iff the height shrinks by more than twice as many pixels as the width
  does, `in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)` (on the sizes of the image
  handed to resize, i.e. the crop); otherwise horizontal first. (Pillow <= 12.1 always ran the
  horizontal pass first; 12.2-12.3 went vertical first in Image.resize only for images over 100
  times taller than wide.) The order matters because the first pass is rounded to uint8."""
  shrink_h = in_h - out_h
  return (shrink_h > 0) & (shrink_h > 2 * (in_w - out_w))


def _separable(image, cols, rows, vertical_first):
  """Pillow's two passes on a uint8 (h, w, C) image, `_pass_tables` for the columns and rows,
  in Pillow's order (`vertical_first`, a bool tensor), each rounded to uint8 as Pillow.

  Both passes run along axis 0 (`_band_pass`), the horizontal one between uint8 transposes
  (about a quarter of the time at ImageNet sizes; a contraction over the middle axis would need
  the same transposes inside einsum, on float64). Memory is the image, the gathered spans of one
  pass (about the pass's input in float64) and small tables: no dense (out, in) matrix and no
  (h, out_w, w) broadcast (for a 2592x1944 photo that was 9 GB of float64)."""
  def transpose(x):
    return tf.transpose(x, [1, 0, 2])

  def horizontal_first():
    return _band_pass(transpose(_band_pass(transpose(image), *cols)), *rows)

  def vertical_first_():
    return transpose(_band_pass(transpose(_band_pass(image, *rows)), *cols))

  return tf.cond(vertical_first, vertical_first_, horizontal_first)


def _resize_crop(image, size_hw, method, top=0, left=0, crop_hw=None):
  """Pillow resize of a uint8 (H, W, C) image to size_hw, then the crop [top, top + crop_h) x
  [left, left + crop_w) of the result (the whole result by default), computing only the kept
  pixels (see `_pass_tables`); the pass order is that of the full resize."""
  shape = tf.shape(image)
  crop_h, crop_w = (None, None) if crop_hw is None else crop_hw
  out = _separable(image, _pass_tables(shape[1], size_hw[1], method, left, crop_w),
                   _pass_tables(shape[0], size_hw[0], method, top, crop_h),
                   _vertical_first(shape[0], shape[1], size_hw[0], size_hw[1]))
  return tf.ensure_shape(out, [None, None, image.shape[-1]])


def resize(image, size_hw, method):
  """Pillow's Image.resize of a uint8 (H, W, 3) image, bit-exact.

  Same separable convolution as Pillow (triangle / a=-0.5 cubic kernels widened by the scale
  when reducing, renormalised at the border), same 22-bit fixed-point coefficients and rounding,
  same pass order (`_vertical_first`), the first pass rounded to uint8 values. Each pass is a
  banded float64 matmul (`_pass_tables`), exact for these integer sums. (tf.image.resize differs by
  1-2 levels and is slower here.)
  """
  return _resize_crop(image, size_hw, method)


METHODS = ('bilinear', 'bicubic')


class CropResizer:
  """Crop + Pillow resize (+ horizontal flip) of fixed-size (H, W, C) sources to (S, S), exact.

  Pillow's coefficients depend only on (crop size, output size, method), so for a source of
  known size the pass tables (`_pass_tables`) are computed once here for every crop height 1..H
  and width 1..W and looked up per image, instead of being rebuilt from ~40 small ops per image.
  The flip reverses the output's columns (exact: Pillow's output, mirrored).
  """

  MAX_TABLE_BYTES = 64 << 20

  def __init__(self, height, width, size):
    self.size = int(size)
    self.rows = self._tables(int(height))
    self.cols = self.rows if width == height else self._tables(int(width))

  @classmethod
  def _table_bytes(cls, n_max, size):
    """Bound on a table's bytes: spans reach (_BLOCK - 1) * scale + 1 + ksize (`_pass_tables`)."""
    scale = max(n_max / size, 1.0)
    span = min(n_max, math.ceil((_BLOCK - 1) * scale) + 2 + 2 * math.ceil(2.0 * scale))
    return 8 * len(METHODS) * (n_max + 1) * -(-size // _BLOCK) * _BLOCK * span

  def _tables(self, n_max):
    """Per method and crop size n (index 0 unused): start (nb,), the span length, and the block
    coefficients (nb, _BLOCK, span) zero-padded to the longest span."""
    with tf.device('/CPU:0'):
      starts, spans, coeffs = [], [], []
      for method in METHODS:
        build = tf.function(lambda n, m=method: _pass_tables(n, self.size, m)[:2],
                            input_signature=[tf.TensorSpec([], tf.int32)], autograph=False)
        tables = [build(tf.constant(n)) for n in range(1, n_max + 1)]
        tables.insert(0, (tf.zeros_like(tables[0][0]), tf.zeros_like(tables[0][1][:, :, :1])))
        starts.append(tf.stack([t[0] for t in tables]))
        spans.append([int(t[1].shape[2]) for t in tables])
        coeffs.append(tables)
      longest = max(max(s) for s in spans)
      coeffs = tf.stack([tf.stack([tf.pad(c, [[0, 0], [0, 0], [0, longest - c.shape[2]]])
                                   for _, c in tables]) for tables in coeffs])
      return tf.stack(starts), tf.constant(spans, tf.int32), coeffs

  @classmethod
  def fits(cls, height, width, size):
    """Whether tables for this source shape are small enough to precompute."""
    if height is None or width is None:
      return False
    return cls._table_bytes(height, size) + cls._table_bytes(width, size) <= cls.MAX_TABLE_BYTES

  def _lookup(self, tables, method_index, n):
    starts, spans, coeffs = tables
    span = spans[method_index, n]
    return starts[method_index, n], coeffs[method_index, n, :, :, :span], self.size

  def __call__(self, image, top, left, h, w, method_index, flip):
    """image: uint8 (H, W, C); crop [top, top + h) x [left, left + w); method_index 0 =
    bilinear, 1 = bicubic; flip: scalar bool. Returns uint8 (S, S, C)."""
    out = _separable(image[top:top + h, left:left + w], self._lookup(self.cols, method_index, w),
                     self._lookup(self.rows, method_index, h),
                     _vertical_first(h, w, self.size, self.size))
    out = tf.cond(flip, lambda: tf.reverse(out, [1]), lambda: out)
    return tf.ensure_shape(out, (self.size, self.size, image.shape[-1]))


RESIZE_WITH = ('auto', 'pillow', 'tf')
_PIL_FILTERS = (Image.BILINEAR, Image.BICUBIC)  # in METHODS' order


def resize_with(dataset_config, static_shape, size):
  """dataset.resize_with -> 'pillow', 'tf' or 'tables' (a `CropResizer` for the source's shape).

  'auto' takes the faster exact form: the tables where the source has one fixed (H, W) small
  enough for them (CIFAR, digits), else Pillow (image folders, JPEGs of any size), which runs
  1.3-1.7x the images per CPU-second of the TF ops there (docs/BENCHMARKS.md, input pipeline).
  'tf' keeps every step in TF ops (no Python in the graph; Pillow 13.0's result whatever Pillow
  is installed); 'pillow' calls the installed Pillow, as timm does."""
  mode = dataset_config.get('resize_with', 'auto') or 'auto'
  if mode not in RESIZE_WITH:
    raise errors.ConfigError(f'dataset.resize_with={mode!r}: use one of {RESIZE_WITH}.')
  if mode == 'pillow':
    return 'pillow'
  if static_shape is not None and CropResizer.fits(static_shape[0], static_shape[1], size):
    return 'tables'
  return 'pillow' if mode == 'auto' else 'tf'


def _pillow_resize(image, top, left, h, w, out_h, out_w, method_index):
  """numpy uint8 crop [top, top + h) x [left, left + w) of `image`, then Pillow's resize."""
  crop = Image.fromarray(np.ascontiguousarray(image[top:top + h, left:left + w]))
  return np.asarray(crop.resize((int(out_w), int(out_h)), _PIL_FILTERS[method_index]))


def pillow_crop_resize_flip(image, top, left, h, w, method_index, flip, size):
  """The crop, Pillow's resize to (size, size) and the flip of a uint8 (H, W, C) image, inside
  the graph: timm's own computation (torchvision crops, then resizes: a resize `box` would read
  pixels outside the crop at its border). Pillow releases the GIL while it resamples, so
  tf.data's threads run in parallel (only the array conversions around it hold the GIL)."""
  def fn(image, top, left, h, w, method_index, flip):
    out = _pillow_resize(image, top, left, h, w, size, size, method_index)
    return np.ascontiguousarray(out[:, ::-1]) if flip else out
  out = tf.numpy_function(fn, [image, top, left, h, w, method_index, flip], tf.uint8,
                          stateful=False)
  return tf.ensure_shape(out, (size, size, image.shape[-1]))


def crop_resize_flip(image, key, flip_key, size, scale, ratio, interpolation, hflip,
                     random_crop=True, resizer=None):
  """`random_resized_crop` (or a plain resize) then `random_flip`, with the same draws.

  resizer: a `CropResizer` for the source's shape (the crop, resize and flip are table lookups
  and two banded matmuls), 'pillow' (`pillow_crop_resize_flip`), or None (the per-image TF ops
  below); all three give the same pixels.
  interpolation: 'bilinear', 'bicubic' or 'random' (per image); hflip: flip probability.
  """
  k_box, k_interp = split(key, 2)
  shape = tf.shape(image)
  if random_crop:
    top, left, h, w = sample_crop_box(k_box, shape[0], shape[1], scale, ratio)
  else:
    top, left, h, w = 0, 0, shape[0], shape[1]
    if interpolation == 'random':
      interpolation = 'bilinear'
  if interpolation == 'random':
    method_index = tf.cast(uniform(k_interp) >= 0.5, tf.int32)
  else:
    method_index = tf.constant(METHODS.index(interpolation), tf.int32)
  flip = uniform(flip_key) < hflip if hflip > 0 else tf.constant(False)
  if resizer == 'pillow':
    return pillow_crop_resize_flip(image, top, left, h, w, method_index, flip, size)
  if resizer is not None:
    return resizer(image, top, left, h, w, method_index, flip)
  crop = image[top:top + h, left:left + w]
  out = tf.cond(method_index == 0, lambda: resize(crop, (size, size), 'bilinear'),
                lambda: resize(crop, (size, size), 'bicubic'))
  out = tf.cond(flip, lambda: out[:, ::-1], lambda: out)
  return tf.ensure_shape(out, (size, size, 3))


def random_resized_crop(image, key, size, scale, ratio, interpolation):
  """Crop with timm's box sampling, then resize to (size, size).

  interpolation: 'bilinear', 'bicubic' or 'random' (bilinear or bicubic with p=0.5 each).
  """
  k_box, k_interp = split(key, 2)
  shape = tf.shape(image)
  top, left, h, w = sample_crop_box(k_box, shape[0], shape[1], scale, ratio)
  crop = image[top:top + h, left:left + w]
  if interpolation == 'random':
    out = tf.cond(uniform(k_interp) < 0.5,
                  lambda: resize(crop, (size, size), 'bilinear'),
                  lambda: resize(crop, (size, size), 'bicubic'))
  else:
    out = resize(crop, (size, size), interpolation)
  return tf.ensure_shape(out, (size, size, 3))


def random_flip(image, key, prob):
  return tf.cond(uniform(key) < prob, lambda: image[:, ::-1], lambda: image)


def eval_resize_crop(image, size, crop_pct, interpolation='bilinear', with_pillow=False):
  """timm eval: Resize(floor(size / crop_pct)) on the shorter side, then CenterCrop(size).
  with_pillow: the resize by Pillow itself (the whole resized image, then the crop), as timm;
  else in TF ops, computing only the kept pixels. The same pixels either way."""
  scale_size = int(math.floor(size / crop_pct))
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  # torchvision Resize(int): shorter side -> scale_size, longer side int(scale_size * long/short).
  new_h = tf.where(h <= w, scale_size,
                   tf.cast(tf.cast(scale_size, tf.float64) * tf.cast(h, tf.float64)
                           / tf.cast(w, tf.float64), tf.int32))
  new_w = tf.where(h <= w, tf.cast(tf.cast(scale_size, tf.float64) * tf.cast(w, tf.float64)
                                   / tf.cast(h, tf.float64), tf.int32), scale_size)
  # torchvision CenterCrop: int(round((H - size) / 2)).
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2.0), tf.int32)
  if with_pillow:
    def fn(image, new_h, new_w, top, left):
      out = _pillow_resize(image, 0, 0, image.shape[0], image.shape[1], new_h, new_w,
                           METHODS.index(interpolation))
      return np.ascontiguousarray(out[top:top + size, left:left + size])
    out = tf.numpy_function(fn, [image, new_h, new_w, top, left], tf.uint8, stateful=False)
    return tf.ensure_shape(out, (size, size, 3))
  # Resize and crop in one: only the kept output pixels are computed (exact, see _pass_tables).
  out = _resize_crop(image, tf.stack([new_h, new_w]), interpolation, top, left, (size, size))
  return tf.ensure_shape(out, (size, size, 3))


def normalize(images_uint8, mean, std):
  """(x - 255*mean) / (255*std), as timm's PrefetchLoader does on the uint8 batch."""
  mean = tf.constant([255.0 * m for m in mean], tf.float32)
  std = tf.constant([255.0 * s for s in std], tf.float32)
  return (tf.cast(images_uint8, tf.float32) - mean) / std


def erasing_boxes(key, b, height, width, prob, min_area=0.02, max_area=1 / 3, min_aspect=0.3,
                  attempts=10):
  """`random_erasing`'s draws for a batch of b: (apply, top, left, h, w, noise key).

  Per example: with probability `prob`, up to ten attempts of (area ~ U(2%, 33%), log-aspect ~
  U(log 0.3, log 1/0.3)); the first box strictly smaller than the image is kept (`apply` is
  False when none is).
  """
  k_apply, k_area, k_ratio, k_top, k_left, k_noise = split(key, 6)
  apply = uniform(k_apply, [b]) <= prob
  target = uniform(k_area, [b, attempts], min_area, max_area) * float(height * width)
  aspect = tf.exp(uniform(k_ratio, [b, attempts], math.log(min_aspect), math.log(1 / min_aspect)))
  h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  ok = tf.logical_and(w < width, h < height)
  first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)
  h = tf.gather(h, first, batch_dims=1)
  w = tf.gather(w, first, batch_dims=1)
  apply = tf.logical_and(apply, tf.reduce_any(ok, axis=1))
  top = randint(k_top, 0, height - h, [b])
  left = randint(k_left, 0, width - w, [b])
  return apply, top, left, h, w, k_noise


def random_erasing(images, key, prob, min_area=0.02, max_area=1 / 3, min_aspect=0.3,
                   attempts=10):
  """timm RandomErasing(mode='pixel', count=1) on a normalised float batch (b, H, W, C): each
  box drawn by `erasing_boxes` is filled with N(0, 1) noise per pixel and channel."""
  height, width = images.shape[1], images.shape[2]
  apply, top, left, h, w, k_noise = erasing_boxes(key, tf.shape(images)[0], height, width, prob,
                                                  min_area, max_area, min_aspect, attempts)
  # Only the erased examples (about `prob` of them) are touched: their noise (the N(0, 1) draws
  # dominate the cost), their boxes, and a scatter of the results back into the batch.
  erased = tf.cast(tf.where(apply), tf.int32)
  noise = tf.random.stateless_normal(
      tf.concat([tf.shape(erased)[:1], tf.shape(images)[1:]], 0), k_noise, dtype=images.dtype)
  e = erased[:, 0]
  e_top, e_h, e_left, e_w = [tf.gather(v, e)[:, None, None] for v in (top, h, left, w)]
  rows = tf.range(height)[None, :, None]
  cols = tf.range(width)[None, None, :]
  inside = (rows >= e_top) & (rows < e_top + e_h) & (cols >= e_left) & (cols < e_left + e_w)
  return tf.tensor_scatter_nd_update(
      images, erased, tf.where(inside[..., None], noise, tf.gather(images, e)))
