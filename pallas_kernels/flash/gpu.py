"""Block-sparse flash attention for NVIDIA GPUs in Pallas (Triton lowering), forward + backward.

The algorithm is FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning"): one program per (query block, batch * query head) keeps an
online-softmax state (running max ``m``, denominator ``l``, fp32 accumulator) in registers and
streams key/value blocks; the backward recomputes the probabilities from the saved log-sum-exp
and runs two kernels, ``dq`` (rows = query blocks) and ``dk/dv`` (rows = key blocks), so no
atomics are needed. Block sparsity comes from :class:`~pallas_kernels.flash.common.BlockTables`:
each program loops (``lax.fori_loop`` up to its row's count) over the listed blocks only, so work
is proportional to the non-empty blocks. Each row's blocks are visited FULL first, in a loop
with no mask code, then PARTIAL ones with ``mask_fn`` (two loops, no branch in either: the
FlashAttention off-diagonal / diagonal split, for any mask); segment ids and key padding
(``kv_len``) are applied in every block.
Tables may be numpy (static sparsity) or traced ``jnp`` arrays (runtime sparsity: NSA, MoBA,
top-k); they are ordinary int32 kernel inputs read with scalar loads.

Why Triton and not Mosaic GPU: the Triton lowering is deprecated upstream in favour of Mosaic
GPU, but Mosaic GPU kernels cannot run in Pallas interpret mode on CPU, which is how this project
tests kernels in CI. The kernels are written for Triton's constraints so they stay valid on real
hardware: tensor shapes are powers of two (block sizes; head dims that are not are zero-padded
to the next power of two in the wrapper, which leaves ``q.k`` unchanged), ``tl.dot`` operands
are >= 16 in every dimension on GPU, accumulation is fp32, and no scratch memory or scalar
prefetch is used. Every load is in bounds by construction (``T % block == 0`` is required, the
caller pads), so no load/store masks are needed. In interpret mode block sizes >= 8 are accepted
so tests stay small; on a GPU they must be >= 16.

Layout: ``layout="bhtd"`` (head-major, the default) takes ``q [B, Hq, Tq, D]``,
``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]`` and returns ``out`` alike; ``layout="bthd"`` takes
and returns the model layout ``[B, T, H, D]`` and reads the tiles in place (rows of one head are
``H * D`` elements apart), so a caller needs no transposes (on an H100 this made the causal
forward at T=8192, B=1, H=8 about 5% faster than head-major copies). ``lse`` and
``delta`` are ``[B, Hq, Tq]`` either way. GQA query head ``h`` reads kv head ``h // (Hq // Hkv)``
directly (no repeated K/V); the dk/dv kernel loops over the ``Hq // Hkv`` query heads sharing its
kv head inside the program, so no per-query-head dk/dv is materialized.

Score mods: ``score_fn(param_tiles, s, batch, head, q_pos, kv_pos)`` is applied to the scaled
logits before masking, inside the kernel; its derivative w.r.t. ``s`` is taken with ``jax.vjp``
on the tile in the backward. Each score param is cut to the tile according to its
``ParamSpec(batch_axis, head_axis, q_axis, kv_axis)``. :func:`flash_attention` is differentiable
in ``(q, k, v, sinks)`` only: score params are passed through non-differentiated (zero
cotangent); the attnjax adapter computes gradients w.r.t. score params separately.

Sinks (gpt-oss): a per-head logit in the softmax denominator, implemented by starting the online
softmax at ``m = sink, l = 1``; ``dsink`` is computed with jnp outside the kernels.

A row that sees no key gets output 0, lse ``-inf`` and zero gradients (no NaN). Key padding
(``kv_len < Tk``) is masked in every visited block, FULL ones included (one compare per tile;
safe even if a caller's FULL flag ignored padding). On GPU, score-param tiles are Triton tensors
too: their whole axes (e.g. a low-rank bias rank) must be powers of two, and a ``tl.dot`` inside
``score_fn`` needs every dimension >= 16. float32 inputs use IEEE-precision dots (no TF32: the
Triton lowering's default for a float32 dot is one TF32 pass). On a GPU head dims are zero-padded
to powers of two >= 16 (``tl.dot`` needs K, N >= 16).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import platform as platform_lib
from pallas_kernels.flash.common import BlockTables

__all__ = ["flash_attention", "flash_attention_fwd", "flash_attention_bwd"]

_NEG_INF = float("-inf")
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


class _Static(NamedTuple):
  """Everything static about one call (hashable: a custom_vjp nondiff argument)."""
  b: int
  hq: int
  hkv: int
  tk: int
  kv_len: int
  scale: float
  block_q: int
  block_kv: int
  mask_fn: Callable | None
  score_fn: Callable | None
  specs: tuple  # normalized (batch_axis, head_axis, q_axis, kv_axis) per param, axes >= 0 or None
  has_seg: bool
  has_sinks: bool
  num_warps: int | None
  num_stages: int | None
  interpret: bool
  layout: str  # "bhtd" or "bthd"
  count_visits: bool  # debug: also return the number of executed loop iterations per row


def _bhtd(c, shape):
  """``(B, H, T, D)`` of an array in the call's layout."""
  return tuple(shape) if c.layout == "bhtd" else (shape[0], shape[2], shape[1], shape[3])


def _layout_shape(c, b, h, t, d):
  return (b, h, t, d) if c.layout == "bhtd" else (b, t, h, d)


def _pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def _next_pow2(n: int) -> int:
  return 1 << (int(n) - 1).bit_length()


def _sel(idx, size: int):
  """Index into a broadcastable leading axis (size 1 or full)."""
  return idx if size > 1 else 0


def _full_spec(shape):
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def _dot(a, b, contract_a: int, contract_b: int):
  # float32 operands: IEEE dots. Triton's default for a float32 dot is one TF32 pass (max
  # relative error ~4e-4 against float64 on an H100), which the lowering picks for DEFAULT.
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32, precision=prec)


# ----------------------------------------------------------------------------- tile helpers


def _param_tiles(c: _Static, prefs, b, h, qi, kj):
  """Cut each score param to the current tile (see the module docstring)."""
  tiles = []
  for ref, (ba, ha, qa, ka) in zip(prefs, c.specs):
    idx = []
    for ax, n in enumerate(ref.shape):
      if ax == ba:
        idx.append(pl.ds(_sel(b, n), 1))
      elif ax == ha:
        idx.append(pl.ds(_sel(h, n), 1))
      elif ax == qa:
        idx.append(pl.ds(qi * c.block_q, c.block_q))
      elif ax == ka:
        idx.append(pl.ds(kj * c.block_kv, c.block_kv))
      else:
        idx.append(slice(None))
    tiles.append(ref[tuple(idx)])
  return tuple(tiles)


def _scores(c: _Static, q, k, q_pos, kv_pos, q_seg, kv_seg, prefs, b, h, qi, kj, masked: bool,
            need_vjp=False, unit=1.0):
  """Masked logits ``[bq, bk]`` (f32, -inf where hidden), times ``unit`` (``log2(e)`` for the
  forward's base-2 softmax, folded into the scale; only without a score_fn), and, if asked,
  the score_fn vjp."""
  s = _dot(q, k, 1, 1) * (c.scale * unit)
  vjp = None
  if c.score_fn is not None:
    tiles = _param_tiles(c, prefs, b, h, qi, kj)
    fn = lambda x: c.score_fn(tiles, x, b, h, q_pos, kv_pos).astype(jnp.float32)
    if need_vjp:
      s, vjp = jax.vjp(fn, s)
    else:
      s = fn(s)
  keep = None
  if c.has_seg:
    keep = q_seg[:, None] == kv_seg[None, :]
  if c.kv_len < c.tk:
    col = kj * c.block_kv + lax.broadcasted_iota(jnp.int32, (1, c.block_kv), 1)
    pad = col < c.kv_len
    keep = pad if keep is None else keep & pad
  if keep is not None:
    s = jnp.where(keep, s, _NEG_INF)
  if masked and c.mask_fn is not None:  # static: FULL blocks have no mask code at all
    s = jnp.where(c.mask_fn(q_pos, kv_pos, h), s, _NEG_INF)
  return s, vjp


# ----------------------------------------------------------------------------- pallas_call plumbing


def _split_refs(refs, names, n_params):
  r = dict(zip(names, refs))
  return r, refs[len(names):len(names) + n_params], refs[len(names) + n_params:]


def _call(kernel, c: _Static, grid, inputs, params, outputs, name, **kernel_kw):
  """``inputs``/``outputs``: lists of ``(name or ShapeDtypeStruct, array, BlockSpec)``; score
  params go last as whole-array blocks (they are cut to tiles inside the kernel)."""
  if not c.interpret:   # compiled: lowering anywhere but on a GPU raises, clearly
    (n0, a0, sp0), *rest = inputs
    inputs = [(n0, platform_lib.require_platform(a0, "gpu", "the GPU flash kernel"), sp0)] + rest
  names = tuple(n for n, _, _ in inputs)
  kernel = functools.partial(kernel, c=c, names=names, n_params=len(params), **kernel_kw)
  return pl.pallas_call(
      kernel, grid=grid,
      in_specs=[sp for _, _, sp in inputs] + [_full_spec(p.shape) for p in params],
      out_specs=[sp for _, sp in outputs], out_shape=[sd for sd, _ in outputs],
      compiler_params=plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
      interpret=c.interpret, name=name,
  )(*(a for _, a, _ in inputs), *params)


def _full_first(tables: BlockTables):
  """``(blocks, counts, n_full)``: each row's listed blocks reordered FULL first, then PARTIAL
  (stable; padding slots last), and the number of FULL ones. The kernels then run two loops, the
  first with no mask code and no branch (FlashAttention's off-diagonal / diagonal stages for any
  mask), which keeps the loop body straight-line for Triton's software pipelining. Accumulation
  order changes only rounding."""
  blocks, counts, full = tables
  xp = np if all(isinstance(a, np.ndarray) for a in tables) else jnp
  slot = xp.arange(blocks.shape[-1])
  valid = slot < counts[..., None]
  is_full = valid & (full != 0)
  key = xp.where(is_full, 0, xp.where(valid, 1, 2))
  order = (np.argsort(key, axis=-1, kind="stable") if xp is np
           else jnp.argsort(key, axis=-1, stable=True))
  blocks = xp.take_along_axis(blocks, order, axis=-1)
  return blocks, counts, is_full.sum(-1).astype(np.int32)


class _Ordered(NamedTuple):
  """Tables as the kernels read them (int32): blocks FULL first, counts, n_full."""
  blocks: Any
  counts: Any
  n_full: Any


def _table_inputs(tables: _Ordered):
  return [(n, a, _full_spec(a.shape)) for n, a in zip(_Ordered._fields, tables)]


def _two_loops(n_full, n, body, carry):
  """``body(slot, carry, masked)`` over slots ``[0, n_full)`` unmasked, then ``[n_full, n)``."""
  carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
  return lax.fori_loop(n_full, n, functools.partial(body, masked=True), carry)


def _spec(c: _Static, heads, rows, d, index):
  """BlockSpec of a ``rows x d`` tile (``heads`` None: one squeezed head, else that many heads)
  of a ``[B, H, T, D]`` (bhtd) or ``[B, T, H, D]`` (bthd) array; ``index(*grid_ids)`` returns
  ``(b, head block, row block)``."""
  if c.layout == "bhtd":
    return pl.BlockSpec((None, heads, rows, d), lambda *g: (*index(*g), 0))

  def idx(*g):
    b, hb, rb = index(*g)
    return b, rb, hb, 0
  return pl.BlockSpec((None, rows, heads, d), idx)


def _head_rows(c: _Static, ref, g, rows):
  """Rows ``rows`` of head ``g`` of a multi-head tile."""
  return ref[g, rows, :] if c.layout == "bhtd" else ref[rows, g, :]


def _q_row_inputs(c: _Static, q, k, v, tables, q_pos, kv_pos, q_seg, kv_seg):
  """Inputs of the kernels whose grid rows are query blocks (forward, dq): grid
  ``(Tq // block_q, B * Hq)``; one query tile, the whole K/V of its kv head (read block by
  block), whole-array tables."""
  Hq, G, bq = c.hq, c.hq // c.hkv, c.block_q
  qpb, kpb = q_pos.shape[0], kv_pos.shape[0]
  kvmap = lambda i, bh: (bh // Hq, (bh % Hq) // G, 0)
  ins = [("q", q, _spec(c, None, bq, q.shape[-1], _qmap(c))),
         ("k", k, _spec(c, None, c.tk, k.shape[-1], kvmap)),
         ("v", v, _spec(c, None, c.tk, v.shape[-1], kvmap)),
         ("q_pos", q_pos, pl.BlockSpec((None, bq), lambda i, bh: (_sel(bh // Hq, qpb), i))),
         ("kv_pos", kv_pos, pl.BlockSpec((None, c.tk), lambda i, bh: (_sel(bh // Hq, kpb), 0)))]
  if c.has_seg:
    ins += [("q_seg", q_seg, pl.BlockSpec((None, bq), lambda i, bh: (bh // Hq, i))),
            ("kv_seg", kv_seg, pl.BlockSpec((None, c.tk), lambda i, bh: (bh // Hq, 0)))]
  return ins + _table_inputs(tables)


def _qmap(c):
  return lambda i, bh: (bh // c.hq, bh % c.hq, i)


def _rowmap(c):
  return lambda i, bh: (bh // c.hq, bh % c.hq, i)


def _visits_out(c, n_rows, heads):
  return [(jax.ShapeDtypeStruct((c.b, heads, n_rows), jnp.int32),
           pl.BlockSpec((None, None, 1), lambda i, bh: (bh // heads, bh % heads, i)))]


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, c: _Static, names, n_params):
  r, prefs, outs = _split_refs(refs, names, n_params)
  o_ref, lse_ref = outs[0], outs[1]
  i, bh = pl.program_id(0), pl.program_id(1)
  b, h = bh // c.hq, bh % c.hq
  tb, th = _sel(b, r["blocks"].shape[0]), _sel(h, r["blocks"].shape[1])
  q = r["q"][...]
  q_pos = r["q_pos"][...][:, None]
  q_seg = r["q_seg"][...] if c.has_seg else None
  bq, dv = q.shape[0], o_ref.shape[-1]
  # Without a score_fn the softmax runs in base 2: log2(e) folds into the logit scale and exp2
  # is the hardware instruction (one multiply per logit less, as in FlashAttention's kernels).
  unit, exp = (_LOG2E, jnp.exp2) if c.score_fn is None else (1.0, jnp.exp)
  if c.has_sinks:  # the sink is a logit whose value row is zero: start the softmax with it
    m0 = jnp.full((bq,), r["sinks"][h].astype(jnp.float32) * unit)
    l0 = jnp.ones((bq,), jnp.float32)
  else:
    m0 = jnp.full((bq,), _NEG_INF, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
  acc0 = jnp.zeros((bq, dv), jnp.float32)

  def body(slot, carry, masked):
    m, l, acc, cnt = carry
    kj = r["blocks"][tb, th, i, slot]
    ks = pl.ds(kj * c.block_kv, c.block_kv)
    k, v = r["k"][ks, :], r["v"][ks, :]
    kv_pos = r["kv_pos"][ks][None, :]
    kv_seg = r["kv_seg"][ks] if c.has_seg else None
    s, _ = _scores(c, q, k, q_pos, kv_pos, q_seg, kv_seg, prefs, b, h, i, kj, masked,
                   unit=unit)
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)  # all hidden so far: avoid inf - inf
    p = exp(s - m_safe[:, None])
    alpha = exp(m - m_safe)
    l = alpha * l + p.sum(axis=-1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, 1, 0)
    return m_new, l, acc, cnt + 1

  m, l, acc, cnt = _two_loops(r["n_full"][tb, th, i], r["counts"][tb, th, i], body,
                              (m0, l0, acc0, jnp.int32(0)))
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse = m + jnp.log(l_safe) if unit == 1.0 else (m + jnp.log2(l_safe)) * _LN2
  lse_ref[...] = jnp.where(empty, _NEG_INF, lse)
  if c.count_visits:
    outs[2][...] = jnp.full((1,), cnt, jnp.int32)


def _fwd_call(c: _Static, q, k, v, sinks, aux):
  B, Hq, Tq, _ = _bhtd(c, q.shape)
  nq = Tq // c.block_q
  ins = _q_row_inputs(c, q, k, v, aux.fwd_tables, aux.q_pos, aux.kv_pos, aux.q_seg, aux.kv_seg)
  if c.has_sinks:
    ins.append(("sinks", sinks.astype(jnp.float32), _full_spec((Hq,))))
  outs = [(jax.ShapeDtypeStruct(_layout_shape(c, B, Hq, Tq, v.shape[-1]), q.dtype),
           _spec(c, None, c.block_q, v.shape[-1], _qmap(c))),
          (jax.ShapeDtypeStruct((B, Hq, Tq), jnp.float32),
           pl.BlockSpec((None, None, c.block_q), _rowmap(c)))]
  outs += _visits_out(c, nq, Hq) if c.count_visits else []
  return _call(_fwd_kernel, c, (nq, B * Hq), ins, aux.params, outs, "flash_fwd_gpu")


# ----------------------------------------------------------------------------- backward


def _p_and_ds(s, vjp, lse, delta, do, v):
  """Probabilities and d(raw scaled logits) of one tile (FlashAttention-2 backward)."""
  lse_safe = jnp.where(lse == _NEG_INF, jnp.inf, lse)  # empty row: p = 0, not NaN
  p = jnp.exp(s - lse_safe[:, None])
  ds = p * (_dot(do, v, 1, 1) - delta[:, None])
  if vjp is not None:  # through score_fn
    (ds,) = vjp(ds)
  return p, ds


def _dq_kernel(*refs, c: _Static, names, n_params):
  r, prefs, outs = _split_refs(refs, names, n_params)
  i, bh = pl.program_id(0), pl.program_id(1)
  b, h = bh // c.hq, bh % c.hq
  tb, th = _sel(b, r["blocks"].shape[0]), _sel(h, r["blocks"].shape[1])
  q, do = r["q"][...], r["do"][...]
  lse, delta = r["lse"][...], r["delta"][...]
  q_pos = r["q_pos"][...][:, None]
  q_seg = r["q_seg"][...] if c.has_seg else None

  def body(slot, carry, masked):
    dq, cnt = carry
    kj = r["blocks"][tb, th, i, slot]
    ks = pl.ds(kj * c.block_kv, c.block_kv)
    k, v = r["k"][ks, :], r["v"][ks, :]
    kv_pos = r["kv_pos"][ks][None, :]
    kv_seg = r["kv_seg"][ks] if c.has_seg else None
    s, vjp = _scores(c, q, k, q_pos, kv_pos, q_seg, kv_seg, prefs, b, h, i, kj, masked,
                     need_vjp=True)
    _, ds = _p_and_ds(s, vjp, lse, delta, do, v)
    return dq + _dot(ds.astype(k.dtype), k, 1, 0), cnt + 1

  dq, cnt = _two_loops(r["n_full"][tb, th, i], r["counts"][tb, th, i], body,
                       (jnp.zeros(q.shape, jnp.float32), jnp.int32(0)))
  outs[0][...] = (dq * c.scale).astype(outs[0].dtype)
  if c.count_visits:
    outs[1][...] = jnp.full((1,), cnt, jnp.int32)


def _dkv_kernel(*refs, c: _Static, names, n_params):
  r, prefs, outs = _split_refs(refs, names, n_params)
  j, bkh = pl.program_id(0), pl.program_id(1)
  b, kvh = bkh // c.hkv, bkh % c.hkv
  G, bq = c.hq // c.hkv, c.block_q
  k, v = r["k"][...], r["v"][...]
  kv_pos = r["kv_pos"][...][None, :]
  kv_seg = r["kv_seg"][...] if c.has_seg else None

  def head_body(g, carry):  # the G query heads sharing this kv head
    h = kvh * G + g
    tb, th = _sel(b, r["blocks"].shape[0]), _sel(h, r["blocks"].shape[1])

    def body(slot, carry, masked):
      dk, dv, cnt = carry
      qi = r["blocks"][tb, th, j, slot]
      qs = pl.ds(qi * bq, bq)
      q, do = _head_rows(c, r["q"], g, qs), _head_rows(c, r["do"], g, qs)
      lse, delta = r["lse"][g, qs], r["delta"][g, qs]
      q_pos = r["q_pos"][qs][:, None]
      q_seg = r["q_seg"][qs] if c.has_seg else None
      s, vjp = _scores(c, q, k, q_pos, kv_pos, q_seg, kv_seg, prefs, b, h, qi, j, masked,
                       need_vjp=True)
      p, ds = _p_and_ds(s, vjp, lse, delta, do, v)
      dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
      dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)
      return dk, dv, cnt + 1

    return _two_loops(r["n_full"][tb, th, j], r["counts"][tb, th, j], body, carry)

  carry0 = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), jnp.int32(0))
  dk, dv, cnt = lax.fori_loop(0, G, head_body, carry0)
  outs[0][...] = (dk * c.scale).astype(outs[0].dtype)
  outs[1][...] = dv.astype(outs[1].dtype)
  if c.count_visits:
    outs[2][...] = jnp.full((1,), cnt, jnp.int32)


def _bwd_call(c: _Static, q, k, v, lse, do, delta, aux):
  B, Hq, Tq, D = _bhtd(c, q.shape)
  Dv, G, bq, bk, Hkv = v.shape[-1], Hq // c.hkv, c.block_q, c.block_kv, c.hkv
  nq, nk = Tq // bq, c.tk // bk
  lse, delta = lse.astype(jnp.float32), delta.astype(jnp.float32)

  # dq: rows = query blocks, loop over the forward tables.
  ins = _q_row_inputs(c, q, k, v, aux.fwd_tables, aux.q_pos, aux.kv_pos, aux.q_seg, aux.kv_seg)
  ins += [("do", do, _spec(c, None, bq, Dv, _qmap(c))),
          ("lse", lse, pl.BlockSpec((None, None, bq), _rowmap(c))),
          ("delta", delta, pl.BlockSpec((None, None, bq), _rowmap(c)))]
  outs = [(jax.ShapeDtypeStruct(q.shape, q.dtype), _spec(c, None, bq, D, _qmap(c)))]
  outs += _visits_out(c, nq, Hq) if c.count_visits else []
  dq_out = _call(_dq_kernel, c, (nq, B * Hq), ins, aux.params, outs, "flash_dq_gpu")

  # dk/dv: rows = key blocks; each program loops over the G query heads of its kv head and,
  # per head, over the query blocks listed in the dkv tables.
  qpb, kpb = aux.q_pos.shape[0], aux.kv_pos.shape[0]
  kmap = lambda j, bkh: (bkh // Hkv, bkh % Hkv, j)
  gmap = lambda j, bkh: (bkh // Hkv, bkh % Hkv, 0)
  grow = lambda j, bkh: (bkh // Hkv, bkh % Hkv, 0)
  ins = [("q", q, _spec(c, G, Tq, D, gmap)),
         ("k", k, _spec(c, None, bk, D, kmap)),
         ("v", v, _spec(c, None, bk, Dv, kmap)),
         ("do", do, _spec(c, G, Tq, Dv, gmap)),
         ("lse", lse, pl.BlockSpec((None, G, Tq), grow)),
         ("delta", delta, pl.BlockSpec((None, G, Tq), grow)),
         ("q_pos", aux.q_pos, pl.BlockSpec((None, Tq), lambda j, bkh: (_sel(bkh // Hkv, qpb), 0))),
         ("kv_pos", aux.kv_pos,
          pl.BlockSpec((None, bk), lambda j, bkh: (_sel(bkh // Hkv, kpb), j)))]
  if c.has_seg:
    ins += [("q_seg", aux.q_seg, pl.BlockSpec((None, Tq), lambda j, bkh: (bkh // Hkv, 0))),
            ("kv_seg", aux.kv_seg, pl.BlockSpec((None, bk), lambda j, bkh: (bkh // Hkv, j)))]
  ins += _table_inputs(aux.dkv_tables)
  outs = [(jax.ShapeDtypeStruct(k.shape, k.dtype), _spec(c, None, bk, D, kmap)),
          (jax.ShapeDtypeStruct(v.shape, v.dtype), _spec(c, None, bk, Dv, kmap))]
  outs += _visits_out(c, nk, Hkv) if c.count_visits else []
  dkv_out = _call(_dkv_kernel, c, (nk, B * Hkv), ins, aux.params, outs, "flash_dkv_gpu")
  return (dq_out[0], *dkv_out[:2], *dq_out[1:], *dkv_out[2:])


# ----------------------------------------------------------------------------- wrappers


class _Aux(NamedTuple):
  """Non-differentiated array inputs."""
  fwd_tables: _Ordered
  dkv_tables: _Ordered
  q_pos: Any
  kv_pos: Any
  q_seg: Any
  kv_seg: Any
  params: tuple


def _check_tables(name, t, batch, hq, n_rows, n_cols):
  if not isinstance(t, BlockTables):
    raise TypeError(f"{name} must be a pallas_kernels.flash.common.BlockTables, got {type(t)}")
  bs, cs, fs = (np.shape(a) for a in t)
  if len(bs) != 4 or fs != bs or cs != bs[:3]:
    raise ValueError(f"{name}: blocks/full must be [Bt, Ht, n_rows, K] and counts [Bt, Ht, n_rows]"
                     f"; got blocks {bs}, counts {cs}, full {fs}")
  if bs[0] not in (1, batch) or bs[1] not in (1, hq) or bs[2] != n_rows or bs[3] < 1:
    raise ValueError(f"{name}: expected shape [Bt in (1, {batch}), Ht in (1, {hq}), {n_rows}, K>=1]"
                     f" for these block sizes, got {bs}")
  if all(isinstance(a, np.ndarray) for a in t):
    if t.blocks.size and (t.blocks.min() < 0 or t.blocks.max() >= n_cols):
      raise ValueError(f"{name}.blocks must lie in [0, {n_cols}), got range "
                       f"[{t.blocks.min()}, {t.blocks.max()}]")
    if t.counts.size and (t.counts.min() < 0 or t.counts.max() > bs[3]):
      raise ValueError(f"{name}.counts must lie in [0, K={bs[3]}]")
  # Static (numpy) tables are reordered here on the host, so the reordering is a constant of
  # the compiled program; run-time tables are reordered on the device.
  return _Ordered(*(jnp.asarray(a, jnp.int32) for a in _full_first(t)))


def _setup(q, k, v, *, fwd_tables, dkv_tables, q_pos, kv_pos, kv_len, scale, mask_fn=None,
           score_fn=None, score_params=(), score_param_specs=(), q_segment_ids=None,
           kv_segment_ids=None, sinks=None, block_q=64, block_kv=64, num_warps=None,
           num_stages=None, interpret=None, layout="bhtd", count_visits=False):
  """Validate the arguments; return the static config and the non-differentiated arrays."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  elif not isinstance(interpret, (bool, np.bool_)):
    raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
  interpret = bool(interpret)
  if layout not in ("bhtd", "bthd"):
    raise ValueError(f"layout must be 'bhtd' ([B, H, T, D]) or 'bthd' ([B, T, H, D]), "
                     f"got {layout!r}")
  names = "[B, H, T, D] (layout='bhtd')" if layout == "bhtd" else "[B, T, H, D] (layout='bthd')"
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4 {names}; got q {q.shape}, k {k.shape}, "
                     f"v {v.shape}")
  hm = (lambda s: tuple(s)) if layout == "bhtd" else (lambda s: (s[0], s[2], s[1], s[3]))
  B, Hq, Tq, D = hm(q.shape)
  _, Hkv, Tk, _ = hm(k.shape)
  if k.shape[0] != B or k.shape[3] != D:
    raise ValueError(f"k must be {names} with B={B}, D={D}, got {k.shape}")
  if hm(v.shape)[:3] != hm(k.shape)[:3]:
    raise ValueError(f"v must be {names} matching k's B, H, T; got k {k.shape}, v {v.shape}")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16,
                                                             jnp.float16):
    raise ValueError(f"q, k, v must share one dtype among float32/bfloat16/float16, got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  if Hkv < 1 or Hq % Hkv:
    raise ValueError(f"number of query heads Hq={Hq} must be a multiple of kv heads Hkv={Hkv}")
  min_block = 8 if interpret else 16
  for name, blk, t in (("block_q", block_q, Tq), ("block_kv", block_kv, Tk)):
    if (isinstance(blk, (bool, np.bool_)) or not isinstance(blk, (int, np.integer))
        or not _pow2(blk) or blk < min_block):
      raise ValueError(f"{name} must be a power of two >= {min_block} "
                       f"({'interpret mode' if interpret else 'tl.dot on GPU'}), got {blk!r}"
                       + platform_lib.host_note("gpu", not interpret))
    if t % blk:
      raise ValueError(f"{name}={blk} must divide the sequence length {t} (the caller pads)")
  kv_len = int(kv_len)
  if not 0 <= kv_len <= Tk:
    raise ValueError(f"kv_len must satisfy 0 <= kv_len <= Tk={Tk}, got {kv_len}")
  fwd_tables = _check_tables("fwd_tables", fwd_tables, B, Hq, Tq // block_q, Tk // block_kv)
  dkv_tables = _check_tables("dkv_tables", dkv_tables, B, Hq, Tk // block_kv, Tq // block_q)
  q_pos, kv_pos = jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_pos, jnp.int32)
  for name, pos, t in (("q_pos", q_pos, Tq), ("kv_pos", kv_pos, Tk)):
    if pos.ndim != 2 or pos.shape[0] not in (1, B) or pos.shape[1] != t:
      raise ValueError(f"{name} must be int32 [1 or B={B}, {t}], got {pos.shape}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  has_seg = q_segment_ids is not None
  if has_seg:
    q_segment_ids = jnp.asarray(q_segment_ids, jnp.int32)
    kv_segment_ids = jnp.asarray(kv_segment_ids, jnp.int32)
    if q_segment_ids.shape != (B, Tq) or kv_segment_ids.shape != (B, Tk):
      raise ValueError(f"segment ids must be q_segment_ids [B, Tq]={(B, Tq)} and kv_segment_ids "
                       f"[B, Tk]={(B, Tk)}; got {q_segment_ids.shape}, {kv_segment_ids.shape}")
  if sinks is not None and jnp.shape(sinks) != (Hq,):
    raise ValueError(f"sinks must be [Hq]=({Hq},), got {jnp.shape(sinks)}")
  score_params, score_param_specs = tuple(score_params), tuple(score_param_specs)
  if len(score_params) != len(score_param_specs):
    raise ValueError(f"score_params ({len(score_params)}) and score_param_specs "
                     f"({len(score_param_specs)}) must have the same length")
  if score_params and score_fn is None:
    raise ValueError("score_params were given without a score_fn")
  specs = []
  for n, (p, spec) in enumerate(zip(score_params, score_param_specs)):
    nd = jnp.ndim(p)
    axes = tuple(None if a is None else int(a) % nd if -nd <= int(a) < nd else None
                 for a in tuple(spec))
    if len(axes) != 4 or any(a is None and b is not None for a, b in zip(axes, tuple(spec))):
      raise ValueError(f"score_param_specs[{n}]={spec} must hold 4 axes of a rank-{nd} param")
    ba, ha, qa, ka = axes
    shp = jnp.shape(p)
    for what, ax, ok, want in (("batch", ba, (1, B), f"1 or {B}"), ("head", ha, (1, Hq),
                               f"1 or {Hq}"), ("q", qa, (Tq,), Tq), ("kv", ka, (Tk,), Tk)):
      if ax is not None and shp[ax] not in ok:
        raise ValueError(f"score_params[{n}] axis {ax} ({what}) must have size {want}, "
                         f"got shape {shp}")
    specs.append(axes)
  c = _Static(B, Hq, Hkv, Tk, kv_len, float(scale), int(block_q), int(block_kv), mask_fn,
              score_fn, tuple(specs), has_seg, sinks is not None, num_warps, num_stages,
              interpret, layout, bool(count_visits))
  aux = _Aux(fwd_tables, dkv_tables, q_pos, kv_pos, q_segment_ids, kv_segment_ids,
             tuple(jnp.asarray(p) for p in score_params))
  return c, aux


def _pad_last(x, n):
  return x if x.shape[-1] == n else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _dim(c: _Static, d: int) -> int:
  """Padded head dim: Triton tensors are powers of two and tl.dot wants >= 16 on a GPU; zero
  columns are inert in q.k and dropped from the output."""
  return _next_pow2(d) if c.interpret else max(16, _next_pow2(d))


def _fwd_impl(c: _Static, q, k, v, sinks, aux: _Aux):
  D, Dv = q.shape[-1], v.shape[-1]
  Dp, Dvp = _dim(c, D), _dim(c, Dv)
  outs = _fwd_call(c, _pad_last(q, Dp), _pad_last(k, Dp), _pad_last(v, Dvp), sinks, aux)
  return (outs[0][..., :Dv],) + tuple(outs[1:])


def _bwd_impl(c: _Static, q, k, v, lse, do, delta, aux: _Aux):
  D, Dv = q.shape[-1], v.shape[-1]
  Dp, Dvp = _dim(c, D), _dim(c, Dv)
  outs = _bwd_call(c, _pad_last(q, Dp), _pad_last(k, Dp), _pad_last(v, Dvp), lse,
                   _pad_last(do.astype(q.dtype), Dvp), delta, aux)
  dq, dk, dv, *visits = outs  # visits: (dq, dkv) loop counts when c.count_visits
  return (dq[..., :D], dk[..., :D], dv[..., :Dv], *visits)


def _rowsum(c: _Static, do, out):
  """``rowsum(do * out)`` as ``[B, Hq, Tq]`` f32 (the layout of lse and delta)."""
  d = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  return d if c.layout == "bhtd" else d.transpose(0, 2, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c, q, k, v, sinks, aux):
  return tuple(_fwd_impl(c, q, k, v, sinks, aux)[:2])


def _flash_fwd_rule(c, q, k, v, sinks, aux):
  out, lse = _fwd_impl(c, q, k, v, sinks, aux)[:2]
  return (out, lse), (q, k, v, sinks, aux, out, lse)


def _flash_bwd_rule(c, res, g):
  q, k, v, sinks, aux, out, lse = res
  do, dlse = g
  delta = _rowsum(c, do, out) - dlse.astype(jnp.float32)
  dq, dk, dv = _bwd_impl(c, q, k, v, lse, do, delta, aux)[:3]
  dsinks = None
  if sinks is not None:
    # lse = -inf (a row with no key and a -inf sink): p_sink = 0, not exp(-inf + inf) = NaN.
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse_safe)
    dsinks = (-jnp.sum(p_sink * delta, axis=(0, 2))).astype(sinks.dtype)
  aux_ct = jax.tree_util.tree_map(lambda _: None, aux)
  return dq, dk, dv, dsinks, aux_ct


_flash.defvjp(_flash_fwd_rule, _flash_bwd_rule)


def _kwargs(local_vars, drop=("q", "k", "v", "out", "lse", "do", "delta")):
  return {n: x for n, x in local_vars.items() if n not in drop}


def flash_attention(q, k, v, *, fwd_tables, dkv_tables, q_pos, kv_pos, kv_len, scale,
                    mask_fn=None, score_fn=None, score_params=(), score_param_specs=(),
                    q_segment_ids=None, kv_segment_ids=None, sinks=None, block_q=64,
                    block_kv=64, num_warps=None, num_stages=None, interpret=None,
                    layout="bhtd"):
  """Block-sparse flash attention ``-> (out [B, Hq, Tq, Dv] in q.dtype, lse [B, Hq, Tq] f32)``
  (``out`` is ``[B, Tq, Hq, Dv]`` with ``layout="bthd"``).

  A ``jax.custom_vjp`` differentiable in ``q``, ``k``, ``v`` and ``sinks``; tables, positions,
  segment ids and score params get no gradient (score params are passed through
  non-differentiated; the attnjax adapter computes their gradients separately).

  Args: ``fwd_tables`` / ``dkv_tables``: BlockTables built at ``(block_q, block_kv)``;
  ``q_pos [1|B, Tq]``, ``kv_pos [1|B, Tk]``: int32 positions for ``mask_fn``/``score_fn``;
  ``kv_len``: static int, keys at index >= kv_len are padding; ``scale``: static float;
  ``mask_fn(q_pos [bq,1], kv_pos [1,bk], head) -> bool [bq,bk]``;
  ``score_fn(param_tiles, s, batch, head, q_pos, kv_pos) -> s`` with ``score_params`` cut per
  ``score_param_specs`` (``common.ParamSpec``); ``q_segment_ids [B, Tq]``,
  ``kv_segment_ids [B, Tk]``; ``sinks [Hq]``; ``block_q``/``block_kv``: powers of two dividing
  Tq/Tk; ``num_warps``/``num_stages``: Triton compiler params; ``interpret``: None means True
  unless the default backend is GPU, else a bool (False compiles: lowering for another platform
  raises a ValueError naming ``interpret``); ``layout``: "bhtd" (q, k, v, out head-major) or "bthd"
  (``[B, T, H, D]``, read in place).
  """
  c, aux = _setup(q, k, v, **_kwargs(locals()))
  return _flash(c, q, k, v, sinks, aux)


def flash_attention_fwd(q, k, v, *, fwd_tables, dkv_tables, q_pos, kv_pos, kv_len, scale,
                        mask_fn=None, score_fn=None, score_params=(), score_param_specs=(),
                        q_segment_ids=None, kv_segment_ids=None, sinks=None, block_q=64,
                        block_kv=64, num_warps=None, num_stages=None, interpret=None,
                        layout="bhtd"):
  """Forward kernel only: ``(out, lse)``; arguments as :func:`flash_attention`."""
  c, aux = _setup(q, k, v, **_kwargs(locals()))
  return tuple(_fwd_impl(c, q, k, v, sinks, aux)[:2])


def flash_attention_bwd(q, k, v, out, lse, do, delta, *, fwd_tables, dkv_tables, q_pos, kv_pos,
                        kv_len, scale, mask_fn=None, score_fn=None, score_params=(),
                        score_param_specs=(), q_segment_ids=None, kv_segment_ids=None,
                        sinks=None, block_q=64, block_kv=64, num_warps=None, num_stages=None,
                        interpret=None, layout="bhtd"):
  """Backward kernels: ``(dq, dk, dv)`` from the forward ``out``/``lse``, the output cotangent
  ``do`` and ``delta = rowsum(do * out) - dlse`` (``[B, Hq, Tq]`` f32; ``out`` itself is only
  needed through delta). The sink gradient ``dsink_h = -sum_{b,i} exp(sink_h - lse) * delta`` is
  left to the caller (jnp, as :func:`flash_attention` does). Arguments as
  :func:`flash_attention`."""
  c, aux = _setup(q, k, v, **_kwargs(locals()))
  return tuple(_bwd_impl(c, q, k, v, lse, do, delta, aux)[:3])


def _visit_counts(q, k, v, do, **kwargs):
  """Debug: the number of loop iterations the forward, dq and dk/dv kernels actually executed,
  ``(fwd [B, Hq, nq], dq [B, Hq, nq], dkv [B, Hkv, nk])``."""
  c, aux = _setup(q, k, v, count_visits=True, **kwargs)
  out, lse, fwd_cnt = _fwd_impl(c, q, k, v, kwargs.get("sinks"), aux)
  delta = _rowsum(c, do, out)
  *_, dq_cnt, dkv_cnt = _bwd_impl(c, q, k, v, lse, do, delta, aux)
  return fwd_cnt, dq_cnt, dkv_cnt
