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
