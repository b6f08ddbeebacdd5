"""What every backend receives (a validated :class:`Problem`) and declares (:class:`Capabilities`).

``attnjax.attention`` validates its arguments once, builds a Problem and hands it to a backend.
A backend declares what it supports; :func:`unsupported` names the first feature of a problem it
lacks so the dispatcher can raise ``NotImplementedError`` (explicit ``impl=``) or try the next
backend (``impl="auto"``). No backend may drop a feature silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax import scores as scores_lib


def explicit_spec(x):
  """``x``'s partition spec, padded to its rank, when ``x`` is typed with a sharding over an
  explicit-axes mesh (``jax.make_mesh``'s default axis type); None otherwise (numpy input, no
  mesh, auto or manual axes, older jax)."""
  try:
    sharding = jax.typeof(x).sharding
    mesh = sharding.mesh
  except Exception:  # pylint: disable=broad-except
    return None
  if mesh.empty or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  spec = tuple(sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def _varying(x) -> frozenset:
  try:
    aval = jax.typeof(x)
  except TypeError:        # not an array-like leaf
    return frozenset()
  mat = getattr(aval, "manual_axis_type", None)   # jax >= 0.10
  if mat is not None:
    return frozenset(getattr(mat, "varying", ()))
  return frozenset(getattr(aval, "vma", ()))      # older jax


def varying_axes(*trees) -> frozenset:
  """Mesh axes along which any array leaf of ``trees`` varies inside ``shard_map`` (its
  varying-manual-axes type); empty outside ``shard_map``."""
  return frozenset().union(*(_varying(x) for x in jax.tree.leaves(trees)))


def cast_varying(tree, axes: frozenset):
  """Mark every leaf of ``tree`` as varying over ``axes``. Inside ``shard_map`` with
  ``check_vma``, loop carries and ``switch`` branches built from constants must be typed like
  the values they will hold, which vary with the device's inputs."""
  def one(x):
    missing = tuple(sorted(axes - _varying(x), key=str))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(one, tree)


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """Features a backend supports. ``platforms`` lists jax platform names ('cpu', 'gpu', 'tpu')."""
  name: str
  platforms: frozenset = frozenset({"cpu", "gpu", "tpu"})
  gqa: bool = True
  dv_neq_d: bool = True
  cross_attention: bool = True
  masks: bool = True
  per_head_masks: bool = True
  segment_ids: bool = True
  sinks: bool = True
  score_mods: bool = True
  bias: bool = True
  lse: bool = True
  backward: bool = True
  explicit_positions: bool = True
  dtypes: frozenset = frozenset({"float32", "bfloat16", "float16", "float64"})


@dataclasses.dataclass
class Problem:
  """A validated attention call. Arrays keep the user's layout ``[B, T, H, D]``."""
  q: jax.Array
  k: jax.Array
  v: jax.Array
  mask: masks_lib.Mask
  score_mod: scores_lib.ScoreMod | None  # bias (if any) is folded in as the first link
  sinks: jax.Array | None                # [Hq]
  q_segment_ids: jax.Array | None        # [B, Tq] int32
  kv_segment_ids: jax.Array | None       # [B, Tk] int32
  q_positions: Any                       # None, or int [Tq] / [B, Tq] (numpy if static)
  kv_positions: Any
  scale: float
  return_lse: bool
  has_bias: bool = False

  @property
  def batch(self):
    return self.q.shape[0]

  @property
  def q_len(self):
    return self.q.shape[1]

  @property
  def kv_len(self):
    return self.k.shape[1]

  @property
  def num_q_heads(self):
    return self.q.shape[2]

  @property
  def num_kv_heads(self):
    return self.k.shape[2]

  @property
  def default_positions(self) -> bool:
    return self.q_positions is None and self.kv_positions is None

  def positions(self, xp=jnp):
    """Query and key positions as ``[Bp, T]`` int32 arrays (``Bp`` is 1 or the batch)."""
    q = self.q_positions
    if q is None:
      q = np.arange(self.q_len) + (self.kv_len - self.q_len)
    kv = self.kv_positions
    if kv is None:
      kv = np.arange(self.kv_len)
    q = xp.asarray(q).astype(xp.int32)
    kv = xp.asarray(kv).astype(xp.int32)
    return (q[None] if q.ndim == 1 else q), (kv[None] if kv.ndim == 1 else kv)


def feature_list(p: Problem) -> list[tuple[str, bool]]:
  """(capability field, whether the problem needs it)."""
  return [
      ("gqa", p.num_q_heads != p.num_kv_heads),
      ("dv_neq_d", p.v.shape[-1] != p.q.shape[-1]),
      ("cross_attention", p.q_len != p.kv_len),
      ("masks", not isinstance(p.mask, masks_lib.Full)),
      ("per_head_masks", p.mask.per_head),
      ("segment_ids", p.q_segment_ids is not None),
      ("sinks", p.sinks is not None),
      ("score_mods", p.score_mod is not None and not (p.has_bias and _only_bias(p))),
      ("bias", p.has_bias),
      ("lse", p.return_lse),
      ("explicit_positions", not p.default_positions),
  ]


def _only_bias(p: Problem) -> bool:
  return p.score_mod is not None and p.score_mod.name == "bias"


_FEATURE_NAMES = {
    "gqa": "grouped-query attention (Hq != Hkv)",
    "dv_neq_d": "value head_dim different from query head_dim",
    "cross_attention": "Tq != Tk",
    "masks": "masks",
    "per_head_masks": "per-head masks",
    "segment_ids": "segment_ids",
    "sinks": "sinks",
    "score_mods": "score_mod",
    "bias": "bias",
    "lse": "return_lse",
    "explicit_positions": "q_positions/kv_positions",
}


def unsupported(caps: Capabilities, p: Problem, platform: str | None = None) -> str | None:
  """The first feature of ``p`` that ``caps`` lacks, in words, or None."""
  if platform is not None and platform not in caps.platforms:
    return f"platform {platform!r} (supports {sorted(caps.platforms)})"
  for field, needed in feature_list(p):
    if needed and not getattr(caps, field):
      return _FEATURE_NAMES[field]
  dt = jnp.dtype(p.q.dtype).name
  if dt not in caps.dtypes:
    return f"dtype {dt} (supports {sorted(caps.dtypes)})"
  return None


class ProblemDeclined(NotImplementedError):
  """Raised for an explicit ``impl=`` when the backend's :meth:`Backend.unsupported_problem`
  refuses the request (as opposed to a missing capability flag): e.g. a score mod whose in-tile
  code the kernel compiler cannot lower. A subclass of ``NotImplementedError``."""


class Backend:
  """A backend: ``capabilities`` plus ``__call__(problem) -> out or (out, lse)``."""
  capabilities: Capabilities

  @property
  def name(self) -> str:
    return self.capabilities.name

  def __call__(self, problem: Problem):  # pragma: no cover - abstract
    raise NotImplementedError

  def unsupported_problem(self, problem: Problem, platform: str | None) -> str | None:
    """What this backend cannot serve in ``problem`` beyond its capability flags (e.g. a score
    mod a kernel compiler cannot lower), in words, or None. Checked by the dispatcher after the
    flags, so ``impl="auto"`` moves on and an explicit ``impl=`` raises NotImplementedError."""
    del problem, platform
    return None

  def __repr__(self):
    return f"{type(self).__name__}()"


# -------------------------------------------------------------------------------------------
# Helpers shared by the dense backends
# -------------------------------------------------------------------------------------------

def visibility(p: Problem, q_pos, kv_pos, heads, xp=jnp):
  """Boolean visibility ``[B|1, H|1, Tq, Tk]`` from mask and segment ids (positions given as
  ``[Bp, T]``, ``heads`` as an int array of global query-head ids)."""
  qi = q_pos[:, None, :, None]
  kj = kv_pos[:, None, None, :]
  h = xp.asarray(heads)[None, :, None, None]
  vis = p.mask.mask_mod(qi, kj, h if p.mask.per_head else None)
  if p.q_segment_ids is not None:
    vis = vis & (p.q_segment_ids[:, None, :, None] == p.kv_segment_ids[:, None, None, :])
  return vis


def accumulation_dtype(dtype):
  """The dtype of logits, softmax statistics and accumulators for inputs of ``dtype``:
  float32 for float32 and narrower (bfloat16, float16), float64 for float64 (under x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def index_grids(p: Problem, q_pos, kv_pos, heads):
  """Broadcastable index arrays for score mods: batch, head, q_idx, kv_idx."""
  b = jnp.arange(p.batch, dtype=jnp.int32)[:, None, None, None]
  h = jnp.asarray(heads, jnp.int32)[None, :, None, None]
  return b, h, q_pos[:, None, :, None], kv_pos[:, None, None, :]


def _is_static(x):
  return x is None or isinstance(x, (np.ndarray, list, tuple, range))


def static_block_map(p: Problem, bq: int, bk: int) -> np.ndarray:
  """The block map ``int8[H|1, nq, nk]`` a blockwise backend can skip by at trace time.

  Default positions use the mask's cached map; static explicit positions (one row for the whole
  batch) use :func:`attnjax.masks.block_map_from_positions`; traced or per-example positions
  give an all-PARTIAL map (nothing skipped statically, every tile masked)."""
  nh = p.num_q_heads if p.mask.per_head else None
  bm = None
  if p.default_positions:
    bm = p.mask.block_map(p.q_len, p.kv_len, bq, bk, num_heads=nh)
  elif _is_static(p.q_positions) and _is_static(p.kv_positions):
    qp, kp = p.positions(np)
    qp, kp = (x[0] if x.shape[0] == 1 else x for x in (qp, kp))
    if qp.ndim == 1 and kp.ndim == 1:
      bm = masks_lib.block_map_from_positions(p.mask, qp, kp, bq, bk, nh)
  if bm is None:
    nq, nk = -(-p.q_len // bq), -(-p.kv_len // bk)
    bm = np.full((nh or 1, nq, nk), masks_lib.PARTIAL, np.int8)
  return bm[None] if bm.ndim == 2 else bm
