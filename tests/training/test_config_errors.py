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
