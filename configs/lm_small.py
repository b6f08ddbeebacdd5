"""A realistic pod-scale byte-level LM: ~125M parameters, GQA, bfloat16, FSDP x tensor mesh.

Not meant for a CPU (the tests build it and run one step with tiny overrides). On a GPU node or
TPU slice, after preparing lm1b as ArrayRecord (see attnjax/data/tfds_sources.py):

    python experiments/train.py --config configs/lm_small.py --workdir gs://.../lm_small \
        --config.data.data_dir=/path/to/tensorflow_datasets

Mesh: ``fsdp`` takes all devices but ``tensor`` (2 by default; the 12 query / 4 KV heads and
the MLP split over it). Global batch 256 x 256 bytes = 64k tokens per step.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from attnjax.training.loop import attention_kwargs_config


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "lm_small"
  c.seed = 0
  c.distributed = "auto"        # jax.distributed: "auto" | "on" | "off" (experiments/train.py)

  c.data = ml_collections.ConfigDict()
  c.data.name = "tfds:lm1b"
  c.data.seq_len = 256
  c.data.data_dir = placeholder(str)   # TFDS data dir (None: ~/tensorflow_datasets)
  c.data.max_bytes = placeholder(int)  # stdlib_text only: cap the bytes per split

  c.model = ml_collections.ConfigDict()
  c.model.kind = "lm"
  c.model.vocab_size = placeholder(int)  # None: from the dataset (256 bytes)
  c.model.max_len = placeholder(int)  # None: data.seq_len
  c.model.d_model = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 3840
  c.model.attention = "gqa"
  # Constructor arguments of the attention layer, None = unset, e.g.
  # --config.model.attention=sliding_window --config.model.attention_kwargs.window=64.
  c.model.attention_kwargs = attention_kwargs_config()
  c.model.rope_theta = 10000.0
  c.model.dtype = "bfloat16"    # compute dtype (parameters and optimizer state stay float32)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 6e-4
  c.optim.warmup_steps = 2000
  c.optim.final_lr_fraction = 0.1
  c.optim.weight_decay = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0

  c.num_steps = 100_000
  c.batch_size = 256
  c.grad_accum_steps = 1        # microbatches per step (lax.scan inside the step)
  c.aux_loss_coef = 0.01        # weight of the model's auxiliary loss (MoH load balance)
  c.eval_batch_size = 256
  c.eval_steps = 100            # eval batches per evaluation (-1: the whole eval split)
  c.eval_every = 2000
  c.eval_at_start = True        # also evaluate the initial model (step 0)
  c.log_every = 100

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 2000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 2
  c.mesh.sequence = 1            # >1: context parallelism (sequence sharded over this axis)
  c.mesh.sequence_strategy = "ring"        # ring | all_gather | ulysses
  c.mesh.sequence_load_balance = "zigzag"  # zigzag | striped | none
  c.mesh.num_devices = -1       # -1: all devices; N: the first N (single process)
  c.mesh.fsdp_min_size = 2 ** 14  # smaller parameters are not FSDP-sharded

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "The "
  c.sample.max_new_tokens = 80
  return c
