"""Sharding of the layers: logical axis names mapped to mesh axes in one place, and the helpers
that keep explicit-axes meshes type-correct (part of :mod:`attnjax.layers.common`'s stable API,
re-exported there; see its docstring)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
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


def mesh_axis_size(logical: str) -> int | None:
  """Number of devices the logical axis ``logical`` is split over under the active mesh: the
  product of the sizes of the mesh axes :data:`AXIS_RULES` maps it to (axes the mesh lacks
  count 1; a replicated axis gives 1). ``None`` when no mesh is active (then the annotation is
  metadata only and whoever applies it decides)."""
  if not _mesh_active():
    return None
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  (entry,) = mesh_axes(logical)
  return _prod(sizes.get(a, 1) for a in _mesh_axes_of(entry))


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
