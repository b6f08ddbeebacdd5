"""StridedHeadsAttention (S2-Attention) against a dense per-head mask built from the DKernel
formula."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.layers.strided import StridedHeadsAttention
from layers_reference import (build, check_incremental, close, dense, f64, param, rand, rel_err,
                              rope_complex, sdpa)

C = 16
CALL = nnx.jit(lambda m, x: m(x))


def s2_allowed(T, H, Hkv, stride, local, block, offset, group_patterns, dense_heads, causal):
  """allowed[h, i, j]: head h keeps key block kb = j // block iff
  (kb + p * step + offset) % stride == 0 (p = pattern index, step = max(1, stride // #patterns))
  or |i - j| <= local; the last `dense_heads` heads see everything; plus j <= i if causal."""
  n_pat = Hkv if group_patterns else H
  step = max(1, stride // n_pat)
  i = np.arange(T)[:, None]
  j = np.arange(T)[None, :]
  out = np.zeros((H, T, T), bool)
  for h in range(H):
    if h >= H - dense_heads:
      vis = np.ones((T, T), bool)
    else:
      p = h // (H // Hkv) if group_patterns else h
      vis = (((j // block) + p * step + offset) % stride == 0) | (np.abs(i - j) <= local)
    out[h] = vis & (j <= i) if causal else vis
  return out


def ref_s2(m, x, allowed):
  T = x.shape[1]
  q, k, v = dense(x, m.query.kernel), dense(x, m.key.kernel), dense(x, m.value.kernel)
  if m.rope_theta is not None:
    q, k = rope_complex(q, np.arange(T), m.rope_theta), rope_complex(k, np.arange(T),
                                                                     m.rope_theta)
  y = sdpa(q, k, v, allowed[None])
  return np.tensordot(y, param(m.out.kernel), axes=[[2, 3], [0, 1]])


CASES = {
    "tokens_stride4": dict(num_heads=4, stride=4, local_window=2),
    "gqa_group_patterns_blocks": dict(num_heads=4, num_kv_heads=2, stride=2, local_window=1,
                                      block=3, offset=1, rope_theta=100.0),
    "per_head_patterns_dense_head": dict(num_heads=4, num_kv_heads=2, stride=3,
                                         kv_group_patterns=False, num_dense_heads=1),
    "noncausal": dict(num_heads=4, stride=2, local_window=1, causal=False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_dense_reference(name):
  cfg = CASES[name]
  m = build(StridedHeadsAttention, in_features=C, **cfg)
  T = 13
  x = rand(1, (2, T, C))
  H = cfg["num_heads"]
  allowed = s2_allowed(T, H, cfg.get("num_kv_heads", H), cfg["stride"],
                       cfg.get("local_window", 0), cfg.get("block", 1), cfg.get("offset", 0),
                       cfg.get("kv_group_patterns", True), cfg.get("num_dense_heads", 0),
                       cfg.get("causal", True))
  # heads really differ, and together they cover the whole (causal) context
  assert len({a.tobytes() for a in allowed}) > 1
  causal = np.tril(np.ones((T, T), bool)) if cfg.get("causal", True) else np.ones((T, T), bool)
  np.testing.assert_array_equal(allowed.any(0), causal)
  close(CALL(m, x), ref_s2(m, x, allowed))


def test_bfloat16():
  cfg = dict(num_heads=4, stride=4, local_window=1)
  m32 = build(StridedHeadsAttention, in_features=C, **cfg)
  mbf = build(StridedHeadsAttention, in_features=C, dtype="bfloat16", **cfg)
  nnx.update(mbf, nnx.state(m32, nnx.Param))
  x = rand(2, (2, 12, C))
  out = CALL(mbf, x)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, ref_s2(m32, x, s2_allowed(12, 4, 4, 4, 1, 1, 0, True, 0, True))) < 3e-2


def test_incremental_decoding_and_prefix_property():
  m = build(StridedHeadsAttention, in_features=C, num_heads=4, num_kv_heads=2, stride=2,
            local_window=2, rope_theta=100.0)
  x = rand(3, (2, 11, C))
  full = f64(CALL(m, x))
  close(CALL(m, x[:, :5]), full[:, :5])
  check_incremental(m, x, prompt_lens=[3, 1], steps=[1, 3, 1], full=full)


def test_jit_and_grad():
  m = build(StridedHeadsAttention, in_features=C, num_heads=4, stride=4, local_window=1)
  grads = nnx.jit(nnx.grad(lambda m, x: jnp.mean(m(x) ** 2)))(m, rand(4, (1, 9, C)))
  for name in ("query", "key", "value", "out"):
    g = grads[name]["kernel"][...]
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0, name


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=2, stride=4), "stride=4 needs num_heads >= stride"),
    (dict(num_heads=4, num_kv_heads=2, stride=4), "cover only 2 of the 4 key residues"),
    (dict(num_heads=4, stride=0), "stride must be >= 1"),
    (dict(num_heads=4, stride=2, num_dense_heads=5), "num_dense_heads=5"),
    (dict(num_heads=4, stride=2, num_kv_heads=3), "num_heads=4 must be divisible by "
     "num_kv_heads=3"),
])
def test_bad_configuration_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    StridedHeadsAttention(in_features=C, rngs=nnx.Rngs(0), **kwargs)
