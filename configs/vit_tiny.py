"""Tiny ViT on scikit-learn's 8x8 digits (CPU, well under a minute; >= 95% eval accuracy).

    python experiments/train.py --config configs/vit_tiny.py --workdir /tmp/vit_tiny

4x4 patches -> a 2x2 grid of 4 tokens plus a class token (smaller patches overfit the 1,347
training images: 2x2 patches reached 93.6%, 4x4 patches 97.8%). Measured on the 2-core CPU
(shared with other jobs): 400 steps, eval accuracy 0.978 on the 450 eval images, 19 s wall at a
quiet moment (load ~3), ~3 min at load ~10."""

import ml_collections
from ml_collections.config_dict import placeholder

from attnjax.training.loop import attention_kwargs_config


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "vit_tiny"
  c.seed = 0
  c.distributed = "auto"        # jax.distributed: "auto" | "on" | "off" (experiments/train.py)

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"         # or fashion_mnist_idx, tfds:mnist, tfds:cifar10, ...
  c.data.data_dir = placeholder(str)     # fashion_mnist_idx / tfds:*: where the files are
  c.data.eval_split = placeholder(str)   # tfds:*: the split used for eval (default "test")
  c.data.max_examples = placeholder(int)  # keep only the first N examples of each split

  c.model = ml_collections.ConfigDict()
  c.model.kind = "vit"
  c.model.image_size = placeholder(int)  # None: from the dataset (8x8)
  c.model.in_channels = placeholder(int)  # None: from the dataset (1)
  c.model.num_classes = placeholder(int)  # None: from the dataset (10)
  c.model.patch_size = 4
  c.model.dim = 64
  c.model.depth = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.model.attention = "global"
  # Constructor arguments of the attention layer, None = unset (the layer's default), e.g.
  # --config.model.attention=neighborhood --config.model.attention_kwargs.kernel_size=3.
  c.model.attention_kwargs = attention_kwargs_config("vit")
  c.model.pool = "cls"
  c.model.dtype = "float32"

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 30
  c.optim.final_lr_fraction = 0.05
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0

  c.num_steps = 400
  c.batch_size = 64
  c.grad_accum_steps = 1
  c.aux_loss_coef = 0.0
  c.eval_batch_size = 128
  c.eval_steps = -1             # the whole eval split (450 images)
  c.eval_every = 100
  c.eval_at_start = True        # also evaluate the initial model (step 0)
  c.log_every = 20

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 200
  c.checkpoint.max_to_keep = 2
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.sequence = 1
  c.mesh.num_devices = -1
  c.mesh.fsdp_min_size = 2 ** 14  # smaller parameters are not FSDP-sharded
  return c
