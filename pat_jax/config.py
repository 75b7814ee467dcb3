"""The keys every experiment config has (DESIGN.md, "Config keys every experiment has").

Experiment files in configs/ start from `base(recipe)` and override what differs.
Every value here is the original recipe's (official-pat-code.md sections 1.10 and 3.1).
"""
import ml_collections

from pat_jax import data, errors, optim

# The optimiser halves of the two CIFAR recipes (cifar/cnn.yaml, cifar/vit_mlp.yaml).
OPTIM_RECIPES = {
    'cnn': dict(name='sgd', lr=0.05, weight_decay=2e-3, warmup_epochs=3, warmup_lr=1e-4,
                min_lr=1e-3, clip_grad=0.0),
    'vit_mlp': dict(name='adamw', lr=5e-4, weight_decay=0.05, warmup_epochs=20, warmup_lr=5e-7,
                    min_lr=1e-5, clip_grad=5.0),
}


def base(recipe: str = 'cnn') -> ml_collections.ConfigDict:
  """A CIFAR-100 run at 224x224 with recipe 'cnn' (ResNet/MobileNet students) or 'vit_mlp'."""
  if recipe not in OPTIM_RECIPES:
    raise errors.ConfigError(f'Unknown recipe {recipe!r}: use one of {sorted(OPTIM_RECIPES)}.')
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.dataset = data.default_config()
  c.aug = data.cnn_recipe() if recipe == 'cnn' else data.vit_recipe()

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet18'  # the student (or the model, for supervised runs)
  c.model.drop_path_rate = ml_collections.FieldReference(None, field_type=float)  # None: model default
  c.model.init_checkpoint = ''  # timm file or pat_jax checkpoint to fine-tune from (head re-initialised)
  c.model.remat = False  # recompute block activations in the backward pass (less memory, more time)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.name = ''  # '' = no teacher
  c.teacher.checkpoint = ''  # pat_jax checkpoint dir (python -m pat_jax.convert) or a timm .pth/.safetensors
  c.teacher.min_top1 = 0.0  # >0: evaluate the teacher at start-up and stop below this top-1 (%)
  c.teacher.remat = False  # rematerialise the (prompted) teacher's blocks in the backward pass
  # ConvNeXt teachers (always in eval mode): each stage's blocks as one lax.scan over their
  # weights, stacked once at load (same function; checkpoints keep timm's layout). XLA
  # compiles one block per stage: for the paper pair's PAT step on CPU, compile 31.5-44.2 s
  # instead of 39.5-43.1 s, a cached restart 7.5 s instead of 13.2 s, 1.20 instead of 1.30 GB at batch 8,
  # the step as fast or a little faster; but in bf16 without remat the CPU backend needs
  # 20-25% more (XLA:CPU copies a bf16 loop's saved activations to float32; XLA:GPU moves
  # bf16 as is).
  # False: the unrolled blocks (docs/BENCHMARKS.md).
  c.teacher.scan_blocks = True
  # Where a config with teacher.pretrain (and no checkpoint) trains its teacher: '' = WORKDIR/teacher.
  # A sweep points every run at one folder, so all its runs share one teacher.
  c.teacher.workdir = ''

  c.method = ml_collections.ConfigDict()
  c.method.name = 'none'  # 'none' (supervised), 'kd'
  c.method.ce_weight = 1.0  # --gt-loss-weight
  c.method.kd_weight = 1.0  # --kd-loss-weight
  c.method.kd_temperature = 1.0  # --kd-temperature

  c.optim = optim.default_config()
  c.optim.update(OPTIM_RECIPES[recipe])

  c.batch_size = 128  # global
  c.eval_batch_size = 0  # 0: batch_size
  c.num_epochs = 300
  c.total_steps = 0  # > 0 overrides num_epochs (the schedule still spans num_epochs)
  c.log_every_steps = 50
  c.eval_every_steps = 0  # 0: once per epoch, as the original
  c.checkpoint_every_steps = 0  # 0: once per epoch
  c.keep_checkpoints = 2  # latest N, plus the best-accuracy one
  # A newest checkpoint that cannot be restored is moved to checkpoints/damaged/ and the newest
  # whole one restored; True: stop with the error instead (a person decides).
  c.checkpoint_strict = False
  # N > 0: an update whose loss or gradient is not finite is skipped (the state stays as it was,
  # the step counts) up to N times in the run, then the run stops; 0: stop at the first one.
  c.skip_nonfinite_steps = 0
  c.debug_nan_at_step = 0  # tests of the above: the first loss term is NaN at this step (0: off)
  c.ema_decay = 0.9998
  # Compute dtype of student and teacher: 'float32', 'bfloat16', or 'auto' (bfloat16 on GPU/TPU,
  # float32 on CPU; the GPU/TPU configs use it: the original trained with fp16 AMP).
  c.dtype = 'float32'
  c.num_devices = 0  # 0: all devices; N: the first N (single process)
  # Keep the train step's lowered program beside the compilation cache, so that a restart skips
  # tracing it (pat_jax/step_cache.py). False: trace at every start.
  c.step_cache = True
  return c
