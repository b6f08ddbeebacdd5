"""All-gather context parallelism vs single-device attention on 8 simulated devices (outputs,
LSE, gradients w.r.t. q, k, v, sinks; masks x load balancing x GQA x 1-D/2-D meshes)."""

import pytest

from attnjax import masks as M
from cp_helpers import check_strategy

MESH_1D = dict(mesh_shape=(8,), mesh_axes=("sp",))
MESH_2D = dict(mesh_shape=(2, 4), mesh_axes=("data", "sp"), batch_axis="data")

CASES = {
    "causal-contiguous-sinks": dict(MESH_1D, mask=M.causal(), sinks=True),
    "causal-zigzag-2d": dict(MESH_2D, mask=M.causal(), load_balance="zigzag", Dv=4),
    "window-striped": dict(MESH_1D, mask=M.sliding_window(9), load_balance="striped", Hkv=1),
    "chunked-zigzag-2d-traced": dict(MESH_2D, mask=M.chunked(24), load_balance="zigzag",
                                     max_branches=1),
    "packed-zigzag-sinks": dict(MESH_1D, mask=M.causal(), load_balance="zigzag",
                                segments=True, sinks=True),
    "full-2d": dict(MESH_2D, mask=None, Hkv=4),
    "neighborhood-causal-contiguous": dict(MESH_1D, mask=M.neighborhood((4, 16), (3, 5),
                                                                        causal=(True, False)),
                                           B=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_all_gather_matches_single_device(case):
  check_strategy("all_gather", **CASES[case])
