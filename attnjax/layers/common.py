"""Building blocks shared by the attention layers (stable API; other layer files import it).

Public API of this module (kept stable; vision and language layers both use it):

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

Validation (every error names the argument and the allowed values)
  ``check_choice(name, value, allowed)``, ``check_int(name, value, minimum)``,
  ``check_divisible(name, value, divisor_name, divisor)``, ``canonical_dtype(name, dtype)``,
  ``check_impl(impl)``.

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

Attention entry point
  ``attend(q, k, v, **kwargs)``   calls ``attnjax.attention`` (imported lazily so that the package
                                  ``__init__`` may import the layers).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.backends.base import explicit_spec

# ---------------------------------------------------------------------------------------------
# Sharding: logical axis names, mapped to mesh axes in exactly one place.
# ---------------------------------------------------------------------------------------------

AXIS_RULES: dict[str, str | None] = {
    "embed": None,      # model width (input/output features)
    "heads": "tensor",  # query heads: tensor parallel
    "kv_heads": "tensor",  # key/value heads (replicated automatically when there is 1)
    "head_dim": None,
    "latent": None,     # MLA compressed latent / LoRA ranks
    "router": None,     # MoH router outputs
    "norm": None,       # norm scales
}


def mesh_axes(*logical: str | None) -> tuple[str | None, ...]:
  """Mesh axis name for each logical axis name (``None`` passes through as replicated)."""
  out = []
  for name in logical:
    if name is None:
      out.append(None)
      continue
    if name not in AXIS_RULES:
      raise ValueError(f"unknown logical axis {name!r}; allowed: {sorted(AXIS_RULES)}")
    out.append(AXIS_RULES[name])
  return tuple(out)


def _mesh_active() -> bool:
  try:
    return not jax.sharding.get_abstract_mesh().empty
  except Exception:  # pragma: no cover - very old/new jax without abstract meshes
    return False


def partitioned(init, *logical: str | None):
  """``nnx.with_partitioning(init, mesh_axes(*logical))``; metadata-only without a mesh."""
  kwargs = {} if _mesh_active() else {"eager_sharding": False}
  return nnx.with_partitioning(init, mesh_axes(*logical), **kwargs)


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------

def check_choice(name: str, value, allowed: Iterable):
  allowed = tuple(allowed)
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed values: "
                     + ", ".join(repr(a) for a in allowed))
  return value


def check_int(name: str, value, minimum: int | None = None) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def check_divisible(name: str, value: int, divisor_name: str, divisor: int):
  if value % divisor:
    raise ValueError(f"{name}={value} must be divisible by {divisor_name}={divisor}")


def check_impl(impl):
  """``impl`` must be a backend name (validated by attnjax.attention) or a Backend instance."""
  from attnjax.backends.base import Backend  # pylint: disable=import-outside-toplevel
  if not isinstance(impl, (str, Backend)):
    raise ValueError(f"impl must be 'auto', a backend name ('reference', 'xla', 'chunked', ...) "
                     f"or an attnjax Backend instance, got {impl!r}")
  return impl


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def canonical_dtype(name: str, dtype) -> jnp.dtype:
  """Normalize a compute/param dtype given as a string or a jnp dtype."""
  try:
    key = jnp.dtype(dtype).name
  except TypeError:
    key = None
  if key not in _DTYPES:
    raise ValueError(f"{name}={dtype!r} is not supported; allowed values: {sorted(_DTYPES)}")
  return jnp.dtype(_DTYPES[key])


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

def _prod(shape):
  return int(math.prod(shape))


def match_sharding(x, ref):
  """``x`` resharded like ``ref`` (same rank) under an explicit-axes mesh, so that operations
  joining the two (concatenate, add) type-check; unchanged elsewhere."""
  spec = explicit_spec(ref)
  if spec is None or explicit_spec(x) == spec:
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec))


def replicated(x):
  """``x`` with no mesh axis left under an explicit-axes mesh (small tables indexed per head or
  per offset); unchanged elsewhere."""
  spec = explicit_spec(x)
  if spec is None or all(e is None for e in spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*([None] * x.ndim)))


def _reshape_spec(old, spec, new, mesh):
  """Output spec of ``reshape(old -> new)`` keeping each sharded axis on the leading output
  axis of its group (the axes whose sizes multiply to the same number), which holds the same
  contiguous chunk per device; None when a sharded axis is not the leading one of its group or
  the leading output axis is not divisible by the mesh axes' size. Size-1 axes are ignored."""
  if 0 in old or 0 in new:
    return None
  out = [None] * len(new)
  i = j = 0
  while i < len(old) and j < len(new):
    gi, gj, pi, pj = [i], [j], old[i], new[j]
    while pi != pj:
      if pi < pj:
        i += 1
        gi.append(i)
        pi *= old[i]
      else:
        j += 1
        gj.append(j)
        pj *= new[j]
    sharded = [d for d in gi if spec[d] is not None]
    if sharded:
      lead_in = next((d for d in gi if old[d] != 1), gi[0])
      lead_out = next((d for d in gj if new[d] != 1), gj[0])
      size = _prod(mesh.shape[a] for a in _mesh_axes_of(spec[sharded[0]]))
      if sharded != [lead_in] or new[lead_out] % size:
        return None
      out[lead_out] = spec[lead_in]
    i, j = i + 1, j + 1
  if any(spec[d] is not None for d in range(i, len(old))):
    return None
  return tuple(out)


def reshape(x, shape):
  """``jnp.reshape`` that also type-checks under an explicit-axes mesh, where JAX asks for the
  output sharding of a reshape that splits or merges a sharded axis: a sharded axis stays on
  the leading output axis of its group (e.g. channels ``C@tensor -> (heads@tensor, head_dim)``);
  when that is impossible the sharded axes are gathered first."""
  shape = tuple(int(d) for d in shape)
  if -1 in shape:
    known = _prod(d for d in shape if d != -1)
    shape = tuple(_prod(x.shape) // known if d == -1 else d for d in shape)
  spec = explicit_spec(x)
  if spec is None or all(e is None for e in spec):
    return jnp.reshape(x, shape)
  out = _reshape_spec(x.shape, spec, shape, jax.typeof(x).sharding.mesh)
  if out is None:
    return jnp.reshape(replicated(x), shape)
  return jax.lax.reshape(x, shape, out_sharding=jax.sharding.PartitionSpec(*out))


def _mesh_axes_of(entry):
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def explicit_out_spec(x, kernel, nin: int):
  """Output spec of ``x @ kernel`` (contracting x's trailing ``nin`` axes) under an
  explicit-axes mesh: x's leading axes keep their sharding, the output feature axes take the
  kernel's unless that mesh axis is already used by x's leading axes. None off such meshes
  (GSPMD propagates shardings there). Contracted sharded axes are reduced by JAX."""
  xs, ks = explicit_spec(x), explicit_spec(kernel)
  if xs is None and ks is None:
    return None
  xs = xs if xs is not None else (None,) * x.ndim
  ks = ks if ks is not None else (None,) * kernel.ndim
  lead = list(xs[:x.ndim - nin])
  used = {a for e in lead for a in _mesh_axes_of(e)}
  out = []
  for e in ks[nin:]:
    axes = _mesh_axes_of(e)
    if axes and not used.intersection(axes):
      out.append(e)
      used.update(axes)
    else:
      out.append(None)
  return tuple(lead + out)


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


def cache_step(buffers: Sequence[jax.Array], new: Sequence[jax.Array], pos, length, num_new,
               window_left: int | None) -> CacheStep:
  """Write ``T`` new tokens into a (ring) cache and say what to attend over.

  ``buffers``: cache arrays ``[B, S, ...]``; ``new``: the new tokens' arrays ``[B, T, ...]``
  (same trailing shapes); ``num_new [B]``: how many of the ``T`` tokens are real for each
  example (right padding; ``None`` = all). Token ``t`` of example ``b`` gets position
  ``length[b] + t`` and slot ``(length[b] + t) % S``.

  ``window_left`` is the farthest look-back of the layer's mask (query ``i`` never sees keys
  before ``i - window_left``), or ``None`` for unbounded (then ``S`` must hold every position:
  callers size it to the maximum length). When ``S >= T + window_left`` (always true for
  single-token decoding with ``S = window_left + 1``) the new tokens are written first and
  attention reads the cache alone; otherwise (prefill of a chunk longer than the ring allows)
  attention reads the old cache concatenated with the new tokens, and only the last ``S`` real
  tokens are then kept.
  """
  B, S = pos.shape
  T = new[0].shape[1]
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  if num_new is None:
    num_new = jnp.full((B,), T, jnp.int32)
  num_new = jnp.asarray(num_new, jnp.int32)
  if num_new.shape != (B,):
    raise ValueError(f"num_new must have shape [B]=[{B}], got {num_new.shape}")
  length = jnp.asarray(length, jnp.int32)
  q_pos = length[:, None] + t                      # [B, T]
  q_valid = t < num_new[:, None]
  write = q_valid & (t >= (num_new[:, None] - S))  # only the last S real tokens survive
  slots = jnp.where(write, q_pos % S, S)            # S = out of range -> dropped
  b_idx = jnp.arange(B)[:, None]

  def scatter(buf, x):
    return buf.at[b_idx, slots].set(x.astype(buf.dtype), mode="drop")

  new_buffers = tuple(scatter(b, x) for b, x in zip(buffers, new))
  new_pos = pos.at[b_idx, slots].set(q_pos, mode="drop")
  write_first = window_left is None or S >= T + window_left
  if write_first:
    attn = new_buffers
    kv_pos, kv_valid = new_pos, new_pos >= 0
  else:
    attn = tuple(jnp.concatenate([b, x.astype(b.dtype)], axis=1) for b, x in zip(buffers, new))
    kv_pos = jnp.concatenate([pos, q_pos], axis=1)
    kv_valid = jnp.concatenate([pos >= 0, q_valid], axis=1)
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
    "AXIS_RULES", "mesh_axes", "partitioned", "check_choice", "check_int", "check_divisible",
    "canonical_dtype", "check_impl", "Projection", "RMSNorm", "apply_rope", "default_positions",
    "KVCache", "LatentKVCache", "CrossKV", "CacheStep", "cache_step", "attend", "combine_masks",
]
