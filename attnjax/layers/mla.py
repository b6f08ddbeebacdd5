"""Multi-head latent attention (MLA).

Papers: DeepSeek-AI 2024, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts
Language Model" (section 2.1: low-rank key-value joint compression, decoupled RoPE); Meng et al.
2025, "TransMLA: Multi-head Latent Attention Is All You Need" (GQA expressed as MLA).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax import masks as masks_lib
from attnjax import scores as scores_lib
from attnjax.layers import common


class MultiHeadLatentAttention(nnx.Module):
  """DeepSeek-V2 multi-head latent attention with decoupled RoPE.

  For ``h [B, T, C]`` at positions ``p``, with ``n`` heads, latent width ``d_c``
  (``kv_lora_rank``), per-head content dim ``d_h`` (``qk_nope_head_dim``), RoPE dim ``d_R``
  (``qk_rope_head_dim``) and value dim ``d_v``::

      c_KV = RMSNorm(h W_DKV)                          [B, T, d_c]   (cached)
      k_R  = RoPE(h W_KR, p)                           [B, T, d_R]   (cached, shared by heads)
      c_Q  = RMSNorm(h W_DQ)  if q_lora_rank else h    [B, T, d_c']
      q_C,i = c_Q W_UQ^i ;  q_R,i = RoPE(c_Q W_QR^i, p)             (per head i)
      k_C,i = c_KV W_UK^i ; v_i = c_KV W_UV^i
      score_i(t, s) = (q_C,i(t) . k_C,i(s) + q_R,i(t) . k_R(s)) / sqrt(d_h + d_R)
      o_i = softmax(score_i + score_mod, mask, sinks) v_i ;  out = concat_i(o_i) W_O

  Two mathematically equal ways to compute it (``absorb``):

  * unabsorbed: materialize per-head keys ``[k_C,i ; k_R]`` and values ``v_i`` and run
    multi-head attention with head dims ``d_h + d_R`` / ``d_v``;
  * absorbed (DeepSeek's inference form): fold ``W_UK^i`` into the query,
    ``q~_i = W_UK^i q_C,i`` (``d_c`` wide), and attend with the query ``[q~_i ; q_R,i]`` to the
    single shared key ``[c_KV ; k_R]`` and value ``c_KV`` — multi-query attention over the
    latent, key dim ``d_c + d_R``, value dim ``d_c`` — then apply ``W_UV^i`` to the output.

  The KV cache (:meth:`init_cache`, :meth:`decode`) stores only ``c_KV`` and ``k_R``
  (``d_c + d_R`` numbers per token, independent of ``n``) in both forms; the unabsorbed form
  up-projects the cached latent at every step. RoPE uses the rotate-half layout
  (:func:`attnjax.layers.common.apply_rope`). Masks (``causal``, ``window``, ``mask``), score
  mods and sinks act on ``score_i`` as in :class:`attnjax.layers.mha.MultiHeadAttention`; as
  there, the constructor's ``score_mod`` arrays are ``nnx.Param`` (trained) unless
  ``score_mod_trainable=False`` stores them as constants. ``v_head_dim`` / ``out_features``
  default (``None``) to ``qk_nope_head_dim`` / ``in_features``; given, they must be >= 1.
  """

  def __init__(self, num_heads: int, in_features: int, *, kv_lora_rank: int,
               qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int | None = None,
               q_lora_rank: int | None = None, out_features: int | None = None,
               causal: bool = True, window: int | None = None,
               mask: masks_lib.Mask | None = None, score_mod: scores_lib.ScoreMod | None = None,
               sinks: bool = False, rope_theta: float = 10000.0, absorb: bool = False,
               norm_eps: float = 1e-6, dtype="float32", param_dtype="float32",
               impl: str = "auto", score_mod_trainable: bool = True, rngs: nnx.Rngs):
    self.num_heads = H = common.check_int("num_heads", num_heads, 1)
    self.in_features = C = common.check_int("in_features", in_features, 1)
    self.kv_lora_rank = dc = common.check_int("kv_lora_rank", kv_lora_rank, 1)
    self.qk_nope_head_dim = dn = common.check_int("qk_nope_head_dim", qk_nope_head_dim, 1)
    self.qk_rope_head_dim = dr = common.check_int("qk_rope_head_dim", qk_rope_head_dim, 2)
    if dr % 2:
      raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {dr}")
    self.v_head_dim = dv = common.check_int("v_head_dim", dn if v_head_dim is None else
                                            v_head_dim, 1)
    self.q_lora_rank = None if q_lora_rank is None else common.check_int("q_lora_rank",
                                                                         q_lora_rank, 1)
    self.out_features = common.check_int("out_features", C if out_features is None else
                                         out_features, 1)
    self.causal = bool(causal)
    self.window = None if window is None else common.check_int("window", window, 1)
    if mask is not None and not isinstance(mask, masks_lib.Mask):
      raise ValueError(f"mask must be an attnjax.masks.Mask or None, got {type(mask).__name__}")
    self.mask = mask
    if score_mod is not None and not isinstance(score_mod, scores_lib.ScoreMod):
      raise ValueError(f"score_mod must be an attnjax.scores.ScoreMod or None, got "
                       f"{type(score_mod).__name__}")
    self.score_mod_trainable = common.check_bool("score_mod_trainable", score_mod_trainable)
    self.stored_score_mod = None if score_mod is None else common.StoredScoreMod(
        score_mod, trainable=self.score_mod_trainable)
    self.rope_theta = float(rope_theta)
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta must be > 0, got {rope_theta}")
    if absorb not in (True, False):
      raise ValueError(f"absorb must be True or False, got {absorb!r}")
    self.absorb = bool(absorb)
    self.dtype = common.canonical_dtype("dtype", dtype)
    self.param_dtype = common.canonical_dtype("param_dtype", param_dtype)
    self.impl = common.check_impl(impl)
    self.scale = 1.0 / math.sqrt(dn + dr)

    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
    norm = dict(eps=norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.q_lora_rank is None:
      self.wq = common.Projection((C,), (H, dn + dr), ("embed",), ("heads", "head_dim"), **proj)
    else:
      self.wq_a = common.Projection((C,), (self.q_lora_rank,), ("embed",), ("latent",), **proj)
      self.q_norm = common.RMSNorm(self.q_lora_rank, **norm)
      self.wq_b = common.Projection((self.q_lora_rank,), (H, dn + dr), ("latent",),
                                    ("heads", "head_dim"), **proj)
    self.wkv_a = common.Projection((C,), (dc + dr,), ("embed",), ("latent",), **proj)
    self.kv_norm = common.RMSNorm(dc, **norm)
    self.w_uk = common.Projection((dc,), (H, dn), ("latent",), ("heads", "head_dim"), **proj)
    self.w_uv = common.Projection((dc,), (H, dv), ("latent",), ("heads", "head_dim"), **proj)
    self.wo = common.Projection((H, dv), (self.out_features,), ("heads", "head_dim"),
                                ("embed",), **proj)
    if sinks:
      init = common.partitioned(nnx.initializers.zeros_init(), "heads")
      self.sinks = nnx.Param(init(rngs.params(), (H,), self.param_dtype))
    else:
      self.sinks = None

  # ------------------------------------------------------------------------------ pieces
  @property
  def score_mod(self) -> scores_lib.ScoreMod | None:
    """The constructor's score mod, rebuilt from the layer's current parameter values."""
    return None if self.stored_score_mod is None else self.stored_score_mod.get()

  @property
  def window_left(self) -> int | None:
    return None if self.window is None else self.window - 1

  def layer_mask(self):
    base = None
    if self.window is not None:
      left = self.window - 1
      base = masks_lib.sliding_window(left, 0 if self.causal else left)
    elif self.causal:
      base = masks_lib.causal()
    return common.combine_masks(base, self.mask)

  def _attention_kwargs(self, mask, score_mod, bias, sinks):
    if mask is not None and not isinstance(mask, masks_lib.Mask):
      raise ValueError(f"mask must be an attnjax.masks.Mask or None, got {type(mask).__name__}")
    mods = [m for m in (self.score_mod, score_mod) if m is not None]
    if sinks is not None and self.sinks is not None:
      raise ValueError("sinks: this layer has learned sinks (sinks=True); do not also pass "
                       "sinks at call time")
    sink_vals = self.sinks[...] if self.sinks is not None else sinks
    return dict(mask=common.combine_masks(self.layer_mask(), mask),
                score_mod=scores_lib.chain(*mods) if mods else None, bias=bias,
                sinks=None if sink_vals is None else jnp.asarray(sink_vals, jnp.float32),
                impl=self.impl, scale=self.scale)

  def queries(self, x, positions):
    """``(q_C [B, T, H, d_h], q_R [B, T, H, d_R])`` with RoPE applied to ``q_R``."""
    if self.q_lora_rank is None:
      q = self.wq(x)
    else:
      q = self.wq_b(self.q_norm(self.wq_a(x)))
    dn = self.qk_nope_head_dim
    return q[..., :dn], common.apply_rope(q[..., dn:], positions, self.rope_theta)

  def latents(self, x, positions):
    """``(c_KV [B, T, d_c], k_R [B, T, d_R])``: the cached quantities."""
    kv = self.wkv_a(x)
    dc = self.kv_lora_rank
    c = self.kv_norm(kv[..., :dc])
    k_r = common.apply_rope(kv[..., None, dc:], positions, self.rope_theta)[..., 0, :]
    return c, k_r

  def _attend(self, q_c, q_r, c, k_r, absorb, attn_kw):
    """Per-head outputs ``[B, T, H, d_v]`` from queries and (cached) latents."""
    dt = self.dtype
    c, k_r = c.astype(dt), k_r.astype(dt)
    H = self.num_heads
    if absorb:
      w_uk = self.w_uk.kernel[...].astype(dt)  # [d_c, H, d_h]
      q_lat = jnp.einsum("bthn,chn->bthc", q_c, w_uk,
                         preferred_element_type=jnp.float32).astype(dt)
      q = jnp.concatenate([q_lat, q_r], axis=-1)                    # [B, T, H, d_c + d_R]
      k = jnp.concatenate([c, k_r], axis=-1)[:, :, None, :]          # [B, S, 1, d_c + d_R]
      v = c[:, :, None, :]                                           # [B, S, 1, d_c]
      o_lat = common.attend(q, k, v, **attn_kw)                      # [B, T, H, d_c]
      w_uv = self.w_uv.kernel[...].astype(dt)                        # [d_c, H, d_v]
      return jnp.einsum("bthc,chv->bthv", o_lat, w_uv,
                        preferred_element_type=jnp.float32).astype(dt)
    k_c = self.w_uk(c)                                               # [B, S, H, d_h]
    S = c.shape[1]
    k_r = jnp.broadcast_to(k_r[:, :, None, :], (c.shape[0], S, H, k_r.shape[-1]))
    k = jnp.concatenate([k_c, common.match_sharding(k_r, k_c)], -1)
    v = self.w_uv(c)
    q = jnp.concatenate([q_c, q_r], axis=-1)
    return common.attend(q, k, v, **attn_kw)

  # ------------------------------------------------------------------------------ forward
  def __call__(self, x, *, positions=None, segment_ids=None, mask=None, score_mod=None,
               bias=None, sinks=None, absorb: bool | None = None):
    """Parallel forward of self attention ``x [B, T, in_features] -> [B, T, out_features]``.
    ``absorb`` overrides the constructor's choice of form (both give the same result)."""
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must be [B, T, in_features={self.in_features}], got {x.shape}")
    B, T = x.shape[:2]
    explicit = positions is not None
    pos = common.default_positions(positions, B, T) if explicit else np.arange(T,
                                                                                dtype=np.int32)
    q_c, q_r = self.queries(x, pos)
    c, k_r = self.latents(x, pos)
    kw = self._attention_kwargs(mask, score_mod, bias, sinks)
    if explicit:
      kw.update(q_positions=pos, kv_positions=pos)
    if segment_ids is not None:
      kw.update(segment_ids=segment_ids, kv_segment_ids=segment_ids)
    y = self._attend(q_c, q_r, c, k_r, self.absorb if absorb is None else bool(absorb), kw)
    return self.wo(y)

  # ------------------------------------------------------------------------------ decoding
  def init_cache(self, batch_size: int, max_length: int, *, dtype=None,
                 batch_axis=None) -> common.LatentKVCache:
    """Empty latent cache (``d_c + d_R`` values per token; a ring of ``window`` slots when the
    layer has a window).
    ``batch_axis``: the mesh axis (or axes) the decoded batch is split over, e.g. ``"data"``;
    the cache's batch axis is then split the same way (see
    :func:`attnjax.layers.common.shard_cache_batch`). ``None``: batch axis replicated."""
    if not self.causal:
      raise ValueError("decoding with a KV cache needs causal=True (allowed: causal self "
                       "attention); this layer has causal=False")
    common.check_int("max_length", max_length, 1)
    cap = max_length if self.window is None else min(max_length, self.window)
    dt = self.dtype if dtype is None else common.canonical_dtype("dtype", dtype)
    return common.shard_cache_batch(
        common.LatentKVCache.create(batch_size, cap, self.kv_lora_rank, self.qk_rope_head_dim,
                                    dt), batch_axis)

  def decode(self, x, cache: common.LatentKVCache, *, num_new=None, mask=None, score_mod=None,
             sinks=None, absorb: bool | None = None):
    """Incremental causal call (prefill or decode step); see
    :meth:`attnjax.layers.mha.MultiHeadAttention.decode` (``num_new`` in ``[0, T]``; the same
    ``ValueError`` checks of the cache's shapes and capacity). Default form is absorbed.
    Returns ``(out, new_cache)``."""
    if not self.causal:
      raise ValueError("decoding with a KV cache needs causal=True (allowed: causal self "
                       "attention); this layer has causal=False")
    if not isinstance(cache, common.LatentKVCache):
      raise ValueError(f"cache must be a LatentKVCache (from init_cache), got "
                       f"{type(cache).__name__}")
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must be [B, T, in_features={self.in_features}], got {x.shape}")
    B, T = x.shape[:2]
    dc, dr = self.kv_lora_rank, self.qk_rope_head_dim
    common.check_cache_shapes(
        f"{type(self).__name__}.decode", cache,
        dict(latent=(B, "S", dc), k_rope=(B, "S", dr), pos=(B, "S"), length=(B,)),
        f"x has batch {B} and the layer has kv_lora_rank={dc}, qk_rope_head_dim={dr}; create "
        f"the cache with this layer's init_cache(batch_size={B}, max_length)")
    pos = jnp.asarray(cache.length, jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)
    q_c, q_r = self.queries(x, pos)
    c, k_r = self.latents(x, pos)
    step = common.cache_step((cache.latent, cache.k_rope), (c, k_r), cache.pos, cache.length,
                             num_new, self.window_left)
    kw = self._attention_kwargs(mask, score_mod, None, sinks)
    kw.update(q_positions=step.q_positions, kv_positions=step.kv_positions,
              segment_ids=step.q_segment_ids, kv_segment_ids=step.kv_segment_ids)
    y = self._attend(q_c, q_r, step.attn[0], step.attn[1], True if absorb is None else
                     bool(absorb), kw)
    new_cache = common.LatentKVCache(step.buffers[0], step.buffers[1], step.pos, step.length)
    return self.wo(y), new_cache


__all__ = ["MultiHeadLatentAttention"]
