"""Split-K decode kernel for TPU (Pallas Mosaic), Flash-Decoding (Dao et al. 2023) style.

Grid ``(B, num_splits, bps)``: one program per (example, split); its last axis walks the
split's block list (``common.block_tables``), which arrives by scalar prefetch (SMEM) together
with the per-token visibility bounds. A step past the split's count does nothing
(``pl.when``) and its K/V index_map returns the previous block again, so the pipeline issues no
DMA for it: work and HBM traffic are proportional to the live blocks.

Layout. The cache stays in the ``[B, S, Hkv, D]`` layout of ``KVCache`` (no transpose, which would
copy the whole cache every step): it is viewed (a free reshape) as ``[B, S * Hkv, D]`` and one
block holds ``block_kv`` slots of all kv heads; kv head ``h`` is the sublane-strided slice
``rows h, h + Hkv, ...`` (``pl.ds(h, block_kv, stride=Hkv)``). Every K/V byte is DMA'd once and
the ``G`` query heads and ``Tq`` tokens of a kv head are the rows of one ``[Rp, D]`` matmul tile
(GQA without repeating K/V). All kv heads of an example share a program, so the VMEM block is
``block_kv * Hkv * (D + Dv)`` elements (``common.default_block_kv`` keeps it under 2 MiB).

Outputs (float32, resident in VMEM across the block axis and initialized at the first step of
every program, live or not, so ``InterpretParams(uninitialized_memory="nan")`` catches an
unwritten entry): the unnormalized accumulator ``[B, ns, Hkv, Rp, Dv]`` and the running max /
sum ``[B, ns, Hkv, Rp, 128]`` (replicated over the 128 lanes, as Mosaic tiles are (8, 128)).

Hardware constraints (checked unless interpreting): ``block_kv`` a multiple of 128 (8 in
interpret mode); float32, or bfloat16 with ``Hkv`` 1 or even (strided loads of packed 16-bit
rows go through a uint32 view, see :func:`_load_head`); float16 is rejected. The block tables
live in SMEM (``B * S / block_kv`` int32 words). Lowering to Mosaic is checked on CPU by the
tests; the kernel has not been compiled or run on a real TPU in this repository.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import platform as platform_lib
from pallas_kernels.decode import common

LANES = 128


def _packed(dtype, hkv: int) -> bool:
  """bfloat16 with an even number (>= 2) of kv heads: strided loads go through a uint32 view."""
  return jnp.dtype(dtype) == jnp.bfloat16 and hkv >= 2 and hkv % 2 == 0


def _load_head(ref, words_ref, h: int, hkv: int, bk: int):
  """Rows ``h, h + hkv, ...`` of a ``[bk * hkv, D]`` VMEM block: kv head ``h``.

  32-bit types: one sublane-strided load. bfloat16 (even ``hkv``): Mosaic packs rows ``2i``
  (low half) and ``2i + 1`` (high half) into one 32-bit word and strided loads want 32-bit
  types, so the block was copied once (per grid step) as uint32 words into ``words_ref``; the
  head's rows are a strided load from it and its half is moved into the high bits of a float32,
  whose value is then exactly the bfloat16 value."""
  if hkv == 1:
    return ref[...]
  if words_ref is not None:
    words = words_ref[pl.ds(h // 2, bk, stride=hkv // 2), :]
    bits = words << 16 if h % 2 == 0 else words & jnp.uint32(0xFFFF0000)
    return pltpu.bitcast(bits, jnp.float32).astype(jnp.bfloat16)
  return ref[pl.ds(h, bk, stride=hkv), :]


def _kernel(lo_ref, hi_ref, blocks_ref, counts_ref,   # scalar prefetch (SMEM)
            q_ref, k_ref, v_ref, *rest, hkv, g, tq, rp, bk, bps, ns, scale, softcap,
            has_kv_pos, count_blocks):
  if has_kv_pos:
    kvpos_ref, *rest = rest
  o_ref, m_ref, l_ref, *rest = rest
  if _packed(k_ref.dtype, hkv):
    *rest, kw_ref, vw_ref = rest
  else:
    kw_ref = vw_ref = None
  b, split, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, m_ref.dtype)
    l_ref[...] = jnp.zeros(l_ref.shape, l_ref.dtype)
    if count_blocks:
      rest[0][...] = jnp.zeros(rest[0].shape, rest[0].dtype)

  @pl.when(i < counts_ref[b * ns + split])
  def _step():
    blk = blocks_ref[(b * ns + split) * bps + i]
    if has_kv_pos:
      kv = jnp.broadcast_to(kvpos_ref[...], (rp, bk))
    else:
      kv = blk * bk + jax.lax.broadcasted_iota(jnp.int32, (rp, bk), 1)
    # Per-row bounds from the per-token scalars: row r belongs to token r // g.
    row = jax.lax.broadcasted_iota(jnp.int32, (rp, bk), 0)
    lo = jnp.zeros((rp, bk), jnp.int32)
    hi = jnp.full((rp, bk), -1, jnp.int32)   # padded rows see nothing
    for t in range(tq):
      in_t = (row >= t * g) & (row < (t + 1) * g)
      lo = jnp.where(in_t, lo_ref[b * tq + t], lo)
      hi = jnp.where(in_t, hi_ref[b * tq + t], hi)
    visible = (kv >= lo) & (kv <= hi)
    prec = common.matmul_precision(q_ref.dtype)
    if kw_ref is not None:
      kw_ref[...] = pltpu.bitcast(k_ref[...], jnp.uint32)
      vw_ref[...] = pltpu.bitcast(v_ref[...], jnp.uint32)
    for h in range(hkv):
      q = q_ref[h]                                                   # [rp, D]
      k = _load_head(k_ref, kw_ref, h, hkv, bk)                      # [bk, D]
      v = _load_head(v_ref, vw_ref, h, hkv, bk)                      # [bk, Dv]
      s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32, precision=prec) * scale
      if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
      s = jnp.where(visible, s, -jnp.inf)
      m_prev = m_ref[h]                                              # [rp, LANES]
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)           # no NaN from -inf - -inf
      alpha = jnp.exp(m_prev - m_safe)                               # 0 when m_prev = -inf
      p = jnp.exp(s - m_safe[:, :1])                                 # exactly 0 where masked
      l_ref[h] = alpha * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
      m_ref[h] = m_next
      pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32, precision=prec)
      o_ref[h] = alpha[:, :1] * o_ref[h] + pv
    if count_blocks:
      rest[0][...] += 1


def decode_partials(prep: common.Prepared, *, interpret, count_blocks: bool = False):
  """Run the kernel. Returns ``(acc [B, ns, Hkv, Rp, Dv], m, l [B, ns, Hkv, Rp])`` in float32,
  plus, with ``count_blocks`` (a test hook), the number of blocks each (example, split) computed
  ``int32 [B, ns, 1]``. ``interpret``: bool or a ``pltpu.InterpretParams``."""
  B, Hkv, rp, D = prep.q.shape
  S, Dv = prep.k.shape[1], prep.dv
  bk, ns = prep.block_kv, prep.num_splits
  bps = prep.blocks.shape[-1]
  g = prep.hq // Hkv
  k2 = prep.k.reshape(B, S * Hkv, D)      # free: contiguous
  v2 = prep.v.reshape(B, S * Hkv, Dv)
  # Per-token bounds (rows of a token share them): [B * Tq] scalars.
  lo = prep.row_lo[:, : prep.tq * g : g].reshape(-1)
  hi = prep.row_hi[:, : prep.tq * g : g].reshape(-1)
  blocks = prep.blocks.reshape(-1)
  if interpret is False or interpret is None:   # compiled: lowering off TPU raises, clearly
    blocks = platform_lib.require_platform(blocks, "tpu", "the TPU decode kernel")
  counts = prep.counts.reshape(-1)

  def kv_map(b, s, i, lo, hi, blocks, counts):
    return (b, blocks[(b * ns + s) * bps + i], 0)

  in_specs = [pl.BlockSpec((None, Hkv, rp, D), lambda b, s, i, *_: (b, 0, 0, 0)),
              pl.BlockSpec((None, bk * Hkv, D), kv_map),
              pl.BlockSpec((None, bk * Hkv, Dv), kv_map)]
  args = [prep.q, k2, v2]
  if prep.kv_pos is not None:
    in_specs.append(pl.BlockSpec((None, 1, bk),
                                 lambda b, s, i, *t: (b, 0, kv_map(b, s, i, *t)[1])))
    args.append(prep.kv_pos.reshape(B, 1, S))
  acc_shape = jax.ShapeDtypeStruct((B, ns, Hkv, rp, Dv), jnp.float32)
  ml_shape = jax.ShapeDtypeStruct((B, ns, Hkv, rp, LANES), jnp.float32)
  out_shape = [acc_shape, ml_shape, ml_shape]
  out_specs = [pl.BlockSpec((None, None, Hkv, rp, Dv), lambda b, s, i, *_: (b, s, 0, 0, 0)),
               pl.BlockSpec((None, None, Hkv, rp, LANES), lambda b, s, i, *_: (b, s, 0, 0, 0)),
               pl.BlockSpec((None, None, Hkv, rp, LANES), lambda b, s, i, *_: (b, s, 0, 0, 0))]
  if count_blocks:
    out_shape.append(jax.ShapeDtypeStruct((B, ns, 1, LANES), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, 1, LANES), lambda b, s, i, *_: (b, s, 0, 0)))
  kernel = functools.partial(
      _kernel, hkv=Hkv, g=g, tq=prep.tq, rp=rp, bk=bk, bps=bps, ns=ns, scale=prep.scale,
      softcap=prep.softcap, has_kv_pos=prep.kv_pos is not None, count_blocks=count_blocks)
  scratch = []
  if _packed(prep.k.dtype, Hkv):
    scratch = [pltpu.VMEM((bk * Hkv // 2, D), jnp.uint32),
               pltpu.VMEM((bk * Hkv // 2, Dv), jnp.uint32)]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(B, ns, bps), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=scratch)
  itemsize = prep.k.dtype.itemsize
  cost = pl.CostEstimate(
      flops=2 * B * Hkv * rp * S * (D + Dv), transcendentals=B * Hkv * rp * S,
      bytes_accessed=B * S * Hkv * (D + Dv) * itemsize)
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=interpret,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost, name="decode_split_k_tpu",
  )(lo, hi, blocks, counts, *args)
  acc, m, l = outs[0], outs[1][..., 0], outs[2][..., 0]
  if count_blocks:
    return acc, m, l, outs[3][:, :, :, 0]
  return acc, m, l
