"""Neighborhood attention layers (NATTEN semantics), 1-D, 2-D and 3-D.

Papers: Hassani et al. 2023, "Neighborhood Attention Transformer" (NA); Hassani & Shi 2022,
"Dilated Neighborhood Attention Transformer" (DiNA, ``dilation``); Hassani et al. 2024, "Faster
Neighborhood Attention" (per-axis causal NA); Hassani et al. 2025, "Generalized Neighborhood
Attention" (GNA, ``stride``). The layer is NATTEN's ``NeighborhoodAttention{1,2,3}D`` module:
``qkv`` projection, NA, output projection, optional relative position bias.

The neighborhood is the mask :func:`attnjax.masks.neighborhood` over the row-major flattened
grid, and the relative position bias is a score mod, so every backend of
:func:`attnjax.attention` runs it (block-sparse backends skip the empty tiles of the mask).
Token layout and common arguments (``dtype``, ``param_dtype``, ``impl``): see
:mod:`attnjax.layers.window` (``[B, *grid, C]`` or ``[B, N, C]`` with
``grid_size``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import attnjax
from attnjax import masks as masks_lib
from attnjax import scores as scores_lib
from attnjax.layers import common
from attnjax.layers.window import as_tuple, check_dim_heads, linear, to_grid


def na_rpb_score_mod(rpb: jax.Array, grid, kernel_size, dilation) -> scores_lib.ScoreMod:
  """Score mod adding NATTEN's relative position bias.

  ``rpb`` is ``[heads, 2k_0 - 1, ..., 2k_{D-1} - 1]``; for query token ``i`` and key token ``j``
  (row-major over ``grid``) with per-axis coordinates ``y_a(i)`` the bias is
  ``rpb[h, ..., (y_a(j) // d_a - y_a(i) // d_a) + k_a - 1, ...]``, i.e. indexed by the key-minus-
  query offset counted in dilation steps (NATTEN's ``pb_start + ki``). Offsets of visible pairs
  always lie in ``[-(k-1), k-1]``; masked pairs are clipped into range (their score is discarded).
  """
  grid, ks, dil = tuple(grid), tuple(kernel_size), tuple(dilation)
  sizes = tuple(2 * k - 1 for k in ks)

  def coords(idx):
    out, rem = [], idx
    for n in reversed(grid):
      out.append(rem % n)
      rem = rem // n
    return out[::-1]

  def fn(params, s, b, h, q, k):
    (tab,) = params  # [Hs, 2k0-1, ...]
    tab = tab.reshape(tab.shape[0], -1).astype(s.dtype)
    qc, kc = coords(q), coords(k)
    flat = None
    for a in range(len(grid)):
      rel = kc[a] // dil[a] - qc[a] // dil[a] + ks[a] - 1
      rel = jnp.clip(rel, 0, sizes[a] - 1)
      flat = rel if flat is None else flat * sizes[a] + rel
    return s + scores_lib.table_bias(tab, flat, q, k)  # [Bp, Hs, bq, bk]

  return scores_lib.ScoreMod(fn, (rpb,), (scores_lib.Tiling(head_axis=0),), "na_rpb")


class _NeighborhoodAttention(nnx.Module):
  _ndim: int = 0

  def __init__(self, dim: int, num_heads: int, kernel_size, *, dilation=1, stride=1,
               is_causal=False, rel_pos_bias: bool = False, qkv_bias: bool = True,
               qk_scale: float | None = None, impl: str = "auto", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    name, nd = type(self).__name__, self._ndim
    self.head_dim = check_dim_heads(name, dim, num_heads)
    self.dim, self.num_heads = dim, num_heads
    self.kernel_size = as_tuple(name, "kernel_size", kernel_size, nd)
    self.dilation = as_tuple(name, "dilation", dilation, nd)
    self.stride = as_tuple(name, "stride", stride, nd)
    causal = tuple(is_causal) if isinstance(is_causal, (tuple, list)) else (is_causal,) * nd
    if len(causal) != nd:
      raise ValueError(f"{name}: is_causal={is_causal!r} has {len(causal)} entries; expected "
                       f"a bool or {nd} bools (one per grid axis)")
    self.is_causal = tuple(common.check_bool(f"{name}: is_causal={is_causal!r} entry", c)
                           for c in causal)
    for a in range(nd):
      if self.stride[a] > self.kernel_size[a]:
        raise ValueError(f"{name}: stride={self.stride} exceeds kernel_size={self.kernel_size} "
                         f"on axis {a}; allowed: 1 <= stride <= kernel_size")
    self.scale = float(qk_scale) if qk_scale is not None else self.head_dim ** -0.5
    self.impl = impl
    self.qkv = linear(dim, 3 * dim, "embed", None, use_bias=qkv_bias, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
    self.proj = linear(dim, dim, "heads", "embed", dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
    if rel_pos_bias:
      init = common.partitioned(jax.nn.initializers.truncated_normal(stddev=0.02), "heads",
                                *([None] * nd))
      shape = (num_heads,) + tuple(2 * k - 1 for k in self.kernel_size)
      self.rpb = nnx.Param(init(rngs.params(), shape, param_dtype))
    else:
      self.rpb = None

  def __call__(self, x: jax.Array, grid_size=None) -> jax.Array:
    name, nd = type(self).__name__, self._ndim
    xg, restore = to_grid(name, x, grid_size, nd, self.dim)
    b, grid = xg.shape[0], tuple(xg.shape[1:-1])
    for a in range(nd):
      span = self.kernel_size[a] * self.dilation[a]
      if span > grid[a]:
        raise ValueError(f"{name}: kernel_size={self.kernel_size} x dilation={self.dilation} "
                         f"spans {span} tokens on axis {a}, more than the grid {grid} holds "
                         f"({grid[a]}); kernel_size * dilation must be <= the grid size on "
                         f"every axis")
    n = math.prod(grid)
    mask = masks_lib.neighborhood(grid, self.kernel_size, self.dilation, self.stride,
                                  self.is_causal)
    qkv = self.qkv(xg).reshape(b, n, 3, self.num_heads, self.head_dim)
    mod = None
    if self.rpb is not None:
      mod = na_rpb_score_mod(self.rpb[...], grid, self.kernel_size, self.dilation)
    out = attnjax.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=mask, score_mod=mod,
                            scale=self.scale, impl=self.impl)
    out = self.proj(out.reshape((b,) + grid + (self.dim,)))
    return restore(out)

  # ------------------------------------------------------------------------------ decoding
  def _check_decodable(self, grid_size):
    name, nd = type(self).__name__, self._ndim
    if not all(self.is_causal):
      raise ValueError(f"{name}: decoding with a KV cache needs every axis causal "
                       f"(is_causal={self.is_causal}); row-major token-by-token generation "
                       f"would otherwise need keys that come later")
    grid = as_tuple(name, "grid_size", grid_size, nd)
    for a in range(nd):
      if self.kernel_size[a] * self.dilation[a] > grid[a]:
        raise ValueError(f"{name}: kernel_size={self.kernel_size} x dilation={self.dilation} "
                         f"exceeds grid_size={grid} on axis {a}")
    return grid

  def init_cache(self, batch_size: int, grid_size, *, dtype=None,
                 batch_axis=None) -> common.KVCache:
    """An empty cache for generating ``batch_size`` grids of ``grid_size`` tokens in row-major
    order (every axis must be causal). Capacity is the whole grid.
    ``batch_axis``: the mesh axis (or axes) the decoded batch is split over, e.g. ``"data"``;
    the cache's batch axis is then split the same way (see
    :func:`attnjax.layers.common.shard_cache_batch`). ``None``: batch axis replicated."""
    grid = self._check_decodable(grid_size)
    dt = jnp.float32 if dtype is None else common.canonical_dtype("dtype", dtype)
    return common.shard_cache_batch(
        common.KVCache.create(batch_size, math.prod(grid), self.num_heads, self.head_dim,
                              self.head_dim, dt), batch_axis)

  def decode(self, x: jax.Array, cache: common.KVCache, grid_size, *, num_new=None):
    """Incremental causal NA: ``x [B, T, dim]`` are the next ``T`` tokens of each example in
    row-major order over ``grid_size`` (``T`` = prompt length for prefill, 1 per step);
    token ``t`` of example ``b`` is at flat position ``cache.length[b] + t``. ``num_new [B]``
    marks how many are real (ragged batches). Returns ``(out [B, T, dim], new_cache)``; ``out``
    equals the parallel forward over the full grid at the same positions. ``ValueError`` for a
    cache that does not fit (batch, heads, grid), more tokens than the grid holds, and the
    checks of :func:`attnjax.layers.common.cache_step` (``num_new`` in ``[0, T]``)."""
    name = type(self).__name__
    grid = self._check_decodable(grid_size)
    if x.ndim != 3 or x.shape[-1] != self.dim:
      raise ValueError(f"{name}.decode: x must be [B, T, dim={self.dim}], got {x.shape}")
    if not isinstance(cache, common.KVCache) or cache.capacity != math.prod(grid):
      raise ValueError(f"{name}.decode: cache must be a KVCache from init_cache(batch, "
                       f"grid_size={grid}) (capacity {math.prod(grid)})")
    b, t = x.shape[:2]
    n, h, d = math.prod(grid), self.num_heads, self.head_dim
    common.check_cache_shapes(
        f"{name}.decode", cache, dict(k=(b, n, h, d), v=(b, n, h, d), pos=(b, n), length=(b,)),
        f"x has batch {b} and the layer has num_heads={h}, head_dim={d}; create the cache with "
        f"this layer's init_cache(batch_size={b}, grid_size={grid})")
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    step = common.cache_step((cache.k, cache.v), (k, v), cache.pos, cache.length, num_new,
                             None)
    ck, cv = step.attn
    mask = masks_lib.neighborhood(grid, self.kernel_size, self.dilation, self.stride,
                                  self.is_causal)
    mod = None
    if self.rpb is not None:
      mod = na_rpb_score_mod(self.rpb[...], grid, self.kernel_size, self.dilation)
    out = attnjax.attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask=mask,
                            score_mod=mod, scale=self.scale, impl=self.impl,
                            q_positions=step.q_positions, kv_positions=step.kv_positions,
                            segment_ids=step.q_segment_ids,
                            kv_segment_ids=step.kv_segment_ids)
    out = self.proj(out.reshape(b, t, self.dim))
    return out, common.KVCache(step.buffers[0], step.buffers[1], step.pos, step.length)


_DOC = """Neighborhood attention over a {nd}-D token grid (NATTEN ``NeighborhoodAttention{nd}D``).

Hassani et al. 2023 (NA), Hassani & Shi 2022 (DiNA), Hassani et al. 2024 (causal NA),
Hassani et al. 2025 (GNA). Input ``{layout}``; output the same layout with ``dim`` channels.

Semantics: ``q, k, v = x W_qkv (+ b)`` in ``num_heads`` heads of ``d = dim / num_heads``;

    out_i = sum_{{j in N(i)}} softmax_j(scale * q_i . k_j + rpb[h, (y(j) // dil - y(i) // dil)
            + k - 1]) v_j,     then ``W_proj``,

with ``scale = qk_scale or d ** -0.5`` and ``N(i)`` NATTEN's neighborhood, per axis (see
:func:`attnjax.masks.neighborhood`): keys in the query's dilation group
(``i % dilation == j % dilation``); inside the group, the ``kernel_size`` keys around the
stride-tile leader, shifted inward at the borders so every query sees exactly ``kernel_size``
keys per axis; a causal axis sees ``[max(leader - k + 1, 0), i]`` in group coordinates.
``stride=1`` is sliding NA, ``stride=kernel_size`` is blocked (window) attention. The optional
relative position bias ``rpb`` (``rel_pos_bias=True``) has ``(2k-1)^D`` entries per head,
indexed by the key-minus-query offset in dilation steps (NATTEN layout ``[heads, 2k-1, ...]``);
it is also allowed with causal axes (NATTEN's kernels refuse that combination; the definition
is the same).

Decoding: with every axis causal, ``init_cache(batch, grid_size)`` and
``decode(x, cache, grid_size)`` generate the grid token by token in row-major order (prefill +
steps, ragged batches) and equal the parallel forward.

Arguments: ``kernel_size``, ``dilation``, ``stride`` are ints or per-axis tuples,
``is_causal`` a bool or per-axis tuple (Python or numpy bools; ints are rejected);
``kernel_size * dilation`` must not exceed the grid and ``stride <= kernel_size``
(``ValueError`` otherwise). ``dtype`` is the compute dtype (``None``: Flax promotion of input
and float32 params), ``param_dtype`` the parameter dtype, ``impl`` the ``attnjax.attention``
backend.

Sharding (``attnjax.layers.common.AXIS_RULES``): the ``proj`` kernel's input axis
(``("heads", "embed")``) and the head axis of ``rpb`` go to the ``"tensor"`` mesh axis. The
fused ``qkv`` kernel ``[dim, 3*dim]`` (output ordered ``(3, heads, head_dim)``) is left
replicated: an even split of its fused axis is not head-aligned.
"""


class NeighborhoodAttention1D(_NeighborhoodAttention):
  __doc__ = _DOC.format(nd=1, layout="[B, L, C]")
  _ndim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
  __doc__ = _DOC.format(nd=2, layout="[B, H, W, C] (or [B, N, C] with grid_size=(H, W))")
  _ndim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
  __doc__ = _DOC.format(nd=3, layout="[B, T, H, W, C] (or [B, N, C] with grid_size=(T, H, W))")
  _ndim = 3


__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
           "na_rpb_score_mod"]
