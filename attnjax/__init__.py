"""attnjax: the attention family for JAX.

One exact-attention API over a mask algebra (:func:`attention`, :mod:`attnjax.masks`,
:mod:`attnjax.scores`) with interchangeable backends (:mod:`attnjax.backends`).
"""

from attnjax import masks, scores
from attnjax.api import (attention, available_backends, build_problem, register_backend,
                         select_backend)
from attnjax.backends.base import Backend, Capabilities

__version__ = "0.1.0"

__all__ = ["attention", "masks", "scores", "available_backends", "register_backend",
           "select_backend", "build_problem", "Backend", "Capabilities", "__version__"]
