"""Reusable training library behind ``experiments/train.py``.

``mesh``        device mesh ``("data", "fsdp", "tensor", "sequence")``, multi-host start-up,
                parameter / batch shardings;
``optim``       AdamW + warm-up/cosine schedule + global-norm clipping;
``steps``       losses and the jitted train (with gradient accumulation) / eval steps;
``checkpoint``  orbax checkpoints of the state and the grain iterator position;
``metrics``     JSONL / TensorBoard metrics, curves plot, summary;
``loop``        ``run(cfg, workdir, resume=...)``, the driver.
"""

from attnjax.training.checkpoint import CheckpointError, Checkpointer
from attnjax.training.loop import RunResult, run
from attnjax.training.mesh import (BATCH_AXES, MESH_AXES, make_mesh, maybe_initialize_distributed,
                                   param_shardings, resolve_mesh_shape)
from attnjax.training.optim import make_optimizer, make_schedule

__all__ = ["run", "RunResult", "CheckpointError", "Checkpointer", "MESH_AXES", "BATCH_AXES",
           "make_mesh", "maybe_initialize_distributed", "param_shardings", "resolve_mesh_shape",
           "make_optimizer", "make_schedule"]
