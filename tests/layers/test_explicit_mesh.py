"""Layers under an explicit-axes mesh (``jax.make_mesh``'s default axis type): parameters
sharded over ``tensor`` by their logical axes, activations typed with shardings, and the result
equal to the unsharded layer. Before the fix, the output projection (contracting the sharded
heads) and MLA's shared RoPE key raised ``ShardingTypeError``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax as aj
from attnjax import layers, masks

LAYERS = {
    "mha_causal": lambda r: layers.MultiHeadAttention(4, 32, causal=True, rngs=r),
    "gqa_sinks_gate": lambda r: layers.MultiHeadAttention(
        4, 32, num_kv_heads=2, causal=True, sinks=True, gate="headwise", rngs=r),
    "gqa_chunked": lambda r: layers.MultiHeadAttention(
        4, 32, num_kv_heads=2, causal=True, impl="chunked", rngs=r),
    "mha_rope_qknorm": lambda r: layers.MultiHeadAttention(
        4, 32, causal=True, rope_theta=10000.0, qk_norm=True, rngs=r),
    "mla": lambda r: layers.MultiHeadLatentAttention(
        4, 32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, rngs=r),
    "mla_absorbed": lambda r: layers.MultiHeadLatentAttention(
        4, 32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, absorb=True, rngs=r),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_under_an_explicit_tensor_mesh_matches_unsharded(name):
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py simulates 8)")
  make = LAYERS[name]
  x = jax.random.normal(jax.random.key(3), (2, 24, 32), jnp.float32)
  want = make(nnx.Rngs(0))(x)
  mesh = jax.make_mesh((2,), ("tensor",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    layer = make(nnx.Rngs(0))
    sharded = [p for p in jax.tree.leaves(nnx.state(layer, nnx.Param))
               if "tensor" in tuple(jax.typeof(p).sharding.spec)]
    assert sharded, "no parameter is sharded over 'tensor': the test would not exercise it"
    got = layer(x)
    got_jit = nnx.jit(lambda m, x: m(x))(layer, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(got_jit), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_attention_on_explicitly_sharded_heads(impl):
  """``attnjax.attention`` on inputs sharded over heads with an explicit mesh: same output and
  LSE as unsharded, and the output keeps the heads' sharding."""
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices")
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (2, 40, 4, 8))
  k = jax.random.normal(ks[1], (2, 40, 2, 8))
  v = jax.random.normal(ks[2], (2, 40, 2, 8))
  mask = masks.causal() & masks.sliding_window(9, 0)
  want = aj.attention(q, k, v, mask=mask, impl=impl, return_lse=True)
  mesh = jax.make_mesh((2,), ("tensor",), axis_types=(jax.sharding.AxisType.Explicit,))
  P = jax.sharding.PartitionSpec
  with jax.set_mesh(mesh):
    qs, ksh, vs = (jax.sharding.reshard(x, P(None, None, "tensor", None)) for x in (q, k, v))
    out, lse = jax.jit(lambda q, k, v: aj.attention(q, k, v, mask=mask, impl=impl,
                                                    return_lse=True))(qs, ksh, vs)
    assert tuple(jax.typeof(out).sharding.spec)[:3] == (None, None, "tensor")
    loss = lambda q, k, v: jnp.sum(aj.attention(q, k, v, mask=mask, impl=impl) ** 2)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(qs, ksh, vs)
  want_grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=5e-5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want[0]), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(want[1]), atol=2e-5, rtol=2e-5)


DECODE_LAYERS = {
    "gqa_rope_sinks_gate": lambda r: layers.MultiHeadAttention(
        4, 32, num_kv_heads=2, causal=True, rope_theta=100.0, sinks=True, gate="headwise",
        rngs=r),
    "mha_window_ring": lambda r: layers.MultiHeadAttention(
        4, 32, causal=True, window=3, rngs=r),
    "moh": lambda r: layers.MixtureOfHeadsAttention(
        4, 32, num_kv_heads=2, num_shared_heads=1, top_k=2, causal=True, rngs=r),
    "s2": lambda r: layers.StridedHeadsAttention(4, 32, stride=2, local_window=2, rngs=r),
    "mla": lambda r: layers.MultiHeadLatentAttention(
        4, 32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, rngs=r),
}


def _out(y):
  return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("batch_sharded", [False, True], ids=["tensor", "data_x_tensor"])
@pytest.mark.parametrize("name", sorted(DECODE_LAYERS))
def test_kv_cache_decoding_under_an_explicit_tensor_mesh(name, batch_sharded):
  """KV-cache decoding under an explicit-axes mesh used to fail in the cache write (head-sharded
  keys scattered into a replicated cache: "Incompatible types for broadcasting") for every
  MultiHeadAttention-based layer. Now the cache is head-sharded like the keys, and a ragged
  prefill + steps (eager and nnx.jit) equal the parallel forward, sharded and unsharded.

  ``data_x_tensor``: tokens split over a data axis too, and the cache made with
  ``batch_axis="data"``, so each data replica holds only its examples' cache (before, the cache
  was replicated over the data axis)."""
  if len(jax.devices()) < (4 if batch_sharded else 2):
    pytest.skip("needs 4 devices (tests/conftest.py simulates 8)")
  make = DECODE_LAYERS[name]
  B, L = 2, 9
  x = jax.random.normal(jax.random.key(5), (B, L, 32), jnp.float32)
  want = np.asarray(_out(make(nnx.Rngs(0))(x)))
  explicit = jax.sharding.AxisType.Explicit
  if batch_sharded:
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(explicit,) * 2)
  else:
    mesh = jax.make_mesh((2,), ("tensor",), axis_types=(explicit,))
  step = nnx.jit(lambda m, xb, c, n: m.decode(xb, c, num_new=n))
  with jax.set_mesh(mesh):
    if batch_sharded:
      x = jax.sharding.reshard(x, jax.sharding.PartitionSpec("data"))
    layer = make(nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(_out(layer(x))), want, atol=2e-5, rtol=2e-5)
    cache = layer.init_cache(B, L, batch_axis="data" if batch_sharded else None)
    batch_spec = "data" if batch_sharded else None
    for leaf in jax.tree.leaves(cache):
      assert tuple(jax.typeof(leaf).sharding.spec)[:1] in ((batch_spec,), ())
    if isinstance(cache, layers.common.KVCache) and getattr(layer, "num_kv_heads", 1) > 1:
      assert tuple(jax.typeof(cache.k).sharding.spec)[:3] == (batch_spec, None, "tensor")
    lens = np.array([5, 3])
    y, cache = layer.decode(x[:, :5], cache, num_new=jnp.asarray(lens))   # eager prefill
    y = np.asarray(_out(y))
    for b in range(B):
      np.testing.assert_allclose(y[b, :lens[b]], want[b, :lens[b]], atol=2e-5,
                                 rtol=2e-5)
    cur = lens.copy()
    for size in (1, 3, 1):
      nn = np.minimum(size, L - cur)
      xb = np.zeros((B, size, 32), np.float32)
      for b in range(B):
        xb[b, :nn[b]] = np.asarray(x)[b, cur[b]:cur[b] + nn[b]]
      xb = jnp.asarray(xb)
      if batch_sharded:
        xb = jax.sharding.reshard(xb, jax.sharding.PartitionSpec("data"))
      y, cache = step(layer, xb, cache, jnp.asarray(nn, jnp.int32))
      y = np.asarray(_out(y))
      for leaf in jax.tree.leaves(cache):   # the updated cache keeps the batch split
        assert tuple(jax.typeof(leaf).sharding.spec)[:1] in ((batch_spec,), ())
      for b in range(B):
        np.testing.assert_allclose(np.asarray(y[b, :nn[b]]), want[b, cur[b]:cur[b] + nn[b]],
                                   atol=2e-5, rtol=2e-5)
      cur += nn
  np.testing.assert_array_equal(np.asarray(cache.length), cur)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_gqa_replicates_kv_heads_the_tensor_axis_does_not_divide(axis_type):
  """8 query heads / 2 KV heads on a tensor axis of 4 used to crash at construction inside JAX
  (IndivisibleError / "does not evenly divide"). The KV heads are now replicated (the query
  heads stay split), and the layer equals the unsharded one, decoding included. 4 KV heads on
  4 devices stay sharded."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (tests/conftest.py simulates 8)")
  make = lambda hkv: layers.MultiHeadAttention(8, 32, num_kv_heads=hkv, causal=True,
                                               rope_theta=100.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(6), (2, 6, 32), jnp.float32)
  want = np.asarray(make(2)(x))
  mesh = jax.make_mesh((4,), ("tensor",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  with jax.set_mesh(mesh):
    layer = make(2)
    spec = lambda p: tuple(p[...].sharding.spec) + (None,) * (p[...].ndim - len(
        p[...].sharding.spec))
    assert spec(layer.key.kernel) == spec(layer.value.kernel) == (None, None, None)
    assert spec(layer.query.kernel) == (None, "tensor", None)
    assert tuple(nnx.get_partition_spec(nnx.state(layer))["key"]["kernel"].get_value()) == \
        (None, None, None)
    np.testing.assert_allclose(np.asarray(layer(x)), want, atol=2e-5, rtol=2e-5)
    y, _ = layer.decode(x, layer.init_cache(2, 6))
    np.testing.assert_allclose(np.asarray(y), want, atol=2e-5, rtol=2e-5)
    assert spec(make(4).key.kernel) == (None, "tensor", None)
