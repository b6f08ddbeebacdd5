"""attnjax: the attention family for JAX.

One exact-attention API over a mask algebra (:func:`attention`, :mod:`attnjax.masks`,
:mod:`attnjax.scores`) with interchangeable backends (:mod:`attnjax.backends`), Flax NNX layers
(:mod:`attnjax.layers`) and context parallelism (:mod:`attnjax.parallel`).
"""

from attnjax import masks, scores
from attnjax.api import (attention, available_backends, build_problem, register_backend,
                         select_backend)
from attnjax.backends.base import Backend, Capabilities, ProblemDeclined
from attnjax.backends.chunked import ChunkedBackend
from attnjax.backends.pallas import PallasBackend
from attnjax.backends.reference import ReferenceBackend
from attnjax.backends.xla import XlaBackend

__version__ = "0.1.0"

_LAZY = ("layers", "parallel")


def __getattr__(name):
  # Layers (flax) and parallelism load on first use so `import attnjax` stays light.
  if name in _LAZY:
    import importlib
    return importlib.import_module(f"attnjax.{name}")
  raise AttributeError(f"module 'attnjax' has no attribute {name!r}")

__all__ = ["attention", "masks", "scores", "available_backends", "register_backend",
           "select_backend", "build_problem", "Backend", "Capabilities", "ProblemDeclined",
           "ChunkedBackend", "PallasBackend", "ReferenceBackend", "XlaBackend", "layers",
           "parallel", "__version__"]
