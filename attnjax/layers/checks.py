"""Argument checks of the layers: every error names the argument and the allowed values (part of
:mod:`attnjax.layers.common`'s stable API, re-exported there)."""

from __future__ import annotations

import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

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


def _scalar_kind(value) -> str | None:
  """``"bool"``, ``"int"``, ``"float"`` for a Python/numpy scalar or a concrete 0-d numpy/jax
  array of that kind; None otherwise (sequences, strings, traced values, complex)."""
  if isinstance(value, (bool, np.bool_)):
    return "bool"
  if isinstance(value, (int, np.integer)):
    return "int"
  if isinstance(value, (float, np.floating)):
    return "float"
  if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer) \
      and value.ndim == 0:
    for dt, kind in ((jnp.bool_, "bool"), (jnp.integer, "int"), (jnp.floating, "float")):
      if jnp.issubdtype(value.dtype, dt):
        return kind
  return None


def check_real(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
  """A real number as a Python float: an int or float (Python or numpy scalar, or a concrete
  0-d numpy/jax array), within ``[lo, hi]`` when given. Bools are rejected (``True`` is not a
  number here); so are traced values (the layer needs the value at construction)."""
  kind = _scalar_kind(value)
  rng = (f" in [{lo}, {hi}]" if lo is not None and hi is not None else
         f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else "")
  if kind not in ("int", "float"):
    raise ValueError(f"{name} must be a real number{rng} (int or float, not bool), got "
                     f"{value!r} of type {type(value).__name__}")
  out = float(value)
  if not math.isfinite(out) or (lo is not None and out < lo) or (hi is not None and out > hi):
    raise ValueError(f"{name} must be a finite real number{rng}, got {out}")
  return out


def check_bool(name: str, value) -> bool:
  """A bool: Python ``bool``, ``np.bool_`` or a concrete 0-d boolean numpy/jax array (ints such
  as 0/1 are rejected)."""
  if _scalar_kind(value) != "bool":
    raise ValueError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")
  return bool(value)


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
