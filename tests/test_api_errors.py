"""Bad input to attnjax.attention raises errors that name the argument, shapes and what is allowed;
backends refuse features they lack instead of dropping them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks as M, scores as S
from attnjax.backends import base

rng = np.random.default_rng(0)


def _qkv(B=2, Tq=8, Tk=8, Hq=4, Hkv=2, D=8, Dv=8, dtype=jnp.float32):
  return (jnp.asarray(rng.normal(size=(B, Tq, Hq, D)), dtype),
          jnp.asarray(rng.normal(size=(B, Tk, Hkv, D)), dtype),
          jnp.asarray(rng.normal(size=(B, Tk, Hkv, Dv)), dtype))


def test_rank():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"q must be 4-D .*\[2, 8, 32\]"):
    aj.attention(q.reshape(2, 8, 32), k, v)


def test_batch_mismatch():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="batch sizes differ"):
    aj.attention(q[:1], k, v)


def test_kv_length_mismatch():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="k and v must have the same sequence length"):
    aj.attention(q, k, v[:, :5])


def test_head_dim_mismatch():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="q and k must have the same head_dim"):
    aj.attention(q, k[..., :4], v)


def test_gqa_divisibility():
  q, k, v = _qkv(Hq=3, Hkv=2)
  with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple .* \(2\)"):
    aj.attention(q, k, v)


def test_integer_dtype():
  q, k, v = _qkv()
  with pytest.raises(TypeError, match="q must have a floating-point dtype.*int32"):
    aj.attention(q.astype(jnp.int32), k, v)


def test_mixed_dtypes():
  q, k, v = _qkv()
  with pytest.raises(TypeError, match="share one dtype"):
    aj.attention(q, k.astype(jnp.bfloat16), v)


def test_mask_type():
  q, k, v = _qkv()
  with pytest.raises(TypeError, match=r"masks.dense"):
    aj.attention(q, k, v, mask=np.ones((8, 8), bool))
  with pytest.raises(TypeError, match="mask must be"):
    aj.attention(q, k, v, mask="causal")


def test_dense_mask_shape():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"dense mask has shape \(8, 9\).*\[8, 8\]"):
    aj.attention(q, k, v, mask=M.dense(np.ones((8, 9), bool)))


def test_neighborhood_token_count():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"spatial_shape=\(3, 3\) covers 9 tokens.*8"):
    aj.attention(q, k, v, mask=M.neighborhood((3, 3), 3))


def test_negative_window():
  with pytest.raises(ValueError, match="left must be >= 0"):
    M.sliding_window(-1, 0)


def test_kernel_larger_than_axis():
  with pytest.raises(ValueError, match=r"kernel_size\[1\]=5 .* exceeds spatial_shape\[1\]=4"):
    M.neighborhood((4, 4), (3, 5))


def test_strided_heads_cover():
  q, k, v = _qkv(Hq=4, Hkv=2)
  with pytest.raises(ValueError, match=r"stride=8.*4 heads"):
    aj.attention(q, k, v, mask=M.strided_heads(8))


def test_per_head_count():
  q, k, v = _qkv(Hq=4, Hkv=2)
  with pytest.raises(ValueError, match="per_head mask holds 2 masks but the query has 4 heads"):
    aj.attention(q, k, v, mask=[M.causal(), M.full()])


def test_bias_shape():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"bias must be broadcastable to \[B, Hq, Tq, Tk\]"):
    aj.attention(q, k, v, bias=jnp.zeros((2, 3, 8, 8)))


def test_sinks_shape():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"sinks must have shape \[num_q_heads\] = \[4\]"):
    aj.attention(q, k, v, sinks=jnp.zeros((2,)))


def test_segment_ids():
  q, k, v = _qkv(Tq=6, Tk=8)
  with pytest.raises(ValueError, match="segment_ids alone .* Tq == Tk"):
    aj.attention(q, k, v, segment_ids=jnp.zeros((2, 6), jnp.int32))
  with pytest.raises(ValueError, match=r"kv_segment_ids must have shape \[2, 8\]"):
    aj.attention(q, k, v, segment_ids=jnp.zeros((2, 6), jnp.int32),
                 kv_segment_ids=jnp.zeros((2, 6), jnp.int32))
  with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
    aj.attention(q, k, v, segment_ids=jnp.zeros((2, 6)), kv_segment_ids=jnp.zeros((2, 8)))
  with pytest.raises(ValueError, match="kv_segment_ids was given without segment_ids"):
    aj.attention(q, k, v, kv_segment_ids=jnp.zeros((2, 8), jnp.int32))


def test_positions_shape():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"q_positions must have shape \[8\] or \[1, 8\] or \[2, 8\]"):
    aj.attention(q, k, v, q_positions=np.arange(5))


def test_scale_and_impl():
  q, k, v = _qkv()
  with pytest.raises(TypeError, match="scale must be a Python float"):
    aj.attention(q, k, v, scale=jnp.float32(0.1))
  with pytest.raises(ValueError, match=r"impl='flash' is not a known backend.*chunked"):
    aj.attention(q, k, v, impl="flash")


def test_score_mod_params():
  with pytest.raises(ValueError, match="relative_bias table has 5 buckets"):
    S.relative_bias(jnp.zeros((4, 5)), 6)
  with pytest.raises(ValueError, match="softcap cap must be a positive"):
    S.softcap(0.0)
  with pytest.raises(TypeError, match="alibi slopes must be a floating-point"):
    S.alibi(jnp.arange(4))
  with pytest.raises(ValueError, match="low_rank_bias: u rank 3 != w rank 2"):
    S.low_rank_bias(jnp.zeros((1, 8, 1, 3)), jnp.zeros((1, 8, 1, 2)))


class _NoSinks(base.Backend):
  capabilities = base.Capabilities(name="nosinks", sinks=False, per_head_masks=False)

  def __call__(self, p):  # pragma: no cover - never reached
    raise AssertionError("a backend must not be called with a feature it lacks")


def test_missing_capability_raises_not_drops():
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="'nosinks' does not support sinks"):
    aj.attention(q, k, v, sinks=jnp.zeros((4,)), impl=_NoSinks())
  with pytest.raises(NotImplementedError, match="per-head masks"):
    aj.attention(q, k, v, mask=M.strided_heads(2), impl=_NoSinks())


def test_auto_selects_capable_backend():
  q, k, v = _qkv()
  p = aj.build_problem(q, k, v, mask=M.causal())
  assert aj.select_backend(p, "auto").name == "xla"
  long_q, long_k, long_v = _qkv(B=1, Tq=2048, Tk=2048, Hq=1, Hkv=1)
  p = aj.build_problem(long_q, long_k, long_v, mask=M.causal())
  assert aj.select_backend(p, "auto").name == "chunked"


@pytest.mark.parametrize("impl", ["xla", "chunked", "reference"])
def test_score_mod_param_shapes_are_checked(impl):
  """Params cut tile by tile must fit the problem: a wrong size was padded, clipped or gave NaN
  in chunked (per-head masks) instead of an error."""
  q, k, v = _qkv(B=2, Tq=8, Tk=8, Hq=4, Hkv=2)
  per_head = [M.causal()] * 2 + [M.full()] * 2
  cases = [
      (S.alibi(S.alibi_slopes(2)), r"alibi slopes has shape \[2\]: its axis 0 follows the query "
                                   r"heads Hq and must have size 4 \(or 1 to broadcast\), got 2"),
      (S.low_rank_bias(jnp.ones((2, 5, 4, 3)), jnp.ones((2, 8, 4, 3))),
       r"low_rank_bias u \[B, Tq, H, R\] has shape \[2, 5, 4, 3\]: its axis 1 follows the query "
       r"rows Tq and must have size 8"),
      (S.low_rank_bias(jnp.ones((1, 8, 1, 3)), jnp.ones((3, 8, 4, 3))),
       r"low_rank_bias w .* axis 0 follows the batch B and must have size 2"),
      (S.relative_bias(jnp.ones((3, 9)), 4), r"relative_bias table has shape \[3, 9\]"),
      ([S.softcap(2.0), S.alibi(jnp.ones(3))], r"alibi slopes has shape \[3\]"),
  ]
  for mod, match in cases:
    for mask in (M.causal(), per_head):
      with pytest.raises(ValueError, match=match):
        aj.attention(q, k, v, mask=mask, score_mod=mod, impl=impl)
  # Size 1 broadcasts; full sizes pass.
  ok = [S.alibi(jnp.ones(1)), S.low_rank_bias(jnp.ones((1, 8, 1, 3)), jnp.ones((2, 8, 4, 3)))]
  out = aj.attention(q, k, v, mask=per_head, score_mod=ok, impl=impl)
  assert bool(jnp.all(jnp.isfinite(out)))


def test_mask_function_must_return_bool():
  """An int result combined bitwise with padding and segment masks (2 & True == 0) and hid
  every key in chunked while xla treated it as visible."""
  q, k, v = _qkv()
  for fn, got in ((lambda i, j: (j <= i).astype(jnp.int32) * 2, "int32"),
                  (lambda i, j: (j <= i) * 1.0, "float32")):
    for impl in ("xla", "chunked", "reference"):
      with pytest.raises(TypeError, match=f"must return a boolean array .*got dtype {got}"):
        aj.attention(q, k, v, mask=M.from_function(fn), impl=impl)
  out = aj.attention(q, k, v, mask=M.from_function(lambda i, j: True), impl="chunked")
  want = aj.attention(q, k, v, impl="reference")
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_dense_mask_positions_outside_see_nothing():
  """With explicit positions a dense mask is looked up at them; positions outside the array see
  nothing (padded query slots of a ragged KV-cache step have such positions), eagerly and under
  jit alike."""
  q, k, v = _qkv(Tq=16, Tk=16)
  arr = np.tril(np.ones((8, 8), bool))
  small = M.dense(arr)
  pos = np.minimum(np.arange(16) // 2 + np.r_[np.zeros(12, int), np.full(4, 5)], 12)
  inside = pos < 8
  vis = np.where(inside[:, None] & inside[None, :], arr[np.minimum(pos, 7)][:, np.minimum(pos, 7)],
                 False)
  want = aj.attention(q, k, v, bias=jnp.where(vis, 0.0, -jnp.inf)[None, None], impl="reference")
  for impl in ("xla", "chunked"):
    f = lambda q, k, v, qp, kp, impl=impl: aj.attention(q, k, v, mask=small, q_positions=qp,
                                                        kv_positions=kp, impl=impl)
    for got in (f(q, k, v, pos, pos), jax.jit(f)(q, k, v, pos, pos)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
      assert not np.any(np.asarray(got)[:, ~inside])    # rows outside the mask: output 0


def test_score_mod_constructor_arguments():
  assert S.softcap(np.float32(30.0)).name == "softcap(30.0)"
  assert S.softcap(jnp.float32(30.0)).name == "softcap(30.0)"
  with pytest.raises(TypeError, match="softcap cap must be a positive finite number"):
    S.softcap(True)
  with pytest.raises(TypeError, match="relative_bias max_distance must be an int, got 4.9"):
    S.relative_bias(jnp.zeros((2, 9)), 4.9)
  with pytest.raises(TypeError, match="relative_bias max_distance must be an int"):
    S.relative_bias(jnp.zeros((2, 9)), jnp.float32(4.0))
  for md in (4, np.int64(4), jnp.int32(4)):       # integer scalars of any kind
    assert S.relative_bias(jnp.zeros((2, 9)), md).name == "relative_bias(clipped)"
  with pytest.raises(TypeError, match="alibi_slopes num_heads must be an int, got 6.5"):
    S.alibi_slopes(6.5)
  with pytest.raises(ValueError, match="alibi_slopes num_heads must be >= 1"):
    S.alibi_slopes(0)


def test_user_score_mod_signature_and_output_shape():
  q, k, v = _qkv()
  with pytest.raises(TypeError, match=r"score_mod '<lambda>' must take five arguments .*"
                                      r"\(s, b, h\)"):
    aj.attention(q, k, v, score_mod=lambda s, b, h: s)
  with pytest.raises(ValueError, match=r"must return the score's shape \[2, 4, 8, 8\] .*got "
                                       r"\[2, 4, 8, 3\]"):
    aj.attention(q, k, v, score_mod=lambda s, b, h, i, j: s[..., :3], impl="xla")
  # A result that broadcasts (here a constant: uniform attention) is broadcast.
  for impl in ("xla", "chunked"):
    out = aj.attention(q, k, v, score_mod=lambda s, b, h, i, j: jnp.float32(0.0), impl=impl)
    want = jnp.repeat(jnp.mean(v, axis=1, keepdims=True), 2, axis=2)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(want, out.shape), rtol=1e-5,
                               atol=1e-6)
  # The callable's own signature counts, not that of a function it wraps.
  def bind_scale(f):
    @functools.wraps(f)
    def wrapper(s, b, h, i, j):
      return f(s, b, h, i, j, 0.5)
    return wrapper

  @bind_scale
  def scaled(s, b, h, i, j, factor):
    return s * factor

  np.testing.assert_allclose(
      np.asarray(aj.attention(q, k, v, score_mod=scaled)),
      np.asarray(aj.attention(q, k, v, scale=0.5 / np.sqrt(8), impl="reference")),
      rtol=1e-5, atol=1e-6)
  # Lists and chain() may mix ScoreMods and plain functions.
  assert S.chain(S.softcap(5.0), lambda s, b, h, i, j: s).name == "chain(softcap(5.0), <lambda>)"
  out = aj.attention(q, k, v, score_mod=[S.softcap(5.0), lambda s, b, h, i, j: s * 0.5])
  want = aj.attention(q, k, v, score_mod=lambda s, b, h, i, j: 2.5 * jnp.tanh(s / 5.0),
                      impl="reference")
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)
