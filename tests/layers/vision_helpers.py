"""Helpers shared by the vision-layer tests: parameter RNGs, fresh random inputs, and the
numpy float64 building blocks (linear maps, softmax) of the independent references."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def rngs(seed):
  """Parameter RNG; the rbg PRNG compiles much faster than threefry on CPU."""
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def randn(seed, shape):
  """Fresh standard-normal float32 input (numpy RNG: no per-shape compilation)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def P(v):
  return np.asarray(v[...], np.float64)


def linear(x, lin):
  y = x @ P(lin.kernel)
  return y + P(lin.bias) if lin.bias is not None else y


def softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)
