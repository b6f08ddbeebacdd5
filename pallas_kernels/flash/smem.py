"""SMEM budget of the TPU flash kernel's scalar-prefetched block tables, and the split of one
call into equal parts that keeps each part's tables under it and runs every part with the same
compiled kernel.

The three tables of a pallas_call (``blocks``, ``counts``, ``full``; int32) are scalar-prefetched
into SMEM and stay there for the whole call. SMEM is 1 MiB per TensorCore on TPU v4 and later
and 16 KiB on v2/v3 (``smem_capacity_bytes`` of JAX's ``pltpu.get_tpu_info()``), and it also holds
Mosaic's own scalars and the kernel's sinks. Static tables are small (``[1, 1|H, nq, K]``), but
run-time tables grow with the batch (segment ids: per-example tables) and the heads (per-head
masks / data-dependent sparsity), e.g. B=16, T=8192, 128 x 128 tiles, causal: ~530 KB.

:data:`SMEM_TABLE_BUDGET` (256 KiB, a quarter of the v4+ SMEM; on a TPU whose SMEM is smaller,
a quarter of it; when cross-lowering from a host without a TPU, the default) bounds one call's
tables. :func:`plan` cuts the grid into equal parts: groups of examples first (only when the
tables are per example), then of kv heads (only when they are per head), then of table rows
(query blocks for the forward/dQ kernels, key blocks for dK/dV; this also bounds a single long
sequence's static tables). Part sizes are balanced (``ceil(n / ceil(n / max))``) and the grid is
padded up to a whole number of parts: the padded examples / kv heads / rows get table count 0,
so their grid steps do no work (the kernel clamps their input block indices into range and
their outputs land in padding that is sliced away).

:func:`run` issues the parts: with one part the kernel is called once, exactly as without a
split. With several, one ``pallas_call`` (one compiled kernel) runs inside a ``lax.fori_loop``
over the parts; the part's offsets ``(b0, h0, r0)`` are a fourth scalar-prefetch operand (read by
the index maps, so ``mask_fn``/``score_fn`` see global example and head indices), its tables are
``lax.dynamic_slice``-d from the padded tables, and the outputs are loop-carried whole (padded)
buffers that the kernel updates in place (``input_output_aliases``), so nothing is concatenated.
The numbers are those of one call, bit for bit. (Splash attention instead narrows the tables to
int8/int16; splitting keeps int32 and works for any size, at a few more kernel launches.)
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

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
  """One part's share of the grid: examples ``[b0, b0 + nb)``, kv heads ``[h0, h0 + nh)``,
  table rows ``[r0, r0 + nr)`` (the last part of an axis may reach into its padding)."""
  b0: int
  nb: int
  h0: int
  nh: int
  r0: int
  nr: int


class Plan(NamedTuple):
  """Equal parts of ``nb`` examples x ``nh`` kv heads x ``nr`` table rows, ``pb x ph x pr`` of
  them, over a grid of ``B`` examples, ``Hkv`` kv heads and ``R`` rows; ``Bt``/``Ht`` are the
  leading dims of one part's table slice and ``G`` the query heads per kv head."""
  nb: int
  nh: int
  nr: int
  pb: int
  ph: int
  pr: int
  B: int
  Hkv: int
  R: int
  Bt: int
  Ht: int
  G: int

  n = property(lambda self: self.pb * self.ph * self.pr)
  split = property(lambda self: self.n > 1)
  pad_b = property(lambda self: self.pb * self.nb > self.B)
  pad_h = property(lambda self: self.ph * self.nh > self.Hkv)
  pad_r = property(lambda self: self.pr * self.nr > self.R)

  @property
  def parts(self) -> list[Part]:
    return [Part(ib * self.nb, self.nb, ih * self.nh, self.nh, ir * self.nr, self.nr)
            for ib in range(self.pb) for ih in range(self.ph) for ir in range(self.pr)]

  def padded_shape(self, shape, row_axis: int, row_unit: int, kv_heads: bool) -> tuple:
    """An output ``[B, H, ...]``'s shape padded to whole parts (heads in units of G query heads
    unless ``kv_heads``; ``row_unit`` elements per table row along ``row_axis``)."""
    shp = list(shape)
    shp[0] = self.pb * self.nb
    shp[1] = self.ph * self.nh * (1 if kv_heads else self.G)
    shp[row_axis] = self.pr * self.nr * row_unit
    return tuple(shp)


def table_bytes(geom, G: int, nb: int, nh: int, nr: int) -> int:
  """SMEM bytes of ``blocks + full + counts`` (int32) for nb examples, nh kv heads (G query
  heads each) and nr rows of tables with geometry ``geom = (Bt, Ht, K)``."""
  Bt, Ht, K = geom
  return 4 * (2 * K + 1) * (nb if Bt > 1 else 1) * (nh * G if Ht > 1 else 1) * nr


def _balanced(n: int, most: int) -> tuple[int, int]:
  """(size, count) of the fewest equal parts of at most ``most`` that cover ``n``."""
  count = -(-n // max(1, min(n, most)))
  return -(-n // count), count


def plan(geom, B: int, Hkv: int, G: int, n_rows: int, budget_bytes: int) -> Plan:
  """Equal parts covering ``(B, Hkv, n_rows)``, each under ``budget_bytes`` where a split can
  get it there (one row of one example and kv head is the finest)."""
  Bt, Ht, _ = geom
  size = lambda nb, nh, nr: table_bytes(geom, G, nb, nh, nr)
  (nb, pb), (nh, ph), (nr, pr) = (B, 1), (Hkv, 1), (n_rows, 1)
  if Bt > 1 and size(nb, nh, nr) > budget_bytes:
    nb, pb = _balanced(B, budget_bytes // size(1, nh, nr))
  if Ht > 1 and size(nb, nh, nr) > budget_bytes:
    nh, ph = _balanced(Hkv, budget_bytes // size(nb, 1, nr))
  if size(nb, nh, nr) > budget_bytes:
    nr, pr = _balanced(n_rows, budget_bytes // size(nb, nh, 1))
  return Plan(nb, nh, nr, pb, ph, pr, B, Hkv, n_rows, nb if Bt > 1 else 1,
              nh * G if Ht > 1 else 1, G)


def step_indices(p: Plan, local, offsets):
  """In-kernel (index maps too): a grid step's global ``(example, kv head, row)`` from its part's
  ``local`` ones and the prefetched ``offsets`` ref (none with one part), as (for the outputs,
  padded) and (for the inputs, clamped into range: a padded step does no work)."""
  if not p.split:
    return tuple(local), tuple(local)
  out = tuple(i + offsets[0][a] for a, i in enumerate(local))
  pads, ends = (p.pad_b, p.pad_h, p.pad_r), (p.B, p.Hkv, p.R)
  return out, tuple(jnp.minimum(i, n - 1) if pad else i for i, n, pad in zip(out, ends, pads))


def _pad_tables(tables, p: Plan):
  """The tables padded to whole parts: padded entries have count 0 (and block 0)."""
  out = []
  for a in tables:
    Bt, Ht = a.shape[:2]
    tgt = (p.pb * p.nb if Bt > 1 else 1, p.ph * p.nh * p.G if Ht > 1 else 1, p.pr * p.nr)
    widths = [(0, t - s) for t, s in zip(tgt, a.shape[:3])] + [(0, 0)] * (a.ndim - 3)
    xp = np if isinstance(a, np.ndarray) else jnp
    out.append(xp.pad(xp.asarray(a, xp.int32), widths) if any(w[1] for w in widths)
               else xp.asarray(a, xp.int32))
  return out


def run(p: Plan, tables, call: Callable, outs) -> tuple:
  """Whole outputs of the kernel over all parts of ``p``.

  ``call(tables, offsets, buffers)`` issues the pallas_call on one part's tables (1-D int32:
  1-D avoids SMEM's 2-D padding); with one part ``offsets`` and ``buffers`` are None and it
  returns the outputs; otherwise ``offsets`` is int32 ``[3] = (b0, h0, r0)`` and ``buffers`` the
  padded outputs, which it returns updated. ``outs``: per output ``(shape, dtype, row_axis,
  row_unit, kv_heads)``."""
  if not p.split:
    return tuple(call(tuple(jnp.asarray(a, jnp.int32).reshape(-1) for a in tables), None, None))
  padded = [jnp.asarray(a) for a in _pad_tables(tables, p)]
  shapes = [p.padded_shape(s, ax, unit, kvh) for s, _, ax, unit, kvh in outs]

  def body(i, bufs):
    ib, ih, ir = i // (p.ph * p.pr), (i // p.pr) % p.ph, i % p.pr
    b0, h0, r0 = ib * p.nb, ih * p.nh, ir * p.nr
    tabs = tuple(lax.dynamic_slice(
        a, (b0 if a.shape[0] > 1 else 0, h0 * p.G if a.shape[1] > 1 else 0, r0)
        + (0,) * (a.ndim - 3), (p.Bt, p.Ht, p.nr) + a.shape[3:]).reshape(-1) for a in padded)
    return tuple(call(tabs, jnp.stack([b0, h0, r0]).astype(jnp.int32), bufs))

  bufs = tuple(jnp.zeros(s, o[1]) for s, o in zip(shapes, outs))
  bufs = lax.fori_loop(0, p.n, body, bufs)
  return tuple(b if b.shape == tuple(o[0]) else b[tuple(slice(0, n) for n in o[0])]
               for b, o in zip(bufs, outs))
