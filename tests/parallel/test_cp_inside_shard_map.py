"""The strategy functions inside a user's own ``jax.shard_map`` (check_vma on), with custom
positions, equal single-device attention."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from attnjax import masks as M
from attnjax import parallel
from cp_helpers import compare, inputs, reference, run_cp


def test_ring_inside_user_shard_map_with_custom_positions():
  mesh = jax.make_mesh((2, 4), ("data", "sp"))
  B, T, Hq, Hkv, D = 2, 48, 4, 2, 8
  q, k, v, s, seg, g_out, g_lse = inputs(3, B, T, Hq, Hkv, D, D, sinks=True, segments=True)
  # Any static layout works: here a random permutation of the sequence.
  perm = np.random.default_rng(3).permutation(T)
  mask = M.sliding_window(9, 4) | M.chunked(16)
  spec = P("data", "sp")

  def fn(q, k, v, s, seg):
    @jax.shard_map(mesh=mesh, in_specs=(spec, spec, spec, P(), spec),
                   out_specs=(spec, spec))
    def user_step(q, k, v, s, seg):
      q = q * 1.0  # the user's own per-shard work around attention
      return parallel.ring_attention(q, k, v, axis="sp", mask=mask, sinks=s, segment_ids=seg,
                                     positions=perm, return_lse=True)
    put = lambda x, sp: jax.reshard(x, NamedSharding(mesh, sp))
    return user_step(put(q, spec), put(k, spec), put(v, spec), put(s, P()), put(seg, spec))

  got = run_cp(fn, perm, q, k, v, s, seg, g_out, g_lse)
  compare(got, reference(q, k, v, s, seg, g_out, g_lse, mask))


def test_ulysses_and_all_gather_inside_user_shard_map_forward():
  mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,))
  B, T, Hq, Hkv, D = 1, 32, 4, 4, 8
  q, k, v, *_ = inputs(4, B, T, Hq, Hkv, D, D, sinks=False, segments=False)
  perm = parallel.load_balance_permutation(T, 4, "zigzag")
  spec = P(None, "sp")

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, spec))
  def f(q, k, v):
    kw = dict(axis="sp", mask=M.causal(), load_balance="zigzag")
    return (parallel.ulysses_attention(q, k, v, **kw),
            parallel.context_parallel_attention(q, k, v, strategy="all_gather", **kw))

  a, b = f(*(x.take(perm, axis=1) for x in (q, k, v)))
  want = reference(q, k, v, None, None, np.zeros((B, T, Hq, D), np.float32),
                   np.zeros((B, T, Hq), np.float32), M.causal())[0]
  inv = parallel.inverse_permutation(perm)
  np.testing.assert_allclose(np.asarray(a).take(inv, axis=1), want, atol=2e-5)
  np.testing.assert_allclose(np.asarray(b).take(inv, axis=1), want, atol=2e-5)
  assert jnp.asarray(a).dtype == jnp.float32
