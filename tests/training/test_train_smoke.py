"""End-to-end smoke tests of experiments/train.py's main(): a few steps of tiny LMs and ViTs on
one device and on the 8 simulated CPU devices (tests/conftest.py), with sharded meshes,
gradient accumulation and bfloat16. "Loss decreases on a fixed batch": every run evaluates the
same fixed eval batches at step 0 (``eval_at_start``) and at the end."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnjax import data
from attnjax.data import text as data_text
from attnjax.models import build_model
from attnjax.training import make_mesh, steps
from tests.training import train_helpers as th

train = th.load_train()


def _check_outputs(workdir, kind, min_drop):
  for name in ("metrics.jsonl", "summary.json", "curves.png", "config.json"):
    assert (workdir / name).exists(), name
  assert list((workdir / "tb").iterdir()), "no TensorBoard events"
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["kind"] == kind and summary["param_count"] > 0
  evals = th.eval_losses(workdir)
  assert evals[0][0] == 0 and evals[-1][0] == summary["steps"]
  assert evals[-1][1] < evals[0][1] - min_drop, evals
  return summary


def test_lm_one_device(tmp_path):
  over = dict(th.TINY_LM, **{"mesh.num_devices": 1, "sample.max_new_tokens": 6,
                             "sample.prompt": "def"})
  res = train.main(th.argv("lm_tiny", tmp_path, over))
  assert res.summary["devices"] == 1
  summary = _check_outputs(tmp_path, "lm", min_drop=1.0)
  ev = summary["final_eval"]
  assert ev["bits_per_byte"] == pytest.approx(ev["loss"] / np.log(2), rel=1e-6)
  assert summary["unigram_bits_per_byte"] > 3 and summary["train_tokens_per_s"] > 0
  assert summary["sample"]["prompt"] == "def"
  assert len(summary["sample"]["greedy_continuation"]) >= 6  # escaped bytes may be longer
  # The unigram baseline is scored on exactly the target bytes the model is scored on: the
  # weighted targets of the first eval_steps eval batches (not the whole eval split).
  cfg = train.parse_args(th.argv("lm_tiny", tmp_path, over))[0]
  it = data.make_dataset(cfg.data, split="eval", batch_size=8, seed=0).iterator()
  scored = np.concatenate([b["targets"][b["weights"] > 0] for b in itertools.islice(it, 2)])
  assert len(scored) == 2 * 8 * 32
  train_tokens = data.make_source(cfg.data, "train").tokens
  expected = data_text.unigram_cross_entropy_bits(train_tokens, scored)
  assert summary["unigram_bits_per_byte"] == pytest.approx(expected, rel=1e-12)
  assert abs(expected - data.unigram_bits_per_byte(cfg.data)) > 1e-3  # the whole split differs


def test_lm_eight_devices_fsdp_tensor_accum_bf16(tmp_path):
  assert jax.device_count() == 8
  over = dict(th.TINY_LM, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                             "mesh.fsdp_min_size": 0, "grad_accum_steps": 2, "batch_size": 16,
                             "model.dtype": "bfloat16", "model.attention": "gqa",
                             "model.num_kv_heads": 2})
  res = train.main(th.argv("lm_tiny", tmp_path, over))
  assert res.summary["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
  _check_outputs(tmp_path, "lm", min_drop=1.0)
  # Parameters are really sharded: heads over "tensor", the largest free dim over "fsdp" ...
  q = res.state["params"]["blocks"][0]["attn"]["query"]["kernel"]
  assert tuple(q.sharding.spec) == ("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (16, 2, 8)
  # ... and so are the Adam moments.
  mu = res.state["opt_state"][1][0].mu["blocks"][0]["attn"]["query"]["kernel"]
  assert mu.sharding == q.sharding


@pytest.mark.parametrize("mesh", [{"mesh.num_devices": 1},
                                  {"mesh.data": 4, "mesh.tensor": 2}], ids=["1dev", "8dev"])
def test_vit(tmp_path, mesh):
  train.main(th.argv("vit_tiny", tmp_path, dict(th.TINY_VIT, **mesh)))
  summary = _check_outputs(tmp_path, "vit", min_drop=0.3)
  assert 0.0 <= summary["final_eval"]["accuracy"] <= 1.0
  assert summary["train_images_per_s"] > 0


def test_grad_accumulation_equals_full_batch():
  """A step over 4 microbatches (lax.scan) gives the update of one full-batch step, also with
  unequal token weights per microbatch."""
  mesh = make_mesh({"num_devices": 1})
  mcfg = dict(kind="lm", vocab_size=64, max_len=16, d_model=16, num_layers=1, num_heads=2,
              mlp_dim=32)
  graphdef = nnx.split(nnx.eval_shape(lambda: build_model(mcfg, rngs=nnx.Rngs(0))))[0]
  params, rest = jax.jit(lambda: nnx.split(build_model(mcfg, rngs=nnx.Rngs(0)), nnx.Param,
                                           ...)[1:])()
  tx = optax.sgd(0.1)  # the parameter change is the (linear) gradient
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.integers(0, 64, (16, 16)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 64, (16, 16)), jnp.int32),
           "weights": jnp.asarray(rng.random((16, 16)) < 0.7, jnp.float32)}
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
           "opt_state": tx.init(params), "rng": jax.random.key_data(jax.random.key(0))}
  out = []
  for k in (1, 4):
    step = jax.jit(steps.make_train_step("lm", graphdef, tx, lambda s: 0.1, mesh=mesh,
                                         grad_accum_steps=k))
    new, metrics = step(state, batch)
    out.append((jax.tree.leaves(new["params"]), metrics))
  for x, y in zip(out[0][0], out[1][0]):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  for key in ("loss_sum", "weight_sum", "grad_norm"):
    np.testing.assert_allclose(out[0][1][key], out[1][1][key], rtol=1e-4)


def test_lm_small_config_builds_and_steps(tmp_path):
  """lm_small (GQA, bfloat16, fsdp x tensor) with tiny overrides and stdlib_text instead of
  lm1b: one step on the 8 simulated devices with the config's own mesh layout."""
  lm = train.main(th.argv("lm_small", tmp_path, {
      "data.name": "stdlib_text", "data.seq_len": 32, "data.max_bytes": 20_000,
      "model.d_model": 48, "model.num_layers": 1, "model.num_heads": 4,
      "model.num_kv_heads": 2, "model.mlp_dim": 64, "num_steps": 1, "batch_size": 8,
      "eval_batch_size": 8, "eval_steps": 1, "eval_at_start": False,
      "sample.max_new_tokens": 0}))
  assert lm.summary["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
  assert lm.summary["model_config"]["dtype"] == "bfloat16"
  assert np.isfinite(lm.summary["final_eval"]["loss"])


def test_vit_small_config_builds_and_steps(tmp_path):
  """vit_small (bfloat16) with tiny overrides and digits instead of CIFAR-10: one step."""
  vit = train.main(th.argv("vit_small", tmp_path, {
      "data.name": "digits", "model.patch_size": 2, "model.dim": 48, "model.depth": 1,
      "model.num_heads": 6, "model.mlp_dim": 64, "num_steps": 1, "batch_size": 16,
      "eval_batch_size": 64, "eval_steps": 1, "eval_at_start": False}))
  assert np.isfinite(vit.summary["final_eval"]["loss"])


def test_lm_on_token_ids_reports_no_bits_per_byte(tmp_path, capsys):
  """mqar's tokens are ids of an 8192-word vocabulary, not bytes: no bits/byte anywhere (train
  and eval records, summary.json, the printed summary) and no unigram byte baseline."""
  over = dict(th.TINY_LM, **{"data.name": "mqar", "mesh.num_devices": 1, "num_steps": 4,
                             "log_every": 2, "eval_every": 2})
  res = train.main(th.argv("lm_tiny", tmp_path, over))
  recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in recs} == {"train", "eval"}
  assert all("bits_per_byte" not in r and np.isfinite(r["loss"]) for r in recs), recs
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert "bits_per_byte" not in summary["final_eval"] and "bits_per_byte" not in res.summary[
      "final_eval"]
  assert "unigram_bits_per_byte" not in summary
  out = capsys.readouterr().out
  assert "eval loss" in out and "nats/token" in out and "bits/byte" not in out


@pytest.mark.parametrize("attention,kwargs", [
    ("sliding_window", {"window": 8}),
    ("strided_heads", {"stride": 2, "local_window": 4}),
])
def test_attention_kwargs_from_the_command_line(tmp_path, attention, kwargs):
  """--config.model.attention_kwargs.<key>=... selects the attentions that need arguments (as in
  README's command); the config's unset (None) entries are not passed to the layer."""
  over = dict(th.TINY_LM, **{"mesh.num_devices": 1, "num_steps": 2, "log_every": 1,
                             "model.attention": attention},
              **{f"model.attention_kwargs.{k}": v for k, v in kwargs.items()})
  res = train.main(th.argv("lm_tiny", tmp_path, over))
  assert res.summary["model_config"]["attention"] == attention
  assert res.summary["model_config"]["attention_kwargs"] == kwargs
  attn = res.model.blocks[0].attn
  for k, v in kwargs.items():
    assert getattr(attn, k) == v, k
  assert np.isfinite(res.summary["final_eval"]["loss"])
  # lm_small has the same entries
  cfg = train.parse_args(th.argv("lm_small", tmp_path / "small", over))[0]
  assert {k: cfg.model.attention_kwargs[k] for k in kwargs} == kwargs


def test_readme_sliding_window_command_parses(tmp_path):
  readme = (th.ROOT / "README.md").read_text()
  line = next(l for l in readme.splitlines() if "attention_kwargs.window" in l)
  flags = [a for a in line.split() if a.startswith("--config.")]
  assert "--config.model.attention=sliding_window" in flags
  cfg = train.parse_args(["train.py", "--config", str(th.CONFIGS / "lm_tiny.py"),
                          "--workdir", str(tmp_path)] + flags)[0]
  assert cfg.model.attention == "sliding_window" and cfg.model.attention_kwargs.window > 0


@pytest.mark.slow   # compiles a train step (~10-40 s on a loaded 2-core CPU)
def test_non_finite_loss_names_the_likely_causes(tmp_path):
  """A diverging run stops with NonFiniteLossError (a FloatingPointError) whose message lists
  config mismatches next to the learning rate, and nothing is checkpointed."""
  from attnjax.training.loop import NonFiniteLossError  # pylint: disable=import-outside-toplevel
  over = dict(th.TINY_VIT, **{"mesh.num_devices": 1, "num_steps": 2, "log_every": 2,
                              "optim.lr": 1e30, "optim.warmup_steps": 0,
                              "eval_at_start": False})
  with pytest.raises(NonFiniteLossError, match=r"train loss is (nan|inf|-inf) at step 2.*"
                     r"model.num_classes / model.vocab_size.*optim.lr.*JAX_DEBUG_NANS") as e:
    train.main(th.argv("vit_tiny", tmp_path, over))
  assert isinstance(e.value, FloatingPointError)
  assert "checkpoints so far: none" in str(e.value)
