"""Metric sinks: JSON lines, TensorBoard, the curves plot and the summary file.

TensorBoard events are written with ``tensorboardX`` (a small pure-Python writer: numpy and
protobuf, no TensorFlow; flax's metric writers would pull in ``clu``). It is optional: without
it only ``metrics.jsonl`` is written and a warning says so. Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "curves.png"


def _plain(v):
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return f if math.isfinite(f) else str(f)


class MetricWriter:
  """Appends ``{"step", "split", **metrics}`` records to ``workdir/metrics.jsonl`` and scalars
  ``<split>/<name>`` to TensorBoard under ``workdir/tb``. ``resume_step``: the checkpoint step a
  resumed run starts from; records logged after it are dropped from ``metrics.jsonl`` and
  purged from TensorBoard's view (``purge_step``), so both show the uninterrupted run's curve."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None:
      truncate_after(self.path, resume_step)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        # A resumed run starts its event file with a SessionLog.START at resume_step + 1:
        # TensorBoard then discards the earlier files' events from that step on (those the
        # stopped run logged after its checkpoint), as truncate_after does for metrics.jsonl.
        purge = None if resume_step is None else int(resume_step) + 1
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)
      except ImportError:
        log.warning("tensorboardX is not installed: TensorBoard events are not written "
                    "(metrics.jsonl still is); pip install tensorboardX")

  def write(self, step: int, split: str, metrics: dict[str, Any]):
    if not self.enabled:
      return
    rec = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      for k, v in rec.items():
        if k not in ("step", "split") and isinstance(v, float):
          self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


def read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a killed process
          continue
  return out


def truncate_after(path: str, step: int):
  """Drop records logged after ``step`` (a run resumed from the checkpoint of ``step`` logs them
  again; its first train record also covers the steps before ``step`` in its window, from the
  checkpoint) and torn lines."""
  recs = read_metrics(path)
  if not recs:
    return
  keep = [r for r in recs if int(r.get("step", 0)) <= step]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in keep:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def plot_curves(workdir: str, kind: str) -> str | None:
  """Train/eval loss and bits/byte (LMs on bytes) or accuracy against step, saved as
  ``curves.png``."""
  recs = read_metrics(os.path.join(workdir, METRICS_FILE))
  if not recs:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  has_bpb = kind == "lm" and any("bits_per_byte" in r for r in recs)
  second = "bits_per_byte" if has_bpb else "accuracy"
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for split, style in (("train", "-"), ("eval", "o-")):
    rs = [r for r in recs if r.get("split") == split]
    for ax, key in zip(axes, ("loss", second)):
      pts = [(r["step"], r[key]) for r in rs if isinstance(r.get(key), float)]
      if pts:
        ax.plot(*zip(*pts), style, label=split, markersize=3)
  axes[0].set_ylabel("loss (nats)")
  axes[1].set_ylabel(second.replace("_", " "))
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, PLOT_FILE)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_summary(workdir: str, summary: dict) -> str:
  path = os.path.join(workdir, SUMMARY_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, default=_plain)
  return path


def safe_bytes(data: bytes) -> str:
  """Bytes shown safely: printable ASCII, newlines and tabs as is, everything else escaped."""
  out = []
  for b in data:
    c = chr(b)
    if c in "\n\t" or 32 <= b < 127:
      out.append(c)
    else:
      out.append(f"\\x{b:02x}")
  return "".join(out)
