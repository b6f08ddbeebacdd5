"""``attnjax.attention(impl="chunked")`` inside a user's ``jax.shard_map`` with ``check_vma`` on
(the default): the backend's loop carries and branches are typed as varying with the device's
inputs, so it traces, and each device's result equals attention on its own shard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import attnjax as aj
from attnjax import masks as M
from attnjax.backends.chunked import ChunkedBackend


@pytest.mark.parametrize("fixed_max,band", [(True, False), (False, False), (True, True)],
                         ids=["fixed_max", "online", "band"])
def test_chunked_in_user_shard_map(fixed_max, band):
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  rng = np.random.default_rng(0)
  B, T, Hq, Hkv, D = 4, 48, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(B, T, Hq, D)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(B, T, Hkv, D)), jnp.float32) for _ in range(2))
  sinks = jnp.asarray(rng.normal(size=(Hq,)), jnp.float32)
  slopes = jnp.asarray(rng.uniform(0.1, 1.0, size=(Hq,)), jnp.float32)
  seg = jnp.asarray(np.repeat([[0, 1, 2]], B, 0).repeat(16, 1), jnp.int32)
  be = ChunkedBackend(block_q=16, block_kv=16, fixed_max=fixed_max, band=band, band_step=8)
  mask = M.causal() & M.sliding_window(20, 0)

  def attn(q, k, v, sinks, slopes, seg):
    return aj.attention(q, k, v, mask=mask, sinks=sinks, segment_ids=seg, impl=be,
                        score_mod=aj.scores.alibi(slopes))

  spec = P("data")
  sharded = jax.shard_map(attn, mesh=mesh, in_specs=(spec, spec, spec, P(), P(), spec),
                          out_specs=spec)     # check_vma defaults to True
  put = lambda x, sp: jax.device_put(x, NamedSharding(mesh, sp))
  args = (put(q, spec), put(k, spec), put(v, spec), put(sinks, P()), put(slopes, P()),
          put(seg, spec))

  def loss(f, *a):
    out = f(*a)
    return jnp.sum(out * jnp.cos(out)), out

  # gradients include the replicated sinks and ALiBi slopes (summed over the devices)
  grad = lambda f: jax.jit(jax.grad(lambda *a: loss(f, *a), argnums=(0, 1, 2, 3, 4),
                                    has_aux=True))
  g_got, out_got = grad(sharded)(*args)
  g_want, out_want = grad(attn)(q, k, v, sinks, slopes, seg)
  np.testing.assert_allclose(np.asarray(out_got), np.asarray(out_want), rtol=1e-5, atol=1e-6)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
