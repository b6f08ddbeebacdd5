"""MultiHeadAttention (MHA/GQA/MQA, RoPE, QK-norm, gated attention, sinks, windows, cross
attention, KV-cache decoding) against a plain re-implementation of the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from attnjax import masks, scores
from attnjax.layers import common
from attnjax.layers.mha import MultiHeadAttention, sliding_window_attention
from layers_reference import (build, check_incremental, close, dense, f64, param, pos_mask,
                              rand, rel_err, rms, rope_complex, sdpa, sigmoid)

C = 16
CALL = nnx.jit(lambda m, x: m(x))
CALL_KV = nnx.jit(lambda m, x, kv: m(x, kv))


def ref_forward(m, x, mem=None, *, qpos=None, kpos=None, extra=None, sinks=None,
                logit_fn=None, segment_ids=None, bias=None):
  """Multi-head attention from the formulas with the layer's weights (Vaswani et al. 2017; GQA;
  RoPE; QK-norm; output gate G1 of Qiu et al. 2025: y * sigmoid(x W_g) before W_o)."""
  B, T, _ = x.shape
  qpos = np.arange(T) if qpos is None else np.asarray(qpos)
  src = x if mem is None else mem
  if kpos is None:
    kpos = qpos if mem is None else np.arange(mem.shape[1])
  q = dense(x, m.query.kernel, m.query.bias)
  k = dense(src, m.key.kernel, m.key.bias)
  v = dense(src, m.value.kernel, m.value.bias)
  if m.qk_norm:
    q, k = rms(q, param(m.q_norm.scale)), rms(k, param(m.k_norm.scale))
  if m.rope_theta is not None:
    q, k = rope_complex(q, qpos, m.rope_theta), rope_complex(k, kpos, m.rope_theta)
  if m.window is not None:
    W = m.window
    fn = (lambda i, j: (j <= i) & (j > i - W)) if m.causal else (lambda i, j: abs(i - j) < W)
  elif m.causal:
    fn = lambda i, j: j <= i
  else:
    fn = lambda i, j: np.ones(np.broadcast_shapes(i.shape, j.shape), bool)
  allowed = pos_mask(qpos, kpos, fn)
  if extra is not None:
    allowed = allowed & pos_mask(qpos, kpos, extra)
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
  if bias is not None:
    logit_fn = lambda s: s + f64(bias)
  if m.sinks is not None:
    sinks = param(m.sinks)
  y = sdpa(q, k, v, allowed, sinks=sinks, logit_fn=logit_fn)
  if m.gate is not None:
    g = sigmoid(dense(x, m.gate_proj.kernel, m.gate_proj.bias))
    y = y * (g[..., None] if m.gate == "headwise" else g)
  out = np.tensordot(y, param(m.out.kernel), axes=[[2, 3], [0, 1]])
  return out + param(m.out.bias) if m.out.bias is not None else out


CONFIGS = {
    "gqa_rope_qknorm_bias": dict(num_heads=4, num_kv_heads=2, causal=True, rope_theta=100.0,
                                 qk_norm=True, use_bias=True, out_bias=True),
    "mqa_gate_headwise": dict(num_heads=4, num_kv_heads=1, causal=True, gate="headwise"),
    "gate_elementwise_sinks_dv": dict(num_heads=2, head_dim=6, v_head_dim=5, causal=True,
                                      gate="elementwise", sinks=True),
    "window_causal": dict(num_heads=4, num_kv_heads=2, causal=True, window=4, rope_theta=50.0),
    "window_noncausal": dict(num_heads=2, causal=False, window=3),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_reference_float32(name):
  m = build(MultiHeadAttention, in_features=C, **CONFIGS[name])
  x = rand(1, (2, 11, C))
  close(CALL(m, x), ref_forward(m, x))


@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_matches_reference(causal):
  m = build(MultiHeadAttention, 4, C, num_kv_heads=2, in_kv_features=12, causal=causal,
            rope_theta=100.0, gate="headwise")
  x, mem = rand(2, (2, 7, C)), rand(3, (2, 10, 12))  # Tq != Tk
  got = CALL_KV(m, x, mem)
  close(got, ref_forward(m, x, mem))
  # the projected memory (what decoding reuses) gives the same result
  close(CALL_KV(m, x, m.project_memory(mem)), f64(got), 1e-6)


def test_bfloat16_compute():
  cfg = dict(num_heads=4, num_kv_heads=2, causal=True, rope_theta=100.0, qk_norm=True,
             gate="elementwise")
  m32 = build(MultiHeadAttention, in_features=C, **cfg)
  mbf = build(MultiHeadAttention, in_features=C, dtype="bfloat16", **cfg)
  nnx.update(mbf, nnx.state(m32, nnx.Param))
  x = rand(4, (2, 12, C))
  out = CALL(mbf, x)
  assert out.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(mbf, nnx.Param)))
  assert rel_err(out, ref_forward(m32, x)) < 2e-2
  # bfloat16 decoding (bfloat16 cache) follows the bfloat16 parallel forward
  cache = check_incremental(mbf, x, prompt_lens=[7, 4], steps=[1], tol=6e-2, full=out)
  assert cache.k.dtype == jnp.bfloat16


def test_positions_call_time_mask_score_mod_sinks_segments_bias():
  m = build(MultiHeadAttention, 4, C, causal=True, rope_theta=100.0)
  x = rand(5, (2, 9, C))
  pos = jnp.asarray(np.stack([np.arange(9) + 3, np.arange(9) * 2]), jnp.int32)
  sinks = rand(7, (4,))
  seg = jnp.asarray([[0] * 5 + [1] * 4, [0] * 2 + [1] * 7], jnp.int32)
  bias = rand(8, (1, 4, 9, 9))
  f = nnx.jit(lambda m, x, pos, sinks, seg, bias: (
      m(x, positions=pos, mask=masks.chunked(4), score_mod=scores.softcap(2.0)),
      m(x, sinks=sinks, segment_ids=seg),
      m(x, bias=bias)))
  a, b, c = f(m, x, pos, sinks, seg, bias)
  close(a, ref_forward(m, x, qpos=pos, extra=lambda i, j: (i // 4) == (j // 4),
                       logit_fn=lambda s: 2.0 * np.tanh(s / 2.0)))
  close(b, ref_forward(m, x, sinks=sinks, segment_ids=seg))
  close(c, ref_forward(m, x, bias=bias))
  with pytest.raises(ValueError, match="sinks"):
    build(MultiHeadAttention, 2, C, sinks=True)(x, sinks=sinks[:2])


def test_causal_prefix_property_self_and_cross():
  """CAB conformance: the output at position i does not change when later tokens are removed
  (causal self attention, and causal cross attention over a fixed memory)."""
  m = build(MultiHeadAttention, 4, C, num_kv_heads=2, causal=True, rope_theta=100.0,
            gate="headwise")
  x, mem = rand(9, (2, 12, C)), rand(10, (2, 12, C))
  f = nnx.jit(lambda m, x, mem: (m(x), m(x, mem)))
  full_self, full_cross = f(m, x, mem)
  for t in (1, 7):
    s, c = f(m, x[:, :t], mem)
    close(s, f64(full_self[:, :t]))
    close(c, f64(full_cross[:, :t]))


def test_noncausal_cross_runs_with_tq_ne_tk():
  m = build(MultiHeadAttention, 4, C, in_kv_features=8, causal=False)
  out = CALL_KV(m, rand(11, (2, 5, C)), rand(12, (2, 13, 8)))
  assert out.shape == (2, 5, C) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("cfg", [
    dict(num_heads=4, num_kv_heads=2, causal=True, rope_theta=100.0, qk_norm=True,
         gate="headwise", sinks=True),
    dict(num_heads=4, num_kv_heads=1, causal=True, window=3, rope_theta=100.0),
], ids=["gqa_rope_gate_sinks", "mqa_window_ring"])
def test_incremental_decoding_matches_parallel(cfg):
  """Ragged prefill + decode steps (per-example cache lengths) == parallel forward; the
  sliding-window layer decodes through a ring buffer of `window` slots."""
  m = build(MultiHeadAttention, in_features=C, **cfg)
  x = rand(13, (2, 12, C))
  cache = check_incremental(m, x, prompt_lens=[4, 2], steps=[1, 4, 1, 4])
  if m.window is not None:
    assert cache.capacity == m.window


@pytest.mark.parametrize("window", [None, 3])
def test_incremental_decoding_with_chunked_backend(window):
  """Decoding through the chunked backend (small tiles, traced per-example positions, so every
  tile is masked at run time) equals the parallel forward too."""
  from attnjax.backends.chunked import ChunkedBackend
  m = build(MultiHeadAttention, in_features=C, num_heads=4, num_kv_heads=2, causal=True,
            window=window, rope_theta=100.0, sinks=True,
            impl=ChunkedBackend(block_q=4, block_kv=4))
  x = rand(14, (2, 10, C))
  check_incremental(m, x, prompt_lens=[5, 3], steps=[1, 3])


def test_causal_cross_attention_decoding():
  m = build(MultiHeadAttention, 4, C, num_kv_heads=2, causal=True, rope_theta=100.0)
  x, mem = rand(14, (2, 5, C)), rand(15, (2, 9, C))
  full = f64(CALL_KV(m, x, mem))
  kv = m.project_memory(mem)
  step = nnx.jit(lambda m, xt, kv, pos: m(xt, kv, positions=pos))
  for t in range(5):
    close(step(m, x[:, t:t + 1], kv, jnp.array([t], jnp.int32)), full[:, t:t + 1])


@pytest.mark.parametrize("impl", ["reference", "xla", "chunked"])
def test_impl_is_passed_through(impl):
  m = build(MultiHeadAttention, 4, C, num_kv_heads=2, causal=True, window=5, impl=impl)
  x = rand(16, (1, 10, C))
  close(CALL(m, x), ref_forward(m, x))


def test_jit_and_grad():
  m = build(MultiHeadAttention, 4, C, num_kv_heads=2, causal=True, rope_theta=100.0,
            qk_norm=True, gate="elementwise", sinks=True)
  x = rand(17, (1, 6, C))

  def loss(m, x):
    return jnp.mean(m(x) ** 2)

  grads, gx = nnx.jit(lambda m, x: (nnx.grad(loss)(m, x), jax.grad(lambda x: loss(m, x))(x)))(
      m, x)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  for name in ("query", "key", "value", "out", "gate_proj"):
    assert float(jnp.abs(grads[name]["kernel"][...]).sum()) > 0, name
  assert float(jnp.abs(grads["sinks"][...]).sum()) > 0
  # the input gradient agrees with central differences of the float64 reference
  ref = lambda xx: np.mean(ref_forward(m, xx) ** 2)
  x0, eps = f64(x), 1e-5
  fd = np.zeros_like(x0)
  for idx in np.ndindex(*x0.shape):
    d = np.zeros_like(x0)
    d[idx] = eps
    fd[idx] = (ref(x0 + d) - ref(x0 - d)) / (2 * eps)
  np.testing.assert_allclose(f64(gx), fd, atol=1e-5 * np.abs(fd).max())


def test_sharding_annotations_put_heads_on_tensor_axis():
  m = build(MultiHeadAttention, 4, C, num_kv_heads=2, gate="headwise", sinks=True)
  spec = nnx.get_partition_spec(nnx.state(m, nnx.Param))
  assert tuple(spec["query"]["kernel"].get_value()) == (None, "tensor", None)
  assert tuple(spec["key"]["kernel"].get_value()) == (None, "tensor", None)
  assert tuple(spec["out"]["kernel"].get_value()) == ("tensor", None, None)
  assert tuple(spec["sinks"].get_value()) == ("tensor",)
  mqa = build(MultiHeadAttention, 4, C, num_kv_heads=1)  # one KV head is replicated
  spec = nnx.get_partition_spec(nnx.state(mqa, nnx.Param))
  assert tuple(spec["key"]["kernel"].get_value()) == (None, None, None)


def test_linen_bridge():
  """The layer inside a Linen model via flax.nnx.bridge (with its default initializers)."""
  cfg = dict(num_heads=4, num_kv_heads=2, causal=True, rope_theta=100.0, gate="headwise")

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x + nnx.bridge.to_linen(MultiHeadAttention, in_features=C, name="attn", **cfg)(x)

  x = rand(19, (2, 8, C))
  variables = jax.jit(Block().init)(jax.random.key(0), x)
  y = jax.jit(Block().apply)(variables, x)
  assert nn.get_partition_spec(variables)["params"]["attn"]["query"]["kernel"] == \
      jax.sharding.PartitionSpec(None, "tensor", None)
  m = build(MultiHeadAttention, in_features=C, **cfg)
  nnx.update(m, nn.meta.unbox(variables["params"]["attn"]))
  close(y, f64(x) + ref_forward(m, x))


def test_sliding_window_helper():
  m = build(sliding_window_attention, 2, C, 3)
  assert isinstance(m, MultiHeadAttention) and m.causal and m.window == 3
  assert m.init_cache(1, 10).capacity == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=3, in_features=16), "in_features=16 must be divisible by num_heads=3"),
    (dict(num_heads=4, in_features=16, num_kv_heads=3), "num_heads=4 must be divisible by "
     "num_kv_heads=3"),
    (dict(num_heads=4, in_features=16, num_kv_heads=8), "num_kv_heads=8"),
    (dict(num_heads=4, in_features=16, gate="sigmoid"), "gate='sigmoid'.*'headwise'"),
    (dict(num_heads=4, in_features=16, dtype="int8"), "dtype"),
    (dict(num_heads=4, in_features=16, window=0), "window"),
    (dict(num_heads=4, in_features=16, head_dim=3, rope_theta=1e4), "even head_dim"),
    (dict(num_heads=4, in_features=16, mask="causal"), "mask"),
    (dict(num_heads=4, in_features=16, impl=3), "impl"),
])
def test_bad_configuration_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MultiHeadAttention(rngs=nnx.Rngs(0), **kwargs)


def test_decode_requires_causal():
  m = build(MultiHeadAttention, 2, C, causal=False)
  with pytest.raises(ValueError, match="causal"):
    m.init_cache(1, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(v_head_dim=0), "v_head_dim must be >= 1, got 0"),
    (dict(out_features=0), "out_features must be >= 1, got 0"),
    (dict(in_kv_features=0), "in_kv_features must be >= 1, got 0"),
    (dict(v_head_dim=-2), "v_head_dim must be >= 1, got -2"),
])
def test_zero_or_negative_sizes_are_rejected_not_defaulted(kwargs, match):
  """Only ``None`` means "default"; 0 used to be replaced by the default silently."""
  with pytest.raises(ValueError, match=match):
    MultiHeadAttention(2, C, rngs=nnx.Rngs(0), **kwargs)
  m = MultiHeadAttention(2, C, v_head_dim=None, out_features=None, in_kv_features=None,
                         rngs=nnx.Rngs(0))
  assert (m.v_head_dim, m.out_features, m.in_kv_features) == (m.head_dim, C, C)


def test_decode_rejects_more_new_tokens_than_the_cache_holds():
  """Without a window, a call with T > capacity used to return wrong outputs for every token
  (only the last `capacity` tokens were written, attention read the cache alone). T is a
  shape, so the error comes under jit too. Eager calls also report an overflow across calls.
  A ring buffer (window) takes chunks longer than itself and stays exact."""
  m = build(MultiHeadAttention, 2, C, causal=True, rope_theta=100.0)
  x = rand(40, (1, 6, C))
  with pytest.raises(ValueError, match="6 new tokens do not fit the KV cache: it holds 4"):
    m.decode(x, m.init_cache(1, max_length=4))
  with pytest.raises(ValueError, match="6 new tokens do not fit"):
    nnx.jit(lambda m, x, c: m.decode(x, c))(m, x, m.init_cache(1, max_length=4))
  _, cache = m.decode(x[:, :3], m.init_cache(1, max_length=4))
  with pytest.raises(ValueError, match=r"overflows: cache length \[3\] \+ num_new \[2\]"):
    m.decode(x[:, 3:5], cache)
  # exactly filling the cache is fine and equals the parallel forward
  out, cache = m.decode(x[:, 3:4], cache)
  close(out, ref_forward(m, x[:, :4])[:, 3:4])
  # a ragged prefill padded past the cache is fine while its real tokens fit (padding is not
  # written), eager and jitted; too many real tokens still raise eagerly
  x2 = rand(42, (2, 6, C))
  for decode in (lambda m, x, c, n: m.decode(x, c, num_new=n),
                 nnx.jit(lambda m, x, c, n: m.decode(x, c, num_new=n))):
    out, cache = decode(m, x2, m.init_cache(2, max_length=4), jnp.asarray([4, 3]))
    np.testing.assert_array_equal(np.asarray(cache.length), [4, 3])
    close(out[0, :4], ref_forward(m, x2[:1, :4])[0])
    close(out[1, :3], ref_forward(m, x2[1:, :3])[0])
  with pytest.raises(ValueError, match=r"overflows: cache length \[0, 0\] \+ num_new \[5, 3\]"):
    m.decode(x2, m.init_cache(2, max_length=4), num_new=jnp.asarray([5, 3]))
  # ring buffer: a 7-token prefill into 3 slots, then steps, equal the parallel forward
  w = build(MultiHeadAttention, 2, C, num_kv_heads=1, causal=True, window=3, rope_theta=100.0)
  xw = rand(41, (2, 9, C))
  want = ref_forward(w, xw)
  cache = w.init_cache(2, max_length=16)
  assert cache.capacity == 3
  out, cache = w.decode(xw[:, :7], cache)
  close(out, want[:, :7])
  for t in (7, 8):
    out, cache = w.decode(xw[:, t:t + 1], cache)
    close(out, want[:, t:t + 1])


def test_decode_num_new_must_lie_in_0_T():
  """num_new outside [0, T] used to be accepted: cache.length then disagreed with what was
  written and every later step was off. Concrete values raise; under jit they are clipped to
  [0, T] (documented), so num_new=6 for 4 tokens acts as 4."""
  m = build(MultiHeadAttention, 2, C, causal=True, rope_theta=100.0)
  x = rand(42, (1, 6, C))
  want = ref_forward(m, x)
  for bad in ([6], [-2]):
    with pytest.raises(ValueError, match=r"num_new=\[%s\] must lie in \[0, T\] with T=4"
                       % bad[0]):
      m.decode(x[:, :4], m.init_cache(1, 16), num_new=jnp.asarray(bad))
  with pytest.raises(ValueError, match="num_new must be an integer array"):
    m.decode(x[:, :4], m.init_cache(1, 16), num_new=jnp.asarray([2.5]))
  step = nnx.jit(lambda m, x, c, n: m.decode(x, c, num_new=n))
  out, cache = step(m, x[:, :4], m.init_cache(1, 16), jnp.asarray([6]))
  np.testing.assert_array_equal(np.asarray(cache.length), [4])
  close(out, want[:, :4])
  out, cache = step(m, x[:, 4:6], cache, jnp.asarray([-3]))   # clipped to 0: nothing written
  np.testing.assert_array_equal(np.asarray(cache.length), [4])
  out, cache = step(m, x[:, 4:5], cache, jnp.asarray([1]))
  close(out, want[:, 4:5])


def test_decode_rejects_a_cache_of_the_wrong_shape():
  """A cache for another batch size / KV-head count / head dim used to fail with a low-level
  broadcasting error; the error now names the cache's shapes and the expected ones."""
  m = build(MultiHeadAttention, 2, C, causal=True)
  x = rand(43, (2, 5, C))
  other = build(MultiHeadAttention, 2, C, num_kv_heads=1, causal=True)
  dv = build(MultiHeadAttention, 2, C, v_head_dim=4, causal=True)
  for cache, shown in ((m.init_cache(3, 8), r"k \[3, 8, 2, 8\]"),
                       (other.init_cache(2, 8), r"k \[2, 8, 1, 8\]"),
                       (dv.init_cache(2, 8), r"v \[2, 8, 2, 4\]")):
    with pytest.raises(ValueError, match=r"MultiHeadAttention.decode: the cache does not fit"
                       r".*" + shown + r".*expected k \[2, S, 2, 8\], v \[2, S, 2, 8\]"
                       r".*init_cache\(batch_size=2"):
      m.decode(x, cache)


def _bias_logits(tab, sl, max_distance):
  """float64 logit_fn of relative_bias(tab, max_distance) (clipped) chained with alibi(sl)."""
  tab, sl = f64(tab), f64(sl)

  def logit_fn(s):   # s [B, H, Tq, Tk]
    i, j = np.arange(s.shape[2])[:, None], np.arange(s.shape[3])[None, :]
    bucket = np.clip(j - i, -max_distance, max_distance) + max_distance
    return s + tab[:, bucket][None] + sl[None, :, None, None] * (j - i)[None, None]
  return logit_fn


def _ref_grads_by_central_differences(m, x, w, table, slopes, max_distance, eps=1e-4):
  """d loss / d (table, slopes) of the float64 reference, loss = sum(w * out)."""
  loss = lambda tab, sl: float(np.sum(f64(w) * ref_forward(
      m, x, logit_fn=_bias_logits(tab, sl, max_distance))))
  tab0, sl0 = f64(table), f64(slopes)
  grads = []
  for which, arr in enumerate((tab0, sl0)):
    g = np.zeros_like(arr)
    for idx in np.ndindex(*arr.shape):
      d = np.zeros_like(arr)
      d[idx] = eps
      plus = [tab0, sl0]
      minus = [tab0, sl0]
      plus[which], minus[which] = arr + d, arr - d
      g[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
    grads.append(g)
  return grads


def test_constructor_score_mod_params_are_trained():
  """The constructor's score-mod arrays used to be stored as plain arrays, silently frozen
  under nnx.grad / nnx.Optimizer(wrt=nnx.Param). They are nnx.Param now: the gradients equal
  jax.grad of attnjax.attention with the same mod (and float64 central differences), an
  optimizer step changes them; score_mod_trainable=False keeps them constant."""
  import optax
  import attnjax
  md = 3
  mod = scores.chain(scores.relative_bias(rand(44, (2, 2 * md + 1)), md),
                     scores.alibi(jnp.asarray([0.3, -0.2], jnp.float32)))
  m = build(MultiHeadAttention, 2, C, causal=True, score_mod=mod)   # every Param randomized
  params = [v[...] for v in m.stored_score_mod.leaves]
  assert [type(v) for v in m.stored_score_mod.leaves] == [nnx.Param, nnx.Param]
  table, slopes = params
  assert table.shape == (2, 2 * md + 1) and slopes.shape == (2,)
  x, w = rand(45, (2, 7, C)), rand(46, (2, 7, C))
  close(CALL(m, x), ref_forward(m, x, logit_fn=_bias_logits(table, slopes, md)))
  loss = lambda m: jnp.sum(w * m(x))
  grads = nnx.jit(nnx.grad(loss))(m)
  g_tab, g_sl = (v[...] for v in grads["stored_score_mod"]["leaves"].values())

  def fn_loss(tab, sl):   # the same layer written with attnjax.attention
    q, k, v = (jnp.einsum("btc,chd->bthd", x, p.kernel[...])
               for p in (m.query, m.key, m.value))
    y = attnjax.attention(q, k, v, mask=masks.causal(), score_mod=scores.chain(
        scores.relative_bias(tab, md), scores.alibi(sl)))
    return jnp.sum(w * jnp.einsum("bthd,hdo->bto", y, m.out.kernel[...]))

  want_tab, want_sl = jax.grad(fn_loss, argnums=(0, 1))(table, slopes)
  np.testing.assert_allclose(g_tab, want_tab, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_sl, want_sl, rtol=1e-5, atol=1e-5)
  fd_tab, fd_sl = _ref_grads_by_central_differences(m, x, w, table, slopes, md)
  assert np.abs(fd_tab).max() > 1e-3 and np.abs(fd_sl).max() > 1e-3
  np.testing.assert_allclose(f64(g_tab), fd_tab, atol=2e-4 * np.abs(fd_tab).max())
  np.testing.assert_allclose(f64(g_sl), fd_sl, atol=2e-4 * np.abs(fd_sl).max())
  # an optimizer over nnx.Param updates them
  opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
  opt.update(m, grads)
  np.testing.assert_allclose(np.asarray(m.score_mod.params[0][0]),
                             np.asarray(table) - 0.1 * np.asarray(g_tab), rtol=1e-6, atol=1e-6)
  # fixed score-mod arrays: constants outside nnx.Param, holding the given values
  frozen = MultiHeadAttention(2, C, causal=True, score_mod=mod, score_mod_trainable=False,
                              rngs=nnx.Rngs(1))
  assert [type(v) for v in frozen.stored_score_mod.leaves] == [common.ScoreModConstant] * 2
  close(CALL(frozen, x), ref_forward(frozen, x, logit_fn=_bias_logits(*mod.params[0],
                                                                      *mod.params[1], md)))
  keys = ["/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.grad(loss)(frozen))]
  assert keys and not any(k.startswith("stored_score_mod") for k in keys)


def test_constructor_score_mod_chaining_a_user_function():
  """A chain holding a plain function (a lazily bound chain) is accepted by the constructor:
  its built-in members' arrays become parameters, the function's captured arrays stay
  constants, and the layer equals the same mod passed at call time (jit and eager)."""
  H, C = 4, 16
  x = jax.random.normal(jax.random.key(0), (2, 6, C))
  bias = jnp.arange(H, dtype=jnp.float32) * 0.3
  sm = scores.chain(scores.alibi(scores.alibi_slopes(H)), lambda s, b, h, q, k: s + bias[h])
  leaves, treedef = jax.tree.flatten(sm)
  assert len(leaves) == 1 and jax.tree.unflatten(treedef, leaves).name == sm.name
  layer = MultiHeadAttention(H, C, causal=True, score_mod=sm, rngs=nnx.Rngs(0))
  plain = MultiHeadAttention(H, C, causal=True, rngs=nnx.Rngs(0))
  want = plain(x, score_mod=sm)
  assert not np.allclose(want, plain(x), atol=1e-3)
  np.testing.assert_allclose(layer(x), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), want, rtol=1e-6, atol=1e-6)
  params = nnx.state(layer.stored_score_mod, nnx.Param)
  assert len(jax.tree.leaves(params)) == 1   # the ALiBi slopes
