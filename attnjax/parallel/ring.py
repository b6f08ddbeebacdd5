"""Ring attention over a mesh axis (Liu et al. 2023, "Ring Attention with Blockwise Transformers
for Near-Infinite Context"), with causal load balancing by layout (zigzag; striped as in
Brandon et al. 2023, "Striped Attention: Faster Ring Attention for Causal Transformers").

Semantics: the sequence is sharded over ``axis`` (size ``n``); device ``r`` holds queries, keys
and values at the global positions ``table[r]`` of the layout. At step ``s = 0 .. S-1`` device
``r`` holds the key/value shard (and kv segment ids) of device ``(r - s) mod n``, computes the
partial attention of its queries against it with :func:`attnjax.attention` (``return_lse=True``,
masks evaluated at global positions), and merges it into float32 accumulators by LSE; K/V move
one hop with ``lax.ppermute`` per step, issued before the step's compute so that XLA can overlap
the transfer with it. The result is exactly attention over the whole sequence.

* The ring stops after the last step in which any device has work (a causal sliding window no
  wider than a shard runs 2 steps and ``1`` hop, not ``n`` and ``n - 1``). Per device, a step
  whose key shard is entirely masked runs an empty branch (no FLOPs), a fully visible one runs
  without mask evaluation, and partial ones run with static positions so the backend skips
  empty tiles (:mod:`attnjax.parallel.plan`). A causal ring does about half the FLOPs of a full
  one; with zigzag or striped layouts every device does the same share at every step.
* Steps ``0 .. S-2`` run in one ``lax.scan`` (compiled once whatever ``n``), the last step is
  peeled so exactly ``S - 1`` hops are made.
* Sinks are applied once, after the ring (:func:`attnjax.parallel.merge.apply_sinks`).
* Backward: a custom VJP stores only the local q, k, v, the merged output and LSE. It replays
  the ring: K/V rotate as in the forward, each step adds ``dQ`` locally and ``dK``/``dV`` into
  float32 accumulators that travel with K/V, and one final ``ppermute`` returns every dK/dV to
  its owner. Per step the gradient is the backend's own VJP of the partial call with the
  cotangents ``g_out = w * dO`` and ``g_lse = w * (dO . o_s - delta)`` where
  ``w = exp(lse_s - lse)``, ``delta = dO . O - dLSE``; this makes the per-step gradients the
  blocks of the global FlashAttention backward. (The backend API has no entry point that takes a
  saved ``(out, lse)``, so each backward step recomputes the partial forward.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.parallel import common
from attnjax.parallel import merge as merge_lib
from attnjax.parallel import plan as plan_lib

f32 = jnp.float32


def _ring_core(call: common.LocalCall, sched: plan_lib.Schedule, q_table: np.ndarray,
               kv_table: np.ndarray, axis, n: int):
  """The differentiable ring ``(q, k, v, qseg, kvseg) -> (out f32, lse f32)`` (no sinks).

  Steps ``0 .. S-2`` run in a ``lax.scan`` (compiled once, whatever ``n``) that sends K/V on
  before computing; the last step is peeled off so that exactly ``S - 1`` hops are made."""
  S = sched.num_steps
  fwd_perm = [(i, (i + 1) % n) for i in range(n)]
  home_perm = [(i, (i - (S - 1)) % n) for i in range(n)]
  need_pos = common.needs_positions(sched)
  last = sched.step(S - 1)

  def positions(r, s):
    if not need_pos:
      return None, None
    qt = jnp.asarray(q_table, jnp.int32)
    kt = jnp.asarray(kv_table, jnp.int32)
    return qt[r], kt[(r - s) % n]

  def branch_at(sub, r, s):
    """(branches, this device's branch index) for step s (traced in the scan)."""
    if sub is last:
      return last.branches, jnp.asarray(last.index[0], jnp.int32)[r]
    return sched.branches, jnp.asarray(sched.index, jnp.int32)[s, r]

  def fwd_step(branch, q, k, v, qseg, kvseg, qp, kp):
    o, lse = common.run_branch(call, branch, q, k, v, qseg, kvseg, qp, kp)
    return o.astype(f32), lse.astype(f32)

  def forward(q, k, v, qseg, kvseg):
    r = jax.lax.axis_index(axis)
    B, L, H, _ = q.shape
    o0 = jnp.zeros((B, L, H, v.shape[-1]), f32)
    lse0 = jnp.full((B, L, H), -jnp.inf, f32)

    def compute(sub, s, kv, o, lse):
      branches, bidx = branch_at(sub, r, s)
      qp, kp = positions(r, s)
      o_s, lse_s = common.dispatch(branches, bidx, fwd_step, q, kv[0], kv[1], qseg, kv[2], qp,
                                   kp)
      return merge_lib.merge_two(o, lse, o_s, lse_s)

    def body(carry, s):
      kv, o, lse = carry
      nxt = jax.lax.ppermute(kv, axis, fwd_perm)  # independent of this step's compute
      o, lse = compute(sched, s, kv, o, lse)
      return (nxt, o, lse), None

    o0, lse0 = common.cast_varying((o0, lse0), q, k, v, qseg, kvseg, r)
    carry = ((k, v, kvseg), o0, lse0)
    if S > 1:
      carry, _ = jax.lax.scan(body, carry, jnp.arange(S - 1))
    kv, o, lse = carry
    return compute(last, S - 1, kv, o, lse)

  def bwd_step(branch, q, k, v, qseg, kvseg, qp, kp, do, delta, lse):
    if branch.kind == plan_lib.EMPTY:
      return (jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))

    def partial(q_, k_, v_):
      return common.run_branch(call, branch, q_, k_, v_, qseg, kvseg, qp, kp)

    (o_s, lse_s), vjp = jax.vjp(partial, q, k, v)
    w = merge_lib.merge_weight(lse_s.astype(f32), lse)
    g_out = (w[..., None] * do).astype(o_s.dtype)
    g_lse = w * (jnp.sum(do * o_s.astype(f32), axis=-1) - delta)
    dq, dk, dv = vjp((g_out, g_lse.astype(lse_s.dtype)))
    return dq.astype(f32), dk.astype(f32), dv.astype(f32)

  @jax.custom_vjp
  def core(q, k, v, qseg, kvseg):
    return forward(q, k, v, qseg, kvseg)

  def core_fwd(q, k, v, qseg, kvseg):
    o, lse = forward(q, k, v, qseg, kvseg)
    return (o, lse), (q, k, v, qseg, kvseg, o, lse)

  def core_bwd(res, cts):
    q, k, v, qseg, kvseg, o, lse = res
    do, dlse = cts
    do = do.astype(f32)
    delta = jnp.sum(do * o, axis=-1) - dlse.astype(f32)
    r = jax.lax.axis_index(axis)

    def compute(sub, s, kv, dq, dkv):
      branches, bidx = branch_at(sub, r, s)
      qp, kp = positions(r, s)
      dq_s, dk_s, dv_s = common.dispatch(branches, bidx, bwd_step, q, kv[0], kv[1], qseg, kv[2],
                                         qp, kp, do, delta, lse)
      return dq + dq_s, (dkv[0] + dk_s, dkv[1] + dv_s)

    def body(carry, s):
      kv, dq, dkv = carry
      nxt = jax.lax.ppermute(kv, axis, fwd_perm)
      dq, dkv = compute(sched, s, kv, dq, dkv)
      dkv = jax.lax.ppermute(dkv, axis, fwd_perm)  # dK/dV travel with their K/V
      return (nxt, dq, dkv), None

    zeros = common.cast_varying(
        (jnp.zeros(q.shape, f32), (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))),
        q, k, v, qseg, kvseg, do, dlse, r)
    carry = ((k, v, kvseg),) + zeros
    if S > 1:
      carry, _ = jax.lax.scan(body, carry, jnp.arange(S - 1))
    kv, dq, dkv = carry
    dq, dkv = compute(last, S - 1, kv, dq, dkv)
    if S > 1:
      dkv = jax.lax.ppermute(dkv, axis, home_perm)   # back to the owner in one hop
    return (dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None, None)

  core.defvjp(core_fwd, core_bwd)
  return core


def ring_core(q, k, v, qseg, kvseg, *, axis, q_table, kv_table, call: common.LocalCall,
              max_branches: int, num_heads: int | None = None):
  """Ring attention on local shards with explicit position tables; returns float32
  ``(out, lse)`` without sinks. Used by :func:`ring_attention` and the USP hybrid."""
  n = q_table.shape[0]
  sched = plan_lib.ring_schedule(call.mask, q_table, kv_table, num_heads or q.shape[2],
                                 max_branches)
  return _ring_core(call, sched, q_table, kv_table, axis, n)(q, k, v, qseg, kvseg)


def ring_schedule_summary(mask, q_table, kv_table, num_heads: int = 1, max_branches: int = 8):
  """For inspection and benchmarks: ``(branch kinds, index [steps, devices])`` of the ring."""
  sched = plan_lib.ring_schedule(plan_lib.global_mask(mask), np.asarray(q_table),
                                 np.asarray(kv_table), num_heads, max_branches)
  return sched.kinds(), sched.index


def ring_attention(q, k, v, *, axis, mask=None, segment_ids=None, sinks=None, scale=None,
                   load_balance=None, positions=None, return_lse=False, impl="auto",
                   max_branches: int = 8):
  """Ring attention on the local shards of a sequence sharded over mesh ``axis``; call inside
  ``jax.shard_map`` (or use :func:`attnjax.parallel.context_parallel_attention`).

  Args:
    q, k, v: local shards ``[B, L, Hq, D]``, ``[B, L, Hkv, D]``, ``[B, L, Hkv, Dv]`` of a
      sequence of ``T = n * L`` tokens laid out by ``load_balance``/``positions``.
    mask: any static :mod:`attnjax.masks` mask, evaluated at global positions.
    segment_ids: local ``[B, L]`` int segment ids (packed documents); the key side rotates with
      K/V.
    sinks: ``[Hq]`` sink logits (replicated).
    load_balance: ``None`` (contiguous), ``"zigzag"`` or ``"striped"``: how the global sequence
      was permuted before sharding (:func:`attnjax.parallel.load_balance_permutation` with
      ``num_shards = n``).
    positions: alternatively, the static global positions ``[T]`` of the laid-out tokens.
    impl: backend for the per-step local attention (see :func:`attnjax.attention`).
    max_branches: how many distinct partial visibility patterns (over all devices and steps)
      get their own branch with static positions (tile skipping) before all partial
      sub-problems share one traced-position branch.

  Returns ``out [B, L, Hq, Dv]`` (dtype of q) or ``(out, lse [B, L, Hq] float32)``, the local
  shard of attention over the whole sequence.
  """
  return _local_entry("ring", q, k, v, axis=axis, mask=mask, segment_ids=segment_ids,
                      sinks=sinks, scale=scale, load_balance=load_balance, positions=positions,
                      return_lse=return_lse, impl=impl, max_branches=max_branches)


def _local_entry(strategy, q, k, v, **kw):
  from attnjax.parallel import api as cp_api
  return cp_api.local_attention(strategy, q, k, v, **kw)


__all__ = ["ring_attention", "ring_core", "ring_schedule_summary"]
