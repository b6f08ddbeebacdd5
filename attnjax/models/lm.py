"""A small pre-norm decoder-only language model assembled from :mod:`attnjax.layers`.

Architecture (Vaswani et al. 2017, "Attention Is All You Need", decoder-only with pre-norm as in
GPT-2 / Llama): token embedding -> ``num_layers`` blocks ``x += Attn(RMSNorm(x));
x += SwiGLU(RMSNorm(x))`` -> RMSNorm -> output projection (tied to the embedding table or
separate). Positions enter only through rotary embeddings inside the attention layers (RoPE, Su
et al. 2021, "RoFormer"); the MLP is SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer");
norms are RMSNorm (Zhang & Sennrich 2019). Every attention is causal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.backends.base import explicit_spec
from attnjax.layers import common
from attnjax.layers.mha import MultiHeadAttention
from attnjax.models.registry import (LM_ATTENTIONS, Dense, LMDims, lookup, model_partitioned)

# LM attentions whose layer (a MultiHeadAttention) runs context-parallel attention.
CONTEXT_PARALLEL_ATTENTIONS = ("mha", "gqa", "mqa", "gated", "sliding_window", "strided_heads",
                               "moh")


class SwiGLU(nnx.Module):
  """SwiGLU MLP (Shazeer 2020): ``(SiLU(x W_gate) * (x W_up)) W_down``, no biases; kernels
  annotated ``("embed", "mlp")`` / ``("mlp", "embed")`` (hidden units tensor-parallel)."""

  def __init__(self, d_model: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = Dense(d_model, mlp_dim, "embed", "mlp", **kw)
    self.up = Dense(d_model, mlp_dim, "embed", "mlp", **kw)
    self.down = Dense(mlp_dim, d_model, "mlp", "embed", **kw)

  def __call__(self, x):
    h = jax.nn.silu(self.gate(x, jnp.float32)) * self.up(x, jnp.float32)
    return self.down(h)


class DecoderBlock(nnx.Module):
  """``x + Attn(RMSNorm(x))`` then ``+ SwiGLU(RMSNorm(.))``. ``attn`` is built by the
  ``LM_ATTENTIONS`` entry; layers returning ``(out, aux_loss)`` (MoH) have their aux loss
  collected."""

  def __init__(self, attention: str, dims: LMDims, attention_kwargs, mlp_dim: int, *,
               rngs: nnx.Rngs):
    kw = dict(dtype=dims.dtype, param_dtype=dims.param_dtype)
    self.attn_norm = common.RMSNorm(dims.d_model, **kw)
    self.attn = LM_ATTENTIONS[attention](dims, attention_kwargs, rngs=rngs)
    self.mlp_norm = common.RMSNorm(dims.d_model, **kw)
    self.mlp = SwiGLU(dims.d_model, mlp_dim, rngs=rngs, **kw)

  def _mlp(self, x, a):
    x = x + a.astype(x.dtype)
    return x + self.mlp(self.mlp_norm(x)).astype(x.dtype)

  def __call__(self, x, *, positions=None, segment_ids=None):
    kw = {}
    if positions is not None:
      kw["positions"] = positions
    if segment_ids is not None:
      kw["segment_ids"] = segment_ids
    out = self.attn(self.attn_norm(x), **kw)
    aux = jnp.zeros((), jnp.float32)
    if isinstance(out, tuple):
      out, aux = out
      aux = jnp.asarray(aux, jnp.float32)
    return self._mlp(x, out), aux

  def decode(self, x, cache, *, num_new=None):
    out, cache = self.attn.decode(self.attn_norm(x), cache, num_new=num_new)
    return self._mlp(x, out), cache


class DecoderLM(nnx.Module):
  """Decoder-only transformer LM over ``vocab_size`` tokens.

  ``tokens int32 [B, T] -> logits float32 [B, T, vocab_size]``::

      x = E[tokens]                                         (E: [vocab, d_model])
      x = x + Attn_l(RMSNorm(x)); x = x + SwiGLU_l(RMSNorm(x))      l = 1..num_layers
      logits = RMSNorm(x) E^T   (tie_embeddings)   or   RMSNorm(x) W_out

  ``attention`` names an entry of :data:`LM_ATTENTIONS` ("mha", "gqa", "mqa", "gated",
  "sliding_window", "strided_heads", "moh", "mla"); ``attention_kwargs`` are extra constructor
  arguments of that layer (e.g. ``{"window": 128}``, ``{"stride": 4, "local_window": 16}``).
  Every attention is causal; RoPE with ``rope_theta`` (``None``: no RoPE, not for "mla") is
  applied inside the layers at ``positions`` (default ``arange(T)``). ``segment_ids [B, T]``:
  packed sequences; tokens attend only within equal ids. ``head_dim`` defaults to
  ``d_model / num_heads``; ``num_kv_heads`` is for "gqa"/"mqa" (and the gated / window / S2 /
  MoH variants, which accept it too).

  ``dtype`` is the compute dtype (activations, residual stream); parameters are
  ``param_dtype``; logits are always float32. Embedding init: normal with std
  ``d_model**-0.5`` (tied logits start at unit scale). Sharding: the embedding table is
  ``("vocab", "embed")``, the untied output kernel ``("embed", "vocab")``, MLP kernels use
  ``"mlp"``; see :mod:`attnjax.models.registry`.

  ``return_aux=True`` also returns the sum of the layers' auxiliary losses (MoH load
  balancing; 0.0 for the others), a float32 scalar to be weighted by the caller.

  Token ids must lie in ``[0, vocab_size)``. Concrete (not traced) ids outside it raise
  ``ValueError`` naming them (``__call__``, :meth:`decode` -- there only the ``num_new`` real
  tokens are checked, padding may hold anything --, and ``generate``'s prompt). Under
  ``jax.jit`` the check is impossible; there an out-of-range id (negative ones included, which
  do not wrap around) embeds as the zero vector on every path (with or without an
  explicit-axes mesh): never as some other token, and finite, so that padding slots holding
  e.g. ``-1`` leave the real tokens' results unchanged (a NaN embedding would reach them through
  masked keys, which still enter the value product with weight 0).

  Context (sequence) parallelism: :meth:`set_context_parallel` makes every attention layer run
  :func:`attnjax.parallel.context_parallel_attention` over a mesh axis. The tokens are then in
  a load-balancing layout (:func:`attnjax.parallel.load_balance_permutation` applied to the
  sequence axis of ``tokens``), ``positions`` is that permutation (static ``[T]``; default: the
  layout of ``load_balance``), and the logits come back in the same layout (the single-device
  logits permuted). Decoding ignores it.

  Incremental decoding: :meth:`init_cache` gives one cache per layer (the layer's own cache
  type: KV, ring-buffer KV for sliding windows, latent for MLA), :meth:`decode` runs the next
  tokens of each sequence and returns their logits, equal to the parallel forward's.
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               mlp_dim: int, max_len: int, attention: str = "mha", attention_kwargs=None,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               tie_embeddings: bool = True, rope_theta: float | None = 10000.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.vocab_size = common.check_int("vocab_size", vocab_size, 1)
    self.d_model = common.check_int("d_model", d_model, 1)
    self.num_layers = common.check_int("num_layers", num_layers, 1)
    self.num_heads = common.check_int("num_heads", num_heads, 1)
    self.mlp_dim = common.check_int("mlp_dim", mlp_dim, 1)
    self.max_len = common.check_int("max_len", max_len, 1)
    if num_kv_heads is not None:
      common.check_int("num_kv_heads", num_kv_heads, 1)
    if head_dim is not None:
      common.check_int("head_dim", head_dim, 1)
    self.attention = attention
    lookup(LM_ATTENTIONS, attention, "attention for DecoderLM")
    self.tie_embeddings = bool(tie_embeddings)
    self.dtype = common.canonical_dtype("dtype", dtype)
    self.param_dtype = common.canonical_dtype("param_dtype", param_dtype)
    init = model_partitioned(nnx.initializers.normal(stddev=self.d_model ** -0.5),
                             "vocab", "embed")
    self.embedding = nnx.Param(init(rngs.params(), (self.vocab_size, self.d_model),
                                    self.param_dtype))
    blocks = []
    for i in range(self.num_layers):
      dims = LMDims(self.d_model, self.num_heads, num_kv_heads, head_dim,
                    None if rope_theta is None else float(rope_theta), self.dtype,
                    self.param_dtype, layer_index=i, num_layers=self.num_layers)
      blocks.append(DecoderBlock(attention, dims, attention_kwargs, self.mlp_dim, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.final_norm = common.RMSNorm(self.d_model, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
    self.lm_head = None if self.tie_embeddings else Dense(
        self.d_model, self.vocab_size, "embed", "vocab", dtype=self.dtype,
        param_dtype=self.param_dtype, rngs=rngs)

  # ------------------------------------------------------------------------------ pieces
  def check_tokens(self, tokens, name: str = "tokens", num_new=None):
    """``ValueError`` unless ``tokens`` is an int array ``[B, T]`` whose values, when concrete
    (not traced), lie in ``[0, vocab_size)``. With ``num_new [B]`` only the first ``num_new[b]``
    tokens of each row are checked (the rest is padding), and nothing when ``num_new`` is
    traced. Returns ``tokens`` as a jax array."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"{name} must be an int array [B, T], got {tokens.dtype}{tokens.shape}")
    if num_new is not None and isinstance(num_new, jax.core.Tracer):
      return tokens
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
      vals = np.asarray(tokens)
      bad = (vals < 0) | (vals >= self.vocab_size)
      if num_new is not None:
        real = np.arange(vals.shape[1])[None, :] < np.reshape(np.asarray(num_new), (-1, 1))
        bad &= real
      if bad.any():
        where = np.argwhere(bad)
        shown = ", ".join(f"{name}[{b}, {t}]={int(vals[b, t])}" for b, t in where[:5])
        more = f" (and {len(where) - 5} more)" if len(where) > 5 else ""
        raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size}); got "
                         f"{shown}{more}")
    return tokens

  def _embed(self, tokens, num_new=None):
    tokens = self.check_tokens(tokens, num_new=num_new)
    table = self.embedding[...]
    # ids outside [0, vocab) (negative ones included: no wrap-around) all go to row V, out of
    # range, which the gather fills with zeros: the same on both paths below
    V = self.vocab_size
    ids = tokens.astype(jnp.int32)
    ids = jnp.where((ids >= 0) & (ids < V), ids, V)
    # explicit-sharding mesh: the gathered rows follow the tokens' sharding (the table's vocab
    # axis may be sharded over "tensor"; the gather then needs the output spec spelled out)
    spec = explicit_spec(ids)
    if spec is None and explicit_spec(table) is not None:
      spec = (None,) * ids.ndim   # tokens without a mesh type: replicated
    kw = {} if spec is None else {"out_sharding": jax.sharding.PartitionSpec(*spec, None)}
    return table.at[ids].get(mode="fill", fill_value=0, **kw).astype(self.dtype)

  def _logits(self, x):
    x = self.final_norm(x)
    if self.lm_head is not None:
      return self.lm_head(x, jnp.float32)
    emb = self.embedding[...].astype(self.dtype)
    return jnp.einsum("btd,vd->btv", x, emb, preferred_element_type=jnp.float32)

  # ------------------------------------------------------------------------------ parallel
  def set_context_parallel(self, mesh=None, *, axis: str = "sequence", strategy: str = "ring",
                           load_balance: str | None = "zigzag", batch_axis=None,
                           ulysses_axis: str | None = None, max_branches: int = 8):
    """Enable context parallelism in every attention layer (``mesh=None``: disable it).

    ``axis``: the mesh axis the sequence is sharded over; ``strategy``: ``"ring"``,
    ``"all_gather"``, ``"ulysses"`` or ``"usp"`` (with ``ulysses_axis``); ``load_balance``:
    the layout the token sequence is in when the call passes no ``positions``
    (``"zigzag"``, ``"striped"`` or ``None``); ``batch_axis``: mesh axis (or tuple) the batch is
    sharded over (``None``: replicated across the non-sequence axes). See
    :class:`attnjax.layers.ContextParallel`. Raises ``NotImplementedError`` for attentions
    without context-parallel support (:data:`CONTEXT_PARALLEL_ATTENTIONS`). Returns ``self``.
    """
    if mesh is None:
      for block in self.blocks:
        if isinstance(block.attn, MultiHeadAttention):
          block.attn.set_context_parallel(None)
      return self
    if self.attention not in CONTEXT_PARALLEL_ATTENTIONS or not all(
        isinstance(b.attn, MultiHeadAttention) for b in self.blocks):
      raise NotImplementedError(
          f"context (sequence) parallelism is not implemented for attention="
          f"{self.attention!r} ({type(self.blocks[0].attn).__name__}); attentions that support "
          f"it: {list(CONTEXT_PARALLEL_ATTENTIONS)}")
    from attnjax.layers.mha import ContextParallel  # pylint: disable=import-outside-toplevel
    cp = ContextParallel(mesh, axis=axis, strategy=strategy, load_balance=load_balance,
                         batch_axis=batch_axis, ulysses_axis=ulysses_axis,
                         max_branches=max_branches)
    for block in self.blocks:
      block.attn.set_context_parallel(cp)
    return self

  @property
  def context_parallel(self):
    """The layers' :class:`attnjax.layers.ContextParallel` setting, or None."""
    return getattr(self.blocks[0].attn, "context_parallel", None)

  # ------------------------------------------------------------------------------ forward
  def __call__(self, tokens, *, segment_ids=None, positions=None, return_aux: bool = False):
    """``tokens [B, T] -> logits float32 [B, T, vocab]`` (``(logits, aux_loss)`` with
    ``return_aux``). ``T`` should not exceed ``max_len`` (RoPE itself has no limit)."""
    x = self._embed(tokens)
    aux = jnp.zeros((), jnp.float32)
    for block in self.blocks:
      x, a = block(x, positions=positions, segment_ids=segment_ids)
      aux = aux + a
    logits = self._logits(x)
    return (logits, aux) if return_aux else logits

  # ------------------------------------------------------------------------------ decoding
  def _require_decodable(self):
    attn = self.blocks[0].attn
    if not (callable(getattr(attn, "init_cache", None)) and callable(getattr(attn, "decode",
                                                                             None))):
      decodable = sorted(n for n, e in LM_ATTENTIONS.items() if e.decodable)
      raise NotImplementedError(
          f"attention={self.attention!r} ({type(attn).__name__}) has no KV-cache decoding; "
          f"attentions that decode: {decodable}; use generate(..., use_cache=False)")

  def init_cache(self, batch_size: int, capacity: int, dtype=None, *, batch_axis=None):
    """Empty per-layer caches (a tuple, one per block) for ``batch_size`` sequences of up to
    ``capacity`` tokens (sliding-window layers keep a ring of ``min(window, capacity)``).
    ``dtype`` defaults to the compute dtype. ``batch_axis``: the mesh axis (or axes) the
    tokens' batch is split over (e.g. ``"data"``); each cache's batch axis is split the same
    way, so data-parallel replicas hold only their own examples' keys and values (``None``:
    replicated). Raises ``NotImplementedError`` for attentions without a KV cache."""
    self._require_decodable()
    common.check_int("capacity", capacity, 1)
    return tuple(b.attn.init_cache(batch_size, capacity, dtype=dtype, batch_axis=batch_axis)
                 for b in self.blocks)

  def decode(self, tokens, cache, *, num_new=None):
    """Run the next ``n`` tokens ``[B, n]`` of each sequence against ``cache``; returns
    ``(logits float32 [B, n, vocab], new_cache)``. Token ``t`` of example ``b`` is at position
    ``cache_length[b] + t`` (each example's cache advances independently: ragged batches).
    ``num_new [B]`` (optional, default ``n``): how many of the ``n`` tokens are real per example
    (right padding; logits at padding positions are meaningless)."""
    self._require_decodable()
    if not isinstance(cache, (tuple, list)) or len(cache) != self.num_layers:
      raise ValueError(f"cache must be the tuple of {self.num_layers} per-layer caches from "
                       f"init_cache, got {type(cache).__name__}")
    x = self._embed(tokens, num_new=num_new)
    new_cache = []
    for block, c in zip(self.blocks, cache):
      x, c = block.decode(x, c, num_new=num_new)
      new_cache.append(c)
    return self._logits(x), tuple(new_cache)


__all__ = ["DecoderLM", "DecoderBlock", "SwiGLU", "CONTEXT_PARALLEL_ATTENTIONS"]
