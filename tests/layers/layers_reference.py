"""Independent formulas and helpers for the language-layer tests.

The references are written for obviousness in plain numpy float64 (the same array code as jnp,
but with no compilation and a float64 oracle): materialized logits, explicit head repetition for
GQA, RoPE in complex form. Nothing here imports the layers' internals; layer parameters are read
from the module only to feed the same weights into the formulas.
"""

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx


def rand(seed, shape, scale=1.0):
  """Fresh standard-normal float32 test input (never zeros or constants)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def f64(a):
  if isinstance(a, (np.ndarray, np.generic, float, int)):
    return np.asarray(a, np.float64)
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # jax arrays, bfloat16 included


def param(p):
  """A parameter's value as float64 numpy."""
  return f64(p[...])


def rope_complex(x, pos, theta):
  """RoPE as a complex rotation of the pairs (x[i], x[i + D/2]) by pos * theta^(-2i/D)."""
  x = f64(x)
  d = x.shape[-1]
  pos = np.asarray(pos, np.float64)
  if pos.ndim == 1:
    pos = pos[None]
  z = x[..., : d // 2] + 1j * x[..., d // 2:]
  freqs = 1.0 / theta ** (np.arange(d // 2) * 2.0 / d)
  zr = z * np.exp(1j * pos[:, :, None, None] * freqs)  # [B, T, 1, D/2]
  return np.concatenate([zr.real, zr.imag], axis=-1)


def rms(x, scale, eps=1e-6):
  x = f64(x)
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * scale


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def sdpa(q, k, v, allowed, scale=None, sinks=None, logit_fn=None):
  """Softmax attention. q [B,T,H,D], k [B,S,G,D], v [B,S,G,Dv]; ``allowed`` bool broadcastable
  to [B,H,T,S]; ``sinks [H]`` extra logits in the denominator; ``logit_fn`` applied to the scaled
  logits. Rows that see nothing give 0."""
  q, k, v = f64(q), f64(k), f64(v)
  H, G = q.shape[2], k.shape[2]
  k = np.repeat(k, H // G, axis=2)
  v = np.repeat(v, H // G, axis=2)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  s = np.einsum("bthd,bshd->bhts", q, k) * scale
  if logit_fn is not None:
    s = logit_fn(s)
  allowed = np.broadcast_to(np.asarray(allowed), s.shape)
  m = np.max(np.where(allowed, s, -np.inf), axis=-1, keepdims=True)
  if sinks is not None:
    sk = f64(sinks)[None, :, None, None]
    m = np.maximum(m, sk)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(allowed, np.exp(s - m), 0.0)
  den = e.sum(-1, keepdims=True)
  if sinks is not None:
    den = den + np.exp(sk - m)
  p = e / np.where(den > 0, den, 1.0)
  return np.einsum("bhts,bshd->bthd", p, v)


def pos_mask(qpos, kpos, fn):
  """allowed[B|1, 1, T, S] = fn(i, j) on position grids (qpos/kpos [T] or [B, T])."""
  qpos = np.asarray(qpos)
  kpos = np.asarray(kpos)
  qpos = qpos[None] if qpos.ndim == 1 else qpos
  kpos = kpos[None] if kpos.ndim == 1 else kpos
  return np.asarray(fn(qpos[:, None, :, None], kpos[:, None, None, :]))


def dense(x, w, b=None):
  """Contract x's last axis with w's first axis (w, b: parameters or arrays)."""
  w = param(w) if hasattr(w, "get_value") else f64(w)
  y = np.tensordot(f64(x), w, axes=[[np.ndim(x) - 1], [0]])
  if b is not None:
    y = y + (param(b) if hasattr(b, "get_value") else f64(b))
  return y


def rel_err(a, b):
  a, b = f64(a), f64(b)
  return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30))


def close(got, want, tol=2e-5):
  np.testing.assert_allclose(f64(got), want, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------
# Building layers quickly with random parameters
# ---------------------------------------------------------------------------------------------

def build(cls, *args, seed=0, **kwargs):
  """Construct ``cls(*args, **kwargs)`` abstractly and fill every parameter with fresh random
  values from numpy (no per-shape compilation of random initializers): kernels
  ``N(0, 1/fan_in)``, norm scales ``1 + 0.3 N``, biases/sinks ``0.5 N``."""
  m = nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **kwargs))
  rng = np.random.default_rng(seed)
  state = nnx.state(m, nnx.Param)
  flat = nnx.to_flat_state(state)
  new = {}
  for path, var in flat:
    shape, dtype = var.shape, var.dtype
    name = path[-1]
    z = rng.standard_normal(shape)
    if name == "kernel":
      # input axes come first; output projections [H, Dv, C] contract their first two axes
      fan_in = shape[0] * (shape[1] if len(shape) == 3 and path[-2] in ("out", "wo") else 1)
      val = z / math.sqrt(fan_in)
    elif name == "scale":
      val = 1.0 + 0.3 * z
    else:
      val = 0.5 * z
    new[path] = jnp.asarray(val, dtype)
  nnx.update(m, nnx.from_flat_state([(p, new[p]) for p, _ in flat]))
  return m


def jit_call(fn):
  """``nnx.jit`` of ``fn(module, *arrays)``."""
  return nnx.jit(fn)


def _first(out):
  return out[0] if isinstance(out, tuple) else out


def check_incremental(m, x, prompt_lens, steps, tol=2e-5, full=None):
  """Ragged prefill then decode steps through ``m.decode`` must equal the parallel forward.

  Example ``b`` is prefilled with ``prompt_lens[b]`` real tokens (the rest of the padded prefill
  block is random garbage that must not matter); then each step feeds up to ``s`` next tokens
  per example (fewer near the end, so ``num_new`` differs per example). Returns the cache."""
  B, L, _ = x.shape
  if full is None:
    full = _first(nnx.jit(lambda m, x: m(x))(m, x))
  full = f64(full)
  cache = m.init_cache(B, L)
  step = nnx.jit(lambda m, xb, c, n: m.decode(xb, c, num_new=n))
  xn = np.asarray(x)
  garbage = 3.0 * np.random.default_rng(999).standard_normal(x.shape).astype(np.float32)
  cur = np.zeros(B, int)
  lens = np.asarray(prompt_lens)
  plan = [(int(lens.max()), lens)] + [(s, None) for s in steps]
  for size, nn in plan:
    if nn is None:
      nn = np.minimum(size, L - cur)
    xb = garbage[:, :size].copy()
    for b in range(B):
      xb[b, :nn[b]] = xn[b, cur[b]:cur[b] + nn[b]]
    out, cache = step(m, jnp.asarray(xb), cache, jnp.asarray(nn, jnp.int32))
    assert bool(jnp.all(jnp.isfinite(jnp.asarray(out, jnp.float32))))
    for b in range(B):
      np.testing.assert_allclose(f64(out[b, :nn[b]]), full[b, cur[b]:cur[b] + nn[b]], atol=tol,
                                 rtol=tol)
    cur = cur + nn
  np.testing.assert_array_equal(np.asarray(cache.length), cur)
  return cache
