"""Ring attention (Liu et al. 2023) vs single-device attention on 8 simulated devices: outputs,
LSE and gradients w.r.t. q, k, v and sinks, for every mask family, with and without load
balancing, GQA/MQA, Dv != D, 1-D (8) and 2-D (data 2 x sequence 4) meshes."""

import numpy as np
import pytest

from attnjax import masks as M
from attnjax import parallel
from attnjax.backends.chunked import ChunkedBackend
from cp_helpers import check_strategy

CHUNKED = ChunkedBackend(block_q=4, block_kv=4)  # several tiles per shard: static skipping

MESH_1D = dict(mesh_shape=(8,), mesh_axes=("sp",))
MESH_2D = dict(mesh_shape=(2, 4), mesh_axes=("data", "sp"), batch_axis="data")

CASES = {
    "causal-contiguous-sinks": dict(MESH_1D, mask=M.causal(), sinks=True),
    "causal-zigzag-dv": dict(MESH_1D, mask=M.causal(), load_balance="zigzag", Dv=4),
    "causal-striped-2d": dict(MESH_2D, mask=M.causal(), load_balance="striped", Hkv=4),
    "window-zigzag": dict(MESH_1D, mask=M.sliding_window(11), load_balance="zigzag"),
    "window-bidirectional-2d": dict(MESH_2D, mask=M.sliding_window(6, 9), Hkv=1),
    "chunked-causal-traced": dict(MESH_1D, mask=M.causal() & M.chunked(12), max_branches=1),
    "packed-zigzag-2d-sinks": dict(MESH_2D, mask=M.causal(), load_balance="zigzag",
                                   segments=True, sinks=True),
    "full-mqa": dict(MESH_1D, mask=None, Hkv=1, Dv=4),
    "neighborhood-2d-striped": dict(MESH_1D, mask=M.neighborhood((8, 8), 3),
                                    load_balance="striped", B=1),
    "per-head-zigzag-chunked-impl": dict(MESH_1D, mask=[M.causal(), M.sliding_window(4),
                                                        M.full(), M.chunked(16)],
                                         load_balance="zigzag", B=1, impl=CHUNKED),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ring_matches_single_device(case):
  check_strategy("ring", **CASES[case])


def test_ring_skips_masked_steps_and_shares_branches():
  """A causal ring on contiguous shards has one partial pattern (the diagonal) and otherwise
  full or empty steps; zigzag has the same work on every device at every step; a causal window
  narrower than a shard runs 2 of the 8 steps."""
  T, n = 64, 8
  table = np.arange(T).reshape(n, -1)
  kinds, index = parallel.ring_schedule_summary(M.causal(), table, table)
  assert sorted(kinds) == ["empty", "full", "static"]
  assert index.shape == (n, n)
  static = kinds.index("static")
  assert (index[0] == static).all() and not (index[1:] == static).any()
  for s in range(1, n):  # device r sees shard r - s: full when r >= s, else empty
    assert [kinds[i] for i in index[s]] == ["empty"] * s + ["full"] * (n - s)

  zz = parallel.load_balance_permutation(T, n, "zigzag").reshape(n, -1)
  kinds, index = parallel.ring_schedule_summary(M.causal(), zz, zz)
  assert "empty" not in kinds and index.shape == (n, n)
  assert len(set(index[0].tolist())) == 1  # the diagonal step is the same on every device

  kinds, index = parallel.ring_schedule_summary(M.sliding_window(5), table, table)
  assert index.shape[0] == 2
