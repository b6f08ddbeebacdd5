"""Shared layer building blocks: RoPE, RMSNorm, projections, sharding annotations, caches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.layers import common
from layers_reference import rand, rope_complex


def test_rope_matches_complex_rotation():
  x = rand(0, (2, 7, 3, 8))
  pos = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 7)), jnp.int32)
  got = common.apply_rope(x, pos, 500.0)
  np.testing.assert_allclose(got, rope_complex(x, pos, 500.0), atol=1e-5, rtol=1e-5)
  # [T] positions broadcast over the batch
  got1 = common.apply_rope(x, np.arange(7), 10000.0)
  np.testing.assert_allclose(got1, rope_complex(x, np.arange(7), 10000.0), atol=1e-5, rtol=1e-5)


def test_rope_logits_depend_only_on_distance():
  q, k = rand(1, (1, 1, 1, 8)), rand(2, (1, 1, 1, 8))
  dots = []
  for shift in (0, 5, 17):
    qr = common.apply_rope(q, jnp.array([[9 + shift]]), 10000.0)
    kr = common.apply_rope(k, jnp.array([[4 + shift]]), 10000.0)
    dots.append(float(jnp.sum(qr * kr)))
  np.testing.assert_allclose(dots, dots[0], rtol=1e-5)


def test_rope_rejects_odd_dim():
  with pytest.raises(ValueError, match="even"):
    common.apply_rope(rand(0, (1, 2, 1, 3)), np.arange(2))


def test_rmsnorm_and_projection():
  x = rand(3, (2, 5, 6))
  n = common.RMSNorm(6)
  n.scale[...] = rand(4, (6,))
  want = x / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6) * n.scale[...]
  np.testing.assert_allclose(n(x), want, atol=1e-5, rtol=1e-5)
  p = common.Projection((6,), (2, 3), ("embed",), ("heads", "head_dim"), use_bias=True,
                        rngs=nnx.Rngs(0))
  p.bias[...] = rand(5, (2, 3))
  want = np.einsum("btc,chd->bthd", x, p.kernel[...]) + p.bias[...]
  np.testing.assert_allclose(p(x), want, atol=1e-5, rtol=1e-5)
  assert p(x.astype(jnp.bfloat16)).dtype == jnp.float32  # computes in its dtype
  pb = common.Projection((6,), (4,), ("embed",), (None,), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert pb(x).dtype == jnp.bfloat16 and pb.kernel[...].dtype == jnp.float32


def test_partition_annotations_use_axis_rules():
  p = common.Projection((8,), (4, 2), ("embed",), ("heads", "head_dim"), rngs=nnx.Rngs(0))
  spec = nnx.get_partition_spec(nnx.state(p))["kernel"].get_value()
  assert tuple(spec) == (None, "tensor", None)
  assert common.mesh_axes("heads", "kv_heads", "embed", None) == ("tensor", "tensor", None, None)
  with pytest.raises(ValueError, match="logical axis"):
    common.mesh_axes("nonsense")


def test_eager_sharding_under_a_mesh():
  mesh = jax.make_mesh((1,), ("tensor",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    p = common.Projection((8,), (4, 2), ("embed",), ("heads", "head_dim"), rngs=nnx.Rngs(0))
  assert p.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)


def test_validation_helpers_name_the_argument():
  with pytest.raises(ValueError, match="gate='x'.*'headwise'"):
    common.check_choice("gate", "x", (None, "headwise"))
  with pytest.raises(ValueError, match="dtype"):
    common.canonical_dtype("dtype", "int8")
  assert common.canonical_dtype("dtype", "bfloat16") == jnp.bfloat16
  with pytest.raises(ValueError, match="num_heads=6 must be divisible by num_kv_heads=4"):
    common.check_divisible("num_heads", 6, "num_kv_heads", 4)
  with pytest.raises(ValueError, match="impl"):
    common.check_impl(3)


def test_cache_step_ring_buffer():
  B, S = 2, 4
  buf = jnp.zeros((B, S, 1), jnp.float32)
  pos = jnp.full((B, S), -1, jnp.int32)
  length = jnp.zeros((B,), jnp.int32)
  # ragged prefill of 6 tokens (example 1 has 3) into a 4-slot ring with window_left=3
  new = (jnp.arange(12, dtype=jnp.float32).reshape(B, 6, 1) + 1,)
  step = jax.jit(common.cache_step, static_argnums=5)
  st = step((buf,), new, pos, length, jnp.array([6, 3]), 3)
  # T + window_left > S: attends over old cache + the new tokens
  assert st.attn[0].shape == (B, S + 6, 1)
  np.testing.assert_array_equal(st.length, [6, 3])
  np.testing.assert_array_equal(st.q_segment_ids, [[1] * 6, [1, 1, 1, 0, 0, 0]])
  # example 0 keeps positions 2..5 in slots 2,3,0,1; example 1 positions 0..2
  np.testing.assert_array_equal(st.pos, [[4, 5, 2, 3], [0, 1, 2, -1]])
  np.testing.assert_array_equal(st.buffers[0][..., 0], [[5, 6, 3, 4], [7, 8, 9, 0]])
  # a single-token step fits the ring: written first, attention reads the cache alone
  st2 = step(st.buffers, (jnp.ones((B, 1, 1)),), st.pos, st.length, None, 3)
  assert st2.attn[0].shape == (B, S, 1)
  np.testing.assert_array_equal(st2.pos, [[4, 5, 6, 3], [0, 1, 2, 3]])
  np.testing.assert_array_equal(st2.q_positions, [[6], [3]])


def test_cache_step_rejects_what_would_give_wrong_numbers():
  """No window: more new tokens than slots raises (a shape fact, also under jit); concrete
  num_new outside [0, T] raises, traced ones are clipped; an eager overflow raises. A ring
  smaller than the look-back (init_cache with max_length < window) raises once it has evicted
  keys still in the window; a ring of window slots takes any chunk length."""
  B, S = 1, 3
  buf = (jnp.zeros((B, S, 1), jnp.float32),)
  pos = jnp.full((B, S), -1, jnp.int32)
  new = lambda T: (jnp.arange(T, dtype=jnp.float32).reshape(B, T, 1) + 1,)
  step = jax.jit(common.cache_step, static_argnums=5)
  with pytest.raises(ValueError, match="4 new tokens do not fit the KV cache: it holds 3"):
    step(buf, new(4), pos, jnp.zeros((B,), jnp.int32), None, None)
  with pytest.raises(ValueError, match=r"num_new=\[3\] must lie in \[0, T\] with T=2"):
    common.cache_step(buf, new(2), pos, jnp.zeros((B,), jnp.int32), jnp.asarray([3]), None)
  st = step(buf, new(2), pos, jnp.zeros((B,), jnp.int32), jnp.asarray([5]), None)
  np.testing.assert_array_equal(st.length, [2])   # clipped under jit
  with pytest.raises(ValueError, match=r"overflows: cache length \[2\] \+ num_new \[2\]"):
    common.cache_step(st.buffers, new(2), st.pos, st.length, None, None)
  # a 3-slot ring under a look-back of 4: exact until something in the window is evicted
  st = common.cache_step(buf, new(4), pos, jnp.zeros((B,), jnp.int32), None, 4)
  assert st.attn[0].shape == (B, S + 4, 1)   # old cache + the new tokens: this call is exact
  with pytest.raises(ValueError, match="has evicted keys still in the window"):
    common.cache_step(st.buffers, new(1), st.pos, st.length, None, 4)
  # a ring of window slots (S = window_left + 1) takes a chunk longer than itself
  st = common.cache_step(buf, new(5), pos, jnp.zeros((B,), jnp.int32), None, 2)
  st = common.cache_step(st.buffers, new(1), st.pos, st.length, None, 2)
  np.testing.assert_array_equal(st.pos, [[3, 4, 5]])


def test_real_and_bool_checks_accept_numpy_and_jax_scalars():
  for v in (0.5, np.float32(0.5), np.float64(0.5), jnp.float32(0.5), jnp.bfloat16(0.5),
            np.asarray(0.5)):
    assert common.check_real("alpha", v, 0.0, 1.0) == 0.5
  assert common.check_real("alpha", np.int64(1), 0.0, 1.0) == 1.0
  for bad in (True, np.True_, jnp.asarray(True), "0.5", [0.5], 1 + 0j):
    with pytest.raises(ValueError, match="alpha must be a real number in"):
      common.check_real("alpha", bad, 0.0, 1.0)
  with pytest.raises(ValueError, match=r"alpha must be a finite real number in \[0.0, 1.0\], "
                     r"got 1.5"):
    common.check_real("alpha", np.float32(1.5), 0.0, 1.0)
  for v, want in ((True, True), (np.False_, False), (jnp.asarray(True), True)):
    assert common.check_bool("flag", v) is want
  for bad in (1, 0, np.int32(1), 1.0, "yes", None):
    with pytest.raises(ValueError, match="flag must be a bool"):
      common.check_bool("flag", bad)


def test_shard_cache_batch_splits_the_batch_and_rejects_what_it_cannot_split():
  """``batch_axis`` of init_cache: the batch axis of every cache array goes to the named mesh
  axis (explicit meshes: resharded; auto meshes: constrained); bad requests raise naming it."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (tests/conftest.py simulates 8)")
  P = jax.sharding.PartitionSpec
  cache = common.KVCache.create(4, 6, 2, 8)
  assert common.shard_cache_batch(cache, None) is cache
  with pytest.raises(ValueError, match="needs an active mesh"):
    common.shard_cache_batch(cache, "data")
  for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
      out = common.shard_cache_batch(cache, "data")
      for leaf in jax.tree.leaves(out):
        assert leaf.sharding.spec[0] == "data", leaf.sharding
        assert leaf.sharding.num_devices == 4
      both = common.shard_cache_batch(cache, ("data", "tensor"))
      assert both.k.sharding.spec[0] == ("data", "tensor")
      with pytest.raises(ValueError, match=r"\['model'\] not in the mesh axes"):
        common.shard_cache_batch(cache, "model")
      with pytest.raises(ValueError, match="does not divide the cache's batch size 3"):
        common.shard_cache_batch(common.KVCache.create(3, 6, 2, 8), "data")
      with pytest.raises(ValueError, match="batch_axis must be a mesh axis name"):
        common.shard_cache_batch(cache, 0)
  explicit = jax.make_mesh((2, 2), ("data", "tensor"),
                           axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with jax.set_mesh(explicit):
    heads = jax.sharding.reshard(cache.k, P(None, None, "tensor"))
    with pytest.raises(ValueError, match="already used by another axis"):
      common.shard_cache_batch(heads, "tensor")


def test_shard_cache_batch_not_strict_leaves_what_it_cannot_split():
  """``strict=False`` (generate following a prompt's sharding): an axis already used by the heads,
  or one that does not divide the batch, leaves the batch axis as it is instead of raising."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (tests/conftest.py simulates 8)")
  P = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((2, 2), ("data", "tensor"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    cache = common.KVCache.create(4, 6, 2, 8)
    cache = common.KVCache(jax.sharding.reshard(cache.k, P(None, None, "tensor")),
                           cache.v, cache.pos, cache.length)
    out = common.shard_cache_batch(cache, "tensor", strict=False)
    assert tuple(out.k.sharding.spec)[:3] == (None, None, "tensor")   # heads keep "tensor"
    assert out.v.sharding.spec[0] == "tensor"                        # free there: split
    odd = common.KVCache.create(3, 6, 2, 8)
    assert common.shard_cache_batch(odd, "data", strict=False) is odd
