"""Shared checks for the context-parallel tests: run a strategy on 8 simulated devices and
compare outputs, LSE and gradients (q, k, v, sinks) with single-device ``attnjax.attention``.

Precision: float32 inputs, compared at ``TOL`` x max(1, max|reference|). ``attnjax.attention``
returns its LSE in float32 by contract and its xla/chunked backends accumulate in float32 even
for float64 inputs, so a float64 run would still be limited by float32 rounding; the measured
agreement is ~1e-6, while a wrong mask entry, a missing or doubly counted block, or a dK/dV
returned to the wrong device gives errors of order 1e-2 .. 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import attnjax as aj
from attnjax import parallel

TOL = 2e-5


def make_mesh(shape, names):
  return jax.make_mesh(tuple(shape), tuple(names))


def packed_segments(rng, B, T, mean_len=10):
  """Sorted segment ids per example: documents of random lengths (packing)."""
  starts = rng.random((B, T)) < 1.0 / mean_len
  starts[:, 0] = False
  return np.cumsum(starts, axis=1).astype(np.int32)


def inputs(seed, B, T, Hq, Hkv, D, Dv, *, sinks, segments):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, Hq, D)).astype(np.float32)
  k = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
  v = rng.standard_normal((B, T, Hkv, Dv)).astype(np.float32)
  s = rng.standard_normal((Hq,)).astype(np.float32) if sinks else None
  seg = packed_segments(rng, B, T) if segments else None
  g_out = rng.standard_normal((B, T, Hq, Dv)).astype(np.float32)
  g_lse = rng.standard_normal((B, T, Hq)).astype(np.float32)
  return q, k, v, s, seg, g_out, g_lse


def _loss(out, lse, g_out, g_lse):
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.sum(out.astype(jnp.float32) * g_out) + jnp.sum(lse * g_lse)


def reference(q, k, v, s, seg, g_out, g_lse, mask, impl="auto"):
  """Single-device attention in natural order: (out, lse, grads (dq, dk, dv[, dsinks]))."""
  def f(q, k, v, s):
    out, lse = aj.attention(q, k, v, mask=mask, sinks=s, segment_ids=seg, return_lse=True,
                            impl=impl)
    return _loss(out, lse, g_out, g_lse), (out, lse)
  argnums = (0, 1, 2, 3) if s is not None else (0, 1, 2)
  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(
      q, k, v, s)
  return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


def run_cp(fn, perm, q, k, v, s, seg, g_out, g_lse):
  """Run ``fn(q, k, v, sinks, seg) -> (out, lse)`` on the permuted layout; results are mapped
  back to natural order."""
  P = lambda x: None if x is None else np.asarray(x).take(perm, axis=1)
  qp, kp, vp, segp, gop, glp = (P(x) for x in (q, k, v, seg, g_out, g_lse))

  def f(q, k, v, s):
    out, lse = fn(q, k, v, s, segp)
    return _loss(out, lse, gop, glp), (out, lse)
  argnums = (0, 1, 2, 3) if s is not None else (0, 1, 2)
  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(
      qp, kp, vp, s)
  inv = parallel.inverse_permutation(perm)
  U = lambda x: np.asarray(x).take(inv, axis=1)
  grads = [U(g) for g in grads[:3]] + [np.asarray(g) for g in grads[3:]]
  return U(out), U(lse), grads


def assert_close(name, got, want, tol=TOL):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  fin = np.isfinite(want)
  assert np.array_equal(np.isfinite(got), fin), f"{name}: -inf pattern differs"
  err = np.max(np.abs(got[fin] - want[fin])) if fin.any() else 0.0
  scale = max(1.0, float(np.max(np.abs(want[fin]))) if fin.any() else 1.0)
  assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


def check_strategy(strategy, *, mesh_shape, mesh_axes, axis="sp", ulysses_axis=None,
                   batch_axis=None, mask=None, load_balance=None, B=2, T=64, Hq=4, Hkv=2, D=8,
                   Dv=8, sinks=False, segments=False, max_branches=8, impl="auto", seed=0):
  """Context-parallel ``strategy`` vs single-device attention: out, LSE and all gradients."""
  mesh = make_mesh(mesh_shape, mesh_axes)
  q, k, v, s, seg, g_out, g_lse = inputs(seed, B, T, Hq, Hkv, D, Dv, sinks=sinks,
                                         segments=segments)
  ring_size = mesh.shape[axis]
  perm = parallel.load_balance_permutation(T, ring_size, load_balance)

  def fn(q, k, v, s, seg):
    return parallel.context_parallel_attention(
        q, k, v, mesh=mesh, axis=axis, strategy=strategy, ulysses_axis=ulysses_axis,
        batch_axis=batch_axis, mask=mask, segment_ids=seg, sinks=s, load_balance=load_balance,
        return_lse=True, max_branches=max_branches, impl=impl)

  got = run_cp(fn, perm, q, k, v, s, seg, g_out, g_lse)
  want = reference(q, k, v, s, seg, g_out, g_lse, mask)
  compare(got, want)


def compare(got, want):
  out, lse, grads = got
  r_out, r_lse, r_grads = want
  assert_close("out", out, r_out)
  assert_close("lse", lse, r_lse)
  for name, g, rg in zip(("dq", "dk", "dv", "dsinks"), grads, r_grads):
    assert_close(name, g, rg)
