"""Batch-mode Mixup / CutMix with label smoothing, as timm's FastCollateMixup(mode='batch').

One lambda per (per-host) batch; sample i is mixed with sample b-1-i. Mixup blends the uint8
images in float32 and rounds half-to-even (np.rint); CutMix pastes one box and corrects lambda to
the pasted area. Targets are the smoothed one-hots (off = eps/C, on = 1 - eps + eps/C) mixed with
the same lambda, so with mixing off they are exactly the smoothed one-hots that make soft-target
cross-entropy equal timm's LabelSmoothingCrossEntropy(eps).
"""
import tensorflow as tf

from pat_jax.data import augment


def smooth_one_hot(labels, num_classes, smoothing):
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  return tf.one_hot(tf.cast(labels, tf.int32), num_classes, on_value=on, off_value=off,
                    dtype=tf.float32)


def mix_targets(targets, lam32):
  """Soft targets mixed as the images are: sample i with sample b-1-i, weight lam32 (float32)."""
  return targets * lam32 + tf.reverse(targets, [0]) * (1.0 - lam32)


def _beta(key, alpha):
  k1, k2 = augment.split(key, 2)
  g1 = tf.random.stateless_gamma([], k1, alpha, dtype=tf.float64)
  g2 = tf.random.stateless_gamma([], k2, alpha, dtype=tf.float64)
  return g1 / (g1 + g2)


def sample_params(key, mixup_alpha, cutmix_alpha, prob=1.0, switch_prob=0.5):
  """timm Mixup._params_per_batch: (lam float64, use_cutmix bool)."""
  k_prob, k_switch, k_mix, k_cut = augment.split(key, 4)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return tf.constant(1.0, tf.float64), tf.constant(False)
  active = augment.uniform(k_prob) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = augment.uniform(k_switch) < switch_prob
    lam = tf.where(use_cutmix, _beta(k_cut, cutmix_alpha), _beta(k_mix, mixup_alpha))
  elif mixup_alpha > 0:
    use_cutmix = tf.constant(False)
    lam = _beta(k_mix, mixup_alpha)
  else:
    use_cutmix = tf.constant(True)
    lam = _beta(k_cut, cutmix_alpha)
  lam = tf.where(active, lam, 1.0)
  return lam, tf.logical_and(use_cutmix, active)


def cutmix_box(key, height, width, lam):
  """timm rand_bbox + area-corrected lambda: (top, bottom, left, right, lam)."""
  k_y, k_x = augment.split(key, 2)
  ratio = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.floor(height * ratio), tf.int32)
  cut_w = tf.cast(tf.floor(width * ratio), tf.int32)
  cy = augment.randint(k_y, 0, height - 1)  # np.random.randint(0, H): exclusive upper bound
  cx = augment.randint(k_x, 0, width - 1)
  yl = tf.clip_by_value(cy - cut_h // 2, 0, height)
  yh = tf.clip_by_value(cy + cut_h // 2, 0, height)
  xl = tf.clip_by_value(cx - cut_w // 2, 0, width)
  xh = tf.clip_by_value(cx + cut_w // 2, 0, width)
  area = tf.cast((yh - yl) * (xh - xl), tf.float64)
  return yl, yh, xl, xh, 1.0 - area / float(height * width)


def draw(key, height, width, mixup_alpha, cutmix_alpha, prob=1.0, switch_prob=0.5):
  """A batch's mixing, drawn as `mix_batch` draws it but not applied: (lam, blend, box).

  lam: float64, the targets' lambda (cutmix's corrected to the pasted area; 1.0: no mixing);
  blend: bool, whether the pixels are blended with lam (mixup) rather than pasted;
  box: int32 [top, bottom, left, right), the region taken from the partner; empty unless
  cutmix mixes. Drawing apart from applying lets the host draw and the accelerator apply
  (`on_device.mix`) with the very same draws as `mix_normalize`.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return tf.constant(1.0, tf.float64), tf.constant(False), tf.zeros([4], tf.int32)
  k_params, k_box = augment.split(key, 2)
  lam, use_cutmix = sample_params(k_params, mixup_alpha, cutmix_alpha, prob, switch_prob)
  yl, yh, xl, xh, box_lam = cutmix_box(k_box, height, width, lam)
  lam = tf.where(use_cutmix, box_lam, lam)
  active = lam != 1.0  # a box that pastes nothing mixes nothing, as mix_batch's tf.cond
  cut = tf.logical_and(active, use_cutmix)
  box = tf.where(cut, tf.stack([yl, yh, xl, xh]), tf.zeros([4], tf.int32))
  return lam, tf.logical_and(active, tf.logical_not(use_cutmix)), box


def box_mask(box, height, width):
  """(H, W) bool: inside [top, bottom) x [left, right) of a `draw` box."""
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  return (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])


def mix_batch(images, labels, key, num_classes, mixup_alpha, cutmix_alpha, prob=1.0,
              switch_prob=0.5, smoothing=0.1):
  """images: uint8 (b, H, W, C); labels: int (b,). Returns (uint8 images, float32 targets)."""
  targets = smooth_one_hot(labels, num_classes, smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_params, k_box = augment.split(key, 2)
  lam, use_cutmix = sample_params(k_params, mixup_alpha, cutmix_alpha, prob, switch_prob)
  height, width = images.shape[1], images.shape[2]
  flipped = tf.reverse(images, [0])
  yl, yh, xl, xh, box_lam = cutmix_box(k_box, height, width, lam)

  def cutmix():
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
    return tf.where(inside[None, :, :, None], flipped, images)

  def mixup():
    lam32 = tf.cast(lam, tf.float32)
    mixed = tf.cast(images, tf.float32) * lam32 + tf.cast(flipped, tf.float32) * (1.0 - lam32)
    return tf.cast(tf.round(mixed), tf.uint8)  # tf.round is half-to-even, like np.rint

  lam = tf.where(use_cutmix, box_lam, lam)
  mixed = tf.cond(lam == 1.0, lambda: images, lambda: tf.cond(use_cutmix, cutmix, mixup))
  lam32 = tf.cast(lam, tf.float32)
  targets = targets * lam32 + tf.reverse(targets, [0]) * (1.0 - lam32)
  return mixed, targets


@tf.function(jit_compile=True)
def _gather_mixed(images, table, cut):
  """One fused XLA pass: out[b, y, x, c] = table[c, own, partner] with partner = image b-1-i's
  pixel and own = the partner's pixel inside the cutmix box `cut`, else the image's own. Only
  integer indexing and a gather: nothing here rounds, so XLA's fusion cannot change a value."""
  partner = tf.reverse(images, [0])
  own = tf.where(cut[None, :, :, None], partner, images)
  channel = tf.range(images.shape[-1], dtype=tf.int32) * 65536
  return tf.gather(table, channel + tf.cast(own, tf.int32) * 256 + tf.cast(partner, tf.int32))


def mix_normalize(images, labels, key, num_classes, mixup_alpha, cutmix_alpha, mean, std,
                  prob=1.0, switch_prob=0.5, smoothing=0.1):
  """`augment.normalize(*mix_batch(...))`, bit for bit, in one pass over the batch.

  Every output value is a function of (channel, own pixel, partner pixel) for the batch's one
  lambda, so that function is tabulated (C x 256 x 256 float32, computed with the very ops of
  `mix_batch` and `augment.normalize`) and the batch becomes a single fused table lookup,
  instead of ~10 full passes over a (b, S, S, 3) tensor (a 77 MB float32 batch at 128 x 224).
  Returns (float32 normalised images, float32 targets).
  """
  targets = smooth_one_hot(labels, num_classes, smoothing)
  height, width, channels = images.shape[1], images.shape[2], images.shape[3]
  grid = tf.range(256, dtype=tf.int32)
  own = tf.cast(tf.broadcast_to(grid[:, None], [256, 256]), tf.uint8)
  partner = tf.cast(tf.broadcast_to(grid[None, :], [256, 256]), tf.uint8)
  cut = tf.zeros([height, width], tf.bool)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    mixed = own
  else:
    lam, blend, box = draw(key, height, width, mixup_alpha, cutmix_alpha, prob, switch_prob)
    cut = box_mask(box, height, width)
    lam32 = tf.cast(lam, tf.float32)

    def blended():  # mix_batch's mixup on every (own, partner) pair
      m = tf.cast(own, tf.float32) * lam32 + tf.cast(partner, tf.float32) * (1.0 - lam32)
      return tf.cast(tf.round(m), tf.uint8)
    mixed = tf.cond(blend, blended, lambda: own)
    targets = mix_targets(targets, lam32)
  table = augment.normalize(tf.broadcast_to(mixed[..., None], [256, 256, channels]), mean, std)
  table = tf.reshape(tf.transpose(table, [2, 0, 1]), [-1])
  return _gather_mixed(images, table, cut), targets
