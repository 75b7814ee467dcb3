r"""PAT: ResNet-34 teacher -> ResNet-18 student on ImageNet-1K (supplementary Table 1: 71.18%).

Command (prepare imagenet2012 with tfds first: see README "Data"; convert timm's ResNet-34):
  python -m pat_jax.convert --model resnet34 --num-classes 1000 --input resnet34.safetensors \
      --output teachers/resnet34
  python -m pat_jax.main --config=configs/imagenet_resnet34_resnet18.py --workdir=workdirs/r34_r18 \
      --config.teacher.checkpoint=teachers/resnet34 --config.dataset.data_dir=/path/to/tfds

Recipe: imagenet/cnn.yaml (SGD nesterov 0.1, weight decay 1e-4, step decay x0.1 every 30
epochs, 3 warm-up epochs from 1e-4, 100 epochs, global batch 256 = 4 GPUs x 64, label
smoothing 0.1, RandomResizedCrop + flip only), PAT defaults.
Expected: 71.18% top-1 (mean of 3 runs in the paper; teacher 73.31, student alone 69.75,
KD 70.66 with `:kd`). Variants: `:ARG` as in pat_jax/experiments.py.
Runtime: 100 epochs x 5,004 steps; not measured here (no accelerator was available).
"""
from pat_jax import config as base_config
from pat_jax import data, experiments


def get_config(arg=None):
  c = base_config.base('cnn')
  c.dtype = 'auto'  # bfloat16 on GPU/TPU (the original: fp16 AMP), float32 on CPU
  c.dataset.name = 'imagenet2012'
  c.dataset.eval_split = 'validation'
  c.dataset.mean, c.dataset.std = data.IMAGENET_MEAN, data.IMAGENET_STD
  c.dataset.reader = 'random_access'  # ArrayRecord: 1.28 M images do not fit the memory reader
  c.model.name = 'resnet18'
  c.dataset.eval_crop_pct = data.crop_pct_for(c.model.name)
  c.teacher.name = 'resnet34'
  c.teacher.min_top1 = 60.0
  c.method = experiments.pat_method()
  c.optim.update(dict(name='sgd', lr=0.1, weight_decay=1e-4, schedule='step', decay_epochs=30,
                      decay_rate=0.1, warmup_epochs=3, warmup_lr=1e-4))
  c.batch_size = 256
  c.num_epochs = 100
  return experiments.apply(c, arg)
