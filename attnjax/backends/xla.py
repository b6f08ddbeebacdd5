"""Dense attention in plain jnp: one einsum for the logits, a masked float32 softmax, one einsum
for the output. GQA without repeating K/V. The fast choice for short sequences; memory grows as
``B * H * Tq * Tk``. Gradients come from JAX autodiff."""

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
    f32 = jnp.float32
    q = p.q.reshape(B, Tq, Hkv, G, D)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, p.k, preferred_element_type=f32)
    s = (s * p.scale).reshape(B, Hq, Tq, Tk)
    q_pos, kv_pos = p.positions()
    heads = np.arange(Hq)
    if p.score_mod is not None:
      b_idx, h_idx, qi, kj = base.index_grids(p, q_pos, kv_pos, heads)
      mod = p.score_mod.bind(s.shape, b_idx.shape, h_idx.shape, qi.shape, kj.shape, dtype=f32)
      s = mod(s, b_idx, h_idx, qi, kj)
    masked = not isinstance(p.mask, masks_lib.Full) or p.q_segment_ids is not None
    if masked:
      vis = base.visibility(p, q_pos, kv_pos, heads)
      s = jnp.where(vis, s, -jnp.inf)
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
    probs = (e / safe[..., None]).astype(p.v.dtype).reshape(B, Hkv, G, Tq, Tk)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, p.v, preferred_element_type=f32)
    out = out.reshape(B, Tq, Hq, p.v.shape[-1]).astype(p.q.dtype)
    if p.return_lse:
      lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)
      return out, jnp.transpose(lse, (0, 2, 1))
    return out
