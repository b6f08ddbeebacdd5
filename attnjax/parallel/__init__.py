"""Context parallelism: exact attention over sequences sharded across devices with
``jax.shard_map``.

Strategies (all exact, forward and backward, every static mask, segment ids, GQA, Dv != D,
sinks; masks are evaluated at global token positions, so they stay right under any
load-balancing layout):

* ``ring`` -- K/V rotate around the mesh axis with ``ppermute``; partial results merge by LSE in
  float32; custom VJP rotating dK/dV back; fully masked steps skipped (Liu et al. 2023, "Ring
  Attention with Blockwise Transformers for Near-Infinite Context").
* ``all_gather`` -- K/V gathered along the axis, queries stay sharded.
* ``ulysses`` -- all-to-all from sequence to head sharding and back (Jacobs et al. 2023,
  "DeepSpeed Ulysses").
* ``usp`` -- Ulysses on one mesh axis, ring on another (Fang & Zhao 2024, "USP: A Unified
  Sequence Parallelism Approach for Long Context Generative AI").

Causal load balancing by layout: ``zigzag`` (dual-chunk swap) and ``striped`` (Brandon et al.
2023, "Striped Attention: Faster Ring Attention for Causal Transformers"), applied at
data-loading time with :func:`permute_batch`; :func:`flop_balance_report` gives per-device FLOPs.

Example::

    from attnjax import masks, parallel
    perm = parallel.load_balance_permutation(T, mesh.shape["sp"], "zigzag")
    batch = parallel.permute_batch(batch, perm)          # data loading
    out = parallel.context_parallel_attention(q, k, v, mesh=mesh, axis="sp", strategy="ring",
                                              mask=masks.causal(), segment_ids=seg, sinks=s,
                                              load_balance="zigzag")
"""

from attnjax.parallel.all_gather import all_gather_attention
from attnjax.parallel.api import STRATEGIES, context_parallel_attention, local_attention
from attnjax.parallel.balance import (BalanceReport, flop_balance_report, inverse_permutation,
                                      load_balance_permutation, permute_batch, permute_sequence,
                                      shard_position_table, unpermute_sequence)
from attnjax.parallel.merge import apply_sinks, merge_partials
from attnjax.parallel.ring import ring_attention, ring_schedule_summary
from attnjax.parallel.ulysses import ulysses_attention, usp_attention

__all__ = [
    "STRATEGIES", "context_parallel_attention", "local_attention", "ring_attention",
    "all_gather_attention", "ulysses_attention", "usp_attention", "load_balance_permutation",
    "inverse_permutation", "permute_sequence", "unpermute_sequence", "permute_batch",
    "shard_position_table", "flop_balance_report", "BalanceReport", "merge_partials",
    "apply_sinks", "ring_schedule_summary",
]
