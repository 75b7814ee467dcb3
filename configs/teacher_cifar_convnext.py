r"""Fine-tune an ImageNet ConvNeXt-T on CIFAR-100 at 224x224, the way the CIFAR teachers were made.

The OFA-KD authors fine-tuned timm ImageNet checkpoints on CIFAR-100 with plain CE (their
issues #14/#29); PAT ships the recipe as configs/cifar/pretrain_cnn.yaml (AdamW 5e-5, 20
warm-up epochs from 5e-8, min lr 1e-6, weight decay 0.05, clip 5, the ViT augmentations).

Command (convert the ImageNet weights first; the head is re-initialised for 100 classes):
  python -m pat_jax.main --config=configs/teacher_cifar_convnext.py --workdir=workdirs/convnext_t \
      --config.model.init_checkpoint=convnext_tiny_1k_224_ema.pth   # or a timm .safetensors

Expected: about 88.4% top-1 (the released OFA-KD teacher convnext_tiny_cifar100.pth; not
reproduced here). Use the result as a teacher with
--config.teacher.checkpoint=workdirs/convnext_t/checkpoints.
Runtime: 300 epochs x 390 steps; not measured here (no accelerator was available).
"""
from pat_jax import config as base_config
from pat_jax import data


def get_config(arg=None):
  del arg
  c = base_config.base('vit_mlp')
  c.dtype = 'auto'  # bfloat16 on GPU/TPU (the original: fp16 AMP), float32 on CPU
  c.model.name = 'convnext_tiny'
  c.dataset.eval_crop_pct = data.crop_pct_for(c.model.name)
  c.optim.update(dict(name='adamw', lr=5e-5, weight_decay=0.05, warmup_epochs=20, warmup_lr=5e-8,
                      min_lr=1e-6, clip_grad=5.0))
  return c
