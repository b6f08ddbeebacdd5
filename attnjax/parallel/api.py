"""``context_parallel_attention``: validate, lay out, and run one context-parallel strategy.

Two ways in:

* on globally sharded arrays: ``context_parallel_attention(q, k, v, mesh=mesh, axis="sp", ...)``
  wraps the strategy in ``jax.shard_map`` over ``mesh`` (sequence dimension sharded over
  ``axis``; batch over ``batch_axis`` when given; other mesh axes replicate);
* inside a user's ``jax.shard_map``: call it with ``mesh=None`` (or the strategy functions
  ``ring_attention`` & co.) on the local shards; ``axis`` must be bound by the enclosing map.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from attnjax import api as core_api
from attnjax import masks as masks_lib
from attnjax.parallel import all_gather as all_gather_lib
from attnjax.parallel import common
from attnjax.parallel import merge as merge_lib
from attnjax.parallel import plan as plan_lib
from attnjax.parallel import ring as ring_lib
from attnjax.parallel import ulysses as ulysses_lib

STRATEGIES = ("ring", "all_gather", "ulysses", "usp")


def _check_strategy(strategy, ulysses_axis):
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
  if strategy == "usp" and ulysses_axis is None:
    raise ValueError("strategy='usp' needs ulysses_axis= (the mesh axis for the head all-to-all; "
                     "axis= is the ring axis)")
  if strategy != "usp" and ulysses_axis is not None:
    raise ValueError(f"ulysses_axis= is only used by strategy='usp', got strategy={strategy!r}")


def _check_self_attention(q, k):
  if q.ndim == 4 and k.ndim == 4 and q.shape[1] != k.shape[1]:
    raise ValueError(f"context-parallel attention is self-attention over one sharded sequence: "
                     f"q and k must have the same sequence length, got {q.shape[1]} and "
                     f"{k.shape[1]}")


def local_attention(strategy, q, k, v, *, axis, ulysses_axis=None, mask=None, segment_ids=None,
                    sinks=None, scale=None, load_balance=None, positions=None, return_lse=False,
                    impl="auto", max_branches: int = 8):
  """Run ``strategy`` on local shards inside ``shard_map`` (see
  :func:`context_parallel_attention` for the arguments)."""
  _check_strategy(strategy, ulysses_axis)
  _check_self_attention(q, k)
  # Shapes, dtypes, sinks, segment ids and scale, validated per shard by the core.
  core_api.build_problem(q, k, v, sinks=sinks, segment_ids=segment_ids, scale=scale)
  if not isinstance(max_branches, int) or max_branches < 1:
    raise ValueError(f"max_branches must be a positive int, got {max_branches!r}")
  n = common.axis_size(axis)
  u = common.axis_size(ulysses_axis) if strategy == "usp" else 1
  B, L, Hq, _ = q.shape
  T = n * u * L
  layout = common.layout_positions(T, n, load_balance, positions)
  mask = masks_lib.as_mask(mask)
  mask.validate(T, T, Hq)  # against the global problem; local calls skip it
  call = common.LocalCall(plan_lib.global_mask(mask), scale, impl)
  if strategy == "ring":
    table = layout.reshape(n, L)
    o, lse = ring_lib.ring_core(q, k, v, segment_ids, segment_ids, axis=axis, q_table=table,
                                kv_table=table, call=call, max_branches=max_branches)
    if sinks is not None:
      o, lse = merge_lib.apply_sinks(o, lse, sinks)
    out = o.astype(q.dtype)
  elif strategy == "all_gather":
    out, lse = all_gather_lib.all_gather_core(q, k, v, segment_ids, sinks, axis=axis,
                                              layout=layout, call=call,
                                              max_branches=max_branches)
  elif strategy == "ulysses":
    out, lse = ulysses_lib.ulysses_core(q, k, v, segment_ids, sinks, axis=axis, layout=layout,
                                        call=call)
  else:
    out, lse = ulysses_lib.usp_core(q, k, v, segment_ids, sinks, ring_axis=axis,
                                    ulysses_axis=ulysses_axis, layout=layout, call=call,
                                    max_branches=max_branches)
  return (out, lse) if return_lse else out


def _axes_tuple(x):
  if x is None:
    return ()
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _axis_size(mesh, axes):
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def context_parallel_attention(q, k, v, *, mesh=None, axis="sp", strategy: str = "ring",
                               ulysses_axis=None, batch_axis=None, mask=None, segment_ids=None,
                               sinks=None, scale=None, load_balance=None, positions=None,
                               return_lse: bool = False, impl="auto", max_branches: int = 8):
  """Exact attention over a sequence sharded across devices (context parallelism).

  Args:
    q, k, v: ``[B, T, Hq, D]``, ``[B, T, Hkv, D]``, ``[B, T, Hkv, Dv]`` global arrays (with
      ``mesh``) or the local shards ``[B, T/n, ...]`` (without ``mesh``, inside ``shard_map``).
      The sequence is in the order of the layout (``load_balance``/``positions``).
    mesh: a :class:`jax.sharding.Mesh`; ``None`` means "already inside shard_map".
    axis: mesh axis the sequence is sharded over (for ``"usp"``: the ring axis).
    strategy: ``"ring"`` (K/V rotate with ``ppermute``), ``"all_gather"`` (K/V gathered),
      ``"ulysses"`` (all-to-all to head sharding) or ``"usp"`` (Ulysses over ``ulysses_axis``
      x ring over ``axis``; sequence sharded over ``(axis, ulysses_axis)``).
    ulysses_axis: the head all-to-all axis of ``"usp"``.
    batch_axis: mesh axis (or tuple) the batch dimension is sharded over (e.g. ``"data"``);
      ``None`` replicates the batch over the mesh axes not used for the sequence.
    mask: any static :mod:`attnjax.masks` mask (per-head masks included, at global query-head
      indices), evaluated at global token positions.
    segment_ids: ``[B, T]`` int segment ids (packed documents), in layout order.
    sinks: ``[Hq]`` float sink logits.
    scale: softmax scale, default ``1/sqrt(D)``.
    load_balance: ``None``, ``"zigzag"`` or ``"striped"``: the layout the sequence was permuted
      into (:func:`attnjax.parallel.load_balance_permutation` with ``num_shards`` = size of
      ``axis``; outputs come back in the same layout).
    positions: alternatively the static global positions ``[T]`` of the laid-out tokens.
    return_lse: also return the LSE ``[B, T, Hq]`` float32 (including the sink term).
    impl: backend of the per-device attention calls (see :func:`attnjax.attention`).
    max_branches: ring/all_gather/usp: how many distinct partial visibility patterns (over all
      devices and ring steps) get a branch with static positions (exact tile skipping by the
      backend) before all partial sub-problems share one traced-position branch.

  Returns ``out [B, T, Hq, Dv]`` (or the local shard) and optionally the LSE, equal to
  ``attnjax.attention(q, k, v, mask=..., q_positions=layout, kv_positions=layout, ...)``.

  Raises ValueError naming the constraint for unknown axes, sequence lengths not divisible by
  the axis size (``2 x`` for zigzag), heads not divisible for Ulysses, and malformed inputs.
  """
  _check_strategy(strategy, ulysses_axis)
  kw = dict(mask=mask, sinks=sinks, scale=scale, load_balance=load_balance,
            positions=positions, return_lse=return_lse, impl=impl, max_branches=max_branches)
  if mesh is None:
    return local_attention(strategy, q, k, v, axis=axis, ulysses_axis=ulysses_axis,
                           segment_ids=segment_ids, **kw)
  names = tuple(mesh.axis_names)
  seq_axes = (axis,) if strategy != "usp" else (axis, ulysses_axis)
  batch_axes = _axes_tuple(batch_axis)
  for role, a in [("axis", x) for x in seq_axes] + [("batch_axis", x) for x in batch_axes]:
    if a not in names:
      raise ValueError(f"{role} {a!r} is not an axis of the mesh (mesh axes: {names})")
  if len(set(seq_axes + batch_axes)) != len(seq_axes) + len(batch_axes):
    raise ValueError(f"the sequence axes {seq_axes} and batch axes {batch_axes} must be distinct")
  _check_self_attention(q, k)
  p = core_api.build_problem(q, k, v, mask=mask, sinks=sinks, segment_ids=segment_ids,
                             scale=scale)
  B, T, Hq = p.batch, p.q_len, p.num_q_heads
  n_seq = _axis_size(mesh, seq_axes)
  if T % n_seq:
    what = f"mesh axis {axis!r}" if len(seq_axes) == 1 else f"mesh axes {seq_axes}"
    raise ValueError(f"the sequence length ({T}) must be divisible by the size of {what} "
                     f"({n_seq})")
  n_batch = _axis_size(mesh, batch_axes)
  if B % n_batch:
    raise ValueError(f"the batch size ({B}) must be divisible by the size of batch_axis "
                     f"{batch_axis!r} ({n_batch})")
  common.layout_positions(T, mesh.shape[axis], load_balance, positions)  # validates the layout
  if strategy in ("ulysses", "usp"):
    ua = axis if strategy == "ulysses" else ulysses_axis
    ulysses_lib.check_heads(Hq, p.num_kv_heads, mesh.shape[ua], ua)

  bspec = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
  sspec = seq_axes if len(seq_axes) > 1 else seq_axes[0]
  x_spec, t_spec = P(bspec, sspec, None, None), P(bspec, sspec, None)
  args, specs = [q, k, v], [x_spec, x_spec, x_spec]
  if segment_ids is not None:
    args.append(segment_ids)
    specs.append(P(bspec, sspec))
  if sinks is not None:
    args.append(sinks)
    specs.append(P())
  explicit = any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
  if explicit:  # explicit-sharding meshes: shard_map requires inputs already in its specs
    args = [jax.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]

  def local(*xs):
    q_, k_, v_ = xs[:3]
    rest = list(xs[3:])
    seg = rest.pop(0) if segment_ids is not None else None
    snk = rest.pop(0) if sinks is not None else None
    return local_attention(strategy, q_, k_, v_, axis=axis, ulysses_axis=ulysses_axis,
                           segment_ids=seg, **dict(kw, sinks=snk))

  # check_vma=False: the Pallas backends' pallas_call outputs carry no varying-manual-axes
  # type, which the checker rejects. The strategies themselves run under check_vma=True
  # (inside a user's shard_map) with the xla and chunked backends (tests/parallel).
  fn = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs),
                     out_specs=(x_spec, t_spec) if return_lse else x_spec, check_vma=False)
  return fn(*args)
