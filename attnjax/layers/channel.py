"""Channel group attention (DaViT).

Token layout: any ``[B, ..., C]`` (the attention treats channels as tokens and does not depend on
the spatial arrangement); see :mod:`attnjax.layers.window` for the convention of the other vision
layers and for the common arguments (``dtype``, ``param_dtype``, ``impl``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import attnjax
from attnjax.layers.window import check_dim_heads, linear


class ChannelAttention(nnx.Module):
  """Channel group attention: attention over channels within groups.

  Ding et al. 2022, "DaViT: Dual Attention Vision Transformers" (ECCV 2022), the channel
  attention block. Input ``[B, N, C]`` or any ``[B, *grid, C]`` (output in the same layout).
  The ``C`` channels are split into ``G = num_heads`` groups of ``C_g = C / G`` channels; with
  ``Q, K, V = x W_qkv (+ b)`` (each ``[N, C]``, group ``g`` being ``Q_g, K_g, V_g`` of shape
  ``[N, C_g]``):

      A_g   = softmax(C_g**-0.5 * Q_g^T K_g)       [C_g, C_g]   softmax over the key channels
      out_g = (A_g V_g^T)^T                         [N, C_g]
      out   = concat_g(out_g) W_proj (+ b)

  The scores are sums over all ``N`` spatial tokens, so every output token depends on the whole
  image (global receptive field) at cost ``O(N C^2 / G)``, linear in ``N``. It is computed by
  ``attnjax.attention`` with channels as the sequence axis (``Tq = Tk = C_g``), groups as
  heads and tokens as the head dimension (``D = N``), with ``scale = C_g**-0.5`` given
  explicitly. Note: the DaViT reference code names its projections so that it computes
  ``softmax(s k^T v)`` applied to ``q``; that is this formula with the three blocks of
  ``W_qkv`` permuted (their ``k, v, q`` are our ``Q, K, V``), which matters only when loading
  DaViT checkpoints.

  Sharding (``attnjax.layers.common.AXIS_RULES``): the ``proj`` kernel's input axis (channel
  groups, group-major) is ``"heads"`` (mesh axis ``"tensor"``). The fused ``qkv`` kernel
  ``[dim, 3*dim]`` (output ordered ``(3, groups, C_g)``) is left replicated: an even split of
  its fused axis is not group-aligned.
  """

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False,
               impl: str = "auto", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.group_dim = check_dim_heads(type(self).__name__, dim, num_heads)
    self.dim, self.num_heads = dim, num_heads
    self.scale = self.group_dim ** -0.5
    self.impl = impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = linear(dim, 3 * dim, "embed", None, use_bias=qkv_bias, **kw)
    self.proj = linear(dim, dim, "heads", "embed", **kw)

  def __call__(self, x: jax.Array, grid_size=None) -> jax.Array:
    name = type(self).__name__
    if x.ndim < 3:
      raise ValueError(f"{name}: x has shape {x.shape}; expected [B, N, C] or [B, *grid, C]")
    if x.shape[-1] != self.dim:
      raise ValueError(f"{name}: x has {x.shape[-1]} channels (shape {x.shape}) but the layer "
                       f"was built with dim={self.dim}; they must be equal")
    shape = x.shape
    n = math.prod(shape[1:-1])
    if grid_size is not None and math.prod(tuple(grid_size)) != n:
      raise ValueError(f"{name}: grid_size={tuple(grid_size)} holds {math.prod(grid_size)} "
                       f"tokens but x has {n} (shape {shape}); they must be equal")
    b, g, cg = shape[0], self.num_heads, self.group_dim
    qkv = self.qkv(x.reshape(b, n, self.dim)).reshape(b, n, 3, g, cg)
    # channels as the sequence axis: [B, C_g, G, N]
    q, k, v = (jnp.transpose(qkv[:, :, i], (0, 3, 2, 1)) for i in range(3))
    out = attnjax.attention(q, k, v, scale=self.scale, impl=self.impl)  # [B, C_g, G, N]
    out = jnp.transpose(out, (0, 3, 2, 1)).reshape(b, n, self.dim)
    return self.proj(out).reshape(shape[:-1] + (self.dim,))


__all__ = ["ChannelAttention"]
