"""Cascaded group attention (EfficientViT).

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
from attnjax import scores as scores_lib
from attnjax.layers import common
from attnjax.layers.window import as_tuple, check_dim_heads, conv, linear, to_grid


def abs_offset_bias_score_mod(table: jax.Array, grid, resolution) -> scores_lib.ScoreMod:
  """Score mod adding ``table[0, |y_i - y_j| * R_w + |x_i - x_j|]`` for query token ``i`` and key
  token ``j`` of a row-major ``grid`` (EfficientViT / LeViT attention biases, one head:
  ``table`` is ``[1, R_h * R_w]``)."""
  gw = grid[1]
  rw = resolution[1]
  size = resolution[0] * resolution[1]

  def fn(params, s, b, h, q, k):
    (tab,) = params
    idx = jnp.abs(q // gw - k // gw) * rw + jnp.abs(q % gw - k % gw)
    idx = jnp.clip(idx, 0, size - 1)
    return s + scores_lib.table_bias(tab.astype(s.dtype), idx, q, k)

  return scores_lib.ScoreMod(fn, (table,), (scores_lib.Tiling(head_axis=0),),
                             "abs_offset_bias")


class CascadedGroupAttention(nnx.Module):
  """Cascaded group attention (CGA).

  Liu et al. 2023, "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group
  Attention" (CVPR 2023), the ``CascadedGroupAttention`` module. Input ``[B, H, W, C]`` (or
  ``[B, N, C]`` with ``grid_size``). With ``h = num_heads``, the channels are split into ``h``
  chunks ``x_1..x_h`` of ``C / h`` channels, and head ``j`` sees its own split plus the previous
  head's output:

      x~_1 = x_1;   x~_j = x_j + o_{j-1}  (j > 1)               the cascade
      q_j, k_j, v_j = x~_j W_j (+ b_j)     q_j, k_j: key_dim ch., v_j: C / h channels
      q_j = DWConv_{K_j x K_j}(q_j)         depthwise conv on the grid (token interaction)
      o_j = softmax(key_dim**-0.5 q_j k_j^T + Bias_j) v_j
      out = ReLU(concat(o_1..o_h)) W_proj (+ b)

  ``Bias_j[(y_i, x_i), (y_k, x_k)] = attention_biases[j, |y_i - y_k| * R_w + |x_i - x_k|]`` is
  EfficientViT's learned bias over absolute offsets (``resolution=(R_h, R_w)`` sets the table
  size; the grid must fit in it; ``resolution=None`` disables it). The value dim of each head is
  ``C / h`` so that ``o_{j-1}`` can be added to ``x_j`` (EfficientViT sets ``attn_ratio`` so that
  this holds). EfficientViT's ``Conv2d_BN`` pairs are represented in their inference (fused)
  form: a linear map / depthwise conv with a bias. The heads run sequentially (each a
  one-head ``attnjax.attention`` call with its bias as a score mod).
  EfficientViT applies CGA inside ``LocalWindowAttention`` windows; this module is the
  attention on one grid (use it per window).

  Sharding (``attnjax.layers.common.AXIS_RULES``): the ``proj`` kernel's input axis (the
  head-major concatenation of the ``o_j``) and the head axis of ``attention_biases`` are
  ``"heads"`` (mesh axis ``"tensor"``). Each head's own ``qkvs[j]`` / ``dws[j]`` parameters have
  no head axis and are replicated.
  """

  def __init__(self, dim: int, num_heads: int, *, key_dim: int = 16, kernels=5,
               resolution=None, impl: str = "auto", dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    name = type(self).__name__
    self.split = check_dim_heads(name, dim, num_heads)
    if isinstance(key_dim, bool) or not isinstance(key_dim, (int, np.integer)) or key_dim < 1:
      raise ValueError(f"{name}: key_dim must be a positive int, got {key_dim!r}")
    ks = list(kernels) if isinstance(kernels, (tuple, list)) else [kernels] * num_heads
    if len(ks) != num_heads:
      raise ValueError(f"{name}: kernels={kernels!r} has {len(ks)} entries but num_heads="
                       f"{num_heads}; give one kernel size per head or a single int")
    for kk in ks:
      if isinstance(kk, bool) or not isinstance(kk, (int, np.integer)) or kk < 1 or kk % 2 == 0:
        raise ValueError(f"{name}: kernels={kernels!r} must hold odd positive ints (same-size "
                         f"depthwise convs)")
    self.dim, self.num_heads, self.key_dim = dim, num_heads, int(key_dim)
    self.kernels = tuple(int(kk) for kk in ks)
    self.scale = self.key_dim ** -0.5
    self.impl = impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkvs = nnx.List([linear(self.split, 2 * self.key_dim + self.split, None, None, **kw)
                          for _ in range(num_heads)])
    self.dws = nnx.List([conv(self.key_dim, self.key_dim, kernel_size=(kk, kk),
                              padding="SAME", feature_group_count=self.key_dim, **kw)
                         for kk in self.kernels])
    self.proj = linear(dim, dim, "heads", "embed", **kw)
    if resolution is not None:
      self.resolution = as_tuple(name, "resolution", resolution, 2)
      init = common.partitioned(nnx.initializers.zeros_init(), "heads", None)
      self.attention_biases = nnx.Param(
          init(jax.random.key(0), (num_heads, self.resolution[0] * self.resolution[1]),
               param_dtype))
    else:
      self.resolution = None
      self.attention_biases = None

  def __call__(self, x: jax.Array, grid_size=None) -> jax.Array:
    name = type(self).__name__
    xg, restore = to_grid(name, x, grid_size, 2, self.dim)
    b, h, w, _ = xg.shape
    if self.resolution is not None and (h > self.resolution[0] or w > self.resolution[1]):
      raise ValueError(f"{name}: the input grid {(h, w)} exceeds resolution={self.resolution}, "
                       f"the extent of the attention-bias table; resolution must be >= the "
                       f"grid size on every axis")
    kd, d = self.key_dim, self.split
    feats_in = [xg[..., i * d:(i + 1) * d] for i in range(self.num_heads)]
    outs, feat = [], None
    for i in range(self.num_heads):
      feat = feats_in[i] if i == 0 else feat + feats_in[i]
      qkv = self.qkvs[i](feat)
      q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
      q = self.dws[i](q)
      mod = None
      if self.attention_biases is not None:
        table = common.replicated(self.attention_biases[...])   # per-head row, any mesh
        mod = abs_offset_bias_score_mod(table[i:i + 1], (h, w), self.resolution)
      o = attnjax.attention(q.reshape(b, h * w, 1, kd), k.reshape(b, h * w, 1, kd),
                            v.reshape(b, h * w, 1, d), score_mod=mod, scale=self.scale,
                            impl=self.impl)
      feat = o.reshape(b, h, w, d)
      outs.append(feat)
    out = self.proj(jax.nn.relu(jnp.concatenate(outs, axis=-1)))
    return restore(out)


__all__ = ["CascadedGroupAttention", "abs_offset_bias_score_mod"]
