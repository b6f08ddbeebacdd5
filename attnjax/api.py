"""``attnjax.attention``: validate the arguments, choose a backend, call it."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax import scores as scores_lib
from attnjax.backends import base
from attnjax.backends.chunked import ChunkedBackend
from attnjax.backends.pallas import PallasBackend
from attnjax.backends.reference import ReferenceBackend
from attnjax.backends.xla import XlaBackend

_BACKENDS: dict[str, base.Backend] = {}

# impl="auto" on CPU: dense XLA while the [Tq, Tk] logits are small, the chunked backend beyond.
# The crossover comes from experiments/bench_attention.py (see BENCHMARKS.md).
AUTO_DENSE_MAX_ENTRIES = 512 * 512


def register_backend(name: str, backend: base.Backend) -> None:
  """Make ``backend`` available as ``impl=name``."""
  if not isinstance(backend, base.Backend):
    raise TypeError(f"backend must be an attnjax.backends.base.Backend, got {type(backend)}")
  _BACKENDS[name] = backend


def available_backends() -> dict[str, base.Backend]:
  """The registered backends by name (``impl=`` accepts these names): ``reference``, ``xla``,
  ``chunked``, ``pallas_tpu``, ``pallas_gpu`` and any added with :func:`register_backend`. A
  copy: changing it does not register anything."""
  return dict(_BACKENDS)


register_backend("reference", ReferenceBackend())
register_backend("xla", XlaBackend())
register_backend("chunked", ChunkedBackend())
register_backend("pallas_tpu", PallasBackend("tpu"))
register_backend("pallas_gpu", PallasBackend("gpu"))


def _shape_str(x):
  return "[" + ", ".join(str(d) for d in x.shape) + "]"


def _as_array(name, x):
  if x is None:
    raise TypeError(f"{name} is required, got None")
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    try:
      x = jnp.asarray(x)
    except TypeError as e:
      raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e
  return x


def _check_float(name, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating-point dtype (float32, bfloat16, float16, "
                    f"float64), got {x.dtype}")


def _check_int_array(name, x, shapes_allowed, what):
  x = _as_array(name, x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
  if tuple(x.shape) not in shapes_allowed:
    allowed = " or ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes_allowed)
    raise ValueError(f"{name} must have shape {allowed} ({what}), got {_shape_str(x)}")
  return x


def _positions(name, x, batch, length):
  if x is None:
    return None
  if isinstance(x, (list, tuple, range)):
    x = np.asarray(x)
  x = _check_int_array(name, x, [(length,), (1, length), (batch, length)],
                       "positions per token, optionally per example")
  return x


def build_problem(q, k, v, *, mask=None, score_mod=None, bias=None, sinks=None,
                  segment_ids=None, kv_segment_ids=None, scale=None, return_lse=False,
                  q_positions=None, kv_positions=None) -> base.Problem:
  """Validate the arguments of :func:`attention` and return a :class:`base.Problem`."""
  q, k, v = _as_array("q", q), _as_array("k", k), _as_array("v", v)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape "
                       f"{_shape_str(x)}")
    _check_float(name, x)
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, "
                    f"v {v.dtype}")
  B, Tq, Hq, D = q.shape
  _, Tk, Hkv, Dk = k.shape
  if k.shape[0] != B or v.shape[0] != B:
    raise ValueError(f"batch sizes differ: q {_shape_str(q)}, k {_shape_str(k)}, "
                     f"v {_shape_str(v)}; all must have batch {B}")
  if v.shape[1] != Tk:
    raise ValueError(f"k and v must have the same sequence length, got k {_shape_str(k)} and "
                     f"v {_shape_str(v)}")
  if v.shape[2] != Hkv:
    raise ValueError(f"k and v must have the same number of heads, got k {_shape_str(k)} and "
                     f"v {_shape_str(v)}")
  if Dk != D:
    raise ValueError(f"q and k must have the same head_dim, got q {_shape_str(q)} and "
                     f"k {_shape_str(k)}")
  if min(B, Tq, Hq, D, Tk, Hkv, v.shape[3]) < 1:
    raise ValueError(f"all dimensions must be >= 1, got q {_shape_str(q)}, k {_shape_str(k)}, "
                     f"v {_shape_str(v)}")
  if Hq % Hkv:
    raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of "
                     f"key/value heads ({Hkv}) (GQA/MQA)")

  q_positions = _positions("q_positions", q_positions, B, Tq)
  kv_positions = _positions("kv_positions", kv_positions, B, Tk)
  mask = masks_lib.as_mask(mask)
  if q_positions is None and kv_positions is None:
    mask.validate(Tq, Tk, Hq)
  else:  # explicit positions: lengths are local (a shard, a cache); check heads only
    mask.validate(None, None, Hq)
  mod = scores_lib.as_score_mod(score_mod)

  has_bias = bias is not None
  if has_bias:
    bias = _as_array("bias", bias)
    _check_float("bias", bias)
    target = (B, Hq, Tq, Tk)
    if bias.ndim != 4 or any(b not in (1, t) for b, t in zip(bias.shape, target)):
      raise ValueError(f"bias must be broadcastable to [B, Hq, Tq, Tk] = {list(target)} with "
                       f"each dimension equal or 1, got {_shape_str(bias)}")
    mod = scores_lib.chain(scores_lib.additive_bias(bias), mod) if mod else (
        scores_lib.additive_bias(bias))

  if mod is not None:
    mod.check_params(B, Hq, Tq, Tk)

  if sinks is not None:
    sinks = _as_array("sinks", sinks)
    _check_float("sinks", sinks)
    if tuple(sinks.shape) != (Hq,):
      raise ValueError(f"sinks must have shape [num_q_heads] = [{Hq}], got {_shape_str(sinks)}")

  if segment_ids is None and kv_segment_ids is not None:
    raise ValueError("kv_segment_ids was given without segment_ids; pass segment_ids [B, Tq] "
                     "for the queries too")
  if segment_ids is not None:
    segment_ids = _check_int_array("segment_ids", segment_ids, [(B, Tq)], "[B, Tq]")
    if kv_segment_ids is None:
      if Tq != Tk:
        raise ValueError(f"segment_ids alone means self-attention packing and needs Tq == Tk, "
                         f"got Tq={Tq}, Tk={Tk}; pass kv_segment_ids [B, Tk] for cross attention")
      kv_segment_ids = segment_ids
    else:
      kv_segment_ids = _check_int_array("kv_segment_ids", kv_segment_ids, [(B, Tk)], "[B, Tk]")
    segment_ids = segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)

  if scale is None:
    scale = 1.0 / math.sqrt(D)
  elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
    raise TypeError(f"scale must be a Python float (static), got {type(scale).__name__}")
  elif not math.isfinite(scale):
    raise ValueError(f"scale must be finite, got {scale}")
  if not isinstance(return_lse, (bool, np.bool_)):
    raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")

  return base.Problem(q=q, k=k, v=v, mask=mask, score_mod=mod, sinks=sinks,
                      q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                      q_positions=q_positions, kv_positions=kv_positions, scale=float(scale),
                      return_lse=bool(return_lse), has_bias=has_bias)


def _platform(x) -> str:
  try:
    devs = x.devices()
    return next(iter(devs)).platform
  except Exception:  # tracers have no devices
    return jax.default_backend()


def auto_candidates(p: base.Problem, platform: str | None = None) -> list[str]:
  """Backends ``impl="auto"`` tries, best first. On TPU/GPU the Pallas kernel of that platform
  comes first beyond the dense crossover; on CPU the Pallas backends (interpret mode, for
  debugging) are never chosen automatically. Measured on an H100 (bfloat16 causal, B=1, H=8,
  D=64; BENCHMARKS.md): dense ``xla`` and ``pallas_gpu`` tie at T=512-1024 and the kernel is 2x
  faster at T=2048, so the CPU crossover holds there too. Unmeasured on a TPU. Where the Pallas
  kernel declines a request, ``chunked`` comes next for its O(T) memory, although on a GPU it
  is slower than dense ``xla`` wherever the latter fits (4-9x at T=512-2048)."""
  platform = platform or jax.default_backend()
  per_example_pos = any(x is not None and np.ndim(x) == 2 and x.shape[0] > 1
                        for x in (p.q_positions, p.kv_positions))
  small = p.q_len * p.kv_len <= AUTO_DENSE_MAX_ENTRIES or p.q_len <= 16 or per_example_pos
  order = ["xla", "chunked"] if small else ["chunked", "xla"]
  if platform in ("tpu", "gpu") and not small:
    order.insert(0, f"pallas_{platform}")
  return [name for name in order if name in _BACKENDS]


def select_backend(p: base.Problem, impl: Any = "auto") -> base.Backend:
  """Resolve ``impl`` to a backend able to serve ``p`` (raises otherwise)."""
  platform = _platform(p.q)
  if isinstance(impl, base.Backend):
    backend = impl
  elif isinstance(impl, str) and impl != "auto":
    if impl not in _BACKENDS:
      raise ValueError(f"impl={impl!r} is not a known backend; choose 'auto' or one of "
                       f"{sorted(_BACKENDS)}")
    backend = _BACKENDS[impl]
  elif impl == "auto":
    reasons = []
    for name in auto_candidates(p, platform):
      why = (base.unsupported(_BACKENDS[name].capabilities, p, platform)
             or _BACKENDS[name].unsupported_problem(p, platform))
      if why is None:
        return _BACKENDS[name]
      reasons.append(f"{name}: {why}")
    raise NotImplementedError("no backend supports this request: " + "; ".join(reasons))
  else:
    raise TypeError(f"impl must be a backend name or a Backend instance, got {impl!r}")
  why = base.unsupported(backend.capabilities, p, platform)
  if why is not None:
    raise NotImplementedError(f"backend {backend.name!r} does not support {why}")
  why = backend.unsupported_problem(p, platform)
  if why is not None:
    raise base.ProblemDeclined(f"backend {backend.name!r} does not support {why}")
  return backend


def attention(q, k, v, *, mask=None, score_mod=None, bias=None, sinks=None, segment_ids=None,
              kv_segment_ids=None, scale=None, impl="auto", return_lse=False, q_positions=None,
              kv_positions=None):
  """Exact softmax attention ``softmax(scale * q k^T + bias, masked) v`` with every mask pattern.

  Args:
    q: ``[B, Tq, Hq, D]`` queries. k: ``[B, Tk, Hkv, D]`` keys. v: ``[B, Tk, Hkv, Dv]`` values.
      ``Hq`` must be a multiple of ``Hkv`` (query head ``h`` uses key/value head
      ``h // (Hq // Hkv)``: GQA/MQA); ``Dv`` may differ from ``D``. One floating dtype for all;
      logits and accumulators are float32 (float64 for float64 inputs).
    mask: an :mod:`attnjax.masks` mask (or a list of masks, one per query head). Evaluated at
      positions: query row ``i`` is at ``Tk - Tq + i`` and key ``j`` at ``j`` (bottom-right
      alignment) unless ``q_positions``/``kv_positions`` say otherwise.
    score_mod: an :mod:`attnjax.scores` mod (or a callable ``fn(score, batch, head, q_idx,
      kv_idx)``, or a list applied in order), applied to ``scale * q.k + bias``.
    bias: additive float bias broadcastable to ``[B, Hq, Tq, Tk]`` (receives gradients).
    sinks: ``[Hq]`` float logits of a per-head sink that joins the softmax denominator and
      contributes no value: attention sinks (Xiao et al. 2024, "Efficient Streaming Language
      Models with Attention Sinks") as learnable per-head logits, as in gpt-oss; receives
      gradients.
    segment_ids: int ``[B, Tq]``; a query attends only to keys with the same id. Alone it also
      labels the keys (self-attention packing, needs ``Tq == Tk``).
    kv_segment_ids: int ``[B, Tk]`` for cross attention.
    scale: Python float, default ``1 / sqrt(D)``.
    impl: ``"auto"``, a backend name (``"reference"``, ``"xla"``, ``"chunked"``, ...) or a
      :class:`~attnjax.backends.base.Backend` instance (e.g. ``ChunkedBackend(block_q=128)``).
    return_lse: also return the natural-log sum-exp of the (masked, modded) logits per query,
      ``[B, Tq, Hq]`` float32, including the sink term when ``sinks`` is given.
    q_positions, kv_positions: optional int positions ``[T]`` or per example ``[B, T]`` at
      which masks and score mods are evaluated (decoding with a cache, context parallelism).

  Returns:
    ``out`` ``[B, Tq, Hq, Dv]`` in the dtype of ``q``, or ``(out, lse)``. A query that sees no
    key gets output 0 and LSE ``-inf`` (with sinks: LSE equal to its sink logit), and zero
    gradients.

  Raises:
    ValueError / TypeError for malformed arguments (naming the argument and the shapes);
    NotImplementedError when the chosen backend lacks a requested feature.
  """
  p = build_problem(q, k, v, mask=mask, score_mod=score_mod, bias=bias, sinks=sinks,
                    segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
                    return_lse=return_lse, q_positions=q_positions, kv_positions=kv_positions)
  backend = select_backend(p, impl)
  return _call_backend(backend, p)


_ARRAY_FIELDS = ("q", "k", "v", "score_mod", "sinks", "q_segment_ids", "kv_segment_ids",
                 "q_positions", "kv_positions")


def _call_backend(backend, p: base.Problem):
  """Run ``backend(p)``; under an explicit-axes mesh (``jax.make_mesh``'s default) the backend
  runs in auto-sharding mode (``jax.sharding.auto_axes``) so its reshapes and loops need no
  sharding annotations, and the output keeps the queries' batch, length and head sharding."""
  spec = base.explicit_spec(p.q)
  if spec is None:
    return backend(p)
  out_spec = jax.sharding.PartitionSpec(spec[0], spec[1], spec[2], None)
  lse_spec = jax.sharding.PartitionSpec(spec[0], spec[1], spec[2])
  arrays = {f: getattr(p, f) for f in _ARRAY_FIELDS
            if isinstance(getattr(p, f), (jax.Array, scores_lib.ScoreMod))}

  def run(arrays):
    return backend(dataclasses.replace(p, **arrays))

  out_sharding = (out_spec, lse_spec) if p.return_lse else out_spec
  return jax.sharding.auto_axes(run, out_sharding=out_sharding)(arrays)
