"""Causal neighborhood attention as a decoder: KV-cache decoding (prefill + steps, ragged batch)
equals the parallel forward over the full grid, and the CAB prefix property holds for 1-D causal
NA (output at i is unchanged when the tokens after i are removed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.layers.neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D


def _decode_all(layer, x, grid, prefill, num_new_prefill):
  """Prefill ``prefill`` tokens (``num_new_prefill`` real per example), then one token per step
  until every example has produced the whole grid; returns per-position outputs [B, N, C]."""
  b, n, c = x.shape
  cache = layer.init_cache(b, grid)
  outs = np.zeros((b, n, c), np.float32)
  y, cache = layer.decode(x[:, :prefill], cache, grid, num_new=jnp.asarray(num_new_prefill))
  for e in range(b):
    outs[e, :num_new_prefill[e]] = np.asarray(y[e, :num_new_prefill[e]])
  step = nnx.jit(lambda layer, xt, cache, live: layer.decode(xt, cache, grid, num_new=live))
  while True:
    length = np.asarray(cache.length)
    if (length >= n).all():
      break
    pos = np.minimum(length, n - 1)
    xt = x[np.arange(b), pos][:, None]
    live = jnp.asarray((length < n).astype(np.int32))
    y, cache = step(layer, xt, cache, live)
    for e in range(b):
      if length[e] < n:
        outs[e, length[e]] = np.asarray(y[e, 0])
  return outs


@pytest.mark.parametrize("cls,grid,kw", [
    (NeighborhoodAttention1D, (11,), dict(kernel_size=3, dilation=2, stride=1)),
    (NeighborhoodAttention1D, (9,), dict(kernel_size=4, dilation=1, stride=2)),
    (NeighborhoodAttention2D, (4, 5), dict(kernel_size=(2, 3), dilation=(1, 1), stride=(1, 2))),
])
def test_decode_equals_parallel_forward(cls, grid, kw):
  layer = cls(16, 2, is_causal=True, rel_pos_bias=True, rngs=nnx.Rngs(3), **kw)
  n = int(np.prod(grid))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, n, 16)), jnp.float32)
  full = layer(x.reshape((3,) + grid + (16,))).reshape(3, n, 16)
  got = _decode_all(layer, x, grid, prefill=5, num_new_prefill=[5, 2, 0])
  np.testing.assert_allclose(got, np.asarray(full), rtol=2e-5, atol=2e-5)


def test_prefix_invariance_1d_causal():
  layer = NeighborhoodAttention1D(16, 4, kernel_size=5, dilation=2, is_causal=True,
                                  rel_pos_bias=True, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 24, 16)), jnp.float32)
  full = np.asarray(layer(x))
  for m in (10, 17):
    np.testing.assert_allclose(np.asarray(layer(x[:, :m])), full[:, :m], rtol=2e-5, atol=2e-5)


def test_decode_needs_causal_axes():
  layer = NeighborhoodAttention2D(16, 2, kernel_size=3, is_causal=(True, False),
                                  rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="every axis causal"):
    layer.init_cache(1, (4, 4))
  causal = NeighborhoodAttention1D(16, 2, kernel_size=3, is_causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="grid_size"):
    causal.decode(jnp.ones((1, 1, 16)), causal.init_cache(1, (8,)), (9,))


def test_decode_checks_the_cache_and_the_number_of_tokens():
  """A cache of another batch / head layout raises naming its shapes (it used to fail in a
  broadcast); more new tokens than the grid holds raise (they used to give wrong outputs)."""
  layer = NeighborhoodAttention1D(16, 2, kernel_size=3, is_causal=True, rngs=nnx.Rngs(0))
  other = NeighborhoodAttention1D(16, 4, kernel_size=3, is_causal=True, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 16)), jnp.float32)
  for cache, shown in ((layer.init_cache(3, (8,)), r"k \[3, 8, 2, 8\]"),
                       (other.init_cache(2, (8,)), r"k \[2, 8, 4, 4\]")):
    with pytest.raises(ValueError, match=r"NeighborhoodAttention1D.decode: the cache does not "
                       r"fit.*" + shown + r".*expected k \[2, 8, 2, 8\]"):
      layer.decode(x, cache, (8,))
  long = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9, 16)), jnp.float32)
  with pytest.raises(ValueError, match="9 new tokens do not fit the KV cache: it holds 8"):
    layer.decode(long, layer.init_cache(2, (8,)), (8,))


def test_decode_with_a_batch_split_cache_under_an_explicit_mesh():
  """``init_cache(..., batch_axis="data")``: the cache is split over the data axis (each replica
  holds its own examples' keys/values) and decoding still equals the parallel forward."""
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py simulates 8)")
  grid = (9,)
  layer = NeighborhoodAttention1D(16, 2, kernel_size=3, is_causal=True, rngs=nnx.Rngs(3))
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9, 16)), jnp.float32)
  want = np.asarray(layer(x))
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  P = jax.sharding.PartitionSpec
  with jax.set_mesh(mesh):
    cache = layer.init_cache(2, grid, batch_axis="data")
    assert all(tuple(jax.typeof(a).sharding.spec)[0] == "data" for a in jax.tree.leaves(cache))
    xs = jax.sharding.reshard(x, P("data"))
    y0, cache = layer.decode(xs[:, :4], cache, grid)
    y1, cache = nnx.jit(lambda m, t, c: m.decode(t, c, grid))(layer, xs[:, 4:], cache)
    assert all(tuple(jax.typeof(a).sharding.spec)[0] == "data" for a in jax.tree.leaves(cache))
  got = np.concatenate([np.asarray(y0), np.asarray(y1)], axis=1)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
