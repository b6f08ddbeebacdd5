"""Multi-head attention (MHA / GQA / MQA) with RoPE, QK-norm, output gating, sinks, sliding
windows and KV-cache decoding, on top of :func:`attnjax.attention`.

Papers: Vaswani et al. 2017 "Attention Is All You Need" (MHA); Shazeer 2019 "Fast Transformer
Decoding" (MQA); Ainslie et al. 2023 "GQA"; Su et al. 2021 "RoFormer" (RoPE); Henry et al. 2020 /
Dehghani et al. 2023 (QK-norm); Qiu et al. 2025 "Gated Attention for Large Language Models:
Non-linearity, Sparsity, and Attention-Sink-Free" (output gate G1); Beltagy et al. 2020 /
Jiang et al. 2023 (sliding-window attention, Longformer / Mistral); Xiao et al. 2024 /
OpenAI gpt-oss (attention sinks as learned softmax logits).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax import masks as masks_lib
from attnjax import scores as scores_lib
from attnjax.layers import common

GATES = (None, "headwise", "elementwise")
CP_LOAD_BALANCE = (None, "contiguous", "zigzag", "striped")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """Context-parallel setting of an attention layer (see
  :meth:`MultiHeadAttention.set_context_parallel`).

  ``mesh``: the :class:`jax.sharding.Mesh`; ``axis``: the mesh axis the sequence is sharded
  over (for ``strategy="usp"`` the ring axis); ``strategy``: one of
  :data:`attnjax.parallel.STRATEGIES`; ``load_balance``: the layout the tokens are in when the
  call gives no ``positions`` (``None``/``"contiguous"``, ``"zigzag"``, ``"striped"``, with
  ``num_shards`` = size of ``axis``); ``batch_axis``: mesh axis (or tuple) the batch dimension
  is sharded over (``None``: replicated); ``ulysses_axis``: the head all-to-all axis of
  ``"usp"``; ``max_branches``: see :func:`attnjax.parallel.context_parallel_attention`.
  Immutable and hashable (it is static model structure)."""
  mesh: Any
  axis: str = "sequence"
  strategy: str = "ring"
  load_balance: str | None = None
  batch_axis: Any = None
  ulysses_axis: str | None = None
  max_branches: int = 8

  def __post_init__(self):
    from attnjax.parallel import STRATEGIES  # pylint: disable=import-outside-toplevel
    if not isinstance(self.mesh, jax.sharding.Mesh):
      raise ValueError(f"context parallelism needs a jax.sharding.Mesh, got "
                       f"{type(self.mesh).__name__}")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"unknown context-parallel strategy {self.strategy!r}; choose one of "
                       f"{STRATEGIES}")
    if self.load_balance not in CP_LOAD_BALANCE:
      raise ValueError(f"unknown load_balance {self.load_balance!r}; choose one of "
                       f"{CP_LOAD_BALANCE}")
    if isinstance(self.batch_axis, list):
      object.__setattr__(self, "batch_axis", tuple(self.batch_axis))
    names = tuple(self.mesh.axis_names)
    for role, a in (("axis", self.axis), ("ulysses_axis", self.ulysses_axis)):
      if a is not None and a not in names:
        raise ValueError(f"context parallelism: {role} {a!r} is not an axis of the mesh "
                         f"(mesh axes: {names})")

  @property
  def num_shards(self) -> int:
    """Size of ``axis`` (the ring / all-gather axis)."""
    return int(self.mesh.shape[self.axis])

  def layout(self, seq_len: int) -> np.ndarray:
    """Global positions ``[seq_len]`` of the tokens laid out by ``load_balance``."""
    from attnjax.parallel import load_balance_permutation  # pylint: disable=import-outside-toplevel
    # num_shards = size of ``axis`` (also for "usp"), as context_parallel_attention's own
    # load_balance= argument
    return np.asarray(load_balance_permutation(seq_len, self.num_shards, self.load_balance),
                      np.int32)


class MultiHeadAttention(nnx.Module):
  """Multi-head attention; grouped-query / multi-query through ``num_kv_heads``.

  For an input ``x [B, T, C]`` (and, for cross attention, a memory ``m [B, M, C_kv]``)::

      q = x W_q                      [B, T, H,   D]
      k = src W_k,  v = src W_v      [B, S, Hkv, D] / [B, S, Hkv, Dv]   (src = x or m)
      q, k = RMSNorm_D(q), RMSNorm_D(k)            if qk_norm (scale [D] shared by heads)
      q, k = RoPE(q, pos_q), RoPE(k, pos_k)        if rope_theta is not None
      y_h = softmax(scale * q_h k_{g(h)}^T + score_mod, mask, sinks) v_{g(h)}
            (g(h) = h // (H / Hkv); via attnjax.attention, scale = 1/sqrt(D))
      y = y * sigmoid(x W_g + b_g)                 if gate (G1 of Qiu et al. 2025)
      out = concat_h(y_h) W_o                      [B, T, out_features]

  The gate is computed from the layer's query input ``x`` (the normalized hidden state in a
  pre-norm block): ``gate="headwise"`` gives one scalar per head (``W_g: C -> H``, broadcast
  over the head dimension), ``gate="elementwise"`` one value per output element
  (``W_g: C -> H * Dv``); it multiplies the attention output after SDPA and before ``W_o``.
  ``W_g`` is a separate projection (the paper's reference code fuses it into ``q_proj``
  per KV group; load such weights by splitting that kernel).

  Masking. Positions: query token ``t`` sits at ``positions[t]`` (default ``t``), key ``s`` at
  ``kv_positions[s]`` (default ``s``; for self attention the query positions). ``causal=True``:
  key position ``j`` is visible from query position ``i`` iff ``j <= i`` — for cross attention
  this is CAB's causal cross attention with top-left alignment (query ``i`` sees memory
  ``0..i``). ``window=W``: causal ``i - W < j <= i`` (Mistral; ``W`` keys including the query
  itself), non-causal ``|i - j| < W``. ``mask`` (an :class:`attnjax.masks.Mask`) is AND-ed
  with these, as is a call-time ``mask``. ``score_mod`` (constructor and call time, chained)
  and ``bias`` modify the logits; ``sinks=True`` adds learned per-head sink logits joining the
  softmax denominator (a call-time ``sinks [H]`` array is used when the layer has none).

  The constructor's ``score_mod`` is layer state: its arrays (ALiBi slopes, relative-bias
  tables, low-rank factors) are stored as ``nnx.Param`` and trained by ``nnx.grad`` /
  ``nnx.Optimizer(wrt=nnx.Param)`` like the other weights (gradients equal those
  ``attnjax.attention`` gives the same mod); ``score_mod_trainable=False`` stores them as
  constants (:class:`attnjax.layers.common.ScoreModConstant`), e.g. for ALiBi's fixed
  geometric slopes. Arrays captured by a :func:`attnjax.scores.from_function` closure stay
  constants either way (see :class:`attnjax.layers.common.StoredScoreMod`).

  Decoding: :meth:`init_cache` and :meth:`decode` (causal self attention), with per-example
  cache lengths. With ``window`` the cache is a ring buffer of ``W`` slots, so its memory is
  bounded by the window, and a call may pass any number of tokens; without, ``max_length``
  must cover every token of a sequence: a call with more new tokens than the cache holds
  (and no ``num_new``: all real) raises ``ValueError`` (a shape fact, also under jit), and so
  does an eager call whose cache
  length plus ``num_new`` exceeds it; under jit that overflow cannot be reported (the oldest
  slots are overwritten), so staying within ``max_length`` is the caller's contract.
  Cross attention decodes by projecting the memory once (:meth:`project_memory`) and passing
  the result as ``kv`` with the new tokens' ``positions``.

  Context parallelism: :meth:`set_context_parallel` makes the parallel self-attention forward
  run :func:`attnjax.parallel.context_parallel_attention` over a mesh axis (the sequence of
  ``x`` sharded over it, tokens in a load-balancing layout at static global ``positions``);
  layer masks, learned or call-time sinks and ``segment_ids`` carry over, cross attention,
  ``score_mod`` and ``bias`` raise ``NotImplementedError``; decoding ignores it.

  Parameters are ``param_dtype`` (float32); projections and attention run in ``dtype``
  (float32 or bfloat16); the output has ``dtype``. Kernels carry sharding annotations whose
  head axes map to the ``"tensor"`` mesh axis (:data:`attnjax.layers.common.AXIS_RULES`).
  Key/value heads (``"kv_heads"``) are replicated instead when ``num_kv_heads == 1`` or when
  the mesh active at construction (``jax.set_mesh``) splits ``"kv_heads"`` over a number of
  devices that does not divide ``num_kv_heads`` (e.g. 2 KV heads, tensor axis of 4): every
  device then holds all KV heads, the usual practice when the tensor-parallel degree exceeds
  the KV-head count, while the query heads stay split. Replication is chosen over an error
  because the mesh is known exactly there and the result is the same computation. A layer
  built without a mesh keeps the ``"kv_heads"`` annotation; whoever applies it on a mesh must
  replicate non-divisible dimensions, as :func:`attnjax.training.mesh.param_shardings` does.
  Under an explicit-axes mesh the KV cache is sharded like the keys/values (:meth:`init_cache`)
  and decoding works as the parallel forward does.
  """

  def __init__(self, num_heads: int, in_features: int, *, head_dim: int | None = None,
               num_kv_heads: int | None = None, v_head_dim: int | None = None,
               in_kv_features: int | None = None, out_features: int | None = None,
               causal: bool = False, window: int | None = None,
               mask: masks_lib.Mask | None = None, score_mod: scores_lib.ScoreMod | None = None,
               sinks: bool = False, rope_theta: float | None = None, qk_norm: bool = False,
               gate: str | None = None, use_bias: bool = False, out_bias: bool = False,
               dtype="float32", param_dtype="float32", impl: str = "auto",
               score_mod_trainable: bool = True, rngs: nnx.Rngs):
    self.num_heads = common.check_int("num_heads", num_heads, 1)
    self.in_features = common.check_int("in_features", in_features, 1)
    if head_dim is None:
      common.check_divisible("in_features", self.in_features, "num_heads", self.num_heads)
      head_dim = self.in_features // self.num_heads
    self.head_dim = common.check_int("head_dim", head_dim, 1)
    self.num_kv_heads = common.check_int(
        "num_kv_heads", self.num_heads if num_kv_heads is None else num_kv_heads, 1)
    if self.num_kv_heads > self.num_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must be <= num_heads={self.num_heads}")
    common.check_divisible("num_heads", self.num_heads, "num_kv_heads", self.num_kv_heads)
    self.v_head_dim = common.check_int(
        "v_head_dim", self.head_dim if v_head_dim is None else v_head_dim, 1)
    self.in_kv_features = common.check_int(
        "in_kv_features", self.in_features if in_kv_features is None else in_kv_features, 1)
    self.out_features = common.check_int(
        "out_features", self.in_features if out_features is None else out_features, 1)
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
    self.rope_theta = None if rope_theta is None else float(rope_theta)
    if self.rope_theta is not None:
      if not self.rope_theta > 0:
        raise ValueError(f"rope_theta must be > 0 or None, got {rope_theta}")
      if self.head_dim % 2:
        raise ValueError(f"rope_theta needs an even head_dim, got head_dim={self.head_dim}")
    self.qk_norm = bool(qk_norm)
    self.gate = common.check_choice("gate", gate, GATES)
    self.dtype = common.canonical_dtype("dtype", dtype)
    self.param_dtype = common.canonical_dtype("param_dtype", param_dtype)
    self.impl = common.check_impl(impl)

    H, Hkv, D, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
    # KV heads are replicated when there is one, or when the mesh active at construction
    # splits "kv_heads" over more devices than evenly divide Hkv (see the class docstring)
    kv_split = common.mesh_axis_size("kv_heads")
    kv_axis = "kv_heads" if Hkv > 1 and (kv_split is None or Hkv % kv_split == 0) else None
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
    self.query = common.Projection((self.in_features,), (H, D), ("embed",),
                                   ("heads", "head_dim"), use_bias=use_bias, **proj)
    self.key = common.Projection((self.in_kv_features,), (Hkv, D), ("embed",),
                                 (kv_axis, "head_dim"), use_bias=use_bias, **proj)
    self.value = common.Projection((self.in_kv_features,), (Hkv, Dv), ("embed",),
                                   (kv_axis, "head_dim"), use_bias=use_bias, **proj)
    self.out = common.Projection((H, Dv), (self.out_features,), ("heads", "head_dim"),
                                 ("embed",), use_bias=out_bias, **proj)
    if self.qk_norm:
      self.q_norm = common.RMSNorm(D, dtype=self.dtype, param_dtype=self.param_dtype)
      self.k_norm = common.RMSNorm(D, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.gate == "headwise":
      self.gate_proj = common.Projection((self.in_features,), (H,), ("embed",), ("heads",),
                                         use_bias=True, **proj)
    elif self.gate == "elementwise":
      self.gate_proj = common.Projection((self.in_features,), (H, Dv), ("embed",),
                                         ("heads", "head_dim"), use_bias=True, **proj)
    if sinks:
      init = common.partitioned(nnx.initializers.zeros_init(), "heads")
      self.sinks = nnx.Param(init(rngs.params(), (H,), self.param_dtype))
    else:
      self.sinks = None
    self.context_parallel = None  # see set_context_parallel

  # ------------------------------------------------------------------------------ parallel
  def set_context_parallel(self, context_parallel=None, **kwargs):
    """Run the parallel self-attention forward with
    :func:`attnjax.parallel.context_parallel_attention` (sequence sharded over a mesh axis).

    ``context_parallel``: a :class:`ContextParallel`, a ``jax.sharding.Mesh`` (then ``kwargs``
    are the other :class:`ContextParallel` fields: ``axis``, ``strategy``, ``load_balance``,
    ``batch_axis`` ...), a dict of those fields, or ``None`` to switch it off.

    Under context parallelism the input ``x [B, T, .]`` is in the layout order: token ``t`` of
    the input sits at global position ``positions[t]``, where ``positions`` (call argument)
    must then be static (numpy / list) of shape ``[T]``; without it the layout of
    ``load_balance`` is used. RoPE and the masks use these global positions, so the output is
    the single-device output permuted the same way. Not supported (``NotImplementedError``,
    never a silent fallback): cross attention, ``score_mod`` and ``bias``. Decoding
    (:meth:`decode`) ignores the setting (the KV cache lives on one device)."""
    if context_parallel is None:
      if kwargs:
        raise ValueError(f"set_context_parallel(None) takes no other arguments, got "
                         f"{sorted(kwargs)}")
      self.context_parallel = None
      return self
    if isinstance(context_parallel, ContextParallel):
      if kwargs:
        raise ValueError("pass either a ContextParallel or a mesh with keyword arguments")
      cp = context_parallel
    elif isinstance(context_parallel, dict):
      cp = ContextParallel(**dict(context_parallel, **kwargs))
    else:
      cp = ContextParallel(context_parallel, **kwargs)
    self.context_parallel = cp
    return self

  def _cp_positions(self, positions, T):
    """Static global positions ``[T]`` of the laid-out tokens under context parallelism."""
    cp = self.context_parallel
    if positions is None:
      return cp.layout(T)
    if isinstance(positions, jax.core.Tracer):
      raise ValueError("context-parallel attention needs static positions (a numpy array or "
                       "list of ints of shape [T]) to plan the masks; got a traced array")
    pos = np.asarray(positions)
    if pos.shape != (T,) or not np.issubdtype(pos.dtype, np.integer):
      raise ValueError(f"context-parallel attention needs positions of shape [T] = [{T}] "
                       f"(integers, the same layout for every example), got "
                       f"{pos.dtype}{list(pos.shape)}")
    if cp.load_balance not in (None, "contiguous") and not np.array_equal(pos, cp.layout(T)):
      raise ValueError(f"positions do not match the layer's context-parallel layout "
                       f"load_balance={cp.load_balance!r}; pass the permutation "
                       f"attnjax.parallel.load_balance_permutation(T, n, "
                       f"{cp.load_balance!r}) or leave positions=None")
    return pos.astype(np.int32)

  def _cp_attend(self, q, k, v, kw, positions, segment_ids):
    cp = self.context_parallel
    if kw["score_mod"] is not None:
      raise NotImplementedError("context-parallel attention does not support score_mod "
                                "(constructor or call time); switch context parallelism off "
                                "with set_context_parallel(None)")
    if kw["bias"] is not None:
      raise NotImplementedError("context-parallel attention does not support bias; switch "
                                "context parallelism off with set_context_parallel(None)")
    from attnjax.parallel import context_parallel_attention  # pylint: disable=import-outside-toplevel
    return context_parallel_attention(
        q, k, v, mesh=cp.mesh, axis=cp.axis, strategy=cp.strategy,
        ulysses_axis=cp.ulysses_axis, batch_axis=cp.batch_axis, mask=kw["mask"],
        segment_ids=segment_ids, sinks=kw["sinks"], positions=positions, impl=kw["impl"],
        max_branches=cp.max_branches)

  # ------------------------------------------------------------------------------ masks
  @property
  def score_mod(self) -> scores_lib.ScoreMod | None:
    """The constructor's score mod, rebuilt from the layer's current parameter values."""
    return None if self.stored_score_mod is None else self.stored_score_mod.get()

  @property
  def window_left(self) -> int | None:
    """Farthest look-back of the layer's own mask (``None``: unbounded)."""
    return None if self.window is None else self.window - 1

  def layer_mask(self) -> masks_lib.Mask | None:
    """The static mask of the layer (causal / window / constructor mask), or None."""
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
                impl=self.impl)

  # ------------------------------------------------------------------------------ pieces
  def project_q(self, x, positions):
    q = self.query(x)
    if self.qk_norm:
      q = self.q_norm(q)
    if self.rope_theta is not None:
      q = common.apply_rope(q, positions, self.rope_theta)
    return q

  def project_kv(self, src, positions):
    k, v = self.key(src), self.value(src)
    if self.qk_norm:
      k = self.k_norm(k)
    if self.rope_theta is not None:
      k = common.apply_rope(k, positions, self.rope_theta)
    return k, v

  def finish(self, x, y, head_weights=None):
    """Output gate (if any), optional per-head weights ``[B, T, H]``, output projection."""
    if self.gate is not None:
      g = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32))
      if self.gate == "headwise":
        g = g[..., None]
      y = (y.astype(jnp.float32) * g).astype(self.dtype)
    if head_weights is not None:
      y = (y.astype(jnp.float32) * head_weights[..., None].astype(jnp.float32)).astype(self.dtype)
    return self.out(y)

  def project_memory(self, memory, *, positions=None, segment_ids=None) -> common.CrossKV:
    """Project a cross-attention memory ``[B, M, in_kv_features]`` once (keys, values at
    ``positions``, default ``arange(M)``) for reuse across decoding steps."""
    B, M = memory.shape[:2]
    pos = np.arange(M, dtype=np.int32) if positions is None else \
        common.default_positions(positions, B, M)
    k, v = self.project_kv(memory, pos)
    return common.CrossKV(k, v, jnp.asarray(pos, jnp.int32), segment_ids)

  # ------------------------------------------------------------------------------ forward
  def heads(self, x, kv=None, *, positions=None, kv_positions=None, segment_ids=None,
            kv_segment_ids=None, mask=None, score_mod=None, bias=None, sinks=None):
    """Per-head attention outputs ``[B, T, H, Dv]`` (before gate and output projection)."""
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must be [B, T, in_features={self.in_features}], got {x.shape}")
    B, T = x.shape[:2]
    cp = self.context_parallel
    if cp is not None and kv is not None:
      raise NotImplementedError("context-parallel attention is self-attention only; this call "
                                "passes kv (cross attention). Switch context parallelism off "
                                "with set_context_parallel(None)")
    if cp is not None:
      positions = self._cp_positions(positions, T)
    explicit_q = positions is not None
    q_pos = common.default_positions(positions, B, T) if explicit_q else \
        np.arange(T, dtype=np.int32)
    q = self.project_q(x, q_pos)
    kw = self._attention_kwargs(mask, score_mod, bias, sinks)
    if kv is None:  # self attention
      if kv_positions is not None or kv_segment_ids is not None:
        raise ValueError("kv_positions / kv_segment_ids are for cross attention; self "
                         "attention uses positions / segment_ids")
      k, v = self.project_kv(x, q_pos)
      if cp is not None:
        return self._cp_attend(q, k.astype(q.dtype), v.astype(q.dtype), kw, positions,
                               segment_ids)
      pos_kw = dict(q_positions=q_pos, kv_positions=q_pos) if explicit_q else {}
      seg_kw = dict(segment_ids=segment_ids, kv_segment_ids=segment_ids) \
          if segment_ids is not None else {}
    else:
      if isinstance(kv, common.CrossKV):
        if kv_positions is not None:
          raise ValueError("kv_positions: the CrossKV already holds the memory positions")
        k, v, kv_pos = kv.k, kv.v, kv.positions
        if kv_segment_ids is None:
          kv_segment_ids = kv.segment_ids
      else:
        if kv.ndim != 3 or kv.shape[-1] != self.in_kv_features or kv.shape[0] != B:
          raise ValueError(f"kv must be [B={B}, M, in_kv_features={self.in_kv_features}] or a "
                           f"CrossKV, got {kv.shape}")
        M = kv.shape[1]
        kv_pos = np.arange(M, dtype=np.int32) if kv_positions is None else \
            common.default_positions(kv_positions, B, M)
        k, v = self.project_kv(kv, kv_pos)
      pos_kw = dict(q_positions=q_pos, kv_positions=kv_pos)
      if (segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("cross attention needs both segment_ids and kv_segment_ids, or neither")
      seg_kw = dict(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids) \
          if segment_ids is not None else {}
    return common.attend(q, k.astype(q.dtype), v.astype(q.dtype), **kw, **pos_kw, **seg_kw)

  def __call__(self, x, kv=None, *, positions=None, kv_positions=None, segment_ids=None,
               kv_segment_ids=None, mask=None, score_mod=None, bias=None, sinks=None):
    """Parallel forward. ``x [B, T, in_features]``; ``kv``: None (self attention), a memory
    ``[B, M, in_kv_features]`` or a :class:`CrossKV`. ``positions [T] | [B, T]`` (queries; and
    keys in self attention), ``kv_positions`` (memory), ``segment_ids`` / ``kv_segment_ids``
    ``[B, T]`` (tokens attend only within equal ids). Returns ``[B, T, out_features]``."""
    y = self.heads(x, kv, positions=positions, kv_positions=kv_positions,
                   segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
                   score_mod=score_mod, bias=bias, sinks=sinks)
    return self.finish(x, y)

  # ------------------------------------------------------------------------------ decoding
  def init_cache(self, batch_size: int, max_length: int, *, dtype=None,
                 batch_axis=None) -> common.KVCache:
    """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens. With a
    ``window`` the cache is a ring buffer of ``min(window, max_length)`` slots.
    ``batch_axis``: the mesh axis (or axes) the decoded batch is split over, e.g. ``"data"``;
    the cache's batch axis is then split the same way (see
    :func:`attnjax.layers.common.shard_cache_batch`). ``None``: batch axis replicated.

    Under an explicit-axes mesh the key/value buffers ``[B, S, Hkv, D]`` have their head axis
    sharded like the layer's key/value projections produce it (``"kv_heads"``, or replicated
    when the layer replicates its KV heads), the batch axis split over ``batch_axis`` and the
    other axes replicated; :meth:`decode`
    reshards the new tokens' keys/values to the cache's sharding before writing them."""
    self._require_decodable()
    common.check_int("max_length", max_length, 1)
    cap = max_length if self.window is None else min(max_length, self.window)
    dt = self.dtype if dtype is None else common.canonical_dtype("dtype", dtype)
    cache = common.KVCache.create(batch_size, cap, self.num_kv_heads, self.head_dim,
                                  self.v_head_dim, dt)
    cache = dataclasses.replace(
        cache, k=common.shard_heads_like(cache.k, self.key.kernel[...], 1),
        v=common.shard_heads_like(cache.v, self.value.kernel[...], 1))
    return common.shard_cache_batch(cache, batch_axis)

  def _require_decodable(self):
    if not self.causal:
      raise ValueError("decoding with a KV cache needs causal=True (allowed: causal self "
                       "attention); this layer has causal=False")

  def decode_heads(self, x, cache: common.KVCache, *, num_new=None, mask=None, score_mod=None,
                   sinks=None):
    """Per-head outputs ``[B, T, H, Dv]`` of an incremental call, and the updated cache."""
    self._require_decodable()
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must be [B, T, in_features={self.in_features}], got {x.shape}")
    if not isinstance(cache, common.KVCache):
      raise ValueError(f"cache must be a KVCache (from init_cache), got {type(cache).__name__}")
    B, T = x.shape[:2]
    Hkv, D, Dv = self.num_kv_heads, self.head_dim, self.v_head_dim
    common.check_cache_shapes(
        f"{type(self).__name__}.decode", cache,
        dict(k=(B, "S", Hkv, D), v=(B, "S", Hkv, Dv), pos=(B, "S"), length=(B,)),
        f"x has batch {B} and the layer has num_kv_heads={Hkv}, head_dim={D}, "
        f"v_head_dim={Dv}; create the cache with this layer's init_cache(batch_size={B}, "
        f"max_length)")
    q_pos = jnp.asarray(cache.length, jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)
    q = self.project_q(x, q_pos)
    k, v = self.project_kv(x, q_pos)
    step = common.cache_step((cache.k, cache.v), (k, v), cache.pos, cache.length, num_new,
                             self.window_left)
    ck, cv = step.attn
    kw = self._attention_kwargs(mask, score_mod, None, sinks)
    y = common.attend(q, ck.astype(q.dtype), cv.astype(q.dtype), **kw,
                      q_positions=step.q_positions, kv_positions=step.kv_positions,
                      segment_ids=step.q_segment_ids, kv_segment_ids=step.kv_segment_ids)
    new_cache = common.KVCache(step.buffers[0], step.buffers[1], step.pos, step.length)
    return y, new_cache

  def decode(self, x, cache: common.KVCache, *, num_new=None, mask=None, score_mod=None,
             sinks=None):
    """Incremental causal self attention: ``x [B, T, in_features]`` are the next ``T`` tokens of
    each sequence (``T`` = prompt length for prefill, 1 for a decode step). ``num_new [B]``
    (integers in ``[0, T]``, default ``T``) says how many of them are real for each example
    (right padding; ragged prompts); token ``t`` of example ``b`` is at position
    ``cache.length[b] + t``. Outputs at padded tokens are those of a row that sees no key.
    Returns ``(out, new_cache)``; ``out`` equals the parallel forward at the same positions.

    ``ValueError`` when ``cache`` does not fit (batch, KV heads, head dims), when a cache
    without window holds fewer than ``T`` tokens and ``num_new`` is not given (padding beyond
    ``num_new`` is never written, so a padded chunk longer than the cache is fine while its
    real tokens fit), and, for concrete (not traced) values, when
    ``num_new`` is outside ``[0, T]`` or the cache would overflow (see
    :func:`attnjax.layers.common.cache_step`). Under jit, ``num_new`` is clipped to
    ``[0, T]``."""
    y, new_cache = self.decode_heads(x, cache, num_new=num_new, mask=mask, score_mod=score_mod,
                                     sinks=sinks)
    return self.finish(x, y), new_cache


def sliding_window_attention(num_heads: int, in_features: int, window: int, **kwargs):
  """Causal sliding-window attention (Mistral / Longformer local attention): query ``i`` sees
  keys ``i - window < j <= i``; decoding uses a ring-buffer cache of ``window`` slots.
  Equivalent to ``MultiHeadAttention(..., causal=True, window=window)``."""
  kwargs.setdefault("causal", True)
  return MultiHeadAttention(num_heads, in_features, window=window, **kwargs)


__all__ = ["MultiHeadAttention", "sliding_window_attention", "GATES"]
