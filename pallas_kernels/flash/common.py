"""Block-sparsity tables shared by the TPU and GPU flash kernels.

A block map ``int8[..., nq, nk]`` (0 = empty, 1 = partial, 2 = full; the format of
``attnjax.masks.Mask.block_map``) becomes two :class:`BlockTables`:

* forward / dq tables, rows = query blocks: for query block ``i`` the ascending indices of its
  non-empty key blocks;
* dkv tables, rows = key blocks: for key block ``j`` the ascending indices of the query blocks
  that see it.

Every table array is rank 4, ``[Bt, Ht, n_rows, K]`` (``counts`` is ``[Bt, Ht, n_rows]``) with
``Bt`` in ``{1, batch}`` and ``Ht`` in ``{1, num_q_heads}``: a static mask gives ``Bt = 1`` and
``Ht = 1`` (or ``num_q_heads`` for per-head masks); data-dependent sparsity (NSA, MoBA, top-k
block selection) gives per-example, per-head tables built at run time with
:func:`tables_from_lists`. Slots past ``counts`` repeat the row's last valid index (0 for an
empty row), so a pipelined kernel that clamps its slot index never fetches a new block for a
padded slot. ``full[..., s] = 1`` marks a block whose every entry is visible: the kernel may skip
mask evaluation there (segment ids and padding are still applied).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


class BlockTables(NamedTuple):
  """Per-row lists of blocks to visit. ``blocks``/``full``: int32 ``[Bt, Ht, n_rows, K]``;
  ``counts``: int32 ``[Bt, Ht, n_rows]``."""
  blocks: jax.Array | np.ndarray
  counts: jax.Array | np.ndarray
  full: jax.Array | np.ndarray

  @property
  def max_count(self) -> int:
    return int(self.blocks.shape[-1])


def _as_rank4(bm: np.ndarray) -> np.ndarray:
  bm = np.asarray(bm)
  if bm.ndim == 2:
    return bm[None, None]
  if bm.ndim == 3:
    return bm[None]
  if bm.ndim == 4:
    return bm
  raise ValueError(f"block map must have rank 2, 3 or 4 ([Bt, Ht,] nq, nk), got shape {bm.shape}")


def _rows_to_tables(bm: np.ndarray) -> BlockTables:
  """Numpy: rows of ``bm [Bt, Ht, R, C]`` to ascending lists of non-empty columns."""
  nonempty = bm != EMPTY
  counts = nonempty.sum(-1).astype(np.int32)
  K = max(1, int(counts.max(initial=0)))
  # Stable sort puts non-empty columns first, in ascending order.
  order = np.argsort(~nonempty, axis=-1, kind="stable")[..., :K].astype(np.int32)
  slot = np.arange(K)
  last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
  last = np.where(counts[..., None] > 0, last, 0)
  blocks = np.where(slot < counts[..., None], order, last).astype(np.int32)
  full = np.take_along_axis(bm, blocks, axis=-1) == FULL
  full = (full & (slot < counts[..., None])).astype(np.int32)
  return BlockTables(blocks, counts, full)


def tables_from_block_map(block_map) -> tuple[BlockTables, BlockTables]:
  """``(forward/dq tables, dkv tables)`` from a numpy block map ``[..., nq, nk]``."""
  bm = _as_rank4(block_map).astype(np.int8)
  fwd = _rows_to_tables(bm)
  bwd = _rows_to_tables(np.swapaxes(bm, -1, -2))
  return fwd, bwd


def block_map_from_lists(kv_blocks, kv_counts, num_kv_blocks: int) -> jax.Array:
  """Runtime (jnp) inverse of the forward tables: a PARTIAL/EMPTY block map
  ``int8[Bt, Ht, nq, nk]`` from per-row kv-block lists ``[Bt, Ht, nq, K]`` and counts
  ``[Bt, Ht, nq]``. Duplicate and out-of-count entries are ignored; an out-of-range id
  selects nothing (:func:`tables_from_lists` checks concrete lists)."""
  kv_blocks = jnp.asarray(kv_blocks, jnp.int32)
  kv_counts = jnp.asarray(kv_counts, jnp.int32)
  K = kv_blocks.shape[-1]
  valid = jnp.arange(K, dtype=jnp.int32) < kv_counts[..., None]
  onehot = (kv_blocks[..., None] == jnp.arange(num_kv_blocks, dtype=jnp.int32)) & valid[..., None]
  return jnp.where(onehot.any(-2), PARTIAL, EMPTY).astype(jnp.int8)


def _rows_to_tables_jnp(bm: jax.Array, K: int) -> BlockTables:
  nonempty = bm != EMPTY
  counts = nonempty.sum(-1).astype(jnp.int32)
  order = jnp.argsort(~nonempty, axis=-1, stable=True)[..., :K].astype(jnp.int32)
  slot = jnp.arange(K, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  blocks = jnp.where(slot < counts[..., None], order, last)
  full = jnp.take_along_axis(bm, blocks, axis=-1) == FULL
  full = (full & (slot < counts[..., None])).astype(jnp.int32)
  return BlockTables(blocks, counts, full)


def _check_list_ids(kv_blocks, kv_counts, num_kv_blocks: int):
  """Raise on a listed (in-count) key-block id outside ``[0, num_kv_blocks)``; traced: skip."""
  try:
    blocks, counts = np.asarray(kv_blocks), np.asarray(kv_counts)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  listed = np.arange(blocks.shape[-1]) < counts[..., None]
  bad = listed & ((blocks < 0) | (blocks >= num_kv_blocks))
  if bad.any():
    b, h, i, slot = (int(x) for x in np.argwhere(bad)[0])
    raise ValueError(
        f"kv_blocks[{b}, {h}, {i}, {slot}] = {int(blocks[b, h, i, slot])} (example {b}, head "
        f"{h}, query block {i}, slot {slot}) is not a key block id: ids must lie in "
        f"[0, num_kv_blocks={num_kv_blocks}); {int(bad.sum())} listed id(s) are out of range")


def tables_from_lists(kv_blocks, kv_counts, num_kv_blocks: int) -> tuple[BlockTables,
                                                                           BlockTables]:
  """Runtime block sparsity: normalized ``(forward/dq, dkv)`` tables from user lists.

  ``kv_blocks`` int ``[Bt, Ht, nq, K]`` lists, for each query block, the key blocks to visit
  (any order, duplicates allowed; entries at or past ``kv_counts`` are ignored); every visited
  block is treated as PARTIAL (the mask is still evaluated). Works under ``jit``: the dense
  ``[nq, nk]`` map per (example, head) is tiny compared with the attention itself.

  Every listed id (before ``kv_counts``) must lie in ``[0, num_kv_blocks)``. Concrete lists
  (numpy, or jnp outside ``jit``) are checked: an id out of range raises ``ValueError`` naming
  the row ``(b, h, query block)``, the slot and the id (an off-by-one in a top-k / NSA selection
  would otherwise lose blocks silently). Traced lists cannot be checked; an out-of-range id
  there selects no block (it is dropped).
  """
  kv_blocks = jnp.asarray(kv_blocks)
  if kv_blocks.ndim != 4:
    raise ValueError(f"kv_blocks must be [Bt, Ht, num_q_blocks, K], got shape {kv_blocks.shape}")
  kv_counts = jnp.asarray(kv_counts)
  if kv_counts.shape != kv_blocks.shape[:3]:
    raise ValueError(f"kv_counts must have shape {kv_blocks.shape[:3]} (kv_blocks' leading "
                     f"dims), got {kv_counts.shape}")
  _check_list_ids(kv_blocks, kv_counts, num_kv_blocks)
  bm = block_map_from_lists(kv_blocks, kv_counts, num_kv_blocks)
  nq = bm.shape[-2]
  fwd = _rows_to_tables_jnp(bm, min(kv_blocks.shape[-1], num_kv_blocks))
  bwd = _rows_to_tables_jnp(jnp.swapaxes(bm, -1, -2), nq)
  return fwd, bwd


def tables_from_block_map_jnp(block_map, max_kv: int | None = None,
                              max_q: int | None = None) -> tuple[BlockTables, BlockTables]:
  """Run-time twin of :func:`tables_from_block_map` for a traced block map
  ``int8[Bt, Ht, nq, nk]`` (e.g. a static map intersected with per-example segment-id overlap).
  ``max_kv``/``max_q`` bound the list lengths (static; default all blocks)."""
  bm = jnp.asarray(block_map)
  if bm.ndim != 4:
    raise ValueError(f"block_map must be [Bt, Ht, nq, nk], got shape {bm.shape}")
  nq, nk = bm.shape[-2:]
  fwd = _rows_to_tables_jnp(bm, max(1, min(max_kv or nk, nk)))
  bwd = _rows_to_tables_jnp(jnp.swapaxes(bm, -1, -2), max(1, min(max_q or nq, nq)))
  return fwd, bwd


def num_visited(tables: BlockTables) -> int:
  """Total number of (row, column) blocks a kernel driven by ``tables`` visits, per the first
  example and head broadcast over ``Bt * Ht``."""
  return int(np.asarray(tables.counts).sum())


class ParamSpec(NamedTuple):
  """Which axes of a score-mod parameter array follow the problem's axes, so a kernel can cut
  the parameter to the current tile.

  ``batch_axis`` (size 1 or batch) and ``head_axis`` (size 1 or the number of *query* heads) are
  cut to size 1 at the current batch / global query head (a size-1 axis is broadcast);
  ``q_axis`` (size ``Tq``) is cut to the ``block_q`` query rows of the tile and ``kv_axis``
  (size ``Tk``) to the ``block_kv`` key rows; every other axis is passed whole. The tile keeps
  the parameter's rank and axis order. ``None`` means the parameter has no such axis.
  """
  batch_axis: int | None = None
  head_axis: int | None = None
  q_axis: int | None = None
  kv_axis: int | None = None
