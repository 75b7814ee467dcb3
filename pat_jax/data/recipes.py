"""Data configuration: dataset defaults and the two augmentation recipes of the original code.

The values mirror PAT's `configs/cifar/cnn.yaml` and `configs/cifar/vit_mlp.yaml` plus the timm
argparse defaults they inherit (official-pat-code.md §3.1, §3.3). Every augmentation is a switch
in `config.aug`, so the CNN recipe is the ViT/MLP recipe with RandAugment, mixup/cutmix and random
erasing turned off.
"""
import ml_collections

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm default_cfg crop_pct of each student family (used for the eval Resize/CenterCrop).
CROP_PCT = {
    'resnet': 0.875, 'mobilenetv2': 0.875, 'convnext': 0.875, 'mixer': 0.875, 'resmlp': 0.875,
    'deit': 0.9, 'vit': 0.9, 'swin': 0.9,
}


def crop_pct_for(model_name: str) -> float:
  """timm's crop_pct for a student name (e.g. 'deit_tiny_patch16_224' -> 0.9)."""
  for prefix, pct in sorted(CROP_PCT.items(), key=lambda kv: -len(kv[0])):
    if model_name.startswith(prefix):
      return pct
  return 0.875


def default_config() -> ml_collections.ConfigDict:
  """`config.dataset`: CIFAR-100 at 224 as in the paper's CIFAR runs."""
  c = ml_collections.ConfigDict()
  # tfds name; 'digits' is the local scikit-learn builder; 'folder:/root' reads
  # /root/<split>/<class>/*.{png,jpg}.
  c.name = 'cifar100'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  # Splits may be TFDS slices: train_split='train[:90%]', eval_split='train[90%:]' evaluates on a
  # validation split held out of 'train' (choose settings there), and test_split='test' is then
  # read once, by the final model, at the end of the run (result.json test_top1).
  c.train_split = 'train'
  c.eval_split = 'test'  # evaluated every eval_every_steps (best_top1 is over these evaluations)
  c.test_split = ''  # '' = none; else evaluated once after the last step
  c.image_size = 224
  c.train_fraction = 1.0  # first fraction of the seed-shuffled train split (paper Table 2)
  # Seed of that shuffle; None: config.seed. Fixed, every run and fraction draws nested subsets.
  c.fraction_seed = ml_collections.FieldReference(None, field_type=int)
  c.mean = CIFAR_MEAN  # 0-1 units; pixels are normalised as (x - 255*mean) / (255*std)
  c.std = CIFAR_STD
  c.eval_crop_pct = 0.875  # 0.9 for deit/vit/swin students (timm default_cfg)
  c.eval_interpolation = 'bilinear'  # the original forces bilinear for in-training eval
  # 'memory': decode the split once and index it (CIFAR, digits, folders; exact resume).
  # 'random_access': tfds.data_source over ArrayRecord files (ImageNet; exact resume too).
  c.reader = 'memory'
  c.num_parallel_calls = -1  # -1 = tf.data.AUTOTUNE
  c.threads = 0  # private tf.data threadpool size; 0 = TF default (all cores)
  c.prefetch = 2  # batches
  # How batches cross to the device: 'float32' (mixed, normalised and erased on the host),
  # 'uint8' (the host stops after RandAugment; data/on_device.py does the rest on the
  # accelerator), 'auto' = 'uint8' on GPU/TPU, 'float32' on CPU (on_device.resolve_transfer).
  c.transfer = 'auto'
  # Who resizes (Pillow's pixels, bit for bit, either way; augment.resize_with): 'pillow' (the
  # installed Pillow, called from the graph), 'tf' (TF ops only), 'auto' = TF's precomputed
  # tables for fixed-shape sources (CIFAR), Pillow for image folders and JPEGs (faster there).
  c.resize_with = 'auto'
  return c


def cnn_recipe() -> ml_collections.ConfigDict:
  """`config.aug` of cifar/cnn.yaml: RRC + flip, label smoothing 0.1, nothing else."""
  c = ml_collections.ConfigDict()
  c.random_resized_crop = True
  c.scale = (0.08, 1.0)
  c.ratio = (3 / 4, 4 / 3)
  c.interpolation = 'random'  # 'random' = bilinear or bicubic per image, or one of them
  c.hflip = 0.5
  c.randaugment = ''
  c.mixup = 0.0
  c.cutmix = 0.0
  c.mixup_prob = 1.0
  c.mixup_switch_prob = 0.5
  c.mixup_mode = 'batch'
  c.label_smoothing = 0.1
  c.reprob = 0.0
  c.remode = 'pixel'
  return c


def vit_recipe() -> ml_collections.ConfigDict:
  """`config.aug` of cifar/vit_mlp.yaml: adds RandAugment, mixup/cutmix and random erasing."""
  c = cnn_recipe()
  c.randaugment = 'rand-m9-mstd0.5-inc1'
  c.mixup = 0.8
  c.cutmix = 1.0
  c.reprob = 0.25
  return c
