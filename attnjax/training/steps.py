"""Losses and the jitted train / eval steps (functional NNX: ``graphdef`` + state pytrees).

Train state (a plain dict pytree, what the checkpoint stores)::

    {"step": int32 [], "params": nnx.State (Param), "rest": nnx.State (other variables),
     "opt_state": optax state, "rng": uint32 key data}

Losses are written as *sums* over weighted examples divided by the weight of the whole global
batch, so a step that accumulates gradients over microbatches gives the same update as one
full-batch step.

* LM (``kind="lm"``): next-token cross entropy weighted by ``batch["weights"]`` plus
  ``aux_loss_coef * aux_loss`` (e.g. a mixture-of-heads load-balancing loss).
* ViT (``kind="vit"``): softmax cross entropy over ``batch["label"]`` (weight 1 per image, or
  ``batch["mask"]`` when present: 0 on eval padding).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from attnjax.training import mesh as mesh_lib

METRIC_KEYS = ("loss_sum", "weight_sum", "correct_sum", "aux")


def example_weights(kind: str, batch) -> jax.Array:
  if kind == "lm":
    return batch["weights"].astype(jnp.float32)
  for key in ("mask", "weights"):  # eval padding has mask 0
    if key in batch:
      return batch[key].astype(jnp.float32)
  return jnp.ones(batch["label"].shape, jnp.float32)


def forward_metrics(kind: str, model, batch, positions=None):
  """Per-batch sums: ``loss_sum`` (weighted NLL, nats), ``weight_sum``, ``correct_sum`` and the
  auxiliary loss ``aux`` (0 for models without one). ``positions`` (LM only, static ``[T]``):
  the global positions of the batch's tokens when they are in a permuted (context-parallel
  load-balancing) layout; the sums are over tokens, so the layout does not change them."""
  w = example_weights(kind, batch)
  if kind == "lm":
    pos_kw = {} if positions is None else {"positions": positions}
    logits, aux = model(batch["inputs"], return_aux=True, **pos_kw)
    labels = batch["targets"]
  else:
    logits = model(batch["image"])
    aux = jnp.zeros((), jnp.float32)
    labels = batch["label"]
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"loss_sum": jnp.sum(nll * w), "weight_sum": jnp.sum(w),
          "correct_sum": jnp.sum(correct * w), "aux": jnp.asarray(aux, jnp.float32)}


def _reseed(model, key):
  """Give every RNG stream of the model (e.g. dropout) a key derived from ``key``, so random
  numbers depend only on (seed, step) and a resumed run draws the same ones."""
  i = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.RngStream):
      node.key.value = jax.random.fold_in(key, i)
      node.count.value = jnp.zeros_like(node.count.value)
      i += 1


def _microbatches(batch, k: int, mesh, sequence: bool = False):
  """``[B, ...] -> [k, B/k, ...]`` taking rows ``i, i+k, ...`` for microbatch ``i`` (every
  device keeps its own rows: no resharding of a batch sharded contiguously over devices).
  ``sequence``: the token axis stays sharded over ``"sequence"``."""
  def split(x):
    B = x.shape[0]
    y = x.reshape(B // k, k, *x.shape[1:]).swapaxes(0, 1)
    rest = [None] * (x.ndim - 1)
    if sequence and x.ndim >= 2:
      rest[0] = mesh_lib.SEQUENCE_AXIS
    spec = P(None, mesh_lib.BATCH_AXES, *rest)
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
  return jax.tree.map(split, batch)


def make_train_step(kind: str, graphdef, tx, schedule, *, mesh, grad_accum_steps: int = 1,
                    aux_loss_coef: float = 0.0, positions=None) -> Callable:
  """``train_step(state, batch) -> (state, metrics)`` (pure; jit it with shardings).

  ``positions`` (static ``[T]``, LM only): the global token positions of the batches'
  (load-balanced) layout under context parallelism; the token axis then stays sharded over
  ``"sequence"`` in gradient-accumulation microbatches."""
  k = int(grad_accum_steps)
  seq = positions is not None

  def loss_fn(params, rest, mb, total_w, key):
    model = nnx.merge(graphdef, params, rest)
    _reseed(model, key)
    m = forward_metrics(kind, model, mb, positions)
    loss = m["loss_sum"] / total_w + aux_loss_coef * m["aux"] / k
    return loss, m

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    params, rest = state["params"], state["rest"]
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    total_w = jnp.maximum(jnp.sum(example_weights(kind, batch)), 1.0)
    if k == 1:
      (_, m), grads = grad_fn(params, rest, batch, total_w, step_key)
    else:
      micro = _microbatches(batch, k, mesh, seq)

      def body(carry, xs):
        g_acc, m_acc = carry
        mb, i = xs
        (_, m), g = grad_fn(params, rest, mb, total_w, jax.random.fold_in(step_key, i))
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

      zeros_g = jax.tree.map(jnp.zeros_like, params)
      zeros_m = {key: jnp.zeros((), jnp.float32) for key in METRIC_KEYS}
      (grads, m), _ = jax.lax.scan(body, (zeros_g, zeros_m), (micro, jnp.arange(k)))
      m = dict(m, aux=m["aux"] / k)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = dict(m, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    new_state = dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(kind: str, graphdef, positions=None) -> Callable:
  """``eval_step(params, rest, batch) -> metric sums`` (``positions``: see
  :func:`make_train_step`)."""
  def eval_step(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    return forward_metrics(kind, model, batch, positions)
  return eval_step


def summarize(kind: str, sums: dict[str, Any],
              bytes_per_token: float | None = None) -> dict[str, float]:
  """Metric sums (any number of batches) -> means: loss (nats), accuracy and, for LMs, the
  auxiliary loss and ``bits_per_byte`` -- the latter only when ``bytes_per_token`` is given
  (byte-level text: 1.0), never for datasets whose tokens are not bytes (``mqar``, ``copy``)."""
  w = max(float(sums["weight_sum"]), 1e-9)
  loss = float(sums["loss_sum"]) / w
  out = {"loss": loss, "accuracy": float(sums["correct_sum"]) / w}
  if kind == "lm":
    if bytes_per_token is not None:
      out["bits_per_byte"] = loss / np.log(2.0) / float(bytes_per_token)
    out["aux_loss"] = float(sums.get("aux", 0.0))
  return out


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


__all__ = ["forward_metrics", "make_train_step", "make_eval_step", "summarize", "count_params",
           "example_weights"]
