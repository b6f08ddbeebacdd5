"""Ulysses (Jacobs et al. 2023) and the USP hybrid (Fang & Zhao 2024) vs single-device attention
on 8 simulated devices: outputs, LSE, gradients w.r.t. q, k, v, sinks."""

import pytest

from attnjax import masks as M
from cp_helpers import check_strategy

U_1D = dict(mesh_shape=(8,), mesh_axes=("sp",), Hq=8, D=4)           # 8 heads over 8 devices
U_2D = dict(mesh_shape=(2, 4), mesh_axes=("data", "sp"), batch_axis="data")

ULYSSES = {
    "causal-zigzag-gqa-sinks": dict(U_1D, mask=M.causal(), load_balance="zigzag", Hkv=2,
                                    sinks=True),                      # Hkv < n: K/V repeated
    "window-contiguous-2d": dict(U_2D, mask=M.sliding_window(7, 2), Hkv=4),
    "chunked-striped": dict(U_1D, mask=M.causal() & M.chunked(16), load_balance="striped",
                            Hkv=8, Dv=2),
    "packed-zigzag-2d-sinks": dict(U_2D, mask=M.causal(), load_balance="zigzag",
                                   segments=True, sinks=True),
    "full-mqa": dict(U_1D, mask=None, Hkv=1),
    "per-head-masks-2d": dict(U_2D, mask=[M.causal(), M.sliding_window(5), M.full(),
                                          M.causal() & M.chunked(8)], Hkv=2),
}

# USP: Ulysses over "u", ring over "r"; the sequence is sharded over ("r", "u").
USP = {
    "causal-zigzag-u2r4-sinks": dict(mesh_shape=(2, 4), mesh_axes=("u", "r"), axis="r",
                                     ulysses_axis="u", mask=M.causal(), load_balance="zigzag",
                                     sinks=True),
    "window-data-u2r2": dict(mesh_shape=(2, 2, 2), mesh_axes=("data", "u", "r"), axis="r",
                             ulysses_axis="u", batch_axis="data", mask=M.sliding_window(13),
                             Hkv=1),
    "chunked-striped-u4r2": dict(mesh_shape=(4, 2), mesh_axes=("u", "r"), axis="r",
                                 ulysses_axis="u", mask=M.chunked(20), load_balance="striped",
                                 Hkv=4, Dv=4),
    "packed-zigzag-u2r4": dict(mesh_shape=(2, 4), mesh_axes=("u", "r"), axis="r",
                               ulysses_axis="u", mask=M.causal(), load_balance="zigzag",
                               segments=True),
    "full-data-u2r2": dict(mesh_shape=(2, 2, 2), mesh_axes=("data", "r", "u"), axis="r",
                           ulysses_axis="u", batch_axis="data", mask=None),
    "neighborhood-u2r4": dict(mesh_shape=(2, 4), mesh_axes=("u", "r"), axis="r",
                              ulysses_axis="u", mask=M.neighborhood((8, 8), (5, 3), dilation=(1, 2)),
                              B=1),
    # Per-head masks (mask_mod takes the GLOBAL query-head index): after the all-to-all each
    # device holds a contiguous group of heads, and the ring must evaluate the mask there.
    # (head offsets d * H/u must not be multiples of the stride, or a wrong offset goes unseen)
    "strided-heads-u4r2-gqa": dict(mesh_shape=(4, 2), mesh_axes=("u", "r"), axis="r",
                                   ulysses_axis="u", mask=M.strided_heads(2, 1), Hkv=2),
    "strided-heads-causal-zigzag-u4r2-gqa": dict(
        mesh_shape=(4, 2), mesh_axes=("u", "r"), axis="r", ulysses_axis="u",
        mask=M.causal() & M.strided_heads(2, 1), load_balance="zigzag", Hkv=2, sinks=True),
    "strided3-heads-causal-zigzag-data-u2r2-gqa": dict(
        mesh_shape=(2, 2, 2), mesh_axes=("data", "u", "r"), axis="r", ulysses_axis="u",
        batch_axis="data", mask=M.causal() & M.strided_heads(3, 2), load_balance="zigzag",
        Hq=8, Hkv=2),
    "per-head-stack-data-u2r2-gqa": dict(
        mesh_shape=(2, 2, 2), mesh_axes=("data", "u", "r"), axis="r", ulysses_axis="u",
        batch_axis="data", mask=[M.causal(), M.sliding_window(5), M.full(),
                                 M.causal() & M.chunked(8)], Hkv=2),
    "per-head-stack-zigzag-u2r4-gqa": dict(
        mesh_shape=(2, 4), mesh_axes=("u", "r"), axis="r", ulysses_axis="u",
        mask=[M.causal(), M.sliding_window(5), M.causal() & M.strided_heads(2, 1),
              M.causal() & M.chunked(8)], load_balance="zigzag", Hkv=2, segments=True),
    "per-head-stack-zigzag-u4r2-mqa": dict(
        mesh_shape=(4, 2), mesh_axes=("u", "r"), axis="r", ulysses_axis="u",
        mask=[M.causal(), M.sliding_window(3), M.causal() & M.chunked(8), M.full()],
        load_balance="zigzag", Hkv=1),
}


@pytest.mark.parametrize("case", list(ULYSSES))
def test_ulysses_matches_single_device(case):
  check_strategy("ulysses", **ULYSSES[case])


@pytest.mark.parametrize("case", list(USP))
def test_usp_matches_single_device(case):
  check_strategy("usp", **USP[case])
