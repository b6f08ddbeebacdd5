"""Sequence (context) parallelism in the models and the training script: a DecoderLM whose
attention layers run ``attnjax.parallel.context_parallel_attention`` over a ``sequence`` mesh
axis gives the single-device logits and gradients (in the load-balanced token layout), and
``experiments/train.py`` with ``mesh.sequence > 1`` trains to the same losses as a run without
it. Runs on the 8 simulated CPU devices of tests/conftest.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import models, parallel, scores
from attnjax.layers import ContextParallel, MultiHeadAttention
from attnjax.models import DecoderLM
from tests.training import train_helpers as th

train = th.load_train()

T, V = 32, 61


def _mesh(shape):
  # Auto axes, as the training script's mesh (attnjax.training.make_mesh)
  return jax.make_mesh(shape, ("data", "sequence"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _lm(attention="mha", **kw):
  return DecoderLM(vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=T,
                   attention=attention, rngs=nnx.Rngs(0), **kw)


def _logits_and_grads(model, tokens, targets, positions=None):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    m = nnx.merge(graphdef, p, rest)
    logits = m(tokens) if positions is None else m(tokens, positions=positions)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)
    return jnp.mean(nll), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logits), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("strategy,attention,kw,mesh_shape", [
    ("ring", "gqa", {"num_kv_heads": 2, "attention_kwargs": {"sinks": True}}, (2, 4)),
    ("all_gather", "sliding_window", {"attention_kwargs": {"window": 8}}, (1, 4)),
], ids=["ring-gqa-data2xseq4", "all_gather-window-seq4"])
def test_lm_forward_and_grads_match_single_device(strategy, attention, kw, mesh_shape):
  mesh = _mesh(mesh_shape)
  model = _lm(attention, **kw)
  toks = np.asarray(jax.random.randint(jax.random.key(1), (2, T + 1), 0, V), np.int32)
  inputs, targets = toks[:, :-1], toks[:, 1:]
  ref_logits, ref_grads = _logits_and_grads(model, inputs, targets)

  perm = parallel.load_balance_permutation(T, mesh_shape[1], "zigzag")
  model.set_context_parallel(mesh, strategy=strategy, load_balance="zigzag",
                             batch_axis="data" if mesh_shape[0] > 1 else None)
  assert model.context_parallel.strategy == strategy
  logits, grads = _logits_and_grads(model, inputs[:, perm], targets[:, perm], positions=perm)
  # logits come back in the zigzag layout: un-permute before comparing
  np.testing.assert_allclose(parallel.unpermute_sequence(logits, perm), ref_logits, atol=2e-5,
                             rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4), grads,
               ref_grads)
  # without positions the layer uses the layout of its load_balance setting
  out = jax.jit(lambda t: model(t))(inputs[:, perm])
  np.testing.assert_allclose(np.asarray(out), logits, atol=2e-5, rtol=2e-5)
  # decoding ignores context parallelism (one-device KV cache); the uncached generate refuses
  prompt = inputs[:1, :4]
  with pytest.raises(ValueError, match="set_context_parallel"):
    models.generate(model, prompt, 3, use_cache=False)
  if strategy == "ring":  # (one case is enough: compiles are the cost)
    np.testing.assert_array_equal(models.generate(model, prompt, 3),
                                  models.generate(_lm(attention, **kw), prompt, 3))
  model.set_context_parallel(None)
  assert model.context_parallel is None


def test_train_script_sequence_parallel_matches_data_parallel(tmp_path):
  # same seed, data and steps; data x tensor vs data x tensor x sequence, with gradient
  # accumulation (microbatches keep the token axis sharded over "sequence")
  over = dict(th.TINY_LM, **{"num_steps": 6, "log_every": 3, "optim.warmup_steps": 1,
                             "grad_accum_steps": 2, "mesh.tensor": 2})
  base = train.main(th.argv("lm_tiny", tmp_path / "dp", dict(over, **{"mesh.data": 4})))
  cp = train.main(th.argv("lm_tiny", tmp_path / "cp", dict(over, **{
      "mesh.data": 2, "mesh.sequence": 2, "mesh.sequence_strategy": "ring"})))
  assert cp.summary["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2, "sequence": 2}
  assert cp.summary["context_parallel"] == {"strategy": "ring", "load_balance": "zigzag"}
  ev_dp, ev_cp = th.eval_losses(tmp_path / "dp"), th.eval_losses(tmp_path / "cp")
  assert [s for s, _ in ev_cp] == [s for s, _ in ev_dp] == [0, 6]
  assert ev_cp[-1][1] < ev_cp[0][1] - 0.5, ev_cp  # it learns
  np.testing.assert_allclose([l for _, l in ev_cp], [l for _, l in ev_dp], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3),
               th.params_np(cp.state), th.params_np(base.state))
  # the returned model runs on one device again
  assert cp.model.context_parallel is None


def test_errors(tmp_path):
  mesh = _mesh((2, 4))
  # attentions without a context-parallel path
  with pytest.raises(NotImplementedError, match=r"attention='mla'.*support it.*'gqa'"):
    _lm("mla").set_context_parallel(mesh)
  with pytest.raises(ValueError, match="unknown context-parallel strategy"):
    _lm().set_context_parallel(mesh, strategy="spiral")
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    _lm().set_context_parallel(mesh, axis="sp")
  # layer: cross attention, score_mod, bias and wrong / traced positions raise
  layer = MultiHeadAttention(4, 32, causal=True, rngs=nnx.Rngs(0))
  layer.set_context_parallel(mesh, axis="sequence", load_balance="zigzag")
  assert isinstance(layer.context_parallel, ContextParallel)
  x = jnp.ones((2, T, 32))
  with pytest.raises(NotImplementedError, match="self-attention only"):
    layer(x, kv=x)
  with pytest.raises(NotImplementedError, match="score_mod"):
    layer(x, score_mod=scores.softcap(5.0))
  with pytest.raises(NotImplementedError, match="bias"):
    layer(x, bias=jnp.zeros((1, 4, T, T)))
  with pytest.raises(ValueError, match="do not match the layer's context-parallel layout"):
    layer(x, positions=np.arange(T))
  with pytest.raises(ValueError, match="static positions"):
    jax.jit(lambda x, p: layer(x, positions=p))(x, jnp.arange(T))
  # training script: ViT, bad strategy, sequence length not divisible by 2 * sequence
  with pytest.raises(NotImplementedError, match=r"sequence.*context.*parallelism.*'lm'"):
    train.main(th.argv("vit_tiny", tmp_path / "v", dict(th.TINY_VIT, **{"mesh.sequence": 2})))
  with pytest.raises(ValueError, match="sequence_strategy='usp'"):
    train.main(th.argv("lm_tiny", tmp_path / "a", dict(th.TINY_LM, **{
        "mesh.sequence": 2, "mesh.sequence_strategy": "usp"})))
  with pytest.raises(ValueError, match=r"zigzag.*divisible by 2 \* num_shards = 16"):
    train.main(th.argv("lm_tiny", tmp_path / "b", dict(th.TINY_LM, **{
        "mesh.data": 1, "mesh.sequence": 8, "data.seq_len": 36})))
