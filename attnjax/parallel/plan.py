"""Static (trace-time) planning shared by the context-parallel strategies.

Inside ``shard_map`` every device runs the same program, but with a causal or local mask the
work differs per device (and, for the ring, per step): device ``r`` at ring step ``s`` multiplies
its queries (global positions ``qtab[r]``) with the keys of shard ``(r - s) mod n``. All
positions are known at trace time, so the visibility of each (device, step) sub-problem is
classified with numpy into

* ``empty``  -- no query sees any key: skipped (zeros, ``lse = -inf``);
* ``full``   -- every query sees every key: computed without evaluating the mask;
* ``static`` -- a partial pattern. Sub-problems whose *local* visibility matrices are identical
  (e.g. the diagonal blocks of a causal ring, or the two half-patterns of a zigzag ring, on every
  device and at every step) share one branch that calls :func:`attnjax.attention` with the
  concrete positions of one representative. This is exact -- without score mods the result
  depends on positions only through the visibility matrix -- and lets the backend skip empty
  tiles from a static block map;
* ``traced`` -- when more than ``max_branches`` distinct partial patterns occur (over all devices
  and steps), every partial sub-problem goes to one branch that passes its positions as traced
  arrays (exact, without tile skipping).

Visibility signatures are exact: per query row, the range of visible local key indices (masks
with an interval form and increasing key positions: ``O(L log L)``), else the dense boolean
pattern (``O(L^2)`` numpy, like the core's own block maps for such masks). The branch index of
every (step, device) is a static table looked up with ``lax.axis_index`` and dispatched with
``lax.switch``, so each device executes only its own branch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnjax import masks as masks_lib

EMPTY, FULL, STATIC, TRACED = "empty", "full", "static", "traced"

# Above this many mask entries per sub-problem the exact visibility signature is not computed
# (the sub-problem is only classified) unless the mask has an interval form.
DENSE_SIGNATURE_LIMIT = 1 << 24


@dataclasses.dataclass(frozen=True)
class GlobalPositionMask(masks_lib.Mask):
  """``inner`` evaluated at global token positions on a shard of the sequence.

  :func:`attnjax.attention` validates masks against the local ``(Tq, Tk)`` of the call, which
  rejects e.g. a neighborhood mask whose ``spatial_shape`` covers the whole sequence when the
  call holds one shard. The context-parallel entry points validate the mask once against the
  global problem and pass this wrapper, which has no local validation and otherwise behaves
  exactly like ``inner``."""
  inner: masks_lib.Mask

  def __post_init__(self):
    object.__setattr__(self, "per_head", self.inner.per_head)

  def _eval(self, xp, q, k, h):
    return self.inner._eval(xp, q, k, h)

  def _np_eval(self, q, k, h):
    return self.inner._np_eval(q, k, h)

  def _interval(self, q):
    return self.inner._interval(q)

  def _block_map(self, *args):
    return self.inner._block_map(*args)

  def validate(self, q_len, kv_len, num_heads):
    return None


@dataclasses.dataclass(frozen=True)
class HeadOffsetMask(masks_lib.Mask):
  """A per-head ``inner`` mask seen by a device that holds query heads ``offset ...`` (Ulysses):
  local head ``h`` is global head ``h + offset``."""
  inner: masks_lib.Mask
  offset: int

  per_head = True

  def _eval(self, xp, q, k, h):
    if h is None:
      raise ValueError("HeadOffsetMask needs a head index")
    return self.inner._eval(xp, q, k, h + self.offset)

  def _np_eval(self, q, k, h):
    return self.inner._np_eval(q, k, None if h is None else h + self.offset)

  def validate(self, q_len, kv_len, num_heads):
    return None


def global_mask(mask) -> masks_lib.Mask:
  mask = masks_lib.as_mask(mask)
  return mask if isinstance(mask, (GlobalPositionMask, masks_lib.Full)) else (
      GlobalPositionMask(mask))


@dataclasses.dataclass(frozen=True, eq=False)
class Branch:
  kind: str
  q_pos: np.ndarray | None = None   # representative positions (kind == STATIC)
  kv_pos: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """Branches shared by all steps, and ``index[s, r]``: the branch device ``r`` runs at step
  ``s`` (one step for all-gather; one per ring step for the ring)."""
  branches: tuple
  index: np.ndarray  # [num_steps, num_devices] int32

  @property
  def num_steps(self) -> int:
    return self.index.shape[0]

  def step(self, s: int) -> "Schedule":
    """The sub-schedule of step ``s`` alone (only the branches that step uses)."""
    used = sorted(set(self.index[s].tolist()))
    remap = {b: i for i, b in enumerate(used)}
    return Schedule(tuple(self.branches[b] for b in used),
                    np.asarray([[remap[b] for b in self.index[s]]], np.int32))

  def kinds(self):
    return [b.kind for b in self.branches]


def _interval_signature(mask, q_pos, kv_pos):
  if mask.per_head or kv_pos.size == 0 or np.any(np.diff(kv_pos) <= 0):
    return None
  try:
    iv = mask._interval(q_pos)
  except Exception:  # masks without a usable interval form
    iv = None
  if iv is None:
    return None
  lo, hi = (np.broadcast_to(np.asarray(x, np.int64), q_pos.shape) for x in iv)
  a = np.searchsorted(kv_pos, lo, side="left")
  b = np.searchsorted(kv_pos, hi, side="right")
  empty = b <= a
  a = np.where(empty, 0, a)
  b = np.where(empty, 0, b)
  if empty.all():
    return EMPTY, None
  if np.all((a == 0) & (b == kv_pos.size)):
    return FULL, None
  return STATIC, (b"iv", a.astype(np.int64).tobytes(), b.astype(np.int64).tobytes())


def classify(mask, q_pos, kv_pos, num_heads: int):
  """``(kind, signature)`` of the visibility of ``q_pos x kv_pos``; signature is None when the
  pattern is too big to compare exactly (then kind STATIC means 'partial, not groupable')."""
  q_pos = np.asarray(q_pos, np.int64)
  kv_pos = np.asarray(kv_pos, np.int64)
  if isinstance(mask, masks_lib.Full):
    return FULL, None
  inner = mask.inner if isinstance(mask, GlobalPositionMask) else mask
  got = _interval_signature(inner, q_pos, kv_pos)
  if got is not None:
    return got
  heads = num_heads if mask.per_head else None
  if q_pos.size * kv_pos.size * (heads or 1) <= DENSE_SIGNATURE_LIMIT:
    vis = mask.dense_np(q_pos, kv_pos, heads)
    if not vis.any():
      return EMPTY, None
    if vis.all():
      return FULL, None
    return STATIC, (b"dense", str(vis.shape).encode(), np.packbits(vis).tobytes())
  bm = masks_lib.block_map_from_positions(mask, q_pos, kv_pos, q_pos.size, kv_pos.size, heads)
  if np.all(bm == masks_lib.EMPTY):
    return EMPTY, None
  if np.all(bm == masks_lib.FULL):
    return FULL, None
  return STATIC, None


def schedule(mask, problems, num_heads: int, max_branches: int) -> Schedule:
  """Group sub-problems ``problems[s][r] = (q_pos, kv_pos)`` (step ``s``, device ``r``) into
  shared branches: one EMPTY, one FULL, one STATIC per distinct partial visibility pattern (at
  most ``max_branches``; beyond that, or when a pattern is too large to compare, every partial
  sub-problem goes to one TRACED branch)."""
  return _group(problems, *_classify_all(mask, problems, num_heads), max_branches)


def _classify_all(mask, problems, num_heads):
  S, n = len(problems), len(problems[0])
  kinds = np.empty((S, n), object)
  sigs = {}
  for s in range(S):
    for r in range(n):
      kinds[s, r], sigs[s, r] = classify(mask, problems[s][r][0], problems[s][r][1], num_heads)
  return kinds, sigs


def _group(problems, kinds, sigs, max_branches) -> Schedule:
  S, n = kinds.shape
  partial = [(s, r) for s in range(S) for r in range(n) if kinds[s, r] == STATIC]
  groups: dict[bytes, list] = {}
  for sr in partial:
    groups.setdefault(sigs[sr], []).append(sr)
  traced = bool(partial) and (None in groups or len(groups) > max(1, max_branches))
  branches: list[Branch] = []
  index = np.zeros((S, n), np.int32)
  for kind in (EMPTY, FULL):
    members = kinds == kind
    if members.any():
      index[members] = len(branches)
      branches.append(Branch(kind))
  if traced:
    for sr in partial:
      index[sr] = len(branches)
    branches.append(Branch(TRACED))
  else:
    for members in groups.values():
      s0, r0 = members[0]
      for sr in members:
        index[sr] = len(branches)
      branches.append(Branch(STATIC, np.asarray(problems[s0][r0][0], np.int64),
                             np.asarray(problems[s0][r0][1], np.int64)))
  return Schedule(tuple(branches), index)


def ring_schedule(mask, q_table, kv_table, num_heads: int, max_branches: int) -> Schedule:
  """The ring's schedule: device ``r`` holds key shard ``(r - s) mod n`` at step ``s``; steps
  after the last one in which any device has work are dropped."""
  n = q_table.shape[0]
  problems = [[(q_table[r], kv_table[(r - s) % n]) for r in range(n)] for s in range(n)]
  kinds, sigs = _classify_all(mask, problems, num_heads)
  busy = [s for s in range(n) if np.any(kinds[s] != EMPTY)]
  last = max(busy, default=0)
  return _group(problems[:last + 1], kinds[:last + 1], sigs, max_branches)


def is_permutation(positions) -> bool:
  positions = np.asarray(positions)
  return positions.ndim == 1 and np.array_equal(np.sort(positions), np.arange(positions.size))
