"""attnjax.models: DecoderLM / ViT over every registered attention, decoding, generation,
build_model errors, training steps and bfloat16. Tiny models; one compiled program per case."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnjax.models import (LM_ATTENTIONS, VIT_ATTENTIONS, DecoderLM, ViT, build_model,
                            generate)
from attnjax.models.registry import AttentionEntry

V, D, T, B = 64, 32, 16, 2
LM_KW = dict(vocab_size=V, d_model=D, num_layers=2, num_heads=4, mlp_dim=64, max_len=32)
LM_EXTRA = {"gqa": dict(num_kv_heads=2),
            "sliding_window": dict(attention_kwargs={"window": 4}),   # ring of 4 < chunks
            "strided_heads": dict(attention_kwargs={"stride": 2, "local_window": 2}),
            "moh": dict(attention_kwargs={"num_shared_heads": 1, "top_k": 2})}
VIT_KW = dict(image_size=16, patch_size=4, in_channels=3, num_classes=10, dim=D, depth=2,
              num_heads=4, mlp_dim=64)
_MODELS = {}


def rngs(seed=0):
  """Parameter init keys. The RBG generator keeps the many small eager init ops cheap to
  compile on CPU (threefry costs several seconds per model here)."""
  return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def lm(name):
  """One model per attention name, shared by the tests (never mutated)."""
  if name not in _MODELS:
    _MODELS[name] = DecoderLM(attention=name, **LM_KW, **LM_EXTRA.get(name, {}),
                              rngs=rngs(0))
  return _MODELS[name]


def tokens(seed, shape=(B, T)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


@nnx.jit
def lm_forward(m, toks):
  return m(toks, return_aux=True)


@nnx.jit
def ragged_decode(m, chunks, num_new):
  """Decode ``chunks [n, B, c]`` one chunk per call (a scan), ``num_new [n, B]`` real tokens
  per example and chunk; returns the logits ``[n, B, c, V]`` and the final cache lengths."""
  def body(cache, xs):
    logits, cache = m.decode(xs[0], cache, num_new=xs[1])
    return cache, logits
  cache, logits = jax.lax.scan(body, m.init_cache(B, T), (chunks, num_new))
  return logits, cache[0].length


# One attention per cache kind for the ragged decode check (and the literal use_cache=False
# comparison): KV cache, ring buffer (chunks longer than the window), latent cache. Greedy
# generation checks every attention's decode path.
RAGGED = ("mha", "sliding_window", "mla")


@pytest.mark.parametrize("name", sorted(LM_ATTENTIONS))
def test_lm_forward_causal_decode_and_greedy_generation(name):
  m = lm(name)
  toks = np.array(tokens(1))
  toks[1, :11] = toks[0, :11]   # same prefix, different tail from position 11 on
  logits, aux = lm_forward(m, jnp.asarray(toks))
  assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
  logits = np.asarray(logits)
  assert np.isfinite(logits).all()
  np.testing.assert_allclose(logits[0, :11], logits[1, :11], atol=1e-5, rtol=1e-5)
  assert np.abs(logits[0, 11:] - logits[1, 11:]).max() > 1e-4
  assert aux.shape == () and aux.dtype == jnp.float32
  assert (float(aux) > 0) == (name == "moh")
  if name in RAGGED:
    # example 0 feeds tokens 0..7 then 8..15; example 1 feeds 0..4 (5 real tokens of a chunk
    # of 8) then 5..10 (6 of 8): each continues at its own cache length
    chunks = np.stack([toks[:, :8], np.stack([toks[0, 8:16], toks[1, 5:13]])])
    num_new = np.array([[8, 5], [8, 6]], np.int32)
    dec, length = ragged_decode(m, jnp.asarray(chunks), jnp.asarray(num_new))
    dec = np.asarray(dec)
    np.testing.assert_array_equal(np.asarray(length), [16, 11])
    tol = dict(atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(dec[0, 0], logits[0, :8], **tol)
    np.testing.assert_allclose(dec[1, 0], logits[0, 8:16], **tol)
    np.testing.assert_allclose(dec[0, 1, :5], logits[1, :5], **tol)
    np.testing.assert_allclose(dec[1, 1, :6], logits[1, 5:11], **tol)
  # greedy generation with the cache == without it. For every attention: each generated token
  # is the argmax of the parallel forward over the final sequence at the previous position
  # (by induction over steps this is exactly what use_cache=False produces, and it reuses the
  # forward compiled above); for RAGGED also literally against generate(use_cache=False).
  prompt = tokens(2, (B, 5))
  out = np.asarray(generate(m, prompt, T - 5))
  assert out.shape == (B, T) and out.dtype == np.int32
  np.testing.assert_array_equal(out[:, :5], prompt)
  forward = np.asarray(lm_forward(m, jnp.asarray(out))[0])
  np.testing.assert_array_equal(out[:, 5:], forward[:, 4:-1].argmax(-1))
  if name in RAGGED:
    np.testing.assert_array_equal(out, generate(m, prompt, T - 5, use_cache=False))


def test_sampling_cache_equivalence_and_top_k():
  m = lm("gqa")
  prompt, rng = tokens(3, (B, 6)), jax.random.key(7, impl="unsafe_rbg")
  kw = dict(rng=rng, temperature=1.5, top_k=3)
  out = generate(m, prompt, 10, **kw)
  np.testing.assert_array_equal(out, generate(m, prompt, 10, use_cache=False, **kw))
  np.testing.assert_array_equal(out, generate(m, prompt, 10, **kw))  # deterministic in rng
  logits = np.asarray(lm_forward(m, out)[0])                       # [B, 16, V]
  top3 = np.argsort(-logits, axis=-1)[:, 5:15, :3]                 # predicts tokens 6..15
  gen = np.asarray(out[:, 6:])
  assert all(gen[b, i] in top3[b, i] for b in range(B) for i in range(10))
  assert not (gen == logits[:, 5:15].argmax(-1)).all()             # it did sample
  with pytest.raises(ValueError, match="rng"):
    generate(m, prompt, 2, temperature=1.0)
  with pytest.raises(ValueError, match="top_k"):
    generate(m, prompt, 2, rng=rng, temperature=1.0, top_k=V + 1)


class _NoCacheAttention(nnx.Module):
  def __init__(self, d, rngs):
    self.inner = LM_ATTENTIONS["mha"].build(d, {}, rngs)

  def __call__(self, x, **kw):
    return self.inner(x, **kw)


def test_init_cache_of_an_attention_without_cache(monkeypatch):
  monkeypatch.setitem(LM_ATTENTIONS, "nocache", AttentionEntry(
      lambda d, user, rngs: _NoCacheAttention(d, rngs), "test"))
  m = DecoderLM(attention="nocache", **LM_KW, rngs=rngs(0))
  with pytest.raises(NotImplementedError, match="'nocache'.*use_cache=False"):
    m.init_cache(B, T)
  with pytest.raises(NotImplementedError, match="nocache"):
    generate(m, tokens(0, (B, 3)), 2)


VIT_CASES = [(name, "cls") for name in sorted(VIT_ATTENTIONS)] + [("neighborhood", "mean")]


@nnx.jit
def vit_fwd(m, x):
  return m(x)


@pytest.mark.parametrize("name,pool", VIT_CASES)
def test_vit_every_attention(name, pool):
  m = ViT(attention=name, pool=pool, **{**VIT_KW, "depth": 1}, rngs=rngs(0))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(B, 16, 16, 3)), jnp.float32)
  out = vit_fwd(m, x)
  assert out.shape == (B, 10) and out.dtype == jnp.float32
  out = np.asarray(out)
  assert np.isfinite(out).all()
  assert np.abs(out[0] - out[1]).max() > 1e-5  # depends on the image
  # grid layers keep the class token out of the grid: a separate class-attention path
  blk = m.blocks[0]
  assert (blk.cls_attn is not None) == (VIT_ATTENTIONS[name].needs_grid and pool == "cls")


def test_vit_grid_constraints_are_checked_at_construction():
  with pytest.raises(ValueError, match="multiple of patch_size"):
    ViT(**{**VIT_KW, "patch_size": 5}, rngs=rngs(0))
  with pytest.raises(ValueError, match="does not suit the patch grid"):
    ViT(attention="neighborhood", attention_kwargs={"kernel_size": 5}, **VIT_KW,
        rngs=rngs(0))
  swin = ViT(attention="swin", **{**VIT_KW, "image_size": 8, "patch_size": 1},
             rngs=rngs(0))
  assert [b.attn.shift_size for b in swin.blocks] == [(0, 0), (2, 2)]  # 8x8 grid, window 4


def test_vit_heads_not_dividing_dim_names_the_model_options():
  """The error named MultiHeadAttention's in_features (or a grid layer's internals), not the
  ViT's dim / num_heads; global attention with an explicit head_dim stays allowed."""
  for attention in ("global", "neighborhood", "channel"):
    with pytest.raises(ValueError, match=r"ViT dim=32 is not divisible by num_heads=5 "
                       r"\(model.dim / model.num_heads.*e.g. 4 or 8\)") as err:
      ViT(attention=attention, **{**VIT_KW, "dim": 32, "num_heads": 5}, rngs=rngs(0))
    assert "in_features" not in str(err.value)
  m = ViT(attention="global", attention_kwargs={"head_dim": 8},
          **{**VIT_KW, "dim": 30, "num_heads": 4, "depth": 1}, rngs=rngs(0))
  assert m.blocks[0].attn.head_dim == 8


def _n_params(m):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_tied_vs_untied_parameters_and_sharding_annotations():
  tied = lm("mha")
  untied = DecoderLM(attention="mha", tie_embeddings=False, **LM_KW, rngs=rngs(0))
  assert _n_params(untied) - _n_params(tied) == V * D
  specs = {tuple(p): tuple(v.get_value()) for p, v in nnx.to_flat_state(
      nnx.get_partition_spec(nnx.state(untied, nnx.Param)))}
  assert specs[("embedding",)] == ("tensor", None)
  assert specs[("lm_head", "kernel")] == (None, "tensor")
  assert specs[("blocks", 0, "mlp", "gate", "kernel")] == (None, "tensor")
  assert specs[("blocks", 0, "mlp", "down", "kernel")] == ("tensor", None)
  assert specs[("blocks", 0, "attn", "query", "kernel")] == (None, "tensor", None)


def test_build_model_and_its_errors():
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(dict(kind="lm", attention="sliding_window",
                                       attention_kwargs={"window": 8}, **LM_KW))
  m = build_model(cfg, rngs=rngs(0))
  assert isinstance(m, DecoderLM) and m.blocks[0].attn.window == 8
  v = build_model(dict(kind="vit", attention="channel", **VIT_KW), rngs=rngs(0))
  assert isinstance(v, ViT)
  cases = [
      (dict(kind="cnn"), r"unknown model kind 'cnn'.*'lm', 'vit'"),
      (dict(kind="lm", d_modle=32), r"did you mean 'd_model'.*'vocab_size'"),
      (dict(kind="lm", vocab_size=V), r"missing required keys \['d_model'"),
      (dict(kind="lm", **LM_KW, attention="gqa_"), r"did you mean 'gqa'.*'mla'.*'strided_heads'"),
      (dict(kind="vit", **VIT_KW, attention="swim"), r"did you mean 'swin'.*'spatial_reduction'"),
      (dict(kind="lm", **LM_KW, attention="sliding_window"), r"needs attention_kwargs\['window'\]"),
      (dict(kind="lm", **LM_KW, attention="sliding_window", attention_kwargs={"windw": 4}),
       r"did you mean 'window'"),
      (dict(kind="lm", **LM_KW, attention="mha", attention_kwargs={"causal": False}),
       r"set by the model"),
      (dict(kind="lm", **LM_KW, attention="gqa"), r"needs num_kv_heads"),
      (dict(kind="lm", **LM_KW, attention="mha", num_kv_heads=2), r"use attention='gqa'"),
      (dict(kind="vit", **VIT_KW, pool="avg"), r"pool='avg'.*'cls', 'mean'"),
      ({"attention": "mha"}, r"needs 'kind'"),
  ]
  for cfg, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      build_model(cfg, rngs=rngs(0))


def _train(model, batch, loss_fn, steps=6, lr=0.1):
  opt = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    opt.update(model, grads)
    return loss

  return [float(step(model, opt, batch)) for _ in range(steps)]


def test_sgd_steps_reduce_the_loss():
  m = DecoderLM(attention="moh", **LM_KW, **LM_EXTRA["moh"], rngs=rngs(1))

  def lm_loss(model, toks):
    logits, aux = model(toks[:, :-1], return_aux=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()
    return ce + 0.01 * aux

  losses = _train(m, tokens(5), lm_loss)
  assert losses[-1] < losses[0] - 0.05, losses
  v = ViT(attention="global", **{**VIT_KW, "image_size": 8, "patch_size": 2}, rngs=rngs(1))
  x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 8, 8, 3)), jnp.float32)
  y = jnp.array([1, 3, 5, 7])

  def vit_loss(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(batch[0]), batch[1]).mean()

  losses = _train(v, (x, y), vit_loss)
  assert losses[-1] < losses[0] - 0.05, losses


def test_bfloat16():
  m32 = lm("mha")
  m16 = DecoderLM(attention="mha", **LM_KW, dtype=jnp.bfloat16, rngs=rngs(0))
  toks = tokens(8)
  l32, l16 = lm_forward(m32, toks)[0], lm_forward(m16, toks)[0]
  assert l16.dtype == jnp.float32
  l32, l16 = np.asarray(l32), np.asarray(l16)
  assert np.isfinite(l16).all()
  assert np.sqrt(np.mean((l16 - l32) ** 2)) < 0.1 * np.std(l32)
  v = ViT(attention="global", pool="mean", **{**VIT_KW, "depth": 1}, dtype="bfloat16",
          rngs=rngs(0))
  x = jnp.asarray(np.random.default_rng(9).normal(size=(B, 16, 16, 3)), jnp.float32)
  out = vit_fwd(v, x)
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


def test_out_of_vocabulary_ids():
  """Ids outside [0, vocab) used to be accepted: id == vocab gave NaN logits, id -1 wrapped to
  the last token, and the explicit-mesh path clipped both. Concrete ids raise now (forward,
  decode's real tokens, generate's prompt); under jit every path embeds them as zeros: no wrap,
  finite, and padding ids beyond num_new leave the real tokens' logits unchanged."""
  m = lm("mha")
  bad = jnp.asarray([[1, 2, V, 3], [0, -1, 4, 5]], jnp.int32)
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=64\); got "
                     r"tokens\[0, 2\]=64, tokens\[1, 1\]=-1"):
    m(bad)
  with pytest.raises(ValueError, match=r"tokens\[0, 2\]=64"):
    m.decode(bad, m.init_cache(B, 8))
  with pytest.raises(ValueError, match=r"got prompt\[0, 2\]=64, prompt\[1, 1\]=-1"):
    generate(m, bad, 2)
  with pytest.raises(ValueError, match="and 3 more"):
    m(jnp.full((1, 8), V, jnp.int32))

  good = np.asarray(lm_forward(m, jnp.abs(bad) % V)[0])
  wrapped = np.asarray(lm_forward(m, jnp.where(bad < 0, V - 1, bad % V))[0])

  def check(logits):
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()
    # causal: positions before the first bad id are unaffected; -1 is not token V - 1
    np.testing.assert_allclose(logits[0, :2], good[0, :2], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(logits[1, :1], good[1, :1], atol=2e-5, rtol=2e-5)
    assert not np.allclose(logits[1, 1], wrapped[1, 1], atol=1e-3)

  check(lm_forward(m, bad)[0])
  # decode checks only the real tokens; padding ids (-1, V) do not reach the real logits
  real = jnp.asarray([[1, 2, 7, 3], [0, 4, 4, 5]], jnp.int32)
  padded = jnp.where(jnp.arange(4)[None, :] < jnp.asarray([[2], [3]]), real,
                     jnp.asarray([[-1], [V]]))
  for dec in (lambda m, t, c, n: m.decode(t, c, num_new=n),
              nnx.jit(lambda m, t, c, n: m.decode(t, c, num_new=n))):
    lp, _ = dec(m, padded, m.init_cache(B, 8), jnp.asarray([2, 3]))
    lr, _ = dec(m, real, m.init_cache(B, 8), jnp.asarray([2, 3]))
    np.testing.assert_allclose(np.asarray(lp)[0, :2], np.asarray(lr)[0, :2], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lp)[1, :3], np.asarray(lr)[1, :3], atol=1e-5, rtol=1e-5)
  if len(jax.devices()) >= 2:
    mesh = jax.make_mesh((2,), ("tensor",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
      ms = DecoderLM(attention="mha", **LM_KW, rngs=rngs(0))
      check(nnx.jit(lambda m, t: m(t))(ms, bad))
      np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(ms, jnp.abs(bad) % V)),
                                 good, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["gqa", "sliding_window", "moh"])
def test_decode_and_generate_under_an_explicit_tensor_mesh(name):
  """DecoderLM.decode / generate under an explicit-axes mesh used to fail (the KV cache write,
  then the MLP's sharded contraction); now decode equals the forward and cached generation
  equals the uncached one and the unsharded model's."""
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py simulates 8)")
  kw = dict(LM_KW, num_layers=1, **LM_EXTRA.get(name, {}))
  toks = tokens(11, (B, 8))
  prompt = toks[:, :5]
  ref = DecoderLM(attention=name, **kw, rngs=rngs(0))
  want_logits = np.asarray(lm_forward(ref, toks)[0])
  want_gen = np.asarray(generate(ref, prompt, 4))
  mesh = jax.make_mesh((2,), ("tensor",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    m = DecoderLM(attention=name, **kw, rngs=rngs(0))
    logits = np.asarray(lm_forward(m, toks)[0])
    dec = nnx.jit(lambda m, t: m.decode(t, m.init_cache(B, 8))[0])(m, toks)
    gen = np.asarray(generate(m, prompt, 4))
    gen_nc = np.asarray(generate(m, prompt, 4, use_cache=False))
  np.testing.assert_allclose(logits, want_logits, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(dec), want_logits, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(gen, want_gen)
  np.testing.assert_array_equal(gen_nc, want_gen)


def test_generate_with_a_batch_sharded_prompt_under_an_explicit_mesh():
  """A prompt sharded over the data axis of an explicit-axes mesh used to fail (the token
  buffer was replicated); the buffer now takes the prompt's sharding, and cached and uncached
  generation equal the unsharded model's."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (tests/conftest.py simulates 8)")
  kw = dict(LM_KW, num_layers=1, **LM_EXTRA.get("gqa", {}))
  prompt = tokens(12, (B, 5))
  want = np.asarray(generate(DecoderLM(attention="gqa", **kw, rngs=rngs(0)), prompt, 4))
  mesh = jax.make_mesh((2, 2), ("data", "tensor"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    m = DecoderLM(attention="gqa", **kw, rngs=rngs(0))
    sharded = jax.device_put(prompt, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))
    for use_cache in (True, False):
      np.testing.assert_array_equal(np.asarray(generate(m, sharded, 4, use_cache=use_cache)), want)
    # generate splits its caches like the prompt; the same by hand: every layer's cache is split
    # over "data" (not replicated on each data replica), and decoding through it is exact
    cache = m.init_cache(B, 8, batch_axis="data")
    for leaf in jax.tree.leaves(cache):
      assert tuple(jax.typeof(leaf).sharding.spec)[0] == "data"
    logits, cache = nnx.jit(lambda m, t, c: m.decode(t, c))(m, sharded, cache)
    for leaf in jax.tree.leaves(cache):
      assert tuple(jax.typeof(leaf).sharding.spec)[0] == "data"
  ref = DecoderLM(attention="gqa", **kw, rngs=rngs(0))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(lm_forward(ref, prompt)[0]),
                             atol=2e-5, rtol=2e-5)
