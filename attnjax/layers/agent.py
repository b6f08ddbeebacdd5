"""Agent attention.

Token layout and common arguments (``dtype``, ``param_dtype``, ``impl``): see
:mod:`attnjax.layers.window` (``[B, H, W, C]`` or ``[B, N, C]`` with
``grid_size``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attnjax
from attnjax.layers.spatial_reduction import adaptive_avg_pool
from attnjax.layers import common
from attnjax.layers.window import (as_tuple, check_dim_heads, check_fits, conv, layer_norm,
                                    linear, to_grid)


def _bilinear(x: jax.Array, size) -> jax.Array:
  """Resize the last two axes of ``x`` to ``size`` like PyTorch ``F.interpolate(mode=
  'bilinear', align_corners=False)`` (half-pixel centres, no antialiasing)."""
  if tuple(x.shape[-2:]) == tuple(size):
    return x
  return jax.image.resize(x, x.shape[:-2] + tuple(size), method="bilinear", antialias=False)


class AgentAttention(nnx.Module):
  """Agent attention: a few agent tokens (pooled queries) aggregate from the keys/values, then
  broadcast back to every query; plus a depthwise-conv term on the values.

  Han et al. 2024, "Agent Attention: On the Integration of Softmax and Linear Attention"
  (ECCV 2024). Follows the PVT/DeiT variant of the reference code (``AgentAttention`` with
  ``agent_num``, ``sr_ratio`` and the six agent position-bias tensors), without a class token.
  Input ``[B, H, W, C]`` (or ``[B, N, C]`` with ``grid_size``), ``d = dim / num_heads``,
  ``scale = qk_scale or d ** -0.5``, ``n = ph * pw`` agents.

      Q = x W_q (+ b)                                   [N, C], N = H W
      x_r = LN(Conv_{R x R, stride R}(x)) if sr_ratio R > 1 else x
      K, V = x_r W_kv (+ b)                             [N_k, C], N_k = (H // R)(W // R)
      A = AdaptiveAvgPool_{ph x pw}(Q)                  [n, C]   agent tokens (pooled queries)
      V_A = softmax(scale A K^T + B_1) V                agent aggregation, per head [n, d]
      O   = softmax(scale Q A^T + B_2) V_A              agent broadcast,  per head [N, d]
      out = (O + DWConv_{k x k}(up(V))) W_proj          up = bilinear resize to H x W (R > 1)

  Position biases (``position_bias=True``, needs the ``grid_size`` the layer runs on, as the
  reference code fixes ``num_patches``): ``B_1[h, a, (y, x)] = interp(an_bias)[h, a, y, x] +
  ah_bias[h, a, y] + aw_bias[h, a, x]`` over the key grid and ``B_2[h, (y, x), a] =
  interp(na_bias)[h, a, y, x] + ha_bias[h, y, a] + wa_bias[h, x, a]`` over the query grid, where
  ``an_bias``/``na_bias`` are ``[heads, n, T, T]`` tables (``T = bias_table_size``, 7 in the
  paper) bilinearly resized (PyTorch ``align_corners=False`` semantics).

  Both softmax steps call ``attnjax.attention`` (the biases as ``bias=``, ``[1, heads, n, N_k]``
  and ``[1, heads, N, n]``, linear in N), so the cost is ``O(N n d)``. Non-causal only: the
  agents pool over all queries. ``agent_num`` is a perfect square ``p*p`` (the paper's
  ``AdaptiveAvgPool2d(p)``) or a tuple ``(ph, pw)``; it must fit in the grid.

  Sharding (``attnjax.layers.common.AXIS_RULES``): ``q`` kernel ``("embed", "heads")``,
  ``proj`` kernel ``("heads", "embed")`` and the head axis of the six position-bias tensors go
  to the ``"tensor"`` mesh axis. The fused ``kv`` kernel ``[dim, 2*dim]`` (output ordered
  ``(2, heads, head_dim)``) is left replicated (an even split of its fused axis is not
  head-aligned), as are the convs (``sr``, ``dwc``) and the norm.
  """

  def __init__(self, dim: int, num_heads: int, *, agent_num=49, grid_size=None,
               position_bias: bool = True, bias_table_size: int = 7, sr_ratio: int = 1,
               dwc_kernel: int = 3, qkv_bias: bool = False, qk_scale: float | None = None,
               impl: str = "auto", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    name = type(self).__name__
    self.head_dim = check_dim_heads(name, dim, num_heads)
    self.dim, self.num_heads = dim, num_heads
    if isinstance(agent_num, (tuple, list)):
      self.agent_shape = as_tuple(name, "agent_num", agent_num, 2)
    else:
      if isinstance(agent_num, bool) or not isinstance(agent_num, (int, np.integer)) \
          or agent_num < 1 or math.isqrt(int(agent_num)) ** 2 != agent_num:
        raise ValueError(f"{name}: agent_num={agent_num!r} must be a perfect square p*p (pooled "
                         f"to p x p agents) or a tuple (ph, pw)")
      p = math.isqrt(int(agent_num))
      self.agent_shape = (p, p)
    self.agent_num = self.agent_shape[0] * self.agent_shape[1]
    for arg, val in (("sr_ratio", sr_ratio), ("dwc_kernel", dwc_kernel),
                     ("bias_table_size", bias_table_size)):
      if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
        raise ValueError(f"{name}: {arg} must be a positive int, got {val!r}")
    if dwc_kernel % 2 == 0:
      raise ValueError(f"{name}: dwc_kernel={dwc_kernel} must be odd (same-size depthwise conv)")
    self.sr_ratio = int(sr_ratio)
    self.scale = float(qk_scale) if qk_scale is not None else self.head_dim ** -0.5
    self.impl = impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = linear(dim, dim, "embed", "heads", use_bias=qkv_bias, **kw)
    self.kv = linear(dim, 2 * dim, "embed", None, use_bias=qkv_bias, **kw)
    self.proj = linear(dim, dim, "heads", "embed", **kw)
    if self.sr_ratio > 1:
      r = self.sr_ratio
      self.sr = conv(dim, dim, kernel_size=(r, r), strides=(r, r), padding="VALID", **kw)
      self.norm = layer_norm(dim, epsilon=1e-5, **kw)
    else:
      self.sr = self.norm = None
    self.dwc = conv(dim, dim, kernel_size=(dwc_kernel, dwc_kernel), padding="SAME",
                        feature_group_count=dim, **kw)
    self.grid_size = None
    self.position_bias = bool(position_bias)
    if self.position_bias:
      if grid_size is None:
        raise ValueError(f"{name}: position_bias=True needs grid_size=(H, W), the token grid "
                         f"the layer runs on (the bias tensors have one entry per row and "
                         f"column); pass grid_size or position_bias=False")
      self.grid_size = as_tuple(name, "grid_size", grid_size, 2)
      gh, gw = self.grid_size
      kh, kw_ = gh // self.sr_ratio, gw // self.sr_ratio
      if kh < 1 or kw_ < 1:
        raise ValueError(f"{name}: sr_ratio={sr_ratio} is larger than grid_size="
                         f"{self.grid_size}; sr_ratio must be <= the grid size on every axis")
      init = common.partitioned(jax.nn.initializers.truncated_normal(stddev=0.02), "heads",
                                None, None, None)
      nh, n, t = num_heads, self.agent_num, int(bias_table_size)
      key = rngs.params
      self.an_bias = nnx.Param(init(key(), (nh, n, t, t), param_dtype))
      self.na_bias = nnx.Param(init(key(), (nh, n, t, t), param_dtype))
      self.ah_bias = nnx.Param(init(key(), (nh, n, kh, 1), param_dtype))
      self.aw_bias = nnx.Param(init(key(), (nh, n, 1, kw_), param_dtype))
      self.ha_bias = nnx.Param(init(key(), (nh, gh, 1, n), param_dtype))
      self.wa_bias = nnx.Param(init(key(), (nh, 1, gw, n), param_dtype))

  def _biases(self, grid, kv_grid):
    nh, n = self.num_heads, self.agent_num
    b1 = _bilinear(self.an_bias[...], kv_grid) + self.ah_bias[...] + self.aw_bias[...]
    b1 = common.reshape(b1, (1, nh, n, -1))  # [1, heads, n, N_k]
    b2 = jnp.swapaxes(common.reshape(_bilinear(self.na_bias[...], grid), (nh, n, -1)), 1, 2)
    b2 = b2 + common.reshape(self.ha_bias[...] + self.wa_bias[...], (nh, -1, n))
    return b1, b2[None]  # [1, heads, N, n]

  def __call__(self, x: jax.Array, grid_size=None) -> jax.Array:
    name = type(self).__name__
    xg, restore = to_grid(name, x, grid_size, 2, self.dim)
    b, h, w, c = xg.shape
    nh, hd, n = self.num_heads, self.head_dim, self.agent_num
    if self.position_bias and (h, w) != self.grid_size:
      raise ValueError(f"{name}: the input grid is {(h, w)} but the layer was built with "
                       f"grid_size={self.grid_size} (its position biases are sized for it); "
                       f"the grids must be equal")
    check_fits(name, "agent_num", self.agent_shape, (h, w))
    q = self.q(xg)  # [B, H, W, C]
    if self.sr_ratio > 1:
      check_fits(name, "sr_ratio", (self.sr_ratio,) * 2, (h, w))
      xr = self.norm(self.sr(xg))
    else:
      xr = xg
    kh, kw = xr.shape[1:3]
    kv = common.reshape(self.kv(xr), (b, kh, kw, 2, c))
    k, v = kv[..., 0, :], kv[..., 1, :]
    agents = common.reshape(adaptive_avg_pool(q, self.agent_shape), (b, n, nh, hd))
    b1 = b2 = None
    if self.position_bias:
      b1, b2 = self._biases((h, w), (kh, kw))
    agent_v = attnjax.attention(agents, common.reshape(k, (b, kh * kw, nh, hd)),
                                common.reshape(v, (b, kh * kw, nh, hd)), bias=b1,
                                scale=self.scale,
                                impl=self.impl)
    out = attnjax.attention(common.reshape(q, (b, h * w, nh, hd)), agents, agent_v, bias=b2,
                            scale=self.scale, impl=self.impl)
    if self.sr_ratio > 1:
      v = jax.image.resize(v, (b, h, w, c), method="bilinear", antialias=False)
    out = common.reshape(out, (b, h, w, c)) + self.dwc(v)
    return restore(self.proj(out))


__all__ = ["AgentAttention"]
