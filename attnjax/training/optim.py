"""Optimizer: AdamW with linear warm-up + cosine decay and global-norm gradient clipping.

Gradient accumulation is *not* done with ``optax.MultiSteps``: the train step
(:mod:`attnjax.training.steps`) splits the global batch into ``grad_accum_steps`` microbatches
and sums their gradients with a ``lax.scan`` inside one jitted step, so one loop step is one
optimizer update (the schedule, checkpoints and the data position all count updates) and the
update equals the one of the full batch (the weighted loss is normalized by the full batch's
weight before the split).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax


def make_schedule(opt_cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """``lr`` reached linearly after ``warmup_steps``, then cosine decay to
  ``lr * final_lr_fraction`` at ``total_steps``."""
  lr = float(opt_cfg["lr"])
  warmup = int(opt_cfg.get("warmup_steps", 0))
  total = max(int(total_steps), warmup + 1)
  if lr <= 0:
    raise ValueError(f"optim.lr must be > 0, got {lr}")
  if warmup < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total,
      end_value=lr * float(opt_cfg.get("final_lr_fraction", 0.1)))


def _decay_mask(params):
  """Weight decay on matrices only (not on norm scales, biases or other vectors)."""
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(opt_cfg: Mapping[str, Any], total_steps: int):
  """``(optax transformation, schedule)``: clip by global norm, then AdamW."""
  schedule = make_schedule(opt_cfg, total_steps)
  chain = []
  clip = float(opt_cfg.get("grad_clip", 0.0) or 0.0)
  if clip > 0:
    chain.append(optax.clip_by_global_norm(clip))
  chain.append(optax.adamw(schedule, b1=float(opt_cfg.get("b1", 0.9)),
                           b2=float(opt_cfg.get("b2", 0.95)),
                           eps=float(opt_cfg.get("eps", 1e-8)),
                           weight_decay=float(opt_cfg.get("weight_decay", 0.0)),
                           mask=_decay_mask))
  return optax.chain(*chain), schedule
