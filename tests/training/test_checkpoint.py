"""Checkpoints: SIGKILL + resume reaches the same parameters as an uninterrupted run; corrupt,
incompatible and would-be-overwritten checkpoints give clear errors and are left untouched."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from attnjax.training import CheckpointError
from tests.training import train_helpers as th

train = th.load_train()

# One device, checkpoints every 4 steps (async), tiny model.
BASE = dict(th.TINY_LM, **{"mesh.num_devices": 1, "checkpoint.every": 4,
                           "checkpoint.max_to_keep": 3, "log_every": 2})


def _steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _digest(path) -> str:
  h = hashlib.sha256()
  for p in sorted(pathlib.Path(path).rglob("*")):
    if p.is_file():
      h.update(str(p.relative_to(path)).encode())
      h.update(p.read_bytes())
  return h.hexdigest()


def _assert_same_params(a, b):
  la, lb = jax.tree.leaves(th.params_np(a)), jax.tree.leaves(th.params_np(b))
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
  over = dict(BASE, num_steps=80, eval_every=40)
  killed = tmp_path / "killed"
  cmd = [sys.executable, str(th.TRAIN)] + th.argv("lm_tiny", killed, over)[1:]
  proc = subprocess.Popen(cmd, cwd=th.ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=dict(os.environ))
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not _steps(killed):
      time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert _steps(killed), "no checkpoint was written in time"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.stderr.close()
  saved = _steps(killed)
  assert saved and saved[-1] < 80
  resumed = train.main(th.argv("lm_tiny", killed, over, "--resume"))
  assert 0 < resumed.summary["resumed_from"] < 80
  reference = train.main(th.argv("lm_tiny", tmp_path / "ref", over))
  assert reference.summary["resumed_from"] == 0
  _assert_same_params(resumed.state, reference.state)
  assert int(resumed.state["step"]) == int(reference.state["step"]) == 80


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 12-step run with checkpoints at steps 4, 8 and 12."""
  wd = tmp_path_factory.mktemp("finished")
  res = train.main(th.argv("lm_tiny", wd, BASE))
  assert _steps(wd) == [4, 8, 12]
  return wd, res


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_refuses_to_overwrite_without_resume(finished_run, tmp_path):
  wd = _copy(finished_run[0], tmp_path / "wd")
  before = _digest(wd / "checkpoints")
  with pytest.raises(CheckpointError, match="already holds checkpoints.*--resume"):
    train.main(th.argv("lm_tiny", wd, BASE))
  assert _digest(wd / "checkpoints") == before


def test_corrupt_checkpoint_clear_error_and_previous_kept(finished_run, tmp_path):
  wd = _copy(finished_run[0], tmp_path / "wd")
  good = _digest(wd / "checkpoints" / "8")
  data_files = [p for p in (wd / "checkpoints" / "12" / "state").rglob("*")
                if p.is_file() and "ocdbt.process" in str(p) and p.stat().st_size > 0]
  assert data_files
  for p in data_files:  # garbage in every array data file of the latest checkpoint
    p.write_bytes(b"\x00garbage" * 7)
  with pytest.raises(CheckpointError, match=r"checkpoints/12.*left untouched"):
    train.main(th.argv("lm_tiny", wd, BASE, "--resume"))
  assert _steps(wd) == [4, 8, 12]
  assert _digest(wd / "checkpoints" / "8") == good
  # Resuming the previous good one is refused while the corrupt one would be overwritten ...
  with pytest.raises(CheckpointError, match=r"later checkpoints \[12\].*Move them"):
    train.main(th.argv("lm_tiny", wd, BASE, "--resume", "--resume_step=8"))
  assert _steps(wd) == [4, 8, 12]
  # ... and once it is moved away, --resume continues from step 8 and finishes the run.
  (wd / "checkpoints" / "12").rename(wd / "bad-12")
  res = train.main(th.argv("lm_tiny", wd, BASE, "--resume"))
  assert res.summary["resumed_from"] == 8
  _assert_same_params(res.state, finished_run[1].state)


def test_incompatible_checkpoint_lists_mismatches(finished_run, tmp_path):
  wd = _copy(finished_run[0], tmp_path / "wd")
  before = _digest(wd / "checkpoints")
  with pytest.raises(CheckpointError, match=r"(?s)does not match.*shape mismatch: params/embedding"):
    train.main(th.argv("lm_tiny", wd, dict(BASE, **{"model.d_model": 48}), "--resume"))
  assert _digest(wd / "checkpoints") == before


def test_resume_of_finished_run_is_a_no_op(finished_run, tmp_path):
  wd = _copy(finished_run[0], tmp_path / "wd")
  res = train.main(th.argv("lm_tiny", wd, BASE, "--resume"))
  assert res.summary["resumed_from"] == 12
  _assert_same_params(res.state, finished_run[1].state)


def _records(workdir) -> list[dict]:
  """metrics.jsonl without the wall-clock throughput entries."""
  recs = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]
  return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in recs]


def test_resumed_run_logs_the_records_of_the_uninterrupted_run(tmp_path):
  # log_every=3 with checkpoints every 4: the checkpoints at 4 and 8 cut the log windows 4-6
  # and 7-9. A run stopped after either checkpoint and resumed writes the same train records
  # (same steps, same averages) and eval records as the run that was never stopped.
  over = dict(BASE, num_steps=10, log_every=3, eval_every=5)
  ref = tmp_path / "ref"
  train.main(th.argv("lm_tiny", ref, over))
  assert _steps(ref) == [4, 8, 10]
  expected = _records(ref)
  assert [r["step"] for r in expected if r["split"] == "train"] == [3, 6, 9, 10]
  assert [r["step"] for r in expected if r["split"] == "eval"] == [0, 5, 10]
  for stop in (4, 8):  # as if killed after the checkpoint of `stop` (later records dropped)
    wd = _copy(ref, tmp_path / f"stopped{stop}")
    for s in _steps(wd):
      if s > stop:
        shutil.rmtree(wd / "checkpoints" / str(s))
    res = train.main(th.argv("lm_tiny", wd, over, "--resume"))
    assert res.summary["resumed_from"] == stop
    assert _records(wd) == expected, stop
    # TensorBoard: replaying the event files as TensorBoard does (purging at a restart) gives
    # the uninterrupted run's scalars, not the stopped run's later points twice
    want_tb, got_tb = _tensorboard_scalars(ref), _tensorboard_scalars(wd)
    assert {t for t in want_tb if not t.endswith("_per_s")} >= {"train/loss", "eval/loss"}
    for tag, points in want_tb.items():
      if tag.endswith("_per_s"):   # wall-clock throughput: differs, and is not logged for
        # the resumed run's first window (its time before the checkpoint is unknown)
        assert {s for s, _ in got_tb[tag]} <= {s for s, _ in points}, tag
      else:
        assert got_tb[tag] == points, (stop, tag)


def _tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """``tag -> [(step, value)]`` from ``workdir/tb``'s event files, read in file order with
  TensorBoard's restart rule: a ``SessionLog.START`` event at step ``s`` discards the points
  already read at steps ``>= s`` (what ``SummaryWriter(purge_step=s)`` writes)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  import struct  # pylint: disable=import-outside-toplevel
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted((pathlib.Path(workdir) / "tb").glob("events.out.tfevents.*")):
    data, off = path.read_bytes(), 0
    while off < len(data):   # TFRecord: u64 length, u32 crc, payload, u32 crc
      (n,) = struct.unpack_from("<Q", data, off)
      event = event_pb2.Event.FromString(data[off + 12: off + 12 + n])
      off += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        scalars = {t: [(s, v) for s, v in pts if s < event.step] for t, pts in scalars.items()}
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, round(value.simple_value, 5)))
  return scalars
