"""Causal load balancing for context parallelism: sequence layouts and the FLOP balance report.

With a causal mask and the sequence cut into ``n`` contiguous shards, shard ``r`` attends to
``r + 1/2`` shards' worth of keys, so the last shard works about twice as hard as the average
(max/mean ``(2n - 1) / n``). Two layouts fix this:

* ``"zigzag"`` (dual-chunk swap; the load balancing of Megatron-LM/TransformerEngine context
  parallelism, MaxText's ``DUAL_CHUNK_SWAP``): cut the sequence into ``2n`` chunks; shard ``r``
  holds chunks ``r`` and ``2n - 1 - r``. Needs ``seq_len % (2 * num_shards) == 0``.
* ``"striped"`` (Striped Attention, Brandon et al. 2023, "Striped Attention: Faster Ring Attention
  for Causal Transformers"): round-robin tokens; shard ``r`` holds tokens ``r, r + n, r + 2n,
  ...``. Needs ``seq_len % num_shards == 0``.

A *layout* is a permutation ``perm`` of ``range(seq_len)``: the token at index ``i`` of the
permuted sequence is the token at global position ``perm[i]`` of the original one
(``x_balanced = x[:, perm]``). The permutation is applied once, at data-loading time, to every
per-token array (tokens, targets, segment ids, loss masks) with :func:`permute_batch`;
``perm`` itself is the array of global positions to feed to position embeddings (RoPE). The
attention functions of :mod:`attnjax.parallel` take the layout (``load_balance=`` or
``positions=``) and evaluate masks at these global positions, so every mask stays exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from attnjax import masks as masks_lib

SCHEMES = ("contiguous", "zigzag", "striped")


def _check_pos_int(name, value, minimum=1):
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def load_balance_permutation(seq_len: int, num_shards: int, scheme: str | None = "zigzag"
                             ) -> np.ndarray:
  """The layout permutation ``perm`` (int64 ``[seq_len]``) for ``scheme``.

  ``x_balanced = x[:, perm]`` puts the tokens of shard ``r`` at indices
  ``r * seq_len / num_shards ... (r + 1) * seq_len / num_shards``, so sharding the sequence
  dimension contiguously over ``num_shards`` devices gives each device its balanced share.
  ``scheme`` is ``"zigzag"``, ``"striped"``, or ``"contiguous"``/``None`` (identity).
  """
  seq_len = _check_pos_int("seq_len", seq_len)
  n = _check_pos_int("num_shards", num_shards)
  scheme = "contiguous" if scheme is None else scheme
  if scheme not in SCHEMES:
    raise ValueError(f"unknown load-balancing scheme {scheme!r}; choose one of {SCHEMES} or None")
  if scheme == "zigzag":
    if seq_len % (2 * n):
      raise ValueError(f"zigzag load balancing needs the sequence length ({seq_len}) divisible by "
                       f"2 * num_shards = {2 * n} (each shard holds two chunks)")
    c = seq_len // (2 * n)
    chunks = np.arange(seq_len, dtype=np.int64).reshape(2 * n, c)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * n - 1 - r]])
                           for r in range(n)])
  if seq_len % n:
    raise ValueError(f"{scheme} layout needs the sequence length ({seq_len}) divisible by "
                     f"num_shards ({n})")
  if scheme == "striped":
    return np.arange(seq_len, dtype=np.int64).reshape(seq_len // n, n).T.reshape(-1)
  return np.arange(seq_len, dtype=np.int64)


def inverse_permutation(perm) -> np.ndarray:
  """``inv`` with ``x == x_balanced[:, inv]`` for ``x_balanced = x[:, perm]``."""
  perm = np.asarray(perm)
  if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(perm.size)):
    raise ValueError("inverse_permutation needs a permutation of range(n) (1-D)")
  inv = np.empty_like(perm)
  inv[perm] = np.arange(perm.size, dtype=perm.dtype)
  return inv


def permute_sequence(x, perm, axis: int = 1):
  """``x`` with its ``axis`` reordered by ``perm`` (numpy or jax arrays). A jax array typed
  with an explicit-axes sharding (``jax.make_mesh``'s default) keeps its sharding: the gather
  states it as its output sharding, which such meshes require."""
  perm = np.asarray(perm)
  if isinstance(x, np.ndarray):
    return x.take(perm, axis=axis)
  from attnjax.backends import base   # pylint: disable=import-outside-toplevel
  spec = base.explicit_spec(x)
  if spec is None:
    return _jnp().take(x, perm, axis=axis)
  index = [slice(None)] * x.ndim
  index[axis] = perm
  import jax   # pylint: disable=import-outside-toplevel
  return x.at[tuple(index)].get(out_sharding=jax.typeof(x).sharding)


def unpermute_sequence(x, perm, axis: int = 1):
  """Undo :func:`permute_sequence` (outputs of balanced attention back to natural order)."""
  return permute_sequence(x, inverse_permutation(perm), axis)


def _jnp():
  import jax.numpy as jnp
  return jnp


def permute_batch(batch: Any, perm, axis: int = 1, inverse: bool = False) -> Any:
  """Apply the layout ``perm`` to every array leaf of ``batch`` (a pytree, e.g. a dict of
  ``tokens``, ``targets``, ``segment_ids``) whose ``axis`` has length ``len(perm)``; other
  leaves pass through. Meant for the data-loading step (numpy arrays); ``inverse=True`` undoes
  it. Returns a new pytree of the same structure."""
  import jax

  perm = np.asarray(perm)
  idx = inverse_permutation(perm) if inverse else perm

  def one(x):
    if hasattr(x, "shape") and len(x.shape) > axis and x.shape[axis] == perm.size:
      return permute_sequence(x, idx, axis)
    return x

  return jax.tree.map(one, batch)


def shard_position_table(positions, num_shards: int) -> np.ndarray:
  """``[num_shards, seq_len / num_shards]`` global positions held by each shard."""
  positions = np.asarray(positions, np.int64)
  if positions.size % num_shards:
    raise ValueError(f"sequence length {positions.size} must be divisible by the number of "
                     f"shards {num_shards}")
  return positions.reshape(num_shards, -1)


# ----------------------------------------------------------------------------------- report
@dataclasses.dataclass(frozen=True)
class BalanceReport:
  """Per-shard attention FLOPs of one context-parallel configuration.

  ``per_shard``: ``[num_devices]`` FLOPs (``2 * (D + Dv) * heads * batch`` per computed
  query-key pair: one multiply-add for ``q.k`` and one for ``p.v``). ``per_step`` (ring and usp
  only): ``[num_steps, num_devices]``; ring steps run in lock-step, so ``critical_path`` is
  ``sum_s max_r per_step[s, r]`` (for other strategies ``max(per_shard)``). ``total`` sums all
  devices; ``max_over_mean`` is ``max(per_shard) / mean(per_shard)``.
  """
  strategy: str
  scheme: str
  num_devices: int
  per_shard: np.ndarray
  per_step: np.ndarray | None
  total: float
  max_over_mean: float
  critical_path: float
  granularity: str

  def summary(self) -> str:
    rows = [f"strategy={self.strategy} scheme={self.scheme} devices={self.num_devices} "
            f"granularity={self.granularity}",
            "  per-shard GFLOP: " + " ".join(f"{x / 1e9:.4g}" for x in self.per_shard),
            f"  max/mean={self.max_over_mean:.3f}  critical path / ideal="
            f"{self.critical_path / (self.total / self.num_devices):.3f}"]
    return "\n".join(rows)


def _pair_work(mask, qpos, kvpos, block, num_heads):
  """Number of query-key pairs computed for one (query shard, key shard) pair."""
  vis = mask.dense_np(qpos, kvpos, num_heads if mask.per_head else None)
  if vis.ndim == 2:
    vis = vis[None]
  if block is None:
    return float(vis.sum()) / vis.shape[0]  # per head, averaged over per-head masks
  bq, bk = block
  h, lq, lk = vis.shape
  nq, nk = -(-lq // bq), -(-lk // bk)
  pad = np.zeros((h, nq * bq, nk * bk), bool)
  pad[:, :lq, :lk] = vis
  tiles = pad.reshape(h, nq, bq, nk, bk).any(axis=(2, 4))
  return float(tiles.sum()) * bq * bk / h


def flop_balance_report(seq_len: int, num_shards: int, mask=None, *, strategy: str = "ring",
                        scheme: str | None = None, positions=None, num_heads: int = 1,
                        head_dim: int = 128, head_dim_v: int | None = None, batch: int = 1,
                        ulysses_shards: int = 1, block: tuple[int, int] | None = None
                        ) -> BalanceReport:
  """Per-device attention FLOPs for ``mask`` under a strategy and a layout.

  ``strategy``: ``"ring"`` and ``"all_gather"`` (device ``r`` computes its own query shard
  against every key; ring also splits the work into lock-step steps where device ``r`` sees the
  keys of shard ``(r - s) mod n`` at step ``s``), ``"ulysses"`` (every device computes all
  queries for ``num_heads / n`` heads: balanced by construction), ``"usp"`` (``num_shards`` ring
  shards, each split over ``ulysses_shards`` head groups; devices ordered ring-major).
  ``scheme``/``positions`` give the layout (see :func:`load_balance_permutation`);
  ``positions`` overrides ``scheme``. ``block=None`` counts visible query-key pairs (an ideal
  kernel); ``block=(bq, bk)`` counts whole ``bq x bk`` tiles holding any visible pair in each
  device's local index order (a tile kernel with static block skipping). Masks are evaluated
  densely with numpy: meant for analysis sizes, not 1M-token sequences.
  """
  if strategy not in ("ring", "all_gather", "ulysses", "usp"):
    raise ValueError(f"unknown strategy {strategy!r}; choose ring, all_gather, ulysses or usp")
  mask = masks_lib.as_mask(mask)
  n = _check_pos_int("num_shards", num_shards)
  u = _check_pos_int("ulysses_shards", ulysses_shards)
  dv = head_dim if head_dim_v is None else head_dim_v
  per_pair = 2.0 * (head_dim + dv) * num_heads * batch
  if positions is None:
    positions = load_balance_permutation(seq_len, n, scheme)
    scheme_name = scheme or "contiguous"
  else:
    positions = np.asarray(positions, np.int64)
    if positions.shape != (seq_len,):
      raise ValueError(f"positions must have shape [seq_len] = [{seq_len}], got "
                       f"{list(positions.shape)}")
    scheme_name = "custom"
  granularity = "token" if block is None else f"tile {block[0]}x{block[1]}"
  if strategy == "ulysses":
    if num_heads % n:
      raise ValueError(f"ulysses needs num_heads ({num_heads}) divisible by num_shards ({n})")
    order = np.sort(positions)  # ulysses restores the natural order before local attention
    total = _pair_work(mask, order, order, block, num_heads) * per_pair
    per = np.full(n, total / n)
    return BalanceReport(strategy, scheme_name, n, per, None, float(total), 1.0,
                         float(per.max()), granularity)
  table = shard_position_table(positions, n)
  if strategy == "all_gather":
    kv_order = np.sort(positions)  # all_gather restores the natural key order
    per = np.array([_pair_work(mask, table[r], kv_order, block, num_heads) for r in range(n)])
    per = per * per_pair
    return BalanceReport(strategy, scheme_name, n, per, None, float(per.sum()),
                         float(per.max() / per.mean()), float(per.max()), granularity)
  if strategy == "usp" and num_heads % u:
    raise ValueError(f"usp needs num_heads ({num_heads}) divisible by ulysses_shards ({u})")
  steps = np.zeros((n, n))
  for s in range(n):
    for r in range(n):
      steps[s, r] = _pair_work(mask, table[r], table[(r - s) % n], block, num_heads)
  steps = steps * per_pair / u
  if u > 1:
    steps = np.repeat(steps, u, axis=1)  # devices (ring rank, ulysses rank), ring-major
  per = steps.sum(axis=0)
  return BalanceReport(strategy, scheme_name, n * u, per, steps, float(per.sum()),
                       float(per.max() / per.mean()), float(steps.max(axis=1).sum()),
                       granularity)
