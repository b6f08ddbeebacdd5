"""Mask algebra: block maps, mask_mod consistency, strided heads, bad input, hashing.

Every mask built here comes with an independent numpy reference written from the documented
semantics (DESIGN.md "Conventions"/"Masks" and the docstrings of attnjax.masks), so block maps and
the two mask views are checked against something that does not share code with the library.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnjax import masks
from attnjax.masks import EMPTY, FULL, PARTIAL


def _load_ref_neighborhood():
  """The independent NATTEN reference lives in test_neighborhood_mask.py next to this file; load
  it by path so this works under any pytest import mode."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).with_name("test_neighborhood_mask.py")
  spec = importlib.util.spec_from_file_location("_attnjax_na_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.ref_neighborhood


ref_neighborhood = _load_ref_neighborhood()

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----------------------------------------------------------------------------------------------
# Masks paired with reference evaluators
# ----------------------------------------------------------------------------------------------
# A reference is ref(q, k, h) -> bool array, with q: [..., Tq, 1], k: [..., 1, Tk] int64 positions
# and h: [H, 1, 1] head indices (or None for masks that do not depend on the head).


class Case(NamedTuple):
  mask: masks.Mask
  ref: Callable
  per_head: bool
  na_tokens: int  # smallest neighborhood token count in the tree (0 if none)
  desc: str


# Fixed user functions (from_function compares by function identity).
def _fn_mod3(q, k):
  return (q + 2 * k) % 3 != 0


def _fn_diff(q, k):
  return jnp.abs(q - k) % 4 < 2


def _fn_head(h, q, k):
  return (k + h) % 2 == 0


def _ref_na(shape, ks, ds, ss, cs):
  table = ref_neighborhood(shape, ks, ds, ss, cs)
  t = table.shape[0]

  def ref(q, k, h):
    q, k = np.broadcast_arrays(q, k)
    inside = (q >= 0) & (q < t) & (k >= 0) & (k < t)
    return inside & table[np.clip(q, 0, t - 1), np.clip(k, 0, t - 1)]

  return ref


def _ref_dense(arr):
  tq, tk = arr.shape

  def ref(q, k, h):
    q, k = np.broadcast_arrays(q, k)
    row = q - (tk - tq)  # bottom-right aligned: query row i sits at position tk - tq + i
    inside = (row >= 0) & (row < tq) & (k >= 0) & (k < tk)
    return inside & arr[np.clip(row, 0, tq - 1), np.clip(k, 0, tk - 1)]

  return ref


def _ref_strided(stride, lw, block, offset):
  def ref(q, k, h):
    assert h is not None
    return (((k // block) + offset) % stride == h % stride) | (np.abs(q - k) <= lw)

  return ref


# --- Case constructors: a mask plus its reference, built from the documented semantics -------


def c_full():
  return Case(masks.full(), lambda q, k, h: np.ones(np.broadcast_shapes(q.shape, k.shape), bool),
              False, 0, "full()")


def c_causal(off=0):
  return Case(masks.causal(off), lambda q, k, h: k <= q + off, False, 0, f"causal({off})")


def c_sliding(left, right=0):
  return Case(masks.sliding_window(left, right),
              lambda q, k, h: (q - left <= k) & (k <= q + right), False, 0,
              f"sliding_window({left}, {right})")


def c_chunked(size):
  return Case(masks.chunked(size), lambda q, k, h: q // size == k // size, False, 0,
              f"chunked({size})")


def c_block_causal(b):
  return Case(masks.block_causal(b), lambda q, k, h: k // b <= q // b, False, 0,
              f"block_causal({b})")


def c_prefix(p):
  return Case(masks.prefix_lm(p), lambda q, k, h: (k < p) | (k <= q), False, 0, f"prefix_lm({p})")


def c_na(shape, ks, ds=None, ss=None, cs=None):
  nd = len(shape)
  args = (tuple(shape), tuple(ks), tuple(ds or (1,) * nd), tuple(ss or (1,) * nd),
          tuple(cs or (False,) * nd))
  return Case(masks.neighborhood(*args), _ref_na(*args), False, math.prod(shape),
              f"neighborhood{args}")


_FNS = {
    "_fn_mod3": (_fn_mod3, lambda q, k, h: (q + 2 * k) % 3 != 0),
    "_fn_diff": (_fn_diff, lambda q, k, h: np.abs(q - k) % 4 < 2),
}


def c_fn(name):
  fn, ref = _FNS[name]
  return Case(masks.from_function(fn), ref, False, 0, f"from_function({name})")


def c_dense(tq, tk, seed):
  arr = np.random.default_rng(seed).random((tq, tk)) < 0.5
  return Case(masks.dense(arr), _ref_dense(arr), False, 0, f"dense(shape={arr.shape}, seed={seed})")


def c_strided(stride, lw=0, block=1, offset=0):
  return Case(masks.strided_heads(stride, lw, block=block, offset=offset),
              _ref_strided(stride, lw, block, offset), True, 0,
              f"strided_heads({stride}, {lw}, block={block}, offset={offset})")


def c_fn_head():
  return Case(masks.from_function(_fn_head, per_head=True), lambda q, k, h: (k + h) % 2 == 0,
              True, 0, "from_function(_fn_head, per_head=True)")


def _min_na(*cases):
  return min([c.na_tokens for c in cases if c.na_tokens], default=0)


def c_per_head(children):
  children = list(children)

  def ref(q, k, h):
    assert h is not None
    shape = np.broadcast_shapes(q.shape, k.shape, h.shape)
    outs = [np.broadcast_to(c.ref(q, k, h), shape) for c in children]
    # head h uses children[h] (mask_mod with a head past the end falls back to the last mask)
    return np.choose(np.broadcast_to(np.minimum(h, len(children) - 1), shape), outs)

  return Case(masks.per_head([c.mask for c in children]), ref, True, _min_na(*children),
              f"per_head([{', '.join(c.desc for c in children)}])")


def c_and(a, b):
  return Case(a.mask & b.mask, lambda q, k, h: a.ref(q, k, h) & b.ref(q, k, h),
              a.per_head or b.per_head, _min_na(a, b), f"({a.desc} & {b.desc})")


def c_or(a, b):
  return Case(a.mask | b.mask, lambda q, k, h: a.ref(q, k, h) | b.ref(q, k, h),
              a.per_head or b.per_head, _min_na(a, b), f"({a.desc} | {b.desc})")


def c_not(a):
  return Case(~a.mask, lambda q, k, h: ~a.ref(q, k, h), a.per_head, a.na_tokens, f"~({a.desc})")


# --- Hypothesis strategies -------------------------------------------------------------------


def _leaf(draw, H: int, allow_per_head: bool, allow_stack: bool = True) -> Case:
  # from_function leaves are drawn less often: evaluating them compiles for every new shape.
  kinds = ["full", "causal", "sliding", "chunked", "block_causal", "prefix", "na", "dense"] * 2
  kinds += ["fn"]
  if allow_per_head:
    kinds += ["strided"] * 2 + ["fn_head"] + (["per_head"] * 4 if allow_stack else [])
  kind = draw(st.sampled_from(kinds))
  ints = lambda lo, hi: draw(st.integers(lo, hi))  # noqa: E731
  if kind == "full":
    return c_full()
  if kind == "causal":
    return c_causal(ints(-6, 6))
  if kind == "sliding":
    return c_sliding(ints(0, 7), ints(0, 7))
  if kind == "chunked":
    return c_chunked(ints(1, 8))
  if kind == "block_causal":
    return c_block_causal(ints(1, 8))
  if kind == "prefix":
    return c_prefix(ints(0, 12))
  if kind == "na":
    nd = ints(1, 2)
    shape, ks, ds, ss, cs = [], [], [], [], []
    for _ in range(nd):
      L = ints(3, 24) if nd == 1 else ints(3, 6)
      d = ints(1, 2) if L >= 4 else 1
      k = ints(1, L // d)
      shape.append(L), ks.append(k), ds.append(d), ss.append(ints(1, k))
      cs.append(draw(st.booleans()))
    return c_na(shape, ks, ds, ss, cs)
  if kind == "fn":
    return c_fn(draw(st.sampled_from(sorted(_FNS))))
  if kind == "dense":
    return c_dense(ints(1, 12), ints(1, 12), ints(0, 2**16))
  if kind == "strided":
    return c_strided(ints(1, 4), ints(0, 3), ints(1, 3), ints(-3, 3))
  if kind == "fn_head":
    return c_fn_head()
  # per_head: one mask per head (children may themselves be per-head, but not stacks).
  return c_per_head([_leaf(draw, H, allow_per_head=True, allow_stack=False) if draw(st.booleans())
                     else _tree(draw, H, depth=1, allow_per_head=True, allow_stack=False)
                     for _ in range(H)])


def _tree(draw, H: int, depth: int, allow_per_head: bool = True, allow_stack: bool = True) -> Case:
  if depth == 0 or draw(st.integers(0, 3)) == 0:
    return _leaf(draw, H, allow_per_head, allow_stack)
  op = draw(st.sampled_from(["&", "|", "~"]))
  a = _tree(draw, H, depth - 1, allow_per_head, allow_stack)
  if op == "~":
    return c_not(a)
  b = _tree(draw, H, depth - 1, allow_per_head, allow_stack)
  return c_and(a, b) if op == "&" else c_or(a, b)


@st.composite
def mask_cases(draw, max_depth=3):
  H = draw(st.integers(1, 4))
  case = _tree(draw, H, draw(st.integers(0, max_depth)))
  return H, case


# ----------------------------------------------------------------------------------------------
# Brute-force block classification
# ----------------------------------------------------------------------------------------------


def ref_dense(case: Case, q_pos, kv_pos, H):
  q = np.asarray(q_pos, np.int64)[:, None]
  k = np.asarray(kv_pos, np.int64)[None, :]
  if case.per_head or H is not None:
    h = np.arange(H if H is not None else 1)[:, None, None]
    out = case.ref(q[None], k[None], h)
    return np.broadcast_to(out, (h.shape[0], q.shape[0], k.shape[1])).astype(bool)
  return np.broadcast_to(case.ref(q, k, None), (q.shape[0], k.shape[1])).astype(bool)


def brute_block_map(vis: np.ndarray, bq: int, bk: int) -> np.ndarray:
  """vis: [..., Tq, Tk]. Blocks past Tq/Tk are padding (masked); a block holding padding is never
  FULL; a block is EMPTY iff none of its entries is visible."""
  tq, tk = vis.shape[-2:]
  nq, nk = max(1, -(-tq // bq)), max(1, -(-tk // bk))
  lead = vis.shape[:-2]
  padded = np.zeros(lead + (nq * bq, nk * bk), bool)
  padded[..., :tq, :tk] = vis
  blocks = padded.reshape(lead + (nq, bq, nk, bk))
  any_vis = blocks.any(axis=(-3, -1))
  all_vis = blocks.all(axis=(-3, -1))  # padding is False, so ragged blocks are never all-visible
  return np.where(all_vis, FULL, np.where(any_vis, PARTIAL, EMPTY)).astype(np.int8)


def test_brute_block_map_itself():
  vis = np.tril(np.ones((5, 6), bool), 1)
  #      k: 0 1 2 3 4 5     blocks (2, 4): rows {0,1},{2,3},{4}; cols {0..3},{4,5}
  np.testing.assert_array_equal(brute_block_map(vis, 2, 4),
                                [[PARTIAL, EMPTY], [FULL, PARTIAL], [PARTIAL, PARTIAL]])
  np.testing.assert_array_equal(brute_block_map(np.ones((4, 4), bool), 2, 2), np.full((2, 2), FULL))
  np.testing.assert_array_equal(brute_block_map(np.ones((0, 3), bool), 2, 2), [[EMPTY, EMPTY]])


def _assert_map(got, expected, what):
  if got.shape != expected.shape or not np.array_equal(got, expected):
    diff = (np.argwhere(got != expected)[:5].tolist() if got.shape == expected.shape else None)
    pytest.fail(f"{what}\nshape got {got.shape} expected {expected.shape}; first mismatches "
                f"{diff}\ngot=\n{got}\nexpected=\n{expected}")


# ----------------------------------------------------------------------------------------------
# Block maps vs brute force
# ----------------------------------------------------------------------------------------------


def _lengths(data, case, max_len, min_q=0):
  """Draw (q_len, kv_len). With a neighborhood in the tree, stay on its token grid: positions
  off the grid are covered by the dedicated tests below."""
  top = min(max_len, case.na_tokens) if case.na_tokens else max_len
  return (data.draw(st.integers(min_q, top), "q_len"), data.draw(st.integers(1, top), "kv_len"))


def check_block_map(case, H, q_len, kv_len, bq, bk, nh, **kwargs):
  q_off = kwargs.get("q_offset", kv_len - q_len)
  kv_off = kwargs.get("kv_offset", 0)
  q_pos = q_off + np.arange(q_len)
  kv_pos = kv_off + np.arange(kv_len)
  vis = ref_dense(case, q_pos, kv_pos, nh)
  got = case.mask.block_map(q_len, kv_len, bq, bk, num_heads=nh, **kwargs)
  assert got.dtype == np.int8
  what = (f"{case.desc}: block_map(q_len={q_len}, kv_len={kv_len}, block_q={bq}, block_kv={bk}, "
          f"num_heads={nh}, {kwargs})")
  _assert_map(np.asarray(got), brute_block_map(vis, bq, bk), what)
  # Cached: a second call gives the same map.
  np.testing.assert_array_equal(case.mask.block_map(q_len, kv_len, bq, bk, num_heads=nh, **kwargs),
                                got)
  # dense_np agrees with the reference on the same positions.
  dn = case.mask.dense_np(q_pos, kv_pos, num_heads=nh)
  np.testing.assert_array_equal(dn, vis, err_msg=f"dense_np of {case.desc} on q_pos={q_pos}, "
                                f"kv_pos={kv_pos}")


@SETTINGS
@given(mask_cases(), st.data())
def test_block_map_matches_brute_force(hc, data):
  H, case = hc
  q_len, kv_len = _lengths(data, case, 40)
  bq = data.draw(st.integers(1, 9), "bq")
  bk = data.draw(st.integers(1, 9), "bk")
  kwargs = {}
  if data.draw(st.booleans(), "explicit offsets"):
    if case.na_tokens:
      kwargs = dict(q_offset=data.draw(st.integers(0, case.na_tokens - q_len), "q_offset"),
                    kv_offset=data.draw(st.integers(0, case.na_tokens - kv_len), "kv_offset"))
    else:
      kwargs = dict(q_offset=data.draw(st.integers(-10, 40), "q_offset"),
                    kv_offset=data.draw(st.integers(-10, 10), "kv_offset"))
  nh = H if (case.per_head or data.draw(st.booleans(), "num_heads")) else None
  check_block_map(case, H, q_len, kv_len, bq, bk, nh, **kwargs)


@SETTINGS
@given(mask_cases(), st.data())
def test_block_map_from_positions_permuted(hc, data):
  H, case = hc
  q_len, kv_len = _lengths(data, case, 32, min_q=1)
  bq = data.draw(st.integers(1, 8), "bq")
  bk = data.draw(st.integers(1, 8), "bk")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "seed"))
  if case.na_tokens:
    q_shift = data.draw(st.integers(0, case.na_tokens - q_len), "q_shift")
    kv_shift = data.draw(st.integers(0, case.na_tokens - kv_len), "kv_shift")
  else:
    q_shift, kv_shift = data.draw(st.integers(-4, 8), "q_shift"), data.draw(st.integers(-4, 4))
  q_pos = rng.permutation(q_len) + q_shift
  kv_pos = rng.permutation(kv_len) + kv_shift
  nh = H if (case.per_head or data.draw(st.booleans(), "num_heads")) else None
  vis = ref_dense(case, q_pos, kv_pos, nh)
  got = masks.block_map_from_positions(case.mask, q_pos, kv_pos, bq, bk, num_heads=nh)
  what = (f"{case.desc}: block_map_from_positions(q_pos={q_pos.tolist()}, "
          f"kv_pos={kv_pos.tolist()}, {bq}, {bk}, num_heads={nh})")
  _assert_map(np.asarray(got), brute_block_map(vis, bq, bk), what)


def _derived_map(case_mask, child_maps, q_len, kv_len, bq, bk):
  """The tightest map derivable from the children's exact maps (the documented fallback)."""
  if isinstance(case_mask, masks.Not):
    (m,) = child_maps
    whole = brute_block_map(np.ones((q_len, kv_len), bool), bq, bk)  # FULL/PARTIAL/EMPTY by padding
    return np.where(m == FULL, EMPTY, np.where(m == EMPTY, whole, PARTIAL)).astype(np.int8)
  a, b = child_maps
  if isinstance(case_mask, masks.And):
    return np.where((a == EMPTY) | (b == EMPTY), EMPTY,
                    np.where((a == FULL) & (b == FULL), FULL, PARTIAL)).astype(np.int8)
  return np.where((a == FULL) | (b == FULL), FULL,
                  np.where((a == EMPTY) & (b == EMPTY), EMPTY, PARTIAL)).astype(np.int8)


def check_conservative_map(case, H, q_len, kv_len, bq, bk, children=None):
  nh = H if case.per_head else None
  vis = ref_dense(case, (kv_len - q_len) + np.arange(q_len), np.arange(kv_len), nh)
  exact = brute_block_map(vis, bq, bk)
  old = masks._EXACT_EVAL_LIMIT
  masks._cached_block_map.cache_clear()
  try:
    masks._EXACT_EVAL_LIMIT = 0
    got = np.asarray(case.mask.block_map(q_len, kv_len, bq, bk, num_heads=nh))
  finally:
    masks._EXACT_EVAL_LIMIT = old
    masks._cached_block_map.cache_clear()
  what = f"{case.desc}: q_len={q_len} kv_len={kv_len} blocks=({bq}, {bk}), derived map"
  assert got.shape == exact.shape, what
  assert not ((got == EMPTY) & (exact != EMPTY)).any(), f"{what}: EMPTY block has visible keys"
  assert not ((got == FULL) & (exact != FULL)).any(), f"{what}: FULL block is not full"
  if not any(op in case.desc for op in "&|~"):  # no combinator anywhere: stays exact
    np.testing.assert_array_equal(got, exact, err_msg=f"{what}: a leaf's map must stay exact")
  if children is not None:  # one combinator over leaves: no looser than the children allow
    child_maps = []
    for c in children:
      v = ref_dense(c, (kv_len - q_len) + np.arange(q_len), np.arange(kv_len), nh)
      cm = brute_block_map(v, bq, bk)
      child_maps.append(np.broadcast_to(cm, exact.shape))
    derived = _derived_map(case.mask, child_maps, q_len, kv_len, bq, bk)
    definite = derived != PARTIAL  # where the children's maps decide the block, so must the map
    np.testing.assert_array_equal(got[definite], derived[definite],
                                  err_msg=f"{what}: looser than the children's maps allow")


@SETTINGS
@given(mask_cases(), st.data())
def test_conservative_block_map_of_big_composites_is_sound(hc, data):
  """Above _EXACT_EVAL_LIMIT a composite's map is derived from its children's maps. Force that
  path: the map may say PARTIAL where the exact map does not, but EMPTY must be truly empty and
  FULL truly full."""
  H, case = hc
  q_len, kv_len = _lengths(data, case, 30)
  check_conservative_map(case, H, q_len, kv_len, data.draw(st.integers(1, 7), "bq"),
                         data.draw(st.integers(1, 7), "bk"))


# ----------------------------------------------------------------------------------------------
# Deterministic sweep (does not depend on what hypothesis happens to draw)
# ----------------------------------------------------------------------------------------------


def _sweep_leaves():
  return [
      c_full(), c_causal(), c_causal(3), c_causal(-2), c_sliding(3), c_sliding(2, 5),
      c_sliding(0, 0), c_chunked(4), c_chunked(3), c_block_causal(4), c_block_causal(3),
      c_prefix(5), c_prefix(0), c_na((12,), (5,)), c_na((3, 4), (3, 2), (1, 2), (2, 1),
                                                          (True, False)),
      c_dense(10, 12, 1), c_dense(12, 12, 2), c_strided(2, 1), c_strided(3, 0, 2, 1),
  ]  # (from_function leaves are left to the hypothesis tests: each new shape compiles)


SWEEP_SIZES = [(8, 8, 4, 4), (10, 10, 4, 4), (5, 10, 4, 4), (10, 5, 3, 2), (7, 12, 3, 5),
               (1, 9, 1, 4), (12, 12, 12, 12), (12, 12, 1, 1), (11, 12, 5, 16)]
SWEEP_H = 3


def _sweep_cases():
  L = _sweep_leaves()
  shared = [c for c in L if not c.per_head]
  composites = [(c_not(c), [c]) for c in L]
  composites += [(c_and(a, b), [a, b]) for a, b in zip(L, L[3:] + L[:3])]
  composites += [(c_or(a, b), [a, b]) for a, b in zip(L, L[5:] + L[:5])]
  stacks = [
      c_per_head([c_causal(), c_sliding(2, 1), c_chunked(4)]),
      c_per_head([c_strided(3, 0), c_strided(3, 1, 2, 1), c_causal()]),  # per-head members
      c_per_head([c_fn_head(), c_full(), c_and(c_strided(2), c_causal())]),
      c_per_head([c_na((12,), (4,), (2,), (2,), (True,)), c_prefix(4), c_not(c_causal())]),
  ]
  deep = [c_not(c_and(c_or(shared[i], shared[i + 1]), c_not(shared[i + 2])))
          for i in range(0, len(shared) - 2, 2)]
  return ([(c, None) for c in L] + composites + [(c, None) for c in stacks]
          + [(c, None) for c in deep]
          + [(c_and(s, c_causal()), [s, c_causal()]) for s in stacks[:2]])


def test_block_map_sweep_exact_and_derived():
  cases = _sweep_cases()
  for case, children in cases:
    for q_len, kv_len, bq, bk in SWEEP_SIZES:
      if case.na_tokens and (max(q_len, kv_len) > case.na_tokens or q_len > kv_len):
        continue  # keep positions on the neighborhood's token grid
      nh = SWEEP_H if case.per_head else None
      check_block_map(case, SWEEP_H, q_len, kv_len, bq, bk, nh)
      if not case.na_tokens:
        check_block_map(case, SWEEP_H, q_len, kv_len, bq, bk, nh, q_offset=2, kv_offset=-3)
      check_conservative_map(case, SWEEP_H, q_len, kv_len, bq, bk, children)


_JG = 32  # fixed jnp grid size (op-by-op dispatch then compiles once per primitive)


@SETTINGS
@given(mask_cases(), st.data())
def test_mask_mod_jnp_numpy_and_dense_np_agree(hc, data):
  H, case = hc
  seed = data.draw(st.integers(0, 2**16), "seed")
  rng = np.random.default_rng(seed)
  if case.na_tokens:
    # Stay on the token grid of the smallest neighborhood in the tree; out-of-range positions
    # are covered by test_neighborhood_out_of_range_positions_consistent.
    q = rng.integers(0, case.na_tokens, _JG)
    k = rng.integers(0, case.na_tokens, _JG)
  else:
    q = rng.integers(-12, 48, _JG)
    k = rng.integers(-12, 48, _JG)
  heads = np.minimum(np.arange(4), H - 1)  # fixed shape [4], only valid heads
  qn, kn, hn = q[:, None], k[None, :], heads[:, None, None]
  if case.per_head:
    expected = np.broadcast_to(case.ref(qn[None], kn[None], hn), (4, _JG, _JG))
    got_np = case.mask.mask_mod(qn, kn, hn)
    got_j = case.mask.mask_mod(jnp.asarray(qn, jnp.int32), jnp.asarray(kn, jnp.int32),
                               jnp.asarray(hn, jnp.int32))
    got_dense = case.mask.dense_np(q, k, num_heads=H)
    expected_dense = expected[:H]
  else:
    expected = np.broadcast_to(case.ref(qn, kn, None), (_JG, _JG))
    got_np = case.mask.mask_mod(qn, kn)
    got_j = case.mask.mask_mod(jnp.asarray(qn, jnp.int32), jnp.asarray(kn, jnp.int32))
    got_dense = case.mask.dense_np(q, k)
    expected_dense = expected
  for name, got in (("mask_mod(numpy)", got_np), ("mask_mod(jnp)", got_j),
                    ("dense_np", got_dense)):
    got = np.broadcast_to(np.asarray(got, dtype=bool), np.shape(expected if name != "dense_np"
                                                                 else expected_dense))
    np.testing.assert_array_equal(got, expected if name != "dense_np" else expected_dense,
                                  err_msg=f"{name} of {case.desc} (seed={seed})")


# ----------------------------------------------------------------------------------------------
# Block maps: explicit cases (readable failures for the common masks)
# ----------------------------------------------------------------------------------------------


def test_causal_block_map_examples():
  # 8x8 with 4x4 blocks: lower block FULL, diagonal PARTIAL, upper EMPTY.
  np.testing.assert_array_equal(masks.causal().block_map(8, 8, 4, 4),
                                [[PARTIAL, EMPTY], [FULL, PARTIAL]])
  # Ragged: Tk = 10 with blocks of 4 -> the last key block is never FULL.
  np.testing.assert_array_equal(masks.full().block_map(5, 10, 4, 4),
                                [[FULL, FULL, PARTIAL], [PARTIAL, PARTIAL, PARTIAL]])
  # Decode-style: Tq=2 at the end of Tk=8 (bottom-right), blocks (2, 4).
  np.testing.assert_array_equal(masks.causal().block_map(2, 8, 2, 4), [[FULL, PARTIAL]])
  # Explicit offset 0 (top-left alignment): query 0..1 sees key 0..1 only.
  np.testing.assert_array_equal(masks.causal().block_map(2, 8, 2, 4, q_offset=0),
                                [[PARTIAL, EMPTY]])


def test_sliding_window_block_map_is_banded():
  # 16 tokens, blocks of 4, causal window of 4 tokens: only the diagonal and one below.
  bm = masks.sliding_window(3, 0).block_map(16, 16, 4, 4)
  expected = np.full((4, 4), EMPTY)
  for i in range(4):
    expected[i, i] = PARTIAL
    if i:
      expected[i, i - 1] = PARTIAL
  np.testing.assert_array_equal(bm, expected)
  # Block-aligned chunks: block diagonal FULL.
  np.testing.assert_array_equal(masks.chunked(4).block_map(16, 16, 4, 4),
                                np.where(np.eye(4, dtype=bool), FULL, EMPTY))


def test_block_map_num_heads_broadcasts_for_shared_masks():
  m = masks.causal() & masks.sliding_window(5, 1)
  bm2 = m.block_map(13, 17, 4, 3)
  bm3 = m.block_map(13, 17, 4, 3, num_heads=3)
  assert bm3.shape == (3,) + bm2.shape
  for h in range(3):
    np.testing.assert_array_equal(bm3[h], bm2)


def test_per_head_block_map_stacks_heads():
  ph = masks.per_head([masks.causal(), masks.full(), masks.sliding_window(2, 0)])
  bm = ph.block_map(12, 12, 4, 4, num_heads=3)
  assert bm.shape == (3, 3, 3)
  np.testing.assert_array_equal(bm[0], masks.causal().block_map(12, 12, 4, 4))
  np.testing.assert_array_equal(bm[1], masks.full().block_map(12, 12, 4, 4))
  np.testing.assert_array_equal(bm[2], masks.sliding_window(2, 0).block_map(12, 12, 4, 4))
  with pytest.raises(ValueError, match="num_heads"):
    ph.block_map(12, 12, 4, 4)
  with pytest.raises(ValueError, match="num_heads"):
    ph.dense_np(np.arange(4), np.arange(4))
  with pytest.raises(ValueError, match="num_heads"):
    masks.block_map_from_positions(ph, np.arange(4), np.arange(4), 2, 2)
  ph.validate(12, 12, 3)
  with pytest.raises(ValueError, match="heads"):
    ph.validate(12, 12, 4)


@pytest.mark.parametrize("num_heads", [2, 4])
def test_per_head_block_map_with_wrong_head_count_is_consistent_or_raises(num_heads):
  """A per-head stack of 3 masks asked for another head count must either raise or return one
  map per requested head that agrees with dense_np for the same num_heads."""
  ph = masks.per_head([masks.causal(), masks.full(), masks.sliding_window(2, 0)])
  try:
    bm = ph.block_map(8, 8, 4, 4, num_heads=num_heads)
  except ValueError:
    return
  assert bm.shape[0] == num_heads, (
      f"block_map(num_heads={num_heads}) of a 3-mask per_head stack returned shape {bm.shape}")
  dense = ph.dense_np(np.arange(8), np.arange(8), num_heads=num_heads)
  np.testing.assert_array_equal(bm, brute_block_map(dense, 4, 4))


def test_block_map_bad_arguments():
  m = masks.causal()
  with pytest.raises(ValueError, match="block_q"):
    m.block_map(8, 8, 0, 4)
  with pytest.raises(ValueError, match="block_kv"):
    m.block_map(8, 8, 4, -1)
  with pytest.raises(ValueError, match="q_len"):
    m.block_map(-1, 8, 4, 4)
  with pytest.raises(TypeError, match="kv_len"):
    m.block_map(8, 8.0, 4, 4)
  with pytest.raises(TypeError, match="block_q"):
    m.block_map(8, 8, 4.0, 4)


def test_block_map_is_read_only_and_cached():
  m = masks.sliding_window(3, 2)
  a = m.block_map(20, 20, 4, 4)
  assert not a.flags.writeable
  b = masks.sliding_window(3, 2).block_map(20, 20, 4, 4)  # an equal mask hits the same entry
  np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Neighborhood: mask_mod vs dense_np off the token grid
# ----------------------------------------------------------------------------------------------


def test_neighborhood_out_of_range_positions_consistent():
  """mask_mod and dense_np are two views of one mask: they must agree on every position,
  including positions outside [0, prod(spatial_shape)) (e.g. padding of a kernel tile)."""
  m = masks.neighborhood((4, 5), 3)
  pos = np.arange(-3, 25)
  dense = m.dense_np(pos, pos)
  got_np = np.asarray(m.mask_mod(pos[:, None], pos[None, :]), bool)
  got_j = np.asarray(m.mask_mod(jnp.asarray(pos)[:, None], jnp.asarray(pos)[None, :]), bool)
  bad = np.argwhere(got_j != dense)
  assert bad.size == 0, (
      f"neighborhood((4, 5), 3): mask_mod(jnp) != dense_np at {len(bad)} (q, k) position pairs, "
      f"e.g. {[(int(pos[a]), int(pos[b])) for a, b in bad[:4]]}: mask_mod="
      f"{[bool(got_j[a, b]) for a, b in bad[:4]]} dense_np={[bool(dense[a, b]) for a, b in bad[:4]]}")
  np.testing.assert_array_equal(got_np, dense)


def test_per_head_member_keeps_its_own_dense_np_semantics():
  """per_head([m0, m1]) on head h must equal m_h on its own: dense_np and block maps of the
  stack and of the member agree at every position (here positions off the neighborhood's grid,
  as with q_len != kv_len)."""
  na = masks.neighborhood(6, 3)
  stack = masks.per_head([masks.full(), na])
  q_pos, kv_pos = np.arange(-2, 6), np.arange(0, 8)
  member = na.dense_np(q_pos, kv_pos)
  in_stack = stack.dense_np(q_pos, kv_pos, num_heads=2)[1]
  bad = np.argwhere(member != in_stack)
  assert bad.size == 0, (
      f"per_head([full(), neighborhood(6, 3)]).dense_np(head 1) != neighborhood(6, 3).dense_np at "
      f"(q, k) = {[(int(q_pos[a]), int(kv_pos[b])) for a, b in bad[:4]]}: stack says "
      f"{[bool(in_stack[a, b]) for a, b in bad[:4]]}, member says "
      f"{[bool(member[a, b]) for a, b in bad[:4]]}")
  # The stack's block map and its own dense_np must agree too (8 queries, 8 keys, blocks of 4).
  bm = stack.block_map(8, 8, 4, 4, num_heads=2, q_offset=-2)
  np.testing.assert_array_equal(bm, brute_block_map(stack.dense_np(q_pos, kv_pos, num_heads=2),
                                                    4, 4))


# ----------------------------------------------------------------------------------------------
# Strided heads (S2-Attention)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,lw,block,offset", [(1, 0, 1, 0), (2, 0, 1, 0), (3, 1, 1, 0),
                                                    (4, 2, 3, 1), (3, 0, 4, -2), (2, 5, 2, 7)])
def test_strided_heads_semantics(stride, lw, block, offset):
  H, Tq, Tk = 5, 11, 19
  m = masks.strided_heads(stride, lw, block=block, offset=offset)
  q_pos = np.arange(Tq) + Tk - Tq
  k_pos = np.arange(Tk)
  expected = np.zeros((H, Tq, Tk), bool)
  for h in range(H):
    for a, i in enumerate(q_pos):
      for j in k_pos:
        expected[h, a, j] = ((j // block) + offset) % stride == h % stride or abs(i - j) <= lw
  np.testing.assert_array_equal(m.dense_np(q_pos, k_pos, num_heads=H), expected)
  got = m.mask_mod(jnp.asarray(q_pos)[None, :, None], jnp.asarray(k_pos)[None, None, :],
                   jnp.arange(H)[:, None, None])
  np.testing.assert_array_equal(np.asarray(got), expected)
  np.testing.assert_array_equal(m.block_map(Tq, Tk, 4, 4, num_heads=H),
                                brute_block_map(expected, 4, 4))
  # Heads 0..stride-1 together cover every key.
  if H >= stride:
    assert expected[:stride].any(axis=0).all()


def test_strided_heads_validate_and_head_requirement():
  m = masks.strided_heads(4, 1)
  m.validate(16, 16, 4)
  m.validate(16, 16, 8)
  with pytest.raises(ValueError, match="stride"):
    m.validate(16, 16, 3)
  with pytest.raises(ValueError, match="stride"):
    (m & masks.causal()).validate(16, 16, 2)
  assert m.per_head and (m & masks.causal()).per_head and (~m).per_head
  with pytest.raises(ValueError, match="head"):
    m.mask_mod(jnp.arange(4)[:, None], jnp.arange(4)[None, :])
  with pytest.raises(ValueError, match="num_heads"):
    m.block_map(16, 16, 4, 4)
  with pytest.raises(ValueError, match="num_heads"):
    m.dense_np(np.arange(4), np.arange(4))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: masks.sliding_window(-1), ValueError, "left"),
        (lambda: masks.sliding_window(2, -3), ValueError, "right"),
        (lambda: masks.sliding_window(2.0), TypeError, "left"),
        (lambda: masks.sliding_window(2, "1"), TypeError, "right"),
        (lambda: masks.sliding_window(True), TypeError, "left"),
        (lambda: masks.causal(1.5), TypeError, "offset"),
        (lambda: masks.causal(None), TypeError, "offset"),
        (lambda: masks.chunked(0), ValueError, "size"),
        (lambda: masks.chunked(-2), ValueError, "size"),
        (lambda: masks.chunked(2.5), TypeError, "size"),
        (lambda: masks.block_causal(0), ValueError, "block"),
        (lambda: masks.block_causal("4"), TypeError, "block"),
        (lambda: masks.prefix_lm(-1), ValueError, "prefix_len"),
        (lambda: masks.prefix_lm(3.0), TypeError, "prefix_len"),
        (lambda: masks.strided_heads(0), ValueError, "stride"),
        (lambda: masks.strided_heads(2, -1), ValueError, "local_window"),
        (lambda: masks.strided_heads(2, block=0), ValueError, "block"),
        (lambda: masks.strided_heads(2, offset=0.5), TypeError, "offset"),
        (lambda: masks.strided_heads(2.0), TypeError, "stride"),
        (lambda: masks.per_head([]), ValueError, "per_head"),
        (lambda: masks.per_head([masks.causal(), "causal"]), TypeError, r"masks\[1\]"),
        (lambda: masks.from_function(3), TypeError, "callable"),
        (lambda: masks.dense(np.ones((3, 3), np.int32)), TypeError, "bool"),
        (lambda: masks.dense(np.ones((3, 3), np.float32)), TypeError, "bool"),
        (lambda: masks.dense(np.ones((3,), bool)), ValueError, "2-D"),
        (lambda: masks.dense(np.ones((2, 3, 3), bool)), ValueError, "2-D"),
        (lambda: masks.dense(np.ones((), bool)), ValueError, "2-D"),
        (lambda: masks.causal() & 1, TypeError, "mask"),
        (lambda: masks.causal() | np.ones((3, 3), bool), TypeError, "mask"),
        (lambda: masks.full() & None, TypeError, "mask"),
        (lambda: masks.as_mask(np.ones((3, 3), bool)), TypeError, "dense"),
        (lambda: masks.as_mask("causal"), TypeError, "mask"),
    ])
def test_bad_input(make, exc, match):
  with pytest.raises(exc, match=match):
    make()


def test_reversed_operand_with_non_mask_raises_type_error():
  with pytest.raises(TypeError):
    1 & masks.causal()  # noqa: B018
  with pytest.raises(TypeError):
    True | masks.causal()  # noqa: B018


def test_dense_rejects_traced_array_and_validates_shape():
  def f(x):
    return masks.dense(x > 0)

  with pytest.raises(TypeError, match="concrete"):
    jax.jit(f)(jnp.ones((3, 3)))
  m = masks.dense(np.eye(4, 6, dtype=bool))
  m.validate(4, 6, 2)
  with pytest.raises(ValueError, match="shape"):
    m.validate(6, 4, 2)


def test_as_mask_normalizes():
  assert masks.as_mask(None) == masks.full()
  c = masks.causal()
  assert masks.as_mask(c) is c
  ph = masks.as_mask([masks.causal(), masks.full()])
  assert ph == masks.per_head([masks.causal(), masks.full()])
  assert ph.per_head


# ----------------------------------------------------------------------------------------------
# Hashing and equality (masks are static jit arguments)
# ----------------------------------------------------------------------------------------------


def _equal_pairs():
  arr = np.random.default_rng(0).random((5, 7)) < 0.5
  return [
      (masks.full(), masks.full()),
      (masks.causal(), masks.causal(0)),
      (masks.causal(np.int64(2)), masks.causal(2)),
      (masks.sliding_window(3), masks.sliding_window(3, 0)),
      (masks.chunked(4), masks.chunked(4)),
      (masks.block_causal(3), masks.block_causal(3)),
      (masks.prefix_lm(5), masks.prefix_lm(5)),
      (masks.neighborhood(8, 3), masks.neighborhood((8,), (3,), (1,), (1,), (False,))),
      (masks.neighborhood((4, 6), (3, 2), 1, (1, 2), (True, False)),
       masks.neighborhood([4, 6], [3, 2], [1, 1], [1, 2], [True, False])),
      (masks.strided_heads(4, 2, block=2), masks.strided_heads(4, 2, block=2, offset=0)),
      (masks.per_head([masks.causal(), masks.full()]), masks.per_head((masks.causal(), masks.full()))),
      (masks.from_function(_fn_mod3), masks.from_function(_fn_mod3)),
      (masks.dense(arr), masks.dense(arr.copy())),
      (masks.causal() & masks.sliding_window(4), masks.causal() & masks.sliding_window(4)),
      (~(masks.chunked(3) | masks.prefix_lm(2)), ~(masks.chunked(3) | masks.prefix_lm(2))),
  ]


def _distinct_masks():
  arr = np.random.default_rng(0).random((5, 7)) < 0.5
  arr2 = arr.copy()
  arr2[0, 0] = ~arr2[0, 0]
  return [
      masks.full(), masks.causal(), masks.causal(1), masks.causal(-1),
      masks.sliding_window(3), masks.sliding_window(3, 1), masks.sliding_window(1, 3),
      masks.chunked(4), masks.chunked(5), masks.block_causal(4), masks.prefix_lm(4),
      masks.neighborhood(8, 3), masks.neighborhood(8, 3, causal=True),
      masks.neighborhood(8, 3, dilation=2), masks.neighborhood(8, 3, stride=3),
      masks.neighborhood(8, 4), masks.neighborhood((2, 4), 1), masks.neighborhood((4, 2), 1),
      masks.strided_heads(4), masks.strided_heads(4, 1), masks.strided_heads(4, block=2),
      masks.strided_heads(4, offset=1), masks.strided_heads(3),
      masks.per_head([masks.causal(), masks.full()]), masks.per_head([masks.full(), masks.causal()]),
      masks.from_function(_fn_mod3), masks.from_function(_fn_diff),
      masks.from_function(_fn_head, per_head=True),
      masks.dense(arr), masks.dense(arr2), masks.dense(arr.reshape(7, 5)),
      masks.causal() & masks.sliding_window(4), masks.sliding_window(4) & masks.causal(),
      masks.causal() | masks.sliding_window(4), ~masks.causal(), ~~masks.causal(),
  ]


def test_equal_masks_hash_equal():
  for a, b in _equal_pairs():
    assert a == b, (a, b)
    assert hash(a) == hash(b), (a, b)
    assert {a: 1}[b] == 1


def test_different_masks_compare_unequal():
  ms = _distinct_masks()
  for i, a in enumerate(ms):
    hash(a)
    for j, b in enumerate(ms):
      assert (a == b) == (i == j), (i, j, a, b)
  # Same-kind masks with different parameters also get different hashes.
  # (offsets avoid -1: CPython's hash(-1) == hash(-2))
  same_kind = [masks.causal(o) for o in range(0, 7)] + [masks.sliding_window(a, b)
                                                        for a in range(3) for b in range(3)]
  assert len({hash(m) for m in same_kind}) == len(same_kind)
  assert len({hash(m) for m in ms}) >= len(ms) - 6


def test_masks_are_static_jit_arguments():
  traces = []

  @jax.jit
  def count(q):
    return q.sum()

  def f(mask, q, k):
    traces.append(mask)
    return mask.mask_mod(q[:, None], k[None, :]).sum()

  jf = jax.jit(f, static_argnums=0)
  idx = jnp.arange(8)
  r1 = jf(masks.causal() & masks.sliding_window(2), idx, idx)
  r2 = jf(masks.causal() & masks.sliding_window(2), idx, idx)  # equal, new object: no retrace
  assert len(traces) == 1 and int(r1) == int(r2) == 8 + 7 + 6
  jf(masks.neighborhood(8, 3), idx, idx)
  jf(masks.neighborhood(8, 3), idx, idx)
  assert len(traces) == 2
  jf(masks.causal() & masks.sliding_window(3), idx, idx)  # different: retrace
  assert len(traces) == 3
  arr = np.tril(np.ones((8, 8), bool))
  jf(masks.dense(arr), idx, idx)
  assert int(jf(masks.dense(arr.copy()), idx, idx)) == 36
  assert len(traces) == 4
