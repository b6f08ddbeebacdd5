"""Mask algebra: small immutable objects that say which keys each query may see.

A mask is evaluated at *positions*. By default query row ``i`` of a ``[Tq]`` query block sits at
position ``Tk - Tq + i`` (bottom-right alignment, the convention of ``jax.nn``) and key ``j`` at
position ``j``; callers that know better (decoding with a cache, context parallelism) pass
explicit offsets or positions to :func:`attnjax.attention`.

Every mask offers two views of itself:

* ``mask_mod(q_idx, kv_idx, head=None) -> bool`` written with ``jnp`` and broadcasting, so a
  kernel can evaluate it on the index grid of one tile (FlexAttention's ``mask_mod``, vectorized).
* ``block_map(q_len, kv_len, block_q, block_kv) -> np.int8[nq, nk]`` (``[H, nq, nk]`` for
  per-head masks) with ``EMPTY=0``, ``PARTIAL=1``, ``FULL=2``, computed with numpy at trace time
  and cached. Backends skip empty blocks and skip mask evaluation on full blocks.

Masks compose with ``&``, ``|`` and ``~``; :func:`per_head` stacks one mask per head.
Masks are hashable and compare by value, so they can be static arguments of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2

# Above this many mask entries a composite mask's block map is derived from its children's maps
# (conservative: a block may be reported PARTIAL although it is empty) instead of evaluated exactly.
_EXACT_EVAL_LIMIT = 1 << 27
_SLAB_ELEMENTS = 1 << 24  # entries evaluated per numpy slab when computing a block map

_NEG = -(1 << 40)  # "minus infinity" for integer intervals
_POS = 1 << 40


def _xp_of(*arrays):
  return np if all(isinstance(a, (np.ndarray, np.generic, int)) for a in arrays) else jnp


def _check_int(name: str, value, minimum: int | None = None) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


class Mask:
  """Base class. Subclasses implement ``_eval(xp, q, k, h)`` (and may implement
  ``_interval(q)`` when each query row sees one contiguous range of key positions)."""

  per_head: bool = False  # True when the mask differs between heads

  # ----------------------------------------------------------------------------- evaluation
  def _eval(self, xp, q, k, h):  # pragma: no cover - abstract
    raise NotImplementedError

  def _interval(self, q: np.ndarray):
    """Inclusive ``(lo, hi)`` key-position bounds per query position, or None."""
    return None

  def mask_mod(self, q_idx, kv_idx, head=None):
    """Boolean visibility of key position ``kv_idx`` to query position ``q_idx`` (for ``head``),
    evaluated with broadcasting. Works on jnp arrays (inside jit and kernels) and numpy arrays."""
    xp = _xp_of(q_idx, kv_idx) if head is None else _xp_of(q_idx, kv_idx, head)
    return self._eval(xp, q_idx, kv_idx, head)

  __call__ = mask_mod

  def dense_np(self, q_pos, kv_pos, num_heads: int | None = None) -> np.ndarray:
    """Materialize the mask with numpy: ``[Tq, Tk]``, or ``[H, Tq, Tk]`` when ``num_heads`` is
    given or the mask is per-head. Meant for tests and small problems."""
    q = np.asarray(q_pos, dtype=np.int64)[:, None]
    k = np.asarray(kv_pos, dtype=np.int64)[None, :]
    if num_heads is None and not self.per_head:
      return np.broadcast_to(self._np_eval(q, k, None), (q.shape[0], k.shape[1])).copy()
    if num_heads is None:
      raise ValueError(f"{self!r} is per-head: pass num_heads to dense_np")
    h = np.arange(num_heads, dtype=np.int64)[:, None, None]
    return np.broadcast_to(self._np_eval(q[None], k[None], h),
                           (num_heads, q.shape[0], k.shape[1])).copy()

  def _np_eval(self, q, k, h):
    return np.asarray(self._eval(np, q, k, h), dtype=bool)

  # ----------------------------------------------------------------------------- validation
  def validate(self, q_len: int | None, kv_len: int | None, num_heads: int) -> None:
    """Raise ``ValueError`` if the mask cannot be applied to this problem. ``q_len``/``kv_len``
    are None when the caller gives explicit positions (e.g. one shard of a longer sequence):
    then only head-count constraints are checked."""

  # ----------------------------------------------------------------------------- block maps
  def block_map(self, q_len: int, kv_len: int, block_q: int, block_kv: int, *,
                q_offset: int | None = None, kv_offset: int = 0,
                num_heads: int | None = None) -> np.ndarray:
    """Classify each ``[block_q, block_kv]`` tile as EMPTY (0), PARTIAL (1) or FULL (2).

    Rows are ``ceil(q_len / block_q)`` query blocks, columns ``ceil(kv_len / block_kv)`` key
    blocks; positions past ``q_len``/``kv_len`` (padding of the last block) count as masked, so
    a ragged last block is never FULL. Query positions are ``q_offset + arange(q_len)`` with
    ``q_offset`` defaulting to ``kv_len - q_len``; key positions ``kv_offset + arange(kv_len)``.
    Returns ``int8[nq, nk]``, or ``int8[num_heads, nq, nk]`` for per-head masks (``num_heads``
    required) or whenever ``num_heads`` is given. The result is cached; do not modify it.
    """
    q_len = _check_int("q_len", q_len, 0)
    kv_len = _check_int("kv_len", kv_len, 0)
    block_q = _check_int("block_q", block_q, 1)
    block_kv = _check_int("block_kv", block_kv, 1)
    if q_offset is None:
      q_offset = kv_len - q_len
    if self.per_head and num_heads is None:
      raise ValueError(f"{self!r} is per-head: block_map needs num_heads")
    bm = _cached_block_map(self, q_len, kv_len, block_q, block_kv, int(q_offset), int(kv_offset),
                           num_heads if self.per_head else None)
    if num_heads is not None and bm.ndim == 2:
      bm = np.broadcast_to(bm, (num_heads,) + bm.shape)
    return bm

  def _block_map(self, q_pos: np.ndarray, q_valid: np.ndarray, kv_pos: np.ndarray,
                 kv_valid: np.ndarray, block_q: int, block_kv: int, num_heads: int | None):
    """Block map on padded position grids (lengths multiples of the block sizes)."""
    if num_heads is None:
      iv = self._interval(q_pos)
      if iv is not None:
        return _interval_block_map(iv, q_valid, kv_pos, kv_valid, block_q, block_kv)
    return _dense_block_map(self, q_pos, q_valid, kv_pos, kv_valid, block_q, block_kv, num_heads)

  # ----------------------------------------------------------------------------- algebra
  def __and__(self, other: "Mask") -> "Mask":
    _require_mask(other, "&")
    return And(self, other)

  def __or__(self, other: "Mask") -> "Mask":
    _require_mask(other, "|")
    return Or(self, other)

  def __invert__(self) -> "Mask":
    return Not(self)


def _require_mask(other, op):
  if not isinstance(other, Mask):
    raise TypeError(f"masks combine with {op} only with other masks, got {type(other).__name__}")


# ----------------------------------------------------------------------------------------------
# Block-map machinery
# ----------------------------------------------------------------------------------------------

def _padded_positions(length: int, block: int, offset: int):
  n = max(1, -(-length // block)) * block
  idx = np.arange(n, dtype=np.int64)
  return idx + offset, idx < length


@functools.lru_cache(maxsize=256)
def _cached_block_map(mask: Mask, q_len, kv_len, block_q, block_kv, q_offset, kv_offset,
                      num_heads):
  q_pos, q_valid = _padded_positions(q_len, block_q, q_offset)
  kv_pos, kv_valid = _padded_positions(kv_len, block_kv, kv_offset)
  bm = mask._block_map(q_pos, q_valid, kv_pos, kv_valid, block_q, block_kv, num_heads)
  bm = np.ascontiguousarray(bm, dtype=np.int8)
  bm.setflags(write=False)
  return bm


def block_map_from_positions(mask: Mask, q_pos, kv_pos, block_q: int, block_kv: int,
                             num_heads: int | None = None) -> np.ndarray:
  """Block map for arbitrary static positions (e.g. a load-balanced permutation). Uncached."""
  q_pos = np.asarray(q_pos, np.int64)
  kv_pos = np.asarray(kv_pos, np.int64)
  nq = max(1, -(-q_pos.size // block_q)) * block_q
  nk = max(1, -(-kv_pos.size // block_kv)) * block_kv
  qp = np.zeros(nq, np.int64)
  qp[:q_pos.size] = q_pos
  kp = np.zeros(nk, np.int64)
  kp[:kv_pos.size] = kv_pos
  qv = np.arange(nq) < q_pos.size
  kv = np.arange(nk) < kv_pos.size
  if mask.per_head and num_heads is None:
    raise ValueError(f"{mask!r} is per-head: block_map_from_positions needs num_heads")
  if num_heads is not None and not mask.per_head:
    bm = _dense_block_map(mask, qp, qv, kp, kv, block_q, block_kv, None)
    return np.broadcast_to(bm, (num_heads,) + bm.shape).astype(np.int8)
  # Positions need not be contiguous here, so the interval fast path does not apply.
  return _dense_block_map(mask, qp, qv, kp, kv, block_q, block_kv,
                          num_heads if mask.per_head else None).astype(np.int8)


def _classify(any_vis: np.ndarray, all_vis: np.ndarray) -> np.ndarray:
  return np.where(all_vis, FULL, np.where(any_vis, PARTIAL, EMPTY)).astype(np.int8)


def _interval_block_map(iv, q_valid, kv_pos, kv_valid, block_q, block_kv):
  lo, hi = (np.asarray(x, np.int64) for x in iv)
  nk = kv_pos.size // block_kv
  # Key positions are contiguous (kv_offset + arange), so each key block is the range [a, e].
  a = kv_pos[::block_kv]
  last_valid = np.where(kv_valid, kv_pos, _NEG).reshape(nk, block_kv).max(axis=1)
  block_is_whole = kv_valid.reshape(nk, block_kv).all(axis=1)
  lo_, hi_ = lo[:, None], hi[:, None]
  any_rows = (np.maximum(lo_, a[None]) <= np.minimum(hi_, last_valid[None])) & q_valid[:, None]
  all_rows = (lo_ <= a[None]) & (hi_ >= (a + block_kv - 1)[None]) & block_is_whole[None]
  all_rows &= q_valid[:, None]
  nq = q_valid.size // block_q
  any_vis = any_rows.reshape(nq, block_q, nk).any(axis=1)
  all_vis = all_rows.reshape(nq, block_q, nk).all(axis=1)
  return _classify(any_vis, all_vis)


def _dense_block_map(mask: Mask, q_pos, q_valid, kv_pos, kv_valid, block_q, block_kv, num_heads):
  nq, nk = q_pos.size // block_q, kv_pos.size // block_kv
  heads = 1 if num_heads is None else num_heads
  h = None if num_heads is None else np.arange(num_heads, dtype=np.int64)[:, None, None]
  any_vis = np.zeros((heads, nq, nk), bool)
  all_vis = np.zeros((heads, nq, nk), bool)
  rows_per_slab = max(1, _SLAB_ELEMENTS // max(1, kv_pos.size * heads * block_q))
  k = kv_pos[None, None, :]
  for start in range(0, nq, rows_per_slab):
    stop = min(nq, start + rows_per_slab)
    q = q_pos[start * block_q:stop * block_q][None, :, None]
    vis = mask._np_eval(q, k, h)
    vis = np.broadcast_to(vis, (heads, q.shape[1], k.shape[2]))
    vis = vis & q_valid[start * block_q:stop * block_q][None, :, None] & kv_valid[None, None, :]
    vis = vis.reshape(heads, stop - start, block_q, nk, block_kv)
    any_vis[:, start:stop] = vis.any(axis=(2, 4))
    all_vis[:, start:stop] = vis.all(axis=(2, 4))
  out = _classify(any_vis, all_vis)
  return out[0] if num_heads is None else out


# ----------------------------------------------------------------------------------------------
# Basic masks
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Full(Mask):
  """Every query sees every key."""

  def _eval(self, xp, q, k, h):
    return xp.ones(np.broadcast_shapes(np.shape(q), np.shape(k)), dtype=bool)

  def _interval(self, q):
    return np.full(q.shape, _NEG), np.full(q.shape, _POS)


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Query at position i sees keys at positions j <= i + offset."""
  offset: int = 0

  def _eval(self, xp, q, k, h):
    return k <= q + self.offset

  def _interval(self, q):
    return np.full(q.shape, _NEG), q + self.offset


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  """Query i sees keys j with ``i - left <= j <= i + right`` (inclusive, the jax.nn convention)."""
  left: int
  right: int

  def _eval(self, xp, q, k, h):
    return (k >= q - self.left) & (k <= q + self.right)

  def _interval(self, q):
    return q - self.left, q + self.right


@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
  """Block-diagonal: positions attend within their chunk ``pos // size`` (Llama-4 style local
  chunks; compose with ``causal()`` for causal chunked attention)."""
  size: int

  def _eval(self, xp, q, k, h):
    return (q // self.size) == (k // self.size)

  def _interval(self, q):
    lo = (q // self.size) * self.size
    return lo, lo + self.size - 1


@dataclasses.dataclass(frozen=True)
class BlockCausal(Mask):
  """Causal at block granularity: key j visible iff ``j // block <= i // block``."""
  block: int

  def _eval(self, xp, q, k, h):
    return (k // self.block) <= (q // self.block)

  def _interval(self, q):
    return np.full(q.shape, _NEG), (q // self.block + 1) * self.block - 1


@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
  """Bidirectional over the first ``prefix_len`` positions, causal after: key j is visible iff
  ``j < prefix_len`` or ``j <= i``."""
  prefix_len: int

  def _eval(self, xp, q, k, h):
    return (k < self.prefix_len) | (k <= q)

  def _interval(self, q):
    return np.full(q.shape, _NEG), np.maximum(q, self.prefix_len - 1)


def full() -> Mask:
  """No masking."""
  return Full()


def causal(offset: int = 0) -> Mask:
  """Causal mask: key position ``j`` is visible from query position ``i`` iff ``j <= i + offset``.

  With the default bottom-right alignment this is the usual decoder mask also when
  ``Tq != Tk`` (a query block at the end of a longer key sequence)."""
  return Causal(_check_int("offset", offset))


def sliding_window(left: int, right: int = 0) -> Mask:
  """Local window: query ``i`` sees keys ``i - left <= j <= i + right`` (both inclusive).

  Sliding-window attention of Longformer (Beltagy et al. 2020, "Longformer: The
  Long-Document Transformer"); ``sliding_window(w - 1, 0)`` is the causal window of ``w``
  tokens of Mistral 7B (Jiang et al. 2023) and Gemma 2's local layers (compose with nothing
  else: it is already causal when ``right == 0``)."""
  return SlidingWindow(_check_int("left", left, 0), _check_int("right", right, 0))


def chunked(size: int) -> Mask:
  """Block-diagonal attention within chunks of ``size`` positions: query ``i`` sees key ``j``
  iff ``j // size == i // size``. Llama 4's chunked local attention layers (Meta 2025, "The
  Llama 4 herd", interleaved with global layers in iRoPE) use ``causal() & chunked(8192)``."""
  return Chunked(_check_int("size", size, 1))


def block_causal(block: int) -> Mask:
  """Block-causal mask: ``j // block <= i // block`` (full attention within a block, causal
  across blocks), as in block diffusion (Arriola et al. 2025, "Block Diffusion: Interpolating
  Between Autoregressive and Diffusion Language Models") and frame-causal video models."""
  return BlockCausal(_check_int("block", block, 1))


def prefix_lm(prefix_len: int) -> Mask:
  """Prefix-LM: key ``j`` is visible from query ``i`` iff ``j < prefix_len`` or ``j <= i``
  (full attention inside the prefix, causal afterwards): the prefix LM of UniLM (Dong et al.
  2019) and T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
  Text-to-Text Transformer"), also used by UL2 and PaliGemma."""
  return PrefixLM(_check_int("prefix_len", prefix_len, 0))


# ----------------------------------------------------------------------------------------------
# Combinators
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class And(Mask):
  """``a & b``: visible where both masks are (built by ``&``)."""
  a: Mask
  b: Mask

  def __post_init__(self):
    object.__setattr__(self, "per_head", self.a.per_head or self.b.per_head)

  def _eval(self, xp, q, k, h):
    return self.a._eval(xp, q, k, h) & self.b._eval(xp, q, k, h)

  def _np_eval(self, q, k, h):
    return self.a._np_eval(q, k, h) & self.b._np_eval(q, k, h)

  def _interval(self, q):
    ia, ib = self.a._interval(q), self.b._interval(q)
    if ia is None or ib is None:
      return None
    return np.maximum(ia[0], ib[0]), np.minimum(ia[1], ib[1])

  def validate(self, q_len, kv_len, num_heads):
    self.a.validate(q_len, kv_len, num_heads)
    self.b.validate(q_len, kv_len, num_heads)

  def _block_map(self, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads):
    if num_heads is None and self._interval(q_pos[:1]) is not None:
      return super()._block_map(q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads)
    if q_pos.size * kv_pos.size * (num_heads or 1) <= _EXACT_EVAL_LIMIT:
      return _dense_block_map(self, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads)
    ma, mb = (_child_block_map(m, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads)
              for m in (self.a, self.b))
    return np.where((ma == EMPTY) | (mb == EMPTY), EMPTY,
                    np.where((ma == FULL) & (mb == FULL), FULL, PARTIAL)).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class Or(Mask):
  """``a | b``: visible where either mask is (built by ``|``)."""
  a: Mask
  b: Mask

  def __post_init__(self):
    object.__setattr__(self, "per_head", self.a.per_head or self.b.per_head)

  def _eval(self, xp, q, k, h):
    return self.a._eval(xp, q, k, h) | self.b._eval(xp, q, k, h)

  def _np_eval(self, q, k, h):
    return self.a._np_eval(q, k, h) | self.b._np_eval(q, k, h)

  def validate(self, q_len, kv_len, num_heads):
    self.a.validate(q_len, kv_len, num_heads)
    self.b.validate(q_len, kv_len, num_heads)

  def _block_map(self, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads):
    if q_pos.size * kv_pos.size * (num_heads or 1) <= _EXACT_EVAL_LIMIT:
      return _dense_block_map(self, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads)
    ma, mb = (_child_block_map(m, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads)
              for m in (self.a, self.b))
    return np.where((ma == FULL) | (mb == FULL), FULL,
                    np.where((ma == EMPTY) & (mb == EMPTY), EMPTY, PARTIAL)).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class Not(Mask):
  """``~a``: visible where ``a`` is not (padding stays masked; built by ``~``)."""
  a: Mask

  def __post_init__(self):
    object.__setattr__(self, "per_head", self.a.per_head)

  def _eval(self, xp, q, k, h):
    return ~self.a._eval(xp, q, k, h)

  def _np_eval(self, q, k, h):
    return ~self.a._np_eval(q, k, h)

  def validate(self, q_len, kv_len, num_heads):
    self.a.validate(q_len, kv_len, num_heads)

  def _block_map(self, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads):
    if q_pos.size * kv_pos.size * (num_heads or 1) <= _EXACT_EVAL_LIMIT:
      return _dense_block_map(self, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads)
    m = _child_block_map(self.a, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads)
    flipped = np.where(m == FULL, EMPTY, np.where(m == EMPTY, FULL, PARTIAL)).astype(np.int8)
    # Padding is masked whatever the child says, so blocks holding padding cannot be FULL.
    return np.where(flipped == FULL, _padding_aware_full(q_valid, kv_valid, bq, bk, num_heads),
                    flipped).astype(np.int8)


def _padding_aware_full(q_valid, kv_valid, bq, bk, num_heads):
  whole_q = q_valid.reshape(-1, bq).all(axis=1)
  whole_k = kv_valid.reshape(-1, bk).all(axis=1)
  nonempty_q = q_valid.reshape(-1, bq).any(axis=1)
  nonempty_k = kv_valid.reshape(-1, bk).any(axis=1)
  full = whole_q[:, None] & whole_k[None, :]
  some = nonempty_q[:, None] & nonempty_k[None, :]
  out = np.where(full, FULL, np.where(some, PARTIAL, EMPTY))
  return out if num_heads is None else np.broadcast_to(out, (num_heads,) + out.shape)


def _child_block_map(m: Mask, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads):
  bm = m._block_map(q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads if m.per_head else None)
  if num_heads is not None and bm.ndim == 2:
    bm = np.broadcast_to(bm, (num_heads,) + bm.shape)
  return bm


@dataclasses.dataclass(frozen=True)
class PerHead(Mask):
  """Head ``h`` uses ``masks[h]``; the number of heads must equal ``len(masks)``."""
  masks: tuple

  per_head = True

  def _eval(self, xp, q, k, h):
    if h is None:
      raise ValueError("per_head masks need a head index: call mask_mod(q, k, head)")
    out = self.masks[-1]._eval(xp, q, k, h)
    for i in range(len(self.masks) - 2, -1, -1):
      out = xp.where(h == i, self.masks[i]._eval(xp, q, k, h), out)
    return out

  def _np_eval(self, q, k, h):
    if h is None:
      raise ValueError("per_head masks need a head index: call mask_mod(q, k, head)")
    out = self.masks[-1]._np_eval(q, k, h)
    for i in range(len(self.masks) - 2, -1, -1):
      out = np.where(h == i, self.masks[i]._np_eval(q, k, h), out)
    return out

  def validate(self, q_len, kv_len, num_heads):
    if num_heads != len(self.masks):
      raise ValueError(f"per_head mask holds {len(self.masks)} masks but the query has "
                       f"{num_heads} heads; they must be equal")
    for m in self.masks:
      m.validate(q_len, kv_len, num_heads)

  def _block_map(self, q_pos, q_valid, kv_pos, kv_valid, bq, bk, num_heads):
    if num_heads != len(self.masks):
      raise ValueError(f"per_head mask holds {len(self.masks)} masks but num_heads={num_heads}; "
                       f"they must be equal")
    maps = []
    for i, m in enumerate(self.masks):
      bm = _child_block_map(m, q_pos, q_valid, kv_pos, kv_valid, bq, bk,
                            num_heads if m.per_head else None)
      maps.append(bm[i] if bm.ndim == 3 else bm)
    return np.stack(maps).astype(np.int8)


def per_head(masks: Sequence[Mask]) -> Mask:
  """Stack one mask per query head: head ``h`` uses ``masks[h]`` (heterogeneous heads, e.g. a
  few global heads among local ones)."""
  masks = tuple(masks)
  if not masks:
    raise ValueError("per_head needs at least one mask, got an empty sequence")
  for i, m in enumerate(masks):
    if not isinstance(m, Mask):
      raise TypeError(f"per_head: masks[{i}] must be a Mask, got {type(m).__name__}")
  return PerHead(masks)


# ----------------------------------------------------------------------------------------------
# Strided heads (S2-Attention)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StridedHeads(Mask):
  """S2-Attention's per-head context shards; see :func:`strided_heads`."""
  stride: int
  local_window: int = 0
  block: int = 1
  offset: int = 0

  per_head = True

  def _eval(self, xp, q, k, h):
    if h is None:
      raise ValueError("strided_heads is a per-head mask: call mask_mod(q, k, head)")
    shard = ((k // self.block) + self.offset) % self.stride == h % self.stride
    local = (k >= q - self.local_window) & (k <= q + self.local_window)
    return shard | local

  def validate(self, q_len, kv_len, num_heads):
    if num_heads < self.stride:
      raise ValueError(
          f"strided_heads(stride={self.stride}) needs at least stride query heads so that the "
          f"heads together cover every key residue; the query has {num_heads} heads")


def strided_heads(stride: int, local_window: int = 0, *, block: int = 1, offset: int = 0) -> Mask:
  """Heterogeneous per-head context sharding (S2-Attention, Lin et al. 2024, "S2-Attention:
  Hardware-Aware Context Sharding Among Attention Heads").

  Head ``h`` sees key ``j`` iff ``((j // block) + offset) % stride == h % stride`` — each head
  holds a different shard of the context — or ``|i - j| <= local_window`` (the dense local
  window every head keeps). ``block=1`` shards tokens; ``block=64`` shards key blocks as
  DKernel does. Compose with ``causal()`` for decoder use. The union over heads covers the
  whole context only when the number of query heads is at least ``stride``; attention raises
  otherwise."""
  return StridedHeads(_check_int("stride", stride, 1), _check_int("local_window", local_window, 0),
                      _check_int("block", block, 1), _check_int("offset", offset))


# ----------------------------------------------------------------------------------------------
# Neighborhood attention (NATTEN semantics)
# ----------------------------------------------------------------------------------------------

def _na_axis(xp, qi, kj, length, k, d, s, is_causal):
  """Visibility of key coordinate kj from query coordinate qi along one axis (NATTEN)."""
  g = qi % d
  same_group = g == (kj % d)
  lg = (length - g + d - 1) // d  # length of dilation group g
  c, cj = qi // d, kj // d
  wl = k // 2
  wr = k // 2 + (k % 2) - 1
  if is_causal:
    leader = xp.minimum((c // s) * s + s - 1, lg - 1)
    start = xp.maximum(leader - wl - wr, 0)
    end = xp.minimum(c + 1, lg)
  else:
    leader = xp.minimum((c // s) * s + s // 2, lg - 1)
    start = xp.maximum(leader - wl, 0) + xp.where(leader + wr >= lg, lg - wr - leader - 1, 0)
    end = start + k
  return same_group & (cj >= start) & (cj < end)


@dataclasses.dataclass(frozen=True)
class Neighborhood(Mask):
  """NATTEN-semantics neighborhood on a row-major token grid; see :func:`neighborhood`."""
  spatial_shape: tuple
  kernel_size: tuple
  dilation: tuple
  stride: tuple
  causal: tuple

  def _coords(self, xp, idx):
    coords = []
    rem = idx
    for n in reversed(self.spatial_shape):
      coords.append(rem % n)
      rem = rem // n
    return coords[::-1]

  def _eval(self, xp, q, k, h):
    t = math.prod(self.spatial_shape)
    out = (q >= 0) & (q < t) & (k >= 0) & (k < t)  # positions off the grid see nothing
    qc, kc = self._coords(xp, q), self._coords(xp, k)
    for a, n in enumerate(self.spatial_shape):
      vis = _na_axis(xp, qc[a], kc[a], n, self.kernel_size[a], self.dilation[a], self.stride[a],
                     self.causal[a])
      out = out & vis
    return out

  @functools.cached_property
  def _axis_tables(self):
    tabs = []
    for a, n in enumerate(self.spatial_shape):
      i = np.arange(n)
      tabs.append(_na_axis(np, i[:, None], i[None, :], n, self.kernel_size[a], self.dilation[a],
                           self.stride[a], self.causal[a]))
    return tabs

  def _np_eval(self, q, k, h):
    # Separable per-axis lookup tables: much cheaper than the arithmetic on big grids.
    t = math.prod(self.spatial_shape)
    inside = (q >= 0) & (q < t) & (k >= 0) & (k < t)
    qc = self._coords(np, np.clip(q, 0, t - 1))
    kc = self._coords(np, np.clip(k, 0, t - 1))
    out = inside
    for tab, qa, ka in zip(self._axis_tables, qc, kc):
      out = out & tab[qa, ka]
    return out

  def validate(self, q_len, kv_len, num_heads):
    t = math.prod(self.spatial_shape)
    if q_len is None and kv_len is None:
      return
    if q_len != t or kv_len != t:
      raise ValueError(
          f"neighborhood mask over spatial_shape={self.spatial_shape} covers {t} tokens, but the "
          f"query has {q_len} and the key {kv_len} tokens; both must equal the product of "
          f"spatial_shape (row-major flattening)")


def _per_axis(name, value, ndim, minimum=None, kind=int):
  if isinstance(value, (list, tuple)):
    vals = tuple(value)
    if len(vals) != ndim:
      raise ValueError(f"{name} has {len(vals)} entries but spatial_shape has {ndim} axes")
  else:
    vals = (value,) * ndim
  out = []
  for i, v in enumerate(vals):
    if kind is bool:
      if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}[{i}] must be a bool, got {v!r}")
      out.append(bool(v))
    else:
      out.append(_check_int(f"{name}[{i}]", v, minimum))
  return tuple(out)


def neighborhood(spatial_shape, kernel_size, dilation=1, stride=1, causal=False) -> Mask:
  """Neighborhood attention over a 1-, 2- or 3-D token grid flattened row-major (NATTEN).

  Papers: Hassani et al. 2023 "Neighborhood Attention Transformer" (NA), Hassani & Shi 2022
  "Dilated Neighborhood Attention Transformer" (DiNA), Hassani et al. 2024 "Faster Neighborhood
  Attention" (causal NA), Hassani et al. 2025 "Generalized Neighborhood Attention" (stride).

  Per axis, with length ``L``, kernel ``k``, dilation ``d`` and stride ``s``: query and key must
  lie in the same dilation group (``i % d == j % d``); inside a group of length ``L_g`` with
  coordinates ``c = i // d``, queries are tiled by ``s`` and every query of a tile uses the window
  of the tile's leader ``min((c // s) * s + s // 2, L_g - 1)``: ``k`` keys centred on the leader
  (``k // 2`` left, ``k // 2 + k % 2 - 1`` right) shifted inward at the borders so that every
  query sees exactly ``k`` keys per axis. A causal axis uses leader
  ``min((c // s) * s + s - 1, L_g - 1)`` and keys ``[max(leader - k + 1, 0), c]``. ``s = 1`` is
  sliding NA, ``s = k`` is blocked window attention. A key is visible iff it is visible on every
  axis. ``kernel_size``, ``dilation``, ``stride`` and ``causal`` are ints/bools or per-axis
  tuples; ``kernel_size * dilation`` may not exceed the axis length and ``stride`` may not exceed
  ``kernel_size``."""
  if isinstance(spatial_shape, (int, np.integer)):
    spatial_shape = (spatial_shape,)
  if not isinstance(spatial_shape, (tuple, list)) or not 1 <= len(spatial_shape) <= 3:
    raise ValueError(f"spatial_shape must be a tuple of 1 to 3 axis lengths, got {spatial_shape!r}")
  shape = tuple(_check_int(f"spatial_shape[{i}]", n, 1) for i, n in enumerate(spatial_shape))
  nd = len(shape)
  ks = _per_axis("kernel_size", kernel_size, nd, 1)
  dil = _per_axis("dilation", dilation, nd, 1)
  st = _per_axis("stride", stride, nd, 1)
  ca = _per_axis("causal", causal, nd, kind=bool)
  for a in range(nd):
    if ks[a] * dil[a] > shape[a]:
      raise ValueError(
          f"kernel_size[{a}]={ks[a]} x dilation[{a}]={dil[a]} = {ks[a] * dil[a]} exceeds "
          f"spatial_shape[{a}]={shape[a]}; the window must fit in the axis")
    if st[a] > ks[a]:
      raise ValueError(f"stride[{a}]={st[a]} exceeds kernel_size[{a}]={ks[a]}; allowed: "
                       f"1 <= stride <= kernel_size")
  return Neighborhood(shape, ks, dil, st, ca)


# ----------------------------------------------------------------------------------------------
# User masks
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class FromFunction(Mask):
  """A user mask function; see :func:`from_function`."""
  fn: Callable
  takes_head: bool = False

  def __post_init__(self):
    object.__setattr__(self, "per_head", self.takes_head)

  def _eval(self, xp, q, k, h):
    if self.takes_head:
      if h is None:
        raise ValueError("this mask function takes a head index: call mask_mod(q, k, head)")
      return self._checked(self.fn(h, q, k))
    return self._checked(self.fn(q, k))

  def _checked(self, out):
    # Visibility is combined with '&' (masks, padding, segment ids): an integer result would
    # combine bitwise (2 & True == 0) and silently hide keys, so only booleans are accepted.
    if isinstance(out, (bool, np.bool_)):
      return np.bool_(out)
    dtype = getattr(out, "dtype", None)
    if dtype is None or dtype != np.bool_:
      got = f"dtype {dtype}" if dtype is not None else type(out).__name__
      raise TypeError(f"masks.from_function: the mask function {_fn_name(self.fn)} must return a "
                      f"boolean array (True = visible), got {got}; compare instead, e.g. "
                      f"`(kv_idx <= q_idx)`, or cast with `.astype(bool)`")
    return out

  def _np_eval(self, q, k, h):
    with jax.ensure_compile_time_eval():
      args = [jnp.asarray(x) for x in ((h, q, k) if self.takes_head else (q, k))]
      out = self._checked(self.fn(*args))
    return np.asarray(out, dtype=bool)

  def __hash__(self):
    return hash((FromFunction, self.fn, self.takes_head))

  def __eq__(self, other):
    return (isinstance(other, FromFunction) and other.fn is self.fn
            and other.takes_head == self.takes_head)


def _fn_name(fn) -> str:
  return repr(getattr(fn, "__qualname__", None) or type(fn).__name__)


def from_function(fn: Callable, *, per_head: bool = False) -> Mask:
  """Wrap a user ``mask_mod(q_idx, kv_idx) -> bool`` (``mask_mod(head, q_idx, kv_idx)`` with
  ``per_head=True``), FlexAttention's ``mask_mod`` (Dong et al. 2024, "Flex Attention: A
  Programming Model for Generating Optimized Attention Kernels"). It receives broadcastable
  integer position arrays and must use ``jnp`` operations (no Python control flow on values)
  and return a boolean array (``True`` = visible; other dtypes raise ``TypeError``). Its block
  map is computed by evaluating it once per problem shape at trace time."""
  if not callable(fn):
    raise TypeError(f"from_function needs a callable mask_mod, got {type(fn).__name__}")
  return FromFunction(fn, bool(per_head))


@dataclasses.dataclass(frozen=True, eq=False)
class Dense(Mask):
  """A given boolean ``[Tq, Tk]`` array; see :func:`dense`."""
  array: np.ndarray
  digest: str

  def _eval(self, xp, q, k, h):
    tq, tk = self.array.shape
    row = q - (tk - tq)  # same bottom-right convention as the positions
    inside = (row >= 0) & (row < tq) & (k >= 0) & (k < tk)
    arr = self.array if xp is np else jnp.asarray(self.array)
    return inside & arr[xp.clip(row, 0, tq - 1), xp.clip(k, 0, tk - 1)]

  def validate(self, q_len, kv_len, num_heads):
    if q_len is None and kv_len is None:
      return
    if self.array.shape != (q_len, kv_len):
      raise ValueError(f"dense mask has shape {self.array.shape} but the problem is "
                       f"[Tq, Tk] = [{q_len}, {kv_len}]; they must match")

  def __hash__(self):
    return hash((Dense, self.digest))

  def __eq__(self, other):
    return isinstance(other, Dense) and other.digest == self.digest

  def __repr__(self):
    return f"Dense(shape={self.array.shape}, digest={self.digest[:8]})"


def dense(array) -> Mask:
  """A given boolean ``[Tq, Tk]`` mask (``True`` = visible). Must be concrete (numpy or a
  non-traced array); for traced, data-dependent masks use ``bias`` or ``segment_ids``.

  Row ``i`` is query position ``i + Tk - Tq`` (bottom-right aligned, like every mask) and
  column ``j`` key position ``j``. With explicit ``q_positions``/``kv_positions``, a position
  outside the array sees nothing (as off-grid positions of :func:`neighborhood` masks): that is
  how padded query slots of a KV-cache step behave, so it is not an error."""
  if isinstance(array, jax.core.Tracer):
    raise TypeError("masks.dense needs a concrete array (it builds a static block map); got a "
                    "traced value. Pass traced masks as an additive `bias` instead")
  arr = np.asarray(array)
  if arr.ndim != 2:
    raise ValueError(f"masks.dense needs a 2-D [Tq, Tk] array, got shape {arr.shape}")
  if arr.dtype != bool:
    raise TypeError(f"masks.dense needs a boolean array, got dtype {arr.dtype}")
  arr = np.ascontiguousarray(arr)
  arr.setflags(write=False)
  return Dense(arr, hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest())


def as_mask(mask: Any) -> Mask:
  """Normalize the ``mask`` argument of attention: None, a Mask, or a sequence (per head)."""
  if mask is None:
    return Full()
  if isinstance(mask, Mask):
    return mask
  if isinstance(mask, (list, tuple)):
    return per_head(mask)
  if isinstance(mask, (np.ndarray, jax.Array)):
    raise TypeError("mask must be an attnjax.masks.Mask; wrap a boolean [Tq, Tk] array with "
                    "masks.dense(array), or pass an additive float array as bias=")
  raise TypeError(f"mask must be an attnjax.masks.Mask, a sequence of them (one per head) or "
                  f"None; got {type(mask).__name__}")


__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Mask", "full", "causal", "sliding_window", "chunked",
    "block_causal", "prefix_lm", "neighborhood", "strided_heads", "per_head", "from_function",
    "dense", "block_map_from_positions", "as_mask",
]
