"""Split-K decode kernel for GPU (Pallas, Triton lowering), Flash-Decoding (Dao et al. 2023).

Grid ``(B, Hkv, num_splits)``: one program per (example, kv head, split), as in Flash-Decoding's
first kernel. The program loads its packed query tile ``[Rp, D]`` (the ``G`` query heads of the kv
head times the ``Tq`` tokens; GQA without repeating K/V) once, then loops
``for i in range(counts[b, split])`` over the split's live blocks (``common.block_tables``): the
loop bound, not a mask, skips blocks beyond ``lengths[b]`` (and outside the window), so their K/V
are never loaded. K/V are read in place from the ``[B, S, Hkv, D]`` cache (rows of one kv head
are ``Hkv * D`` elements apart; no transpose or repeat). Each program writes float32 partials:
unnormalized accumulator ``[Rp, Dv]``, running max and running sum ``[Rp]``; ``common.combine``
merges the splits.

float32 inputs use full-precision (not TF32) matmuls.

Hardware constraints (checked unless interpreting): ``block_kv`` a power of two >= 16. ``D`` and
``Dv`` are zero-padded to powers of two >= 16 on a GPU (``common.prepare``) and rows to a power
of two >= 16 (``tl.dot`` needs M >= 16). Lowering to Triton IR is checked on CPU by the tests;
the kernel's tests also ran compiled on an H100 (BENCHMARKS.md, "Pallas kernels on hardware").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import platform as platform_lib
from pallas_kernels.decode import common


def _kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, blocks_ref, counts_ref, *rest, bk, scale,
            softcap, has_kv_pos, count_blocks):
  if has_kv_pos:
    kvpos_ref, *rest = rest
  o_ref, m_ref, l_ref, *rest = rest
  rp, dv = o_ref.shape
  q = q_ref[...]
  prec = common.matmul_precision(q.dtype)
  lo = lo_ref[...][:, None]
  hi = hi_ref[...][:, None]
  n = counts_ref[0]

  def body(i, carry):
    acc, m_prev, l_prev, executed = carry
    start = pl.multiple_of(blocks_ref[i] * bk, bk)
    k = k_ref[pl.ds(start, bk), :]                                   # [bk, D]
    v = v_ref[pl.ds(start, bk), :]                                   # [bk, Dv]
    if has_kv_pos:
      kv = kvpos_ref[pl.ds(start, bk)][None, :]
    else:
      kv = start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32, precision=prec) * scale
    if softcap is not None:
      s = softcap * jnp.tanh(s / softcap)
    s = jnp.where((kv >= lo) & (kv <= hi), s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)             # no NaN from -inf - -inf
    alpha = jnp.exp(m_prev - m_safe)                                 # 0 when m_prev = -inf
    p = jnp.exp(s - m_safe[:, None])                                 # exactly 0 where masked
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32, precision=prec)
    return (alpha[:, None] * acc + pv, m_next, alpha * l_prev + jnp.sum(p, axis=1),
            executed + 1)

  init = (jnp.zeros((rp, dv), jnp.float32), jnp.full((rp,), -jnp.inf, jnp.float32),
          jnp.zeros((rp,), jnp.float32), jnp.int32(0))
  acc, m, l, executed = jax.lax.fori_loop(0, n, body, init)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l
  if count_blocks:
    rest[0][...] = jnp.full(rest[0].shape, executed, jnp.int32)


def decode_partials(prep: common.Prepared, *, interpret, count_blocks: bool = False,
                    num_warps: int = 4, num_stages: int = 2):
  """Run the kernel. Returns ``(acc [B, ns, Hkv, Rp, Dv], m, l [B, ns, Hkv, Rp])`` in float32,
  plus, with ``count_blocks`` (a test hook), the number of blocks each (example, split, kv head)
  computed ``int32 [B, ns, Hkv]``."""
  B, Hkv, rp, D = prep.q.shape
  S, Dv = prep.k.shape[1], prep.v.shape[-1]  # Dv padded on GPU (see common.prepare)
  bk, ns = prep.block_kv, prep.num_splits
  bps = prep.blocks.shape[-1]
  bps_p = 1 << (bps - 1).bit_length()   # Triton block shapes are powers of two
  blocks = jnp.pad(prep.blocks, ((0, 0), (0, 0), (0, bps_p - bps)))
  counts = prep.counts[..., None]
  if not interpret:   # compiled: lowering anywhere but on a GPU raises, clearly
    blocks = platform_lib.require_platform(blocks, "gpu", "the GPU decode kernel")
  in_specs = [
      pl.BlockSpec((None, None, rp, D), lambda b, h, s: (b, h, 0, 0)),
      pl.BlockSpec((None, S, None, D), lambda b, h, s: (b, 0, h, 0)),
      pl.BlockSpec((None, S, None, Dv), lambda b, h, s: (b, 0, h, 0)),
      pl.BlockSpec((None, rp), lambda b, h, s: (b, 0)),
      pl.BlockSpec((None, rp), lambda b, h, s: (b, 0)),
      pl.BlockSpec((None, None, bps_p), lambda b, h, s: (b, s, 0)),
      pl.BlockSpec((None, None, 1), lambda b, h, s: (b, s, 0)),
  ]
  args = [prep.q, prep.k, prep.v, prep.row_lo, prep.row_hi, blocks, counts]
  if prep.kv_pos is not None:
    in_specs.append(pl.BlockSpec((None, S), lambda b, h, s: (b, 0)))
    args.append(prep.kv_pos)
  out_shape = [jax.ShapeDtypeStruct((B, ns, Hkv, rp, Dv), jnp.float32),
               jax.ShapeDtypeStruct((B, ns, Hkv, rp), jnp.float32),
               jax.ShapeDtypeStruct((B, ns, Hkv, rp), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, None, rp, Dv), lambda b, h, s: (b, s, h, 0, 0)),
               pl.BlockSpec((None, None, None, rp), lambda b, h, s: (b, s, h, 0)),
               pl.BlockSpec((None, None, None, rp), lambda b, h, s: (b, s, h, 0))]
  if count_blocks:
    out_shape.append(jax.ShapeDtypeStruct((B, ns, Hkv, 16), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, 16), lambda b, h, s: (b, s, h, 0)))
  kernel = functools.partial(_kernel, bk=bk, scale=prep.scale, softcap=prep.softcap,
                             has_kv_pos=prep.kv_pos is not None, count_blocks=count_blocks)
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(B, Hkv, ns), in_specs=in_specs, out_specs=out_specs,
      interpret=interpret, name="decode_split_k_gpu",
      compiler_params=_gpu_params(num_warps, num_stages),
  )(*args)
  if count_blocks:
    return outs[0], outs[1], outs[2], outs[3][..., 0]
  return tuple(outs)


def _gpu_params(num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
