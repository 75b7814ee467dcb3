"""The per-batch augmentation on the accelerator: mixing, normalisation, random erasing.

With `dataset.transfer='uint8'` the host pipeline stops after the per-example steps and
RandAugment, and a batch crosses to the device as uint8 images (a quarter of float32's bytes)
with its soft targets and the batch's draws (pipeline._device_batch: the same draws, from the
same keys, as the float32 path). `prepare` then does to the images on the device what
`mixup.mix_normalize` and `augment.random_erasing` do on the host, so the host CPUs no longer
bound the step:

    batch = prepare(batch, mean, std, groups=jax.process_count())  # inside the jitted step

With erasing off, the result equals the float32 path's batch: the mixed pixels exactly, the
normalised values to an ulp (XLA divides by a constant as a multiplication by its reciprocal).
The erasing noise is drawn here with jax.random from a per-example key that the host derived
from the batch key: other numbers than TF's stateless normal, as deterministic and resumable.

Pure jnp, no TensorFlow: the train step imports this.
"""
import jax
import jax.numpy as jnp

from pat_jax import errors

TRANSFERS = ('auto', 'float32', 'uint8')
# Keys of a uint8 batch that only `prepare` reads (pipeline._device_batch).
DRAWS = ('mix_lam', 'mix_blend', 'mix_box', 'erase_box', 'erase_key')


def resolve_transfer(dataset_config) -> str:
  """dataset.transfer -> 'float32' or 'uint8'. 'auto' is 'uint8' on GPU and TPU, where the
  host-to-device copy and the host's per-batch work cost throughput, and 'float32' on CPU, where
  there is no copy to save and runs must stay as they were, bit for bit."""
  mode = dataset_config.get('transfer', 'auto') or 'auto'
  if mode not in TRANSFERS:
    raise errors.ConfigError(f'dataset.transfer={mode!r}: use one of {TRANSFERS}.')
  if mode == 'auto':
    return 'uint8' if jax.default_backend() in ('gpu', 'tpu') else 'float32'
  return mode


def normalize(images, mean, std):
  """augment.normalize on the device: (x - 255 mean) / (255 std) with the host's float32
  constants (products taken in Python floats, then rounded). Within an ulp of the host's value:
  XLA turns the division by a constant into a multiplication by its reciprocal."""
  mean = jnp.asarray([255.0 * m for m in mean], jnp.float32)
  std = jnp.asarray([255.0 * s for s in std], jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def partner(x, groups=1):
  """Each example's mixing partner: example b-1-i of its own host's slice.

  timm's batch mode (and the host pipeline) mixes within one host's batch; the global batch is
  the `groups` host batches side by side (sharding.global_batch), so the partner is a reversal
  within each of those blocks, not of the whole global batch.
  """
  n = x.shape[0]
  if n % groups:
    raise ValueError(f'A batch of {n} cannot be {groups} equal host batches.')
  return x.reshape((groups, n // groups) + x.shape[1:])[:, ::-1].reshape(x.shape)


def box_mask(boxes, height, width):
  """(b, H, W) bool: inside each example's [top, bottom) x [left, right) box."""
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  top, bottom, left, right = (boxes[:, i, None, None] for i in range(4))
  return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def _times(pixels, w):
  """float32(pixels * w) for integer pixels 0..255, rounded once whatever XLA fuses.

  XLA contracts a product feeding a sum into a fused multiply-add (CPU and GPU alike), which
  skips the product's own rounding and moves some mixup pixels across a .5 boundary, one grey
  level off the host's `mixup.mix_normalize`. Here w = hi + lo, 12 significant bits each, so
  both products with an 8-bit pixel are exact and their sum is rounded once, fused or not: the
  correctly rounded product, as on the host. (An optimisation barrier does not help: XLA
  removes it before fusion.)
  """
  bits = jax.lax.bitcast_convert_type(w, jnp.uint32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  return pixels * hi + pixels * (w - hi)  # w - hi: exact (the low mantissa bits)


def mix(images, lam, blend, box, groups=1):
  """mixup.mix_normalize's pixel mixing, before normalisation, with `mixup.draw`'s draws.

  images: uint8 (b, H, W, C); lam: float32 (b,); blend: bool (b,); box: int32 (b, 4), per
  example (equal within a host's batch). Returns float32 images holding the mixed uint8 values:
  cutmix pastes the partner inside the box, mixup blends with lam and rounds half to even, and
  a batch that does not mix (empty box, no blend) comes back unchanged.
  """
  height, width = images.shape[1], images.shape[2]
  other = partner(images, groups).astype(jnp.float32)
  own = jnp.where(box_mask(box, height, width)[..., None], other, images.astype(jnp.float32))
  lam = lam[:, None, None, None]
  blended = jnp.round(_times(own, lam) + _times(other, 1.0 - lam))  # round: half to even
  return jnp.where(blend[:, None, None, None], blended, own)


def erase(images, box, keys):
  """augment.random_erasing's pixel mode with its boxes: N(0, 1) noise inside each example's
  box (empty: not erased). keys: uint32 (b, 2), one threefry key per example, so an example's
  noise does not depend on how the batch is sharded."""
  keys = jax.random.wrap_key_data(keys, impl='threefry2x32')
  noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], images.dtype))(keys)
  inside = box_mask(box, images.shape[1], images.shape[2])[..., None]
  return jnp.where(inside, noise, images)


def prepare(batch, mean, std, groups=1):
  """A uint8 batch from the pipeline -> the batch of the float32 path, on the device.

  batch: {'image': uint8 (b, S, S, 3), 'label': float32 soft targets (already mixed), + the
  draws}; mean, std: dataset.mean/std; groups: how many host batches the global batch holds
  (jax.process_count()). Returns the batch with 'image' float32 (mixed, normalised, erased)
  and without the draws. The draws present say which steps run: the host's config decides.
  """
  out = {k: v for k, v in batch.items() if k not in DRAWS}
  x = batch['image']
  if 'mix_lam' in batch:
    x = mix(x, batch['mix_lam'], batch['mix_blend'], batch['mix_box'], groups)
  x = normalize(x, mean, std)
  if 'erase_box' in batch:
    x = erase(x, batch['erase_box'], batch['erase_key'])
  out['image'] = x
  return out
