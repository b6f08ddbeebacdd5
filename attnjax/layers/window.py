"""Swin window attention, plus the token-grid helpers shared by the vision layers.

Token layout of every vision layer in ``attnjax.layers`` (neighborhood, window, hilo, agent,
spatial_reduction, cascaded, channel):

* the input is a channels-last grid ``[B, *grid, C]`` (``[B, H, W, C]`` for 2-D layers), or
* a token sequence ``[B, N, C]`` together with ``grid_size=(H, W)``, where ``N = H * W`` and the
  tokens are the grid flattened row-major (token ``n`` sits at row ``n // W``, column ``n % W``).

The output has the layout of the input. Attention runs on the row-major flattening, which is the
token order masks such as :func:`attnjax.masks.neighborhood` assume.

Common arguments of these layers: parameters are created in ``param_dtype`` (float32 by
default); ``dtype`` is the compute dtype of the projections and of the attention (``None``:
Flax's promotion of input and parameter dtypes, i.e. float32 with float32 parameters; e.g.
``jnp.bfloat16`` computes in bfloat16) and the output has the compute dtype; ``impl`` is passed
to :func:`attnjax.attention` (``"auto"``, a backend name or a backend instance). Bad
configurations raise ``ValueError`` naming the argument, the values and what is allowed.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attnjax
from attnjax import scores as scores_lib
from attnjax.layers import common

# ----------------------------------------------------------------------------------------------
# Shared helpers for the vision layers
# ----------------------------------------------------------------------------------------------


# Sharding annotations of the vision layers. All go through ``common.partitioned`` (logical names
# of ``common.AXIS_RULES``), so they are metadata only without a mesh. Conventions: a kernel axis
# that is ``heads * head_dim`` flattened head-major (a per-head q projection's output, an output
# projection's input) is ``"heads"``; fused ``[dim, 3*dim]`` / ``[dim, 2*dim]`` qkv / kv kernels
# are ordered ``(3, heads, head_dim)`` so an even split of the fused axis is not head-aligned:
# they stay replicated. Norm scales, biases of replicated outputs and conv kernels: replicated.

class Linear(nnx.Linear):
  """``nnx.Linear`` that states its output sharding under an explicit-axes mesh (JAX cannot
  infer it when the contracted feature axis is sharded, e.g. an output projection over heads
  sharded on ``tensor``); identical to ``nnx.Linear`` elsewhere."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is None:
      spec = common.explicit_out_spec(inputs, self.kernel[...], 1)
      if spec is not None:
        out_sharding = jax.sharding.PartitionSpec(*spec)
    return super().__call__(inputs, out_sharding=out_sharding)


def linear(in_features: int, out_features: int, in_axis: str | None, out_axis: str | None, *,
           use_bias: bool = True, **kw) -> Linear:
  """:class:`Linear` (``nnx.Linear``'s default initializers) with its kernel annotated
  ``(in_axis, out_axis)`` and its bias ``(out_axis,)`` through
  :func:`attnjax.layers.common.partitioned`."""
  return Linear(
      in_features, out_features, use_bias=use_bias,
      kernel_init=common.partitioned(nnx.initializers.lecun_normal(), in_axis, out_axis),
      bias_init=common.partitioned(nnx.initializers.zeros_init(), out_axis), **kw)


def conv(in_features: int, out_features: int, kernel_size, **kw) -> nnx.Conv:
  """``nnx.Conv`` (same default initializers) with replicated kernel/bias annotations."""
  nd = len(tuple(kernel_size))
  return nnx.Conv(
      in_features, out_features, kernel_size=kernel_size,
      kernel_init=common.partitioned(nnx.initializers.lecun_normal(), *([None] * (nd + 2))),
      bias_init=common.partitioned(nnx.initializers.zeros_init(), None), **kw)


def layer_norm(features: int, **kw) -> nnx.LayerNorm:
  """``nnx.LayerNorm`` with replicated (``"norm"``) scale/bias annotations."""
  return nnx.LayerNorm(
      features, scale_init=common.partitioned(nnx.initializers.ones_init(), "norm"),
      bias_init=common.partitioned(nnx.initializers.zeros_init(), "norm"), **kw)


def check_dim_heads(layer: str, dim: int, num_heads: int) -> int:
  """Validate ``dim``/``num_heads`` and return the head dim."""
  for name, val in (("dim", dim), ("num_heads", num_heads)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
      raise ValueError(f"{layer}: {name} must be a positive int, got {val!r}")
  if dim % num_heads:
    raise ValueError(f"{layer}: dim={dim} is not divisible by num_heads={num_heads}; "
                     f"num_heads must divide dim")
  return dim // num_heads


def as_tuple(layer: str, name: str, value, ndim: int, minimum: int | None = 1) -> tuple:
  """An int or a length-``ndim`` sequence of ints, as a tuple, each ``>= minimum``."""
  vals = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
  if len(vals) != ndim:
    raise ValueError(f"{layer}: {name}={value!r} has {len(vals)} entries; expected one int or "
                     f"{ndim} ints (one per grid axis)")
  out = []
  for v in vals:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"{layer}: {name}={value!r} must hold ints, got {v!r}")
    if minimum is not None and v < minimum:
      raise ValueError(f"{layer}: {name}={value!r} must be >= {minimum} on every axis")
    out.append(int(v))
  return tuple(out)


def to_grid(layer: str, x: jax.Array, grid_size, ndim: int, dim: int):
  """Bring ``x`` to ``[B, *grid, C]`` and return ``(grid_x, restore)`` where ``restore`` maps
  an output grid ``[B, *grid, C']`` back to the input's layout.

  Accepted inputs: ``[B, *grid, C]`` (``grid_size`` optional; if given it must match) or, for
  ``ndim > 1``, ``[B, N, C]`` with ``grid_size`` whose product is ``N`` (row-major)."""
  if x.ndim == ndim + 2:
    grid = tuple(int(n) for n in x.shape[1:-1])
    if grid_size is not None and tuple(grid_size) != grid:
      raise ValueError(f"{layer}: grid_size={tuple(grid_size)} does not match the grid of x "
                       f"with shape {x.shape}; pass grid_size=None or {grid}")
    restore = lambda y: y
  elif x.ndim == 3 and ndim > 1:
    if grid_size is None:
      raise ValueError(f"{layer}: x has shape {x.shape} ([B, N, C]); pass grid_size (a tuple of "
                       f"{ndim} ints whose product is N={x.shape[1]}) or give x as "
                       f"[B, {', '.join('X%d' % i for i in range(ndim))}, C]")
    if not isinstance(grid_size, (tuple, list)) or len(grid_size) != ndim:
      raise ValueError(f"{layer}: grid_size={grid_size!r} must be a tuple of {ndim} ints")
    grid = as_tuple(layer, "grid_size", grid_size, ndim)
    if math.prod(grid) != x.shape[1]:
      raise ValueError(f"{layer}: grid_size={grid} holds {math.prod(grid)} tokens but x has "
                       f"N={x.shape[1]} tokens (shape {x.shape}); the product of grid_size "
                       f"must equal N (row-major flattening)")
    b = x.shape[0]
    x = x.reshape((b,) + grid + (x.shape[-1],))
    restore = lambda y: y.reshape(b, -1, y.shape[-1])
  else:
    allowed = f"[B, {', '.join('X%d' % i for i in range(ndim))}, C]"
    if ndim > 1:
      allowed += " or [B, N, C] with grid_size"
    raise ValueError(f"{layer}: x has shape {x.shape}; expected {allowed}")
  if x.shape[-1] != dim:
    raise ValueError(f"{layer}: x has {x.shape[-1]} channels (shape {x.shape}) but the layer "
                     f"was built with dim={dim}; they must be equal")
  return x, restore


def check_fits(layer: str, name: str, size: Sequence[int], grid: Sequence[int]):
  """Raise unless ``size[a] <= grid[a]`` on every axis."""
  for a, (s, n) in enumerate(zip(size, grid)):
    if s > n:
      raise ValueError(f"{layer}: {name}={tuple(size)} is larger than the token grid "
                       f"{tuple(grid)} on axis {a} ({s} > {n}); {name} must be <= the grid size "
                       f"on every axis")


def window_partition(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """``[B, H, W, ...]`` -> ``[B * nW, wh * ww, ...]`` with ``nW = (H // wh) * (W // ww)``
  windows in row-major order (batch-major) and tokens row-major inside each window.
  ``H`` and ``W`` must be multiples of the window."""
  b, h, w = x.shape[:3]
  wh, ww = window
  rest = x.shape[3:]
  x = x.reshape((b, h // wh, wh, w // ww, ww) + rest)
  x = jnp.moveaxis(x, 3, 2)  # [B, h/wh, w/ww, wh, ww, ...]
  return x.reshape((b * (h // wh) * (w // ww), wh * ww) + rest)


def window_merge(x: jax.Array, window: Sequence[int], grid: Sequence[int]) -> jax.Array:
  """Inverse of :func:`window_partition`: ``[B * nW, wh * ww, ...]`` -> ``[B, H, W, ...]``."""
  wh, ww = window
  h, w = grid
  rest = x.shape[2:]
  x = x.reshape((-1, h // wh, w // ww, wh, ww) + rest)
  x = jnp.moveaxis(x, 2, 3)
  return x.reshape((x.shape[0], h, w) + rest)


def pad_grid(x: jax.Array, padded: Sequence[int]) -> jax.Array:
  """Zero-pad the grid axes ``1..len(padded)`` of ``x`` at the end up to ``padded``."""
  widths = [(0, 0)] * x.ndim
  for a, p in enumerate(padded):
    widths[a + 1] = (0, p - x.shape[a + 1])
  return jnp.pad(x, widths) if any(w != (0, 0) for w in widths) else x


def window_segments(grid, padded, window, shift) -> np.ndarray | None:
  """Static segment ids ``int32[nW, wh * ww]`` for window attention on the padded, rolled grid,
  or None when every window is fully visible.

  Two tokens of one window may attend to each other iff they carry the same id. The id combines
  the Swin shift region of the token along each axis (regions ``[0, Hp - wh)``,
  ``[Hp - wh, Hp - s)``, ``[Hp - s, Hp)`` of the rolled grid; tokens that wrapped around in the
  cyclic shift fall in the last region, so they never meet the tokens they were not adjacent to)
  and whether the token is padding (padding never mixes with real tokens)."""
  (h, w), (hp, wp), (wh, ww), (sh, sw) = grid, padded, window, shift
  if (h, w) == (hp, wp) and sh == 0 and sw == 0:
    return None

  def regions(lp, win, s):
    lab = np.zeros(lp, np.int32)
    if s:
      lab[lp - win:lp - s] = 1
      lab[lp - s:] = 2
    return lab

  region = regions(hp, wh, sh)[:, None] * 3 + regions(wp, ww, sw)[None, :]
  pad = np.zeros((hp, wp), bool)
  pad[h:, :] = True
  pad[:, w:] = True
  pad = np.roll(pad, (-sh, -sw), axis=(0, 1))
  seg = region * 2 + pad.astype(np.int32)
  seg = seg.reshape(hp // wh, wh, wp // ww, ww).transpose(0, 2, 1, 3)
  return seg.reshape(-1, wh * ww).astype(np.int32)


def windowed_attention(q, k, v, window, grid, *, shift=(0, 0), score_mod=None, scale=None,
                       impl="auto"):
  """Self-attention inside non-overlapping windows of a 2-D grid, with an optional Swin cyclic
  shift. ``q``, ``k``, ``v`` are ``[B, H, W, heads, d]``; returns ``[B, H, W, heads, dv]``.

  Grids that are not multiples of the window are zero-padded at the bottom/right; padded
  tokens are masked out (never keys of real tokens). Each window becomes one batch element of
  ``attnjax.attention``, so the work is ``(#windows) x (wh*ww)^2`` on every backend; the shift
  boundary and the padding are expressed as segment ids (see :func:`window_segments`)."""
  b = q.shape[0]
  h, w = grid
  wh, ww = window
  sh, sw = shift
  hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
  seg = window_segments((h, w), (hp, wp), window, shift)

  def prep(t):
    t = pad_grid(t, (hp, wp))
    if sh or sw:
      t = jnp.roll(t, (-sh, -sw), axis=(1, 2))
    return window_partition(t, window)  # [B*nW, wh*ww, heads, d]

  qw, kw, vw = prep(q), prep(k), prep(v)
  seg_ids = None
  if seg is not None:
    seg_ids = jnp.asarray(np.tile(seg, (b, 1)))
  out = attnjax.attention(qw, kw, vw, score_mod=score_mod, segment_ids=seg_ids,
                          kv_segment_ids=seg_ids, scale=scale, impl=impl)
  out = window_merge(out, window, (hp, wp))
  if sh or sw:
    out = jnp.roll(out, (sh, sw), axis=(1, 2))
  return out[:, :h, :w]


# ----------------------------------------------------------------------------------------------
# Swin relative position bias
# ----------------------------------------------------------------------------------------------


def swin_relative_position_index(window: Sequence[int]) -> np.ndarray:
  """Swin's ``relative_position_index``: ``int[N, N]`` for ``N = wh * ww`` with entry
  ``(y_i - y_j + wh - 1) * (2 ww - 1) + (x_i - x_j + ww - 1)`` (query ``i`` minus key ``j``)."""
  wh, ww = window
  ys, xs = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  return (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)


def swin_bias_score_mod(table: jax.Array, window: Sequence[int]) -> scores_lib.ScoreMod:
  """Score mod adding ``table[rel_index(i, j), h]`` (Swin layout ``[(2wh-1)(2ww-1), heads]``)
  for query ``i`` and key ``j`` indexed row-major inside one window. Computed per tile from the
  index grids; gradients flow into ``table``."""
  wh, ww = window
  n_rel = (2 * wh - 1) * (2 * ww - 1)

  def fn(params, s, b, h, q, k):
    (tab,) = params  # [n_rel, Hs]
    qy, qx = q // ww, q % ww
    ky, kx = k // ww, k % ww
    idx = (qy - ky + wh - 1) * (2 * ww - 1) + (qx - kx + ww - 1)
    idx = jnp.clip(idx, 0, n_rel - 1)  # out-of-window (padded tile) positions are clipped
    return s + scores_lib.table_bias(tab.astype(s.dtype).T, idx, q, k)

  return scores_lib.ScoreMod(fn, (table,), (scores_lib.Tiling(head_axis=1),),
                             "swin_relative_position_bias")


# ----------------------------------------------------------------------------------------------
# WindowAttention
# ----------------------------------------------------------------------------------------------


class WindowAttention(nnx.Module):
  """Swin window multi-head self-attention (W-MSA and shifted SW-MSA).

  Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows".
  Input ``[B, H, W, C]`` (or ``[B, N, C]`` with ``grid_size``; see the module docstring).

  Semantics. ``q, k, v = x W_qkv (+ b)`` split into ``num_heads`` heads of ``d = C / heads``.
  The grid is cyclically shifted by ``-shift_size`` (``jnp.roll``), cut into non-overlapping
  ``wh x ww`` windows and, inside each window, every head computes

      out_i = sum_j softmax_j(scale * q_i . k_j + B[rel(i, j), h] + M_ij) v_j

  with ``scale = qk_scale or d ** -0.5``, the learned relative position bias ``B`` (Swin's
  ``relative_position_bias_table``, ``[(2wh-1)(2ww-1), heads]``, indexed by
  ``(y_i - y_j + wh - 1)(2ww - 1) + (x_i - x_j + ww - 1)``) and ``M_ij = -inf`` where the shifted
  window holds tokens ``i`` and ``j`` that were not adjacent before the cyclic shift (Swin's
  ``attn_mask``, there ``-100``; here exact masking). The result is rolled back by ``+shift``
  and projected by ``W_proj``. ``shift_size=0`` is W-MSA; Swin alternates it with
  ``shift_size = window_size // 2``. As in Swin, no shift is applied when the grid holds a
  single window along some axis.

  Grids that are not multiples of the window are zero-padded at the bottom/right (as Swin's
  detection backbone does) but, unlike that code, padded tokens are masked out, so the output
  does not depend on the padding. ``window_size`` larger than the grid raises ``ValueError``.

  Implementation choice: windows are *partitioned* (each window is a batch element of
  ``attnjax.attention``) rather than expressed as one mask over all ``H*W`` tokens. In the
  row-major token order a window is not contiguous, so a mask would leave most tiles of the
  ``N x N`` score matrix partially filled and every backend would do ``O(N^2)`` work;
  partitioning does exactly ``#windows x (wh*ww)^2``. The shift boundary (and padding) is
  passed as segment ids, the bias as a score mod, so every backend supports it.

  Sharding (``attnjax.layers.common.AXIS_RULES``): ``proj`` kernel ``("heads", "embed")`` and
  the bias table's head axis go to the ``"tensor"`` mesh axis. The fused ``qkv`` kernel
  ``[dim, 3*dim]`` (output ordered ``(3, heads, head_dim)``) is left replicated: an even split
  of its fused axis is not head-aligned.
  """

  def __init__(self, dim: int, num_heads: int, window_size, *, shift_size=0,
               qkv_bias: bool = True, qk_scale: float | None = None, rel_pos_bias: bool = True,
               impl: str = "auto", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    name = type(self).__name__
    self.head_dim = check_dim_heads(name, dim, num_heads)
    self.dim, self.num_heads = dim, num_heads
    self.window_size = as_tuple(name, "window_size", window_size, 2)
    self.shift_size = as_tuple(name, "shift_size", shift_size, 2, minimum=0)
    for a in range(2):
      if self.shift_size[a] >= self.window_size[a]:
        raise ValueError(f"{name}: shift_size={self.shift_size} must be smaller than "
                         f"window_size={self.window_size} on every axis (0 <= shift < window)")
    self.scale = float(qk_scale) if qk_scale is not None else self.head_dim ** -0.5
    self.impl = impl
    self.qkv = linear(dim, 3 * dim, "embed", None, use_bias=qkv_bias, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
    self.proj = linear(dim, dim, "heads", "embed", dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
    if rel_pos_bias:
      wh, ww = self.window_size
      init = common.partitioned(jax.nn.initializers.truncated_normal(stddev=0.02), None, "heads")
      self.relative_position_bias_table = nnx.Param(
          init(rngs.params(), ((2 * wh - 1) * (2 * ww - 1), num_heads), param_dtype))
    else:
      self.relative_position_bias_table = None

  def __call__(self, x: jax.Array, grid_size=None) -> jax.Array:
    name = type(self).__name__
    xg, restore = to_grid(name, x, grid_size, 2, self.dim)
    b, h, w, _ = xg.shape
    check_fits(name, "window_size", self.window_size, (h, w))
    shift = self.shift_size
    if h <= self.window_size[0] or w <= self.window_size[1]:
      shift = (0, 0)  # Swin: a single window along an axis is not shifted
    qkv = self.qkv(xg).reshape(b, h, w, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    mod = None
    if self.relative_position_bias_table is not None:
      mod = swin_bias_score_mod(self.relative_position_bias_table[...], self.window_size)
    out = windowed_attention(q, k, v, self.window_size, (h, w), shift=shift, score_mod=mod,
                             scale=self.scale, impl=self.impl)
    out = self.proj(out.reshape(b, h, w, self.dim))
    return restore(out)


__all__ = ["WindowAttention", "window_partition", "window_merge", "windowed_attention",
           "swin_relative_position_index", "swin_bias_score_mod"]
