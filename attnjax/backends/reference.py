"""The oracle: materialized attention in float64 (when x64 is enabled), else float32 at HIGHEST
matmul precision. Written for obviousness, not speed; tests compare every backend to it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.backends import base


def _compute_dtype():
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


class ReferenceBackend(base.Backend):
  capabilities = base.Capabilities(name="reference")

  def __call__(self, p: base.Problem):
    dt = _compute_dtype()
    hi = jax.lax.Precision.HIGHEST
    B, Tq, Hq, _ = p.q.shape
    Hkv = p.k.shape[2]
    group = Hq // Hkv
    q = p.q.astype(dt)
    k = jnp.repeat(p.k.astype(dt), group, axis=2)  # query head h uses kv head h // group
    v = jnp.repeat(p.v.astype(dt), group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi) * jnp.asarray(p.scale, dt)
    q_pos, kv_pos = p.positions()
    heads = np.arange(Hq)
    if p.score_mod is not None:
      b_idx, h_idx, qi, kj = base.index_grids(p, q_pos, kv_pos, heads)
      mod = p.score_mod.bind(s.shape, b_idx.shape, h_idx.shape, qi.shape, kj.shape, dtype=dt)
      s = mod(s, b_idx, h_idx, qi, kj)
    vis = jnp.broadcast_to(base.visibility(p, q_pos, kv_pos, heads), s.shape)
    s = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    if p.sinks is not None:
      sink = jnp.broadcast_to(p.sinks.astype(dt)[None, :, None], m.shape)
      m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.exp(s - m[..., None])  # exactly 0 where masked
    denom = jnp.sum(e, axis=-1)
    if p.sinks is not None:
      denom = denom + jnp.exp(sink - m)
    safe = jnp.where(denom > 0, denom, 1.0)
    probs = e / safe[..., None]
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=hi)
    lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)
    out = out.astype(p.q.dtype)
    if p.return_lse:
      return out, jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)
    return out
