"""Bad input raises errors that name the violated constraint."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from attnjax import masks as M
from attnjax import parallel

B, T, D = 2, 64, 8


def _qkv(T=T, Hq=4, Hkv=2, B=B):
  rng = np.random.default_rng(0)
  return (rng.standard_normal((B, T, Hq, D)).astype(np.float32),
          rng.standard_normal((B, T, Hkv, D)).astype(np.float32),
          rng.standard_normal((B, T, Hkv, D)).astype(np.float32))


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("sp",))


@pytest.fixture(scope="module")
def mesh2d():
  return jax.make_mesh((2, 4), ("data", "sp"))


@pytest.mark.parametrize("strategy", ["ring", "all_gather", "ulysses"])
def test_sequence_not_divisible_by_axis(mesh, strategy):
  q, k, v = _qkv(T=60, Hq=8)
  with pytest.raises(ValueError, match=r"sequence length \(60\) must be divisible by the size "
                                       r"of mesh axis 'sp' \(8\)"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh, axis="sp", strategy=strategy)


def test_zigzag_needs_two_chunks_per_shard(mesh):
  q, k, v = _qkv(T=72)
  with pytest.raises(ValueError, match=r"zigzag .* divisible by 2 \* num_shards = 16"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh, axis="sp", load_balance="zigzag")


def test_usp_sequence_divisibility_names_both_axes(mesh2d):
  q, k, v = _qkv(T=36)
  with pytest.raises(ValueError, match=r"mesh axes \('sp', 'data'\) \(8\)"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh2d, axis="sp", strategy="usp",
                                        ulysses_axis="data")


def test_unknown_axis(mesh, mesh2d):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"axis 'seq' is not an axis of the mesh"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh, axis="seq")
  with pytest.raises(ValueError, match=r"batch_axis 'dp' is not an axis of the mesh"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh2d, axis="sp", batch_axis="dp")
  with pytest.raises(ValueError, match=r"axis 'ring' is not an axis of the mesh"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh2d, axis="ring", strategy="usp",
                                        ulysses_axis="sp")


def test_unknown_axis_inside_shard_map(mesh):
  q, k, v = _qkv()

  @jax.shard_map(mesh=mesh, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
  def f(q, k, v):
    return parallel.ring_attention(q, k, v, axis="seq", mask=M.causal())

  with pytest.raises(ValueError, match=r"axis 'seq' is not a mesh axis bound here"):
    jax.jit(f).trace(*(jax.reshard(x, jax.NamedSharding(mesh, P(None, "sp")))
                       for x in (q, k, v)))


def test_ulysses_heads_not_divisible(mesh, mesh2d):
  q, k, v = _qkv(Hq=4, Hkv=2)
  with pytest.raises(ValueError, match=r"number of query heads \(4\) divisible by the size of "
                                       r"mesh axis 'sp' \(8\)"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh, axis="sp", strategy="ulysses")
  q, k, v = _qkv(Hq=12, Hkv=3)
  with pytest.raises(ValueError, match=r"key/value heads \(3\) to divide or be divisible by "
                                       r"the size of mesh axis 'sp' \(4\)"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh2d, axis="sp", strategy="ulysses")
  q, k, v = _qkv(Hq=6, Hkv=2)
  with pytest.raises(ValueError, match=r"query heads \(6\) divisible by the size of mesh axis "
                                       r"'sp' \(4\)"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh2d, axis="data", strategy="usp",
                                        ulysses_axis="sp")


def test_other_bad_arguments(mesh, mesh2d):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="unknown strategy"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh, strategy="tree")
  with pytest.raises(ValueError, match="needs ulysses_axis"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh, strategy="usp")
  with pytest.raises(ValueError, match=r"batch size \(3\) must be divisible by the size of "
                                       r"batch_axis 'data' \(2\)"):
    q3, k3, v3 = _qkv(B=3)
    parallel.context_parallel_attention(q3, k3, v3, mesh=mesh2d, axis="sp", batch_axis="data")
  with pytest.raises(ValueError, match="same sequence length"):
    parallel.context_parallel_attention(q, k[:, :32], v[:, :32], mesh=mesh)
  with pytest.raises(ValueError, match="either load_balance= or positions="):
    parallel.context_parallel_attention(q, k, v, mesh=mesh, load_balance="zigzag",
                                        positions=np.arange(T))
  with pytest.raises(ValueError, match=r"sinks must have shape \[num_q_heads\] = \[4\]"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh, sinks=np.zeros(3, np.float32))
  with pytest.raises(ValueError, match="neighborhood mask over spatial_shape"):
    parallel.context_parallel_attention(q, k, v, mesh=mesh, mask=M.neighborhood((4, 4), 3))


def test_positions_must_be_static(mesh):
  q, k, v = _qkv()

  def f(q, k, v, pos):
    return parallel.context_parallel_attention(q, k, v, mesh=mesh, positions=pos)

  with pytest.raises(TypeError, match="positions must be static"):
    jax.jit(f).trace(q, k, v, np.arange(T))
  with pytest.raises(ValueError, match=r"positions must be integers of shape \[seq_len\] = \[64\]"):
    f(q, k, v, np.arange(32))
