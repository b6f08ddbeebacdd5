"""Helpers shared by the experiment scripts: argparse ``type=`` validators, machine facts
(CPU, memory, versions, git revision), process memory counters and one-line error text.

Importing this module imports neither jax nor torch (``bench_context_parallel.py`` parses its
arguments before jax starts).

Validators turn a bad value into an argparse error (``error: argument --repeats: must be an
integer >= 1, got 0``) instead of a traceback from deep inside a run::

  ap.add_argument("--repeats", type=positive_int, default=5)
  ap.add_argument("--warmup", type=int_at_least(0), default=1)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess


def int_at_least(minimum: int):
  """argparse ``type=``: an int ``>= minimum``."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
    return value
  parse.__name__ = f"int >= {minimum}"   # argparse names the type in some messages
  return parse


def float_at_least(minimum: float, *, strict: bool = False):
  """argparse ``type=``: a finite float ``>= minimum`` (``> minimum`` with ``strict``)."""
  rel = ">" if strict else ">="

  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"must be a number {rel} {minimum:g}, got {text!r}")
    if value != value or value in (float("inf"), float("-inf")) or value < minimum or (
        strict and value == minimum):
      raise argparse.ArgumentTypeError(f"must be a finite number {rel} {minimum:g}, got {text}")
    return value
  parse.__name__ = f"float {rel} {minimum:g}"
  return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
positive_float = float_at_least(0.0, strict=True)
nonnegative_float = float_at_least(0.0)


# ------------------------------------------------------------------------------ machine facts
MIB = 1024.0 * 1024.0


def cores() -> int:
  """CPU cores this process may run on (its affinity), the count XLA:CPU uses."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is empty on Linux) and
  its vector extensions that matter for XLA:CPU, e.g. ``AMD EPYC 7B13 [avx2]``."""
  fallback = platform.processor() or platform.machine()
  model, flags = fallback, ""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    for line in info.splitlines():
      if line.startswith("model name") and model == fallback:
        model = line.split(":", 1)[1].strip()
      if line.startswith("flags") and not flags:
        fl = set(line.split(":", 1)[1].split())
        flags = " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                         if x in fl)
  except OSError:
    pass
  return f"{model} [{flags}]" if flags else model


def load_average() -> str:
  if not hasattr(os, "getloadavg"):
    return "?"
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_summary() -> str:
  """One line naming the machine: CPU model, usable cores, load average."""
  return (f"CPU {cpu_model()}, {cores()} cores usable (os.cpu_count()={os.cpu_count()}), "
          f"load average {load_average()}")


def meminfo_kib(field: str) -> float:
  """A /proc/meminfo field in KiB (``MemTotal``, ``MemAvailable``); 8 GiB when unreadable."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith(field + ":"):
          return float(line.split()[1])
  except OSError:
    pass
  return 8 * 1024 * 1024.0


def dist_version(dist_name: str) -> str | None:
  """Installed version of a distribution, without importing it (torch imports slowly)."""
  try:
    return importlib.metadata.version(dist_name)
  except importlib.metadata.PackageNotFoundError:
    return None


def git_rev() -> str:
  """The checkout's short HEAD commit, ``+dirty`` with uncommitted changes to tracked files."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                         text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return (rev + ("+dirty" if dirty else "")) or "?"
  except Exception:  # noqa: BLE001
    return "?"


# ---------------------------------------------------------------------------- process memory
def rss_reset() -> int | None:
  """Reset the peak-RSS counter (Linux clear_refs) and return the current RSS in bytes."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return status_bytes("VmRSS")
  except OSError:
    return None


def status_bytes(field: str) -> int | None:
  """A /proc/self/status field (``VmRSS``, ``VmHWM``) in bytes, or None."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def short_error(e: BaseException, n=160) -> str:
  """``Type: message`` on one line, cut to ``n`` characters of message."""
  msg = " ".join(str(e).split())
  return f"{type(e).__name__}: {msg[:n]}{'...' if len(msg) > n else ''}"
