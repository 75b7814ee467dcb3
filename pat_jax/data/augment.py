"""Per-example and per-batch image ops in TF, matching timm/torchvision/PIL semantics.

Every random draw is a `tf.random.stateless_*` call on an explicit key, so an augmented example is
a pure function of (seed, epoch, example index) and the stream does not depend on thread
scheduling. Keys are int64 vectors of shape [2] (TF's stateless seed format).

Resizing re-implements Pillow's resampler exactly (see `resize`); the crop box sampling is
timm's `RandomResizedCropAndInterpolation.get_params` with stateless draws.
"""
import math

import tensorflow as tf


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


def _pil_filter(x, method):
  x = tf.abs(x)
  zero = tf.zeros_like(x)
  if method == 'bilinear':
    return tf.maximum(zero, 1.0 - x)
  a = -0.5  # Pillow's bicubic
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, near, tf.where(x < 2.0, far, zero))


def _pil_coefficients(in_size, out_size, method):
  """Pillow precompute_coeffs + normalize_coeffs_8bpc as an (out, in) matrix of fixed-point
  integers (held in float64, where these sums are exact)."""
  support = {'bilinear': 1.0, 'bicubic': 2.0}[method]
  in_f = tf.cast(in_size, tf.float64)
  scale = in_f / tf.cast(out_size, tf.float64)
  filterscale = tf.maximum(scale, 1.0)
  support = support * filterscale
  center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
  xmin = tf.maximum(tf.floor(center - support + 0.5), tf.zeros_like(center))[:, None]
  xmax = tf.minimum(tf.floor(center + support + 0.5), in_f)[:, None]
  x = tf.range(in_size, dtype=tf.float64)[None, :]
  inside = (x >= xmin) & (x < xmax)
  w = _pil_filter((x - center[:, None] + 0.5) / filterscale, method)
  w = tf.where(inside, w, tf.zeros_like(w))
  total = tf.reduce_sum(w, axis=1, keepdims=True)
  w = w / tf.where(total != 0.0, total, tf.ones_like(total))
  fixed = w * float(1 << _PRECISION_BITS)
  return tf.where(fixed < 0, tf.math.ceil(fixed - 0.5), tf.floor(fixed + 0.5))


def _round_pass(acc):
  """Pillow's `clip((acc + 2**21) >> 22)` on accumulators already scaled by 2**-22, as float64:
  floor(acc + 0.5) clipped to [0, 255] (acc is an exact multiple of 2**-22 here)."""
  return tf.floor(tf.clip_by_value(acc + 0.5, 0.0, 255.0))


def _round_pass_uint8(acc):
  """`_round_pass` straight to uint8: saturate_cast clips to [0, 255] and truncates, which is
  floor there (and clip(floor(v)) == clip(trunc(v)) also for v < 0)."""
  return tf.saturate_cast(acc + 0.5, tf.uint8)


def _scaled_coefficients(in_size, out_size, method):
  """`_pil_coefficients` times 2**-22 (exact: a power of two), so that a product with uint8
  pixels is Pillow's integer accumulator over 2**22, exactly, in any summation order (every
  partial sum is a multiple of 2**-22 below 2**31 in magnitude: far inside float64's 53 bits)."""
  return _pil_coefficients(in_size, out_size, method) * (1.0 / (1 << _PRECISION_BITS))


def _vertical_pass(x, row_coeffs):
  """(h, w, C) float64 times the scaled (out_h, h) matrix: (out_h, w, C) accumulators, as one
  (out_h, h) x (h, w*C) matmul."""
  h, w, c = tf.shape(x)[0], tf.shape(x)[1], x.shape[-1]
  out = tf.matmul(row_coeffs, tf.reshape(x, [h, w * c]))
  return tf.reshape(out, [tf.shape(row_coeffs)[0], w, c])


def _horizontal_pass(x, col_coeffs):
  """(h, w, C) float64 times the scaled (out_w, w) matrix: (h, out_w, C) accumulators, as one
  (out_w, w) x (w, h*C) matmul over the columns-first image."""
  h, w, c = tf.shape(x)[0], tf.shape(x)[1], x.shape[-1]
  out = tf.matmul(col_coeffs, tf.reshape(tf.transpose(x, [1, 0, 2]), [w, h * c]))
  return tf.transpose(tf.reshape(out, [tf.shape(col_coeffs)[0], h, c]), [1, 0, 2])


def _vertical_first(in_h, in_w, out_h, out_w):
  """Pillow's pass order (libImaging/Resample.c, ImagingResampleInner, Pillow 13.0.0): the
  vertical pass runs first iff the height shrinks by more than twice as many pixels as the width
  does, `in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)` (on the sizes of the image
  handed to resize, i.e. the crop); otherwise horizontal first. (Pillow <= 12.1 always ran the
  horizontal pass first; 12.2-12.3 went vertical first in Image.resize only for images over 100
  times taller than wide.) The order matters because the first pass is rounded to uint8."""
  shrink_h = in_h - out_h
  return (shrink_h > 0) & (shrink_h > 2 * (in_w - out_w))


def _separable(image, col_coeffs, row_coeffs):
  """Pillow's two passes on a uint8 (h, w, C) image with scaled (out_w, w) and (out_h, h)
  coefficient matrices, in Pillow's order (`_vertical_first`), each rounded to uint8 values as
  Pillow. Both are float64 matmuls of exact integers (times 2**-22), so the result is bit-exact.
  Memory is the image, one intermediate and the small coefficient matrices: no (h, out_w, w)
  broadcast (for a 2592x1944 photo that was 9 GB of float64)."""
  x = tf.cast(image, tf.float64)
  in_h, in_w = tf.shape(image)[0], tf.shape(image)[1]
  out_h, out_w = tf.shape(row_coeffs)[0], tf.shape(col_coeffs)[0]

  def horizontal_first():
    return _round_pass_uint8(_vertical_pass(_round_pass(_horizontal_pass(x, col_coeffs)),
                                            row_coeffs))

  def vertical_first():
    return _round_pass_uint8(_horizontal_pass(_round_pass(_vertical_pass(x, row_coeffs)),
                                              col_coeffs))

  return tf.cond(_vertical_first(in_h, in_w, out_h, out_w), vertical_first, horizontal_first)


def resize(image, size_hw, method):
  """Pillow's Image.resize of a uint8 (H, W, 3) image, bit-exact.

  Same separable convolution as Pillow (triangle / a=-0.5 cubic kernels widened by the scale
  when reducing, renormalised at the border), same 22-bit fixed-point coefficients and rounding,
  same pass order (`_vertical_first`), the first pass rounded to uint8 values. The passes are
  small matmuls in float64, exact for these integer sums. (tf.image.resize differs by 1-2 levels
  and is slower here.)
  """
  shape = tf.shape(image)
  out = _separable(image, _scaled_coefficients(shape[1], size_hw[1], method),
                   _scaled_coefficients(shape[0], size_hw[0], method))
  return tf.ensure_shape(out, [None, None, image.shape[-1]])


METHODS = ('bilinear', 'bicubic')


class CropResizer:
  """Crop + Pillow resize (+ horizontal flip) of fixed-size (H, W, C) sources to (S, S), exact.

  Pillow's coefficients depend only on (crop size, output size, method), so for a source of
  known size they are computed once here for every crop height 1..H and width 1..W (scaled by
  2**-22, see `_scaled_coefficients`) and looked up per image, instead of being rebuilt from
  ~30 small ops per image. A flip of the output reverses the output columns, which is the
  column-coefficient matrix with its rows reversed: the flip costs nothing and is exact.
  """

  MAX_TABLE_BYTES = 64 << 20

  def __init__(self, height, width, size):
    self.size = int(size)
    self.rows = self._tables(int(height))
    self.cols = self.rows if width == height else self._tables(int(width))

  def _tables(self, n_max):
    with tf.device('/CPU:0'):
      per_method = []
      for method in METHODS:
        sizes = [tf.zeros([self.size, n_max], tf.float64)]  # index 0 unused
        for n in range(1, n_max + 1):
          sizes.append(tf.pad(_scaled_coefficients(n, self.size, method), [[0, 0], [0, n_max - n]]))
        per_method.append(tf.stack(sizes))
      return tf.stack(per_method)  # (method, n, S, n_max)

  @classmethod
  def fits(cls, height, width, size):
    """Whether tables for this source shape are small enough to precompute."""
    if height is None or width is None:
      return False
    return 8 * 2 * size * ((height + 1) * height + (width + 1) * width) <= cls.MAX_TABLE_BYTES

  def __call__(self, image, top, left, h, w, method_index, flip):
    """image: uint8 (H, W, C); crop [top, top + h) x [left, left + w); method_index 0 =
    bilinear, 1 = bicubic; flip: scalar bool. Returns uint8 (S, S, C)."""
    cols = self.cols[method_index, w, :, :w]
    cols = tf.where(flip, tf.reverse(cols, [0]), cols)
    rows = self.rows[method_index, h, :, :h]
    out = _separable(image[top:top + h, left:left + w], cols, rows)
    return tf.ensure_shape(out, (self.size, self.size, image.shape[-1]))


def crop_resize_flip(image, key, flip_key, size, scale, ratio, interpolation, hflip,
                     random_crop=True, resizer=None):
  """`random_resized_crop` (or a plain resize) then `random_flip`, with the same draws.

  With a `CropResizer` for the source's shape, the crop, resize and flip are one exact table
  lookup and two matmuls; otherwise the per-image path below.
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


def eval_resize_crop(image, size, crop_pct, interpolation='bilinear'):
  """timm eval: Resize(floor(size / crop_pct)) on the shorter side, then CenterCrop(size)."""
  scale_size = int(math.floor(size / crop_pct))
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  # torchvision Resize(int): shorter side -> scale_size, longer side int(scale_size * long/short).
  new_h = tf.where(h <= w, scale_size,
                   tf.cast(tf.cast(scale_size, tf.float64) * tf.cast(h, tf.float64)
                           / tf.cast(w, tf.float64), tf.int32))
  new_w = tf.where(h <= w, tf.cast(tf.cast(scale_size, tf.float64) * tf.cast(w, tf.float64)
                                   / tf.cast(h, tf.float64), tf.int32), scale_size)
  resized = resize(image, tf.stack([new_h, new_w]), interpolation)
  # torchvision CenterCrop: int(round((H - size) / 2)).
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2.0), tf.int32)
  return tf.ensure_shape(resized[top:top + size, left:left + size], (size, size, 3))


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
