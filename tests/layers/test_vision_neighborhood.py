"""NeighborhoodAttention1D/2D/3D against a brute-force numpy re-implementation of NATTEN's
definition (per-axis windows, dilation groups, GNA stride, causal axes, relative position bias)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.backends.chunked import ChunkedBackend
from attnjax.layers.neighborhood import (NeighborhoodAttention1D, NeighborhoodAttention2D,
                                         NeighborhoodAttention3D)
from vision_helpers import P, linear, randn, rngs, softmax

LAYERS = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}


# --------------------------------------------------------------------------- plain references

def axis_neighbors(i, length, k, d, s, causal):
  """Set of key coordinates visible from query coordinate ``i`` on one axis (NATTEN)."""
  g = i % d
  members = list(range(g, length, d))  # the query's dilation group, in order
  lg = len(members)
  c = i // d
  if causal:
    leader = min((c // s) * s + s - 1, lg - 1)
    lo, hi = max(leader - k + 1, 0), c  # inclusive
  else:
    leader = min((c // s) * s + s // 2, lg - 1)
    lo = min(max(leader - k // 2, 0), lg - k)  # window of k around the leader, shifted inward
    hi = lo + k - 1
  return {members[t] for t in range(lo, hi + 1)}


def reference(layer, x, kernel, dilation, stride, causal):
  """x: [B, *grid, C] float64 -> [B, *grid, C]."""
  grid = x.shape[1:-1]
  nd = len(grid)
  b, c = x.shape[0], x.shape[-1]
  h = layer.num_heads
  hd = c // h
  n = math.prod(grid)
  coords = list(itertools.product(*[range(g) for g in grid]))  # row-major
  mask = np.zeros((n, n), bool)
  bias = np.zeros((h, n, n))
  rpb = P(layer.rpb) if layer.rpb is not None else None
  for qi, qc in enumerate(coords):
    vis = [axis_neighbors(qc[a], grid[a], kernel[a], dilation[a], stride[a], causal[a])
           for a in range(nd)]
    for ki, kc in enumerate(coords):
      if all(kc[a] in vis[a] for a in range(nd)):
        mask[qi, ki] = True
        if rpb is not None:
          idx = tuple(kc[a] // dilation[a] - qc[a] // dilation[a] + kernel[a] - 1
                      for a in range(nd))
          bias[:, qi, ki] = rpb[(slice(None),) + idx]
  qkv = linear(x.reshape(b, n, c), layer.qkv).reshape(b, n, 3, h, hd)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5 + bias[None]
  s = np.where(mask, s, -np.inf)
  o = np.einsum("bhqk,bkhd->bqhd", softmax(s), v).reshape(b, n, c)
  return linear(o, layer.proj).reshape(x.shape)


def per_axis(v, nd):
  return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


CASES = [
    # (grid, heads, kernel, dilation, stride, causal, rpb)
    ((11,), 2, 3, 2, 1, False, True),
    ((9,), 2, 4, 1, 2, True, True),             # even kernel, GNA stride, causal
    ((6, 8), 2, 3, (1, 2), 1, False, True),     # DiNA on one axis
    ((6, 8), 4, (3, 4), 1, (1, 2), (True, False), True),  # per-axis causal + stride
    ((6, 8), 2, (2, 4), 1, (2, 4), False, False),  # blocked (stride = kernel)
    ((3, 4, 5), 2, (2, 3, 3), (1, 1, 1), (1, 2, 1), (True, False, False), True),
]


@pytest.mark.parametrize("grid,heads,kernel,dilation,stride,causal,rpb", CASES)
def test_matches_natten_definition(grid, heads, kernel, dilation, stride, causal, rpb):
  nd = len(grid)
  dim = 16
  layer = LAYERS[nd](dim, heads, kernel, dilation=dilation, stride=stride, is_causal=causal,
                     rel_pos_bias=rpb, rngs=rngs(len(grid) + heads))
  x = randn(sum(grid), (2,) + grid + (dim,))
  out = nnx.jit(lambda m, x: m(x))(layer, x)
  ref = reference(layer, np.asarray(x, np.float64), per_axis(kernel, nd),
                  per_axis(dilation, nd), per_axis(stride, nd), per_axis(causal, nd))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("impl", ["reference", ChunkedBackend(block_q=8, block_kv=16)])
def test_other_backends(impl):
  """The mask and the rpb score mod reach every backend (chunked: tiles smaller than the grid,
  so the score mod sees tile-cut params and padded positions)."""
  grid, kernel, dilation, stride, causal = (5, 7), (3, 4), (1, 1), (1, 2), (False, True)
  layer = NeighborhoodAttention2D(16, 2, kernel, dilation=dilation, stride=stride,
                                  is_causal=causal, rel_pos_bias=True, impl=impl, rngs=rngs(11))
  x = randn(4, (2,) + grid + (16,))
  out = nnx.jit(lambda m, x: m(x))(layer, x)
  ref = reference(layer, np.asarray(x, np.float64), kernel, dilation, stride, causal)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=2e-5)


def test_chunked_gradients_match_dense():
  """Gradients (inputs, projections and the rpb table, through the chunked backend's custom
  VJP) equal those of the dense backend."""
  def grads(impl):
    layer = NeighborhoodAttention2D(16, 2, 3, stride=(1, 2), is_causal=(False, True),
                                    rel_pos_bias=True, impl=impl, rngs=rngs(2))
    x = randn(6, (2, 5, 7, 16))
    return nnx.jit(lambda m, x: nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x))),
                                         argnums=(0, 1))(m, x))(layer, x)
  dense, chunked = grads("xla"), grads(ChunkedBackend(block_q=8, block_kv=16))
  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(chunked)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_token_layout_and_bfloat16():
  layer = NeighborhoodAttention2D(16, 4, 3, dilation=(2, 1), rel_pos_bias=True,
                                  dtype=jnp.bfloat16, rngs=rngs(3))
  x = randn(7, (2, 6, 8, 16)).astype(jnp.bfloat16)
  call = nnx.jit(lambda m, x, grid_size=None: m(x, grid_size), static_argnums=2)
  out = call(layer, x)
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
  assert layer.qkv.kernel[...].dtype == jnp.float32
  ref = reference(layer, np.asarray(x.astype(jnp.float32), np.float64), (3, 3), (2, 1), (1, 1),
                  (False, False))
  err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 3e-2, err
  flat = call(layer, x.reshape(2, 48, 16), (6, 8))
  np.testing.assert_array_equal(np.asarray(flat, np.float32),
                                np.asarray(out.reshape(2, 48, 16), np.float32))


def test_jit_and_grad_reach_rpb():
  layer = NeighborhoodAttention2D(16, 2, 3, rel_pos_bias=True, rngs=rngs(0))
  x = randn(1, (1, 5, 6, 16))

  @nnx.jit
  def loss_and_grad(m, x):
    return nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(m)

  loss, grads = loss_and_grad(layer, x)
  assert np.isfinite(float(loss))
  g = np.asarray(grads["rpb"][...])
  assert g.shape == (2, 5, 5) and np.all(np.isfinite(g)) and np.abs(g).max() > 0
  # Finite-difference check of one rpb entry.
  eps = 1e-2
  idx = (1, 2, 3)
  loss_fn = nnx.jit(lambda m, x: jnp.sum(m(x) ** 2))
  def loss_at(delta):
    m = nnx.clone(layer)
    m.rpb[...] = m.rpb[...].at[idx].add(delta)
    return float(loss_fn(m, x))
  fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
  np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=1e-3)


def test_bad_configuration():
  r = rngs(0)
  with pytest.raises(ValueError, match="num_heads"):
    NeighborhoodAttention2D(30, 4, 3, rngs=r)
  with pytest.raises(ValueError, match="stride"):
    NeighborhoodAttention2D(16, 2, 3, stride=4, rngs=r)
  with pytest.raises(ValueError, match="kernel_size"):
    NeighborhoodAttention2D(16, 2, (3, 3, 3), rngs=r)
  layer = NeighborhoodAttention2D(16, 2, 5, dilation=2, rngs=r)
  with pytest.raises(ValueError, match=r"kernel_size=\(5, 5\) x dilation=\(2, 2\)"):
    layer(jnp.ones((1, 6, 12, 16)))  # 5 * 2 > 6
  layer = NeighborhoodAttention2D(16, 2, 3, rngs=r)
  with pytest.raises(ValueError, match="grid_size"):
    layer(jnp.ones((1, 50, 16)), grid_size=(6, 8))
  with pytest.raises(ValueError, match="grid_size"):
    layer(jnp.ones((1, 48, 16)))
  with pytest.raises(ValueError, match="dim=16"):
    layer(jnp.ones((1, 6, 8, 8)))


def test_is_causal_accepts_numpy_bools_and_rejects_ints():
  """is_causal=np.True_ used to be rejected ("must be a bool or 2 bools"); numpy and 0-d jax
  bools now give the same layer as Python bools, ints are still rejected."""
  x = randn(0, (1, 5, 6, 16))
  want = np.asarray(NeighborhoodAttention2D(16, 2, 3, is_causal=(True, False), rngs=rngs(0))(x))
  for causal in ((np.True_, np.False_), [np.bool_(True), False], (jnp.asarray(True), False)):
    layer = NeighborhoodAttention2D(16, 2, 3, is_causal=causal, rngs=rngs(0))
    assert layer.is_causal == (True, False)
    assert all(type(c) is bool for c in layer.is_causal)
    np.testing.assert_array_equal(np.asarray(layer(x)), want)
  assert NeighborhoodAttention2D(16, 2, 3, is_causal=np.True_,
                                 rngs=rngs(0)).is_causal == (True, True)
  with pytest.raises(ValueError, match="must be a bool, got 1"):
    NeighborhoodAttention2D(16, 2, 3, is_causal=(1, 0), rngs=rngs(0))
  with pytest.raises(ValueError, match="has 3 entries; expected a bool or 2 bools"):
    NeighborhoodAttention2D(16, 2, 3, is_causal=(True, True, True), rngs=rngs(0))
