"""The conformance suite's cases on the Pallas backends (interpret mode on CPU).

The kernels are slow to interpret, so they run a representative selection of the suite's cases
— every feature the backends declare, forward and backward against the float64 reference —
rather than the full grid that the XLA backends run. Block sizes are small so each case spans
several blocks (ragged last blocks, skipped blocks, FULL and PARTIAL tiles)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks as M
from attnjax.backends.pallas import PallasBackend

from harness import check_all
from harness import case as Case
from test_conformance import FEATURE_NEEDS, MASKS, SCORE_MODS, SHAPES, _chain, _softcap

PALLAS = {
    "pallas_gpu-16x16": PallasBackend("gpu", block_q=16, block_kv=16),
    # interpret=True: the generic interpreter (the TPU-semantics one costs ~45 ms per grid step;
    # the kernel tests run a subset with InterpretParams(uninitialized_memory="nan")).
    "pallas_tpu-8x16": PallasBackend("tpu", block_q=8, block_kv=16, interpret=True),
}
# On a GPU host, ATTNJAX_PALLAS_BACKENDS=pallas_gpu runs the cases on the compiled GPU kernel only.
_ONLY = os.environ.get("ATTNJAX_PALLAS_BACKENDS")
if _ONLY:
  PALLAS = {k: v for k, v in PALLAS.items() if k.split("-")[0] in _ONLY.split(",")}

pytestmark = pytest.mark.pallas


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4]],
                         ids=lambda s: "x".join(map(str, s)))
def test_shapes(shape):
  B, Tq, Tk, Hq, Hkv, D, Dv = shape
  case = Case(B=B, Tq=Tq, Tk=Tk, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, mask=M.causal(), seed=sum(shape))
  check_all(case, backends=PALLAS)


@pytest.mark.parametrize("name", ["sliding", "chunked", "neighborhood_2d", "per_head",
                                  "strided_heads_causal", "from_function", "dense", "or"])
def test_masks(name):
  mask = MASKS[name]
  case = Case(B=2, Tq=30, Tk=30, Hq=4, Hkv=2, D=8, Dv=8, mask=mask, seed=len(name))
  check_all(case, backends=PALLAS, needs=("per_head_masks",) if mask.per_head else ())


@pytest.mark.parametrize("mod", list(SCORE_MODS))
def test_score_mods(mod):
  case = Case(B=2, Tq=21, Tk=26, Hq=4, Hkv=2, D=8, Dv=8, mask=M.causal(),
              score_mod=SCORE_MODS[mod], seed=len(mod))
  check_all(case, backends=PALLAS, needs=("score_mods",))


@pytest.mark.parametrize("feature", list(FEATURE_NEEDS))
def test_features(feature):
  kw = dict(sinks=feature in ("sinks", "everything"),
            segments=feature in ("segments", "everything"),
            bias=feature in ("bias", "everything"),
            positions=feature in ("positions", "positions_table", "everything"))
  if feature == "everything":
    kw["score_mod"] = _chain
  if feature == "positions_table":
    from test_conformance import _rel_clipped
    kw["score_mod"] = _rel_clipped
  case = Case(B=2, Tq=27, Tk=27, Hq=4, Hkv=2, D=8, Dv=12,
              mask=M.causal() & M.sliding_window(9, 0), seed=7, **kw)
  check_all(case, backends=PALLAS, needs=FEATURE_NEEDS[feature])


def test_cross_segments():
  case = Case(B=2, Tq=14, Tk=31, Hq=2, Hkv=1, D=8, Dv=8, segments=True, sinks=True, seed=11)
  check_all(case, backends=PALLAS, needs=("segment_ids", "sinks"))


def test_bfloat16():
  case = Case(B=2, Tq=30, Tk=30, Hq=4, Hkv=2, D=16, Dv=16, mask=MASKS["neighborhood_2d"],
              sinks=True, score_mod=_softcap, dtype="bfloat16", seed=5)
  check_all(case, dtype="bfloat16", backends=PALLAS, needs=("sinks", "score_mods"))


@pytest.mark.parametrize("impl", list(PALLAS))
def test_rows_with_no_visible_key(impl):
  backend = PALLAS[impl]
  rng = np.random.default_rng(0)
  B, T, H, D = 1, 20, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(3))
  sinks = jnp.asarray(rng.normal(size=(H,)), jnp.float32)
  mask = M.causal(offset=-5)  # the first 5 queries see nothing

  def f(q, k, v, sinks, use_sinks):
    out, lse = aj.attention(q, k, v, mask=mask, sinks=sinks if use_sinks else None,
                            impl=backend, return_lse=True)
    return jnp.sum(out * jnp.arange(out.size).reshape(out.shape) / out.size), (out, lse)

  for use_sinks in (False, True):
    grads, (out, lse) = jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, sinks,
                                                                         use_sinks)
    assert np.all(np.asarray(out[:, :5]) == 0.0)
    if use_sinks:
      np.testing.assert_allclose(np.asarray(lse[0, :5]), np.broadcast_to(sinks, (5, H)),
                                 rtol=1e-6)
    else:
      assert np.all(np.isneginf(np.asarray(lse[:, :5])))
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0][:, :5]) == 0.0)


def test_auto_never_picks_pallas_on_cpu():
  p = aj.api.build_problem(*(jnp.ones((1, 1024, 1, 8)),) * 3, mask=M.causal())
  assert all(not n.startswith("pallas") for n in aj.api.auto_candidates(p, "cpu"))
  assert aj.api.auto_candidates(p, "gpu")[0] == "pallas_gpu"
  assert aj.api.auto_candidates(p, "tpu")[0] == "pallas_tpu"


def test_wrong_platform_raises():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU-side platform rule")
  if not {"pallas_tpu-8x16", "pallas_gpu-16x16"} <= set(PALLAS):
    pytest.skip("needs both Pallas backends (ATTNJAX_PALLAS_BACKENDS filtered one out)")
  p = aj.api.build_problem(*(jnp.ones((1, 8, 1, 8)),) * 3)
  from attnjax.backends import base
  assert "platform" in base.unsupported(PALLAS["pallas_tpu-8x16"].capabilities, p, "gpu")
  assert "platform" in base.unsupported(PALLAS["pallas_gpu-16x16"].capabilities, p, "tpu")
  with pytest.raises(NotImplementedError, match="float64|dtype"):
    with jax.enable_x64(True):
      x = jnp.ones((1, 8, 1, 8), jnp.float64)
      aj.attention(x, x, x, impl="pallas_gpu")


def test_compiled_gpu_declines_what_triton_cannot_lower():
  """The compiled GPU kernel (interpret=False) declines, naming why, a score mod that needs a
  gather (table lookups) and parameter tiles with non-power-of-two dimensions; the dispatcher
  turns that into NotImplementedError for an explicit backend. Interpreted, nothing is
  declined."""
  from attnjax import scores as S
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 64, 2, 16)), jnp.float32)
  compiled, interp = PallasBackend("gpu", interpret=False), PallasBackend("gpu")
  prob = lambda **kw: aj.build_problem(q, q, q, **kw)
  assert compiled.unsupported_problem(prob(mask=M.causal() & M.sliding_window(9, 0),
                                           score_mod=S.softcap(5.0)), "gpu") is None
  assert compiled.unsupported_problem(prob(score_mod=S.alibi(jnp.ones(2))), "gpu") is None
  rel = prob(score_mod=S.relative_bias(jnp.ones((2, 13)), 6))
  why = compiled.unsupported_problem(rel, "gpu")
  assert why is not None and ("power" in why or "gather" in why), why
  t5 = prob(score_mod=S.relative_bias(jnp.ones((2, 8)), 20, mode="t5", bidirectional=False))
  assert "gather" in compiled.unsupported_problem(t5, "gpu")
  low = prob(score_mod=S.low_rank_bias(jnp.ones((1, 64, 2, 3)), jnp.ones((1, 64, 2, 3))))
  assert "not powers of two" in compiled.unsupported_problem(low, "gpu")
  low4 = prob(score_mod=S.low_rank_bias(jnp.ones((1, 64, 2, 4)), jnp.ones((1, 64, 2, 4))))
  assert compiled.unsupported_problem(low4, "gpu") is None
  q30 = q[:, :30]
  dense = aj.build_problem(q30, q30, q30, mask=M.dense(np.tril(np.ones((30, 30), bool))))
  assert "mask" in compiled.unsupported_problem(dense, "gpu")
  # A score mod whose forward lowers but whose derivative does not (a custom JVP using erf):
  # the dq/dkv kernels pull back through it, so it is declined too.
  @jax.custom_jvp
  def squash(s):
    return jnp.tanh(s)
  squash.defjvp(lambda p, t: (jnp.tanh(p[0]), t[0] * (1 + jax.lax.erf(p[0]))))
  custom = prob(score_mod=S.from_function(lambda s, b, h, qi, ki: squash(s)))
  assert "erf" in compiled.unsupported_problem(custom, "gpu")
  assert compiled.unsupported_problem(
      prob(score_mod=S.from_function(lambda s, b, h, qi, ki: jnp.tanh(s))), "gpu") is None
  # No reverse-mode derivative at all (a loop with a traced trip count): the backward fails on
  # every backend alike, so only the forward is judged, and it lowers.
  halve = S.from_function(lambda s, b, h, qi, ki: jax.lax.fori_loop(
      0, jnp.max(h), lambda _, x: x * 0.5, s))
  assert compiled.unsupported_problem(prob(score_mod=halve), "gpu") is None
  with pytest.raises(aj.ProblemDeclined, match="gather"):
    aj.attention(q, q, q, impl=compiled, score_mod=S.relative_bias(jnp.ones((2, 8)), 20,
                                                                   mode="t5"))
  for p in (rel, t5, low, dense, custom):
    assert interp.unsupported_problem(p, "cpu") is None


def test_backward_tiles_differ_from_forward():
  """Forward and backward at different tilings (lengths padded to both, block maps grown with
  EMPTY blocks, in-tile callables built per tiling): still equal to the float64 reference,
  with a per-head mask, sinks, segment ids and a score mod with a parameter gradient."""
  be = PallasBackend("gpu", block_q=16, block_kv=32, block_q_bwd=32, block_kv_bwd=16)
  assert be.block_sizes(45, 45) == (16, 32) and be.block_sizes(45, 45, backward=True) == (32, 16)
  case = Case(B=2, Tq=45, Tk=45, Hq=4, Hkv=2, D=8, Dv=12, mask=MASKS["per_head"], sinks=True,
              segments=True, score_mod=SCORE_MODS["alibi"], seed=3)
  check_all(case, backends={"pallas_gpu-16x32/32x16": be},
            needs=("per_head_masks", "sinks", "segment_ids", "score_mods"))


def test_backward_tiles_with_tile_shaped_mask_constants(monkeypatch):
  """A user mask whose constant is built from its inputs' shape (here a numpy array shaped like
  the query-position tile) traces to different constants at the forward and backward tilings;
  each kernel gets its own, and both tilings' results equal the float64 reference (a dense
  mask, equal at both tilings, is shared)."""
  from attnjax.backends import pallas as pallas_mod
  shaped = M.from_function(lambda qi, ki: (qi >= ki) & (np.ones(np.shape(qi), bool)
                                                         | (qi < 0)))
  be = PallasBackend("gpu", block_q=16, block_kv=16, block_q_bwd=32, block_kv_bwd=32)
  seen, same = [], pallas_mod._same_consts
  monkeypatch.setattr(pallas_mod, "_same_consts", lambda a, b: seen.append(same(a, b)) or seen[-1])
  for mask, shared in ((shaped, False), (M.dense(np.tril(np.ones((40, 40), bool))), True)):
    seen.clear()
    case = Case(B=1, Tq=40, Tk=40, Hq=2, Hkv=1, D=8, Dv=8, mask=mask, seed=5)
    check_all(case, backends={"pallas_gpu-16/32": be})   # under jit(grad)
    assert seen and all(x == shared for x in seen), (mask, seen)


def test_gpu_forward_widens_key_tiles_for_small_mostly_full_grids():
  """The GPU forward's tile rule (plan): 64 x 128 for a small grid of mostly FULL tiles
  (causal, B=1, H=8) with 128-byte rows, 64 x 64 for a large grid, a partial-heavy mask or
  wider rows; the backward keeps 64 x 64; explicit tiles are never overridden; interpret mode
  is left alone."""
  def plan(B, H, mask, D=64, dtype=jnp.bfloat16, **kw):
    be = PallasBackend("gpu", **kw)
    be._on_hardware = lambda: True
    q = jax.ShapeDtypeStruct((B, 8192, H, D), dtype)
    p = aj.build_problem(jnp.zeros(q.shape, q.dtype), jnp.zeros(q.shape, q.dtype),
                         jnp.zeros(q.shape, q.dtype), mask=mask)
    return be.plan(p)[1:], be.block_sizes(8192, 8192, backward=True)
  causal, sliding = M.causal(), M.causal() & M.sliding_window(511, 0)
  assert plan(1, 8, causal) == ((64, 128), (64, 64))
  assert plan(4, 16, causal) == ((64, 64), (64, 64))
  assert plan(1, 8, sliding) == ((64, 64), (64, 64))
  assert plan(1, 8, causal, block_kv=64) == ((64, 64), (64, 64))
  assert plan(1, 8, causal, block_q=64) == ((64, 64), (64, 64))   # a chosen tile is kept
  assert plan(1, 8, causal, D=48) == ((64, 128), (64, 64))         # pads to 64: 128 bytes
  assert plan(1, 8, causal, D=128) == ((64, 64), (64, 64))         # 256-byte rows: unmeasured
  assert plan(1, 8, causal, dtype=jnp.float32) == ((64, 64), (64, 64))
  be = PallasBackend("gpu")   # on this CPU: interpreted, no widening
  q = jnp.zeros((1, 256, 2, 16))
  assert be.plan(aj.build_problem(q, q, q, mask=causal))[1:] == (64, 64)


@pytest.mark.parametrize("kw,match", [
    (dict(platform="tpu", num_warps=4), "Triton .GPU. compiler parameter"),
    (dict(platform="gpu", num_warps=3), "num_warps must be a positive int power of two"),
    (dict(platform="gpu", num_stages=0), "num_stages must be a positive int"),
    (dict(platform="gpu", block_kv_bwd=4), "block_kv_bwd must be an int >= 8"),
])
def test_backend_argument_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    PallasBackend(**kw)
