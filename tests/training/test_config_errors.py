"""Command line, config overrides, mesh construction and the errors users hit first: unknown
config keys, bad meshes, sequence parallelism, unknown attention / dataset. All fail before any
compilation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from attnjax.training import mesh as mesh_lib
from tests.training import train_helpers as th

train = th.load_train()


def test_overrides_and_placeholders(tmp_path):
  cfg, workdir, resume, step, progress = train.parse_args(th.argv(
      "lm_tiny", tmp_path, {"optim.lr": 0.5, "model.num_kv_heads": 2, "mesh.fsdp": 4,
                            "model.attention": "gqa"}, "--resume", "--resume_step=7"))
  assert cfg.optim.lr == 0.5 and cfg.model.num_kv_heads == 2 and cfg.mesh.fsdp == 4
  assert cfg.model.attention == "gqa" and cfg.model.vocab_size is None
  assert (workdir, resume, step, progress) == (str(tmp_path), True, 7, False)


@pytest.mark.parametrize("key,where,valid", [
    ("model.d_modle", "config.model", "d_model"),
    ("bogus", "config", "batch_size"),
    ("optim.lr.x", "config.optim.lr", "not a group"),
])
def test_unknown_config_key_lists_valid_keys(tmp_path, key, where, valid):
  with pytest.raises(train.ConfigKeyError, match=rf"unknown config key.*{where}.*{valid}"):
    train.main(th.argv("lm_tiny", tmp_path, {key: 1}))


def test_bad_value_type_and_missing_workdir(tmp_path):
  with pytest.raises(ValueError, match="num_steps"):
    train.main(th.argv("lm_tiny", tmp_path, {"num_steps": "many"}))
  with pytest.raises(ValueError, match="--resume needs --workdir"):
    train.parse_args(["train.py", "--config", str(th.CONFIGS / "lm_tiny.py"), "--resume"])
  with pytest.raises(ValueError, match="--config is required"):
    train.parse_args(["train.py"])


@pytest.mark.parametrize("mesh,match", [
    ({"mesh.data": 3}, r"product of the mesh axis sizes must equal the device count"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"at most one mesh axis may be -1"),
    ({"mesh.data": -1, "mesh.tensor": 3}, r"do(es)? not divide the 8 devices"),
    ({"mesh.num_devices": 9}, r"mesh.num_devices=9 but 8 devices"),
])
def test_bad_mesh(tmp_path, mesh, match):
  with pytest.raises(ValueError, match=match):
    train.main(th.argv("lm_tiny", tmp_path, dict(th.TINY_LM, **mesh)))


def test_sequence_parallel_is_not_silently_ignored(tmp_path):
  # LMs run context parallelism (tests/training/test_sequence_parallel.py); ViTs have none
  with pytest.raises(NotImplementedError, match="sequence.*context.*parallelism"):
    train.main(th.argv("vit_tiny", tmp_path, dict(th.TINY_VIT, **{"mesh.sequence": 2})))


def test_unknown_attention_dataset_and_kind_mismatch(tmp_path):
  with pytest.raises(ValueError, match=r"unknown attention.*'gqa'"):
    train.main(th.argv("lm_tiny", tmp_path / "a", dict(th.TINY_LM,
                                                       **{"model.attention": "flashy"})))
  with pytest.raises(ValueError, match=r"unknown dataset name 'nope'.*stdlib_text"):
    train.main(th.argv("lm_tiny", tmp_path / "b", dict(th.TINY_LM, **{"data.name": "nope"})))
  with pytest.raises(ValueError, match=r"needs a 'text' dataset.*digits.*image"):
    train.main(th.argv("lm_tiny", tmp_path / "c", dict(th.TINY_LM, **{"data.name": "digits"})))
  with pytest.raises(ValueError, match=r"batch_size=12 must be divisible"):
    train.main(th.argv("lm_tiny", tmp_path / "d", dict(th.TINY_LM, batch_size=12)))


def test_resolve_mesh_shape():
  assert mesh_lib.resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == {
      "data": 4, "fsdp": 1, "tensor": 2, "sequence": 1}
  with pytest.raises(ValueError, match="unknown mesh axes"):
    mesh_lib.resolve_mesh_shape({"model": 2}, 8)
  with pytest.raises(ValueError, match=">= 1 or -1"):
    mesh_lib.resolve_mesh_shape({"data": 0}, 8)


def test_param_shardings_fsdp_tensor_and_indivisible(caplog):
  from flax import nnx
  from attnjax.layers import MultiHeadAttention
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  abs_mha = nnx.eval_shape(lambda: MultiHeadAttention(
      num_heads=4, in_features=64, num_kv_heads=2, rngs=nnx.Rngs(0)))
  state = nnx.state(abs_mha, nnx.Param)
  sh = mesh_lib.param_shardings(state, mesh, fsdp_min_size=1)
  # query [64, 4, 16]: heads over tensor, largest free dim (64) over fsdp
  assert tuple(sh["query"]["kernel"].spec) == ("fsdp", "tensor", None)
  # key [64, 2, 16]: 2 kv heads do not divide tensor=4 -> replicated (warned), fsdp on 64
  assert tuple(sh["key"]["kernel"].spec) == ("fsdp", None, None)
  assert "not divisible" in caplog.text
  assert len(jax.tree.leaves(sh)) == len(jax.tree.leaves(state))


def test_distributed_detection(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_JOB_ID",
              "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert mesh_lib.maybe_initialize_distributed("auto") is False
  assert mesh_lib.maybe_initialize_distributed("off") is False
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  assert mesh_lib.maybe_initialize_distributed("auto") is True
  assert calls == [{"num_processes": 4, "process_id": 2}]
  with pytest.raises(ValueError, match="multihost"):
    mesh_lib.maybe_initialize_distributed("sometimes")
  np.testing.assert_equal(len(calls), 1)


def test_bad_sequence_load_balance_names_the_key_and_the_allowed_values(tmp_path):
  with pytest.raises(ValueError, match=r"mesh.sequence_load_balance='zig-zag' is not supported; "
                     r"allowed values: 'zigzag', 'striped', 'none', 'contiguous'"):
    train.main(th.argv("lm_tiny", tmp_path, dict(th.TINY_LM, **{
        "mesh.sequence": 2, "mesh.sequence_load_balance": "zig-zag"})))


@pytest.mark.parametrize("over,match", [
    ({"model.num_classes": 5}, r"model.num_classes=5 is smaller than the 10 classes of "
     r"data.name='digits'.*Leave model.num_classes unset.*at least 10"),
    ({"model.image_size": 16}, r"model.image_size=16 does not match the 8x8 images.*set it to 8"),
    ({"model.in_channels": 3}, r"model.in_channels=3 does not match the 1 channel"),
    ({"model.num_heads": 5}, r"ViT dim=32 is not divisible by num_heads=5 \(model.dim / "
     r"model.num_heads"),
])
def test_vit_config_that_does_not_fit_the_data_fails_at_start_up(tmp_path, over, match):
  """num_classes below the dataset's classes made the loss NaN at the first log (and blamed the
  learning rate); a head count that does not divide dim named a layer's in_features."""
  with pytest.raises(ValueError, match=match) as err:
    train.main(th.argv("vit_tiny", tmp_path, dict(th.TINY_VIT, **over)))
  assert "in_features" not in str(err.value)
  assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_prints_a_non_finite_loss_without_traceback_but_not_other_errors(monkeypatch,
                                                                            capsys):
  """experiments/train.py: NonFiniteLossError (and the other user errors) -> message, status 2;
  any other FloatingPointError (e.g. from JAX_DEBUG_NANS) keeps its traceback."""
  from attnjax.training.loop import NonFiniteLossError  # pylint: disable=import-outside-toplevel

  def raise_(err):
    def f(argv=None):
      raise err
    return f
  monkeypatch.setattr(train, "main", raise_(NonFiniteLossError("train loss is nan at step 2")))
  assert train.cli(["train.py"]) == 2
  assert "error: NonFiniteLossError: train loss is nan" in capsys.readouterr().err
  monkeypatch.setattr(train, "main", raise_(FloatingPointError("invalid value (nan) in mul")))
  with pytest.raises(FloatingPointError, match="in mul"):
    train.cli(["train.py"])
  monkeypatch.setattr(train, "main", raise_(RuntimeError("a bug")))
  with pytest.raises(RuntimeError, match="a bug"):
    train.cli(["train.py"])


def test_vit_configs_expose_attention_kwargs_and_data_keys(tmp_path):
  """Both ViT configs list the attention layers' common arguments (None = unset) and the data
  keys their sources read, so that the command line can set them."""
  from attnjax.training.loop import ATTENTION_KWARGS  # pylint: disable=import-outside-toplevel
  for name in ("vit_tiny", "vit_small"):
    cfg = train.parse_args(th.argv(name, tmp_path, {
        "model.attention": "neighborhood", "model.attention_kwargs.kernel_size": 3,
        "model.attention_kwargs.rel_pos_bias": True, "data.data_dir": str(tmp_path),
        "data.max_examples": 100}))[0]
    ak = cfg.model.attention_kwargs
    assert sorted(ak.keys()) == sorted(ATTENTION_KWARGS["vit"])
    assert (ak.kernel_size, ak.rel_pos_bias, ak.window_size) == (3, True, None)
    assert cfg.data.data_dir == str(tmp_path) and cfg.data.eval_split is None


def test_attention_kwargs_lists_only_keys_some_layer_takes():
  """Every listed key is a constructor argument (not set by the model) of at least one
  attention of that model kind, so the lists cannot rot silently."""
  from attnjax.layers.agent import AgentAttention
  from attnjax.layers.cascaded import CascadedGroupAttention
  from attnjax.layers.channel import ChannelAttention
  from attnjax.layers.hilo import HiLoAttention
  from attnjax.layers.mha import MultiHeadAttention
  from attnjax.layers.mla import MultiHeadLatentAttention
  from attnjax.layers.moh import MixtureOfHeadsAttention
  from attnjax.layers.neighborhood import NeighborhoodAttention2D
  from attnjax.layers.spatial_reduction import SpatialReductionAttention
  from attnjax.layers.strided import StridedHeadsAttention
  from attnjax.layers.window import WindowAttention
  from attnjax.models import registry
  from attnjax.training.loop import ATTENTION_KWARGS, attention_kwargs_config
  layers = {
      "lm": ([MultiHeadAttention, StridedHeadsAttention, MixtureOfHeadsAttention,
              MultiHeadLatentAttention], registry._LM_RESERVED),
      "vit": ([MultiHeadAttention, NeighborhoodAttention2D, WindowAttention, HiLoAttention,
               AgentAttention, SpatialReductionAttention, CascadedGroupAttention,
               ChannelAttention], registry._VIT_RESERVED)}
  for kind, (classes, reserved) in layers.items():
    taken = set().union(*(registry._init_params(c) for c in classes)) - reserved
    assert set(ATTENTION_KWARGS[kind]) <= taken, set(ATTENTION_KWARGS[kind]) - taken
    ak = attention_kwargs_config(kind)
    assert sorted(ak.keys()) == sorted(ATTENTION_KWARGS[kind])
    assert all(v is None for v in ak.values())
  with pytest.raises(ValueError, match=r"kind='cnn'.*'lm', 'vit'"):
    attention_kwargs_config("cnn")


def test_vit_tiny_data_dir_reaches_the_idx_source(tmp_path):
  """The fashion_mnist_idx error tells the user to set data_dir: vit_tiny has the key and the
  source reads it."""
  with pytest.raises(FileNotFoundError, match=rf"not found in '{tmp_path}'.*set cfg.data_dir"):
    train.main(th.argv("vit_tiny", tmp_path / "w", dict(th.TINY_VIT, **{
        "data.name": "fashion_mnist_idx", "data.data_dir": str(tmp_path)})))


@pytest.mark.parametrize("attention,kwargs,check", [
    ("neighborhood", {"kernel_size": 3, "rel_pos_bias": True},
     lambda a: tuple(a.kernel_size) == (3, 3) and a.rpb is not None),
    ("swin", {"window_size": 2, "shift_size": 1},
     lambda a: tuple(a.window_size) == (2, 2) and tuple(a.shift_size) in ((0, 0), (1, 1))),
    ("hilo", {"window_size": 2, "alpha": 0.25}, lambda a: (a.window_size, a.alpha) == (2, 0.25)),
    ("spatial_reduction", {"sr_ratio": 4}, lambda a: a.sr_ratio == 4),
])
def test_vit_attention_kwargs_from_the_command_line_reach_the_layers(tmp_path, attention,
                                                                     kwargs, check):
  """--config.model.attention_kwargs.<key>=... on vit_tiny (it had no attention_kwargs:
  ConfigKeyError) goes through the training script's model config into every block's layer
  (the abstract model the run builds; no compilation); unset entries are not passed."""
  from attnjax import data as data_lib  # pylint: disable=import-outside-toplevel
  from attnjax.models import build_model  # pylint: disable=import-outside-toplevel
  from attnjax.training import loop  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  over = dict(th.TINY_VIT, **{"model.patch_size": 2, "model.attention": attention},
              **{f"model.attention_kwargs.{k}": v for k, v in kwargs.items()})
  cfg = train.parse_args(th.argv("vit_tiny", tmp_path, over))[0]
  info = data_lib.make_dataset(cfg.data, split="train", batch_size=16, seed=0).info
  mcfg = loop.model_config(cfg, info)
  assert mcfg["attention_kwargs"] == kwargs
  model = nnx.eval_shape(lambda: build_model(mcfg, rngs=nnx.Rngs(0)))
  assert model.grid == (4, 4) and len(model.blocks) == 1
  assert all(check(blk.attn) for blk in model.blocks)
