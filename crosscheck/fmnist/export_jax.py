"""Step 1 (pat_jax venv): export pat_jax's Fashion-MNIST miniature split, pat_jax's own
eval-preprocessed validation and test images, and the miniature's trained teacher (mini_convnext)
as a timm-style state dict.

Run:  FASHION_MNIST_DIR=... JAX_PLATFORMS=cpu $PAT_JAX_PY export_jax.py $XCHECK_DATA [--data-only]
(--data-only: the split and eval images only, e.g. while the teacher is still training.)
Writes OUT/fmnist.npz (uint8 28x28x3 images: the 5,400-image training subset, validation, test),
OUT/jax_eval_{val,test}_nhwc.npy (pat_jax's eval pipeline output, float32 32x32x3),
OUT/teacher_timm.npz, OUT/teacher_jax_{val,test}_logits.npy and OUT/teacher_jax_eval.json.
Reads only; nothing in the pat_jax checkout or the teacher workdir is modified.
"""
import importlib.util
import json
import os
import sys

import numpy as np

REPO = os.environ.get('PAT_JAX_REPO', os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))
sys.path.insert(0, REPO)  # a pat_jax checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pat_jax import checkpoint, convert, data, models  # noqa: E402
from pat_jax.data import pipeline, sources  # noqa: E402

ARGV = [a for a in sys.argv[1:] if a != '--data-only']
DATA_ONLY = '--data-only' in sys.argv[1:]
OUT = ARGV[0] if ARGV else os.environ['XCHECK_DATA']
TEACHER = os.environ.get('FMNIST_TEACHER_DIR', os.path.join(REPO, 'workdirs', 'miniature', 'teacher'))
os.makedirs(OUT, exist_ok=True)

# ---- the resolved student config of configs/fmnist_vit.py (PAT; the data part is the same for
# every ARG): loaded as tests/test_train.py loads its configs ----
spec = importlib.util.spec_from_file_location('fmnist_vit', os.path.join(REPO, 'configs', 'fmnist_vit.py'))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
cfg = module.get_config('')
ds = cfg.dataset
assert ds.train_split == 'train[:90%]' and ds.eval_split == 'train[90%:]' and ds.test_split == 'test', ds
assert abs(ds.train_fraction - 0.1) < 1e-12 and ds.fraction_seed == 0, ds
assert tuple(ds.mean) == (0.2860,) * 3 and tuple(ds.std) == (0.3530,) * 3 and ds.eval_crop_pct == 1.0

# ---- the splits, read through pat_jax's own source (IDX reader, 3-channel replication) ----
train90 = sources.load_split(ds, ds.train_split)
val = sources.load_split(ds, ds.eval_split)
test = sources.load_split(ds, ds.test_split)
whole = sources.load_split(ds, 'train')
assert len(train90.labels) == 54000 and len(val.labels) == 6000 and len(test.labels) == 10000
assert np.array_equal(val.images, whole.images[54000:]) and np.array_equal(val.labels, whole.labels[54000:])
idx = pipeline.train_indices(cfg, len(train90.labels))  # the students' 5,400-image subset
assert len(idx) == 5400 and pipeline.get_info(cfg).num_train == 5400
x_train, y_train = train90.images[idx], train90.labels[idx]


# ---- pat_jax's own eval pipeline on validation and test (to check the torch preprocessing) ----
def jax_eval_images(split, ref_labels):
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    c.dataset.eval_split = split
    c.dataset.transfer = 'float32'  # normalised on the host, also where 'auto' would send uint8
  xs, ys, ms = [], [], []
  for b in data.eval_iterator(c, batch_size=500):
    xs.append(b['image']); ys.append(b['label']); ms.append(b['mask'])
  m = np.concatenate(ms)
  x, y = np.concatenate(xs)[m], np.concatenate(ys)[m]
  assert np.array_equal(y, ref_labels), f'{split}: eval split order differs'
  return x.astype(np.float32)


ev_val = jax_eval_images(ds.eval_split, val.labels)
ev_test = jax_eval_images(ds.test_split, test.labels)
np.save(os.path.join(OUT, 'jax_eval_val_nhwc.npy'), ev_val)
np.save(os.path.join(OUT, 'jax_eval_test_nhwc.npy'), ev_test)
np.savez(os.path.join(OUT, 'fmnist.npz'), train_indices=idx,
         x_train=x_train, y_train=y_train, x_val=val.images, y_val=val.labels,
         x_test=test.images, y_test=test.labels)

print('train', x_train.shape, 'val', val.images.shape, 'test', test.images.shape,
      'train indices', idx[:5], '...', flush=True)
if DATA_ONLY:
  sys.exit(0)
if not os.path.isfile(os.path.join(TEACHER, 'result.json')):
  sys.exit(f'{TEACHER}/result.json does not exist: the teacher is not trained (yet).')

# ---- the miniature teacher: latest step of TEACHER/checkpoints, raw 'variables' item ----
# (what pat_jax.train.load_teacher loads for the KD/PAT runs)
result = json.load(open(os.path.join(TEACHER, 'result.json')))
tpath = os.path.join(TEACHER, 'checkpoints')
variables = checkpoint.load_variables(tpath)
sd = convert.to_timm(variables)
np.savez(os.path.join(OUT, 'teacher_timm.npz'), **{k: np.asarray(v) for k, v in sd.items()})

teacher = models.create('mini_convnext', num_classes=10)
fwd = jax.jit(lambda v, x: teacher.apply(v, x, train=False))


def logits_of(x):
  return np.concatenate([np.asarray(fwd(variables, jnp.asarray(x[i:i + 500]))) for i in range(0, len(x), 500)])


lv, lt = logits_of(ev_val), logits_of(ev_test)
np.save(os.path.join(OUT, 'teacher_jax_val_logits.npy'), lv)
np.save(os.path.join(OUT, 'teacher_jax_test_logits.npy'), lt)
res = {'teacher_dir': TEACHER, 'steps': sorted(os.listdir(tpath)), 'result_json': result,
       'jax_val_top1': float(100.0 * np.mean(lv.argmax(-1) == val.labels)),
       'jax_test_top1': float(100.0 * np.mean(lt.argmax(-1) == test.labels)),
       'train_indices_first10': idx[:10].tolist(), 'keys': sorted(sd)}
json.dump(res, open(os.path.join(OUT, 'teacher_jax_eval.json'), 'w'), indent=1)
print('pat_jax teacher (latest checkpoint, raw) val top-1 %.2f, test top-1 %.2f; result.json: %s'
      % (res['jax_val_top1'], res['jax_test_top1'],
         {k: result.get(k) for k in ('best_top1', 'best_source', 'final_top1', 'final_ema_top1', 'test_top1')}))
print('n keys', len(sd))
