"""Spatial-reduction attention (PVT / PVTv2), plus the grid pooling helpers of the vision layers.

Token layout and common arguments (``dtype``, ``param_dtype``, ``impl``): see
:mod:`attnjax.layers.window` (``[B, H, W, C]`` or ``[B, N, C]`` with
``grid_size``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attnjax
from attnjax.layers import common
from attnjax.layers import window as window_lib
from attnjax.layers.window import check_dim_heads, check_fits, conv, layer_norm, to_grid

# ----------------------------------------------------------------------------------------------
# Pooling over grid axes, as static averaging matrices
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=128)
def _bins_matrix(n_in: int, starts: tuple, ends: tuple) -> np.ndarray:
  m = np.zeros((len(starts), n_in), np.float32)
  for i, (s, e) in enumerate(zip(starts, ends)):
    m[i, s:e] = 1.0 / (e - s)
  m.setflags(write=False)
  return m


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` averaging matrix of PyTorch's ``AdaptiveAvgPool`` along one axis: output
  ``i`` averages inputs ``[floor(i n_in / n_out), ceil((i + 1) n_in / n_out))``."""
  starts = tuple((i * n_in) // n_out for i in range(n_out))
  ends = tuple(-((-(i + 1) * n_in) // n_out) for i in range(n_out))
  return _bins_matrix(n_in, starts, ends)


def avg_pool_matrix(n_in: int, size: int) -> np.ndarray:
  """``[ceil(n_in / size), n_in]`` matrix of a ``size``-wide, ``size``-strided average pool
  whose last, partial window averages only the tokens it holds (``ceil_mode=True``,
  ``count_include_pad=False``); equal to ``AvgPool(size, size)`` when ``size`` divides
  ``n_in``."""
  n_out = -(-n_in // size)
  starts = tuple(i * size for i in range(n_out))
  ends = tuple(min((i + 1) * size, n_in) for i in range(n_out))
  return _bins_matrix(n_in, starts, ends)


def pool_grid(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
  """Apply averaging matrices ``mh [h', H]`` and ``mw [w', W]`` to ``x [B, H, W, C]``."""
  mh = jnp.asarray(mh, x.dtype)
  mw = jnp.asarray(mw, x.dtype)
  return jnp.einsum("ph,bhwc,qw->bpqc", mh, x, mw)


def adaptive_avg_pool(x: jax.Array, out_size) -> jax.Array:
  """PyTorch ``AdaptiveAvgPool2d`` on a channels-last grid ``[B, H, W, C]``."""
  h, w = x.shape[1:3]
  return pool_grid(x, adaptive_pool_matrix(h, out_size[0]), adaptive_pool_matrix(w, out_size[1]))


# ----------------------------------------------------------------------------------------------
# SpatialReductionAttention
# ----------------------------------------------------------------------------------------------


class SpatialReductionAttention(nnx.Module):
  """Spatial-reduction attention (SRA) of the Pyramid Vision Transformer.

  Wang et al. 2021, "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction
  without Convolutions" (PVT, ``linear=False``) and Wang et al. 2022, "PVT v2: Improved
  Baselines with Pyramid Vision Transformer" (linear SRA, ``linear=True``). The baseline HiLo
  (LITv2) compares against. Input ``[B, H, W, C]`` (or ``[B, N, C]`` with ``grid_size``).

  Semantics, with ``d = dim / num_heads`` and ``scale = qk_scale or d ** -0.5``:

      Q = x W_q (+ b)                                     all H*W positions
      x_r = LN(Conv_{R x R, stride R}(x))                  sr_ratio R > 1 (PVT); x_r = x if R = 1
      x_r = GELU(LN(Conv_{1x1}(AdaptiveAvgPool_P(x))))    linear=True (PVTv2, P = pool_size)
      K, V = x_r W_kv (+ b)
      out = softmax(scale * Q K^T) V, then W_proj         per head, global attention

  The reduction conv has no padding, so grids not divisible by ``sr_ratio`` drop the last
  partial row/column of the reduction (PyTorch ``Conv2d`` semantics). LayerNorm uses
  ``eps=1e-5`` and GELU is exact (PyTorch defaults). ``sr_ratio`` or ``pool_size`` larger than
  the grid raises ``ValueError``.

  Sharding (``attnjax.layers.common.AXIS_RULES``): ``q`` kernel ``("embed", "heads")`` and
  ``proj`` kernel ``("heads", "embed")`` put heads on the ``"tensor"`` mesh axis. The fused
  ``kv`` kernel ``[dim, 2*dim]`` (output ordered ``(2, heads, head_dim)``) is left replicated
  (an even split of its fused axis is not head-aligned), as are the reduction conv and norm.
  """

  def __init__(self, dim: int, num_heads: int, *, sr_ratio: int = 1, linear: bool = False,
               pool_size: int = 7, qkv_bias: bool = False, qk_scale: float | None = None,
               impl: str = "auto", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    name = type(self).__name__
    self.head_dim = check_dim_heads(name, dim, num_heads)
    for arg, val in (("sr_ratio", sr_ratio), ("pool_size", pool_size)):
      if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
        raise ValueError(f"{name}: {arg} must be a positive int, got {val!r}")
    self.dim, self.num_heads = dim, num_heads
    self.sr_ratio, self.linear, self.pool_size = int(sr_ratio), bool(linear), int(pool_size)
    self.scale = float(qk_scale) if qk_scale is not None else self.head_dim ** -0.5
    self.impl = impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = window_lib.linear(dim, dim, "embed", "heads", use_bias=qkv_bias, **kw)
    self.kv = window_lib.linear(dim, 2 * dim, "embed", None, use_bias=qkv_bias, **kw)
    self.proj = window_lib.linear(dim, dim, "heads", "embed", **kw)
    if self.linear:
      self.sr = conv(dim, dim, kernel_size=(1, 1), padding="VALID", **kw)
      self.norm = layer_norm(dim, epsilon=1e-5, **kw)
    elif self.sr_ratio > 1:
      r = self.sr_ratio
      self.sr = conv(dim, dim, kernel_size=(r, r), strides=(r, r), padding="VALID", **kw)
      self.norm = layer_norm(dim, epsilon=1e-5, **kw)
    else:
      self.sr = None
      self.norm = None

  def reduce(self, xg: jax.Array) -> jax.Array:
    """The reduced key/value grid ``[B, h', w', C]``."""
    name = type(self).__name__
    grid = xg.shape[1:3]
    if self.linear:
      check_fits(name, "pool_size", (self.pool_size,) * 2, grid)
      xr = adaptive_avg_pool(xg, (self.pool_size,) * 2)
      return jax.nn.gelu(self.norm(self.sr(xr)), approximate=False)
    if self.sr_ratio > 1:
      check_fits(name, "sr_ratio", (self.sr_ratio,) * 2, grid)
      return self.norm(self.sr(xg))
    return xg

  def __call__(self, x: jax.Array, grid_size=None) -> jax.Array:
    xg, restore = to_grid(type(self).__name__, x, grid_size, 2, self.dim)
    b, h, w, c = xg.shape
    q = common.reshape(self.q(xg), (b, h * w, self.num_heads, self.head_dim))
    xr = self.reduce(xg)
    kv = common.reshape(self.kv(xr), (b, -1, 2, self.num_heads, self.head_dim))
    out = attnjax.attention(q, kv[:, :, 0], kv[:, :, 1], scale=self.scale, impl=self.impl)
    return restore(self.proj(common.reshape(out, (b, h, w, c))))


__all__ = ["SpatialReductionAttention", "adaptive_avg_pool", "adaptive_pool_matrix",
           "avg_pool_matrix", "pool_grid"]
