"""HiLo attention (LITv2).

Token layout and common arguments (``dtype``, ``param_dtype``, ``impl``): see
:mod:`attnjax.layers.window` (``[B, H, W, C]`` or ``[B, N, C]`` with
``grid_size``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attnjax
from attnjax.layers import common
from attnjax.layers.spatial_reduction import avg_pool_matrix, pool_grid
from attnjax.layers.window import (check_dim_heads, check_fits, linear, to_grid,
                                   windowed_attention)


class HiLoAttention(nnx.Module):
  """HiLo attention: high-frequency heads attend locally, low-frequency heads globally to
  average-pooled keys/values.

  Pan et al. 2022, "Fast Vision Transformers with HiLo Attention" (LITv2). Follows the
  reference ``HiLo`` module of the LITv2 code. Input ``[B, H, W, C]`` (or ``[B, N, C]`` with
  ``grid_size``); ``s = window_size``, ``d = dim / num_heads``, ``scale = qk_scale or d**-0.5``.

  Heads are split by ``alpha``: ``l = int(num_heads * alpha)`` Lo-Fi heads and ``num_heads - l``
  Hi-Fi heads (with ``s = 1`` all heads are Lo-Fi, which is standard MHSA). ``alpha`` is a real
  number in ``[0, 1]`` (Python, numpy or 0-d jax scalar; bools are rejected).

  * Hi-Fi (``(H - l) d`` channels): ``q, k, v = x W_qkv^h``; the grid is cut into
    non-overlapping ``s x s`` windows and each head runs softmax attention inside its window;
    then ``W_proj^h``.
  * Lo-Fi (``l d`` channels): ``Q = x W_q^l`` at every position; ``x_p = AvgPool_{s x s,
    stride s}(x)``; ``K, V = x_p W_kv^l``; ``softmax(scale Q K^T) V`` over all pooled tokens;
    then ``W_proj^l``.
  * Output: ``concat([hifi, lofi], channels)`` (Hi-Fi channels first, as in LITv2).

  Grids not divisible by ``s``: the Hi-Fi branch pads the grid at the bottom/right and masks
  the padded tokens out (LITv2's dense-prediction code pads with zeros and attends to them);
  the Lo-Fi pool's last partial window averages the tokens it holds (``ceil_mode=True``,
  ``count_include_pad=False``). For grids divisible by ``s`` both agree with LITv2 exactly.
  ``window_size`` larger than the grid raises ``ValueError``.

  Both branches call ``attnjax.attention``: Hi-Fi on the partitioned windows (each window a
  batch element; padding as segment ids), Lo-Fi with ``Tk = ceil(H/s) ceil(W/s)``.

  Sharding: all parameters are annotated replicated (through
  ``attnjax.layers.common.partitioned``). Each branch holds only ``l`` or ``num_heads - l``
  heads, and a device count dividing ``num_heads`` need not divide those (e.g. 4 heads,
  ``alpha=0.5``, 4 devices), so no branch kernel is sharded by heads; the fused ``h_qkv`` /
  ``l_kv`` kernels are in addition not head-aligned along their fused axis.
  """

  def __init__(self, dim: int, num_heads: int, *, window_size: int = 2, alpha: float = 0.5,
               qkv_bias: bool = False, qk_scale: float | None = None, impl: str = "auto",
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    name = type(self).__name__
    head_dim = check_dim_heads(name, dim, num_heads)
    if isinstance(window_size, bool) or not isinstance(window_size, (int, np.integer)) \
        or window_size < 1:
      raise ValueError(f"{name}: window_size must be a positive int, got {window_size!r}")
    alpha = common.check_real(f"{name}: alpha (the fraction of Lo-Fi heads)", alpha, 0.0, 1.0)
    self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
    self.window_size, self.alpha = int(window_size), alpha
    self.l_heads = int(num_heads * alpha)
    if self.window_size == 1:
      self.l_heads = num_heads  # s = 1: standard MHSA, all heads Lo-Fi
    self.h_heads = num_heads - self.l_heads
    self.l_dim, self.h_dim = self.l_heads * head_dim, self.h_heads * head_dim
    self.scale = float(qk_scale) if qk_scale is not None else head_dim ** -0.5
    self.impl = impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if self.l_heads > 0:
      self.l_q = linear(dim, self.l_dim, "embed", None, use_bias=qkv_bias, **kw)
      self.l_kv = linear(dim, 2 * self.l_dim, "embed", None, use_bias=qkv_bias, **kw)
      self.l_proj = linear(self.l_dim, self.l_dim, None, "embed", **kw)
    else:
      self.l_q = self.l_kv = self.l_proj = None
    if self.h_heads > 0:
      self.h_qkv = linear(dim, 3 * self.h_dim, "embed", None, use_bias=qkv_bias, **kw)
      self.h_proj = linear(self.h_dim, self.h_dim, None, "embed", **kw)
    else:
      self.h_qkv = self.h_proj = None

  def hifi(self, xg: jax.Array) -> jax.Array:
    """Hi-Fi branch on ``[B, H, W, C]``: ``[B, H, W, h_dim]``."""
    b, h, w, _ = xg.shape
    s = self.window_size
    qkv = self.h_qkv(xg).reshape(b, h, w, 3, self.h_heads, self.head_dim)
    out = windowed_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], (s, s),
                             (h, w), scale=self.scale, impl=self.impl)
    return self.h_proj(out.reshape(b, h, w, self.h_dim))

  def lofi(self, xg: jax.Array) -> jax.Array:
    """Lo-Fi branch on ``[B, H, W, C]``: ``[B, H, W, l_dim]``."""
    b, h, w, _ = xg.shape
    s = self.window_size
    q = self.l_q(xg).reshape(b, h * w, self.l_heads, self.head_dim)
    xp = xg if s == 1 else pool_grid(xg, avg_pool_matrix(h, s), avg_pool_matrix(w, s))
    kv = self.l_kv(xp).reshape(b, -1, 2, self.l_heads, self.head_dim)
    out = attnjax.attention(q, kv[:, :, 0], kv[:, :, 1], scale=self.scale, impl=self.impl)
    return self.l_proj(out.reshape(b, h, w, self.l_dim))

  def __call__(self, x: jax.Array, grid_size=None) -> jax.Array:
    name = type(self).__name__
    xg, restore = to_grid(name, x, grid_size, 2, self.dim)
    check_fits(name, "window_size", (self.window_size,) * 2, xg.shape[1:3])
    parts = []
    if self.h_heads > 0:
      parts.append(self.hifi(xg))
    if self.l_heads > 0:
      parts.append(self.lofi(xg))
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return restore(out)


__all__ = ["HiLoAttention"]
