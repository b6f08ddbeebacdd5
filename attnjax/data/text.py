"""Byte-level text: the embedded ``stdlib_text`` corpus and the shared window / sentence examples.

Tokens are raw bytes (``vocab_size = 256``; no token is reserved, padding uses byte 0 with weight
0). A *stream* (one long byte string) is cut into windows of ``seq_len + 1`` bytes with stride
``seq_len``: window ``i`` covers bytes ``[i*T, i*T + T + 1)``, ``inputs = w[:-1]``,
``targets = w[1:]``, so every byte after the first is a target exactly once. The train split keeps
only full windows; the eval split also keeps the last partial window, padded with weight 0, so
the eval loss covers every byte of the eval split (``sum(weights) == len(stream) - 1``).

``stdlib_text``
  The ``.py`` files of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``), walked without following symlinks and sorted by their
  relative POSIX path. Skipped so that Debian/Ubuntu and upstream builds of one Python version
  agree: the ``site-packages``/``dist-packages`` directories, test directories (``test``,
  ``tests``, ``idle_test``: Debian ships them separately) and the build-specific
  ``_sysconfigdata*`` files. A file is in the eval split iff
  ``int(sha256(relpath).hexdigest(), 16) % 10000 < eval_percent * 100`` (default 5 %), a fixed
  split by file, independent of the seed. The files of a split are concatenated as bytes in
  sorted order (no separator) and, with ``cfg.max_bytes``, truncated to that many bytes per split.
  The corpus is deterministic for a given Python version and build; **different Python versions
  give different corpora** (and distributions that patch the standard library may differ too), so
  compare numbers only across runs on the same Python.

  cfg keys: ``seq_len`` (default 256), ``max_bytes`` (default: all, ~12 MB on CPython 3.11),
  ``eval_percent`` (default 5), ``stdlib_dir`` (default: the running interpreter's).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from typing import Any, Mapping

import numpy as np

from attnjax.data.base import DatasetInfo, Source, cfg_get, positive_int

VOCAB_SIZE = 256
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__"})


# --------------------------------------------------------------------------- stream windows


class StreamWindows:
  """Example ``i`` of a byte stream cut into ``seq_len + 1`` windows with stride ``seq_len``."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens = tokens
    self.seq_len = seq_len

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    t = self.seq_len
    window = self.tokens[index * t: index * t + t + 1].astype(np.int32)
    n_targets = len(window) - 1
    inputs = np.zeros(t, np.int32)
    targets = np.zeros(t, np.int32)
    weights = np.zeros(t, np.float32)
    inputs[:n_targets] = window[:-1]
    targets[:n_targets] = window[1:]
    weights[:n_targets] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}

  def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorized ``__call__`` over an int array of window indices."""
    t = self.seq_len
    positions = np.asarray(indices, np.int64)[:, None] * t + np.arange(t + 1)
    valid = positions < len(self.tokens)
    window = np.where(valid, self.tokens[np.minimum(positions, len(self.tokens) - 1)], 0)
    window = window.astype(np.int32)
    weights = valid[:, 1:]
    return {"inputs": np.where(weights, window[:, :-1], 0), "targets": window[:, 1:],
            "weights": weights.astype(np.float32)}


def text_pad(seq_len: int) -> dict[str, np.ndarray]:
  return {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
          "weights": np.zeros(seq_len, np.float32)}


def num_windows(num_tokens: int, seq_len: int, split: str) -> int:
  """Full windows for train; full plus the last partial one for eval (see module doc)."""
  if num_tokens < 2:
    return 0
  if split == "train":
    return (num_tokens - 1) // seq_len
  return -(-(num_tokens - 1) // seq_len)


def stream_source(tokens: np.ndarray, *, name: str, split: str, seq_len: int,
                  description: str) -> Source:
  n = num_windows(len(tokens), seq_len, split)
  info = DatasetInfo(name=name, split=split, kind="text", num_examples=n,
                     description=description, vocab_size=VOCAB_SIZE, seq_len=seq_len,
                     bytes_per_token=1.0)
  windows = StreamWindows(tokens, seq_len)
  return Source(info=info, num_examples=n, get=windows, pad=text_pad(seq_len), tokens=tokens,
                get_batch=windows.batch)


class PaddedSentences:
  """Example ``i``: the UTF-8 bytes of ``texts[i]`` followed by ``b"\\n"`` (end of sentence),
  cut to ``seq_len + 1`` bytes and padded with 0; ``weights`` are 1 where the target is a real
  byte. One sentence per row, no packing."""

  def __init__(self, texts, seq_len: int, key: str = "text"):
    self.texts = texts
    self.seq_len = seq_len
    self.key = key

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    record = self.texts[index]
    text = record[self.key] if isinstance(record, Mapping) else record
    data = to_bytes(text) + b"\n"
    window = np.frombuffer(data[: self.seq_len + 1], np.uint8)
    return StreamWindows(window, self.seq_len)(0)


def to_bytes(text: Any) -> bytes:
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, str):
    return text.encode("utf-8")
  return bytes(text)


# --------------------------------------------------------------------------- stdlib corpus


def stdlib_files(root: str) -> list[str]:
  """Relative POSIX paths of the corpus files under ``root``, sorted (see module doc)."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    rel_dir = os.path.relpath(dirpath, root)
    for fname in filenames:
      if not fname.endswith(".py") or fname.startswith("_sysconfigdata"):
        continue
      full = os.path.join(dirpath, fname)
      if os.path.islink(full) or not os.path.isfile(full):
        continue
      rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
      found.append(rel.replace(os.sep, "/"))
  return sorted(found)


def stdlib_split_of(relpath: str, eval_percent: float) -> str:
  """``"eval"`` or ``"train"``: a fixed split by a hash of the relative path."""
  bucket = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest(), 16) % 10000
  return "eval" if bucket < eval_percent * 100 else "train"


@functools.lru_cache(maxsize=8)
def _stdlib_tokens(root: str, split: str, max_bytes: int | None,
                   eval_percent: float) -> np.ndarray:
  chunks, total = [], 0
  for rel in stdlib_files(root):
    if stdlib_split_of(rel, eval_percent) != split:
      continue
    with open(os.path.join(root, rel), "rb") as f:
      data = f.read()
    chunks.append(data)
    total += len(data)
    if max_bytes is not None and total >= max_bytes:
      break
  tokens = np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)
  tokens.flags.writeable = False
  return tokens


def _stdlib_params(cfg: Mapping[str, Any]) -> tuple[str, int | None, float]:
  root = str(cfg_get(cfg, "stdlib_dir", sysconfig.get_paths()["stdlib"]))
  max_bytes = positive_int(cfg, "max_bytes", None)
  eval_percent = float(cfg_get(cfg, "eval_percent", 5.0))
  if not 0.0 < eval_percent < 100.0:
    raise ValueError(f"cfg.eval_percent must be in (0, 100), got {eval_percent!r}")
  if not os.path.isdir(root):
    raise ValueError(f"cfg.stdlib_dir={root!r} is not a directory")
  return root, max_bytes, eval_percent


def stdlib_text_source(cfg: Mapping[str, Any], split: str) -> Source:
  root, max_bytes, eval_percent = _stdlib_params(cfg)
  seq_len = positive_int(cfg, "seq_len", 256)
  tokens = _stdlib_tokens(root, split, max_bytes, eval_percent)
  desc = (f"Python standard library .py sources from {root} (Python "
          f"{sysconfig.get_python_version()}), {split} split ({len(tokens)} bytes; eval = "
          f"{eval_percent}% of files by path hash), byte-level")
  return stream_source(tokens, name="stdlib_text", split=split, seq_len=seq_len,
                       description=desc)


# --------------------------------------------------------------------------- baseline


def unigram_cross_entropy_bits(train_tokens: np.ndarray, eval_tokens: np.ndarray | None = None,
                               vocab_size: int = VOCAB_SIZE, *,
                               eval_counts: np.ndarray | None = None) -> float:
  """Bits per token of the add-one-smoothed unigram distribution of ``train_tokens`` evaluated
  on ``eval_tokens``: ``-mean(log2 p(x))`` with ``p = (count + 1) / (N + vocab_size)``. Instead
  of ``eval_tokens``, ``eval_counts`` (``[vocab_size]``, float or int) may give how often each
  token is evaluated (a weighted mean then)."""
  if (eval_tokens is None) == (eval_counts is None):
    raise ValueError("give exactly one of eval_tokens and eval_counts")
  counts = np.bincount(np.asarray(train_tokens, np.int64), minlength=vocab_size) + 1.0
  log_p = np.log2(counts) - np.log2(counts.sum())
  if eval_counts is None:
    eval_counts = np.bincount(np.asarray(eval_tokens, np.int64), minlength=vocab_size)
  eval_counts = np.asarray(eval_counts, np.float64)
  if eval_counts.shape != log_p.shape:
    raise ValueError(f"eval_counts has shape {eval_counts.shape}, expected ({len(log_p)},) "
                     f"(one count per token id)")
  if eval_counts.sum() <= 0:
    raise ValueError("the eval split is empty")
  return float(-(eval_counts * log_p).sum() / eval_counts.sum())
