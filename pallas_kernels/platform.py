"""Which hardware a compiled (``interpret=False``) kernel needs, checked where it is knowable.

A compiled Pallas kernel only lowers for its own platform (Mosaic for TPU, Triton for GPU).
Whether a call will run there is not known when the kernel is traced: ``jax.export`` or
``jit(...).lower(lowering_platforms=("tpu",))`` legitimately lower a TPU kernel on a CPU host.
So the check sits in the lowering: :func:`require_platform` passes one kernel operand through an
identity primitive whose lowering rule is a no-op on the kernel's platform and raises a
``ValueError`` naming ``interpret`` and the platforms on every other one (before Pallas' own,
less helpful "Only interpret mode is supported on CPU backend"). Trace-time argument errors of a
compiled kernel add :func:`host_note` when this host is not the kernel's platform.
"""

from __future__ import annotations

import functools

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

# Lowering platforms (as jax names them) on which each kernel platform compiles.
_LOWERING = {"tpu": ("tpu",), "gpu": ("cuda", "rocm")}
_NAMES = {"tpu": "TPU (Mosaic)", "gpu": "GPU (Triton)"}

_needs_platform_p = Primitive("pallas_kernels_needs_platform")
_needs_platform_p.def_abstract_eval(lambda x, **_: x)


@functools.lru_cache(maxsize=None)
def _jitted(platform: str, what: str):
  return jax.jit(lambda x: _needs_platform_p.bind(x, platform=platform, what=what))


def _impl(x, *, platform, what):
  # Eager use: run through jit so the lowering rule decides, as it does under jit. Under
  # jax.disable_jit() that jit would run its body eagerly, i.e. this impl again, forever: turn
  # disable_jit off for it (as pallas_call does for itself).
  with jax.disable_jit(False):
    return _jitted(platform, what)(x)


_needs_platform_p.def_impl(_impl)
batching.primitive_batchers[_needs_platform_p] = (
    lambda args, dims, **kw: (_needs_platform_p.bind(*args, **kw), dims[0]))
ad.primitive_jvps[_needs_platform_p] = (
    lambda primals, tangents, **kw: (_needs_platform_p.bind(*primals, **kw), tangents[0]))


def _message(what: str, platform: str, lowering) -> str:
  return (f"{what} with interpret=False is compiled for {_NAMES[platform]}, but it is being "
          f"lowered for {', '.join(lowering)} (this host's default backend is "
          f"{jax.default_backend()}); pass interpret=True (or leave interpret=None, which "
          f"interprets off {platform.upper()}) to run it here, or run it on a {platform.upper()}")


def _raise(ctx, x, *, platform, what):
  del x
  raise ValueError(_message(what, platform, ctx.module_context.platforms))


def _rule_for(lowering: str):
  """The lowering rule on ``lowering``: a no-op for the kernel platform that lowers there (a
  TPU kernel lowered for "tpu"), the error for every other (a TPU kernel lowered for "cuda")."""
  def rule(ctx, x, *, platform, what):
    if lowering in _LOWERING[platform]:
      return [x]
    return _raise(ctx, x, platform=platform, what=what)
  return rule


mlir.register_lowering(_needs_platform_p, _raise)
for _names in _LOWERING.values():
  for _name in _names:
    mlir.register_lowering(_needs_platform_p, _rule_for(_name), platform=_name)


def require_platform(x, platform: str, what: str):
  """``x`` unchanged; lowering it for any platform but ``platform``'s raises ``ValueError``.
  Pass a kernel operand through it (so the check is lowered before the kernel)."""
  if platform not in _LOWERING:
    raise ValueError(f"platform must be one of {sorted(_LOWERING)}, got {platform!r}")
  return _needs_platform_p.bind(x, platform=platform, what=what)


def host_note(platform: str, compiled: bool) -> str:
  """A sentence to append to a compiled kernel's argument error when this host is not the
  kernel's platform (the user probably wanted interpret mode), else ``""``."""
  if not compiled or jax.default_backend() == platform:
    return ""
  return (f" (interpret=False compiles for {_NAMES[platform]}; this host's platform is "
          f"{jax.default_backend()}: pass interpret=True to run the kernel here)")
