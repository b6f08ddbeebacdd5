"""Which batch rows each process loads in a multi-process run
(``attnjax.training.mesh.process_row_blocks``), checked on the 8 simulated CPU devices of
tests/conftest.py with made-up device -> process assignments: processes split along the batch
axes load disjoint row blocks, processes that share batch rows (a ``tensor`` or ``sequence``
axis across processes) share a block, and layouts that cannot be fed by per-process row blocks
are rejected naming the ``mesh.*`` keys. The real 2-process check (``jax.distributed`` on
localhost) is not part of CI."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from attnjax.training import mesh as mesh_lib


def _processes(num_processes: int, interleaved: bool = False) -> dict:
  """Device -> process as in a real multi-process job (``jax.devices()`` is ordered by process,
  each process owning ``8 / num_processes`` consecutive devices) or interleaved."""
  per = len(jax.devices()) // num_processes
  return {d: (i % num_processes if interleaved else i // per)
          for i, d in enumerate(jax.devices())}


def _device_rows(sharding, batch: int) -> dict:
  """Device -> the set of batch rows its shard holds (global batch of ``batch`` rows)."""
  shape = (batch, 16)
  out = {}
  for d, idx in sharding.devices_indices_map(shape).items():
    r = idx[0]
    out[d] = set(range(r.start or 0, batch if r.stop is None else r.stop))
  return out


@pytest.mark.parametrize("axes,num_processes,sequence,blocks", [
    ({"data": 8}, 2, False, {0: 0, 1: 1}),
    ({"data": 8}, 8, False, {p: p for p in range(8)}),
    ({"data": 1, "tensor": 8}, 2, False, {0: 0, 1: 0}),
    ({"data": 1, "sequence": 8}, 2, True, {0: 0, 1: 0}),
    ({"data": 2, "sequence": 4}, 2, True, {0: 0, 1: 1}),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 4, False, {0: 0, 1: 1, 2: 2, 3: 3}),
    ({"data": 2, "tensor": 4}, 4, False, {0: 0, 1: 0, 2: 1, 3: 1}),
    ({"data": 2, "fsdp": 2, "sequence": 2}, 1, True, {0: 0}),
], ids=["data8-2p", "data8-8p", "tensor8-2p", "seq8-2p", "data2xseq4-2p", "d2f2t2-4p",
        "data2xtensor4-4p", "one-process"])
def test_compatible_layouts(axes, num_processes, sequence, blocks):
  mesh = mesh_lib.make_mesh(axes)
  sharding = mesh_lib.batch_sharding(mesh, 2, sequence)
  procs = _processes(num_processes)
  got = mesh_lib.process_row_blocks(sharding, procs)
  assert dict(got.block_of) == blocks
  n = got.num_blocks
  assert n == len(set(blocks.values()))
  assert mesh_lib.batch_axes_size(mesh) % n == 0  # blocks are whole data*fsdp shards
  # The property the input pipeline relies on: a process loading rows [b*B/n, (b+1)*B/n) of
  # the global batch has every row each of its devices holds, and all rows are covered.
  B = 4 * mesh_lib.batch_axes_size(mesh)
  for d, rows in _device_rows(sharding, B).items():
    b = got.block_of[procs[d]]
    assert rows <= set(range(b * B // n, (b + 1) * B // n)), (d, rows, b)
  # the callable form and the default (the real process indices: one process here)
  assert mesh_lib.process_row_blocks(sharding, procs.__getitem__) == got
  assert mesh_lib.process_row_blocks(sharding).num_blocks == 1


def test_incompatible_layouts_name_the_mesh_keys():
  # processes interleaved over the data axis: process 0 holds batch shards 0, 2, 4, 6
  mesh = mesh_lib.make_mesh({"data": 8})
  with pytest.raises(ValueError, match=r"mesh.data=8, mesh.fsdp=1, mesh.tensor=1, "
                     r"mesh.sequence=1 over 2 processes.*process 0: batch shards \[0:1\) "
                     r"\[2:3\) \[4:5\) \[6:7\).*change mesh.data, mesh.fsdp"):
    mesh_lib.process_row_blocks(mesh_lib.batch_sharding(mesh, 2),
                                _processes(2, interleaved=True))
  # 3 processes over data=4 x tensor=2: the processes hold overlapping, unequal row ranges
  mesh = mesh_lib.make_mesh({"data": 4, "tensor": 2})
  procs = dict(zip(jax.devices(), [0, 0, 0, 1, 1, 1, 2, 2]))
  with pytest.raises(ValueError, match=r"mesh.data=4.*mesh.tensor=2.*over 3 processes.*"
                     r"process 0: batch shards \[0:2\); process 1: batch shards \[1:3\); "
                     r"process 2: batch shards \[3:4\)"):
    mesh_lib.process_row_blocks(mesh_lib.batch_sharding(mesh, 2), procs)


@pytest.mark.parametrize("sequence", [False, True])
def test_global_batch_has_the_global_shape(sequence):
  mesh = mesh_lib.make_mesh({"data": 2, "tensor": 2, "sequence": 2})
  rng = np.random.default_rng(0)
  local = {"inputs": rng.integers(0, 256, (8, 16)).astype(np.int32),
           "weights": rng.random((8, 16)).astype(np.float32)}
  out = mesh_lib.global_batch(mesh, local, sequence=sequence)
  for k, v in local.items():
    assert out[k].shape == v.shape
    assert out[k].sharding == mesh_lib.batch_sharding(mesh, 2, sequence)
    np.testing.assert_array_equal(np.asarray(out[k]), v)
    for shard in out[k].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), v[shard.index])
