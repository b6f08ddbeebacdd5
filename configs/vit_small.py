"""ViT-S/4 on CIFAR-10 (a realistic single-GPU / small-slice config; ~21M parameters).

Needs CIFAR-10 prepared as ArrayRecord (``tfds build cifar10 --file_format=array_record``, see
attnjax/data/tfds_sources.py):

    python experiments/train.py --config configs/vit_small.py --workdir /tmp/vit_small \
        --config.data.data_dir=/path/to/tensorflow_datasets

4x4 patches -> 8x8 grid (64 tokens + class token), dim 384, depth 12, 6 heads, bfloat16
compute. The data pipeline has no augmentation, so expect well below the ~90%+ of augmented
ViTs; this config has not been run to completion (no GPU or prepared CIFAR-10 here; the tests
build it and run one step on digits).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from attnjax.training.loop import attention_kwargs_config


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "vit_small"
  c.seed = 0
  c.distributed = "auto"        # jax.distributed: "auto" | "on" | "off" (experiments/train.py)

  c.data = ml_collections.ConfigDict()
  c.data.name = "tfds:cifar10"
  c.data.data_dir = placeholder(str)
  c.data.eval_split = placeholder(str)   # the split used for eval (default "test")
  c.data.max_examples = placeholder(int)  # keep only the first N examples of each split

  c.model = ml_collections.ConfigDict()
  c.model.kind = "vit"
  c.model.image_size = placeholder(int)  # None: from the dataset (32x32)
  c.model.in_channels = placeholder(int)  # None: from the dataset (3)
  c.model.num_classes = placeholder(int)  # None: from the dataset (10)
  c.model.patch_size = 4
  c.model.dim = 384
  c.model.depth = 12
  c.model.num_heads = 6
  c.model.mlp_dim = 1536
  c.model.attention = "global"
  # Constructor arguments of the attention layer, None = unset (the layer's default), e.g.
  # --config.model.attention=neighborhood --config.model.attention_kwargs.kernel_size=3.
  c.model.attention_kwargs = attention_kwargs_config("vit")
  c.model.pool = "cls"
  c.model.dtype = "bfloat16"

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2000
  c.optim.final_lr_fraction = 0.01
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0

  c.num_steps = 40_000
  c.batch_size = 256
  c.grad_accum_steps = 1
  c.aux_loss_coef = 0.0
  c.eval_batch_size = 512
  c.eval_steps = -1             # the whole eval split (10,000 images)
  c.eval_every = 2000
  c.eval_at_start = True        # also evaluate the initial model (step 0)
  c.log_every = 100

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 2000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.sequence = 1
  c.mesh.num_devices = -1
  c.mesh.fsdp_min_size = 2 ** 14  # smaller parameters are not FSDP-sharded
  return c
