"""Blockwise online-softmax attention (FlashAttention's algorithm) in pure JAX.

Work follows the mask's static block map: EMPTY blocks are never visited, FULL blocks skip mask
evaluation, PARTIAL blocks evaluate ``mask_mod`` on the tile's index grid. The forward pass is a
``lax.scan`` over query blocks; for each, inner loops run over that block's FULL and PARTIAL key
blocks, with trip counts and tile start positions read from per-row visit tables built from the
block map, and the running max, denominator and output accumulator (float32; float64 for
float64 inputs) stay local to the query block. Memory is ``O(T * D)`` and time is proportional
to the number of non-empty blocks.
Segment ids add a run-time skip: a tile whose query and key segment-id ranges are disjoint for
the whole batch costs a branch, not a tile. By default the forward keeps each row's maximum
fixed after the query block's first tile (no per-tile max reduction or rescaling; exact, with a
detected fallback to the running maximum: see ``_forward``'s ``fixed_max``).

Narrow masks (sliding windows, local neighborhoods) can instead run as a *band*: each query
block computes one key tile that spans its visible keys, starting at its first visible key
(tiles may start anywhere, not only at block boundaries), in one masked matmul pair. Fewer
scores are computed than with aligned tiles (a 128-row block under a window of 512 computes
640 keys per row, against 1024 for 512 x 512 tiles) and the softmax needs no online update.

The backward pass is a custom VJP with the same loop structure that recomputes each visited tile
from the saved LSE (no ``[Tq, Tk]`` residual): dQ accumulates locally per query block, dK, dV,
sink and score-mod parameter gradients into the key range of each tile (band tiles overlap, and
add). Per-head masks are served by grouping heads whose block maps agree and running each group
with its own visit tables.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax import scores as scores_lib
from attnjax.backends import base

f32 = jnp.float32


_LARGE_TILE_MIN_LEN = 2048   # automatic tiles: 512 x 512 from this length on, else 256 x 256
# Fixed-max forward (see ``_forward``): a query block's result is kept when every row's
# denominator l = sum_j exp(s_j - m) lies in [e^-50, inf) and the accumulator is finite. Below
# e^-50 the terms near the row's true maximum could be subnormal (then max_j exp(s_j - m) >=
# e^-50 / n_keys still leaves them normal); inf means m was more than ~80 below the maximum.
_FIXED_MAX_MIN_DENOM = float(np.exp(-50.0))
_FIXED_MAX_DTYPES = frozenset({"float32", "bfloat16", "float64"})   # 8+ exponent bits


# Automatic band (see ChunkedBackend): query blocks of 128 rows, chosen when the band computes at
# most 0.75 of the tiles' score elements and one band tile holds at most 4 tile budgets. At
# T=8192 (sliding window 511, 2-core CPU, 7 interleaved rounds) 128-row bands were faster than
# 64 and 256 rows forward (92 ms against 108 and 105) and forward+backward (262 against 282
# and 333); 512 x 512 tiles took 146 and 445 ms (BENCHMARKS.md).
_BAND_BLOCK_Q = 128
_BAND_MAX_WORK = 0.75
_BAND_MAX_TILE = 4


def _round_up(x, m):
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True, eq=False)
class _Config:
  """Static description of one head group's computation."""
  B: int
  Hk: int
  G: int
  bq: int
  bk: int
  nq: int
  kv_len: int
  scale: float
  mask: masks_lib.Mask
  heads: np.ndarray | None      # global query-head ids [Hk*G] for a subset group, else None
  head_ids: np.ndarray          # [Hk*G] global ids of the tile's heads (score-mod order)
  tables: tuple                 # per-row visit tables: ((counts [nq], starts [nq, n], masked),)
  band: bool                    # one key band of width bk per query block (see _band_tables)
  mod: Any                      # bound ScoreMod or None
  has_seg: bool
  has_sinks: bool
  acc: Any = jnp.float32        # logits, softmax state and accumulators (float64 inputs: float64)
  fixed_max: bool = False       # forward: row max fixed after the first tile (see _forward)
  on_visit: Any = None          # debugging hook, see ChunkedBackend


def _tile_logits(cfg: _Config, qt, kt):
  """Logits of one tile, ``[B, Hs, bq, bk]`` in ``cfg.acc``, from pre-scaled queries ``qt``
  ``[B, Hk, G*bq, D]`` and keys ``kt`` ``[B, Hk, bk, D]`` (XLA:CPU runs this transposed-RHS
  matmul as fast as with keys transposed to ``[D, bk]``, so the tile copy leaves them rows)."""
  s = jnp.einsum("bhqd,bhkd->bhqk", qt, kt, preferred_element_type=cfg.acc)
  return s.reshape(cfg.B, cfg.Hk * cfg.G, cfg.bq, cfg.bk)


def _tile_index(cfg: _Config, i, k0, qpos, kvpos):
  qi = _at(qpos, i)[:, None, :, None]      # [Bp, 1, bq, 1]
  kj = _kv_cols(kvpos, k0, cfg)[:, None, None, :]     # [Bp, 1, 1, bk]
  b = jnp.arange(cfg.B, dtype=jnp.int32)[:, None, None, None]
  h = jnp.asarray(cfg.head_ids, jnp.int32)[None, :, None, None]
  return b, h, qi, kj


def _tile_visibility(cfg: _Config, i, k0, qi, kj, h, qseg, kvseg, masked: bool):
  vis = None
  if masked:
    vis = cfg.mask.mask_mod(qi, kj, h if cfg.mask.per_head else None)
    kv_valid = (k0 + jnp.arange(cfg.bk)) < cfg.kv_len
    vis = vis & kv_valid[None, None, None, :]
  if cfg.has_seg:
    same = _at(qseg, i)[:, None, :, None] == _kv_cols(kvseg, k0, cfg)[:, None, None, :]
    vis = same if vis is None else vis & same
  if vis is None:
    return None
  return jnp.broadcast_to(vis, (cfg.B, cfg.Hk * cfg.G, cfg.bq, cfg.bk))


def _at(x, i):
  """``x[i]`` along the leading (block) axis, without negative-index handling."""
  return jax.lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False)


def _kv_cols(x, k0, cfg: _Config):
  """Key-side per-position data [B, Tkp] (positions, segment ids) of the tile at key ``k0``."""
  return jax.lax.dynamic_slice_in_dim(x, k0, cfg.bk, axis=1)


def _seg_disjoint(cfg: _Config, i, k0, qseg, kvseg):
  """True when no batch element's query segment-id range (block ``i``) overlaps the key range
  of the tile at ``k0``: the tile sees nothing and is skipped at run time."""
  qs, ks = _at(qseg, i), _kv_cols(kvseg, k0, cfg)          # [B, bq], [B, bk]
  qmin, qmax = qs.min(axis=-1), qs.max(axis=-1)
  kmin, kmax = ks.min(axis=-1), ks.max(axis=-1)
  return jnp.all((qmax < kmin) | (kmax < qmin))


# Query-side blocks are [nq, B, Hk, G*bq, X]: within a block, rows run over (g, q) so that one
# plain batched matmul per tile serves all query heads of a key/value head (GQA without repeat),
# and [Hk, G*bq] reshapes for free to the score-mod layout [Hk*G, bq].
def _blocks_q(x, cfg: _Config):
  """Token-major [B, Tqp, Hk*G, X] -> [nq, B, Hk, G*bq, X]."""
  B, _, _, X = x.shape
  x = x.reshape(B, cfg.nq, cfg.bq, cfg.Hk, cfg.G, X).transpose(1, 0, 3, 4, 2, 5)
  return x.reshape(cfg.nq, B, cfg.Hk, cfg.G * cfg.bq, X)


def _unblocks_q(x, cfg: _Config):
  """[nq, B, Hk, G*bq, X] -> token-major [B, Tqp, Hk*G, X]."""
  nq, B, Hk, _, X = x.shape
  x = x.reshape(nq, B, Hk, cfg.G, cfg.bq, X).transpose(1, 0, 4, 2, 3, 5)
  return x.reshape(B, nq * cfg.bq, Hk * cfg.G, X)


# Query, key and value tiles are read straight from the caller's token-major arrays
# [B, T, H, X]: a dynamic slice along T and a transpose to head-major, which XLA fuses into the
# one copy a slice costs anyway. Re-laying the whole arrays out first (head-major [B, H, T, X])
# kept three more T-sized arrays alive: at T=16384 (causal, 2-core CPU) the compiled temp
# memory is 52 MiB forward and 92.5 MiB for grad(sum(out)) instead of 124 and 188.5. The time is
# the same within noise (paired A/B at T=8100: 0.98-1.01, one 1.14 in a noisy round): the
# transposing tile copies cost about what the whole-array copies did.
def _kv_tile(x, k0, cfg: _Config):
  """[B, Tkp, Hk, X] -> the key tile starting at position ``k0``: [B, Hk, bk, X]."""
  return jax.lax.dynamic_slice_in_dim(x, k0, cfg.bk, axis=1).transpose(0, 2, 1, 3)


def _acc_tile(x, k0, cfg: _Config):
  """Head-major accumulator [B, Hk, Tkp, X] -> its tile at key ``k0``: [B, Hk, bk, X]."""
  return jax.lax.dynamic_slice_in_dim(x, k0, cfg.bk, axis=2)


def _q_tile(x, i, cfg: _Config, scale=False):
  """[B, Tqp, Hk*G, X] -> query block ``i``: [B, Hk, G*bq, X] (pre-scaled queries with
  ``scale``: done per tile, as one more pass over the whole array cost more)."""
  t = jax.lax.dynamic_slice_in_dim(x, i * cfg.bq, cfg.bq, axis=1).transpose(0, 2, 1, 3)
  t = t.reshape(cfg.B, cfg.Hk, cfg.G * cfg.bq, x.shape[-1])
  return _prescale(t, cfg) if scale else t


def _row_sinks(cfg: _Config, sinks):
  """Sink logit of every query row of a block: [Hk, G*bq] in ``cfg.acc``."""
  per_head = sinks.astype(cfg.acc)[cfg.head_ids].reshape(cfg.Hk, cfg.G)
  return jnp.repeat(per_head, cfg.bq, axis=1)


def _tile_tables(bm: np.ndarray, bk: int):
  """Per query block, the key tiles to visit: ``((counts [nq], starts [nq, n], masked),)`` for
  the FULL and the PARTIAL blocks of the block map ``[nq, nk]`` (kinds with no tile are left
  out); ``starts`` are first key positions, ascending per row."""
  tables = []
  for kind, masked in ((masks_lib.FULL, False), (masks_lib.PARTIAL, True)):
    pairs = np.argwhere(bm == kind)
    if not len(pairs):
      continue
    counts = np.bincount(pairs[:, 0], minlength=bm.shape[0]).astype(np.int32)
    index = np.zeros((bm.shape[0], max(1, int(counts.max()))), np.int32)
    fill = np.zeros(bm.shape[0], np.int64)
    for i, j in pairs:                     # argwhere order: ascending key block per row
      index[i, fill[i]] = j * bk
      fill[i] += 1
    tables.append((counts, index, masked))
  return tuple(tables)


def _band_span(fbm: np.ndarray, step: int):
  """Key span of each query block in a fine block map ``[nq, nkf]`` (key blocks of ``step``):
  ``(first [nq], width)``, ``first[i]`` the first key position of row ``i``'s first non-empty
  block (-1 for a row that sees nothing) and ``width`` the widest row span, in positions."""
  nonempty = fbm != masks_lib.EMPTY
  has = nonempty.any(axis=1)
  lo = np.where(has, nonempty.argmax(axis=1), 0)
  hi = np.where(has, fbm.shape[1] - nonempty[:, ::-1].argmax(axis=1), 0)
  width = int((hi - lo).max()) * step if has.any() else step
  return np.where(has, lo * step, -1).astype(np.int64), width


def _band_tables(first: np.ndarray, width: int, kv_len_padded: int):
  """The band's visit table: one masked tile of ``width`` keys per query block that sees
  anything, starting at its first visible block (moved left where it would run past the
  padded keys: the extra keys are masked like any other)."""
  counts = (first >= 0).astype(np.int32)
  starts = np.minimum(np.maximum(first, 0), kv_len_padded - width).astype(np.int32)
  return ((counts, starts[:, None], True),)


@dataclasses.dataclass(frozen=True, eq=False)
class BandPlan:
  """A band computation: query blocks of ``block_q`` rows, key starts on multiples of ``step``,
  and per head group ``(heads, first, width)``: ``heads`` the group's query heads (``None``:
  all), ``first`` [nq] each block's first visible key (-1: sees nothing), ``width`` its tile."""
  block_q: int
  step: int
  groups: tuple

  @property
  def width(self) -> int:
    return max(w for _, _, w in self.groups)


def _interval_spans(p: base.Problem, bq: int, step: int):
  """``(first, width)`` as :func:`_band_span` gives it, in O(Tq) from the mask's per-query key
  intervals (default positions, masks that have them), or None."""
  if not p.default_positions or p.mask.per_head:
    return None
  q = np.arange(p.q_len, dtype=np.int64) + (p.kv_len - p.q_len)
  iv = p.mask._interval(q)
  if iv is None:
    return None
  lo = np.maximum(np.asarray(iv[0], np.int64), 0)
  hi = np.minimum(np.asarray(iv[1], np.int64), p.kv_len - 1)
  sees = lo <= hi
  nq = -(-p.q_len // bq)
  pad = nq * bq - p.q_len
  big = np.iinfo(np.int64).max
  lo = np.pad(np.where(sees, lo, big), (0, pad), constant_values=big).reshape(nq, bq).min(1)
  hi = np.pad(np.where(sees, hi, -1), (0, pad), constant_values=-1).reshape(nq, bq).max(1)
  has = hi >= 0
  first_blk, last_blk = np.where(has, lo // step, 0), np.where(has, hi // step, -1)
  width = int((last_blk - first_blk + 1).max()) * step if has.any() else step
  return np.where(has, first_blk * step, -1).astype(np.int64), width


def _band_plan(p: base.Problem, bq: int, step: int) -> BandPlan:
  """Band spans per head group: from the mask's intervals when it has them, else from its
  static block map at ``bq x step`` resolution."""
  fast = _interval_spans(p, bq, step)
  if fast is not None:
    return BandPlan(bq, step, ((None,) + fast,))
  fbm = base.static_block_map(p, bq, step)
  groups = _group_heads(fbm)
  if fbm.shape[0] == 1 or len(groups) == 1:
    groups = [(None, groups[0][1])]
  return BandPlan(bq, step, tuple((hs,) + _band_span(g, step) for hs, g in groups))


def _visit(cfg: _Config, kind: str, i, k0):
  if cfg.on_visit is not None:
    if cfg.band:
      kind, j = kind + "_band", k0
    else:
      j = k0 // cfg.bk
    jax.debug.callback(lambda i_, j_: cfg.on_visit(kind, int(i_), int(j_)), i, j, ordered=False)


def _prescale(q, cfg: _Config):
  return (q.astype(cfg.acc) * cfg.scale).astype(q.dtype)


# ------------------------------------------------------------------------------------ forward
def _forward(cfg: _Config, q, k, v, sinks, params, qseg, kvseg, qpos, kvpos):
  rows = cfg.G * cfg.bq
  shape = (cfg.B, cfg.Hk, rows)
  tile_shape = (cfg.B, cfg.Hk, rows, cfg.bk)
  np_tables = cfg.tables
  tables = [(jnp.asarray(c), jnp.asarray(x), masked) for c, x, masked in np_tables]

  def tile(masked, i, k0, qt, carry, fixed):
    m_old, l_old, a_old = carry
    _visit(cfg, "fwd", i, k0)
    b, h, qi, kj = _tile_index(cfg, i, k0, qpos, kvpos)
    s = _tile_logits(cfg, qt, _kv_tile(k, k0, cfg))
    if cfg.mod is not None:
      ptile = cfg.mod.tile_params(params, i * cfg.bq, cfg.bq, k0, cfg.bk, cfg.heads)
      s = cfg.mod.fn(ptile, s, b, h, qi, kj)
    vis = _tile_visibility(cfg, i, k0, qi, kj, h, qseg, kvseg, masked)
    if vis is not None:
      s = jnp.where(vis, s, -jnp.inf)
    s = s.reshape(tile_shape)
    if fixed:
      # m_old stays the row's reference maximum: no max reduction, no rescaling.
      p = jnp.exp(s - m_old[..., None])
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), _kv_tile(v, k0, cfg),
                      preferred_element_type=cfg.acc)
      return m_old, l_old + p.sum(axis=-1), a_old + pv
    m_new = jnp.maximum(m_old, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_old - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    l_new = alpha * l_old + p.sum(axis=-1)
    pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), _kv_tile(v, k0, cfg),
                    preferred_element_type=cfg.acc)
    return m_new, l_new, alpha[..., None] * a_old + pv

  def visit(masked, i, k0, qt, c, fixed):
    if not cfg.has_seg:
      return tile(masked, i, k0, qt, c, fixed)
    return jax.lax.cond(_seg_disjoint(cfg, i, k0, qseg, kvseg), lambda c_: c_,
                        lambda c_: tile(masked, i, k0, qt, c_, fixed), c)

  # Inside shard_map (check_vma) the softmax state varies with the device's inputs: fresh
  # initial values are typed that way so loop carries and switch branches agree.
  varying = base.varying_axes(q, k, v, sinks, params, qseg, kvseg, qpos, kvpos)

  def init_state():
    init = (jnp.full(shape, -jnp.inf, cfg.acc), jnp.zeros(shape, cfg.acc),
            jnp.zeros(shape + (v.shape[-1],), cfg.acc))
    return base.cast_varying(init, varying)

  def visit_rest(i, qt, carry, fixed, starts):
    for (counts, index, masked), start in zip(tables, starts):
      row_index = index[i]

      def body(t, c, masked=masked, row_index=row_index):
        return visit(masked, i, row_index[t], qt, c, fixed)

      carry = jax.lax.fori_loop(start, counts[i], body, carry)
    return carry

  def online(i, qt):
    return visit_rest(i, qt, init_state(), False, [0] * len(tables))

  if cfg.fixed_max:
    # The block's first tile ("anchor"): which table holds it, per query block (len = none).
    anchor_np = np.full(cfg.nq, len(np_tables), np.int32)
    for t in reversed(range(len(np_tables))):
      anchor_np[np_tables[t][0] > 0] = t
    anchor = jnp.asarray(anchor_np)

  def fixed_max(i, qt):
    """The block's first key tile runs the online update, which sets each row's maximum m to
    the largest logit of that tile (0 where the tile hides the whole row); every further tile
    reuses m: ``exp(s - m)`` with no max reduction and no rescaling of the accumulator. This is
    exact (floats are relative) while no logit exceeds m by more than ~80 (overflow) and the
    row's terms are not all below e^-87 (underflow); since m is a real logit of the row, both
    fail only for rows spanning ~80 nats or seeing no key. Those blocks are detected (the
    denominator outside [e^-50, inf) or a non-finite accumulator) and recomputed with the
    running maximum, in a while loop of at most one trip: under ``vmap`` it runs only when
    some member needs it (a ``cond`` would become a select that always runs both)."""
    branches = [
        (lambda c, t=t: visit(np_tables[t][2], i, tables[t][1][i, 0], qt, c, False))
        for t in range(len(tables))] + [lambda c: c]
    m, l, acc = jax.lax.switch(anchor[i], branches, init_state())
    carry = (jnp.where(m == -jnp.inf, 0.0, m), l, acc)
    starts = [(anchor[i] == t).astype(jnp.int32) for t in range(len(tables))]
    carry = visit_rest(i, qt, carry, True, starts)
    l, acc = carry[1], carry[2]
    redo = ~(jnp.all((l >= _FIXED_MAX_MIN_DENOM) & (l < jnp.inf))
             & jnp.all(jnp.isfinite(acc)))
    carry, _ = jax.lax.while_loop(lambda st: st[1], lambda st: (online(i, qt), st[1] & False),
                                  (carry, redo))
    return carry

  # One query block at a time (outer scan), its key blocks in inner loops whose trip counts
  # come from the static visit tables: the running max, denominator and accumulator of the
  # block stay loop-local (no scatter into a [nq, ...] carry per tile).
  def row(_, i):
    qt = _q_tile(q, i, cfg, scale=True)
    m, l, acc = fixed_max(i, qt) if cfg.fixed_max else online(i, qt)
    has = l > 0
    safe_l = jnp.where(has, l, 1.0)
    lse = jnp.where(has, m + jnp.log(safe_l), -jnp.inf)
    if cfg.has_sinks:
      lse_tot = jnp.logaddexp(lse, _row_sinks(cfg, sinks))
      out = acc * jnp.where(has, jnp.exp(m - lse_tot), 0.0)[..., None]
    else:
      lse_tot = lse
      out = acc / safe_l[..., None]
    return None, (out, lse_tot)

  _, (out, lse) = jax.lax.scan(row, None, jnp.arange(cfg.nq, dtype=jnp.int32))
  return out, lse  # blocked: [nq, B, Hk, G*bq, Dv], [nq, B, Hk, G*bq]


# ----------------------------------------------------------------------------------- backward
def _backward(cfg: _Config, res, g_out, g_lse):
  q, k, v, sinks, params, qseg, kvseg, qpos, kvpos, out_b, lse_b = res
  varying = base.varying_axes(res, g_out, g_lse)   # typing of fresh carries in shard_map
  qb = _blocks_q(_prescale(q, cfg), cfg)
  dob = _blocks_q(g_out, cfg)
  # dL/ds_ij = p_ij * (dp_ij - delta_i); an LSE cotangent adds p_ij * g_lse_i.
  delta = jnp.sum(dob.astype(cfg.acc) * out_b, axis=-1)          # [nq, B, Hk, G*bq]
  delta = delta - _blocks_q(g_lse.astype(cfg.acc)[..., None], cfg)[..., 0]
  lse_safe = jnp.where(jnp.isfinite(lse_b), lse_b, jnp.inf)  # rows that saw nothing: p = 0
  rows = cfg.G * cfg.bq
  tile_shape = (cfg.B, cfg.Hk, rows, cfg.bk)
  flat_shape = (cfg.B, cfg.Hk * cfg.G, cfg.bq, cfg.bk)
  mod = cfg.mod
  tables = [(jnp.asarray(c), jnp.asarray(x), masked) for c, x, masked in cfg.tables]

  def tile(masked, i, k0, qt, do, lse_i, delta_i, carry):
    dq, dk, dv, dparams = carry
    _visit(cfg, "bwd", i, k0)
    b, h, qi, kj = _tile_index(cfg, i, k0, qpos, kvpos)
    kt, vt = _kv_tile(k, k0, cfg), _kv_tile(v, k0, cfg)
    s = _tile_logits(cfg, qt, kt)
    mod_vjp = None
    if mod is not None:
      ptile = mod.tile_params(params, i * cfg.bq, cfg.bq, k0, cfg.bk, cfg.heads)
      s, mod_vjp = jax.vjp(lambda s_, p_: mod.fn(p_, s_, b, h, qi, kj), s, ptile)
    vis = _tile_visibility(cfg, i, k0, qi, kj, h, qseg, kvseg, masked)
    p = jnp.exp(s.reshape(tile_shape) - lse_i[..., None])
    if vis is not None:
      p = jnp.where(vis.reshape(tile_shape), p, 0.0)
    dv_t = jnp.einsum("bhqk,bhqd->bhkd", p.astype(do.dtype), do,
                      preferred_element_type=cfg.acc)
    dp = jnp.einsum("bhqd,bhkd->bhqk", do, vt, preferred_element_type=cfg.acc)
    ds = p * (dp - delta_i[..., None])
    if mod_vjp is not None:
      ds_flat, dpt = mod_vjp(ds.reshape(flat_shape))
      dpt = jax.tree.map(lambda x: _acc_cotangent(x, cfg.acc), dpt)
      ds = ds_flat.reshape(tile_shape)
      dparams = mod.untile_add(dparams, dpt, i * cfg.bq, k0, cfg.heads)
    # s = (scale * q) . k, so dk takes the pre-scaled queries and dq gets the scale.
    dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k.dtype), kt,
                         preferred_element_type=cfg.acc) * cfg.scale
    dk_t = jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q.dtype), qt,
                      preferred_element_type=cfg.acc)
    upd = jax.lax.dynamic_update_slice_in_dim
    dk = upd(dk, _acc_tile(dk, k0, cfg) + dk_t, k0, 2)
    dv = upd(dv, _acc_tile(dv, k0, cfg) + dv_t, k0, 2)
    return dq, dk, dv, dparams

  # Outer scan over query blocks (dQ of the block stays loop-local), inner loops over the
  # block's key tiles from the visit tables; dK/dV accumulate into each tile's key range.
  def row(carry, xs):
    i, qt, do, lse_i, delta_i = xs
    dk, dv, dparams = carry
    dq = base.cast_varying(jnp.zeros(qt.shape, cfg.acc), varying)
    inner = (dq, dk, dv, dparams)
    for counts, index, masked in tables:
      row_index = index[i]

      def body(t, c, masked=masked, row_index=row_index):
        k0 = row_index[t]
        run = lambda c_: tile(masked, i, k0, qt, do, lse_i, delta_i, c_)
        if not cfg.has_seg:
          return run(c)
        return jax.lax.cond(_seg_disjoint(cfg, i, k0, qseg, kvseg), lambda c_: c_, run, c)

      inner = jax.lax.fori_loop(0, counts[i], body, inner)
    dq, dk, dv, dparams = inner
    return (dk, dv, dparams), dq

  dparams0 = jax.tree.map(lambda p: jnp.zeros(p.shape, cfg.acc), params)
  # dK/dV accumulate head-major [B, Hk, Tkp, X], so a tile update is a contiguous slice.
  head_major = lambda x: (x.shape[0], x.shape[2], x.shape[1], x.shape[3])
  carry = base.cast_varying((jnp.zeros(head_major(k), cfg.acc),
                             jnp.zeros(head_major(v), cfg.acc), dparams0),
                            varying)
  (dk, dv, dparams), dq = jax.lax.scan(
      row, carry, (jnp.arange(cfg.nq, dtype=jnp.int32), qb, dob, lse_safe, delta))
  dq = _unblocks_q(dq, cfg).reshape(q.shape).astype(q.dtype)
  dk, dv = dk.transpose(0, 2, 1, 3).astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype)
  dsinks = None
  if cfg.has_sinks:
    p_sink = jnp.exp(_row_sinks(cfg, sinks) - lse_safe)      # [nq, B, Hk, G*bq]
    contrib = -(p_sink * delta).reshape(cfg.nq, cfg.B, cfg.Hk, cfg.G, cfg.bq)
    per_head = jnp.sum(contrib, axis=(0, 1, 4)).reshape(-1)   # [Hk*G]
    dsinks = jnp.zeros(sinks.shape, cfg.acc).at[cfg.head_ids].add(per_head)
    dsinks = dsinks.astype(sinks.dtype)
  dparams = jax.tree.map(scores_lib.param_cotangent, dparams, params)
  return dq, dk, dv, dsinks, dparams, None, None, None, None


def _acc_cotangent(x, dtype):
  """A tile cotangent in the accumulation dtype (``float0`` cotangents of integer params
  become zeros)."""
  if x.dtype == jax.dtypes.float0:
    return jnp.zeros(x.shape, dtype)
  return x.astype(dtype)


def _make_core(cfg: _Config):
  @jax.custom_vjp
  def core(q, k, v, sinks, params, qseg, kvseg, qpos, kvpos):
    out_b, lse_b = _forward(cfg, q, k, v, sinks, params, qseg, kvseg, qpos, kvpos)
    return _unblocks_q(out_b, cfg), _unblocks_q(lse_b[..., None], cfg)[..., 0]

  def fwd(q, k, v, sinks, params, qseg, kvseg, qpos, kvpos):
    out_b, lse_b = _forward(cfg, q, k, v, sinks, params, qseg, kvseg, qpos, kvpos)
    res = (q, k, v, sinks, params, qseg, kvseg, qpos, kvpos, out_b, lse_b)
    return (_unblocks_q(out_b, cfg), _unblocks_q(lse_b[..., None], cfg)[..., 0]), res

  def bwd(res, cts):
    g_out, g_lse = cts
    return _backward(cfg, res, g_out.astype(res[2].dtype), g_lse)

  core.defvjp(fwd, bwd)
  return core


# ------------------------------------------------------------------------------------ backend
def _pad_axis(x, axis, size, mode="constant"):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, mode=mode)


def _group_heads(bm: np.ndarray):
  """Group query heads whose block maps are identical: [(head ids, block map)]."""
  groups: dict[bytes, list[int]] = {}
  for h in range(bm.shape[0]):
    groups.setdefault(bm[h].tobytes(), []).append(h)
  return [(np.asarray(hs), bm[hs[0]]) for hs in groups.values()]


class ChunkedBackend(base.Backend):
  """Blockwise attention with static block skipping.

  ``block_q``/``block_kv`` set the tile; ``None`` (the default) picks it per problem: 512 x 512
  for sequences of 2048 and more (256 x 256 below), halving the larger side (down to 128) while
  one tile's scores (``batch * q_heads * block_q * block_kv`` float32) exceed ``tile_budget``
  elements. Tiles of 512 rows are what XLA:CPU needs to spread a tile's matmuls over its
  threads: at T=8192 256 x 256 tiles ran 1.6x slower on the 2-core benchmark machine
  (BENCHMARKS.md).

  ``fixed_max`` (default on) lets the forward pass drop most of the online softmax's running
  maximum: each query block's first key tile sets the row maxima, and every further tile of
  the block uses them as they are (``exp(s - m)``: no max reduction, no rescaling of the
  accumulator; about 6% of the causal forward on the 2-core CPU). This is exact because floats
  are relative: it only needs no later logit more than ~80 above ``m`` and not every term of a
  row underflowing. Blocks where that fails (detected from the denominator and accumulator) are
  recomputed with the running maximum, so results never depend on it, only the time does. Used
  when ``v`` is float32, bfloat16 or float64 (float16 cannot hold ``exp(80)``);
  ``fixed_max=False`` always uses the running maximum. A band (below) has a single key tile per
  query block, whose online update is the plain softmax, so it does not use it.

  ``band`` chooses the band computation: each query block of ``band_block_q`` rows computes a
  single key tile spanning its visible keys, from its first visible key block of ``band_step``
  positions; the tile width is the widest such span over all query blocks (from the static
  block map; traced positions make it the whole key range). Every band tile evaluates the mask.
  ``band_block_q`` defaults to 128. ``None`` (the default) uses the band when it computes at
  most 0.75 of the score elements of the aligned tiles (summed over head groups, times their
  heads) and one band tile stays within 4 tile budgets, and only when ``block_kv`` is left
  automatic; ``True`` always uses it, ``False`` never. Masks with per-query key intervals
  (causal, sliding window, chunked, prefix, block-causal and their intersections) get their
  spans in O(T); others from a block map at ``band_block_q x band_step`` resolution, computed
  only when the FULL tiles leave the band a chance. At T=8192 with a sliding window of
  512 on the 2-core CPU the band took about 0.6 of the 512 x 512 tiles' time, forward and
  forward+backward (BENCHMARKS.md).

  ``on_visit`` is a debugging hook: when set, ``on_visit(pass, q_block, kv_block)`` runs on the
  host (``jax.debug.callback``) for every tile the forward (``"fwd"``) and backward (``"bwd"``)
  passes compute, which is how the tests check that work follows the block map. Band tiles are
  reported as passes ``"fwd_band"`` and ``"bwd_band"`` with the band's first key position in
  place of ``kv_block``. It slows the kernel down; leave it ``None`` otherwise.
  """
  capabilities = base.Capabilities(name="chunked")

  def __init__(self, block_q: int | None = None, block_kv: int | None = None, *,
               tile_budget: int = 1 << 21, fixed_max: bool = True, band: bool | None = None,
               band_block_q: int | None = None, band_step: int = 64, on_visit=None):
    for name, val in (("block_q", block_q), ("block_kv", block_kv),
                      ("band_block_q", band_block_q)):
      if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
        raise ValueError(f"{name} must be a positive int or None (automatic), got {val!r}")
    if not isinstance(band_step, int) or isinstance(band_step, bool) or band_step < 1:
      raise ValueError(f"band_step must be a positive int, got {band_step!r}")
    if band is not None and not isinstance(band, bool):
      raise TypeError(f"band must be True, False or None (automatic), got {band!r}")
    if not isinstance(tile_budget, int) or tile_budget < 1:
      raise ValueError(f"tile_budget must be a positive int, got {tile_budget!r}")
    if not isinstance(fixed_max, bool):
      raise TypeError(f"fixed_max must be a bool, got {fixed_max!r}")
    if on_visit is not None and not callable(on_visit):
      raise TypeError(f"on_visit must be callable or None, got {type(on_visit).__name__}")
    self.block_q, self.block_kv = block_q, block_kv
    self.tile_budget, self.fixed_max, self.on_visit = tile_budget, fixed_max, on_visit
    self.band, self.band_block_q, self.band_step = band, band_block_q, band_step

  def __repr__(self):
    return (f"ChunkedBackend(block_q={self.block_q}, block_kv={self.block_kv}, "
            f"tile_budget={self.tile_budget}, fixed_max={self.fixed_max}, band={self.band}, "
            f"band_block_q={self.band_block_q}, band_step={self.band_step})")

  def block_sizes(self, q_len, kv_len, rows_per_query: int = 1):
    """Tile ``(block_q, block_kv)`` for these lengths; ``rows_per_query`` is the number of score
    rows one query position costs in a tile (batch * query heads), used by automatic sizing."""
    bq, bk = self.block_q, self.block_kv
    if bq is None or bk is None:
      # 512-row tiles pay off once there are several per axis; at T=1024 the causal
      # forward+backward ran 1.4x faster with 256 x 256 on the 2-core benchmark machine.
      side = 512 if min(q_len, kv_len) >= _LARGE_TILE_MIN_LEN else 256
      abq, abk = side, side
      while rows_per_query * abq * abk > self.tile_budget and max(abq, abk) > 128:
        if abk >= abq:
          abk //= 2
        else:
          abq //= 2
      bq = abq if bq is None else bq
      bk = abk if bk is None else bk
    return (min(bq, _round_up(q_len, 8)), min(bk, _round_up(kv_len, 8)))

  def plan(self, p: base.Problem):
    """The static block map ``[H|1, nq, nk]`` of the tiled computation and its tile."""
    bq, bk = self.block_sizes(p.q_len, p.kv_len, p.batch * p.num_q_heads)
    bm = base.static_block_map(p, bq, bk)
    return bm, bq, bk

  def band_plan(self, p: base.Problem, bm=None) -> "BandPlan | None":
    """The band computation for ``p`` when this backend uses it (see the class docstring),
    else ``None``. ``bm`` is the tiled plan's block map, when already computed."""
    if self.band is False or (self.band is None and self.block_kv is not None):
      return None
    bqb = min(self.band_block_q or _BAND_BLOCK_Q, _round_up(p.q_len, 8))
    step = min(self.band_step, _round_up(p.kv_len, 8))
    if self.band:
      return _band_plan(p, bqb, step)
    # Automatic: score elements computed, weighted by the heads of each group, by the band
    # against the aligned tiles. The band computes at least every visible pair, so when the
    # FULL tiles alone exceed the bound it cannot win, and its spans are not even computed
    # (a fine block map is 8x the tiled one's size: seconds of tracing at T=65536).
    rows_per_query = p.batch * p.num_q_heads
    bq, bk = self.block_sizes(p.q_len, p.kv_len, rows_per_query)
    if bm is None:
      bm = base.static_block_map(p, bq, bk)
    groups = _group_heads(bm)
    tiled = sum(int(np.count_nonzero(g != masks_lib.EMPTY)) * len(hs) for hs, g in groups)
    full = sum(int(np.count_nonzero(g == masks_lib.FULL)) * len(hs) for hs, g in groups)
    if full > _BAND_MAX_WORK * tiled:
      return None
    plan = _band_plan(p, bqb, step)
    heads_of = lambda hs: rows_per_query // p.batch if hs is None else len(hs)
    tiled *= bq * bk * (p.num_q_heads if bm.shape[0] == 1 else 1)
    band = sum(int(np.count_nonzero(first >= 0)) * bqb * width * heads_of(hs)
               for hs, first, width in plan.groups)
    biggest = max(p.batch * heads_of(hs) * bqb * width for hs, _, width in plan.groups)
    if band <= _BAND_MAX_WORK * tiled and biggest <= _BAND_MAX_TILE * self.tile_budget:
      return plan
    return None

  def describe(self, p: base.Problem) -> str:
    """How this backend computes ``p``: ``"tiles BQxBK"`` or ``"band: BQ query rows x W keys"``
    (the widest head group's band)."""
    band = self.band_plan(p)
    if band is None:
      _, bq, bk = self.plan(p)
      return f"tiles {bq}x{bk}"
    return f"band: {band.block_q} query rows x {band.width} keys"

  def __call__(self, p: base.Problem):
    B, Tq, Hq, D = p.q.shape
    Tk, Hkv, Dv = p.k.shape[1], p.k.shape[2], p.v.shape[-1]
    G = Hq // Hkv
    bm, bq, bk = self.plan(p)
    band = self.band_plan(p, bm)
    if band is not None:
      bq, bk = band.block_q, band.step
      nq, nk = -(-Tq // bq), -(-Tk // bk)
    else:
      nq, nk = bm.shape[1], bm.shape[2]
    Tqp, Tkp = nq * bq, nk * bk

    q = _pad_axis(p.q, 1, Tqp)
    k = _pad_axis(p.k, 1, Tkp)
    v = _pad_axis(p.v, 1, Tkp)
    q_pos, kv_pos = p.positions()
    # Query-side positions and segment ids are blocked [nq, B, bq]; key-side ones stay
    # [B, Tkp] and are sliced per tile (band tiles start anywhere).
    q_pos = _pad_axis(q_pos, 1, Tqp, mode="edge").reshape(q_pos.shape[0], nq, bq).transpose(1, 0, 2)
    kv_pos = _pad_axis(kv_pos, 1, Tkp, mode="edge")
    has_seg = p.q_segment_ids is not None
    if has_seg:
      qseg = _pad_axis(p.q_segment_ids, 1, Tqp, mode="edge").reshape(B, nq, bq).transpose(1, 0, 2)
      kvseg = _pad_axis(p.kv_segment_ids, 1, Tkp, mode="edge")
    else:
      qseg = kvseg = jnp.zeros((1,), jnp.int32)
    sinks = p.sinks if p.sinks is not None else jnp.zeros((Hq,), f32)

    if band is not None:
      groups = [(hs, (first, width)) for hs, first, width in band.groups]
    elif bm.shape[0] == 1:
      groups = [(None, bm[0])]
    else:
      groups = _group_heads(bm)
      if len(groups) == 1:
        groups = [(None, groups[0][1])]

    outs, lses, order = [], [], []
    for heads, gbm in groups:
      if heads is None:
        qg, kg, vg = q, k, v           # token-major; query head h uses kv head h // G
        hk, gg, head_ids = Hkv, G, np.arange(Hq)
      else:
        qg = jnp.take(q, heads, axis=2)
        kg, vg = jnp.take(k, heads // G, axis=2), jnp.take(v, heads // G, axis=2)
        hk, gg, head_ids = len(heads), 1, heads
      if band is not None:
        first, tk = gbm
        tables = _band_tables(first, tk, Tkp)
      else:
        tk, tables = bk, _tile_tables(gbm, bk)
      mod = None
      if p.score_mod is not None:
        mod = p.score_mod.bind((B, hk * gg, bq, tk), (B, 1, 1, 1), (1, hk * gg, 1, 1),
                               (q_pos.shape[1], 1, bq, 1), (kv_pos.shape[0], 1, 1, tk),
                               dtype=base.accumulation_dtype(p.q.dtype))
      gparams = mod.pad_params(Tqp, Tkp) if mod is not None else ()
      cfg = _Config(
          B=B, Hk=hk, G=gg, bq=bq, bk=tk, nq=nq, kv_len=Tk, scale=float(p.scale),
          mask=p.mask, heads=heads, head_ids=np.asarray(head_ids),
          tables=tables, band=band is not None,
          mod=mod, has_seg=has_seg, has_sinks=p.sinks is not None,
          acc=base.accumulation_dtype(p.q.dtype),
          # A band is one tile per query block: its online update is already the plain
          # softmax, so the fixed maximum would only add the fallback check.
          fixed_max=(self.fixed_max and band is None
                     and jnp.dtype(p.v.dtype).name in _FIXED_MAX_DTYPES),
          on_visit=self.on_visit)
      operands = (qg, kg, vg, sinks, gparams, qseg, kvseg, q_pos, kv_pos)
      # Inside shard_map (check_vma): make every operand vary over the same mesh axes, so the
      # custom VJP's cotangents match their operands' types; the cast's transpose sums the
      # cotangents of replicated operands (sinks, score-mod parameters) over those axes.
      operands = base.cast_varying(operands, base.varying_axes(operands))
      o, lse = _make_core(cfg)(*operands)
      outs.append(o)                   # [B, Tqp, heads, Dv]
      lses.append(lse)                 # [B, Tqp, heads]
      order.append(np.asarray(head_ids))
    out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    lse = jnp.concatenate(lses, axis=2) if len(lses) > 1 else lses[0]
    if len(outs) > 1:
      inv = np.argsort(np.concatenate(order))
      out, lse = jnp.take(out, inv, axis=2), jnp.take(lse, inv, axis=2)
    out = out[:, :Tq].astype(p.q.dtype)
    if p.return_lse:
      return out, lse[:, :Tq].astype(f32)
    return out
