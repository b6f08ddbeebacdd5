"""Tensor-parallel sharding annotations of the vision layers (``common.partitioned``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.layers import (AgentAttention, CascadedGroupAttention, ChannelAttention,
                            HiLoAttention, NeighborhoodAttention1D, NeighborhoodAttention2D,
                            NeighborhoodAttention3D, SpatialReductionAttention, WindowAttention)

T = "tensor"
C, H = 8, 2  # dim, heads

# name -> (constructor, input shape, {param path: expected mesh axes}); every other Param must be
# annotated and fully replicated.
CASES = {
    "window": (lambda r: WindowAttention(C, H, 2, shift_size=1, rngs=r), (1, 4, 4, C),
               {("proj", "kernel"): (T, None), ("relative_position_bias_table",): (None, T)}),
    "neighborhood1d": (lambda r: NeighborhoodAttention1D(C, H, 3, rel_pos_bias=True, rngs=r),
                       (1, 6, C), {("proj", "kernel"): (T, None), ("rpb",): (T, None)}),
    "neighborhood2d": (lambda r: NeighborhoodAttention2D(C, H, 3, rel_pos_bias=True, rngs=r),
                       (1, 4, 4, C), {("proj", "kernel"): (T, None), ("rpb",): (T, None, None)}),
    "neighborhood3d": (lambda r: NeighborhoodAttention3D(C, H, 2, rel_pos_bias=True, rngs=r),
                       (1, 2, 3, 3, C),
                       {("proj", "kernel"): (T, None), ("rpb",): (T, None, None, None)}),
    "hilo": (lambda r: HiLoAttention(C, H, window_size=2, alpha=0.5, qkv_bias=True, rngs=r),
             (1, 4, 4, C), {}),
    "agent": (lambda r: AgentAttention(C, H, agent_num=4, grid_size=(4, 4), sr_ratio=2,
                                       bias_table_size=3, qkv_bias=True, rngs=r),
              (1, 4, 4, C),
              {("q", "kernel"): (None, T), ("q", "bias"): (T,), ("proj", "kernel"): (T, None),
               **{(n,): (T, None, None, None) for n in
                  ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")}}),
    "spatial_reduction": (lambda r: SpatialReductionAttention(C, H, sr_ratio=2, qkv_bias=True,
                                                              rngs=r),
                          (1, 4, 4, C),
                          {("q", "kernel"): (None, T), ("q", "bias"): (T,),
                           ("proj", "kernel"): (T, None)}),
    "spatial_reduction_linear": (lambda r: SpatialReductionAttention(C, H, linear=True,
                                                                     pool_size=2, rngs=r),
                                 (1, 4, 4, C),
                                 {("q", "kernel"): (None, T), ("proj", "kernel"): (T, None)}),
    "cascaded": (lambda r: CascadedGroupAttention(C, H, key_dim=4, kernels=3, resolution=4,
                                                  rngs=r),
                 (1, 4, 4, C),
                 {("proj", "kernel"): (T, None), ("attention_biases",): (T, None)}),
    "channel": (lambda r: ChannelAttention(C, H, qkv_bias=True, rngs=r), (1, 5, C),
                {("proj", "kernel"): (T, None)}),
}


def _flat_specs(layer):
  spec = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  return {tuple(path): tuple(v.get_value()) for path, v in nnx.to_flat_state(spec)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vision_param_partition_specs(name):
  make, _, expected = CASES[name]
  layer = make(nnx.Rngs(0))
  specs = _flat_specs(layer)
  for path, axes in expected.items():
    assert specs[path] == axes, (path, specs[path])
  for path, axes in specs.items():
    if path not in expected:
      assert all(a is None for a in axes), (path, axes)
  # Every parameter carries an annotation (made by common.partitioned), none is left implicit.
  for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    meta = var.get_metadata()
    assert "out_sharding" in meta, path
    assert len(meta["out_sharding"]) == var.get_value().ndim, path
    assert meta["eager_sharding"] is False, path  # metadata only without a mesh


@pytest.mark.parametrize("name", sorted(CASES))
def test_vision_layer_builds_and_runs_under_a_tensor_mesh(name):
  make, shape, expected = CASES[name]
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  want = make(nnx.Rngs(0))(x)
  # Eager sharding under a mesh (as test_common.test_eager_sharding_under_a_mesh checks).
  mesh = jax.make_mesh((1,), (T,), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    layer = make(nnx.Rngs(0))
  for path, axes in expected.items():
    param = layer
    for key in path:
      param = getattr(param, key)
    assert param[...].sharding.spec == jax.sharding.PartitionSpec(*axes), path
  # The layer runs with its sharded parameters under a (GSPMD-propagated) tensor mesh; the
  # annotations change neither the initial values nor the result.
  mesh = jax.make_mesh((1,), (T,), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    layer = make(nnx.Rngs(0))
    got = layer(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_vision_layer_under_an_explicit_tensor_mesh_matches_unsharded(name):
  """Under a 2-device explicit-axes mesh (``jax.make_mesh``'s default axis type) the layer
  builds with parameters sharded over ``tensor``, type-checks (reshapes that split sharded
  channels into heads, projections contracting sharded heads, per-head tables) and equals the
  unsharded layer, eagerly and under ``nnx.jit``."""
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py simulates 8)")
  make, shape, expected = CASES[name]
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  want = make(nnx.Rngs(0))(x)
  mesh = jax.make_mesh((2,), (T,), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    layer = make(nnx.Rngs(0))
    sharded = [p for p in jax.tree.leaves(nnx.state(layer, nnx.Param))
               if T in tuple(jax.typeof(p).sharding.spec)]
    assert bool(sharded) == bool(expected), "parameters sharded over 'tensor' as annotated"
    got = layer(x)
    got_jit = nnx.jit(lambda m, x: m(x))(layer, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(got_jit), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape_in,spec_in,shape_out,spec_out", [
    ((4, 8), (None, T), (4, 2, 4), (None, T, None)),       # channels -> (heads@, head_dim)
    ((4, 6), (T, None), (24,), (T,)),                      # merge behind a sharded leading axis
    ((2, 3, 8), (None, None, T), (6, 2, 4), (None, T, None)),
    ((4, 6), (None, T), (24,), (None,)),                   # sharded axis not leading: gathered
    ((4, 6), (None, T), (4, 3, 2), (None, None, None)),    # 3 not divisible by 2: gathered
    ((4, 8), (None, T), (4, -1, 4), (None, T, None)),      # -1 resolved
    ((1, 8), (None, T), (8,), (T,)),                       # size-1 axes ignored
    ((8,), (T,), (1, 2, 1, 4), (None, T, None, None)),
])
def test_common_reshape_keeps_or_gathers_sharding(shape_in, spec_in, shape_out, spec_out):
  from attnjax.layers import common
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices")
  mesh = jax.make_mesh((2,), (T,), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  x = np.arange(np.prod(shape_in), dtype=np.float32).reshape(shape_in)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec_in)))
    y = common.reshape(xs, shape_out)
    assert tuple(jax.typeof(y).sharding.spec) == spec_out
  np.testing.assert_array_equal(np.asarray(y), x.reshape(shape_out))
