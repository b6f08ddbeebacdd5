"""Shared helpers of the training tests: import experiments/train.py, tiny overrides, and the
eval losses of a run."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAIN = ROOT / "experiments" / "train.py"
CONFIGS = ROOT / "configs"


def load_train():
  spec = importlib.util.spec_from_file_location("attnjax_train_script", TRAIN)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# Tiny overrides: a few seconds of compile + steps on CPU.
TINY_LM = {
    "data.seq_len": 32, "data.max_bytes": 60_000, "model.d_model": 32, "model.num_layers": 1,
    "model.num_heads": 4, "model.mlp_dim": 64, "num_steps": 12, "batch_size": 8,
    "eval_batch_size": 8, "eval_steps": 2, "eval_every": 0, "log_every": 4,
    "optim.warmup_steps": 2, "optim.lr": 1e-2, "checkpoint.every": 0,
    "sample.max_new_tokens": 0,
}
TINY_VIT = {
    "model.dim": 32, "model.depth": 1, "model.num_heads": 4, "model.mlp_dim": 64,
    "num_steps": 12, "batch_size": 16, "eval_batch_size": 64, "eval_steps": 2, "eval_every": 0,
    "log_every": 4, "optim.warmup_steps": 2, "optim.lr": 3e-3, "checkpoint.every": 0,
}


def argv(config: str, workdir, overrides: dict, *extra: str) -> list[str]:
  out = ["train.py", "--config", str(CONFIGS / f"{config}.py"), "--workdir", str(workdir),
         "--noprogress"]
  out += [f"--config.{k}={v}" for k, v in overrides.items()]
  return out + list(extra)


def eval_losses(workdir) -> list[tuple[int, float]]:
  """``(step, eval loss)`` records of a run: the same fixed eval batches at every evaluation
  (step 0 = the initial model, with ``eval_at_start``)."""
  recs = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]
  return [(r["step"], r["loss"]) for r in recs if r["split"] == "eval"]


def params_np(state):
  return jax.tree.map(np.asarray, jax.device_get(state["params"]))
