"""SMEM budget of the TPU flash kernel's scalar-prefetched block tables, and the split of one
call into several pallas_calls that keeps each call's tables under it.

The three tables of a pallas_call (``blocks``, ``counts``, ``full``; int32) are scalar-prefetched
into SMEM and stay there for the whole call. SMEM is 1 MiB per TensorCore on TPU v4 and later
and 16 KiB on v2/v3 (``smem_capacity_bytes`` of JAX's ``pltpu.get_tpu_info()``), and it also holds
Mosaic's own scalars and the kernel's sinks. Static tables are small (``[1, 1|H, nq, K]``), but
run-time tables grow with the batch (segment ids: per-example tables) and the heads (per-head
masks / data-dependent sparsity), e.g. B=16, T=8192, 128 x 128 tiles, causal: ~530 KB.

:data:`SMEM_TABLE_BUDGET` (256 KiB, a quarter of the v4+ SMEM; on a TPU whose SMEM is smaller,
a quarter of it) bounds one call's tables. :func:`plan` cuts the grid into parts: groups of
examples first (only when the tables are per example), then of kv heads (only when they are per
head), then of table rows (query blocks for the forward/dQ kernels, key blocks for dK/dV; this
also bounds a single long sequence's static tables). Each part is its own pallas_call over the
whole inputs, its index maps adding the part's offsets (so ``mask_fn``/``score_fn`` see global
example and head indices); it writes its slice of the outputs, and :func:`concat` joins them.
The numbers are those of one call, bit for bit. (Splash attention instead narrows the tables to
int8/int16; splitting keeps int32 and works for any size, at a few more kernel launches.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

SMEM_TABLE_BUDGET = 256 * 1024


def budget(compiled: bool) -> int:
  """Bytes of tables one pallas_call may hold: :data:`SMEM_TABLE_BUDGET`, and a quarter of the
  SMEM of this host's TPU when compiling on one (known only there)."""
  value = SMEM_TABLE_BUDGET
  if compiled:
    try:
      from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
      value = min(value, pltpu.get_tpu_info().smem_capacity_bytes // 4)
    except Exception:  # noqa: BLE001 - no TPU here (e.g. cross-lowering): the default budget
      pass
  return max(1, int(value))


class Part(NamedTuple):
  """One pallas_call's share of the grid: examples ``[b0, b0 + nb)``, kv heads ``[h0, h0 + nh)``,
  table rows ``[r0, r0 + nr)``; ``Bt``/``Ht`` are the leading dims of its table slice."""
  b0: int
  nb: int
  h0: int
  nh: int
  r0: int
  nr: int
  Bt: int
  Ht: int


def table_bytes(geom, G: int, nb: int, nh: int, nr: int) -> int:
  """SMEM bytes of ``blocks + full + counts`` (int32) for nb examples, nh kv heads (G query
  heads each) and nr rows of tables with geometry ``geom = (Bt, Ht, K)``."""
  Bt, Ht, K = geom
  return 4 * (2 * K + 1) * (nb if Bt > 1 else 1) * (nh * G if Ht > 1 else 1) * nr


def plan(geom, B: int, Hkv: int, G: int, n_rows: int, budget_bytes: int) -> list[Part]:
  """Parts tiling ``(B, Hkv, n_rows)`` once, each under ``budget_bytes`` where a split can get
  it there (one row of one example and kv head is the finest)."""
  Bt, Ht, _ = geom
  size = lambda nb, nh, nr: table_bytes(geom, G, nb, nh, nr)
  nb, nh, nr = B, Hkv, n_rows
  if Bt > 1 and size(nb, nh, nr) > budget_bytes:
    nb = max(1, min(B, budget_bytes // size(1, nh, nr)))
  if Ht > 1 and size(nb, nh, nr) > budget_bytes:
    nh = max(1, min(Hkv, budget_bytes // size(nb, 1, nr)))
  if size(nb, nh, nr) > budget_bytes:
    nr = max(1, min(n_rows, budget_bytes // size(nb, nh, 1)))
  parts = []
  for b0 in range(0, B, nb):
    for h0 in range(0, Hkv, nh):
      for r0 in range(0, n_rows, nr):
        pb, ph, pr = min(nb, B - b0), min(nh, Hkv - h0), min(nr, n_rows - r0)
        parts.append(Part(b0, pb, h0, ph, r0, pr, pb if Bt > 1 else 1, ph * G if Ht > 1 else 1))
  return parts


def part_tables(tables, part: Part, G: int):
  """One part's slices of ``(blocks [Bt, Ht, R, K], counts [Bt, Ht, R], full)``, flattened to
  1-D int32 (1-D avoids SMEM's 2-D padding)."""
  blocks, counts, full = tables
  Bt, Ht = blocks.shape[:2]
  bs = slice(part.b0, part.b0 + part.nb) if Bt > 1 else slice(None)
  hs = slice(part.h0 * G, (part.h0 + part.nh) * G) if Ht > 1 else slice(None)
  rs = slice(part.r0, part.r0 + part.nr)
  return tuple(jnp.asarray(a[bs, hs, rs], jnp.int32).reshape(-1) for a in (blocks, counts, full))


def concat(results: dict, row_axes) -> tuple:
  """Whole outputs from ``{(b0, h0, r0): outputs of that part}``: each output is joined along
  its row axis (``row_axes[i]``), then heads (axis 1), then examples (axis 0)."""
  if len(results) == 1:
    return tuple(next(iter(results.values())))
  tree = {}
  for (b0, h0, r0), outs in sorted(results.items()):
    tree.setdefault(b0, {}).setdefault(h0, []).append(outs)

  def join(xs, axis):
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=axis)

  return tuple(
      join([join([join([o[i] for o in rows], ax) for _, rows in sorted(hs.items())], 1)
            for _, hs in sorted(tree.items())], 0)
      for i, ax in enumerate(row_axes))
