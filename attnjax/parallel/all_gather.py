"""All-gather context parallelism: K/V are gathered along the mesh axis, queries stay sharded.

Semantics: device ``r`` holds the queries at global positions ``table[r]`` and, after
``lax.all_gather`` of K, V (and the key segment ids), every key of the sequence; it computes its
queries' attention over all keys with one :func:`attnjax.attention` call (masks at global
positions, sinks included). When the layout is a permutation (contiguous, zigzag, striped) the
gathered keys are put back into natural order with a static local gather, so the backend sees
contiguous key positions and skips empty tiles well. Devices whose local visibility patterns
differ run different branches (``lax.switch`` on the axis index; see
:mod:`attnjax.parallel.plan`), each with static positions. The backward pass is JAX autodiff:
the transpose of the all-gather is a reduce-scatter of dK/dV.

This is MaxText's default context-parallel strategy ("all_gather"): communication is one
all-gather of K/V per layer instead of ``n - 1`` ring hops, at the cost of holding the whole
K/V on every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.parallel import balance
from attnjax.parallel import common
from attnjax.parallel import plan as plan_lib


def all_gather_core(q, k, v, qseg, sinks, *, axis, layout: np.ndarray, call: common.LocalCall,
                    max_branches: int):
  """All-gather attention on local shards; ``layout`` is the static ``[T]`` array of global
  positions in sharded order. Returns ``(out, lse)`` including sinks."""
  n = common.axis_size(axis)
  L = q.shape[1]
  r = jax.lax.axis_index(axis)
  kf = jax.lax.all_gather(k, axis, axis=1, tiled=True)
  vf = jax.lax.all_gather(v, axis, axis=1, tiled=True)
  kvseg = None if qseg is None else jax.lax.all_gather(qseg, axis, axis=1, tiled=True)
  kv_pos = layout
  if plan_lib.is_permutation(layout) and not np.array_equal(layout, np.arange(layout.size)):
    inv = balance.inverse_permutation(layout)
    kf, vf = jnp.take(kf, inv, axis=1), jnp.take(vf, inv, axis=1)
    kvseg = None if kvseg is None else jnp.take(kvseg, inv, axis=1)
    kv_pos = np.arange(layout.size)
  q_table = layout.reshape(n, L)
  sched = plan_lib.schedule(call.mask, [[(q_table[i], kv_pos) for i in range(n)]], q.shape[2],
                            max_branches)
  qp = jnp.asarray(q_table, jnp.int32)[r] if common.needs_positions(sched) else None

  def step(branch, q, kf, vf, qseg, kvseg, qp, sinks):
    return common.run_branch(call, branch, q, kf, vf, qseg, kvseg, qp, kv_pos, sinks=sinks)

  bidx = jnp.asarray(sched.index[0], jnp.int32)[r]
  return common.dispatch(sched.branches, bidx, step, q, kf, vf, qseg, kvseg, qp, sinks)


def all_gather_attention(q, k, v, *, axis, mask=None, segment_ids=None, sinks=None, scale=None,
                         load_balance=None, positions=None, return_lse=False, impl="auto",
                         max_branches: int = 8):
  """All-gather attention on the local shards of a sequence sharded over ``axis`` (call inside
  ``jax.shard_map``). Arguments and result as :func:`attnjax.parallel.ring_attention`."""
  from attnjax.parallel import api as cp_api
  return cp_api.local_attention("all_gather", q, k, v, axis=axis, mask=mask,
                                segment_ids=segment_ids, sinks=sinks, scale=scale,
                                load_balance=load_balance, positions=positions,
                                return_lse=return_lse, impl=impl, max_branches=max_branches)
