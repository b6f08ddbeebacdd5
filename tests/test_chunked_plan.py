"""The chunked backend's work follows the mask's block map, and its memory is O(T), not O(T^2).

These are structural checks (which tiles run, what is compiled), not timings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks as M
from attnjax.backends import base
from attnjax.backends import chunked as chunked_lib
from attnjax.backends.chunked import ChunkedBackend


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


def _visits(backend_kwargs, f_of_backend):
  """Run ``f_of_backend(backend)`` and return the tiles it computed, per pass."""
  seen = {"fwd": [], "bwd": []}
  backend = ChunkedBackend(**backend_kwargs,
                           on_visit=lambda kind, i, j: seen[kind].append((i, j)))
  jax.block_until_ready(f_of_backend(backend))
  return seen


def _nonempty_pairs(bm):
  """Set of (q_block, kv_block) with a visible pair in any head's map."""
  bm = bm if bm.ndim == 3 else bm[None]
  return {(int(i), int(j)) for i, j in np.argwhere((bm != M.EMPTY).any(axis=0))}


def _expected_visits(bm):
  """Tiles visited: one per non-empty block of each group of heads with equal block maps."""
  if bm.ndim == 2:
    return sorted((int(i), int(j)) for i, j in np.argwhere(bm != M.EMPTY))
  groups = {bm[h].tobytes(): bm[h] for h in range(bm.shape[0])}
  return sorted((int(i), int(j)) for g in groups.values() for i, j in np.argwhere(g != M.EMPTY))


@pytest.mark.parametrize("name,mask,T,bq,bk", CASES, ids=[c[0] for c in CASES])
def test_visited_blocks_equal_nonempty_blocks(name, mask, T, bq, bk):
  """Count the tiles the kernel really computes (host callback per tile), forward and
  backward: exactly the non-empty blocks of the block map, each once per head group."""
  q, k, v = _qkv(T)
  H = q.shape[2]
  bm = mask.block_map(T, T, bq, bk, num_heads=H if mask.per_head else None)

  def loss(backend):
    return lambda q, k, v: jnp.sum(aj.attention(q, k, v, mask=mask, impl=backend) ** 2)

  seen = _visits(dict(block_q=bq, block_kv=bk),
                 lambda be: jax.jit(jax.grad(loss(be), argnums=(0, 1, 2)))(q, k, v))
  expected = _expected_visits(bm)
  # The forward runs once for the residuals; the backward recomputes each tile once.
  assert sorted(seen["fwd"]) == expected
  assert sorted(seen["bwd"]) == expected
  assert set(seen["fwd"]) == _nonempty_pairs(bm)
  # The pattern is really sparse: fewer tiles than the dense grid.
  if name != "chunked":
    assert len(set(seen["fwd"])) < bm.shape[-1] * bm.shape[-2]


def test_segment_ids_skip_tiles_at_run_time():
  """Packed documents: tiles whose query and key segment ranges are disjoint for the whole
  batch cost a branch, not a tile."""
  T, bq = 64, 16
  q, k, v = _qkv(T)
  seg = jnp.asarray(np.repeat(np.arange(4), T // 4)[None], jnp.int32)   # 4 docs of 16
  seen = _visits(dict(block_q=bq, block_kv=bq),
                 lambda be: aj.attention(q, k, v, segment_ids=seg, impl=be))
  assert sorted(seen["fwd"]) == [(i, i) for i in range(4)]


def test_automatic_tiles_follow_the_budget():
  be = ChunkedBackend()
  assert be.block_sizes(8192, 8192, 8) == (512, 512)
  bq, bk = be.block_sizes(8192, 8192, 64)
  assert 64 * bq * bk <= be.tile_budget and min(bq, bk) >= 128
  assert be.block_sizes(1024, 1024, 8) == (256, 256)      # shorter: 256 x 256
  assert be.block_sizes(100, 37, 8) == (104, 40)          # short inputs: one tile
  assert ChunkedBackend(block_q=64).block_sizes(8192, 8192, 8) == (64, 512)
  with pytest.raises(ValueError, match="block_kv"):
    ChunkedBackend(block_kv=0)
  with pytest.raises(TypeError, match="on_visit"):
    ChunkedBackend(on_visit=3)


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


# --------------------------------------------------------------------------------- band
BAND_CASES = [
    ("sliding_causal", M.causal() & M.sliding_window(23, 0), 100, 16, 8),
    ("sliding", M.sliding_window(9, 14), 96, 32, 16),
    ("chunked", M.chunked(20), 90, 16, 8),
    ("causal_offset", M.causal(offset=-40), 96, 16, 8),        # rows 0..39 see nothing
    ("neighborhood_2d", M.neighborhood((10, 10), 3), 100, 16, 8),
    ("per_head", M.per_head([M.sliding_window(4, 0), M.sliding_window(12, 3)]), 80, 16, 8),
]


def _band_expected(mask, T, H, bqb, step):
  """Per head group: the band's first key of every query block that sees anything (its first
  visible ``step`` block, moved left where the band would pass the padded keys), computed
  from the dense mask; and the band width (the widest span of visible blocks)."""
  Tqp, Tkp = -(-T // bqb) * bqb, -(-T // step) * step
  heads = range(H) if mask.per_head else [None]
  qi, kj = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
  groups = {}
  for h in heads:
    dense = np.asarray(mask.mask_mod(jnp.asarray(qi), jnp.asarray(kj),
                                     None if h is None else jnp.int32(h)))
    vis = np.zeros((Tqp, Tkp), bool)
    vis[:T, :T] = dense
    blocks = vis.reshape(Tqp // bqb, bqb, Tkp // step, step).any(axis=(1, 3))
    groups.setdefault(blocks.tobytes(), blocks)
  expected, widths = [], []
  for blocks in groups.values():
    spans = [(np.flatnonzero(r)[0], np.flatnonzero(r)[-1] + 1) for r in blocks if r.any()]
    width = max(hi - lo for lo, hi in spans) * step
    widths.append(width)
    for i, r in enumerate(blocks):
      if r.any():
        expected.append((i, int(min(np.flatnonzero(r)[0] * step, Tkp - width))))
  return sorted(expected), widths


@pytest.mark.parametrize("name,mask,T,bqb,step", BAND_CASES, ids=[c[0] for c in BAND_CASES])
def test_band_visits_one_tile_per_query_block(name, mask, T, bqb, step):
  """The band computes one key tile per query block that sees anything, starting at its first
  visible key block, forward and backward; results match the tiled computation."""
  q, k, v = _qkv(T)
  seen = {"fwd_band": [], "bwd_band": []}
  be = ChunkedBackend(band=True, band_block_q=bqb, band_step=step,
                      on_visit=lambda kind, i, j: seen[kind].append((i, j)))
  plan = be.band_plan(aj.build_problem(q, k, v, mask=mask))
  assert (plan.block_q, plan.step) == (bqb, step)
  widths = [width for _, _, width in plan.groups]

  def loss(backend):
    return lambda q, k, v: jnp.sum(jnp.sin(aj.attention(q, k, v, mask=mask, impl=backend)))

  g_band = jax.block_until_ready(jax.jit(jax.grad(loss(be), argnums=(0, 1, 2)))(q, k, v))
  expected, want_widths = _band_expected(mask, T, q.shape[2], bqb, step)
  assert sorted(seen["fwd_band"]) == expected
  assert sorted(seen["bwd_band"]) == expected
  assert sorted(widths) == sorted(want_widths)
  g_tiled = jax.jit(jax.grad(loss(ChunkedBackend(block_q=16, block_kv=16, band=False)),
                             argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_band, g_tiled):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_band_segment_ids_skip_at_run_time():
  """Packed documents with a band: a query block whose band holds no key of its documents
  costs a branch, not a tile (the skip compares segment-id ranges, per band)."""
  T = 64
  q, k, v = _qkv(T)
  seg = jnp.asarray(np.repeat(np.arange(4), T // 4)[None], jnp.int32)
  seen = {"fwd_band": [], "bwd_band": []}
  be = ChunkedBackend(band=True, band_block_q=16, band_step=16,
                      on_visit=lambda kind, i, j: seen[kind].append((i, j)))
  # A full mask: the band is the whole key range for every block, and the segment-id ranges
  # of a block ([i, i]) and of all keys ([0, 3]) overlap: no skip, 4 bands.
  jax.block_until_ready(aj.attention(q, k, v, segment_ids=seg, impl=be))
  assert sorted(seen["fwd_band"]) == [(i, 0) for i in range(4)]
  # Query block 0 against a band of keys 48..63 (document 3 only): skipped at run time.
  seen["fwd_band"].clear()
  mask = M.from_function(lambda qi, kj: kj >= 48)
  out = aj.attention(q, k, v, mask=mask, segment_ids=seg, impl=be)
  assert sorted(seen["fwd_band"]) == [(3, 48)]
  ref = aj.attention(q, k, v, mask=mask, segment_ids=seg, impl="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_automatic_band_choice():
  """Automatic mode uses the band where it computes at most 0.75 of the tiles' scores:
  narrow windows and local neighborhoods, not causal, dense or tile-aligned chunked masks,
  and never when the user fixes ``block_kv``."""
  be = ChunkedBackend()

  def plan(mask, T, backend=be):
    q = jnp.zeros((1, T, 8, 64), jnp.float32)
    return backend.band_plan(aj.build_problem(q, q, q, mask=mask))

  window = M.causal() & M.sliding_window(511, 0)
  band = plan(window, 8192)
  assert (band.block_q, band.step, band.width) == (128, 64, 640)
  assert len(band.groups) == 1 and band.groups[0][1].shape == (64,)
  x = jax.ShapeDtypeStruct((1, 8192, 8, 64), jnp.float32)
  assert be.describe(aj.build_problem(x, x, x, mask=window)) == "band: 128 query rows x 640 keys"
  assert be.describe(aj.build_problem(x, x, x, mask=M.causal())) == "tiles 512x512"
  assert plan(M.neighborhood((64, 64), 13), 4096) is not None
  for mask in (M.causal(), M.full(), M.chunked(1024)):
    assert plan(mask, 8192) is None, mask
  assert plan(window, 8192, ChunkedBackend(block_kv=512)) is None
  assert plan(window, 8192, ChunkedBackend(band=False)) is None
  assert plan(M.causal(), 1024, ChunkedBackend(band=True)) is not None
  with pytest.raises(ValueError, match="band_step"):
    ChunkedBackend(band_step=0)
  with pytest.raises(ValueError, match="band_block_q"):
    ChunkedBackend(band_block_q=-2)
  with pytest.raises(TypeError, match="band must be"):
    ChunkedBackend(band="yes")


def test_band_spans_from_intervals_equal_the_block_map():
  """Masks with per-query key intervals get their band spans in O(T) (no fine block map);
  they equal the spans read from the block map at the band's resolution."""
  masks = [M.causal(), M.causal(offset=-7), M.sliding_window(13, 0), M.sliding_window(3, 9),
           M.chunked(11), M.causal() & M.chunked(9), M.causal() & M.sliding_window(20, 0),
           M.full(), M.prefix_lm(10), M.block_causal(6)]
  fast_paths = 0
  for mask in masks:
    for tq, tk in [(77, 77), (40, 90), (90, 40), (1, 33)]:
      for bqb, step in [(8, 8), (16, 8), (32, 16), (8, 24)]:
        x, y = jnp.zeros((1, tq, 2, 4)), jnp.zeros((1, tk, 2, 4))
        p = aj.build_problem(x, y, y, mask=mask)
        fast = chunked_lib._interval_spans(p, bqb, step)
        want = chunked_lib._band_span(base.static_block_map(p, bqb, step)[0], step)
        if fast is not None:
          fast_paths += 1
          np.testing.assert_array_equal(fast[0], want[0])
          assert fast[1] == want[1], (mask, tq, tk, bqb, step)
  assert fast_paths == len(masks) * 16


def test_automatic_band_weighs_head_groups():
  """Per-head masks: the rule counts each group's work times its heads. Seven heads of
  tile-aligned chunks and one narrow window stay on tiles (the band would compute more); four
  wide and four narrow windows use the band."""
  q = jnp.zeros((1, 4096, 8, 64), jnp.float32)
  aligned = M.per_head([M.chunked(1024)] * 7 + [M.causal() & M.sliding_window(63, 0)])
  windows = M.per_head([M.causal() & M.sliding_window(511, 0)] * 4
                       + [M.causal() & M.sliding_window(127, 0)] * 4)
  be = ChunkedBackend()
  assert be.band_plan(aj.build_problem(q, q, q, mask=aligned)) is None
  band = be.band_plan(aj.build_problem(q, q, q, mask=windows))
  assert band is not None and sorted(w for _, _, w in band.groups) == [256, 640]


def test_band_memory_is_linear_in_length():
  T, D = 4096, 16
  q, k, v = _qkv(T, H=1, D=D)
  backend = ChunkedBackend(band=True)

  def loss(q, k, v):
    return jnp.sum(aj.attention(q, k, v, mask=M.sliding_window(255, 0), impl=backend) ** 2)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  mem = compiled.memory_analysis()
  if mem is None:
    pytest.skip("memory_analysis unavailable on this platform")
  assert mem.temp_size_in_bytes < T * T * 4 / 16, mem.temp_size_in_bytes
