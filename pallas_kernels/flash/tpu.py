"""Block-sparse flash attention for TPU (Pallas / Mosaic), forward and backward.

Algorithm: FlashAttention-2 (T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism
and Work Partitioning", 2023): the forward pass keeps a running row max ``m``, row sum ``l`` and an
f32 output accumulator per query block, and stores the natural-log LSE; the backward recomputes
``P = exp(S - lse)`` and runs one kernel for dQ (grid over query blocks) and one for dK/dV (grid
over key blocks), with ``delta = rowsum(dO * O) - dlse`` so an LSE cotangent is honoured
(``dS = P * (dP - delta)``).

Semantics, per batch ``b``, query head ``h`` (kv head ``h // (Hq // Hkv)``), query row ``i``::

    s_ij  = score_fn(tiles, scale * q_i . k_j, b, h, q_pos_i, kv_pos_j)   (identity if None)
    vis_ij = mask_fn(q_pos_i, kv_pos_j, h) & (j < kv_len) & (qseg_i == kvseg_j) & (block visited)
    lse_i = log(sum_{j vis} exp(s_ij) + exp(sinks_h))                        (no sink term if None)
    out_i = sum_{j vis} exp(s_ij - lse_i) v_j

``mask_fn`` and the ``kv_len`` padding mask are only evaluated in blocks whose table slot is not
FULL (a FULL block that straddles ``kv_len`` is still padded); segment ids are applied everywhere.
A row that sees no key gets ``out = 0`` and ``lse = -inf`` (``lse = sinks_h`` with sinks, which is
the value of the formula) and zero gradients.

Sparsity: the grid's last axis runs over the slots of a :class:`~.common.BlockTables` row; the
tables are scalar-prefetched into SMEM (flattened to 1-D, which avoids SMEM's 2-D padding) and
the BlockSpec index maps read the block index from them, so a skipped slot (``slot >= count``)
re-uses the previous block (no DMA) and its body is skipped with ``pl.when``. Work is therefore
proportional to the non-empty blocks.

Layouts (chosen for TPU's (8, 128) tiling): q/k/v blocks ``[block, D]``; per-query vectors that
the kernel writes or that are per head (``lse``, ``delta``) travel lane-dense as rows ``[1, bq]``
of ``[B, Hq, 1, Tq]`` arrays and are transposed in-kernel; query positions / segment ids travel
as columns ``[Bp, Tq, 1]`` (they are per example only), key positions / ids as rows
``[Bp, 1, Tk]``. ``m`` and ``l`` scratch are lane-replicated ``[bq, 128]``.

Score parameters (``score_params`` with :class:`~.common.ParamSpec`) are cut to the tile by their
BlockSpec when that block is legal on TPU (last two block dims divisible by (8, 128) or equal to
the array's); otherwise the wrapper moves the batch/head axes to the front (one HBM transpose
per call) so the block is legal, and the kernel reshapes the tile back (only unit axes move).
Prefer parameter layouts with batch/head axes leading (e.g. ``[B, Hq, Tq, R]``).

GQA: grids are ``(B, Hkv, G, n_q_blocks, K)`` for forward/dQ and ``(B, Hkv, n_kv_blocks, G, K)``
for dK/dV, so the dK/dV kernel sums over the ``G = Hq // Hkv`` query heads of a kv head in its
f32 scratch (no per-query-head dK/dV is materialized and K/V are never repeated).

Gradients: :func:`flash_attention` is a ``custom_vjp`` over ``(q, k, v, sinks)``. Score params go
through ``stop_gradient``: gradients into them are the caller's job (the attnjax adapter computes
them separately, e.g. with :func:`flash_attention_fwd`/:func:`flash_attention_bwd`).

Block sizes (``block_q`` and ``block_kv``; Python or numpy ints) must be multiples of 128 when
compiled (the LSE and key positions travel lane-dense as ``[1, block]`` rows, q/k/v tiles are
(8, 128)-tiled); in interpret mode multiples of 8 are accepted so tests stay small. q/k/v are
float32 or bfloat16 (anything else raises, interpreted or not). ``scale`` must be a Python
float. ``interpret``: None = the TPU interpreter (``pltpu.InterpretParams()``, which NaN-fills
uninitialized memory) off TPU and Mosaic on TPU; True = Pallas' generic interpreter (fast; most
CPU tests); False = Mosaic (lowering for another platform raises a ``ValueError`` naming
``interpret``; cross-lowering for TPU with ``jax.export`` works); or an ``InterpretParams``;
anything else raises. A call's tables stay in SMEM (``Bt * Ht * n_rows * (2K + 1)`` int32
words); past :data:`.smem.SMEM_TABLE_BUDGET` one kernel runs equal parts in a loop (:mod:`.smem`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import platform as platform_lib
from pallas_kernels.flash import smem
from pallas_kernels.flash.common import BlockTables, ParamSpec

_LANES = 128
_DTYPES = (jnp.float32, jnp.bfloat16)
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _mm(a, b, dims):
  """f32-accumulating matmul; float32 operands at full precision (DEFAULT may run one bfloat16
  pass on the MXU), other dtypes at their native rate."""
  prec = lax.Precision.HIGHEST if a.dtype == _F32 and b.dtype == _F32 else None
  return lax.dot_general(a, b, dims, preferred_element_type=_F32, precision=prec)


@dataclasses.dataclass(frozen=True)
class _PMeta:
  perm: tuple | None   # axis permutation applied by the wrapper (None: direct BlockSpec)
  block: tuple         # block shape of the (permuted) array
  roles: tuple         # per block axis: 'b', 'h', 'q', 'k' or '0'
  tile: tuple          # tile shape in the parameter's own axis order


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static problem description (hashable: the custom_vjp's non-differentiable argument)."""
  B: int; Hq: int; Hkv: int; Tq: int; Tk: int; D: int; Dv: int  # noqa: E702
  bq: int; bk: int; kv_len: int; scale: float  # noqa: E702
  mask_fn: Callable | None; score_fn: Callable | None; pmeta: tuple  # noqa: E702
  has_seg: bool; has_sinks: bool; Bp: int  # noqa: E702
  fwd_geom: tuple   # (Bt, Ht, K) of the forward/dq tables
  dkv_geom: tuple   # (Bt, Ht, K) of the dkv tables
  interpret: Any    # None (Mosaic), True (generic interpreter) or a pltpu.InterpretParams
  debug_counts: bool = False
  smem_budget: int = 0   # bytes of scalar-prefetched tables one pallas_call may hold
  part: Any = None       # the smem.Plan of the kernel's parts (set by _call)

  G = property(lambda self: self.Hq // self.Hkv)
  nq = property(lambda self: self.Tq // self.bq)
  nk = property(lambda self: self.Tk // self.bk)
  pad_keys = property(lambda self: self.kv_len < self.Tk)


# ----------------------------------------------------------------------------- validation / prep
def _resolve_interpret(interpret):
  """None -> ``pltpu.InterpretParams()`` (the TPU interpreter: models SMEM/VMEM, DMAs and fills
  uninitialized memory with NaN) unless running on TPU; True -> Pallas' generic interpreter
  (much faster on CPU; used by most tests); False -> compile with Mosaic; an ``InterpretParams``
  is passed through. Anything else raises (a truthy string is not an interpreter)."""
  if interpret is None:
    return pltpu.InterpretParams() if jax.default_backend() != "tpu" else None
  if isinstance(interpret, (bool, np.bool_)):
    return True if interpret else None
  if isinstance(interpret, pltpu.InterpretParams):
    return interpret
  raise ValueError(f"interpret must be None, True, False or a pltpu.InterpretParams, got "
                   f"{interpret!r}")


def _check_block(name, bs, lane, compiled):
  """A block size: a (numpy) int, positive multiple of ``lane`` (128 compiled, 8 interpreted:
  q/k/v tiles are (8, 128)-tiled and the LSE and key positions travel lane-dense as
  ``[1, block]`` rows, so both block_q and block_kv are lane multiples on a TPU)."""
  if isinstance(bs, (bool, np.bool_)) or not isinstance(bs, numbers.Integral) or bs <= 0 \
      or bs % lane:
    why = "TPU lane width, compiled" if compiled else "interpret mode"
    raise ValueError(f"{name} must be a positive multiple of {lane} ({why}), got {bs!r}"
                     + platform_lib.host_note("tpu", compiled))
  return int(bs)


def _prep_tables(t, name, B, Hq, n_rows, n_cols):
  if not isinstance(t, BlockTables):
    raise ValueError(f"{name} must be a BlockTables, got {type(t).__name__}")
  blocks, counts, full = (jnp.asarray(a, jnp.int32) if not isinstance(a, np.ndarray)
                          else np.asarray(a, np.int32) for a in t)
  if blocks.ndim != 4:
    raise ValueError(f"{name}.blocks must be rank 4 [Bt, Ht, n_rows, K], got {blocks.shape}")
  Bt, Ht, R, K = blocks.shape
  if Bt not in (1, B) or Ht not in (1, Hq) or R != n_rows or K < 1:
    raise ValueError(f"{name}.blocks must have shape [1 or {B}, 1 or {Hq}, {n_rows}, K>=1] at "
                     f"these block sizes, got {blocks.shape}")
  if counts.shape != (Bt, Ht, R) or full.shape != blocks.shape:
    raise ValueError(f"{name}: counts must be {(Bt, Ht, R)} and full {blocks.shape}, got "
                     f"{counts.shape} and {full.shape}")
  if isinstance(blocks, np.ndarray) and (blocks.min() < 0 or blocks.max() >= n_cols):
    raise ValueError(f"{name}.blocks entries must lie in [0, {n_cols}), got range "
                     f"[{blocks.min()}, {blocks.max()}]")
  return (blocks, counts, full), (Bt, Ht, K)


def _prep_param(x, spec, i, B, Hq, Tq, Tk, bq, bk, lane):
  if not isinstance(spec, ParamSpec):
    raise ValueError(f"score_param_specs[{i}] must be a ParamSpec, got {spec!r}")
  x = jnp.asarray(x)
  n = x.ndim
  roles, tile, used = ["0"] * n, list(x.shape), set()
  for role, ax, sizes in (("b", spec.batch_axis, (1, B)), ("h", spec.head_axis, (1, Hq)),
                          ("q", spec.q_axis, (Tq,)), ("k", spec.kv_axis, (Tk,))):
    if ax is None:
      continue
    if not -n <= ax < n or ax % n in used:
      raise ValueError(f"score_param_specs[{i}]: axis {ax} invalid or repeated for a param of "
                       f"shape {x.shape}")
    ax %= n
    used.add(ax)
    if x.shape[ax] not in sizes:
      raise ValueError(f"score_params[{i}] axis {ax} ({role}) must have size in {sizes}, got "
                       f"{x.shape[ax]}")
    roles[ax] = role if x.shape[ax] > 1 else "0"  # size-1 batch/head axes broadcast
    tile[ax] = {"b": 1, "h": 1, "q": bq, "k": bk}[role]
  tile, roles = tuple(tile), tuple(roles)

  def legal(block, shape):
    sub = 8 * max(1, 4 // x.dtype.itemsize)
    ok = not shape or block[-1] == shape[-1] or block[-1] % lane == 0
    return ok and (len(shape) < 2 or block[-2] == shape[-2] or block[-2] % sub == 0)

  if legal(tile, x.shape):
    return x, _PMeta(None, tile, roles, tile)
  lead = [a for a in (spec.batch_axis, spec.head_axis) if a is not None]
  lead = [a % n for a in lead]
  perm = tuple(lead + [a for a in range(n) if a not in lead])
  xp = jnp.transpose(x, perm)
  pad = max(0, 2 - (n - len(lead)))
  xp = xp.reshape(xp.shape[:len(lead)] + (1,) * pad + xp.shape[len(lead):])
  p_roles = tuple(roles[a] for a in perm[:len(lead)]) + ("0",) * pad + tuple(
      roles[a] for a in perm[len(lead):])
  p_block = tuple(tile[a] for a in perm[:len(lead)]) + (1,) * pad + tuple(
      tile[a] for a in perm[len(lead):])
  return xp, _PMeta(perm, p_block, p_roles, tile)


def _prepare(q, k, v, *, fwd_tables, dkv_tables, q_pos, kv_pos, kv_len, scale, mask_fn=None,
             score_fn=None, score_params=(), score_param_specs=(), q_segment_ids=None,
             kv_segment_ids=None, sinks=None, block_q=128, block_kv=128, interpret=None,
             debug_counts=False):
  """Validate every argument; return the static config and the kernel-ready side arrays."""
  interp = _resolve_interpret(interpret)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be rank 4 [B, H, T, D], got shape {getattr(x, 'shape', x)}")
  B, Hq, Tq, D = q.shape
  _, Hkv, Tk, Dk = k.shape
  Dv = v.shape[-1]
  if k.shape[0] != B or v.shape[0] != B:
    raise ValueError(f"q, k, v must share the batch size, got {q.shape}, {k.shape}, {v.shape}")
  if Dk != D:
    raise ValueError(f"k head dim must equal q head dim {D}, got {Dk}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must be [B, Hkv, Tk, Dv] = {k.shape[:3]} + (Dv,), got {v.shape}")
  if Hq % Hkv:
    raise ValueError(f"number of query heads {Hq} must be a multiple of kv heads {Hkv} (Hq % Hkv)")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if q.dtype not in _DTYPES:
    raise ValueError(f"q, k, v dtype {q.dtype} is not supported by the TPU flash kernel; "
                     "allowed: float32, bfloat16 (float16 and integer types are rejected, "
                     "interpreted or not, so CPU tests reflect the TPU)")
  lane = _LANES if interp is None else 8
  block_q = _check_block("block_q", block_q, lane, interp is None)
  block_kv = _check_block("block_kv", block_kv, lane, interp is None)
  for name, bs, T in (("block_q", block_q, Tq), ("block_kv", block_kv, Tk)):
    if T % bs:
      raise ValueError(f"{name}={bs} must divide the sequence length {T} (pad the inputs)")
  if not isinstance(kv_len, (int, np.integer)) or not 0 <= kv_len <= Tk:
    raise ValueError(f"kv_len must be a static int in [0, Tk={Tk}], got {kv_len!r}")
  if not isinstance(scale, (float, int, np.floating)):
    raise ValueError(f"scale must be a Python float, got {type(scale).__name__}")
  nq, nk = Tq // block_q, Tk // block_kv
  fwd, fwd_geom = _prep_tables(fwd_tables, "fwd_tables", B, Hq, nq, nk)
  dkv, dkv_geom = _prep_tables(dkv_tables, "dkv_tables", B, Hq, nk, nq)
  q_pos, kv_pos = jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_pos, jnp.int32)
  Bp = q_pos.shape[0] if q_pos.ndim == 2 else -1
  if q_pos.shape != (Bp, Tq) or Bp not in (1, B) or kv_pos.shape != (Bp, Tk):
    raise ValueError(f"q_pos / kv_pos must be int32 [Bp, Tq] / [Bp, Tk] with Bp in (1, {B}), "
                     f"got {q_pos.shape} / {kv_pos.shape}")
  side = [q_pos.reshape(Bp, Tq, 1), kv_pos.reshape(Bp, 1, Tk)]
  has_seg = q_segment_ids is not None or kv_segment_ids is not None
  if has_seg:
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    qs, ks = jnp.asarray(q_segment_ids, jnp.int32), jnp.asarray(kv_segment_ids, jnp.int32)
    if qs.shape != (B, Tq) or ks.shape != (B, Tk):
      raise ValueError(f"q_segment_ids / kv_segment_ids must be [B, Tq] / [B, Tk] = "
                       f"{(B, Tq)} / {(B, Tk)}, got {qs.shape} / {ks.shape}")
    side += [qs.reshape(B, Tq, 1), ks.reshape(B, 1, Tk)]
  if sinks is not None and jnp.shape(sinks) != (Hq,):
    raise ValueError(f"sinks must have shape [Hq] = ({Hq},), got {jnp.shape(sinks)}")
  score_params, score_param_specs = tuple(score_params), tuple(score_param_specs)
  if len(score_params) != len(score_param_specs):
    raise ValueError(f"score_params ({len(score_params)}) and score_param_specs "
                     f"({len(score_param_specs)}) must have the same length")
  if score_params and score_fn is None:
    raise ValueError("score_params were given without a score_fn")
  params, pmeta = [], []
  for i, (x, spec) in enumerate(zip(score_params, score_param_specs)):
    xp, meta = _prep_param(x, spec, i, B, Hq, Tq, Tk, block_q, block_kv, lane)
    params.append(xp)
    pmeta.append(meta)
  cfg = _Cfg(B, Hq, Hkv, Tq, Tk, D, Dv, block_q, block_kv, int(kv_len), float(scale), mask_fn,
             score_fn, tuple(pmeta), has_seg, sinks is not None, Bp, fwd_geom, dkv_geom, interp,
             debug_counts, smem.budget(interp is None))
  return cfg, (fwd, dkv, tuple(side), tuple(params))


# --------------------------------------------------------------------------------- grid context
def _ctx(cfg, idx, tables, dkv):
  """Scalars of one grid step. Forward/dQ grid: (b, hkv, g, i, slot); dKV: (b, hkv, j, g, slot),
  local to a part of the smem.Plan. ``b, h, hkv, r, qi, kj`` are global, clamped into range
  (inputs, mask_fn, score_fn); ``bo, ho, hkvo, ro`` index the (padded) outputs."""
  p = cfg.part
  if dkv:
    bl, hkvl, rl, g, s = idx
  else:
    bl, hkvl, g, rl, s = idx
  K = (cfg.dkv_geom if dkv else cfg.fwd_geom)[2]
  blocks, counts, full = tables[:3]
  hl = hkvl * cfg.G + g
  row = ((bl if p.Bt > 1 else 0) * p.Ht + (hl if p.Ht > 1 else 0)) * p.nr + rl
  (bo, hkvo, ro), (b, hkv, r) = smem.step_indices(p, (bl, hkvl, rl), tables[3:])
  h = hkv * cfg.G + g
  cnt = counts[row]
  at = row * K + jnp.minimum(s, jnp.maximum(cnt - 1, 0))  # clamp: padded slots repeat the last
  col = blocks[at]
  qi, kj = (col, r) if dkv else (r, col)
  return types.SimpleNamespace(b=b, h=h, hkv=hkv, g=g, r=r, s=s, K=K, cnt=cnt, full=full[at],
                               qi=qi, kj=kj, bp=b if cfg.Bp > 1 else 0, bo=bo,
                               ho=hkvo * cfg.G + g, hkvo=hkvo, ro=ro)


def _spec(cfg, dkv, block, fn):
  """A BlockSpec whose index map is ``fn(ctx)`` (grid indices then the prefetched operands)."""
  return pl.BlockSpec(block, lambda *a: fn(_ctx(cfg, a[:5], a[5:8 + cfg.part.split], dkv)))


def _in_specs(cfg, dkv, extra):
  """BlockSpecs of the inputs shared by all kernels, then ``extra`` ((block, fn) pairs; a None
  block means a whole array in SMEM)."""
  spec = functools.partial(_spec, cfg, dkv)
  bq, bk = cfg.bq, cfg.bk
  specs = [spec((None, None, bq, cfg.D), lambda c: (c.b, c.h, c.qi, 0)),
           spec((None, None, bk, cfg.D), lambda c: (c.b, c.hkv, c.kj, 0)),
           spec((None, None, bk, cfg.Dv), lambda c: (c.b, c.hkv, c.kj, 0)),
           spec((None, bq, 1), lambda c: (c.bp, c.qi, 0)),
           spec((None, 1, bk), lambda c: (c.bp, 0, c.kj))]
  if cfg.has_seg:
    specs += [spec((None, bq, 1), lambda c: (c.b, c.qi, 0)),
              spec((None, 1, bk), lambda c: (c.b, 0, c.kj))]
  for m in cfg.pmeta:
    specs.append(spec(m.block, functools.partial(
        lambda roles, c: tuple({"b": c.b, "h": c.h, "q": c.qi, "k": c.kj}.get(r, 0)
                               for r in roles), m.roles)))
  for block, fn in extra:
    specs.append(spec(block, fn) if block is not None
                 else pl.BlockSpec(memory_space=pltpu.SMEM))
  return specs


def _unpack(cfg, args, extra_in, outs):
  it = iter(args)
  r = types.SimpleNamespace(tables=tuple(next(it) for _ in range(3 + cfg.part.split)))
  for name in ("q", "k", "v", "qpos", "kvpos") + (("qseg", "kvseg") if cfg.has_seg else ()):
    setattr(r, name, next(it))
  r.params = [next(it) for _ in cfg.pmeta]
  outs = tuple(outs) + (("cnt",) if cfg.debug_counts else ())  # after the aliased buffers if any
  for name in tuple(extra_in) + ("_",) * (len(outs) * cfg.part.split) + outs:
    setattr(r, name, next(it))
  r.scratch = list(it)
  return r


# ---------------------------------------------------------------------------- in-kernel helpers
def _to_col(row):
  """[1, n] -> [n, 1] via a lane-aligned transpose."""
  return jnp.transpose(jnp.broadcast_to(row, (_LANES, row.shape[-1])))[:, :1]


def _to_row(col):
  """[n, 1] -> [1, n]."""
  return jnp.transpose(jnp.broadcast_to(col, (col.shape[0], _LANES)))[:1, :]


def _logits(cfg, c, r, q, k, masked, want_vjp=False):
  """Masked logits ``[bq, bk]`` f32 (-inf where invisible) and the score_fn pullback."""
  s = _mm(q, k, _NT) * cfg.scale
  pull = None
  qp, kp = r.qpos[...], r.kvpos[...]
  if cfg.score_fn is not None:
    # A permuted tile only moved unit (batch/head) axes: a reshape restores the axis order.
    tiles = tuple(ref[...] if m.perm is None else ref[...].reshape(m.tile)
                  for ref, m in zip(r.params, cfg.pmeta))
    f = lambda x: cfg.score_fn(tiles, x, c.b, c.h, qp, kp).astype(_F32)
    if want_vjp:
      s, pull = jax.vjp(f, s)
    else:
      s = f(s)
  vis = None
  if masked and cfg.mask_fn is not None:
    vis = jnp.broadcast_to(cfg.mask_fn(qp, kp, c.h), s.shape)
  if masked and cfg.pad_keys:
    kidx = c.kj * cfg.bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    pad = kidx < cfg.kv_len
    vis = pad if vis is None else jnp.logical_and(vis, pad)
  if cfg.has_seg:
    seg = r.qseg[...] == r.kvseg[...]
    vis = seg if vis is None else jnp.logical_and(vis, seg)
  if vis is not None:
    s = jnp.where(vis, s, -jnp.inf)
  return s, pull


def _run_slots(cfg, c, step):
  """Run ``step(masked)`` for an active slot, with the mask evaluated only when needed."""
  active = c.s < c.cnt
  if cfg.mask_fn is None and not cfg.pad_keys:
    pl.when(active)(lambda: step(False))
    return
  need = c.full == 0
  if cfg.pad_keys:
    need = jnp.logical_or(need, (c.kj + 1) * cfg.bk > cfg.kv_len)
  pl.when(jnp.logical_and(active, need))(lambda: step(True))
  pl.when(jnp.logical_and(active, jnp.logical_not(need)))(lambda: step(False))


def _count(cfg, r, c):
  if cfg.debug_counts:
    @pl.when(c.s == 0)
    def _():
      r.cnt[...] = jnp.zeros(r.cnt.shape, jnp.int32)

    @pl.when(c.s < c.cnt)
    def _():
      r.cnt[...] += 1


def _program_ids():
  return tuple(pl.program_id(a) for a in range(5))


# ------------------------------------------------------------------------------------ forward
def _fwd_kernel(cfg, *args):
  r = _unpack(cfg, args, ("sinks",) if cfg.has_sinks else (), ("o", "lse"))
  m_scr, l_scr, acc_scr = r.scratch
  c = _ctx(cfg, _program_ids(), r.tables, dkv=False)
  _count(cfg, r, c)

  @pl.when(c.s == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, _F32)
    l_scr[...] = jnp.zeros(l_scr.shape, _F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

  def step(masked):
    v = r.v[...]
    s, _ = _logits(cfg, c, r, r.q[...], r.k[...], masked)
    m_prev, l_prev = m_scr[:, :1], l_scr[:, :1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # fully masked so far: keep p = 0
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m_prev - m_safe)
    l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + _mm(p.astype(v.dtype), v, _NN)
    m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

  _run_slots(cfg, c, step)

  @pl.when(c.s == c.K - 1)
  def _():
    m, l = m_scr[:, :1], l_scr[:, :1]
    seen = l > 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    if cfg.has_sinks:
      sink = r.sinks[c.h]
      # log(exp(lse) + exp(sink)) with no inf - inf: both -inf (an empty row and a -inf
      # sink, i.e. no sink for this head) stays -inf.
      mx = jnp.maximum(lse, sink)
      mx_safe = jnp.where(mx == -jnp.inf, 0.0, mx)
      tot = jnp.exp(lse - mx_safe) + jnp.exp(sink - mx_safe)
      lse = jnp.where(tot > 0, mx_safe + jnp.log(jnp.where(tot > 0, tot, 1.0)), -jnp.inf)
    o_scale = jnp.where(seen, jnp.exp(jnp.where(seen, m - lse, 0.0)), 0.0)
    r.o[...] = (acc_scr[...] * o_scale).astype(r.o.dtype)
    r.lse[...] = _to_row(lse)


def _sem(dkv):
  par, arb = pltpu.PARALLEL, pltpu.ARBITRARY
  return pltpu.CompilerParams(
      dimension_semantics=(par, par, par, arb, arb) if dkv else (par, par, par, par, arb))


class _Out(NamedTuple):
  """A kernel output ``[B, H (q or kv heads), ...]``: its block, index map (on ``bo, ho|hkvo,
  ro``), dtype, global shape and row axis (``row_unit`` elements per table row)."""
  block: tuple; fn: Callable; dtype: Any; shape: tuple; row_axis: int; row_unit: int  # noqa
  kv_heads: bool = False


def _call(cfg, kernel, dkv, extra, outs, scratch, tables, inputs):
  """Run ``kernel`` over the grid: one pallas_call, looped over :func:`.smem.plan`'s parts by
  :func:`.smem.run`; returns the outputs (whole)."""
  K = (cfg.dkv_geom if dkv else cfg.fwd_geom)[2]
  n_rows = cfg.nk if dkv else cfg.nq
  outs = list(outs)
  if cfg.debug_counts:
    outs.append(_Out((None, None, None, 1, _LANES), lambda c: (c.bo, c.ho, c.ro, 0, 0),
                     jnp.int32, (cfg.B, cfg.Hq, n_rows, 1, _LANES), 2, 1))
  plan = smem.plan(cfg.dkv_geom if dkv else cfg.fwd_geom, cfg.B, cfg.Hkv, cfg.G, n_rows,
                   cfg.smem_budget)
  pc = dataclasses.replace(cfg, part=plan)
  grid = (plan.nb, plan.nh, plan.nr, cfg.G, K) if dkv else (plan.nb, plan.nh, cfg.G, plan.nr, K)
  shapes = tuple(jax.ShapeDtypeStruct(plan.padded_shape(o.shape, o.row_axis, o.row_unit,
                                                        o.kv_heads), o.dtype) for o in outs)
  in_specs = _in_specs(pc, dkv, extra)
  def call(tabs, offsets, bufs):
    if cfg.interpret is None:   # compiled: lowering anywhere but on a TPU raises, clearly
      tabs = (platform_lib.require_platform(tabs[0], "tpu", "the TPU flash kernel"),) + tabs[1:]
    pre, bufs = tabs + ((offsets,) if bufs else ()), tuple(bufs or ())  # bufs: updated in place
    return pl.pallas_call(
        functools.partial(kernel, pc),
        out_shape=shapes,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(pre), grid=grid,
            in_specs=in_specs + [pl.BlockSpec(memory_space=pl.ANY)] * len(bufs),
            out_specs=[_spec(pc, dkv, o.block, o.fn) for o in outs], scratch_shapes=scratch),
        input_output_aliases={len(pre) + len(inputs) + i: i for i in range(len(bufs))},
        compiler_params=_sem(dkv),
        interpret=False if cfg.interpret is None else cfg.interpret,
        name="flash_bwd_dkv" if dkv else kernel.__name__.strip("_"),
    )(*pre, *inputs, *bufs)

  return smem.run(plan, tables, call,
                  [(o.shape, o.dtype, o.row_axis, o.row_unit, o.kv_heads) for o in outs])


def _row_spec(cfg):
  return ((None, None, 1, cfg.bq), lambda c: (c.b, c.h, 0, c.qi))


def _forward(cfg, arrays, q, k, v, sinks):
  fwd, _, side, params = arrays
  extra, inputs = [], [q, k, v, *side, *params]
  if cfg.has_sinks:
    extra.append((None, None))
    inputs.append(jnp.asarray(sinks, _F32))
  outs = [_Out((None, None, cfg.bq, cfg.Dv), lambda c: (c.bo, c.ho, c.ro, 0), q.dtype,
               (cfg.B, cfg.Hq, cfg.Tq, cfg.Dv), 2, cfg.bq),
          _Out((None, None, 1, cfg.bq), lambda c: (c.bo, c.ho, 0, c.ro), _F32,
               (cfg.B, cfg.Hq, 1, cfg.Tq), 3, cfg.bq)]
  scratch = [pltpu.VMEM((cfg.bq, _LANES), _F32), pltpu.VMEM((cfg.bq, _LANES), _F32),
             pltpu.VMEM((cfg.bq, cfg.Dv), _F32)]
  res = _call(cfg, _fwd_kernel, False, extra, outs, scratch, fwd, inputs)
  out, lse = res[0], res[1].reshape(cfg.B, cfg.Hq, cfg.Tq)
  return (out, lse) + ((res[2][..., 0, 0],) if cfg.debug_counts else ())


# ----------------------------------------------------------------------------------- backward
def _probs_and_ds(cfg, c, r, q, k, v, do, masked):
  """Recompute P from lse and dS (w.r.t. the pre-score_fn logits); both [bq, bk] f32."""
  s, pull = _logits(cfg, c, r, q, k, masked, want_vjp=True)
  lse = _to_col(r.lse[...])
  p = jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse))  # rows with no key: s = -inf -> p = 0
  dp = _mm(do, v, _NT)
  ds = p * (dp - _to_col(r.delta[...]))
  if pull is not None:
    ds = pull(ds)[0]
  return p, ds


def _dq_kernel(cfg, *args):
  r = _unpack(cfg, args, ("do", "lse", "delta"), ("dq",))
  (acc,) = r.scratch
  c = _ctx(cfg, _program_ids(), r.tables, dkv=False)
  _count(cfg, r, c)

  @pl.when(c.s == 0)
  def _():
    acc[...] = jnp.zeros(acc.shape, _F32)

  def step(masked):
    k = r.k[...]
    _, ds = _probs_and_ds(cfg, c, r, r.q[...], k, r.v[...], r.do[...], masked)
    acc[...] += cfg.scale * _mm(ds.astype(k.dtype), k, _NN)

  _run_slots(cfg, c, step)

  @pl.when(c.s == c.K - 1)
  def _():
    r.dq[...] = acc[...].astype(r.dq.dtype)


def _dkv_kernel(cfg, *args):
  r = _unpack(cfg, args, ("do", "lse", "delta"), ("dk", "dv"))
  dk_acc, dv_acc = r.scratch
  c = _ctx(cfg, _program_ids(), r.tables, dkv=True)
  _count(cfg, r, c)

  @pl.when(jnp.logical_and(c.g == 0, c.s == 0))
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, _F32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, _F32)

  def step(masked):
    q, do = r.q[...], r.do[...]
    p, ds = _probs_and_ds(cfg, c, r, q, r.k[...], r.v[...], do, masked)
    dv_acc[...] += _mm(p.T.astype(do.dtype), do, _NN)
    dk_acc[...] += cfg.scale * _mm(ds.T.astype(q.dtype), q, _NN)

  _run_slots(cfg, c, step)

  @pl.when(jnp.logical_and(c.g == cfg.G - 1, c.s == c.K - 1))
  def _():
    r.dk[...] = dk_acc[...].astype(r.dk.dtype)
    r.dv[...] = dv_acc[...].astype(r.dv.dtype)


def _backward(cfg, arrays, q, k, v, lse, do, delta):
  fwd, dkv, side, params = arrays
  rows = (lse.astype(_F32).reshape(cfg.B, cfg.Hq, 1, cfg.Tq),
          delta.astype(_F32).reshape(cfg.B, cfg.Hq, 1, cfg.Tq))
  inputs = [q, k, v, *side, *params, do.astype(q.dtype), *rows]
  extra = [((None, None, cfg.bq, cfg.Dv), lambda c: (c.b, c.h, c.qi, 0)), _row_spec(cfg),
           _row_spec(cfg)]

  res_q = _call(cfg, _dq_kernel, False, extra,
                [_Out((None, None, cfg.bq, cfg.D), lambda c: (c.bo, c.ho, c.ro, 0), q.dtype,
                      q.shape, 2, cfg.bq)],
                [pltpu.VMEM((cfg.bq, cfg.D), _F32)], fwd, inputs)
  kv_out = lambda d, x: _Out((None, None, cfg.bk, d), lambda c: (c.bo, c.hkvo, c.ro, 0),
                             x.dtype, x.shape, 2, cfg.bk, kv_heads=True)
  res_kv = _call(cfg, _dkv_kernel, True, extra, [kv_out(cfg.D, k), kv_out(cfg.Dv, v)],
                 [pltpu.VMEM((cfg.bk, cfg.D), _F32), pltpu.VMEM((cfg.bk, cfg.Dv), _F32)],
                 dkv, inputs)
  grads = (res_q[0], res_kv[0], res_kv[1])
  if cfg.debug_counts:
    return grads + (res_q[1][..., 0, 0], res_kv[2][..., 0, 0])
  return grads


# -------------------------------------------------------------------------------- public API
def flash_attention_fwd(q, k, v, *, fwd_tables, dkv_tables, q_pos, kv_pos, kv_len, scale,
                        mask_fn=None, score_fn=None, score_params=(), score_param_specs=(),
                        q_segment_ids=None, kv_segment_ids=None, sinks=None, block_q=128,
                        block_kv=128, interpret=None):
  """Forward kernel only: ``(out [B, Hq, Tq, Dv] in q.dtype, lse [B, Hq, Tq] f32)``.
  Arguments as :func:`flash_attention`; not differentiable."""
  cfg, arrays = _prepare(**locals())
  return _forward(cfg, arrays, q, k, v, sinks)


def flash_attention_bwd(q, k, v, out, lse, do, delta=None, *, fwd_tables, dkv_tables, q_pos,
                        kv_pos, kv_len, scale, mask_fn=None, score_fn=None, score_params=(),
                        score_param_specs=(), q_segment_ids=None, kv_segment_ids=None,
                        sinks=None, block_q=128, block_kv=128, interpret=None):
  """Backward kernels: ``(dq, dk, dv)`` in the dtypes of q, k, v.

  ``lse`` is the forward's (sinks included), ``do`` the output cotangent and ``delta [B, Hq,
  Tq]`` = ``sum(do * out, -1) - dlse`` (computed from ``out`` with ``dlse = 0`` when None).
  ``sinks`` only matters through ``lse``; its gradient is
  ``-sum_{b,i} exp(sinks_h - lse_bhi) * delta_bhi`` (see :func:`flash_attention`).
  """
  kw = dict(locals())
  for name in ("q", "k", "v", "out", "lse", "do", "delta"):
    kw.pop(name)
  cfg, arrays = _prepare(q, k, v, **kw)
  if do.shape != (cfg.B, cfg.Hq, cfg.Tq, cfg.Dv) or lse.shape != (cfg.B, cfg.Hq, cfg.Tq):
    raise ValueError(f"do must be {(cfg.B, cfg.Hq, cfg.Tq, cfg.Dv)} and lse "
                     f"{(cfg.B, cfg.Hq, cfg.Tq)}, got {do.shape} and {lse.shape}")
  if delta is None:
    delta = jnp.sum(do.astype(_F32) * out.astype(_F32), axis=-1)
  return _backward(cfg, arrays, q, k, v, lse, do, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, sinks, arrays):
  return _forward(cfg, arrays, q, k, v, sinks)


def _attention_fwd(cfg, q, k, v, sinks, arrays):
  out, lse = _forward(cfg, arrays, q, k, v, sinks)
  return (out, lse), (q, k, v, sinks, arrays, out, lse)


def _attention_bwd(cfg, res, cts):
  q, k, v, sinks, arrays, out, lse = res
  do, dlse = cts
  delta = jnp.sum(do.astype(_F32) * out.astype(_F32), axis=-1) - dlse.astype(_F32)
  dq, dk, dv = _backward(cfg, arrays, q, k, v, lse, do, delta)
  dsinks = None
  if sinks is not None:
    # lse >= sink where lse is finite; a row with lse = -inf (no key and a -inf sink) has
    # p_sink = 0 (exp(-inf - inf)), not exp(-inf + inf) = NaN.
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    p_sink = jnp.exp(jnp.asarray(sinks, _F32)[None, :, None] - lse_safe)
    dsinks = (-jnp.sum(p_sink * delta, axis=(0, 2))).astype(jnp.asarray(sinks).dtype)
  return dq, dk, dv, dsinks, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, *, fwd_tables, dkv_tables, q_pos, kv_pos, kv_len, scale,
                    mask_fn=None, score_fn=None, score_params=(), score_param_specs=(),
                    q_segment_ids=None, kv_segment_ids=None, sinks=None, block_q=128,
                    block_kv=128, interpret=None):
  """Block-sparse flash attention (FlashAttention-2, Dao 2023) on TPU; see the module docstring
  for the exact semantics.

  Args:
    q, k, v: ``[B, Hq, Tq, D]``, ``[B, Hkv, Tk, D]``, ``[B, Hkv, Tk, Dv]`` (same dtype, float32
      or bfloat16, else ValueError; ``Hq % Hkv == 0``; block sizes must divide ``Tq`` / ``Tk``).
    fwd_tables, dkv_tables: :class:`~.common.BlockTables` at ``(block_q, block_kv)``: rows = query
      blocks (forward, dQ) and key blocks (dK/dV). numpy (static) or jnp (runtime) arrays.
    q_pos, kv_pos: int32 ``[Bp, Tq]`` / ``[Bp, Tk]``, ``Bp`` in ``{1, B}``: positions given to
      ``mask_fn`` (as ``[bq, 1]`` / ``[1, bk]``) and ``score_fn``.
    kv_len: static int; keys ``>= kv_len`` are padding.
    scale: Python float multiplying ``q . k``.
    mask_fn: ``(q_pos [bq,1], kv_pos [1,bk], head) -> bool [bq, bk]`` or None.
    score_fn: ``(tiles, s [bq,bk] f32, batch, head, q_pos, kv_pos) -> s'`` or None.
    score_params, score_param_specs: arrays and their :class:`~.common.ParamSpec`; not
      differentiated here (``stop_gradient``): the caller computes their gradients.
    q_segment_ids, kv_segment_ids: int32 ``[B, Tq]`` / ``[B, Tk]`` or None.
    sinks: ``[Hq]`` sink logits or None (differentiable); ``-inf`` switches a head's sink off
      (a row that then sees nothing gets ``lse = -inf``, output 0 and zero gradients).
    block_q, block_kv: multiples of 128 compiled, of 8 interpreted (ints or numpy ints).
    interpret: None (interpret unless on TPU), True/False, or a ``pltpu.InterpretParams``.

  Returns:
    ``(out [B, Hq, Tq, Dv] in q.dtype, lse [B, Hq, Tq] float32)``; differentiable w.r.t.
    ``q, k, v, sinks`` (the LSE cotangent is honoured).
  """
  kw = dict(locals())
  kw["score_params"] = tuple(lax.stop_gradient(jnp.asarray(p)) for p in score_params)
  cfg, arrays = _prepare(**kw)
  return _attention(cfg, q, k, v, sinks, arrays)


def _visit_counts(q, k, v, **kw):
  """Testing aid: how many (row, slot) bodies each kernel executed.

  Returns ``(fwd [B, Hq, nq], dq [B, Hq, nq], dkv [B, Hq, nk])`` int32 counts."""
  cfg, arrays = _prepare(q, k, v, debug_counts=True, **kw)
  out, lse, c_fwd = _forward(cfg, arrays, q, k, v, kw.get("sinks"))
  do = jnp.ones_like(out)
  *_, c_dq, c_dkv = _backward(cfg, arrays, q, k, v, lse, do, jnp.zeros_like(lse))
  return c_fwd, c_dq, c_dkv
