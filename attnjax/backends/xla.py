"""Dense attention in plain jnp: one einsum for the logits, a masked float32 softmax (float64
for float64 inputs), one einsum for the output. GQA without repeating K/V. The fast choice for
short sequences; memory grows as ``B * H * Tq * Tk``. Gradients come from JAX autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax.backends import base


class XlaBackend(base.Backend):
  capabilities = base.Capabilities(name="xla")

  def __call__(self, p: base.Problem):
    B, Tq, Hq, D = p.q.shape
    Tk, Hkv = p.k.shape[1], p.k.shape[2]
    G = Hq // Hkv
    Dv = p.v.shape[-1]
    f32 = base.accumulation_dtype(p.q.dtype)   # float64 for float64 inputs
    # 4-D batched matmuls: rows of a key/value head run over (g, q), so [Hkv, G*Tq] reshapes
    # for free to [Hq, Tq] (query head h = kv_head * G + g) and K/V are never repeated.
    q = (p.q.astype(f32) * p.scale).astype(p.q.dtype)
    q = q.reshape(B, Tq, Hkv, G, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tq, D)
    k = p.k.transpose(0, 2, 3, 1)                      # [B, Hkv, D, Tk]
    v = p.v.transpose(0, 2, 1, 3)                      # [B, Hkv, Tk, Dv]
    s = jnp.einsum("bhqd,bhdk->bhqk", q, k, preferred_element_type=f32).reshape(B, Hq, Tq, Tk)
    q_pos, kv_pos = p.positions()
    heads = np.arange(Hq)
    if p.score_mod is not None:
      b_idx, h_idx, qi, kj = base.index_grids(p, q_pos, kv_pos, heads)
      mod = p.score_mod.bind(s.shape, b_idx.shape, h_idx.shape, qi.shape, kj.shape, dtype=f32)
      s = mod(s, b_idx, h_idx, qi, kj)
    if not isinstance(p.mask, masks_lib.Full) or p.q_segment_ids is not None:
      s = jnp.where(base.visibility(p, q_pos, kv_pos, heads), s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    if p.sinks is not None:
      sink = jnp.broadcast_to(p.sinks.astype(f32)[None, :, None], m.shape)
      m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.exp(s - m[..., None])
    denom = jnp.sum(e, axis=-1)
    if p.sinks is not None:
      denom = denom + jnp.exp(sink - m)
    safe = jnp.where(denom > 0, denom, 1.0)
    e = e.astype(p.v.dtype).reshape(B, Hkv, G * Tq, Tk)
    out = jnp.einsum("bhqk,bhkd->bhqd", e, v, preferred_element_type=f32)
    out = out.reshape(B, Hq, Tq, Dv) / safe[..., None]   # normalize after the PV product
    out = out.transpose(0, 2, 1, 3).astype(p.q.dtype)
    if p.return_lse:
      lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)
      return out, jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)
    return out
