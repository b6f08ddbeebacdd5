"""MixtureOfHeadsAttention (MoH, Jin et al. 2024) against the paper's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.layers.mha import MultiHeadAttention
from attnjax.layers.moh import MixtureOfHeadsAttention, load_balance_loss
from layers_reference import (build, check_incremental, close, dense, f64, param, pos_mask,
                              rand, rel_err, rope_complex, sdpa, softmax)

C = 16
CALL = nnx.jit(lambda m, x: m(x))
GATES = nnx.jit(lambda m, x: m.gates(x)[0])


def ref_gates(m, x):
  """MoH routing (SkyworkAI/MoH): shared g_s = h_s softmax(W_s x); routed: top-k of
  p = softmax(W_r x), renormalized to sum k; mixed by [a1, a2] = 2 softmax(W_h x)."""
  hs, hr, k = m.num_shared_heads, m.num_routed_heads, m.top_k
  p, mask = None, None
  if hs:
    g_s = hs * softmax(dense(x, m.router_shared.kernel))
  if hr:
    p = softmax(dense(x, m.router_routed.kernel))
    order = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    mask = np.zeros_like(p)
    np.put_along_axis(mask, order, 1.0, axis=-1)
    g_r = k * p * mask / np.sum(p * mask, axis=-1, keepdims=True)
  if hs and hr:
    a = 2 * softmax(dense(x, m.router_mix.kernel))
    gates = np.concatenate([a[..., :1] * g_s, a[..., 1:] * g_r], axis=-1)
  else:
    gates = g_s if hs else g_r
  return gates, p, mask


def ref_moh(m, x):
  B, T, _ = x.shape
  pos = np.arange(T)
  q, k, v = dense(x, m.query.kernel), dense(x, m.key.kernel), dense(x, m.value.kernel)
  if m.rope_theta is not None:
    q, k = rope_complex(q, pos, m.rope_theta), rope_complex(k, pos, m.rope_theta)
  allowed = pos_mask(pos, pos, (lambda i, j: j <= i) if m.causal else
                     (lambda i, j: np.ones(np.broadcast_shapes(i.shape, j.shape), bool)))
  heads = sdpa(q, k, v, allowed)                                   # [B, T, H, Dv]
  gates, p, mask = ref_gates(m, x)
  out = np.tensordot(heads * gates[..., None], param(m.out.kernel), axes=[[2, 3], [0, 1]])
  hr = m.num_routed_heads
  aux = hr * hr * np.mean(p.reshape(-1, hr).mean(0) * mask.reshape(-1, hr).mean(0)) if hr else 0
  return out, aux, gates


@pytest.mark.parametrize("cfg", [
    dict(num_heads=4, num_shared_heads=1, top_k=2, causal=True, num_kv_heads=2,
         rope_theta=100.0),
    dict(num_heads=4, num_shared_heads=0, top_k=1, causal=False),
    dict(num_heads=4, num_shared_heads=4, top_k=0, causal=True),
], ids=["shared1_top2of3_gqa", "routed_only_top1", "shared_only"])
def test_matches_reference(cfg):
  m = build(MixtureOfHeadsAttention, in_features=C, **cfg)
  x = rand(1, (2, 9, C))
  out, aux = CALL(m, x)
  want, want_aux, gates = ref_moh(m, x)
  close(out, want)
  np.testing.assert_allclose(float(aux), want_aux, rtol=1e-5, atol=1e-7)
  g = GATES(m, x)
  close(g, gates, 1e-5)
  hs, hr = m.num_shared_heads, m.num_routed_heads
  if hs and hr:  # gate sums: shared part = a1 * h_s, routed part = a2 * k, a1 + a2 = 2
    a1 = f64(g[..., :hs]).sum(-1) / hs
    a2 = f64(g[..., hs:]).sum(-1) / m.top_k
    np.testing.assert_allclose(a1 + a2, 2.0, rtol=1e-5)
    assert int(((f64(g[..., hs:]) > 0).sum(-1) == m.top_k).all())


def test_all_heads_selected_with_equal_weights_is_mha():
  cfg = dict(num_heads=4, num_kv_heads=2, causal=True, rope_theta=100.0)
  moh = build(MixtureOfHeadsAttention, in_features=C, num_shared_heads=1, top_k=3, **cfg)
  for r in (moh.router_shared, moh.router_routed, moh.router_mix):  # uniform routers
    r.kernel[...] = jnp.zeros_like(r.kernel[...])
  mha = build(MultiHeadAttention, in_features=C, seed=7, **cfg)
  for name in ("query", "key", "value", "out"):
    getattr(mha, name).kernel[...] = getattr(moh, name).kernel[...]
  x = rand(2, (2, 10, C))
  out, _ = CALL(moh, x)
  g = GATES(moh, x)
  close(g, np.ones(g.shape), 1e-6)
  close(out, f64(CALL(mha, x)), 1e-5)


def test_load_balance_loss_by_hand():
  p = jnp.asarray([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
  m = jnp.asarray([[1.0, 0, 0], [0, 1.0, 0]])
  # P = [0.3, 0.45, 0.25], f = [0.5, 0.5, 0]: 9 * mean(P f) = 9 * 0.375 / 3
  np.testing.assert_allclose(float(load_balance_loss(p, m)), 1.125, rtol=1e-6)
  # a token mask drops the second token: P = p[0], f = m[0] -> 9 * 0.5 / 3
  np.testing.assert_allclose(float(load_balance_loss(p, m, jnp.asarray([1, 0]))), 1.5,
                             rtol=1e-6)


def test_bfloat16():
  cfg = dict(num_heads=4, num_shared_heads=2, top_k=1, causal=True)
  m32 = build(MixtureOfHeadsAttention, in_features=C, **cfg)
  mbf = build(MixtureOfHeadsAttention, in_features=C, dtype="bfloat16", **cfg)
  nnx.update(mbf, nnx.state(m32, nnx.Param))
  x = rand(3, (2, 8, C))
  out, aux = CALL(mbf, x)
  assert out.dtype == jnp.bfloat16 and aux.dtype == jnp.float32
  want, want_aux, _ = ref_moh(m32, x)
  assert rel_err(out, want) < 3e-2
  np.testing.assert_allclose(float(aux), want_aux, rtol=1e-5)  # routers run in float32


def test_incremental_decoding_and_prefix_property():
  m = build(MixtureOfHeadsAttention, in_features=C, num_heads=4, num_shared_heads=1, top_k=2,
            causal=True, rope_theta=100.0)
  x = rand(4, (2, 10, C))
  full = f64(CALL(m, x)[0])
  close(CALL(m, x[:, :4])[0], full[:, :4])
  check_incremental(m, x, prompt_lens=[3, 2], steps=[1, 3, 1], full=full)


def test_noncausal_cross_attention_with_tq_ne_tk():
  m = build(MixtureOfHeadsAttention, 4, C, num_shared_heads=1, top_k=2, in_kv_features=8)
  out, aux = nnx.jit(lambda m, x, mem: m(x, mem))(m, rand(6, (2, 5, C)), rand(7, (2, 9, 8)))
  assert out.shape == (2, 5, C) and bool(jnp.all(jnp.isfinite(out))) and float(aux) > 0


def test_jit_and_grad_reach_routers():
  m = build(MixtureOfHeadsAttention, in_features=C, num_heads=4, num_shared_heads=2, top_k=1,
            causal=True)
  x = rand(5, (2, 6, C))

  def loss(m, x):
    out, aux = m(x)
    return jnp.mean(out ** 2) + 0.01 * aux

  grads = nnx.jit(nnx.grad(loss))(m, x)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  for name in ("router_shared", "router_routed", "router_mix", "query"):
    assert float(jnp.abs(grads[name]["kernel"][...]).sum()) > 0, name


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_shared_heads=5, top_k=1), "num_shared_heads=5 must be <= num_heads=4"),
    (dict(num_shared_heads=1, top_k=4), "top_k=4 must be <= the number of routed heads"),
    (dict(num_shared_heads=1, top_k=0), "top_k must be >= 1"),
    (dict(num_shared_heads=1, top_k=1, num_kv_heads=3), "num_kv_heads=3"),
])
def test_bad_configuration_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MixtureOfHeadsAttention(4, C, rngs=nnx.Rngs(0), **kwargs)
