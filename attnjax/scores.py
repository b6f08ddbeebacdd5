"""Score modifications: functions of the attention logits applied before the softmax.

A :class:`ScoreMod` is ``fn(params, score, batch, head, q_idx, kv_idx) -> score`` plus its
differentiable ``params`` (a tuple of arrays). It is a pytree whose leaves are the params, so
gradients flow into slopes, bias tables and low-rank factors through every backend.

Backends call a score mod on one tile of logits at a time:

* ``score``: float32 ``[B, Hs, bq, bk]`` — already scaled (``scale * q.k``) and with ``bias``
  added; ``Hs`` is the number of query heads in the tile (all heads, or a subset);
* ``batch``: int ``[B, 1, 1, 1]``; ``head``: int ``[1, Hs, 1, 1]`` global query-head indices;
* ``q_idx``: int ``[1, 1, bq, 1]`` and ``kv_idx``: int ``[1, 1, 1, bk]`` *positions* (the same
  positions masks see: bottom-right aligned by default);
* ``params``: each param is cut to the tile first, along the axes its :class:`Tiling` names —
  a row-aligned factor ``u[B, Tq, H, R]`` arrives as ``[B, bq, Hs, R]``. Params without tiling
  arrive whole.

Row-aligned params (``bias``, ``low_rank_bias``) index query *rows* ``0..Tq-1`` and key rows
``0..Tk-1`` of this call, not positions.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np



@dataclasses.dataclass(frozen=True)
class Tiling:
  """Which axes of a param follow the query rows, key rows, query heads and batch (None = not
  tiled). Backends whose tiles span the whole batch (xla, chunked) ignore ``batch_axis``; the
  Pallas kernels, whose tiles hold one example, cut it."""
  q_axis: int | None = None
  kv_axis: int | None = None
  head_axis: int | None = None
  batch_axis: int | None = None


GLOBAL = Tiling()


def _is_tiling(x):
  return isinstance(x, Tiling)


class _FnRef:
  """A score mod's function in the pytree's static data. Equal when the functions are the same
  object or, when ``key`` is given, when the keys are equal: ``key`` names everything static
  the function depends on (e.g. ``("softcap", 30.0)``), so that a built-in mod rebuilt on every
  step (``scores.alibi(slopes)`` inside a training loop) hits ``jax.jit``'s cache instead of
  retracing."""
  __slots__ = ("fn", "key")

  def __init__(self, fn, key=None):
    self.fn, self.key = fn, key

  def __eq__(self, other):
    if not isinstance(other, _FnRef):
      return NotImplemented
    if self.key is not None or other.key is not None:
      return self.key == other.key
    return self.fn is other.fn

  def __hash__(self):
    return hash(self.key) if self.key is not None else hash(id(self.fn))


@jax.tree_util.register_pytree_node_class
class ScoreMod:
  """A score modification with differentiable parameters (see the module docstring).

  ``key`` (optional, hashable) names everything static ``fn`` depends on; two mods with equal
  keys must compute the same function of their params. It lets ``jax.jit`` reuse a trace when
  an equal mod is rebuilt (without it, mods compare by the identity of ``fn``)."""

  def __init__(self, fn: Callable, params=(), tiling=None, name: str = "score_mod",
               raw_fn: Callable | None = None, labels=None, key=None):
    self.fn = fn
    self.key = key
    self.params = params
    self.tiling = tiling if tiling is not None else jax.tree.map(lambda _: GLOBAL, params)
    self.name = name
    self.raw_fn = raw_fn  # user function awaiting closure conversion (from_function)
    # One name per param (same tree as the tiling), used in error messages.
    if labels is None:
      leaves, tdef = jax.tree.flatten(self.tiling, is_leaf=_is_tiling)
      labels = tdef.unflatten([f"{name} parameter {i}" for i in range(len(leaves))])
    self.labels = labels

  def tree_flatten(self):
    return (self.params,), (_FnRef(self.fn, self.key), self.tiling, self.name, self.raw_fn,
                            self.labels)

  @classmethod
  def tree_unflatten(cls, aux, children):
    ref, tiling, name, raw_fn, labels = aux
    obj = object.__new__(cls)
    obj.fn, obj.key, obj.tiling, obj.name = ref.fn, ref.key, tiling, name
    obj.raw_fn, obj.labels = raw_fn, labels
    obj.params = children[0]
    return obj

  def check_params(self, batch: int, q_heads: int, q_len: int, kv_len: int) -> None:
    """Raise ``ValueError`` unless every tiled axis of every param fits the problem: query-row
    axes have size ``q_len`` or 1, key-row axes ``kv_len`` or 1, head axes ``q_heads`` or 1 and
    batch axes ``batch`` or 1 (1 broadcasts). Backends cut params along these axes tile by
    tile, where a wrong size would be padded or clipped silently."""
    tilings, tdef = jax.tree.flatten(self.tiling, is_leaf=_is_tiling)
    params = tdef.flatten_up_to(self.params)
    labels = tdef.flatten_up_to(self.labels)
    for t, p, label in zip(tilings, params, labels):
      shape = tuple(np.shape(p))
      for axis, what, size in ((t.q_axis, "query rows Tq", q_len),
                               (t.kv_axis, "key rows Tk", kv_len),
                               (t.head_axis, "query heads Hq", q_heads),
                               (t.batch_axis, "batch B", batch)):
        if axis is None:
          continue
        if axis >= len(shape):
          raise ValueError(f"{label} has shape {list(shape)}, but its axis {axis} should follow "
                           f"the {what} ({size}): it needs rank > {axis}")
        if shape[axis] not in (1, size):
          raise ValueError(f"{label} has shape {list(shape)}: its axis {axis} follows the "
                           f"{what} and must have size {size} (or 1 to broadcast), got "
                           f"{shape[axis]}")

  def __repr__(self):
    return f"ScoreMod({self.name})"

  def __call__(self, score, batch, head, q_idx, kv_idx, params=None):
    return self.fn(self.params if params is None else params, score, batch, head, q_idx, kv_idx)

  # -------------------------------------------------------------------------- backend helpers
  def bind(self, score_shape, batch_shape, head_shape, q_shape, kv_shape,
           dtype=jnp.float32) -> "ScoreMod":
    """Trace a user function for one tile's argument shapes and hoist *every* array it
    captures (traced or concrete, float or int) into params: custom VJPs return gradients for
    the float ones, and kernels (Pallas) receive them as inputs instead of captured constants.
    Built-in mods return themselves."""
    if self.raw_fn is None:
      return self
    ex = (jnp.zeros(score_shape, dtype), jnp.zeros(batch_shape, jnp.int32),
          jnp.zeros(head_shape, jnp.int32), jnp.zeros(q_shape, jnp.int32),
          jnp.zeros(kv_shape, jnp.int32))
    user = self.raw_fn
    closed = jax.make_jaxpr(lambda s, bb, h, q, k: user(s, bb, h, q, k))(*ex)
    jaxpr, consts = closed.jaxpr, tuple(closed.consts)
    if len(jaxpr.outvars) != 1:
      raise ValueError(f"score_mod {self.name!r} must return one array, got "
                       f"{len(jaxpr.outvars)} outputs")
    out_shape = tuple(jaxpr.outvars[0].aval.shape)
    try:
      fits = jnp.broadcast_shapes(out_shape, tuple(score_shape)) == tuple(score_shape)
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(f"score_mod {self.name!r} must return the score's shape "
                       f"{list(score_shape)} (or one that broadcasts to it), got "
                       f"{list(out_shape)}")

    def fn(params, s, bb, h, q, k):
      run = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, list(params)))
      (out,) = run(s, bb.astype(jnp.int32), h.astype(jnp.int32), q.astype(jnp.int32),
                   k.astype(jnp.int32))
      return jnp.broadcast_to(jnp.asarray(out).astype(s.dtype), s.shape)

    return ScoreMod(fn, consts, None, self.name,
                    labels=tuple(f"{self.name} captured array {i}" for i in range(len(consts))))

  def pad_params(self, q_len_padded: int, kv_len_padded: int):
    """Params with their q/kv axes zero-padded to the padded problem size."""
    def pad(t: Tiling, p):
      widths = [(0, 0)] * p.ndim
      if t.q_axis is not None and p.shape[t.q_axis] > 1:
        widths[t.q_axis] = (0, q_len_padded - p.shape[t.q_axis])
      if t.kv_axis is not None and p.shape[t.kv_axis] > 1:
        widths[t.kv_axis] = (0, kv_len_padded - p.shape[t.kv_axis])
      return jnp.pad(p, widths) if any(w != (0, 0) for w in widths) else p
    return jax.tree.map(pad, self.tiling, self.params, is_leaf=_is_tiling)

  def tile_params(self, params, q_start, bq: int, kv_start, bk: int, heads=None):
    """Cut each param to one tile: ``[q_start, q_start + bq)`` along its q axis, likewise for
    kv, and gather ``heads`` (static index array) along its head axis."""
    def cut(t: Tiling, p):
      if t.head_axis is not None and heads is not None and p.shape[t.head_axis] > 1:
        p = jnp.take(p, np.asarray(heads), axis=t.head_axis)
      if t.q_axis is not None and p.shape[t.q_axis] > 1:
        p = jax.lax.dynamic_slice_in_dim(p, q_start, bq, axis=t.q_axis)
      if t.kv_axis is not None and p.shape[t.kv_axis] > 1:
        p = jax.lax.dynamic_slice_in_dim(p, kv_start, bk, axis=t.kv_axis)
      return p
    return jax.tree.map(cut, self.tiling, params, is_leaf=_is_tiling)

  def untile_add(self, acc, ct, q_start, kv_start, heads=None):
    """Add a tile cotangent ``ct`` (shaped like ``tile_params``' output) into ``acc``
    (shaped like the padded params)."""
    def add(t: Tiling, a, c):
      # One index type for every axis (int32): under x64 a bare 0 would be int64.
      starts = [jnp.int32(0)] * a.ndim
      if t.q_axis is not None and a.shape[t.q_axis] > 1:
        starts[t.q_axis] = jnp.asarray(q_start, jnp.int32)
      if t.kv_axis is not None and a.shape[t.kv_axis] > 1:
        starts[t.kv_axis] = jnp.asarray(kv_start, jnp.int32)
      if t.head_axis is not None and heads is not None and a.shape[t.head_axis] > 1:
        # Scatter the head subset back; heads are distinct, so this is an exact add.
        full_shape = list(c.shape)
        full_shape[t.head_axis] = a.shape[t.head_axis]
        full = jnp.zeros(full_shape, c.dtype)
        idx = [slice(None)] * c.ndim
        idx[t.head_axis] = np.asarray(heads)
        c = full.at[tuple(idx)].add(c)
      if c.shape == a.shape:
        return a + c
      cur = jax.lax.dynamic_slice(a, starts, c.shape)
      return jax.lax.dynamic_update_slice(a, cur + c, starts)
    return jax.tree.map(add, self.tiling, acc, ct, is_leaf=_is_tiling)


def table_bias(table, index, q_idx, kv_idx):
  """Gather a per-head bias table at position-derived buckets, keeping the batch axis.

  ``table`` is ``[Hs, n]`` (the tile's heads) or ``[n]`` (shared); ``index`` an int array
  broadcastable against ``q_idx``/``kv_idx`` (``[Bp, 1, bq, 1]`` and ``[Bp, 1, 1, bk]``, ``Bp``
  1 or the batch when positions differ per example). Returns ``[Bp, Hs, bq, bk]`` (or
  ``[Bp, 1, bq, bk]``) ready to add to the tile's scores."""
  idx = jnp.broadcast_to(index, jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)))
  idx = idx[:, 0]                                  # [Bp, bq, bk]
  if table.ndim == 1:
    return jnp.take(table, idx, axis=0)[:, None]
  return jnp.moveaxis(jnp.take(table, idx, axis=1), 0, 1)


def is_float_param(x) -> bool:
  """Whether a score-mod param takes gradients (integer params, e.g. index tables captured by
  a user function, get ``float0`` cotangents)."""
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def param_cotangent(ct, param):
  """Cast an accumulated cotangent to ``param``'s dtype, or ``float0`` zeros for int params."""
  if not is_float_param(param):
    return np.zeros(np.shape(param), jax.dtypes.float0)
  return ct.astype(jnp.result_type(param))


def _check_int(name: str, value, minimum: int) -> int:
  """A static integer argument: a Python/numpy int or a concrete integer 0-d array."""
  try:
    if isinstance(value, (bool, np.bool_, jax.core.Tracer)):
      raise TypeError
    value = int(value.__index__())
  except (TypeError, AttributeError):
    raise TypeError(f"{name} must be an int, got {value!r} of type "
                    f"{type(value).__name__}") from None
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def _as_float_param(name, x, ndim_allowed):
  if isinstance(x, (int, float)):
    x = np.asarray(x, np.float32)
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got "
                    f"{getattr(x, 'dtype', type(x).__name__)}")
  if x.ndim not in ndim_allowed:
    raise ValueError(f"{name} must have rank in {sorted(ndim_allowed)}, got shape {x.shape}")
  return jnp.asarray(x)


# ----------------------------------------------------------------------------------------------
# Built-in score mods
# ----------------------------------------------------------------------------------------------

def softcap(cap: float) -> ScoreMod:
  """Logit soft-capping ``cap * tanh(score / cap)`` (Gemma 2; Bello et al. 2016)."""
  if isinstance(cap, (bool, np.bool_)) or np.ndim(cap) != 0:
    raise TypeError(f"softcap cap must be a positive finite number (a static scalar), got "
                    f"{cap!r}")
  try:
    value = float(cap)
  except Exception as e:  # a traced value: the cap is baked into the kernel
    raise TypeError(f"softcap cap must be a static Python/numpy number, not a traced value "
                    f"({type(cap).__name__})") from e
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"softcap cap must be a positive finite number, got {cap!r}")
  cap = value

  def fn(params, s, b, h, q, k):
    return cap * jnp.tanh(s / cap)

  return ScoreMod(fn, (), None, f"softcap({cap})", key=("softcap", cap))


def alibi_slopes(num_heads: int) -> np.ndarray:
  """The geometric ALiBi slopes of Press et al. 2022 (also for non-power-of-2 head counts)."""
  def pow2(n):
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]
  num_heads = _check_int("alibi_slopes num_heads", num_heads, 1)
  p = 2 ** math.floor(math.log2(num_heads))
  slopes = pow2(p)
  if p < num_heads:
    slopes += pow2(2 * p)[0::2][: num_heads - p]
  return np.asarray(slopes, np.float32)


def alibi(slopes, *, symmetric: bool = False) -> ScoreMod:
  """ALiBi (Press et al. 2022, "Train Short, Test Long"): adds ``slopes[h] * (j - i)`` to the
  logit of query position ``i`` and key position ``j`` (a penalty growing with distance for past
  keys). ``symmetric=True`` adds ``-slopes[h] * |i - j|`` instead (encoder use). ``slopes`` is a
  float array ``[H]`` (one per query head, learnable) — see :func:`alibi_slopes`."""
  slopes = _as_float_param("alibi slopes", slopes, {1})

  def fn(params, s, b, h, q, k):
    (sl,) = params
    dist = (k - q).astype(s.dtype)
    if symmetric:
      dist = -jnp.abs(dist)
    return s + sl.astype(s.dtype)[None, :, None, None] * dist

  return ScoreMod(fn, (slopes,), (Tiling(head_axis=0),), "alibi", labels=("alibi slopes",),
                  key=("alibi", bool(symmetric)))


def t5_relative_bucket(rel, *, bidirectional: bool, num_buckets: int, max_distance: int):
  """T5's log-spaced relative-position buckets (Raffel et al. 2020) for ``rel = j - i``."""
  n = -rel
  ret = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(rel.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(nf / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(rel.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


def relative_bias(table, max_distance: int, *, mode: str = "clipped",
                  bidirectional: bool = True) -> ScoreMod:
  """Learnable relative-position bias added to the logits, ``table[h, bucket(j - i)]``.

  ``mode="clipped"`` (Shaw et al. 2018 / Music Transformer style clipped distances): the bucket
  is ``clip(j - i, -max_distance, max_distance) + max_distance`` and ``table`` has
  ``2 * max_distance + 1`` entries per head (``max_distance + 1`` with ``bidirectional=False``,
  indexed by ``clip(i - j, 0, max_distance)``). ``mode="t5"``: T5's log buckets with
  ``num_buckets = table.shape[-1]``. ``table`` is ``[H, num_buckets]`` (per head) or
  ``[num_buckets]`` (shared)."""
  table = _as_float_param("relative_bias table", table, {1, 2})
  md = _check_int("relative_bias max_distance", max_distance, 1)
  nb = table.shape[-1]
  if mode == "clipped":
    need = 2 * md + 1 if bidirectional else md + 1
    if nb != need:
      raise ValueError(f"relative_bias table has {nb} buckets per head but mode='clipped' with "
                       f"max_distance={md} and bidirectional={bidirectional} needs {need}")
  elif mode == "t5":
    if nb < 4 or (bidirectional and nb % 2):
      raise ValueError(f"relative_bias mode='t5' needs >= 4 buckets (even when bidirectional), "
                       f"got {nb}")
  else:
    raise ValueError(f"relative_bias mode must be 'clipped' or 't5', got {mode!r}")
  per_head = table.ndim == 2

  def fn(params, s, b, h, q, k):
    (tab,) = params
    rel = (k - q).astype(jnp.int32)
    if mode == "clipped":
      if bidirectional:
        bucket = jnp.clip(rel, -md, md) + md
      else:
        bucket = jnp.clip(-rel, 0, md)
    else:
      bucket = t5_relative_bucket(rel, bidirectional=bidirectional, num_buckets=nb,
                                  max_distance=md)
    return s + table_bias(tab.astype(s.dtype), bucket, q, k)

  tiling = (Tiling(head_axis=0),) if per_head else (GLOBAL,)
  return ScoreMod(fn, (table,), tiling, f"relative_bias({mode})",
                  labels=("relative_bias table",),
                  key=("relative_bias", mode, md, bool(bidirectional), nb, per_head))


def low_rank_bias(u, w) -> ScoreMod:
  """Low-rank additive bias ``bias[b, h, i, j] = u[b, i, h, :] . w[b, j, h, :]`` computed tile
  by tile and never materialized (FlashBias, Wu et al. 2025). ``u`` is ``[B, Tq, H, R]`` and
  ``w`` is ``[B, Tk, H, R]``; ``B`` and ``H`` may be 1 to broadcast. Rows follow this call's
  query/key rows."""
  u = _as_float_param("low_rank_bias u", u, {4})
  w = _as_float_param("low_rank_bias w", w, {4})
  if u.shape[-1] != w.shape[-1]:
    raise ValueError(f"low_rank_bias: u rank {u.shape[-1]} != w rank {w.shape[-1]} "
                     f"(u {u.shape}, w {w.shape})")

  def fn(params, s, b, h, q, k):
    uu, ww = params
    bias = jnp.einsum("bqhr,bkhr->bhqk", uu.astype(s.dtype), ww.astype(s.dtype),
                      precision=jax.lax.Precision.HIGHEST)
    return s + bias

  return ScoreMod(fn, (u, w), (Tiling(q_axis=1, head_axis=2, batch_axis=0),
                          Tiling(kv_axis=1, head_axis=2, batch_axis=0)),
                  "low_rank_bias", labels=("low_rank_bias u [B, Tq, H, R]",
                                           "low_rank_bias w [B, Tk, H, R]"),
                  key=("low_rank_bias",))


def additive_bias(bias) -> ScoreMod:
  """A materialized additive bias ``[B, H, Tq, Tk]`` (any of B, H, Tq, Tk may be 1 to
  broadcast); used for the ``bias=`` argument of attention."""
  def fn(params, s, b, h, q, k):
    (bb,) = params
    return s + bb.astype(s.dtype)

  return ScoreMod(fn, (bias,), (Tiling(q_axis=2, kv_axis=3, head_axis=1, batch_axis=0),),
                   "bias", labels=("bias [B, Hq, Tq, Tk]",), key=("bias",))


def from_function(fn: Callable, name: str | None = None) -> ScoreMod:
  """Wrap a user ``fn(score, batch, head, q_idx, kv_idx) -> score``: FlexAttention's
  ``score_mod`` (Dong et al. 2024, "Flex Attention: A Programming Model for Generating
  Optimized Attention Kernels"). It must return the score's shape (or one broadcasting to it).

  It receives broadcastable arrays (see the module docstring) and must use ``jnp`` operations.
  Arrays it captures (e.g. a table indexed by ``head``) receive gradients: they are hoisted
  into params by closure conversion when the backend binds the mod to its tile shape."""
  if not callable(fn):
    raise TypeError(f"scores.from_function needs a callable, got {type(fn).__name__}")
  name = name or getattr(fn, "__name__", "score_mod")
  try:
    # The callable's own signature: a functools.wraps wrapper may take other arguments than
    # the function it wraps (whose signature inspect reports by default).
    sig = inspect.signature(fn, follow_wrapped=False)
  except (TypeError, ValueError):   # builtins and some C callables have none: checked at use
    sig = None
  if sig is not None:
    try:
      sig.bind(*range(5))
    except TypeError as e:
      raise TypeError(f"score_mod {name!r} must take five arguments (score, batch, head, q_idx, "
                      f"kv_idx), but its signature is {sig}: {e}") from None
  return ScoreMod(None, (), None, name, raw_fn=fn)


def chain(*mods: ScoreMod) -> ScoreMod:
  """Apply several score mods in order (e.g. ``chain(alibi(s), softcap(30.0))``); plain
  functions ``fn(score, batch, head, q_idx, kv_idx)`` are wrapped with :func:`from_function`."""
  mods = tuple(m for m in mods if m is not None)
  mods = tuple(from_function(m) if callable(m) and not isinstance(m, ScoreMod) else m
               for m in mods)
  for i, m in enumerate(mods):
    if not isinstance(m, ScoreMod):
      raise TypeError(f"chain: argument {i} must be a ScoreMod or a function fn(score, batch, "
                      f"head, q_idx, kv_idx), got {type(m).__name__}")
  if len(mods) == 1:
    return mods[0]
  if any(m.raw_fn is not None or isinstance(m, _LazyChain) for m in mods):
    return _LazyChain(mods)   # binds (closure-converts) its members per tile shape
  fns = tuple(m.fn for m in mods)

  def fn(params, s, b, h, q, k):
    for f, p in zip(fns, params):
      s = f(p, s, b, h, q, k)
    return s

  keys = tuple(m.key for m in mods)
  return ScoreMod(fn, tuple(m.params for m in mods), tuple(m.tiling for m in mods),
                  "chain(" + ", ".join(m.name for m in mods) + ")",
                  labels=tuple(m.labels for m in mods),
                  key=("chain",) + keys if all(k is not None for k in keys) else None)


@jax.tree_util.register_pytree_node_class
class _LazyChain(ScoreMod):
  """A chain holding user functions: binds its members, then chains them."""

  def __init__(self, mods):
    super().__init__(None, tuple(m.params for m in mods), tuple(m.tiling for m in mods),
                     "chain(" + ", ".join(m.name for m in mods) + ")", raw_fn=None,
                     labels=tuple(m.labels for m in mods))
    self.mods = mods

  def tree_flatten(self):
    return (tuple(m for m in self.mods),), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(tuple(children[0]))

  def bind(self, *shapes, **kw):
    return chain(*(m.bind(*shapes, **kw) for m in self.mods))


def as_score_mod(score_mod) -> ScoreMod | None:
  """Normalize the ``score_mod`` argument: None, a ScoreMod, or a sequence (chained)."""
  if score_mod is None:
    return None
  if isinstance(score_mod, ScoreMod):
    return score_mod
  if isinstance(score_mod, (list, tuple)):
    return chain(*(as_score_mod(m) for m in score_mod))
  if callable(score_mod):
    return from_function(score_mod)
  raise TypeError(f"score_mod must be an attnjax.scores.ScoreMod, a callable "
                  f"fn(score, batch, head, q_idx, kv_idx), a sequence of them, or None; got "
                  f"{type(score_mod).__name__}")


__all__ = ["ScoreMod", "Tiling", "table_bias", "softcap", "alibi", "alibi_slopes", "relative_bias",
           "t5_relative_bucket", "low_rank_bias", "additive_bias", "from_function", "chain",
           "as_score_mod"]
