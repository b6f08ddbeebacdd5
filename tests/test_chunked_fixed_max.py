"""The chunked forward's fixed-max mode (each query block's row maxima taken from its first key
tile, then kept) and its fallback to the running maximum: results never depend on it.

The oracle is a float64 numpy softmax written here; the fallback is observed through the
``on_visit`` hook (a recomputed query block visits its tiles twice)."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks as M
from attnjax.backends.chunked import ChunkedBackend

BQ = BK = 16


def _np_attention(q, k, v, causal=False):
  """float64 softmax attention, [B, T, H, D] layout; also the LSE [B, T, H]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    T = q.shape[1]
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.exp(s - m)
  l = p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p / l, v)
  return out, (m + np.log(l))[..., 0].transpose(0, 2, 1)


def _spiky_inputs(spike_rows, T=64, H=2, D=8, spike=400.0, seed=0):
  """Random queries and keys of unit scale, except that the rows ``spike_rows`` have a logit
  ``spike`` (after scaling) with key 40 (in the third key tile): far more than ~80 above
  anything in their first key tile, so the fixed maximum overflows and their query block
  must be recomputed. Every other block needs no recomputation."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(1, T, H, D))
  k = rng.normal(size=(1, T, H, D))
  v = rng.normal(size=(1, T, H, D))
  q[:, :, :, 0] = 0.0
  k[:, 40] = 0.0
  k[:, 40, :, 0] = 1.0
  for r in spike_rows:
    q[:, r, :, 0] = spike * np.sqrt(D)
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _run_counting(fn):
  counts = collections.Counter()
  backend = ChunkedBackend(block_q=BQ, block_kv=BK,
                           on_visit=lambda kind, i, j: counts.update([(kind, i)]))
  result = jax.block_until_ready(fn(backend))
  return result, counts


@pytest.mark.parametrize("causal", [False, True])
def test_overflowing_rows_recompute_only_their_block(causal):
  spike_rows = [50, 53] if causal else [3]          # causal: key 40 is visible from row 40 on
  q, k, v = _spiky_inputs(spike_rows)
  mask = M.causal() if causal else M.full()
  (out, lse), counts = _run_counting(
      lambda be: aj.attention(q, k, v, mask=mask, impl=be, return_lse=True))
  want_out, want_lse = _np_attention(q, k, v, causal)
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=2e-6, atol=2e-5)
  tiles = [(i + 1 if causal else 4) for i in range(4)]   # key tiles per query block
  hit = spike_rows[0] // BQ
  for i in range(4):
    assert counts[("fwd", i)] == tiles[i] * (2 if i == hit else 1), (i, counts)


def test_moderate_spikes_need_no_recomputation():
  """A logit 40 above the first tile's maximum is inside the exact range: no second pass."""
  q, k, v = _spiky_inputs([3, 20, 37], spike=40.0)
  (out, lse), counts = _run_counting(
      lambda be: aj.attention(q, k, v, impl=be, return_lse=True))
  want_out, want_lse = _np_attention(q, k, v)
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=2e-6, atol=2e-5)
  assert all(counts[("fwd", i)] == 4 for i in range(4)), counts


def test_fixed_max_equals_running_max():
  """Same result (to float32 rounding) with and without the fixed maximum, incl. GQA, sinks,
  segment ids, a score mod, rows whose first tile hides them, LSE and gradients."""
  rng = np.random.default_rng(3)
  B, T, Hq, Hkv, D = 2, 80, 4, 2, 16
  q = jnp.asarray(rng.normal(size=(B, T, Hq, D)) * 2.0, jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, T, Hkv, D)) * 2.0, jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, T, Hkv, D)), jnp.float32)
  sinks = jnp.asarray(rng.normal(size=(Hq,)), jnp.float32)
  seg = jnp.asarray(np.repeat(np.arange(4), 20)[None].repeat(B, 0), jnp.int32)
  mask = M.causal() & M.sliding_window(21, 0)    # the block's last rows miss its first tile

  def loss(backend, q, k, v, sinks):
    out, lse = aj.attention(q, k, v, mask=mask, sinks=sinks, segment_ids=seg, impl=backend,
                            score_mod=aj.scores.softcap(20.0), return_lse=True)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse)), (out, lse)

  res = {}
  for fixed in (True, False):
    be = ChunkedBackend(block_q=BQ, block_kv=BK, fixed_max=fixed)
    f = jax.jit(jax.value_and_grad(lambda *a, be=be: loss(be, *a), argnums=(0, 1, 2, 3),
                                   has_aux=True))
    res[fixed] = f(q, k, v, sinks)
  for a, b in zip(jax.tree.leaves(res[True]), jax.tree.leaves(res[False])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_vmap_with_one_member_needing_recomputation():
  """Under vmap the recomputation runs when any member needs it; all members stay exact."""
  spiky = _spiky_inputs([50], seed=1)
  calm = _spiky_inputs([], seed=2)
  q, k, v = (jnp.stack([a, b]) for a, b in zip(spiky, calm))
  be = ChunkedBackend(block_q=BQ, block_kv=BK)
  out = jax.jit(jax.vmap(lambda q, k, v: aj.attention(q, k, v, mask=M.causal(), impl=be)))(
      q, k, v)
  for n, inputs in enumerate((spiky, calm)):
    want, _ = _np_attention(*inputs, causal=True)
    np.testing.assert_allclose(np.asarray(out[n]), want, rtol=2e-5, atol=2e-6)


def test_fixed_max_argument_checked():
  with pytest.raises(TypeError, match="fixed_max must be a bool"):
    ChunkedBackend(fixed_max=1)
