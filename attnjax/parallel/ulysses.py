"""Ulysses sequence parallelism (Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for
Enabling Training of Extreme Long Sequence Transformer Models") and the USP hybrid of Ulysses and
ring attention (Fang & Zhao 2024, "USP: A Unified Sequence Parallelism Approach for Long Context
Generative AI").

Ulysses semantics: q, k, v arrive sharded over the sequence (``[B, L, H, D]`` per device). One
``lax.all_to_all`` per tensor re-shards them over heads: device ``d`` then holds the whole
sequence for query heads ``d * H / n ... (d + 1) * H / n`` (and the key/value heads they use). It
runs ordinary :func:`attnjax.attention` over the full sequence -- after undoing the load-balancing
permutation with a static local gather, so masks see natural positions and the backend's block
skipping is exact -- and a second all-to-all brings the output (and LSE) back to sequence
sharding. Needs ``Hq % n == 0``; key/value heads must divide ``n`` evenly or be divisible by it
(fewer K/V heads than devices are repeated, ``n / Hkv`` copies each, so GQA/MQA work). Work is
balanced whatever the mask. Sinks and per-head masks follow the device's global head ids.

USP semantics: Ulysses over ``ulysses_axis`` (size ``u``), then ring attention
(:mod:`attnjax.parallel.ring`) over ``ring_axis`` (size ``n_r``) on the head-sharded,
sequence-gathered blocks, then the inverse all-to-all. The sequence is sharded over the pair of
axes ring-major (``PartitionSpec(..., (ring_axis, ulysses_axis))``), so each ring rank owns a
contiguous slice of the laid-out sequence; the load-balancing layout is over the ``n_r`` ring
ranks. Per-head masks are evaluated at global query-head indices (the ring's local calls use the
same head offset as Ulysses; its static plan classifies visibility over all heads). Ulysses'
head split bounds its degree by the head count, the ring's bandwidth limits its own degree; USP
combines the two.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import api
from attnjax.parallel import balance
from attnjax.parallel import common
from attnjax.parallel import merge as merge_lib
from attnjax.parallel import plan as plan_lib
from attnjax.parallel import ring as ring_lib

f32 = jnp.float32


def check_heads(num_q_heads: int, num_kv_heads: int, n: int, axis) -> None:
  """Raise ``ValueError`` naming the constraint when heads cannot be split over ``n`` devices."""
  if num_q_heads % n:
    raise ValueError(f"ulysses needs the number of query heads ({num_q_heads}) divisible by the "
                     f"size of mesh axis {axis!r} ({n}): heads are split across its devices")
  if num_kv_heads % n and n % num_kv_heads:
    raise ValueError(f"ulysses needs the number of key/value heads ({num_kv_heads}) to divide or "
                     f"be divisible by the size of mesh axis {axis!r} ({n})")


def seq_to_heads(x, axis):
  """``[B, L, H, ...]`` sequence-sharded -> ``[B, n*L, H/n, ...]`` head-sharded."""
  return jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x, axis):
  """Inverse of :func:`seq_to_heads`."""
  return jax.lax.all_to_all(x, axis, split_axis=1, concat_axis=2, tiled=True)


def _kv_to_heads(x, axis, n):
  hkv = x.shape[2]
  if hkv % n:
    x = jnp.repeat(x, n // hkv, axis=2)  # each device receives the one K/V head it needs
  return seq_to_heads(x, axis)


def _local_sinks(sinks, axis, heads_per_device):
  if sinks is None:
    return None
  d = jax.lax.axis_index(axis)
  return jax.lax.dynamic_slice_in_dim(sinks, d * heads_per_device, heads_per_device)


def ulysses_core(q, k, v, qseg, sinks, *, axis, layout: np.ndarray, call: common.LocalCall):
  """Ulysses attention on local shards; returns ``(out, lse)`` including sinks."""
  n = common.axis_size(axis)
  B, L, Hq, _ = q.shape
  check_heads(Hq, k.shape[2], n, axis)
  hl = Hq // n
  qh = seq_to_heads(q, axis)
  kh, vh = _kv_to_heads(k, axis, n), _kv_to_heads(v, axis, n)
  seg = None if qseg is None else jax.lax.all_gather(qseg, axis, axis=1, tiled=True)
  T = n * L
  reorder = plan_lib.is_permutation(layout) and not np.array_equal(layout, np.arange(T))
  pos = None
  if reorder:
    inv = balance.inverse_permutation(layout)
    qh, kh, vh = (jnp.take(x, inv, axis=1) for x in (qh, kh, vh))
    seg = None if seg is None else jnp.take(seg, inv, axis=1)
  elif not plan_lib.is_permutation(layout):
    pos = layout
  local_sinks = _local_sinks(sinks, axis, hl)
  kw = dict(scale=call.scale, impl=call.impl, return_lse=True, q_positions=pos,
            kv_positions=pos)
  if seg is not None:
    kw.update(segment_ids=seg, kv_segment_ids=seg)

  def run(mask, qh, kh, vh, local_sinks):
    return api.attention(qh, kh, vh, mask=mask, sinks=local_sinks, **kw)

  out, lse = common.per_head_dispatch(call.mask, axis, hl, run, qh, kh, vh, local_sinks)
  if reorder:
    out, lse = jnp.take(out, layout, axis=1), jnp.take(lse, layout, axis=1)
  return heads_to_seq(out, axis), heads_to_seq(lse, axis)


def usp_core(q, k, v, qseg, sinks, *, ring_axis, ulysses_axis, layout: np.ndarray,
             call: common.LocalCall, max_branches: int):
  """USP: Ulysses over ``ulysses_axis``, ring over ``ring_axis``; returns ``(out, lse)``."""
  u = common.axis_size(ulysses_axis)
  nr = common.axis_size(ring_axis)
  B, L, Hq, _ = q.shape
  check_heads(Hq, k.shape[2], u, ulysses_axis)
  hl = Hq // u
  num_heads = hl
  if call.mask.per_head:
    # Device d along ulysses_axis holds global query heads d*hl ...: the ring's local calls
    # evaluate the mask there (common.per_head_dispatch), and its static plan -- shared by all
    # head groups, as the ring schedule is indexed by ring rank only -- classifies every
    # sub-problem over all Hq global heads, which is exact for each group.
    call = dataclasses.replace(call, head_axis=ulysses_axis, heads_per_device=hl)
    num_heads = Hq
  qh = seq_to_heads(q, ulysses_axis)
  kh, vh = _kv_to_heads(k, ulysses_axis, u), _kv_to_heads(v, ulysses_axis, u)
  seg = None if qseg is None else jax.lax.all_gather(qseg, ulysses_axis, axis=1, tiled=True)
  table = balance.shard_position_table(layout, nr)  # [n_r, u * L], ring-major sharding
  o, lse = ring_lib.ring_core(qh, kh, vh, seg, seg, axis=ring_axis, q_table=table,
                              kv_table=table, call=call, max_branches=max_branches,
                              num_heads=num_heads)
  local_sinks = _local_sinks(sinks, ulysses_axis, hl)
  if local_sinks is not None:
    o, lse = merge_lib.apply_sinks(o, lse, local_sinks)
  return heads_to_seq(o.astype(q.dtype), ulysses_axis), heads_to_seq(lse, ulysses_axis)


def ulysses_attention(q, k, v, *, axis, mask=None, segment_ids=None, sinks=None, scale=None,
                      load_balance=None, positions=None, return_lse=False, impl="auto"):
  """Ulysses attention on the local shards of a sequence sharded over ``axis`` (inside
  ``jax.shard_map``). Arguments and result as :func:`attnjax.parallel.ring_attention`."""
  from attnjax.parallel import api as cp_api
  return cp_api.local_attention("ulysses", q, k, v, axis=axis, mask=mask,
                                segment_ids=segment_ids, sinks=sinks, scale=scale,
                                load_balance=load_balance, positions=positions,
                                return_lse=return_lse, impl=impl)


def usp_attention(q, k, v, *, ring_axis, ulysses_axis, mask=None, segment_ids=None, sinks=None,
                  scale=None, load_balance=None, positions=None, return_lse=False, impl="auto",
                  max_branches: int = 8):
  """USP hybrid on local shards (inside ``jax.shard_map``): the sequence is sharded over
  ``(ring_axis, ulysses_axis)``, ring-major; ``load_balance`` is over the ring ranks."""
  from attnjax.parallel import api as cp_api
  return cp_api.local_attention("usp", q, k, v, axis=ring_axis, ulysses_axis=ulysses_axis,
                                mask=mask, segment_ids=segment_ids, sinks=sinks, scale=scale,
                                load_balance=load_balance, positions=positions,
                                return_lse=return_lse, impl=impl, max_branches=max_branches)
