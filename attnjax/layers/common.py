"""Building blocks shared by the attention layers (stable API; other layer files import it).

Public API of this module (kept stable; vision and language layers both use it). The sharding
and validation helpers are defined in :mod:`attnjax.layers.sharding` and
:mod:`attnjax.layers.checks` and re-exported here:

Sharding
  ``AXIS_RULES``                  logical axis name -> mesh axis name (or None = replicated).
                                  The single place where logical names are mapped: attention
                                  heads (``"heads"``, ``"kv_heads"``) go to the ``"tensor"``
                                  mesh axis; everything else is replicated by default.
  ``mesh_axes(*logical)``         tuple of mesh axis names for a parameter's logical axes.
  ``partitioned(init, *logical)`` an initializer wrapped in ``nnx.with_partitioning``. When no
                                  mesh is active at construction the annotation is metadata only
                                  (``eager_sharding=False``), so layers build without a mesh;
                                  under ``jax.set_mesh(mesh)`` parameters are sharded eagerly.
  ``mesh_axis_size(logical)``     devices a logical axis is split over under the active mesh
                                  (``None`` without one); layers use it to replicate an axis the
                                  mesh cannot split evenly (GQA key/value heads).

Validation (every error names the argument and the allowed values)
  ``check_choice(name, value, allowed)``, ``check_int(name, value, minimum)``,
  ``check_divisible(name, value, divisor_name, divisor)``, ``check_real(name, value, lo, hi)``,
  ``check_bool(name, value)``, ``canonical_dtype(name, dtype)``, ``check_impl(impl)``,
  ``check_cache_shapes(owner, cache, expected, hint)``.

Modules
  ``Projection(in_shape, out_shape, in_axes, out_axes, ...)``  a dense map contracting the
      trailing ``len(in_shape)`` axes of the input into ``out_shape`` (kernel
      ``[*in_shape, *out_shape]``, float32 parameters, computed in ``dtype``).
  ``RMSNorm(features, ...)``      ``x / sqrt(mean(x^2) + eps) * scale`` over the last axis,
                                  computed in float32, returned in ``dtype``.

Rotary position embedding
  ``apply_rope(x, positions, theta=10000.0)``  RoPE (Su et al. 2021, "RoFormer") on the last axis
      of ``x [B, T, H, D]`` at integer ``positions [T]`` or ``[B, T]``, in the "rotate half"
      (GPT-NeoX / Llama) layout: pairs ``(x[i], x[i + D/2])`` are rotated by angle
      ``pos * theta ** (-2 i / D)``. ``D`` must be even.

KV caches (functional: layers take a cache and return the updated one)
  ``KVCache(k, v, pos, length)``            keys/values ``[B, S, Hkv, D]``/``[B, S, Hkv, Dv]``,
      ``pos [B, S]`` int32 position held by each slot (-1 = empty), ``length [B]`` int32 tokens
      seen so far per example (the next token's position). Slot of position ``p`` is ``p % S``:
      with ``S >= max length`` this is a plain cache, with ``S`` = the window it is a ring buffer
      whose memory is bounded by the window.
  ``LatentKVCache(latent, k_rope, pos, length)``  the MLA cache (compressed latent + rope key).
  ``CrossKV(k, v, positions, segment_ids)``  projected memory of a cross-attention layer.
  ``cache_step(buffers, new, pos, length, num_new, window_left)``  the per-call bookkeeping of
      incremental decoding shared by all causal layers; returns a :class:`CacheStep`.
  ``shard_heads_like(x, kernel, kernel_head_axis)``  a cache buffer ``[B, S, H, D]`` with its
      head axis sharded like a projection kernel's head axis (explicit-axes meshes).
  ``shard_cache_batch(cache, batch_axis)``  a cache with its batch axis split over mesh axes
      (the ``batch_axis`` of every ``init_cache``; decoding data-parallel batches).

Score mods held by layers
  ``StoredScoreMod(score_mod, trainable=True)``  a constructor score mod whose array leaves are
      ``nnx.Param`` (trainable) or :class:`ScoreModConstant`; ``.get()`` rebuilds the mod.

Attention entry point
  ``attend(q, k, v, **kwargs)``   calls ``attnjax.attention`` (imported lazily so that the package
                                  ``__init__`` may import the layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.backends.base import explicit_spec

# Sharding and argument checks live in their own modules; re-exported here (stable API).
from attnjax.layers.sharding import (AXIS_RULES, _mesh_active, _mesh_axes_of, _prod,  # noqa: F401
                                     explicit_out_spec, match_sharding, mesh_axes,
                                     mesh_axis_size, partitioned, replicated, reshape)
from attnjax.layers.checks import (canonical_dtype, check_bool, check_choice,  # noqa: F401
                                   check_divisible, check_impl, check_int, check_real)

# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class Projection(nnx.Module):
  """Dense map contracting the trailing ``len(in_shape)`` axes into ``out_shape``.

  ``y[..., *o] = sum_{*i} x[..., *i] * kernel[*i, *o] (+ bias[*o])``. Parameters live in
  ``param_dtype`` (float32); the product runs in ``dtype`` with float32 accumulation.
  ``in_axes``/``out_axes`` are the logical axis names of the kernel dimensions (see
  :data:`AXIS_RULES`). The default init is LeCun-normal over the contracted fan-in.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               in_axes: Sequence[str | None], out_axes: Sequence[str | None], *,
               use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init=None, rngs: nnx.Rngs):
    self.in_shape = tuple(int(s) for s in in_shape)
    self.out_shape = tuple(int(s) for s in out_shape)
    if len(in_axes) != len(self.in_shape) or len(out_axes) != len(self.out_shape):
      raise ValueError("Projection: one logical axis name per kernel dimension is required")
    self.dtype = dtype
    nin = len(self.in_shape)
    if kernel_init is None:
      kernel_init = nnx.initializers.variance_scaling(
          1.0, "fan_in", "truncated_normal", in_axis=tuple(range(nin)),
          out_axis=tuple(range(nin, nin + len(self.out_shape))))
    init = partitioned(kernel_init, *in_axes, *out_axes)
    self.kernel = nnx.Param(init(rngs.params(), self.in_shape + self.out_shape, param_dtype))
    if use_bias:
      binit = partitioned(nnx.initializers.zeros_init(), *out_axes)
      self.bias = nnx.Param(binit(rngs.params(), self.out_shape, param_dtype))
    else:
      self.bias = None

  def __call__(self, x):
    nin = len(self.in_shape)
    if tuple(x.shape[x.ndim - nin:]) != self.in_shape:
      raise ValueError(f"Projection expects trailing input shape {self.in_shape}, got {x.shape}")
    kernel = self.kernel[...].astype(self.dtype)
    kw = {}
    out_spec = explicit_out_spec(x, kernel, nin)
    if out_spec is not None:
      kw["out_sharding"] = jax.sharding.PartitionSpec(*out_spec)
    y = jax.lax.dot_general(
        x.astype(self.dtype), kernel,
        ((tuple(range(x.ndim - nin, x.ndim)), tuple(range(nin))), ((), ())),
        preferred_element_type=jnp.float32, **kw)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm (Zhang & Sennrich 2019) over the last axis with a learned scale:
  ``x * rsqrt(mean(x**2) + eps) * scale``, computed in float32, returned in ``dtype``."""

  def __init__(self, features: int, *, eps: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    self.eps = float(eps)
    self.dtype = dtype
    init = partitioned(nnx.initializers.ones_init(), "norm")
    self.scale = nnx.Param(init(jax.random.key(0), (int(features),), param_dtype))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------

def _positions_bt(positions, batch: int, length: int):
  pos = jnp.asarray(positions)
  if pos.ndim == 1:
    pos = pos[None, :]
  if pos.ndim != 2 or pos.shape[-1] != length or pos.shape[0] not in (1, batch):
    raise ValueError(f"positions must have shape [T] or [B, T] with T={length}, B={batch}; "
                     f"got {pos.shape}")
  return pos


def apply_rope(x, positions, theta: float = 10000.0):
  """Rotary embedding of ``x [B, T, H, D]`` at ``positions [T] | [B, T]`` (rotate-half layout).

  ``out[..., i] = x[i] cos(p w_i) - x[i + D/2] sin(p w_i)`` and
  ``out[..., i + D/2] = x[i + D/2] cos(p w_i) + x[i] sin(p w_i)`` for ``i < D/2`` with
  ``w_i = theta ** (-2 i / D)``. Computed in float32, returned in ``x.dtype``."""
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head dimension, got {d}")
  pos = _positions_bt(positions, x.shape[0], x.shape[1]).astype(jnp.float32)
  inv = theta ** (-np.arange(0, d // 2, dtype=np.float32) * 2.0 / d)
  ang = pos[..., None] * jnp.asarray(inv)  # [B|1, T, D/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def default_positions(positions, batch: int, length: int, offset=None):
  """Int32 positions for ``length`` tokens in the shapes ``attnjax.attention`` accepts: ``[T]``
  (shared by the batch) or ``[B, T]``. ``positions`` given as ``[T]``, ``[1, T]`` or ``[B, T]``;
  default ``arange(T)`` (plus ``offset [B]`` per example when given)."""
  if positions is None:
    pos = jnp.arange(length, dtype=jnp.int32)
    if offset is not None:
      pos = jnp.asarray(offset, jnp.int32)[:, None] + pos[None]
    return pos
  pos = _positions_bt(positions, batch, length).astype(jnp.int32)
  return pos[0] if pos.shape[0] == 1 and batch != 1 else pos


# ---------------------------------------------------------------------------------------------
# KV caches
# ---------------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Key/value cache of one attention layer (see the module docstring for the layout).

  Slot ``s`` of example ``b`` holds the key/value of position ``pos[b, s]`` (``-1``: empty);
  ``length[b]`` is the number of tokens of example ``b`` written so far. Examples advance
  independently (ragged batches)."""
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  length: jax.Array

  @property
  def capacity(self) -> int:
    return self.k.shape[1]

  @classmethod
  def create(cls, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
             v_head_dim: int | None = None, dtype=jnp.float32) -> "KVCache":
    check_int("batch_size", batch, 1)
    check_int("capacity", capacity, 1)
    dv = head_dim if v_head_dim is None else v_head_dim
    return cls(jnp.zeros((batch, capacity, num_kv_heads, head_dim), dtype),
               jnp.zeros((batch, capacity, num_kv_heads, dv), dtype),
               jnp.full((batch, capacity), -1, jnp.int32), jnp.zeros((batch,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentKVCache:
  """MLA cache: normalized latent ``c_KV [B, S, d_c]`` and RoPE'd shared key ``k_R [B, S, d_R]``
  (DeepSeek-V2 caches exactly these ``d_c + d_R`` numbers per token), plus ``pos``/``length``
  as in :class:`KVCache`."""
  latent: jax.Array
  k_rope: jax.Array
  pos: jax.Array
  length: jax.Array

  @property
  def capacity(self) -> int:
    return self.latent.shape[1]

  @classmethod
  def create(cls, batch: int, capacity: int, latent_dim: int, rope_dim: int,
             dtype=jnp.float32) -> "LatentKVCache":
    check_int("batch_size", batch, 1)
    check_int("capacity", capacity, 1)
    return cls(jnp.zeros((batch, capacity, latent_dim), dtype),
               jnp.zeros((batch, capacity, rope_dim), dtype),
               jnp.full((batch, capacity), -1, jnp.int32), jnp.zeros((batch,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CrossKV:
  """Projected memory of a cross-attention layer, computed once and reused while decoding:
  ``k [B, M, Hkv, D]``, ``v [B, M, Hkv, Dv]``, ``positions [B|1, M]`` and optional
  ``segment_ids [B, M]``."""
  k: jax.Array
  v: jax.Array
  positions: jax.Array
  segment_ids: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheStep:
  """Everything a layer needs for one incremental call (produced by :func:`cache_step`).

  ``attn``: buffers to attend over (``[B, S', ...]`` each); ``kv_positions [B, S']``;
  ``kv_segment_ids [B, S']`` (1 = valid slot, -1 = empty); ``q_positions [B, T]``;
  ``q_segment_ids [B, T]`` (1 = real token, 0 = padding, so padding rows see nothing and
  return 0); ``buffers``/``pos``/``length``: the updated cache contents."""
  attn: tuple
  kv_positions: jax.Array
  kv_segment_ids: jax.Array
  q_positions: jax.Array
  q_segment_ids: jax.Array
  buffers: tuple
  pos: jax.Array
  length: jax.Array


def _concrete(x):
  """``x`` as a numpy array when its value is known (not traced), else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except Exception:  # pylint: disable=broad-except  (abstract values of other transforms)
    return None


def cache_step(buffers: Sequence[jax.Array], new: Sequence[jax.Array], pos, length, num_new,
               window_left: int | None) -> CacheStep:
  """Write ``T`` new tokens into a (ring) cache and say what to attend over.

  ``buffers``: cache arrays ``[B, S, ...]``; ``new``: the new tokens' arrays ``[B, T, ...]``
  (same trailing shapes); ``num_new [B]`` (integers): how many of the ``T`` tokens are real for
  each example (right padding; ``None`` = all). Token ``t`` of example ``b`` gets position
  ``length[b] + t`` and slot ``(length[b] + t) % S``.

  ``window_left`` is the farthest look-back of the layer's mask (query ``i`` never sees keys
  before ``i - window_left``), or ``None`` for unbounded (then ``S`` must hold every position:
  callers size it to the maximum length). When ``S >= T + window_left`` (always true for
  single-token decoding with ``S = window_left + 1``) the new tokens are written first and
  attention reads the cache alone; otherwise (prefill of a chunk longer than the ring allows)
  attention reads the old cache concatenated with the new tokens, and only the last ``S`` real
  tokens are then kept. A ring (``window_left`` given) therefore takes chunks of any length
  ``T``, and its results are exact while ``S >= window_left`` or no token has been evicted yet.

  Errors (``ValueError``), so that no call returns wrong numbers silently:

  * ``window_left=None``, ``num_new=None`` and ``T > S``: more new tokens than the cache holds
    (a shape fact, raised under ``jax.jit`` too; with ``num_new`` the padding beyond it is not
    written, so a chunk padded past ``S`` is fine while its real tokens fit);
  * when ``num_new`` is concrete (not traced): a value outside ``[0, T]``;
  * when ``length`` and ``num_new`` are concrete: without a window, ``length + num_new > S``
    (tokens the queries need would be overwritten); with a ring smaller than the look-back
    (``S < window_left``, a cache made with ``max_length < window``), ``length > S`` (keys in
    the window were already evicted).

  Under ``jax.jit`` (traced values) ``num_new`` is clipped to ``[0, T]``, and overflowing the
  cache across calls cannot be reported: keeping ``length + num_new <= S`` (no window) is the
  caller's contract.

  Sharding: under an explicit-axes mesh each new array is resharded like its buffer before it
  is written (so a head-sharded cache from ``init_cache`` takes head-sharded keys as they are,
  and a replicated buffer takes any), and the updated buffers keep the buffers' sharding.
  """
  B, S = pos.shape
  T = new[0].shape[1]
  if window_left is None and num_new is None and T > S:
    raise ValueError(f"{T} new tokens do not fit the KV cache: it holds {S} tokens (the "
                     f"max_length given to init_cache), and without a window every token of a "
                     f"sequence must stay in the cache; create the cache with max_length >= "
                     f"the prompt length plus the tokens to generate")
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  if num_new is None:
    num_new = jnp.full((B,), T, jnp.int32)
  num_new = jnp.asarray(num_new)
  if not jnp.issubdtype(num_new.dtype, jnp.integer):
    raise ValueError(f"num_new must be an integer array [B]=[{B}], got dtype {num_new.dtype}")
  num_new = num_new.astype(jnp.int32)
  if num_new.shape != (B,):
    raise ValueError(f"num_new must have shape [B]=[{B}], got {num_new.shape}")
  nn_val = _concrete(num_new)
  if nn_val is not None and (nn_val.min() < 0 or nn_val.max() > T):
    raise ValueError(f"num_new={nn_val.tolist()} must lie in [0, T] with T={T} (the number of "
                     f"new tokens passed; num_new counts how many of them are real)")
  num_new = jnp.clip(num_new, 0, T)   # defined behaviour under jit (a no-op when valid)
  length = jnp.asarray(length, jnp.int32)
  len_val = _concrete(length)
  if len_val is not None and nn_val is not None:
    if window_left is None and (len_val + nn_val).max() > S:
      raise ValueError(f"the KV cache overflows: cache length {len_val.tolist()} + num_new "
                       f"{nn_val.tolist()} tokens exceed its {S} slots (the max_length given to "
                       f"init_cache); without a window every token of a sequence must stay in "
                       f"the cache")
    if window_left is not None and S < window_left and len_val.max() > S:
      raise ValueError(f"the ring KV cache of {S} slots (init_cache's max_length, smaller than "
                       f"the window {window_left + 1}) has evicted keys still in the window: "
                       f"cache length {len_val.tolist()} > {S}; create the cache with "
                       f"max_length >= the window or >= the total sequence length")
  q_pos = length[:, None] + t                      # [B, T]
  q_valid = t < num_new[:, None]
  write = q_valid & (t >= (num_new[:, None] - S))  # only the last S real tokens survive
  slots = jnp.where(write, q_pos % S, S)            # S = out of range -> dropped
  b_idx = jnp.arange(B)[:, None]
  new = tuple(match_sharding(x.astype(b.dtype), b) for b, x in zip(buffers, new))

  def scatter(buf, x):
    spec = explicit_spec(buf)   # a batch-sharded cache: the scatter keeps the buffer's spec
    kw = {} if spec is None else {"out_sharding": jax.sharding.PartitionSpec(*spec)}
    return buf.at[b_idx, slots].set(x, mode="drop", **kw)

  new_buffers = tuple(scatter(b, x) for b, x in zip(buffers, new))
  new_pos = scatter(pos, q_pos)
  write_first = window_left is None or S >= T + window_left
  if write_first:
    attn = new_buffers
    kv_pos, kv_valid = new_pos, new_pos >= 0
  else:
    attn = tuple(jnp.concatenate([b, x], axis=1) for b, x in zip(buffers, new))
    kv_pos = jnp.concatenate([pos, match_sharding(q_pos, pos)], axis=1)
    kv_valid = jnp.concatenate([pos >= 0, match_sharding(q_valid, pos)], axis=1)
  return CacheStep(
      attn=attn,
      kv_positions=jnp.where(kv_valid, kv_pos, 0),
      kv_segment_ids=jnp.where(kv_valid, 1, -1).astype(jnp.int32),
      q_positions=q_pos,
      q_segment_ids=q_valid.astype(jnp.int32),
      buffers=new_buffers,
      pos=new_pos,
      length=length + num_new,
  )


def shard_heads_like(x, kernel, kernel_head_axis: int):
  """``x [B, S, H, D]`` (a cache buffer) with its head axis sharded like axis
  ``kernel_head_axis`` of the projection ``kernel`` that produces those heads, under an
  explicit-axes mesh; batch, slot and feature axes replicated. Unchanged elsewhere (no mesh,
  GSPMD meshes, where shardings propagate)."""
  spec = explicit_spec(kernel)
  if spec is None:
    return x
  want = (None, None, spec[kernel_head_axis]) + (None,) * (x.ndim - 3)
  if explicit_spec(x) == want:
    return x
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(jax.typeof(kernel).sharding.mesh,
                                                            jax.sharding.PartitionSpec(*want)))


def shard_cache_batch(cache, batch_axis, *, strict: bool = True):
  """``cache`` (any cache dataclass of arrays with the batch on axis 0) with its batch axis split
  over the mesh axis or axes ``batch_axis`` (a name, a tuple of names, or ``None`` = leave the
  cache as it is), the other axes keeping their sharding. Decoding a batch that is sharded over
  a data axis then keeps each replica's examples' keys and values on that replica instead of
  replicating the whole batch's cache on every device.

  Needs an active mesh (``jax.set_mesh``); eager or under ``jax.jit``, explicit or auto axes
  (``jax.device_put`` to the spec). ``ValueError`` for an unknown axis name, an axis that also
  shards another axis of the cache (e.g. ``"tensor"`` when heads are split over it), or a batch
  size the axes do not divide. ``strict=False`` (what :func:`attnjax.models.generate` uses to
  follow a prompt's sharding) leaves an array's batch axis as it is instead of raising when the
  axis is taken by another of its axes or does not divide the batch."""
  if batch_axis is None:
    return cache
  names = (batch_axis,) if isinstance(batch_axis, str) else batch_axis
  if not isinstance(names, (tuple, list)) or not names or \
      not all(isinstance(n, str) for n in names):
    raise ValueError(f"batch_axis must be a mesh axis name, a tuple of names or None, got "
                     f"{batch_axis!r}")
  names = tuple(names)
  if not _mesh_active():
    raise ValueError(f"batch_axis={batch_axis!r} needs an active mesh (jax.set_mesh(mesh)); "
                     f"without one the cache lives on one device")
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  unknown = [n for n in names if n not in sizes]
  if unknown:
    raise ValueError(f"batch_axis={batch_axis!r}: {unknown} not in the mesh axes "
                     f"{tuple(mesh.axis_names)}")
  split = _prod(sizes[n] for n in names)
  leaves = jax.tree.leaves(cache)
  batch = leaves[0].shape[0]
  if batch % split:
    if not strict:
      return cache
    raise ValueError(f"batch_axis={batch_axis!r} splits the batch {split} ways, which does not "
                     f"divide the cache's batch size {batch}")
  entry = names[0] if len(names) == 1 else names

  def place(x):
    spec = list(explicit_spec(x) or (None,) * x.ndim)
    used = {a for e in spec[1:] for a in _mesh_axes_of(e)}
    if used & set(names):
      if not strict:
        return x
      raise ValueError(f"batch_axis={batch_axis!r} is already used by another axis of the "
                       f"cache (spec {tuple(spec)}); pick the axis the batch is split over")
    spec[0] = entry
    return jax.device_put(x, jax.sharding.PartitionSpec(*spec))

  return jax.tree.map(place, cache)


def check_cache_shapes(owner: str, cache, expected: dict, hint: str):
  """Raise ``ValueError`` unless each field of ``cache`` named in ``expected`` has the shape
  given there (``None`` entries match any size; ``"S"`` must be the same size in every field
  that names it). The message lists the cache's shapes, the expected ones and ``hint``."""
  got = {f: tuple(getattr(cache, f).shape) for f in expected}
  slots = set()
  ok = True
  for f, want in expected.items():
    g = got[f]
    if len(g) != len(want):
      ok = False
      continue
    for gd, wd in zip(g, want):
      if wd == "S":
        slots.add(gd)
      elif wd is not None and gd != wd:
        ok = False
  if ok and len(slots) <= 1:
    return
  fmt = lambda shape: "[" + ", ".join("S" if d == "S" else "*" if d is None else str(d)
                                      for d in shape) + "]"
  raise ValueError(f"{owner}: the cache does not fit this layer and input: it has "
                   + ", ".join(f"{f} {list(g)}" for f, g in got.items())
                   + "; expected " + ", ".join(f"{f} {fmt(w)}" for f, w in expected.items())
                   + f" (S = the cache's slots, the same in every field); {hint}")


# ---------------------------------------------------------------------------------------------
# Score mods held by layers
# ---------------------------------------------------------------------------------------------

class ScoreModConstant(nnx.Variable):
  """A fixed (non-trainable) array leaf of a layer's score mod (``score_mod_trainable=False``):
  ``nnx.grad`` and ``nnx.Optimizer(wrt=nnx.Param)`` leave it alone."""


class StoredScoreMod(nnx.Module):
  """A score mod given to a layer's constructor, kept so that its arrays are layer state.

  The mod's pytree leaves (its ``params``: ALiBi slopes, bias tables, low-rank factors) are
  stored as ``nnx.Param`` when ``trainable`` and floating point, otherwise as
  :class:`ScoreModConstant`; the pytree structure (the function and its static settings) is
  static. :meth:`get` rebuilds the mod from the current values at call time, so gradients of
  ``nnx.grad`` reach the trainable leaves exactly as ``jax.grad`` of
  :func:`attnjax.attention` reaches the params of the same mod. Arrays captured by a
  :func:`attnjax.scores.from_function` closure are not leaves of the mod (they are hoisted
  only when a backend binds it) and stay constants; pass such learnable arrays through a
  built-in mod, or build the mod from ``nnx.Param`` values and pass it at call time."""

  def __init__(self, score_mod, *, trainable: bool = True):
    leaves, self.treedef = jax.tree.flatten(score_mod)
    self.trainable = bool(trainable)

    def wrap(leaf):
      leaf = jnp.asarray(leaf)
      if self.trainable and jnp.issubdtype(leaf.dtype, jnp.floating):
        return nnx.Param(leaf)
      return ScoreModConstant(leaf)

    self.leaves = nnx.List([wrap(leaf) for leaf in leaves])

  def get(self):
    """The score mod with the current values of its leaves."""
    return jax.tree.unflatten(self.treedef, [v[...] for v in self.leaves])


# ---------------------------------------------------------------------------------------------
# The attention entry point
# ---------------------------------------------------------------------------------------------

def attend(q, k, v, **kwargs):
  """``attnjax.attention(q, k, v, **kwargs)``, imported at call time."""
  from attnjax.api import attention  # pylint: disable=import-outside-toplevel
  return attention(q, k, v, **kwargs)


def combine_masks(*ms):
  """AND of the non-None masks, or None when there are none."""
  out = None
  for m in ms:
    if m is None:
      continue
    out = m if out is None else (out & m)
  return out


__all__ = [
    "AXIS_RULES", "mesh_axes", "partitioned", "mesh_axis_size", "check_choice", "check_int",
    "check_divisible", "check_real", "check_bool", "canonical_dtype", "check_impl",
    "check_cache_shapes", "Projection", "RMSNorm", "apply_rope", "default_positions", "KVCache",
    "LatentKVCache", "CrossKV", "CacheStep", "cache_step", "shard_heads_like",
    "shard_cache_batch", "ScoreModConstant", "StoredScoreMod", "attend", "combine_masks",
]
