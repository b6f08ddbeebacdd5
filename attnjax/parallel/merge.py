"""Exact merging of partial attention results by their log-sum-exp (float32).

Attention over a key set split into parts ``K = K_1 u ... u K_m`` is recovered from the partial
results ``(o_i, lse_i)`` of each part (the identity behind blockwise/ring attention, Liu et al.
2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context"):

    lse = logsumexp_i(lse_i)        o = sum_i exp(lse_i - lse) * o_i

A sink logit ``s`` (gpt-oss attention sinks) joins the denominator once, in the final merge:
``lse_tot = logaddexp(lse, s)`` and ``o_tot = exp(lse - lse_tot) * o``. Rows that see nothing
have ``lse_i = -inf`` and ``o_i = 0``; the merge keeps them at ``o = 0``, ``lse = -inf`` (or the
sink logit) with finite, zero gradients.
"""

from __future__ import annotations

import jax.numpy as jnp

f32 = jnp.float32


def _finite_or(x, fill):
  return jnp.where(jnp.isfinite(x), x, fill)


def merge_weight(lse_part, lse_total):
  """``exp(lse_part - lse_total)``, 0 where ``lse_part`` is ``-inf`` (no NaN, no NaN grads)."""
  ok = jnp.isfinite(lse_part)
  w = jnp.exp(_finite_or(lse_part, 0.0) - _finite_or(lse_total, 0.0))
  return jnp.where(ok, w, 0.0)


def merge_two(o1, lse1, o2, lse2):
  """Merge two partial results (``o`` ``[..., Dv]``, ``lse`` ``[...]``) in float32."""
  lse1, lse2 = lse1.astype(f32), lse2.astype(f32)
  m = jnp.maximum(lse1, lse2)
  ok = jnp.isfinite(m)
  m_safe = jnp.where(ok, m, 0.0)
  s = merge_weight(lse1, m_safe) + merge_weight(lse2, m_safe)  # >= 1 where ok
  lse = jnp.where(ok, m_safe + jnp.log(jnp.where(ok, s, 1.0)), -jnp.inf)
  w1, w2 = merge_weight(lse1, lse), merge_weight(lse2, lse)
  o = w1[..., None] * o1.astype(f32) + w2[..., None] * o2.astype(f32)
  return o, lse


def merge_partials(outs, lses, sinks=None, head_axis: int = -1):
  """Merge partial attention results over disjoint key sets, then apply the sink once.

  Args:
    outs: sequence of ``[B, T, H, Dv]`` partial outputs (each normalized over its own keys).
    lses: sequence of ``[B, T, H]`` partial natural-log sum-exps (``-inf`` where empty).
    sinks: optional ``[H]`` sink logits.
  Returns ``(out float32, lse float32)`` equal to attention over the union of the key sets.
  """
  if len(outs) != len(lses) or not outs:
    raise ValueError(f"merge_partials needs matching non-empty lists, got {len(outs)} outputs "
                     f"and {len(lses)} LSEs")
  o, lse = outs[0].astype(f32), lses[0].astype(f32)
  for oi, li in zip(outs[1:], lses[1:]):
    o, lse = merge_two(o, lse, oi, li)
  if sinks is not None:
    o, lse = apply_sinks(o, lse, sinks)
  return o, lse


def apply_sinks(o, lse, sinks):
  """Add per-head sink logits ``sinks [H]`` to the denominator of ``(o [B,T,H,Dv], lse
  [B,T,H])``. Differentiable in all three (gradients are finite for empty rows)."""
  sink = sinks.astype(f32)[None, None, :]
  lse = lse.astype(f32)
  lse_tot = jnp.logaddexp(lse, sink)  # sink finite, so lse_tot is finite
  w = merge_weight(lse, lse_tot)
  return o.astype(f32) * w[..., None], lse_tot
