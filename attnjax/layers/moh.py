"""Mixture-of-Head attention (MoH).

Paper: Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head Attention"
(reference code: github.com/SkyworkAI/MoH).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.layers import common
from attnjax.layers.mha import MultiHeadAttention


def moh_gates(logits_shared, logits_routed, logits_mix, top_k: int):
  """MoH head gates and routing statistics from router logits (float32).

  ``logits_shared [..., h_s]``, ``logits_routed [..., h_r]``, ``logits_mix [..., 2]``::

      g_s = h_s * softmax(logits_shared)                       (shared heads, always on)
      p   = softmax(logits_routed);  m = top-k indicator of p  (ties: lower head index)
      g_r = k * (p * m) / sum(p * m)                           (routed heads)
      [a_1, a_2] = 2 * softmax(logits_mix)
      gates = concat(a_1 * g_s, a_2 * g_r)                     [..., h_s + h_r]

  With only shared heads ``gates = g_s``; with only routed heads ``gates = g_r``.
  Returns ``(gates, p, m)``."""
  hs = 0 if logits_shared is None else logits_shared.shape[-1]
  hr = 0 if logits_routed is None else logits_routed.shape[-1]
  parts, p, m = [], None, None
  if hs:
    g_s = hs * jax.nn.softmax(logits_shared.astype(jnp.float32), axis=-1)
  if hr:
    p = jax.nn.softmax(logits_routed.astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(p, top_k)
    m = jnp.sum(jax.nn.one_hot(idx, hr, dtype=jnp.float32), axis=-2)
    pm = p * m
    g_r = top_k * pm / jnp.sum(pm, axis=-1, keepdims=True)
  if hs and hr:
    a = 2.0 * jax.nn.softmax(logits_mix.astype(jnp.float32), axis=-1)
    parts = [a[..., :1] * g_s, a[..., 1:] * g_r]
  elif hs:
    parts = [g_s]
  else:
    parts = [g_r]
  return jnp.concatenate(parts, axis=-1), p, m


def load_balance_loss(p, m, token_mask=None):
  """``L_aux = h_r**2 * mean_i(P_i * f_i)`` over routed heads ``i`` (MoH reference code),
  where ``P_i`` is the mean routing probability of head ``i`` and ``f_i`` the fraction of
  tokens that selected it, both averaged over the tokens with ``token_mask`` (default all)."""
  hr = p.shape[-1]
  p = p.reshape(-1, hr)
  m = m.reshape(-1, hr)
  if token_mask is None:
    w = jnp.ones((p.shape[0],), jnp.float32)
  else:
    w = jnp.asarray(token_mask, jnp.float32).reshape(-1)
  n = jnp.maximum(jnp.sum(w), 1.0)
  P = jnp.sum(p * w[:, None], axis=0) / n
  f = jnp.sum(m * w[:, None], axis=0) / n
  return hr * hr * jnp.mean(P * f)


class MixtureOfHeadsAttention(MultiHeadAttention):
  """Mixture-of-Head attention (Jin et al. 2024): multi-head attention in summation form,
  ``out = sum_i g_i(x_t) head_i(x_t) W_O^i``, where the first ``num_shared_heads`` heads are
  always active and each token activates the ``top_k`` of the remaining ``h_r`` routed heads.

  The gates ``g`` are computed per query token from the layer input ``x`` by three bias-free
  routers ``W_s: C -> h_s``, ``W_r: C -> h_r``, ``W_h: C -> 2`` as in :func:`moh_gates`
  (weighted, not plain, summation); inactive heads get gate 0. ``__call__`` returns
  ``(out, aux_loss)`` with the load-balancing loss of :func:`load_balance_loss` over routed
  heads (0 without routed heads); add ``aux_weight * aux_loss`` to the training loss.

  This implementation computes every head densely and multiplies by the gates (the reference
  code does the same); the saving of skipping inactive heads needs a head-gather kernel.
  With ``top_k = h_r`` and routers giving uniform probabilities (e.g. zero router weights) all
  gates equal 1 and the layer is plain multi-head attention. All
  :class:`MultiHeadAttention` options apply (GQA, causal, masks, RoPE, decoding).
  """

  def __init__(self, num_heads: int, in_features: int, *, num_shared_heads: int, top_k: int,
               rngs: nnx.Rngs, **kwargs):
    H = common.check_int("num_heads", num_heads, 1)
    hs = common.check_int("num_shared_heads", num_shared_heads, 0)
    if hs > H:
      raise ValueError(f"num_shared_heads={hs} must be <= num_heads={H}")
    hr = H - hs
    if hr:
      k = common.check_int("top_k", top_k, 1)
      if k > hr:
        raise ValueError(f"top_k={k} must be <= the number of routed heads "
                         f"num_heads - num_shared_heads = {hr}")
    else:
      k = 0
    self.num_shared_heads, self.num_routed_heads, self.top_k = hs, hr, k
    super().__init__(num_heads, in_features, rngs=rngs, **kwargs)
    proj = dict(dtype=jnp.float32, param_dtype=self.param_dtype, rngs=rngs)
    C = self.in_features
    self.router_shared = common.Projection((C,), (hs,), ("embed",), ("router",), **proj) \
        if hs else None
    self.router_routed = common.Projection((C,), (hr,), ("embed",), ("router",), **proj) \
        if hr else None
    self.router_mix = common.Projection((C,), (2,), ("embed",), ("router",), **proj) \
        if hs and hr else None

  def gates(self, x):
    """``(gates [B, T, H], p, m)``: head gates, routed probabilities and top-k indicators
    (``p``/``m`` are None without routed heads). Routers run in float32."""
    ls = self.router_shared(x) if self.router_shared is not None else None
    lr = self.router_routed(x) if self.router_routed is not None else None
    lm = self.router_mix(x) if self.router_mix is not None else None
    return moh_gates(ls, lr, lm, self.top_k)

  def __call__(self, x, kv=None, *, token_mask=None, **kwargs):
    """Like :meth:`MultiHeadAttention.__call__`; returns ``(out, aux_loss)``. ``token_mask
    [B, T]`` (optional) excludes padding tokens from the load-balancing statistics."""
    g, p, m = self.gates(x)
    y = self.heads(x, kv, **kwargs)
    out = self.finish(x, y, head_weights=g)
    aux = load_balance_loss(p, m, token_mask) if p is not None else jnp.zeros((), jnp.float32)
    return out, aux

  def decode(self, x, cache: common.KVCache, **kwargs):
    """Incremental call as :meth:`MultiHeadAttention.decode`; returns ``(out, new_cache)``."""
    g, _, _ = self.gates(x)
    y, new_cache = self.decode_heads(x, cache, **kwargs)
    return self.finish(x, y, head_weights=g), new_cache


__all__ = ["MixtureOfHeadsAttention", "moh_gates", "load_balance_loss"]
