"""Neighborhood-attention mask (NATTEN semantics) against an independent reference.

The reference below is written from NATTEN's definition (dilation groups, tile leaders, windows
shifted inward at borders, per-axis causal) with plain Python loops; it deliberately does not reuse
the closed-form ``start``/``end`` expressions of ``attnjax.masks``. N-D masks are built from the
per-axis tables as a Kronecker product (row-major flattening), and for a few cases checked again
with an explicit coordinate loop.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks

# ----------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------


def ref_axis_keys(L: int, k: int, d: int, s: int, causal: bool, i: int) -> list[int]:
  """Key coordinates visible from query coordinate ``i`` on one axis (NATTEN semantics)."""
  g = i % d
  group = list(range(g, L, d))  # members of i's dilation group, in order
  Lg = len(group)  # == ceil((L - g) / d)
  assert Lg == -(-(L - g) // d)
  c = group.index(i)  # coordinate inside the group (== i // d)
  if causal:
    leader = min((c // s) * s + s - 1, Lg - 1)
    lo, hi = max(leader - k + 1, 0), c
  else:
    leader = min((c // s) * s + s // 2, Lg - 1)
    lo = leader - k // 2  # k//2 keys left of the leader, k//2 + k%2 - 1 right of it
    lo = max(lo, 0)  # shift right at the left border
    lo = min(lo, Lg - k)  # shift left at the right border
    hi = lo + k - 1
  return [group[cj] for cj in range(lo, hi + 1)]


def ref_axis(L: int, k: int, d: int, s: int, causal: bool) -> np.ndarray:
  A = np.zeros((L, L), dtype=bool)
  for i in range(L):
    for j in ref_axis_keys(L, k, d, s, causal, i):
      A[i, j] = True
  return A


def ref_neighborhood(shape, ks, ds, ss, cs) -> np.ndarray:
  """[T, T] mask, row-major flattening: AND over axes == Kronecker product of axis tables."""
  out = np.ones((1, 1), dtype=bool)
  for a in range(len(shape)):
    out = np.kron(out, ref_axis(shape[a], ks[a], ds[a], ss[a], cs[a])).astype(bool)
  return out


def ref_neighborhood_loops(shape, ks, ds, ss, cs) -> np.ndarray:
  """Same as ``ref_neighborhood`` with an explicit coordinate loop (checks the flattening)."""
  T = math.prod(shape)
  coords = list(itertools.product(*[range(n) for n in shape]))  # row-major order
  out = np.zeros((T, T), dtype=bool)
  for qi, qc in enumerate(coords):
    per_axis = [set(ref_axis_keys(shape[a], ks[a], ds[a], ss[a], cs[a], qc[a]))
                for a in range(len(shape))]
    for ki, kc in enumerate(coords):
      out[qi, ki] = all(kc[a] in per_axis[a] for a in range(len(shape)))
  return out


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

_GRID = 128  # fixed jnp grid (so op-by-op dispatch compiles once for all cases)
_QG = jnp.arange(_GRID, dtype=jnp.int32)[:, None]
_KG = jnp.arange(_GRID, dtype=jnp.int32)[None, :]


def _views(m, T):
  """The three views of the mask on the [T, T] token grid: dense_np, mask_mod(np), mask_mod(jnp)."""
  assert T <= _GRID
  idx = np.arange(T)
  dense = m.dense_np(idx, idx)
  np_mod = np.asarray(m.mask_mod(idx[:, None], idx[None, :]), dtype=bool)
  np_mod = np.broadcast_to(np_mod, (T, T))
  jnp_mod = np.asarray(m.mask_mod(_QG, _KG), dtype=bool)[:T, :T]
  return dense, np_mod, jnp_mod


def _random_case(rng, nd):
  max_len = {1: 40, 2: 11, 3: 5}[nd]
  shape, ks, ds, ss, cs = [], [], [], [], []
  for _ in range(nd):
    L = int(rng.integers(1, max_len + 1))
    d = int(rng.integers(1, min(L, 4) + 1))
    k = int(rng.integers(1, L // d + 1))
    s = int(rng.integers(1, k + 1))
    shape.append(L)
    ks.append(k)
    ds.append(d)
    ss.append(s)
    cs.append(bool(rng.integers(2)))
  return tuple(shape), tuple(ks), tuple(ds), tuple(ss), tuple(cs)


def _check_case(shape, ks, ds, ss, cs, *, scalar_args=False):
  if scalar_args and len(shape) == 1:
    m = masks.neighborhood(shape[0], ks[0], ds[0], ss[0], cs[0])
  else:
    m = masks.neighborhood(shape, ks, ds, ss, cs)
  T = math.prod(shape)
  expected = ref_neighborhood(shape, ks, ds, ss, cs)
  dense, np_mod, jnp_mod = _views(m, T)
  case = f"shape={shape} kernel={ks} dilation={ds} stride={ss} causal={cs}"
  for name, got in (("dense_np", dense), ("mask_mod(numpy)", np_mod), ("mask_mod(jnp)", jnp_mod)):
    if not np.array_equal(got, expected):
      bad = np.argwhere(got != expected)[:5].tolist()
      pytest.fail(f"{name} differs from the NATTEN reference for {case}; first (q, k) mismatches "
                  f"{bad}: got {[bool(got[q, k]) for q, k in bad]}")
  return m, expected


# ----------------------------------------------------------------------------------------------
# Reference sanity (hand-derived windows), so the reference itself is trustworthy
# ----------------------------------------------------------------------------------------------


def _rows(A):
  return [np.flatnonzero(r).tolist() for r in A]


def test_reference_hand_examples():
  # 1-D, L=5, k=3: border windows shifted inward.
  assert _rows(ref_axis(5, 3, 1, 1, False)) == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4],
                                                [2, 3, 4]]
  # Even kernel: 2 left, 1 right of the leader.
  assert _rows(ref_axis(6, 4, 1, 1, False)) == [[0, 1, 2, 3]] * 3 + [[1, 2, 3, 4]] + [
      [2, 3, 4, 5]] * 2
  # Dilation 2 on L=7: groups {0,2,4,6} and {1,3,5}.
  assert _rows(ref_axis(7, 3, 2, 1, False)) == [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5],
                                                [2, 4, 6], [1, 3, 5], [2, 4, 6]]
  # Stride 2, k=4, L=8: tiles {0,1},{2,3},{4,5},{6,7}, leaders 1, 3, 5, 7 (last clamped to 7).
  assert _rows(ref_axis(8, 4, 1, 2, False)) == [[0, 1, 2, 3]] * 2 + [[1, 2, 3, 4]] * 2 + [
      [3, 4, 5, 6]] * 2 + [[4, 5, 6, 7]] * 2
  # Causal, k=3, stride 2, L=6: leaders 1, 3, 5; keys [max(leader-2, 0), c].
  assert _rows(ref_axis(6, 3, 1, 2, True)) == [[0], [0, 1], [1, 2], [1, 2, 3], [3, 4],
                                               [3, 4, 5]]
  # Causal + dilation 2, k=2, L=5: groups {0,2,4}, {1,3}.
  assert _rows(ref_axis(5, 2, 2, 1, True)) == [[0], [1], [0, 2], [1, 3], [2, 4]]


def test_reference_kron_equals_coordinate_loop():
  rng = np.random.default_rng(7)
  for nd in (2, 3, 2, 3, 2, 3):
    case = _random_case(rng, nd)
    np.testing.assert_array_equal(ref_neighborhood(*case), ref_neighborhood_loops(*case))


# ----------------------------------------------------------------------------------------------
# masks.neighborhood vs the reference
# ----------------------------------------------------------------------------------------------

EDGE_CASES = [
    ((7,), (3,), (1,), (1,), (False,)),
    ((7,), (7,), (1,), (1,), (False,)),  # k = L
    ((8,), (4,), (1,), (1,), (False,)),  # even k
    ((8,), (4,), (2,), (1,), (False,)),  # k * d == L
    ((9,), (3,), (3,), (1,), (False,)),  # L % d == 0
    ((10,), (3,), (3,), (1,), (False,)),  # L % d != 0: groups of unequal length
    ((11,), (4,), (2,), (3,), (False,)),  # odd length, even k, dilation, stride
    ((12,), (4,), (1,), (4,), (False,)),  # stride == kernel (blocked)
    ((13,), (5,), (1,), (5,), (False,)),  # blocked with a ragged last tile
    ((13,), (5,), (2,), (2,), (False,)),
    ((9,), (4,), (1,), (3,), (True,)),  # causal + stride
    ((10,), (3,), (3,), (3,), (True,)),  # causal + dilation + stride
    ((6,), (6,), (1,), (6,), (True,)),
    ((1,), (1,), (1,), (1,), (False,)),
    ((1,), (1,), (1,), (1,), (True,)),
    ((5, 7), (3, 4), (1, 1), (1, 2), (False, False)),
    ((6, 9), (2, 3), (3, 2), (2, 3), (True, False)),  # causal first axis only
    ((4, 4), (4, 2), (1, 2), (4, 1), (False, True)),  # causal second axis only
    ((3, 4, 5), (3, 2, 5), (1, 2, 1), (1, 1, 2), (True, False, False)),  # video-style
    ((4, 3, 5), (2, 3, 2), (2, 1, 2), (2, 3, 1), (False, True, True)),
    ((5, 5, 5), (5, 5, 5), (1, 1, 1), (1, 1, 1), (False, False, False)),
]


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_neighborhood_edge_cases(case):
  _check_case(*case)


@pytest.mark.parametrize("seed", range(8))
def test_neighborhood_random_cases(seed):
  """~400 random (1-D/2-D/3-D, kernel, dilation, stride, causal) cases in total."""
  rng = np.random.default_rng(1000 + seed)
  for n in range(50):
    nd = 1 + n % 3
    _check_case(*_random_case(rng, nd), scalar_args=bool(rng.integers(2)))


def test_neighborhood_scalar_args_broadcast_to_all_axes():
  a = masks.neighborhood((6, 7), 3, 2, 2, True)
  b = masks.neighborhood((6, 7), (3, 3), (2, 2), (2, 2), (True, True))
  assert a == b
  np.testing.assert_array_equal(a.dense_np(np.arange(42), np.arange(42)),
                                ref_neighborhood((6, 7), (3, 3), (2, 2), (2, 2), (True, True)))
  c = masks.neighborhood([6, 7], [3, 3], [2, 2], [2, 2], [True, True])  # lists work too
  assert c == b


def test_neighborhood_mask_mod_in_jit_and_scalars():
  m = masks.neighborhood((5, 6), (3, 2), (1, 2), (2, 1), (False, True))
  expected = ref_neighborhood((5, 6), (3, 2), (1, 2), (2, 1), (False, True))
  idx = jnp.arange(30)
  got = jax.jit(lambda q, k: m.mask_mod(q[:, None], k[None, :]))(idx, idx)
  np.testing.assert_array_equal(np.asarray(got), expected)
  # Scalar positions (as a kernel would pass one element), Python ints and jnp scalars.
  for q, k in [(0, 0), (7, 13), (29, 28), (14, 2)]:
    assert bool(m.mask_mod(q, k)) == expected[q, k]
    assert bool(m.mask_mod(jnp.int32(q), jnp.int32(k))) == expected[q, k]


# ----------------------------------------------------------------------------------------------
# Properties (NATTEN / mechanisms reports)
# ----------------------------------------------------------------------------------------------


def test_noncausal_rows_have_prod_k_keys_and_contain_query_when_stride_1():
  rng = np.random.default_rng(11)
  for n in range(120):
    shape, ks, ds, ss, _ = _random_case(rng, 1 + n % 3)
    cs = (False,) * len(shape)
    if n % 2:
      ss = (1,) * len(shape)
    T = math.prod(shape)
    A = masks.neighborhood(shape, ks, ds, ss, cs).dense_np(np.arange(T), np.arange(T))
    case = f"shape={shape} kernel={ks} dilation={ds} stride={ss}"
    counts = A.sum(axis=1)
    assert (counts == math.prod(ks)).all(), f"{case}: row key counts {sorted(set(counts))}"
    if all(s == 1 for s in ss):
      assert A.diagonal().all(), f"{case}: some query does not see itself"
    # Every visible key lies in the query's dilation group on every axis.
    qc = np.unravel_index(np.arange(T), shape)
    for a, d in enumerate(ds):
      same = (qc[a][:, None] % d) == (qc[a][None, :] % d)
      assert not (A & ~same).any(), f"{case}: key outside the dilation group on axis {a}"


def test_causal_rows_contain_query_and_no_future_key():
  rng = np.random.default_rng(12)
  for n in range(90):
    shape, ks, ds, ss, _ = _random_case(rng, 1 + n % 3)
    cs = (True,) * len(shape)
    T = math.prod(shape)
    A = masks.neighborhood(shape, ks, ds, ss, cs).dense_np(np.arange(T), np.arange(T))
    case = f"shape={shape} kernel={ks} dilation={ds} stride={ss}"
    assert A.diagonal().all(), case
    assert not np.triu(A, 1).any(), f"{case}: fully causal NA sees a later token"
    if all(s == 1 for s in ss):  # away from the start, exactly prod(k) keys
      qc = np.unravel_index(np.arange(T), shape)
      far = np.ones(T, bool)
      for a in range(len(shape)):
        far &= qc[a] // ds[a] >= ks[a] - 1
      assert (A.sum(axis=1)[far] == math.prod(ks)).all(), case


@pytest.mark.parametrize("shape,ks", [((12,), (4,)), ((6, 9), (3, 3)), ((4, 6, 4), (2, 3, 4)),
                                      ((8, 8), (8, 2)), ((10,), (1,))])
def test_stride_equal_kernel_is_block_diagonal(shape, ks):
  T = math.prod(shape)
  A = masks.neighborhood(shape, ks, 1, ks).dense_np(np.arange(T), np.arange(T))
  c = np.unravel_index(np.arange(T), shape)
  expected = np.ones((T, T), bool)
  for a, k in enumerate(ks):
    expected &= (c[a][:, None] // k) == (c[a][None, :] // k)
  np.testing.assert_array_equal(A, expected)


@pytest.mark.parametrize("L", [1, 2, 5, 16, 23])
def test_1d_causal_is_band(L):
  i = np.arange(L)
  for k in range(1, L + 1):
    A = masks.neighborhood(L, k, causal=True).dense_np(i, i)
    expected = (i[None, :] <= i[:, None]) & (i[None, :] >= np.maximum(i[:, None] - k + 1, 0))
    np.testing.assert_array_equal(A, expected, err_msg=f"L={L} k={k}")
    # ... which is the LM sliding window of k tokens.
    np.testing.assert_array_equal(A, masks.sliding_window(k - 1, 0).dense_np(i, i))


@pytest.mark.parametrize("shape", [(1,), (9,), (4, 7), (3, 2, 4)])
def test_kernel_equal_length_is_full_attention(shape):
  T = math.prod(shape)
  idx = np.arange(T)
  A = masks.neighborhood(shape, shape).dense_np(idx, idx)
  assert A.all()
  if len(shape) == 1:
    np.testing.assert_array_equal(masks.neighborhood(shape, shape, causal=True).dense_np(idx, idx),
                                  np.tril(np.ones((T, T), bool)))


@pytest.mark.parametrize("L,k,d,s,causal", [(12, 3, 3, 1, False), (12, 2, 2, 2, True),
                                            (15, 4, 3, 2, False), (14, 3, 2, 3, False),
                                            (17, 5, 3, 2, True)])
def test_dilation_equals_na_on_interleaved_subsequences(L, k, d, s, causal):
  """FNA: a dilated problem is the undilated problem on each subsequence x[g::d]."""
  idx = np.arange(L)
  A = masks.neighborhood(L, k, d, s, causal).dense_np(idx, idx)
  for g in range(d):
    sub = idx[g::d]
    inner = masks.neighborhood(sub.size, k, 1, s, causal).dense_np(np.arange(sub.size),
                                                                    np.arange(sub.size))
    np.testing.assert_array_equal(A[np.ix_(sub, sub)], inner)
    other = np.setdiff1d(idx, sub)
    assert not A[np.ix_(sub, other)].any()


def test_interior_translation_equivariance():
  L, k = 20, 5
  idx = np.arange(L)
  A = masks.neighborhood(L, k).dense_np(idx, idx)
  for i in range(k // 2, L - k // 2 - 1):
    np.testing.assert_array_equal(A[i + 1, 1:], A[i, :-1])
  # 2-D: moving the query one row down moves the window one row down (interior).
  B = masks.neighborhood((9, 9), 3).dense_np(np.arange(81), np.arange(81))
  for r in range(1, 7):
    for c in range(1, 8):
      q = r * 9 + c
      np.testing.assert_array_equal(B[q + 9].reshape(9, 9)[1:], B[q].reshape(9, 9)[:-1])


# ----------------------------------------------------------------------------------------------
# Validation and bad input
# ----------------------------------------------------------------------------------------------


def test_validate_requires_token_count_equal_to_grid():
  m = masks.neighborhood((4, 5), 3)
  m.validate(20, 20, 4)
  with pytest.raises(ValueError, match="spatial_shape"):
    m.validate(19, 20, 4)
  with pytest.raises(ValueError, match="spatial_shape"):
    m.validate(20, 21, 4)
  with pytest.raises(ValueError, match="spatial_shape"):
    m.validate(10, 10, 1)
  # Composites validate their children.
  with pytest.raises(ValueError, match="spatial_shape"):
    (m & masks.causal()).validate(21, 21, 1)
  with pytest.raises(ValueError, match="spatial_shape"):
    (~m).validate(21, 21, 1)
  with pytest.raises(ValueError, match="spatial_shape"):
    masks.per_head([masks.full(), m]).validate(21, 21, 2)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(spatial_shape=(), kernel_size=1), ValueError, "spatial_shape"),
        (dict(spatial_shape=(2, 2, 2, 2), kernel_size=1), ValueError, "spatial_shape"),
        (dict(spatial_shape=(0,), kernel_size=1), ValueError, "spatial_shape"),
        (dict(spatial_shape=(4, 0), kernel_size=1), ValueError, "spatial_shape"),
        (dict(spatial_shape=(-3,), kernel_size=1), ValueError, "spatial_shape"),
        (dict(spatial_shape=(4.0,), kernel_size=1), TypeError, "spatial_shape"),
        (dict(spatial_shape="abc", kernel_size=1), (ValueError, TypeError), "spatial_shape"),
        (dict(spatial_shape=(8,), kernel_size=0), ValueError, "kernel_size"),
        (dict(spatial_shape=(8,), kernel_size=-1), ValueError, "kernel_size"),
        (dict(spatial_shape=(8,), kernel_size=9), ValueError, "kernel_size"),
        (dict(spatial_shape=(8,), kernel_size=3, dilation=3), ValueError, "kernel_size"),
        (dict(spatial_shape=(8, 8), kernel_size=(3, 5), dilation=(1, 2)), ValueError,
         r"kernel_size\[1\]"),
        (dict(spatial_shape=(8,), kernel_size=3, dilation=0), ValueError, "dilation"),
        (dict(spatial_shape=(8,), kernel_size=3, stride=4), ValueError, "stride"),
        (dict(spatial_shape=(8,), kernel_size=3, stride=0), ValueError, "stride"),
        (dict(spatial_shape=(8, 8), kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
        (dict(spatial_shape=(8, 8), kernel_size=3, dilation=(1,)), ValueError, "dilation"),
        (dict(spatial_shape=(8, 8), kernel_size=3, stride=(1, 1, 1)), ValueError, "stride"),
        (dict(spatial_shape=(8, 8), kernel_size=3, causal=(True,)), ValueError, "causal"),
        (dict(spatial_shape=(8,), kernel_size=3.0), TypeError, "kernel_size"),
        (dict(spatial_shape=(8,), kernel_size="3"), TypeError, "kernel_size"),
        (dict(spatial_shape=(8,), kernel_size=True), TypeError, "kernel_size"),
        (dict(spatial_shape=(8,), kernel_size=3, dilation=1.5), TypeError, "dilation"),
        (dict(spatial_shape=(8,), kernel_size=3, stride=None), TypeError, "stride"),
        (dict(spatial_shape=(8,), kernel_size=3, causal=1), TypeError, "causal"),
        (dict(spatial_shape=(8,), kernel_size=3, causal="yes"), TypeError, "causal"),
    ])
def test_neighborhood_bad_input(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    masks.neighborhood(**kwargs)


def test_neighborhood_accepts_numpy_scalars():
  a = masks.neighborhood((np.int64(6),), np.int32(3), np.int64(2), np.int8(1), np.bool_(True))
  assert a == masks.neighborhood(6, 3, 2, 1, True)
  hash(a)
