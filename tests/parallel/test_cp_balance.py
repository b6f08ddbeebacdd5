"""Load-balancing layouts, batch permutation helpers, the FLOP balance report (checked against a
direct count over the dense mask) and the LSE merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks as M
from attnjax import parallel


@pytest.mark.parametrize("n", [1, 2, 8])
def test_zigzag_layout_is_dual_chunk_swap(n):
  T = 4 * n * 3
  perm = parallel.load_balance_permutation(T, n, "zigzag")
  c = T // (2 * n)
  table = perm.reshape(n, -1)
  for r in range(n):
    want = np.r_[np.arange(r * c, (r + 1) * c), np.arange((2 * n - 1 - r) * c, (2 * n - r) * c)]
    np.testing.assert_array_equal(table[r], want)


def test_striped_and_contiguous_layouts():
  T, n = 24, 4
  table = parallel.load_balance_permutation(T, n, "striped").reshape(n, -1)
  for r in range(n):
    np.testing.assert_array_equal(table[r], np.arange(r, T, n))
  np.testing.assert_array_equal(parallel.load_balance_permutation(T, n, None), np.arange(T))
  np.testing.assert_array_equal(parallel.load_balance_permutation(T, n, "contiguous"),
                                np.arange(T))


@pytest.mark.parametrize("scheme", ["zigzag", "striped", None])
def test_inverse_and_batch_permutation_round_trip(scheme):
  rng = np.random.default_rng(0)
  T, n = 32, 4
  perm = parallel.load_balance_permutation(T, n, scheme)
  inv = parallel.inverse_permutation(perm)
  np.testing.assert_array_equal(perm[inv], np.arange(T))
  batch = {"tokens": rng.integers(0, 100, (2, T)), "segment_ids": rng.integers(0, 3, (2, T)),
           "embeddings": rng.standard_normal((2, T, 3)), "other": rng.standard_normal((2, 5))}
  out = parallel.permute_batch(batch, perm)
  np.testing.assert_array_equal(out["tokens"], batch["tokens"][:, perm])
  np.testing.assert_array_equal(out["embeddings"], batch["embeddings"][:, perm])
  np.testing.assert_array_equal(out["other"], batch["other"])
  back = parallel.permute_batch(out, perm, inverse=True)
  for key in batch:
    np.testing.assert_array_equal(back[key], batch[key])
  x = jnp.asarray(batch["embeddings"])
  np.testing.assert_array_equal(
      parallel.unpermute_sequence(parallel.permute_sequence(x, perm), perm), x)


def test_layout_errors_name_the_constraint():
  with pytest.raises(ValueError, match=r"divisible by 2 \* num_shards = 16"):
    parallel.load_balance_permutation(40, 8, "zigzag")
  with pytest.raises(ValueError, match=r"divisible by num_shards \(8\)"):
    parallel.load_balance_permutation(36, 8, "striped")
  with pytest.raises(ValueError, match="unknown load-balancing scheme"):
    parallel.load_balance_permutation(32, 8, "spiral")


def _direct_ring_counts(mask, T, n, scheme, num_heads=1):
  """[steps, shards] visible pairs counted on the dense global mask."""
  perm = parallel.load_balance_permutation(T, n, scheme)
  table = perm.reshape(n, -1)
  dense = mask.dense_np(np.arange(T), np.arange(T), num_heads if mask.per_head else None)
  dense = dense if dense.ndim == 3 else dense[None]
  counts = np.zeros((n, n))
  for s in range(n):
    for r in range(n):
      rows, cols = table[r], table[(r - s) % n]
      counts[s, r] = dense[:, rows][:, :, cols].sum() / dense.shape[0]
  return counts


MASKS = {"causal": M.causal(), "window": M.sliding_window(10, 3), "chunked": M.chunked(12),
         "causal&chunked": M.causal() & M.chunked(20), "full": M.full()}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("scheme", [None, "zigzag", "striped"])
def test_report_matches_direct_count(mask_name, scheme):
  mask, T, n, H, D, Dv, B = MASKS[mask_name], 96, 4, 6, 16, 8, 3
  per_pair = 2 * (D + Dv) * H * B
  counts = _direct_ring_counts(mask, T, n, scheme) * per_pair
  kw = dict(mask=mask, scheme=scheme, num_heads=H, head_dim=D, head_dim_v=Dv, batch=B)
  ring = parallel.flop_balance_report(T, n, strategy="ring", **kw)
  np.testing.assert_allclose(ring.per_step, counts)
  np.testing.assert_allclose(ring.per_shard, counts.sum(0))
  assert ring.critical_path == pytest.approx(counts.max(axis=1).sum())
  assert ring.max_over_mean == pytest.approx(counts.sum(0).max() / counts.sum(0).mean())
  ag = parallel.flop_balance_report(T, n, strategy="all_gather", **kw)
  np.testing.assert_allclose(ag.per_shard, counts.sum(0))
  uly = parallel.flop_balance_report(T, n, strategy="ulysses", num_heads=8, head_dim=D,
                                     head_dim_v=Dv, batch=B, mask=mask, scheme=scheme)
  np.testing.assert_allclose(uly.per_shard, counts.sum() / n * 8 / H)
  usp = parallel.flop_balance_report(T, n, strategy="usp", ulysses_shards=2, **kw)
  np.testing.assert_allclose(usp.per_shard, np.repeat(counts.sum(0) / 2, 2))
  assert usp.total == pytest.approx(counts.sum())


def test_report_tile_granularity_matches_direct_count():
  T, n, bq, bk = 64, 4, 4, 8
  perm = parallel.load_balance_permutation(T, n, "zigzag")
  table = perm.reshape(n, -1)
  dense = M.causal().dense_np(np.arange(T), np.arange(T))
  rep = parallel.flop_balance_report(T, n, M.causal(), strategy="ring", scheme="zigzag",
                                     block=(bq, bk), head_dim=1, head_dim_v=1)
  for s in range(n):
    for r in range(n):
      sub = dense[table[r]][:, table[(r - s) % n]]
      tiles = sub.reshape(sub.shape[0] // bq, bq, sub.shape[1] // bk, bk).any(axis=(1, 3))
      assert rep.per_step[s, r] == pytest.approx(4 * tiles.sum() * bq * bk)


def test_zigzag_balances_causal_ring_on_8_shards():
  T, n = 1024, 8
  plain = parallel.flop_balance_report(T, n, M.causal(), strategy="ring")
  zig = parallel.flop_balance_report(T, n, M.causal(), strategy="ring", scheme="zigzag")
  striped = parallel.flop_balance_report(T, n, M.causal(), strategy="ring", scheme="striped")
  assert zig.max_over_mean <= 1.1
  assert striped.max_over_mean <= 1.1
  assert 1.8 <= plain.max_over_mean <= 2.0          # (2n - 1) / n = 1.875
  ideal = zig.total / n
  assert zig.critical_path <= 1.1 * ideal             # every step is balanced too
  assert plain.critical_path >= 1.8 * ideal           # the last device is busy at every step
  assert zig.total == pytest.approx(plain.total)      # same work, spread evenly
  assert "max/mean" in zig.summary()


def test_merge_partials_equals_attention_over_union():
  rng = np.random.default_rng(1)
  B, T, H, D = 2, 24, 3, 8
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(3))
  sinks = jnp.asarray(rng.standard_normal(H), jnp.float32)
  mask = M.causal()
  want, want_lse = aj.attention(q, k, v, mask=mask, sinks=sinks, return_lse=True)
  cuts = [0, 5, 6, 17, 24]
  outs, lses = [], []
  for a, b in zip(cuts[:-1], cuts[1:]):
    o, l = aj.attention(q, k[:, a:b], v[:, a:b], mask=mask, return_lse=True,
                        q_positions=np.arange(T), kv_positions=np.arange(a, b))
    outs.append(o)
    lses.append(l)
  got, got_lse = parallel.merge_partials(outs, lses, sinks=sinks)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)
  np.testing.assert_allclose(got_lse, want_lse, atol=2e-6, rtol=2e-6)

  # Empty partials (lse = -inf) give finite, zero gradients.
  def f(l0, s):
    o, l = parallel.merge_partials([outs[0], outs[0] * 0], [l0, jnp.full_like(l0, -jnp.inf)],
                                   sinks=s)
    return o.sum() + l.sum()
  g = jax.grad(f, argnums=(0, 1))(jnp.full_like(lses[0], -jnp.inf), sinks)
  assert all(bool(jnp.isfinite(x).all()) for x in g)


@pytest.mark.parametrize("in_mesh_context", [False, True])
def test_permute_sequence_keeps_explicit_sharding(in_mesh_context):
  """Arrays sharded over an explicit-axes mesh (jax.make_mesh's default) along the sequence:
  permute/unpermute keep the sharding and round-trip, eagerly and under jit, inside and outside
  a mesh context (a plain jnp.take raised ShardingTypeError)."""
  mesh = jax.make_mesh((2,), ("sp",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:2])
  rng = np.random.default_rng(3)
  x_np = rng.normal(size=(2, 16, 3)).astype(np.float32)
  x = jax.device_put(x_np, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None,
                                                                                       "sp")))
  perm = parallel.load_balance_permutation(16, 2, "zigzag")

  def run():
    y = parallel.permute_sequence(x, perm)
    np.testing.assert_array_equal(np.asarray(y), x_np[:, perm])
    assert jax.typeof(y).sharding.spec[:2] == (None, "sp")
    np.testing.assert_array_equal(np.asarray(parallel.unpermute_sequence(y, perm)), x_np)
    f = jax.jit(lambda a: parallel.unpermute_sequence(parallel.permute_sequence(a, perm), perm))
    np.testing.assert_array_equal(np.asarray(f(x)), x_np)

  if in_mesh_context:
    with jax.set_mesh(mesh):
      run()
  else:
    run()
