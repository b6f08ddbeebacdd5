"""A Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers
for Image Recognition at Scale") whose attention is any 2-D layer of :mod:`attnjax.layers`.

Patches of ``p x p`` pixels are flattened and linearly embedded (equal to a ``p x p`` conv with
stride ``p``), a learned position embedding is added, and pre-norm blocks ``x += Attn(LN(x));
x += MLP(LN(x))`` (GELU MLP, as in ViT) follow; a final LayerNorm, pooling (class token or
mean over patches) and a linear classifier give the logits.

Class token and grid attentions. Layers that need the token grid (neighborhood, swin, hilo,
agent, spatial_reduction, cascaded) run on the ``(H/p, W/p)`` patch tokens only. With
``pool="cls"`` the class token is kept out of the grid and, in every block, attends globally
through a separate single-query class-attention layer (a non-causal :class:`MultiHeadAttention`
whose query is the class token and whose keys/values are the class token and all patch tokens,
as in CaiT's class attention, Touvron et al. 2021); patch tokens never see the class token.
"global" (standard ViT MHA) and "channel" (channel attention, grid-free) include the class
token in their token set.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.layers import common
from attnjax.layers.mha import MultiHeadAttention
from attnjax.layers.window import layer_norm
from attnjax.models.registry import (VIT_ATTENTIONS, Dense, ViTDims, lookup,
                                     model_partitioned)

POOLS = ("cls", "mean")


def _pair(name, value):
  vals = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
  if len(vals) != 2:
    raise ValueError(f"{name}={value!r} must be an int or a pair of ints")
  return tuple(common.check_int(name, v, 1) for v in vals)


def _check_heads(dim: int, num_heads: int, attention: str, attention_kwargs) -> None:
  """Every ViT attention splits ``dim`` into ``num_heads`` heads of ``dim // num_heads``
  channels (only "global" with an explicit ``attention_kwargs["head_dim"]`` does not): say so in
  the model's terms, before a layer names its own ``in_features``."""
  if dim % num_heads == 0 or (attention == "global" and (attention_kwargs or {}).get("head_dim")):
    return
  divisors = [h for h in range(1, dim + 1) if dim % h == 0]
  near = [max(h for h in divisors if h < num_heads)]   # 1 always divides
  near += [h for h in divisors if h > num_heads][:1]
  raise ValueError(
      f"ViT dim={dim} is not divisible by num_heads={num_heads} (model.dim / model.num_heads "
      f"in a training config): attention={attention!r} splits dim into num_heads heads of "
      f"dim // num_heads channels. Choose num_heads dividing dim (e.g. "
      f"{' or '.join(map(str, near))}) or a dim that is a multiple of num_heads.")


class MLP(nnx.Module):
  """ViT MLP: ``GELU(x W_1 + b_1) W_2 + b_2``; kernels ``("embed", "mlp")``/``("mlp",
  "embed")``."""

  def __init__(self, dim: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Dense(dim, mlp_dim, "embed", "mlp", **kw)
    self.fc2 = Dense(mlp_dim, dim, "mlp", "embed", **kw)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x, jnp.float32), approximate=False))


class ViTBlock(nnx.Module):
  """Pre-norm block; see the module docstring for how the class token meets grid layers."""

  def __init__(self, attention: str, dims: ViTDims, attention_kwargs, mlp_dim: int,
               has_cls: bool, *, rngs: nnx.Rngs):
    entry = VIT_ATTENTIONS[attention]
    kw = dict(dtype=dims.dtype, param_dtype=dims.param_dtype)
    self.grid = tuple(dims.grid)
    self.needs_grid = entry.needs_grid
    self.has_cls = bool(has_cls)
    self.norm1 = layer_norm(dims.dim, epsilon=1e-6, rngs=rngs, **kw)
    self.attn = entry(dims, attention_kwargs, rngs=rngs)
    self.cls_attn = MultiHeadAttention(dims.num_heads, dims.dim, causal=False, rngs=rngs, **kw) \
        if self.needs_grid and self.has_cls else None
    self.norm2 = layer_norm(dims.dim, epsilon=1e-6, rngs=rngs, **kw)
    self.mlp = MLP(dims.dim, mlp_dim, rngs=rngs, **kw)
    if self.needs_grid:
      self._check_grid(attention, dims)

  def _check_grid(self, attention, dims):
    """Trace the grid layer once on the patch grid so unsuitable grids fail at construction."""
    x = jax.ShapeDtypeStruct((1,) + self.grid + (dims.dim,), dims.dtype)
    try:
      jax.eval_shape(lambda t: self.attn(t), x)
    except ValueError as e:
      raise ValueError(f"ViT attention={attention!r} does not suit the patch grid {self.grid} "
                       f"(image_size / patch_size): {e}") from e

  def __call__(self, x):
    h = self.norm1(x)
    if not self.needs_grid:
      a = self.attn(h)
    elif self.has_cls:
      patches = self.attn(h[:, 1:], grid_size=self.grid)
      cls = self.cls_attn(h[:, :1], h)                       # class attention (CaiT)
      a = jnp.concatenate([cls.astype(patches.dtype), patches], axis=1)
    else:
      a = self.attn(h, grid_size=self.grid)
    x = x + a.astype(x.dtype)
    return x + self.mlp(self.norm2(x)).astype(x.dtype)


class ViT(nnx.Module):
  """Vision Transformer classifier: ``images float [B, H, W, C] -> logits float32 [B,
  num_classes]``::

      t = patches(x) W_patch + b                 [B, N, dim], N = (H/p)(W/p), row-major
      t = [cls; t] + pos   (pool="cls")   or   t + pos   (pool="mean")
      t = t + Attn_l(LN(t));  t = t + MLP_l(LN(t))          l = 1..depth
      logits = LN(t)[:, 0] W_head   (cls)   or   mean_n LN(t)[:, n] W_head   (mean)

  ``attention`` names an entry of :data:`VIT_ATTENTIONS` ("global", "neighborhood", "swin",
  "hilo", "agent", "spatial_reduction", "cascaded", "channel"), ``attention_kwargs`` extra
  constructor arguments of that layer (e.g. ``{"kernel_size": 5}``, ``{"window_size": 4}``).
  "swin" alternates unshifted and shifted (``window // 2``) windows across blocks. Image sizes
  must be multiples of ``patch_size`` and the patch grid must suit the layer (e.g. a
  neighborhood kernel no larger than the grid); both raise ``ValueError`` at construction.
  All attentions are non-causal. ``dtype`` is the compute dtype, ``param_dtype`` that of the
  parameters; logits are float32. The position embedding (std 0.02) is learned for the fixed
  ``image_size``.
  """

  def __init__(self, *, image_size, patch_size, in_channels: int, num_classes: int, dim: int,
               depth: int, num_heads: int, mlp_dim: int, attention: str = "global",
               attention_kwargs=None, pool: str = "cls", dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.image_size = _pair("image_size", image_size)
    self.patch_size = _pair("patch_size", patch_size)
    for a in range(2):
      if self.image_size[a] % self.patch_size[a]:
        raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size="
                         f"{self.patch_size} on both axes")
    self.grid = tuple(i // p for i, p in zip(self.image_size, self.patch_size))
    self.in_channels = common.check_int("in_channels", in_channels, 1)
    self.num_classes = common.check_int("num_classes", num_classes, 1)
    self.dim = common.check_int("dim", dim, 1)
    self.depth = common.check_int("depth", depth, 1)
    self.num_heads = common.check_int("num_heads", num_heads, 1)
    self.mlp_dim = common.check_int("mlp_dim", mlp_dim, 1)
    self.attention = attention
    lookup(VIT_ATTENTIONS, attention, "attention for ViT")
    _check_heads(self.dim, self.num_heads, attention, attention_kwargs)
    self.pool = common.check_choice("pool", pool, POOLS)
    self.dtype = common.canonical_dtype("dtype", dtype)
    self.param_dtype = common.canonical_dtype("param_dtype", param_dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ph, pw = self.patch_size
    self.patch_embed = Dense(ph * pw * self.in_channels, self.dim, "patch", "embed",
                             use_bias=True, rngs=rngs, **kw)
    n_tok = math.prod(self.grid) + (1 if self.pool == "cls" else 0)
    init = model_partitioned(nnx.initializers.normal(stddev=0.02), "patch", "embed")
    self.pos_embed = nnx.Param(init(rngs.params(), (n_tok, self.dim), self.param_dtype))
    if self.pool == "cls":
      cinit = model_partitioned(nnx.initializers.zeros_init(), "embed")
      self.cls_token = nnx.Param(cinit(rngs.params(), (self.dim,), self.param_dtype))
    else:
      self.cls_token = None
    self.blocks = nnx.List([
        ViTBlock(attention, ViTDims(self.dim, self.num_heads, self.grid, self.dtype,
                                    self.param_dtype, layer_index=i, depth=self.depth),
                 attention_kwargs, self.mlp_dim, self.pool == "cls", rngs=rngs)
        for i in range(self.depth)])
    self.norm = layer_norm(self.dim, epsilon=1e-6, rngs=rngs, **kw)
    self.head = Dense(self.dim, self.num_classes, "embed", "classes", use_bias=True,
                      rngs=rngs, **kw)

  def patchify(self, images):
    """``[B, H, W, C] -> [B, N, p*p*C]`` (patches row-major, pixels ``(py, px, c)``)."""
    expect = self.image_size + (self.in_channels,)
    if images.ndim != 4 or tuple(images.shape[1:]) != expect:
      raise ValueError(f"images must be [B, {expect[0]}, {expect[1]}, {expect[2]}] "
                       f"(image_size, in_channels), got {images.shape}")
    b = images.shape[0]
    (gh, gw), (ph, pw) = self.grid, self.patch_size
    x = images.reshape(b, gh, ph, gw, pw, self.in_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, ph * pw * self.in_channels)

  def __call__(self, images):
    x = self.patch_embed(self.patchify(jnp.asarray(images)).astype(self.dtype))
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (x.shape[0], 1, self.dim))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embed[...].astype(self.dtype)[None]
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x.astype(jnp.float32), axis=1)
    return self.head(pooled, jnp.float32)


__all__ = ["ViT", "ViTBlock", "MLP"]
