"""Multi-process training on one host: two processes of four simulated CPU devices each, joined
by ``jax.distributed`` (the coordinator on localhost, gloo collectives), as on a 2-host pod.

What it checks: a run whose processes share batch rows (``tensor=8``: every process holds a
slice of every row) and a run split along the batch (``data=8`` / ``data=2 x tensor=4``: each
process loads its own half of every global batch) give the eval losses of the matching
one-process run. Before ``mesh.process_row_blocks``, ``tensor=8`` over two processes trained on
a batch of half the rows with different rows per "replica", and its step-0 eval loss differed.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.training import train_helpers as th

train = th.load_train()

# eval at steps 0, 2, 4: the initial model's loss checks the data layout, later ones the
# cross-process gradient reduction
OVER = dict(th.TINY_LM, num_steps=4, eval_every=2, log_every=2)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_process_run(workdir: pathlib.Path, mesh: dict) -> list[tuple[int, float]]:
  port = _free_port()
  procs, logs = [], []
  for pid in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    argv = th.argv("lm_tiny", workdir, dict(OVER, **{f"mesh.{k}": v for k, v in mesh.items()}))
    log = open(workdir.parent / f"{workdir.name}.{pid}.log", "w", encoding="utf-8")  # pylint: disable=consider-using-with
    logs.append(log)
    procs.append(subprocess.Popen([sys.executable, str(th.TRAIN)] + argv[1:], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=th.ROOT))
  try:
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  if codes != [0, 0]:
    tails = [pathlib.Path(log.name).read_text()[-3000:] for log in logs]
    pytest.fail(f"2-process run {mesh} exited with {codes}:\n" + "\n----\n".join(tails))
  return th.eval_losses(workdir)


def _close(got, want):
  assert [s for s, _ in got] == [s for s, _ in want] == [0, 2, 4]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=2e-5, atol=2e-5)


def test_two_processes_sharing_rows_match_one_process(tmp_path):
  """tensor=8 over 2 processes: one row block, loaded by both; equals 1 process x 8 devices."""
  one = tmp_path / "one"
  train.main(th.argv("lm_tiny", one, dict(OVER, **{"mesh.data": 1, "mesh.tensor": 8})))
  _close(_two_process_run(tmp_path / "two", {"data": 1, "tensor": 8}), th.eval_losses(one))


def test_two_processes_splitting_rows_agree_across_layouts(tmp_path):
  """data=8 and data=2 x tensor=4 over 2 processes: each loads its half of every batch (two row
  blocks); both layouts see the same rows and give the same losses."""
  a = _two_process_run(tmp_path / "data8", {"data": 8, "tensor": 1})
  b = _two_process_run(tmp_path / "data2_tensor4", {"data": 2, "tensor": 4})
  _close(b, a)
  assert a[-1][1] < a[0][1]   # it trains
