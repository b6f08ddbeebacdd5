"""The conformance suite: every backend against the float64 reference, forward and backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import attnjax as aj
from attnjax import masks as M, scores as S

from harness import BACKENDS, check_all, check_case
from harness import case as Case

IDS = list(BACKENDS)


def _impl(name):
  return BACKENDS[name]


# ------------------------------------------------------------------------------ shapes / GQA
SHAPES = [
    # B, Tq, Tk, Hq, Hkv, D, Dv
    (1, 1, 1, 1, 1, 8, 8),
    (2, 17, 17, 2, 2, 16, 16),      # odd length, MHA
    (1, 33, 33, 4, 2, 16, 8),       # GQA 2, Dv != D
    (2, 19, 40, 4, 1, 8, 8),        # MQA, cross attention Tq < Tk
    (1, 40, 13, 8, 1, 16, 24),      # GQA 8, Tq > Tk
    (1, 29, 29, 8, 2, 32, 16),      # GQA 4
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(shape, causal):
  B, Tq, Tk, Hq, Hkv, D, Dv = shape
  case = Case(B=B, Tq=Tq, Tk=Tk, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv,
              mask=M.causal() if causal else None, seed=sum(shape))
  check_all(case)


# ------------------------------------------------------------------------------------- masks
MASKS = {
    "causal": M.causal(),
    "causal_offset": M.causal(offset=-3),
    "sliding": M.sliding_window(5, 2),
    "sliding_causal": M.causal() & M.sliding_window(6, 0),
    "chunked": M.chunked(7),
    "causal_chunked": M.causal() & M.chunked(9),
    "block_causal": M.block_causal(5),
    "prefix_lm": M.prefix_lm(10),
    "neighborhood_1d": M.neighborhood((30,), 7, dilation=2, stride=2),
    "neighborhood_2d": M.neighborhood((5, 6), (3, 4), stride=(1, 2), causal=(True, False)),
    "neighborhood_3d": M.neighborhood((2, 3, 5), (2, 3, 3), dilation=(1, 1, 1)),
    "strided_heads": M.strided_heads(2, 3),
    "strided_heads_causal": M.causal() & M.strided_heads(4, 2, block=3),
    "per_head": M.per_head([M.causal(), M.sliding_window(3, 3), M.full(), M.chunked(4)]),
    "from_function": M.from_function(lambda q, k: ((q + k) % 3) != 0),
    "dense": M.dense(np.random.default_rng(3).random((30, 30)) < 0.4),
    "not_causal": ~M.causal(),
    "or": M.sliding_window(2, 2) | M.from_function(lambda q, k: k < 4),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_masks(name):
  mask = MASKS[name]
  case = Case(B=2, Tq=30, Tk=30, Hq=4, Hkv=2, D=8, Dv=8, mask=mask, seed=len(name))
  check_all(case, needs=("per_head_masks",) if mask.per_head else ())


def _leaf_masks():
  return st.one_of(
      st.builds(M.causal, st.integers(-4, 4)),
      st.builds(M.sliding_window, st.integers(0, 8), st.integers(0, 8)),
      st.builds(M.chunked, st.integers(1, 12)),
      st.builds(M.block_causal, st.integers(1, 9)),
      st.builds(M.prefix_lm, st.integers(0, 12)),
      st.just(M.full()),
      st.builds(lambda s, w: M.strided_heads(s, w), st.integers(1, 4), st.integers(0, 4)),
  )


def _mask_trees():
  return st.recursive(
      _leaf_masks(),
      lambda children: st.one_of(
          st.builds(lambda a, b: a & b, children, children),
          st.builds(lambda a, b: a | b, children, children),
          st.builds(lambda a: ~a, children)),
      max_leaves=4)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(mask=_mask_trees(), tq=st.integers(1, 40), tk=st.integers(1, 40),
       impl=st.sampled_from(["xla", "chunked-8x16", "chunked-32x8-online", "chunked-band"]),
       seed=st.integers(0, 99))
def test_random_mask_compositions(mask, tq, tk, impl, seed):
  case = Case(B=1, Tq=tq, Tk=tk, Hq=4, Hkv=2, D=8, Dv=8, mask=mask, seed=seed)
  check_case(_impl(impl), case)


# ----------------------------------------------------------------------------- extras
def _alibi(rng, case):
  return (lambda p: S.alibi(p[0])), (np.abs(rng.normal(size=(case.Hq,))) * 0.3,)


def _alibi_sym(rng, case):
  return (lambda p: S.alibi(p[0], symmetric=True)), (np.abs(rng.normal(size=(case.Hq,))),)


def _softcap(rng, case):
  return (lambda p: S.softcap(2.5)), ()


def _rel_clipped(rng, case):
  return (lambda p: S.relative_bias(p[0], 6)), (rng.normal(size=(case.Hq, 13)),)


def _rel_t5(rng, case):
  return (lambda p: S.relative_bias(p[0], 20, mode="t5", bidirectional=False)), (
      rng.normal(size=(case.Hq, 8)),)


def _rel_shared(rng, case):
  return (lambda p: S.relative_bias(p[0], 4, bidirectional=True)), (rng.normal(size=(9,)),)


def _low_rank(rng, case):
  return (lambda p: S.low_rank_bias(p[0], p[1])), (
      rng.normal(size=(case.B, case.Tq, case.Hq, 3)) * 0.5,
      rng.normal(size=(1, case.Tk, case.Hq, 3)) * 0.5)


def _user_fn(rng, case):
  def build(p):
    table = p[0]
    return S.from_function(lambda s, b, h, q, k: s * table[h] + 0.1 * jnp.sin(q - k))
  return build, (1.0 + 0.3 * rng.normal(size=(case.Hq,)),)


def _chain(rng, case):
  return (lambda p: S.chain(S.alibi(p[0]), S.softcap(3.0))), (np.abs(rng.normal(size=(case.Hq,))),)


SCORE_MODS = {"alibi": _alibi, "alibi_symmetric": _alibi_sym, "softcap": _softcap,
              "relative_clipped": _rel_clipped, "relative_t5": _rel_t5,
              "relative_shared": _rel_shared, "low_rank": _low_rank, "user_fn": _user_fn,
              "chain": _chain}


@pytest.mark.parametrize("mod", list(SCORE_MODS))
def test_score_mods(mod):
  case = Case(B=2, Tq=21, Tk=26, Hq=4, Hkv=2, D=8, Dv=8, mask=M.causal(),
              score_mod=SCORE_MODS[mod], seed=len(mod))
  check_all(case, needs=("score_mods",))


FEATURE_NEEDS = {"sinks": ("sinks",), "segments": ("segment_ids",), "bias": ("bias",),
                 "positions": ("explicit_positions",),
                 # a position-indexed table under per-example positions (batch axis kept)
                 "positions_table": ("explicit_positions", "score_mods"),
                 "everything": ("sinks", "segment_ids", "bias", "explicit_positions",
                                "score_mods")}


@pytest.mark.parametrize("feature", list(FEATURE_NEEDS))
def test_features(feature):
  kw = dict(sinks=feature in ("sinks", "everything"),
            segments=feature in ("segments", "everything"),
            bias=feature in ("bias", "everything"),
            positions=feature in ("positions", "positions_table", "everything"))
  if feature == "everything":
    kw["score_mod"] = _chain
  if feature == "positions_table":
    kw["score_mod"] = _rel_clipped
  case = Case(B=2, Tq=27, Tk=27, Hq=4, Hkv=2, D=8, Dv=12,
              mask=M.causal() & M.sliding_window(9, 0), seed=7, **kw)
  check_all(case, needs=FEATURE_NEEDS[feature])


def test_cross_segments():
  case = Case(B=2, Tq=14, Tk=31, Hq=2, Hkv=1, D=8, Dv=8, segments=True, sinks=True, seed=11)
  check_all(case, needs=("segment_ids", "sinks"))


@pytest.mark.parametrize("mask", ["causal", "neighborhood_2d", "per_head"])
def test_bfloat16(mask):
  case = Case(B=2, Tq=30, Tk=30, Hq=4, Hkv=2, D=16, Dv=16, mask=MASKS[mask], sinks=True,
              score_mod=_softcap, dtype="bfloat16", seed=5)
  check_all(case, dtype="bfloat16", needs=("sinks", "score_mods"))


# ------------------------------------------------------------------------ empty rows
@pytest.mark.parametrize("impl", IDS + ["reference"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_rows_with_no_visible_key(impl, with_sinks):
  backend = BACKENDS.get(impl, impl)
  rng = np.random.default_rng(0)
  B, T, H, D = 1, 20, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(3))
  sinks = jnp.asarray(rng.normal(size=(H,)), jnp.float32) if with_sinks else None
  mask = M.causal(offset=-5)  # the first 5 queries see nothing

  def f(q, k, v, sinks):
    out, lse = aj.attention(q, k, v, mask=mask, sinks=sinks, impl=backend, return_lse=True)
    return jnp.sum(out * jnp.arange(out.size).reshape(out.shape) / out.size), (out, lse)

  argn = (0, 1, 2, 3) if with_sinks else (0, 1, 2)
  grads, (out, lse) = jax.jit(jax.grad(f, argnums=argn, has_aux=True))(q, k, v, sinks)
  assert np.all(np.asarray(out[:, :5]) == 0.0)
  if with_sinks:
    np.testing.assert_allclose(np.asarray(lse[0, :5]), np.broadcast_to(sinks, (5, H)), rtol=1e-6)
  else:
    assert np.all(np.isneginf(np.asarray(lse[:, :5])))
  assert np.all(np.isfinite(np.asarray(lse[:, 5:])))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[0][:, :5]) == 0.0)  # dq of empty rows is exactly zero


# ----------------------------------------------------------------------- transformations
@pytest.mark.parametrize("impl", IDS)
def test_vmap_matches_loop(impl):
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(3, 2, 20, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 2, 20, 1, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, 2, 20, 1, 8)), jnp.float32)
  f = lambda q, k, v: aj.attention(q, k, v, mask=M.causal(), impl=_impl(impl))
  got = jax.vmap(f)(q, k, v)
  want = jnp.stack([f(q[i], k[i], v[i]) for i in range(3)])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda q: jnp.sum(jax.vmap(f)(q, k, v) ** 2))(q)
  assert g.shape == q.shape and np.all(np.isfinite(np.asarray(g)))


def test_harness_skips_only_declines():
  """check_all counts a backend as declining only when its ``unsupported_problem`` refused the
  case (ProblemDeclined); a missing capability the test did not filter with ``needs`` is a
  failure, not a skip, and a backend that wrongly raises NotImplementedError is not hidden."""
  from attnjax.backends.xla import XlaBackend
  import dataclasses

  class Declining(XlaBackend):
    def unsupported_problem(self, problem, platform):
      return "this case (declined on purpose)"

  class NoSinks(XlaBackend):
    capabilities = dataclasses.replace(XlaBackend.capabilities, name="nosinks2", sinks=False)

  class Raising(XlaBackend):
    def __call__(self, problem):
      raise NotImplementedError("backend 'raising' does not support anything")

  class OtherPlatform(XlaBackend):
    capabilities = dataclasses.replace(XlaBackend.capabilities, name="tpuonly",
                                       platforms=frozenset({"tpu"}))

  c = Case(Tq=8, Tk=8, sinks=True)
  if jax.default_backend() != "tpu":   # a backend for another platform is left out, not failed
    check_all(c, backends={"xla": XlaBackend(), "tpuonly": OtherPlatform()})
  with pytest.raises(pytest.skip.Exception, match="declined on purpose"):
    check_all(c, backends={"declining": Declining()})
  with pytest.raises(NotImplementedError, match="sinks"):
    check_all(c, backends={"nosinks": NoSinks()})
  with pytest.raises(NotImplementedError, match="raising"):
    check_all(c, backends={"raising": Raising()})
  assert isinstance(aj.ProblemDeclined("x"), NotImplementedError)


@pytest.mark.parametrize("impl", [i for i in IDS if i.startswith("chunked")])
def test_tiled_parameter_grads_under_x64(impl):
  """With x64 enabled (float64 inputs), gradients into parameters cut per tile (an additive
  bias, low-rank bias factors) flow back through the tile scatter: its start indices share
  one integer type."""
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    q = jnp.asarray(rng.normal(size=(1, 33, 2, 8)))
    bias = jnp.asarray(rng.normal(size=(1, 2, 33, 33)))
    u, w = (jnp.asarray(rng.normal(size=(1, 33, 2, 3))) for _ in range(2))

    def loss(impl):
      def f(bias, u, w):
        out = aj.attention(q, q, q, bias=bias, mask=M.sliding_window(5, 5), impl=impl,
                           score_mod=S.low_rank_bias(u, w))
        return jnp.sum(jnp.sin(out))
      return f

    got = jax.grad(loss(_impl(impl)), argnums=(0, 1, 2))(bias, u, w)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(bias, u, w)
    for g, r in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IDS)
@pytest.mark.parametrize("mask", ["causal_window", "strided_heads"])
def test_float64_inputs_are_computed_in_float64(impl, mask):
  """Under x64, float64 inputs are computed in float64 (logits, softmax state, accumulators and
  gradients): outputs, LSE (returned in float32, the documented LSE dtype) and gradients w.r.t.
  q, k, v, sinks and score-mod parameters match the float64 reference to ~1e-12, far below
  float32's ~1e-7."""
  rng = np.random.default_rng(11)
  mask = (M.causal() & M.sliding_window(13, 0) if mask == "causal_window"
          else M.strided_heads(2, local_window=4))
  with jax.enable_x64(True):
    q = jnp.asarray(rng.normal(size=(2, 45, 4, 8)))
    k, v = (jnp.asarray(rng.normal(size=(2, 45, 2, 8))) for _ in range(2))
    sinks = jnp.asarray(rng.normal(size=4))
    slopes = jnp.asarray(S.alibi_slopes(4), jnp.float64)

    def run(backend):
      def f(q, k, v, sinks, slopes):
        out, lse = aj.attention(q, k, v, mask=mask, sinks=sinks, impl=backend, return_lse=True,
                                score_mod=[S.alibi(slopes), S.softcap(4.0)])
        return out, lse
      return f

    out, lse = run(_impl(impl))(q, k, v, sinks, slopes)
    ref_out, ref_lse = run("reference")(q, k, v, sinks, slopes)
    assert out.dtype == jnp.float64 and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-7)

    def loss(backend):
      def f(*args):
        out, lse = run(backend)(*args)
        finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(jnp.sin(out)) + jnp.sum(finite)
      return f

    args = (q, k, v, sinks, slopes)
    got = jax.grad(loss(_impl(impl)), argnums=range(5))(*args)
    want = jax.grad(loss("reference"), argnums=range(5))(*args)
    for name, g, r in zip(("q", "k", "v", "sinks", "slopes"), got, want):
      assert g.dtype == jnp.float64, name
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0,
                                 atol=1e-10,
                                 err_msg=name)
