"""Shared semantics of the split-K decode kernels: validation, query packing, block tables and
the combine step (Flash-Decoding: Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for
long-context inference").

Problem. ``q [B, Tq, Hq, D]`` (a few new tokens) attends to a KV cache ``k [B, S, Hkv, D]``,
``v [B, S, Hkv, Dv]`` in the layout of ``attnjax.layers.common.KVCache``. Query ``t`` of example
``b`` sits at position ``qp = q_positions[b, t]`` (default ``lengths[b] - Tq + t``); cache slot
``s`` holds position ``kp = kv_positions[b, s]`` (default ``s``; ``-1`` = empty slot). Key ``s``
is visible to query ``t`` iff ``0 <= kp < lengths[b]`` and ``kp <= qp`` and, when
``window_left`` is given, ``kp >= qp - window_left``. Logits are ``scale * q.k`` (default
``1/sqrt(D)``), then ``softcap * tanh(logit / softcap)`` when ``softcap`` is given, then masked.
``sinks [Hq]`` (gpt-oss) add ``exp(sink[h])`` to the softmax denominator and nothing to the
numerator. The log-sum-exp is ``log(sum_visible exp(logit) + exp(sink))`` (natural log, float32,
``[B, Tq, Hq]``); a query whose denominator is empty (nothing visible and no sink) returns 0 and
LSE ``-inf`` (with a sink it returns 0 and LSE = the sink logit, as attnjax's reference does).

Visibility in row-bound form. Every condition is an interval on ``kp``, so the kernels receive
per-query bounds ``lo = max(0, qp - window_left)`` and ``hi = min(qp, lengths[b] - 1)`` and test
``lo <= kp <= hi`` (empty slots, ``kp = -1``, always fail ``lo >= 0``).

Packing (GQA without repeats). The ``G = Hq / Hkv`` query heads that share a kv head and the
``Tq`` tokens become the rows of one tile: row ``r = t * G + g`` of kv head ``h`` is query
``(t, h * G + g)``; rows are padded to ``Rp`` (a multiple of 8 on TPU, a power of two >= 16 on
GPU) with bounds that see nothing. K/V are read once per kv head.

Split-K. The cache is cut into ``nb = S / block_kv`` blocks. A block is *live* for example ``b``
if some slot in it may be visible to some query of ``b`` (computed at run time from the lengths,
positions and window: O(B * S) integer work, no K/V traffic). The live blocks of ``b`` are split
evenly, in order, into ``num_splits`` contiguous runs: split ``k`` visits ``counts[b, k]`` blocks
listed in ``blocks[b, k, :]`` (entries past the count repeat the last visited block, so a pipelined
TPU kernel issues no DMA for them). Dead blocks (e.g. beyond ``lengths[b]``) are never read. This
follows Flash-Decoding's "split the keys/values, not the queries" and balances ragged batches:
a short sequence still spreads its few blocks over all splits. Each (example, kv head, split)
emits an unnormalized partial ``acc = sum_s exp(logit_s - m) v_s``, its running max ``m`` and sum
``l = sum_s exp(logit_s - m)`` in float32; :func:`combine` (plain jnp, outside the kernels)
merges the splits with the log-sum-exp rule and adds the sinks.

Forward only: decoding needs no gradient, so no VJP is defined (differentiating raises).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import platform as platform_lib

PLATFORMS = ("tpu", "gpu")


class CachePaddingWarning(UserWarning):
  """``decode_attention`` had to pad (copy) the KV cache on this call: its length is not a
  multiple of the block size, or (compiled GPU) its head dims are not powers of two >= 16."""


class Prepared(NamedTuple):
  """Validated, packed inputs of one call. Arrays first, then static ints/floats. ``Dk``/``Dvk``
  are the head dims the kernels see: ``d``/``dv`` zero-padded on a compiled GPU."""
  q: jax.Array            # [B, Hkv, Rp, Dk] packed queries
  k: jax.Array            # [B, S, Hkv, Dk]  (S padded to a multiple of block_kv)
  v: jax.Array            # [B, S, Hkv, Dvk]
  kv_pos: jax.Array | None  # [B, S] int32, None = default (slot index)
  row_lo: jax.Array       # [B, Rp] int32 lowest visible key position per row
  row_hi: jax.Array       # [B, Rp] int32 highest visible key position per row
  blocks: jax.Array       # [B, ns, bps] int32 block indices to visit
  counts: jax.Array       # [B, ns] int32 number of valid entries of blocks
  batch: int
  tq: int
  hq: int
  hkv: int
  d: int
  dv: int
  rp: int
  block_kv: int
  num_splits: int
  scale: float
  softcap: float | None


def matmul_precision(dtype):
  """float32 inputs: full-precision matmuls (not one bfloat16 / TF32 pass); else default."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def resolve_platform(platform) -> str:
  if platform is None:
    return "tpu" if jax.default_backend() == "tpu" else "gpu"
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r} is not supported; allowed values: None, 'tpu', 'gpu'")
  return platform


def resolve_interpret(platform: str, interpret) -> bool:
  """``None`` -> interpret unless running on the matching hardware. ``True`` on TPU means the
  TPU interpreter (``decode_partials`` turns it into ``pltpu.InterpretParams()``)."""
  if interpret is None:
    return jax.default_backend() != platform
  if isinstance(interpret, (bool, np.bool_)):
    return bool(interpret)
  if platform == "tpu" and type(interpret).__name__ == "InterpretParams":
    return interpret
  raise ValueError(f"interpret={interpret!r} is not supported on {platform}; allowed values: "
                   "None, True, False" + (", a pltpu.InterpretParams" if platform == "tpu" else ""))


def _is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def check_block_kv(block_kv, platform: str, interpret: bool):
  """TPU: multiple of 128 (8 in interpret mode); GPU: power of two >= 16."""
  if isinstance(block_kv, bool) or not isinstance(block_kv, (int, np.integer)):
    raise ValueError(f"block_kv must be an int, got {block_kv!r}")
  note = platform_lib.host_note(platform, not interpret)
  if platform == "tpu":
    step = 8 if interpret else 128
    if block_kv < step or block_kv % step:
      raise ValueError(f"block_kv={block_kv} is not allowed on tpu"
                       f"{' (interpret)' if interpret else ''}: it must be a positive multiple "
                       f"of {step}{note}")
  elif not (_is_pow2(block_kv) and block_kv >= 16):
    raise ValueError(f"block_kv={block_kv} is not allowed on gpu: it must be a power of two "
                     f">= 16{note}")
  return int(block_kv)


def default_block_kv(s: int, hkv: int, row_bytes: int, platform: str, interpret: bool) -> int:
  """Largest candidate dividing ``S``; if none does, ``S`` is padded to a multiple of the block
  (a copy of the cache on every call): the largest candidate that pads at most ``S / 8`` slots
  (large blocks keep the grid short: GPU ``S = 1000`` -> 128, 1024 slots), else the one that
  pads least, the largest among equals (GPU ``S = 37``: 16 -> 48 slots, not 32 -> 64). Padded
  slots hold no position, so the blocks made only of them are never visited.

  TPU candidates 512..128 (8.. in interpret mode), capped so one K+V block of all kv heads stays
  under 2 MiB of VMEM (it is double-buffered); GPU candidates 128..16."""
  if platform == "tpu":
    cands = [512, 256, 128] + ([64, 32, 16, 8] if interpret else [])
    fit = [c for c in cands if c * hkv * row_bytes <= 2 * 2**20] or [cands[-1 if interpret else 2]]
  else:
    fit = [128, 64, 32, 16]
  for c in fit:
    if s % c == 0:
      return c
  pad = lambda c: -(-s // c) * c - s   # noqa: E731
  small = [c for c in fit if 8 * pad(c) <= s]
  if small:
    return max(small)
  return min(fit, key=lambda c: (pad(c), -c))


def default_num_splits(num_blocks: int, batch: int, hkv: int, platform: str) -> int:
  """GPU: enough (example, kv head, split) programs to fill ~128 SMs; TPU (whose grid runs
  sequentially per core; all kv heads share a program): 2 splits when the batch alone cannot
  feed both cores of a megacore chip, else 1. Never more than the number of blocks."""
  if platform == "gpu":
    want = -(-128 // max(1, batch * hkv))
  else:
    want = 2 if batch < 2 else 1
  return int(max(1, min(num_blocks, want)))


def block_tables(lengths, q_lo, q_hi, kv_pos, num_blocks: int, block_kv: int, num_splits: int):
  """Block lists of the split-K grid (see the module docstring).

  ``q_lo``/``q_hi`` ``[B]``: the lowest/highest key position any query of the example may see.
  Returns ``blocks int32 [B, ns, bps]`` and ``counts int32 [B, ns]`` with
  ``bps = ceil(num_blocks / ns)``."""
  del lengths  # folded into q_hi
  nb, bk, ns = num_blocks, block_kv, num_splits
  if kv_pos is None:  # slot j*bk + i holds position j*bk + i: interval test per block
    start = jnp.arange(nb, dtype=jnp.int32)[None] * bk
    live = (start <= q_hi[:, None]) & (start + bk - 1 >= q_lo[:, None])
  else:
    p = kv_pos.reshape(kv_pos.shape[0], nb, bk)
    live = jnp.any((p >= q_lo[:, None, None]) & (p <= q_hi[:, None, None]), axis=-1)
  live = live & (q_lo <= q_hi)[:, None]
  order = jnp.argsort(~live, axis=-1, stable=True).astype(jnp.int32)  # live blocks first
  n = jnp.sum(live, axis=-1, dtype=jnp.int32)                         # [B]
  per = (n + ns - 1) // ns
  ks = jnp.arange(ns, dtype=jnp.int32)[None]
  counts = jnp.clip(n[:, None] - ks * per[:, None], 0, per[:, None])  # [B, ns]
  bps = -(-nb // ns)
  i = jnp.arange(bps, dtype=jnp.int32)[None, None]
  idx = ks[..., None] * per[:, None, None] + jnp.minimum(i, jnp.maximum(counts - 1, 0)[..., None])
  idx = jnp.clip(idx, 0, jnp.maximum(n - 1, 0)[:, None, None])
  blocks = jnp.take_along_axis(order, idx.reshape(order.shape[0], -1), axis=-1)
  return blocks.reshape(-1, ns, bps), counts.astype(jnp.int32)


def _static_scale(scale) -> float:
  """``scale`` as a Python float; it is a compile-time constant of the kernels."""
  if isinstance(scale, jax.core.Tracer):
    raise ValueError("scale must be a static Python float (it is a constant of the decode "
                     f"kernels), got a traced value {scale!r}: under jit, pass it as a static "
                     "argument or close over a Python float")
  if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (numbers.Real, np.ndarray,
                                                                    jax.Array)) \
      or np.ndim(scale) != 0:
    raise ValueError(f"scale must be a static Python float, got {scale!r}")
  value = float(scale)
  if not math.isfinite(value):
    raise ValueError(f"scale must be finite, got {value}")
  return value


def _check_static_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return int(value)


def prepare(q, k, v, lengths, *, scale, q_positions, kv_positions, window_left, softcap,
            block_kv, num_splits, platform: str, interpret: bool) -> Prepared:
  """Validate (errors name the argument and the allowed values), pack and build the tables."""
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k_cache, v_cache must have rank 4 ([B, T, H, D]); got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  B, Tq, Hq, D = q.shape
  _, S, Hkv, Dv = v.shape
  if k.shape[:3] != (B, S, Hkv) or k.shape[3] != D or v.shape[0] != B:
    raise ValueError(f"k_cache must be [B, S, Hkv, D]={(B, S, Hkv, D)} and v_cache "
                     f"[B, S, Hkv, Dv] matching q {q.shape}; got {k.shape}, {v.shape}")
  if min(B, Tq, Hq, D, S, Hkv, Dv) < 1:
    raise ValueError(f"all dimensions must be >= 1; got q {q.shape}, k_cache {k.shape}, "
                     f"v_cache {v.shape}")
  if Hq % Hkv:
    raise ValueError(f"query heads Hq={Hq} must be divisible by kv heads Hkv={Hkv}")
  for name, x in (("q", q), ("k_cache", k), ("v_cache", v)):
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise ValueError(f"{name}.dtype={x.dtype} is not supported; allowed: float32, bfloat16, "
                       "float16")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k_cache, v_cache must share one dtype; got {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  if platform == "tpu" and not interpret and (
      k.dtype == jnp.float16 or (k.dtype == jnp.bfloat16 and Hkv > 1 and Hkv % 2)):
    raise ValueError(f"dtype {k.dtype} with Hkv={Hkv} kv heads is not supported on tpu: "
                     "allowed float32, or bfloat16 with Hkv = 1 or even (strided sublane loads)")
  lengths = jnp.asarray(lengths)
  if lengths.shape != (B,) or lengths.dtype != jnp.int32:
    raise ValueError(f"lengths must be int32 [B]=[{B}]; got {lengths.dtype}{list(lengths.shape)}")
  if window_left is not None:
    window_left = _check_static_int("window_left", window_left, 0)
  if softcap is not None and (isinstance(softcap, (bool, np.bool_))
                              or not isinstance(softcap, numbers.Real)
                              or not math.isfinite(softcap) or softcap <= 0):
    raise ValueError(f"softcap must be None or a finite real number > 0 (a static Python "
                     f"float), got {softcap!r}")
  scale = 1.0 / math.sqrt(D) if scale is None else _static_scale(scale)
  if not interpret and platform == "gpu":
    # Triton block shapes are powers of two and its dots want >= 16: zero-pad the head dims
    # (zeros leave q.k unchanged; padded value columns are dropped by combine). That copies
    # the whole cache on every call, so say so: a cache stored padded avoids it.
    Dp, Dvp = (max(16, 1 << (n - 1).bit_length()) for n in (D, Dv))
    if (Dp, Dvp) != (D, Dv):
      warnings.warn(
          f"decode_attention on a GPU: head dims D={D}, Dv={Dv} are padded to {Dp}, {Dvp} "
          "(Triton needs powers of two >= 16), which copies the whole KV cache on every call; "
          "store the cache with padded head dims (zero columns; pass scale=1/sqrt(D) "
          "explicitly) to avoid the copy", CachePaddingWarning, stacklevel=3)
    q, k = (jnp.pad(x, ((0, 0),) * 3 + ((0, Dp - D),)) if Dp != D else x for x in (q, k))
    v = jnp.pad(v, ((0, 0),) * 3 + ((0, Dvp - Dv),)) if Dvp != Dv else v

  if q_positions is None:
    q_pos = lengths[:, None] - Tq + jnp.arange(Tq, dtype=jnp.int32)[None]
  else:
    q_pos = jnp.asarray(q_positions)
    if q_pos.shape != (B, Tq) or not jnp.issubdtype(q_pos.dtype, jnp.integer):
      raise ValueError(f"q_positions must be an integer array [B, Tq]=[{B}, {Tq}]; got "
                       f"{q_pos.dtype}{list(q_pos.shape)}")
    q_pos = q_pos.astype(jnp.int32)
  kv_pos = None
  if kv_positions is not None:
    kv_pos = jnp.asarray(kv_positions)
    if kv_pos.shape != (B, S) or not jnp.issubdtype(kv_pos.dtype, jnp.integer):
      raise ValueError(f"kv_positions must be an integer array [B, S]=[{B}, {S}]; got "
                       f"{kv_pos.dtype}{list(kv_pos.shape)}")
    kv_pos = kv_pos.astype(jnp.int32)

  row_bytes = (D * k.dtype.itemsize + Dv * v.dtype.itemsize)
  if block_kv is None:
    block_kv = default_block_kv(S, Hkv, row_bytes, platform, interpret)
  else:
    block_kv = check_block_kv(block_kv, platform, interpret)
    if S % block_kv:
      raise ValueError(f"block_kv={block_kv} must divide the cache length S={S} (leave block_kv "
                       "None to pad the cache internally)")
  if S % block_kv:  # default block size that does not divide S: pad with empty slots (a copy)
    pad = block_kv - S % block_kv
    warnings.warn(f"decode_attention: the cache length S={S} has no block size dividing it, so "
                  f"the cache is padded to {S + pad} slots (a copy on every call); size caches "
                  "to a multiple of 128", CachePaddingWarning, stacklevel=3)
    if kv_pos is None:
      kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    kv_pos = jnp.pad(kv_pos, ((0, 0), (0, pad)), constant_values=-1)
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    S += pad
  nb = S // block_kv
  if num_splits is None:
    num_splits = default_num_splits(nb, B, Hkv, platform)
  elif (isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer))
        or not 1 <= num_splits <= nb):
    raise ValueError(f"num_splits={num_splits!r} must be an int in [1, S / block_kv = {nb}]")
  num_splits = int(num_splits)

  # Row bounds: lo <= kv_pos <= hi. Empty slots (-1) fail lo >= 0.
  hi = jnp.minimum(q_pos, lengths[:, None] - 1)
  lo = jnp.zeros_like(q_pos) if window_left is None else jnp.maximum(q_pos - window_left, 0)
  blocks, counts = block_tables(lengths, jnp.min(lo, axis=1), jnp.max(hi, axis=1), kv_pos, nb,
                                block_kv, num_splits)
  G = Hq // Hkv
  R = Tq * G
  rp = -(-R // 8) * 8 if platform == "tpu" else max(16, 1 << (R - 1).bit_length())
  Dq = q.shape[-1]  # D, or its padded size on GPU
  qp = q.reshape(B, Tq, Hkv, G, Dq).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, R, Dq)
  qp = jnp.pad(qp, ((0, 0), (0, 0), (0, rp - R), (0, 0)))
  row_lo = jnp.pad(jnp.repeat(lo, G, axis=1), ((0, 0), (0, rp - R)), constant_values=0)
  row_hi = jnp.pad(jnp.repeat(hi, G, axis=1), ((0, 0), (0, rp - R)), constant_values=-1)
  return Prepared(qp, k, v, kv_pos, row_lo, row_hi, blocks, counts, B, Tq, Hq, Hkv, D, Dv, rp,
                  block_kv, num_splits, scale, None if softcap is None else float(softcap))


def combine(prep: Prepared, acc, m, l, sinks=None, return_lse: bool = False, out_dtype=None):
  """Merge the split partials (Flash-Decoding's reduction step; plain jnp, float32).

  ``acc [B, ns, Hkv, Rp, Dv]``, ``m``/``l`` ``[B, ns, Hkv, Rp]`` (``m = -inf``, ``l = 0`` for a
  split that saw nothing). With ``M = max(max_k m_k, sink)``:
  ``out = sum_k exp(m_k - M) acc_k / L`` and ``lse = M + log L`` where
  ``L = sum_k exp(m_k - M) l_k + exp(sink - M)``; ``L = 0`` gives ``out = 0``, ``lse = -inf``."""
  B, Tq, Hq, Hkv, Dv = prep.batch, prep.tq, prep.hq, prep.hkv, prep.dv
  G, R = Hq // Hkv, prep.tq * (Hq // Hkv)
  acc, m, l = acc[:, :, :, :R, :Dv], m[:, :, :, :R], l[:, :, :, :R]
  mx = jnp.max(m, axis=1)                                          # [B, Hkv, R]
  if sinks is not None:
    sink_rows = jnp.tile(sinks.astype(jnp.float32).reshape(Hkv, G), (1, Tq))  # r = t*G + g
    mx = jnp.maximum(mx, sink_rows[None])
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  w = jnp.exp(m - mx[:, None])                                     # 0 for empty splits
  denom = jnp.sum(w * l, axis=1)
  if sinks is not None:
    denom = denom + jnp.exp(sink_rows[None] - mx)
  num = jnp.sum(w[..., None] * acc, axis=1)                        # [B, Hkv, R, Dv]
  out = num / jnp.where(denom > 0, denom, 1.0)[..., None]
  out = out.reshape(B, Hkv, Tq, G, Dv).transpose(0, 2, 1, 3, 4).reshape(B, Tq, Hq, Dv)
  out = out.astype(out_dtype or jnp.float32)
  if not return_lse:
    return out
  lse = jnp.where(denom > 0, mx + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
  return out, lse.reshape(B, Hkv, Tq, G).transpose(0, 2, 1, 3).reshape(B, Tq, Hq)


def check_sinks(sinks, hq: int):
  if sinks is None:
    return None
  sinks = jnp.asarray(sinks)
  if sinks.shape != (hq,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
    raise ValueError(f"sinks must be a float array [Hq]=[{hq}]; got {sinks.dtype}"
                     f"{list(sinks.shape)}")
  return sinks
