"""Score mods as pytrees: equal built-in mods rebuilt per call share one jit trace; mods that
differ in static configuration do not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import attnjax as aj
from attnjax import scores as S


def test_rebuilt_builtin_mods_reuse_the_jit_trace():
  traces = []

  @jax.jit
  def f(q, mod):
    traces.append(mod.name)
    return aj.attention(q, q, q, score_mod=mod, impl="xla")

  q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 2, 4)), jnp.float32)
  table = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9)), jnp.float32)
  builders = [
      lambda i: S.alibi(jnp.full((2,), 0.1 * i)),
      lambda i: S.chain(S.alibi(jnp.full((2,), 0.1 * i)), S.softcap(3.0)),
      lambda i: S.relative_bias(table * i, 4),
      lambda i: S.low_rank_bias(jnp.full((1, 8, 2, 3), 0.1 * i), table[:1, :8, None, None] +
                                jnp.zeros((1, 8, 2, 3))),
  ]
  for build in builders:
    before = len(traces)
    outs = [f(q, build(i)) for i in range(3)]
    assert len(traces) == before + 1, traces
    # ...and the params still reach the computation: different values, different results.
    assert not np.allclose(np.asarray(outs[1]), np.asarray(outs[2]))
  # Static configuration is part of the identity: these retrace.
  before = len(traces)
  f(q, S.softcap(3.0))
  f(q, S.softcap(4.0))
  f(q, S.alibi(jnp.ones(2), symmetric=True))
  f(q, S.relative_bias(table[:, :8], 4, mode="t5"))
  assert len(traces) == before + 4
  np.testing.assert_allclose(
      np.asarray(f(q, S.softcap(4.0))),
      np.asarray(aj.attention(q, q, q, score_mod=S.softcap(4.0), impl="reference")),
      rtol=1e-5, atol=1e-6)
