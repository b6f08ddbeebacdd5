"""The chunked backend's work follows the mask's block map, and its memory is O(T), not O(T^2).

These are structural checks (what is traced and compiled), not timings."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks as M
from attnjax.backends.chunked import ChunkedBackend


def _scan_lengths(jaxpr):
  lengths = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      lengths.append(int(eqn.params["length"]))
    for sub in _subjaxprs(eqn.params):
      lengths.extend(_scan_lengths(sub))
  return lengths


def _subjaxprs(params):
  for v in params.values():
    if isinstance(v, jax.extend.core.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jax.extend.core.Jaxpr):
      yield v
    elif isinstance(v, (tuple, list)):
      for x in v:
        if isinstance(x, jax.extend.core.ClosedJaxpr):
          yield x.jaxpr
        elif isinstance(x, jax.extend.core.Jaxpr):
          yield x


def _qkv(T, H=2, D=8):
  rng = np.random.default_rng(T)
  return tuple(jnp.asarray(rng.normal(size=(1, T, H, D)), jnp.float32) for _ in range(3))


CASES = [
    ("causal", M.causal(), 96, 16, 16),
    ("sliding", M.sliding_window(20, 0), 128, 16, 8),
    ("sliding_causal", M.causal() & M.sliding_window(31, 0), 160, 32, 16),
    ("neighborhood_2d", M.neighborhood((12, 12), 5), 144, 16, 16),
    ("chunked", M.chunked(32), 128, 16, 16),
    ("strided_heads", M.causal() & M.strided_heads(2, 4, block=16), 96, 16, 16),
]


@pytest.mark.parametrize("name,mask,T,bq,bk", CASES, ids=[c[0] for c in CASES])
def test_visited_blocks_equal_nonempty_blocks(name, mask, T, bq, bk):
  q, k, v = _qkv(T)
  backend = ChunkedBackend(block_q=bq, block_kv=bk)
  H = q.shape[2]
  bm = mask.block_map(T, T, bq, bk, num_heads=H if mask.per_head else None)
  f = lambda q, k, v: aj.attention(q, k, v, mask=mask, impl=backend)
  lengths = _scan_lengths(jax.make_jaxpr(f)(q, k, v).jaxpr)
  if bm.ndim == 2:
    expected = sorted(x for x in (int(np.sum(bm == M.FULL)), int(np.sum(bm == M.PARTIAL))) if x)
    assert sorted(lengths) == expected
  else:  # per-head masks: heads with equal maps form one group with its own pair lists
    groups = {bm[h].tobytes(): bm[h] for h in range(H)}
    expected = sorted(int(np.sum(g == c)) for g in groups.values() for c in (M.FULL, M.PARTIAL)
                      if np.sum(g == c))
    assert sorted(lengths) == expected
  assert sum(lengths) == sum(int(np.count_nonzero(g)) for g in
                             ({bm.tobytes(): bm}.values() if bm.ndim == 2 else groups.values()))
  # The pattern is really sparse: fewer tiles than the dense grid.
  if name != "chunked":
    assert sum(lengths) < bm.shape[-1] * bm.shape[-2]


def test_backward_visits_the_same_blocks():
  mask = M.causal() & M.sliding_window(20, 0)
  q, k, v = _qkv(128)
  backend = ChunkedBackend(block_q=16, block_kv=16)
  bm = mask.block_map(128, 128, 16, 16)
  f = lambda q, k, v: jnp.sum(aj.attention(q, k, v, mask=mask, impl=backend))
  lengths = _scan_lengths(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v).jaxpr)
  nonempty = int(np.count_nonzero(bm))
  assert sum(lengths) == 2 * nonempty  # forward recomputation for residuals + backward


def test_memory_is_linear_in_length():
  """Compiled temporaries of forward+backward stay far below one [T, T] float32 buffer."""
  T, D = 4096, 16
  q, k, v = _qkv(T, H=1, D=D)
  backend = ChunkedBackend(block_q=256, block_kv=256)

  def loss(q, k, v):
    return jnp.sum(aj.attention(q, k, v, mask=M.causal(), impl=backend) ** 2)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  mem = compiled.memory_analysis()
  if mem is None:
    pytest.skip("memory_analysis unavailable on this platform")
  tt_bytes = T * T * 4
  assert mem.temp_size_in_bytes < tt_bytes / 16, (mem.temp_size_in_bytes, tt_bytes)
