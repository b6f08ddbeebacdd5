"""Blockwise online-softmax attention (FlashAttention's algorithm) in pure JAX.

Work follows the mask's static block map: EMPTY blocks are never visited, FULL blocks skip mask
evaluation, PARTIAL blocks evaluate ``mask_mod`` on the tile's index grid. The forward pass is a
``lax.scan`` over query blocks; for each, inner loops run over that block's FULL and PARTIAL key
blocks, with trip counts and key-block indices read from per-row visit tables built from the
block map, and the running max, denominator and output accumulator (float32) stay local to the
query block. Memory is ``O(T * D)`` and time is proportional to the number of non-empty blocks.
Segment ids add a run-time skip: a tile whose query and key segment-id ranges are disjoint for
the whole batch costs a branch, not a tile. By default the forward keeps each row's maximum
fixed after the query block's first tile (no per-tile max reduction or rescaling; exact, with a
detected fallback to the running maximum: see ``_forward``'s ``fixed_max``).

The backward pass is a custom VJP with the same loop structure that recomputes each visited tile
from the saved LSE (no ``[Tq, Tk]`` residual): dQ accumulates locally per query block, dK, dV,
sink and score-mod parameter gradients into their blocks. Per-head masks are served by grouping
heads whose block maps agree and running each group with its own visit tables.
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
  nk: int
  kv_len: int
  scale: float
  mask: masks_lib.Mask
  heads: np.ndarray | None      # global query-head ids [Hk*G] for a subset group, else None
  head_ids: np.ndarray          # [Hk*G] global ids of the tile's heads (score-mod order)
  full_pairs: np.ndarray        # [n, 2] int32
  partial_pairs: np.ndarray     # [n, 2] int32
  mod: Any                      # bound ScoreMod or None
  has_seg: bool
  has_sinks: bool
  fixed_max: bool = False       # forward: row max fixed after the first tile (see _forward)
  on_visit: Any = None          # debugging hook: on_visit(pass, q_block, kv_block) per tile


def _tile_logits(cfg: _Config, qt, kt):
  """Logits of one tile, ``[B, Hs, bq, bk]`` float32, from pre-scaled queries ``qt``
  ``[B, Hk, G*bq, D]`` and keys ``kt`` ``[B, Hk, bk, D]`` (XLA:CPU runs this transposed-RHS
  matmul as fast as with pre-transposed keys, and a whole-array transpose costs more)."""
  s = jnp.einsum("bhqd,bhkd->bhqk", qt, kt, preferred_element_type=f32)
  return s.reshape(cfg.B, cfg.Hk * cfg.G, cfg.bq, cfg.bk)


def _tile_index(cfg: _Config, i, j, qpos, kvpos):
  qi = _at(qpos, i)[:, None, :, None]      # [Bp, 1, bq, 1]
  kj = _at(kvpos, j)[:, None, None, :]     # [Bp, 1, 1, bk]
  b = jnp.arange(cfg.B, dtype=jnp.int32)[:, None, None, None]
  h = jnp.asarray(cfg.head_ids, jnp.int32)[None, :, None, None]
  return b, h, qi, kj


def _tile_visibility(cfg: _Config, i, j, qi, kj, h, qseg, kvseg, masked: bool):
  vis = None
  if masked:
    vis = cfg.mask.mask_mod(qi, kj, h if cfg.mask.per_head else None)
    kv_valid = (j * cfg.bk + jnp.arange(cfg.bk)) < cfg.kv_len
    vis = vis & kv_valid[None, None, None, :]
  if cfg.has_seg:
    same = _at(qseg, i)[:, None, :, None] == _at(kvseg, j)[:, None, None, :]
    vis = same if vis is None else vis & same
  if vis is None:
    return None
  return jnp.broadcast_to(vis, (cfg.B, cfg.Hk * cfg.G, cfg.bq, cfg.bk))


def _at(x, i):
  """``x[i]`` along the leading (block) axis, without negative-index handling."""
  return jax.lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False)


def _seg_skip_table(cfg: _Config, qseg, kvseg):
  """[nq, nk] bool: True where no batch element has overlapping segment-id ranges."""
  qmin, qmax = qseg.min(axis=-1).T, qseg.max(axis=-1).T      # [B, nq]
  kmin, kmax = kvseg.min(axis=-1).T, kvseg.max(axis=-1).T    # [B, nk]
  disjoint = (qmax[:, :, None] < kmin[:, None, :]) | (kmax[:, None, :] < qmin[:, :, None])
  return jnp.all(disjoint, axis=0)


# Query-side blocks are [nq, B, Hk, G*bq, X]: within a block, rows run over (g, q) so that one
# plain batched matmul per tile serves all query heads of a key/value head (GQA without repeat),
# and [Hk, G*bq] reshapes for free to the score-mod layout [Hk*G, bq].
def _blocks_q(x, cfg: _Config):
  """[B, Hk, G, Tqp, X] -> [nq, B, Hk, G*bq, X]."""
  B, Hk, G, _, X = x.shape
  x = x.reshape(B, Hk, G, cfg.nq, cfg.bq, X).transpose(3, 0, 1, 2, 4, 5)
  return x.reshape(cfg.nq, B, Hk, G * cfg.bq, X)


def _unblocks_q(x, cfg: _Config):
  """[nq, B, Hk, G*bq, X] -> [B, Hk, G, Tqp, X]."""
  nq, B, Hk, _, X = x.shape
  x = x.reshape(nq, B, Hk, cfg.G, cfg.bq, X).transpose(1, 2, 3, 0, 4, 5)
  return x.reshape(B, Hk, cfg.G, nq * cfg.bq, X)


def _split_heads(x, cfg: _Config):
  """[B, Hk*G, Tqp, X] -> [B, Hk, G, Tqp, X]."""
  return x.reshape(cfg.B, cfg.Hk, cfg.G, x.shape[2], x.shape[3])


# Key/value tiles are read straight from the head-major arrays [B, Hk, Tkp, X] (a dynamic slice
# along T), and query tiles from [B, Hk*G, Tqp, X]: re-laying whole arrays out as
# [n, B, Hk, b, X] blocks first made XLA:CPU copy each twice (a transpose, then a copy into the
# loop's layout) and pre-scaling q whole added a pass; reading tiles in place took the forward
# from 8 to 5 full-array passes, ~5% of its time at T=8192 on the 2-core CPU.
def _kv_tile(x, j, cfg: _Config):
  """[B, Hk, Tkp, X] -> key block ``j``: [B, Hk, bk, X]."""
  return jax.lax.dynamic_slice_in_dim(x, j * cfg.bk, cfg.bk, axis=2)


def _q_tile(x, i, cfg: _Config, scale=False):
  """[B, Hk*G, Tqp, X] -> query block ``i``: [B, Hk, G*bq, X] (pre-scaled queries with
  ``scale``: done per tile, as one more pass over the whole array cost more)."""
  t = jax.lax.dynamic_slice_in_dim(x, i * cfg.bq, cfg.bq, axis=2)
  t = t.reshape(cfg.B, cfg.Hk, cfg.G * cfg.bq, x.shape[-1])
  return _prescale(t, cfg) if scale else t


def _row_sinks(cfg: _Config, sinks):
  """Sink logit of every query row of a block: [Hk, G*bq] float32."""
  per_head = sinks.astype(f32)[cfg.head_ids].reshape(cfg.Hk, cfg.G)
  return jnp.repeat(per_head, cfg.bq, axis=1)


def _row_tables(cfg: _Config):
  """Per query block, the key blocks to visit: ``[(counts [nq], index [nq, n], masked)]`` for
  the FULL and the PARTIAL tiles of the block map (kinds with no tile are left out)."""
  tables = []
  for pairs, masked in ((cfg.full_pairs, False), (cfg.partial_pairs, True)):
    if not len(pairs):
      continue
    counts = np.bincount(pairs[:, 0], minlength=cfg.nq).astype(np.int32)
    index = np.zeros((cfg.nq, max(1, int(counts.max()))), np.int32)
    fill = np.zeros(cfg.nq, np.int64)
    for i, j in pairs:                     # argwhere order: ascending key block per row
      index[i, fill[i]] = j
      fill[i] += 1
    tables.append((counts, index, masked))
  return tables


def _visit(cfg: _Config, kind: str, i, j):
  if cfg.on_visit is not None:
    jax.debug.callback(lambda i_, j_: cfg.on_visit(kind, int(i_), int(j_)), i, j, ordered=False)


def _prescale(q, cfg: _Config):
  return (q.astype(f32) * cfg.scale).astype(q.dtype)


# ------------------------------------------------------------------------------------ forward
def _forward(cfg: _Config, q, k, v, sinks, params, qseg, kvseg, qpos, kvpos):
  rows = cfg.G * cfg.bq
  shape = (cfg.B, cfg.Hk, rows)
  skip_tbl = _seg_skip_table(cfg, qseg, kvseg) if cfg.has_seg else None
  tile_shape = (cfg.B, cfg.Hk, rows, cfg.bk)
  np_tables = _row_tables(cfg)
  tables = [(jnp.asarray(c), jnp.asarray(x), masked) for c, x, masked in np_tables]

  def tile(masked, i, j, qt, carry, fixed):
    m_old, l_old, a_old = carry
    _visit(cfg, "fwd", i, j)
    b, h, qi, kj = _tile_index(cfg, i, j, qpos, kvpos)
    s = _tile_logits(cfg, qt, _kv_tile(k, j, cfg))
    if cfg.mod is not None:
      ptile = cfg.mod.tile_params(params, i * cfg.bq, cfg.bq, j * cfg.bk, cfg.bk, cfg.heads)
      s = cfg.mod.fn(ptile, s, b, h, qi, kj)
    vis = _tile_visibility(cfg, i, j, qi, kj, h, qseg, kvseg, masked)
    if vis is not None:
      s = jnp.where(vis, s, -jnp.inf)
    s = s.reshape(tile_shape)
    if fixed:
      # m_old stays the row's reference maximum: no max reduction, no rescaling.
      p = jnp.exp(s - m_old[..., None])
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), _kv_tile(v, j, cfg),
                      preferred_element_type=f32)
      return m_old, l_old + p.sum(axis=-1), a_old + pv
    m_new = jnp.maximum(m_old, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_old - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    l_new = alpha * l_old + p.sum(axis=-1)
    pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), _kv_tile(v, j, cfg),
                    preferred_element_type=f32)
    return m_new, l_new, alpha[..., None] * a_old + pv

  def visit(masked, i, j, qt, c, fixed):
    if skip_tbl is None:
      return tile(masked, i, j, qt, c, fixed)
    return jax.lax.cond(skip_tbl[i, j], lambda c_: c_,
                        lambda c_: tile(masked, i, j, qt, c_, fixed), c)

  # Inside shard_map (check_vma) the softmax state varies with the device's inputs: fresh
  # initial values are typed that way so loop carries and switch branches agree.
  varying = base.varying_axes(q, k, v, sinks, params, qseg, kvseg, qpos, kvpos)

  def init_state():
    init = (jnp.full(shape, -jnp.inf, f32), jnp.zeros(shape, f32),
            jnp.zeros(shape + (v.shape[-1],), f32))
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
  qb = _blocks_q(_split_heads(_prescale(q, cfg), cfg), cfg)
  dob = _blocks_q(g_out, cfg)
  # dL/ds_ij = p_ij * (dp_ij - delta_i); an LSE cotangent adds p_ij * g_lse_i.
  delta = jnp.sum(dob.astype(f32) * out_b, axis=-1)          # [nq, B, Hk, G*bq]
  delta = delta - _blocks_q(g_lse.astype(f32)[..., None], cfg)[..., 0]
  lse_safe = jnp.where(jnp.isfinite(lse_b), lse_b, jnp.inf)  # rows that saw nothing: p = 0
  skip_tbl = _seg_skip_table(cfg, qseg, kvseg) if cfg.has_seg else None
  rows = cfg.G * cfg.bq
  tile_shape = (cfg.B, cfg.Hk, rows, cfg.bk)
  flat_shape = (cfg.B, cfg.Hk * cfg.G, cfg.bq, cfg.bk)
  mod = cfg.mod
  tables = [(jnp.asarray(c), jnp.asarray(x), masked) for c, x, masked in _row_tables(cfg)]

  def tile(masked, i, j, qt, do, lse_i, delta_i, carry):
    dq, dk, dv, dparams = carry
    _visit(cfg, "bwd", i, j)
    b, h, qi, kj = _tile_index(cfg, i, j, qpos, kvpos)
    kt, vt = _kv_tile(k, j, cfg), _kv_tile(v, j, cfg)
    s = _tile_logits(cfg, qt, kt)
    mod_vjp = None
    if mod is not None:
      ptile = mod.tile_params(params, i * cfg.bq, cfg.bq, j * cfg.bk, cfg.bk, cfg.heads)
      s, mod_vjp = jax.vjp(lambda s_, p_: mod.fn(p_, s_, b, h, qi, kj), s, ptile)
    vis = _tile_visibility(cfg, i, j, qi, kj, h, qseg, kvseg, masked)
    p = jnp.exp(s.reshape(tile_shape) - lse_i[..., None])
    if vis is not None:
      p = jnp.where(vis.reshape(tile_shape), p, 0.0)
    dv_t = jnp.einsum("bhqk,bhqd->bhkd", p.astype(do.dtype), do, preferred_element_type=f32)
    dp = jnp.einsum("bhqd,bhkd->bhqk", do, vt, preferred_element_type=f32)
    ds = p * (dp - delta_i[..., None])
    if mod_vjp is not None:
      ds_flat, dpt = mod_vjp(ds.reshape(flat_shape))
      dpt = jax.tree.map(_f32_cotangent, dpt)
      ds = ds_flat.reshape(tile_shape)
      dparams = mod.untile_add(dparams, dpt, i * cfg.bq, j * cfg.bk, cfg.heads)
    # s = (scale * q) . k, so dk takes the pre-scaled queries and dq gets the scale.
    dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k.dtype), kt,
                         preferred_element_type=f32) * cfg.scale
    dk_t = jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q.dtype), qt, preferred_element_type=f32)
    upd = jax.lax.dynamic_update_slice_in_dim
    dk = upd(dk, _kv_tile(dk, j, cfg) + dk_t, j * cfg.bk, 2)
    dv = upd(dv, _kv_tile(dv, j, cfg) + dv_t, j * cfg.bk, 2)
    return dq, dk, dv, dparams

  # Outer scan over query blocks (dQ of the block stays loop-local), inner loops over the
  # block's key tiles from the visit tables; dK/dV accumulate into their key blocks.
  def row(carry, xs):
    i, qt, do, lse_i, delta_i = xs
    dk, dv, dparams = carry
    dq = base.cast_varying(jnp.zeros(qt.shape, f32), varying)
    inner = (dq, dk, dv, dparams)
    for counts, index, masked in tables:
      row_index = index[i]

      def body(t, c, masked=masked, row_index=row_index):
        j = row_index[t]
        run = lambda c_: tile(masked, i, j, qt, do, lse_i, delta_i, c_)
        if skip_tbl is None:
          return run(c)
        return jax.lax.cond(skip_tbl[i, j], lambda c_: c_, run, c)

      inner = jax.lax.fori_loop(0, counts[i], body, inner)
    dq, dk, dv, dparams = inner
    return (dk, dv, dparams), dq

  dparams0 = jax.tree.map(lambda p: jnp.zeros(p.shape, f32), params)
  carry = base.cast_varying((jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32), dparams0),
                            varying)
  (dk, dv, dparams), dq = jax.lax.scan(
      row, carry, (jnp.arange(cfg.nq, dtype=jnp.int32), qb, dob, lse_safe, delta))
  dq = _unblocks_q(dq, cfg).reshape(q.shape).astype(q.dtype)
  dk, dv = dk.astype(k.dtype), dv.astype(v.dtype)
  dsinks = None
  if cfg.has_sinks:
    p_sink = jnp.exp(_row_sinks(cfg, sinks) - lse_safe)      # [nq, B, Hk, G*bq]
    contrib = -(p_sink * delta).reshape(cfg.nq, cfg.B, cfg.Hk, cfg.G, cfg.bq)
    per_head = jnp.sum(contrib, axis=(0, 1, 4)).reshape(-1)   # [Hk*G]
    dsinks = jnp.zeros(sinks.shape, f32).at[cfg.head_ids].add(per_head).astype(sinks.dtype)
  dparams = jax.tree.map(scores_lib.param_cotangent, dparams, params)
  return dq, dk, dv, dsinks, dparams, None, None, None, None


def _f32_cotangent(x):
  """A tile cotangent as float32 (``float0`` cotangents of integer params become zeros)."""
  if x.dtype == jax.dtypes.float0:
    return jnp.zeros(x.shape, f32)
  return x.astype(f32)


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
  ``fixed_max=False`` always uses the running maximum.

  ``on_visit`` is a debugging hook: when set, ``on_visit(pass, q_block, kv_block)`` runs on the
  host (``jax.debug.callback``) for every tile the forward (``"fwd"``) and backward (``"bwd"``)
  passes compute, which is how the tests check that work follows the block map. It slows the
  kernel down; leave it ``None`` otherwise.
  """
  capabilities = base.Capabilities(name="chunked")

  def __init__(self, block_q: int | None = None, block_kv: int | None = None, *,
               tile_budget: int = 1 << 21, fixed_max: bool = True, on_visit=None):
    for name, val in (("block_q", block_q), ("block_kv", block_kv)):
      if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
        raise ValueError(f"{name} must be a positive int or None (automatic), got {val!r}")
    if not isinstance(tile_budget, int) or tile_budget < 1:
      raise ValueError(f"tile_budget must be a positive int, got {tile_budget!r}")
    if not isinstance(fixed_max, bool):
      raise TypeError(f"fixed_max must be a bool, got {fixed_max!r}")
    if on_visit is not None and not callable(on_visit):
      raise TypeError(f"on_visit must be callable or None, got {type(on_visit).__name__}")
    self.block_q, self.block_kv = block_q, block_kv
    self.tile_budget, self.fixed_max, self.on_visit = tile_budget, fixed_max, on_visit

  def __repr__(self):
    return (f"ChunkedBackend(block_q={self.block_q}, block_kv={self.block_kv}, "
            f"fixed_max={self.fixed_max})")

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
    """The static block map ``[H|1, nq, nk]`` this backend will use for ``p``."""
    bq, bk = self.block_sizes(p.q_len, p.kv_len, p.batch * p.num_q_heads)
    bm = base.static_block_map(p, bq, bk)
    return bm, bq, bk

  def __call__(self, p: base.Problem):
    B, Tq, Hq, D = p.q.shape
    Tk, Hkv, Dv = p.k.shape[1], p.k.shape[2], p.v.shape[-1]
    G = Hq // Hkv
    bm, bq, bk = self.plan(p)
    nq, nk = bm.shape[1], bm.shape[2]
    Tqp, Tkp = nq * bq, nk * bk

    q = _pad_axis(p.q, 1, Tqp)
    k = _pad_axis(p.k, 1, Tkp)
    v = _pad_axis(p.v, 1, Tkp)
    q_pos, kv_pos = p.positions()
    q_pos = _pad_axis(q_pos, 1, Tqp, mode="edge").reshape(q_pos.shape[0], nq, bq).transpose(1, 0, 2)
    kv_pos = _pad_axis(kv_pos, 1, Tkp, mode="edge").reshape(kv_pos.shape[0], nk, bk)
    kv_pos = kv_pos.transpose(1, 0, 2)
    has_seg = p.q_segment_ids is not None
    if has_seg:
      qseg = _pad_axis(p.q_segment_ids, 1, Tqp, mode="edge").reshape(B, nq, bq).transpose(1, 0, 2)
      kvseg = _pad_axis(p.kv_segment_ids, 1, Tkp, mode="edge").reshape(B, nk, bk)
      kvseg = kvseg.transpose(1, 0, 2)
    else:
      qseg = kvseg = jnp.zeros((1,), jnp.int32)
    sinks = p.sinks if p.sinks is not None else jnp.zeros((Hq,), f32)

    if bm.shape[0] == 1:
      groups = [(None, bm[0])]
    else:
      groups = _group_heads(bm)
      if len(groups) == 1:
        groups = [(None, groups[0][1])]

    outs, lses, order = [], [], []
    for heads, gbm in groups:
      if heads is None:
        qg = q.transpose(0, 2, 1, 3)   # [B, Hkv*G, Tqp, D]: head h = kv head h // G
        kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        hk, gg, head_ids = Hkv, G, np.arange(Hq)
      else:
        qg = jnp.take(q, heads, axis=2).transpose(0, 2, 1, 3)
        kg = jnp.take(k, heads // G, axis=2).transpose(0, 2, 1, 3)
        vg = jnp.take(v, heads // G, axis=2).transpose(0, 2, 1, 3)
        hk, gg, head_ids = len(heads), 1, heads
      mod = None
      if p.score_mod is not None:
        mod = p.score_mod.bind((B, hk * gg, bq, bk), (B, 1, 1, 1), (1, hk * gg, 1, 1),
                               (q_pos.shape[1], 1, bq, 1), (kv_pos.shape[1], 1, 1, bk))
      gparams = mod.pad_params(Tqp, Tkp) if mod is not None else ()
      cfg = _Config(
          B=B, Hk=hk, G=gg, bq=bq, bk=bk, nq=nq, nk=nk, kv_len=Tk, scale=float(p.scale),
          mask=p.mask, heads=heads, head_ids=np.asarray(head_ids),
          full_pairs=np.argwhere(gbm == masks_lib.FULL).astype(np.int32),
          partial_pairs=np.argwhere(gbm == masks_lib.PARTIAL).astype(np.int32),
          mod=mod, has_seg=has_seg, has_sinks=p.sinks is not None,
          fixed_max=self.fixed_max and jnp.dtype(p.v.dtype).name in _FIXED_MAX_DTYPES,
          on_visit=self.on_visit)
      operands = (qg, kg, vg, sinks, gparams, qseg, kvseg, q_pos, kv_pos)
      # Inside shard_map (check_vma): make every operand vary over the same mesh axes, so the
      # custom VJP's cotangents match their operands' types; the cast's transpose sums the
      # cotangents of replicated operands (sinks, score-mod parameters) over those axes.
      operands = base.cast_varying(operands, base.varying_axes(operands))
      o, lse = _make_core(cfg)(*operands)
      outs.append(o.reshape(B, hk * gg, Tqp, Dv))
      lses.append(lse.reshape(B, hk * gg, Tqp))
      order.append(np.asarray(head_ids))
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    lse = jnp.concatenate(lses, axis=1) if len(lses) > 1 else lses[0]
    if len(outs) > 1:
      inv = np.argsort(np.concatenate(order))
      out, lse = jnp.take(out, inv, axis=1), jnp.take(lse, inv, axis=1)
    out = out[:, :, :Tq].transpose(0, 2, 1, 3).astype(p.q.dtype)
    if p.return_lse:
      return out, lse[:, :, :Tq].transpose(0, 2, 1)
    return out
