"""The chunked backend's work follows the mask's block map, and its memory is O(T), not O(T^2).

These are structural checks (which tiles run, what is compiled), not timings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks as M
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
