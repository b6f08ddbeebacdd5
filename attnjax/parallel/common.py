"""Pieces shared by the strategies: axis queries, layouts, per-branch local attention calls."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import api
from attnjax.backends import base
from attnjax import masks as masks_lib
from attnjax.parallel import balance
from attnjax.parallel import plan as plan_lib

f32 = jnp.float32


def axis_size(axis) -> int:
  """Size of a bound mesh axis (inside ``shard_map``), with an error naming the axis."""
  try:
    return int(jax.lax.axis_size(axis))
  except (NameError, KeyError, ValueError) as e:
    raise ValueError(f"axis {axis!r} is not a mesh axis bound here: call inside shard_map over "
                     f"a mesh with that axis, or pass mesh= to context_parallel_attention "
                     f"({e})") from None


def layout_positions(seq_len: int, num_shards: int, load_balance, positions) -> np.ndarray:
  """Global positions ``[seq_len]`` of the tokens in the order they are laid out."""
  if positions is not None:
    if load_balance not in (None, "contiguous"):
      raise ValueError("pass either load_balance= or positions=, not both")
    if isinstance(positions, jax.core.Tracer):
      raise TypeError("positions must be static (a numpy array or list of ints) so that masks "
                      "can be planned at trace time; got a traced array")
    positions = np.asarray(positions)
    if positions.shape != (seq_len,) or not np.issubdtype(positions.dtype, np.integer):
      raise ValueError(f"positions must be integers of shape [seq_len] = [{seq_len}], got "
                       f"{positions.dtype}{list(positions.shape)}")
    return positions.astype(np.int64)
  return balance.load_balance_permutation(seq_len, num_shards, load_balance)


@dataclasses.dataclass(frozen=True)
class LocalCall:
  """Static arguments of every per-shard :func:`attnjax.attention` call."""
  mask: masks_lib.Mask
  scale: float | None
  impl: Any
  # USP: the devices along ``head_axis`` hold query heads ``d * heads_per_device ...`` (after the
  # Ulysses all-to-all); a per-head mask is evaluated at those global head indices.
  head_axis: Any = None
  heads_per_device: int = 0


def per_head_dispatch(mask, axis, heads_per_device: int, fn, *operands):
  """``fn(mask_d, *operands)`` on a device that holds the contiguous query heads
  ``d * heads_per_device ...`` where ``d`` is its index along mesh ``axis`` (Ulysses / USP):
  a per-head ``mask`` becomes :class:`attnjax.parallel.plan.HeadOffsetMask` with offset
  ``d * heads_per_device`` (one static mask per ``d``, picked with ``lax.switch``). Other masks,
  or ``axis=None``, call ``fn(mask, *operands)``. ``fn`` must not run collectives."""
  if axis is None or not mask.per_head:
    return fn(mask, *operands)
  inner = mask.inner if isinstance(mask, plan_lib.GlobalPositionMask) else mask
  masks = [plan_lib.HeadOffsetMask(inner, d * heads_per_device) for d in range(axis_size(axis))]
  return dispatch(masks, jax.lax.axis_index(axis), fn, *operands)


def run_branch(call: LocalCall, branch: plan_lib.Branch, q, k, v, qseg, kvseg, q_pos, kv_pos,
               sinks=None):
  """Local attention for one plan branch, returning ``(out, lse)`` (lse float32).

  ``q_pos``/``kv_pos`` are the traced positions of this device (used by TRACED branches only).
  With ``sinks`` the result includes the sink (all-gather / Ulysses); the ring passes none."""
  B, Tq, Hq, _ = q.shape
  if branch.kind == plan_lib.EMPTY:
    out = jnp.zeros((B, Tq, Hq, v.shape[-1]), q.dtype)
    if sinks is None:
      lse = jnp.full((B, Tq, Hq), -jnp.inf, f32)
    else:
      lse = jnp.broadcast_to(sinks.astype(f32)[None, None, :], (B, Tq, Hq))
    return out, lse
  kw = dict(scale=call.scale, impl=call.impl, return_lse=True, sinks=sinks)
  if qseg is not None:
    kw.update(segment_ids=qseg, kv_segment_ids=kvseg)
  if branch.kind == plan_lib.FULL:
    return api.attention(q, k, v, mask=None, **kw)

  def masked(mask, q, k, v, qseg, kvseg, q_pos, kv_pos, sinks):
    kw = dict(scale=call.scale, impl=call.impl, return_lse=True, sinks=sinks)
    if qseg is not None:
      kw.update(segment_ids=qseg, kv_segment_ids=kvseg)
    if branch.kind == plan_lib.STATIC:
      return api.attention(q, k, v, mask=mask, q_positions=branch.q_pos,
                           kv_positions=branch.kv_pos, **kw)
    return api.attention(q, k, v, mask=mask, q_positions=q_pos, kv_positions=kv_pos, **kw)

  return per_head_dispatch(call.mask, call.head_axis, call.heads_per_device, masked, q, k, v,
                           qseg, kvseg, q_pos, kv_pos, sinks)


def cast_varying(tree, *like):
  """``tree`` marked varying over every axis along which anything in ``like`` varies (initial
  values of loop carries that become device-dependent)."""
  return base.cast_varying(tree, base.varying_axes(*like))


def dispatch(branches, branch_index, fn, *operands):
  """Run ``fn(branch, *operands)`` for ``branches[branch_index]`` (a traced per-device index)
  with ``lax.switch``; only that branch executes on the device."""
  if len(branches) == 1:
    return fn(branches[0], *operands)
  axes = base.varying_axes(operands, branch_index)
  fns = [lambda *ops, b=b: base.cast_varying(fn(b, *ops), axes) for b in branches]
  return jax.lax.switch(branch_index, fns, *operands)


def needs_positions(schedule: plan_lib.Schedule) -> bool:
  return any(b.kind == plan_lib.TRACED for b in schedule.branches)
