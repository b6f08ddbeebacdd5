"""Shared machinery of the conformance suite: backends under test, random problems, the float64
oracle, a same-dtype naive computation, and the tolerance rule.

Tolerance rule (DESIGN.md): a backend's relative-RMS error against the float64 reference may be at
most ``FUDGE[dtype]`` times the error of a naive computation in the same dtype, plus a small
floor. Gradients follow the same rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.backends import base
from attnjax.backends.chunked import ChunkedBackend
from attnjax.backends.xla import XlaBackend

# Every backend under test with a short id. Pallas backends join by adding themselves here;
# tests skip features a backend does not declare. The chunked entries also cover both forward
# modes (the default fixed-max forward and the running-max one, ``-online``) and the band
# computation (one key band per query block, ``-band``), forced here at any mask density.
BACKENDS: dict[str, aj.Backend] = {
    "xla": XlaBackend(),
    "chunked-8x16": ChunkedBackend(block_q=8, block_kv=16),
    "chunked-32x8-online": ChunkedBackend(block_q=32, block_kv=8, fixed_max=False),
    "chunked-band": ChunkedBackend(band=True, band_block_q=16, band_step=8),
}

FUDGE = {"float32": 10.0, "bfloat16": 3.0}
FLOOR = {"float32": 2e-6, "bfloat16": 1e-2}


def rel_rms(x, ref) -> float:
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  finite = np.isfinite(ref)
  if not np.array_equal(np.isfinite(x), finite):
    return math.inf
  r = np.where(finite, ref, 0.0)
  d = np.where(finite, x, 0.0) - r  # -inf entries (rows that see nothing) agree: excluded
  return float(np.sqrt(np.mean(d ** 2)) / max(np.sqrt(np.mean(r ** 2)), 1e-30))


def assert_close(name, actual, golden, naive, dtype):
  err = rel_rms(actual, golden)
  base = rel_rms(naive, golden)
  bound = FUDGE[dtype] * base + FLOOR[dtype]
  assert err <= bound, (f"{name}: relative RMS error {err:.3e} vs float64 exceeds "
                        f"{FUDGE[dtype]} x naive {dtype} error {base:.3e} + {FLOOR[dtype]:.0e}")


@dataclasses.dataclass
class Case:
  B: int = 2
  Tq: int = 24
  Tk: int = 24
  Hq: int = 4
  Hkv: int = 2
  D: int = 16
  Dv: int = 16
  dtype: str = "float32"
  mask: Any = None
  sinks: bool = False
  segments: bool = False
  score_mod: Callable | None = None   # rng -> ScoreMod (built with fresh random params)
  bias: bool = False
  positions: bool = False             # explicit per-example q/kv positions
  seed: int = 0


_CASES: dict = {}


def case(**kw) -> Case:
  """The one Case object for these settings (so baselines are shared across backends)."""
  key = tuple(sorted(kw.items(), key=lambda kv: kv[0]))
  if key not in _CASES:
    _CASES[key] = Case(**kw)
  return _CASES[key]


def make_inputs(case: Case):
  """Fresh random float64 numpy inputs and the kwargs of attention (arrays float64)."""
  rng = np.random.default_rng(case.seed)
  q = rng.normal(size=(case.B, case.Tq, case.Hq, case.D))
  k = rng.normal(size=(case.B, case.Tk, case.Hkv, case.D))
  v = rng.normal(size=(case.B, case.Tk, case.Hkv, case.Dv))
  diff = {}
  static = {"mask": case.mask}
  if case.sinks:
    diff["sinks"] = rng.normal(size=(case.Hq,))
  if case.bias:
    diff["bias"] = rng.normal(size=(case.B, 1, case.Tq, case.Tk))
  if case.segments:
    if case.Tq == case.Tk:
      seg = np.sort(rng.integers(0, 3, size=(case.B, case.Tq)), axis=1)
      static["segment_ids"] = seg.astype(np.int32)
    else:
      static["segment_ids"] = np.sort(rng.integers(0, 3, size=(case.B, case.Tq)), 1).astype(
          np.int32)
      static["kv_segment_ids"] = np.sort(rng.integers(0, 3, size=(case.B, case.Tk)), 1).astype(
          np.int32)
  if case.positions:
    start = rng.integers(0, 5, size=(case.B, 1))
    static["kv_positions"] = (start + np.arange(case.Tk)[None]).astype(np.int32)
    static["q_positions"] = (start + case.Tk - case.Tq + np.arange(case.Tq)[None]).astype(
        np.int32)
  mod_factory = case.score_mod
  mod_params = mod_factory(rng, case) if mod_factory is not None else None
  cot = rng.normal(size=(case.B, case.Tq, case.Hq, case.Dv))
  cot_lse = rng.normal(size=(case.B, case.Tq, case.Hq))
  return (q, k, v), diff, static, mod_params, (cot, cot_lse)


def _cast(tree, dtype):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def run(impl, case: Case, dtype, inputs):
  """Output, LSE and gradients (w.r.t. q, k, v, differentiable extras, score-mod params)."""
  (q, k, v), diff, static, mod_params, (cot, cot_lse) = inputs
  mod_builder = None
  if mod_params is not None:
    mod_builder, params = mod_params
  else:
    params = ()

  def loss(qkv, diff, params):
    kwargs = dict(static)
    kwargs.update(diff)
    if mod_builder is not None:
      kwargs["score_mod"] = mod_builder(params)
    out, lse = aj.attention(*qkv, impl=impl, return_lse=True, **kwargs)
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * jnp.asarray(cot_lse, lse.dtype)
    val = jnp.sum(out.astype(jnp.float32 if dtype != jnp.float64 else dtype)
                  * jnp.asarray(cot, dtype)) + jnp.sum(lse_term)
    return val, (out, lse)

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
  args = (_cast((q, k, v), dtype), _cast(diff, dtype), _cast(params, jnp.float32
                                                              if dtype != jnp.float64 else dtype))
  grads, (out, lse) = grad_fn(*args)
  return out, lse, grads


def golden(case: Case, inputs):
  with jax.enable_x64(True):
    out, lse, grads = run("reference", case, jnp.float64, inputs)
    return jax.tree.map(lambda x: np.asarray(x, np.float64), (out, lse, grads))


def naive_same_dtype(case: Case, inputs, dtype):
  """A straightforward materialized computation carried out in ``dtype`` throughout."""
  return run(_NaiveBackend(dtype), case, dtype, inputs)


class _NaiveBackend(aj.Backend):
  """Materialized attention computed entirely in one dtype (the 'same-dtype naive' baseline)."""
  capabilities = aj.Capabilities(name="naive")

  def __init__(self, dtype):
    self.dtype = dtype

  def __call__(self, p):
    dt = self.dtype
    B, Tq, Hq, _ = p.q.shape
    G = Hq // p.k.shape[2]
    k = jnp.repeat(p.k, G, axis=2).astype(dt)
    v = jnp.repeat(p.v, G, axis=2).astype(dt)
    s = jnp.einsum("bqhd,bkhd->bhqk", p.q.astype(dt), k) * jnp.asarray(p.scale, dt)
    q_pos, kv_pos = p.positions()
    heads = np.arange(Hq)
    if p.score_mod is not None:
      b, h, qi, kj = base.index_grids(p, q_pos, kv_pos, heads)
      mod = p.score_mod.bind(s.shape, b.shape, h.shape, qi.shape, kj.shape, dtype=dt)
      s = mod(s, b, h, qi, kj).astype(dt)
    vis = jnp.broadcast_to(base.visibility(p, q_pos, kv_pos, heads), s.shape)
    if p.sinks is not None:
      s = jnp.concatenate([s, jnp.broadcast_to(p.sinks.astype(dt)[None, :, None, None],
                                               s.shape[:3] + (1,))], axis=-1)
      vis = jnp.concatenate([vis, jnp.ones(vis.shape[:3] + (1,), bool)], axis=-1)
    s = jnp.where(vis, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    probs = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0)
    if p.sinks is not None:
      probs = probs[..., :-1]
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dt), v).astype(p.q.dtype)
    return out, jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)


_BASELINES: dict = {}


def baselines(case: Case, dtype: str):
  """Inputs, float64 oracle and same-dtype naive results of a case, computed once per case
  object (tests parametrize backends innermost, so consecutive tests reuse them)."""
  key = (id(case), dtype)
  if key not in _BASELINES:
    if len(_BASELINES) > 8:
      _BASELINES.clear()
    inputs = make_inputs(case)
    _BASELINES[key] = (case, inputs, golden(case, inputs),
                       naive_same_dtype(case, inputs, jnp.dtype(dtype)))
  _, inputs, gold, naive = _BASELINES[key]
  return inputs, gold, naive


def check_case(impl, case: Case, dtype: str = "float32"):
  """Run ``impl`` on ``case`` and compare output, LSE and all gradients with the oracle."""
  inputs, gold, naive = baselines(case, dtype)
  jdt = jnp.dtype(dtype)
  got = run(impl, case, jdt, inputs)
  names = ["out", "lse", "grads"]
  for name, g, n, a in zip(names, gold, naive, got):
    leaves_g, tree = jax.tree.flatten(g)
    leaves_n = jax.tree.leaves(n)
    leaves_a = jax.tree.leaves(a)
    assert len(leaves_g) == len(leaves_a), f"{name}: structure differs"
    for idx, (lg, ln, la) in enumerate(zip(leaves_g, leaves_n, leaves_a)):
      assert np.shape(la) == np.shape(lg), f"{name}[{idx}] shape {np.shape(la)} != {np.shape(lg)}"
      assert np.all(np.isfinite(np.asarray(la, np.float64)) | ~np.isfinite(lg)), (
          f"{name}[{idx}] has non-finite values where the reference is finite")
      assert_close(f"{name}[{idx}]", la, lg, ln, dtype)
  return got, gold


def check_all(case: Case, dtype: str = "float32", backends=None, needs=()):
  """Check every backend under test (that declares the features in ``needs`` and runs on this
  platform) on ``case``; report all failures together, each naming its backend. A backend whose
  ``unsupported_problem`` declines the case (ProblemDeclined) is skipped, any other refusal
  fails."""
  failures, declined = [], []
  ran = 0
  platform = jax.default_backend()
  for name, impl in (backends or BACKENDS).items():
    if not all(getattr(impl.capabilities, f) for f in needs):
      continue
    if platform not in impl.capabilities.platforms:   # e.g. pallas_tpu on a GPU host
      continue
    try:
      check_case(impl, case, dtype)
    except AssertionError as e:
      failures.append(f"[{name}] {e}")
    except base.ProblemDeclined as e:  # unsupported_problem refused it (a capability gap would fail)
      declined.append(f"[{name}] {e}")
      continue
    ran += 1
  if not ran and declined:
    pytest.skip("declined by every backend under test: " + "; ".join(declined))
  assert ran, "no backend under test supports this case"
  assert not failures, "\n".join(failures)
