"""Synthetic sequence tasks generated on the fly, deterministically from the index.

Example ``i`` of split ``s`` is drawn with ``numpy.random.default_rng([data_seed, s, i])``
(``s = 0`` for train, ``1`` for eval; ``data_seed = cfg.data_seed``, default 0), so the train and
eval sets are fixed, disjoint draws that do not depend on the training seed (``make_dataset``'s
``seed`` only sets the order of the train examples). The sets are the same on every machine for a
given numpy version. Each split has a fixed size (``cfg.num_train_examples``, default 100,000;
``cfg.num_eval_examples``, default 3,000: Zoology's MQAR set sizes); the train split repeats.

Batches are the text format ``{"inputs", "targets", "weights"}`` with ``[B, T]`` arrays, but the
targets are task answers, *not* the inputs shifted: the loss is meant to be
``sum(weights * xent(logits, targets)) / sum(weights)`` and accuracy is measured where
``weights == 1``.

``mqar`` -- multi-query associative recall, as defined in Zoology (S. Arora, S. Eyuboglu,
A. Timalsina, I. Johnson, M. Poli, J. Zou, A. Rudra, C. Ré, "Zoology: Measuring and Improving
Recall in Efficient Language Models", arXiv:2312.04927, 2023). With vocabulary ``V``, length
``T`` and ``K = num_kv_pairs``:

* keys are ``K`` distinct tokens from ``[1, V // 2)``, values ``K`` distinct tokens from
  ``[V // 2, V)``; token 0 is the filler;
* positions ``0 .. 2K-1`` hold the pairs ``k_1 v_1 k_2 v_2 ... k_K v_K``;
* every key is queried once, in random order, at even offsets ``2K + 2j`` of the rest of the
  sequence (so two queries are never adjacent); the gaps ``j`` are drawn without replacement
  from a power law ``P(j) ∝ (j + 1) ** (power_a - 1)`` (one at a time, renormalizing over the
  gaps left; drawn with the Gumbel top-k trick) (``cfg.power_a``, default 0.01 as in
  Zoology), which favours queries soon after the context; all other positions are 0;
* at a query position ``p`` holding key ``k_m``: ``targets[p] = v_m`` and ``weights[p] = 1``;
  everywhere else ``targets = 0`` and ``weights = 0``. (This is Zoology's layout: the value is
  never shown after the query; the model predicts it at the key's position.)

Requires ``K <= V // 2 - 1`` and ``T >= 4K``. cfg: ``vocab_size`` (8192), ``seq_len`` (128),
``num_kv_pairs`` (8), ``power_a`` (0.01).

``copy`` -- copy a random prefix after a separator. Token 0 is padding, 1 the separator, content
tokens are uniform in ``[2, V)``. The sequence is ``x = c_1 .. c_L, 1, c_1 .. c_L, 0 ...`` of
length ``T + 1``; ``inputs = x[:-1]``, ``targets = x[1:]`` (next-token), and ``weights`` are 1 only
at the ``L`` positions ``L .. 2L-1`` whose targets are the copy (the separator predicts ``c_1``).
cfg: ``vocab_size`` (16), ``seq_len`` (64), ``copy_len`` (``seq_len // 2``; needs
``2 * copy_len <= seq_len``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from attnjax.data.base import DatasetInfo, Source, cfg_get, positive_int
from attnjax.data.text import text_pad

_SPLIT_ID = {"train": 0, "eval": 1}


def _sizes(cfg: Mapping[str, Any], split: str) -> int:
  if split == "train":
    return positive_int(cfg, "num_train_examples", 100_000)
  return positive_int(cfg, "num_eval_examples", 3_000)


def _data_seed(cfg: Mapping[str, Any]) -> int:
  seed = int(cfg_get(cfg, "data_seed", 0))
  if seed < 0:
    raise ValueError(f"cfg.data_seed must be >= 0, got {seed}")
  return seed


class MQARExample:
  """Example generator for ``mqar`` (see the module docstring for the exact layout)."""

  def __init__(self, *, data_seed: int, split_id: int, vocab_size: int, seq_len: int,
               num_kv_pairs: int, power_a: float):
    self.data_seed, self.split_id = data_seed, split_id
    self.vocab_size, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
    num_slots = (seq_len - 2 * num_kv_pairs) // 2
    self.log_gap_weights = (power_a - 1.0) * np.log(np.arange(num_slots) + 1.0)

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.data_seed, self.split_id, int(index)])
    v, t, k = self.vocab_size, self.seq_len, self.num_kv_pairs
    keys = 1 + rng.choice(v // 2 - 1, size=k, replace=False)
    values = v // 2 + rng.choice(v - v // 2, size=k, replace=False)
    # k gaps without replacement, P ∝ weights (Gumbel top-k: same law as drawing one at a time).
    scores = self.log_gap_weights + rng.gumbel(size=len(self.log_gap_weights))
    gaps = np.argsort(-scores, kind="stable")[:k]
    order = rng.permutation(k)
    inputs = np.zeros(t, np.int32)
    targets = np.zeros(t, np.int32)
    weights = np.zeros(t, np.float32)
    inputs[0:2 * k:2] = keys
    inputs[1:2 * k:2] = values
    query_pos = 2 * k + 2 * gaps
    inputs[query_pos] = keys[order]
    targets[query_pos] = values[order]
    weights[query_pos] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


def mqar_source(cfg: Mapping[str, Any], split: str) -> Source:
  vocab_size = positive_int(cfg, "vocab_size", 8192)
  seq_len = positive_int(cfg, "seq_len", 128)
  num_kv_pairs = positive_int(cfg, "num_kv_pairs", 8)
  power_a = float(cfg_get(cfg, "power_a", 0.01))
  if num_kv_pairs > vocab_size // 2 - 1:
    raise ValueError(f"mqar needs num_kv_pairs <= vocab_size // 2 - 1 distinct keys; got "
                     f"num_kv_pairs={num_kv_pairs}, vocab_size={vocab_size}")
  if seq_len < 4 * num_kv_pairs:
    raise ValueError(f"mqar needs seq_len >= 4 * num_kv_pairs (context plus one even query slot "
                     f"per key); got seq_len={seq_len}, num_kv_pairs={num_kv_pairs}")
  if not power_a > 0:
    raise ValueError(f"cfg.power_a must be > 0, got {power_a}")
  n = _sizes(cfg, split)
  gen = MQARExample(data_seed=_data_seed(cfg), split_id=_SPLIT_ID[split], vocab_size=vocab_size,
                    seq_len=seq_len, num_kv_pairs=num_kv_pairs, power_a=power_a)
  info = DatasetInfo(
      name="mqar", split=split, kind="text", num_examples=n, vocab_size=vocab_size,
      seq_len=seq_len,
      description=(f"MQAR (Zoology, Arora et al. 2023): {num_kv_pairs} key-value pairs, "
                   f"vocab {vocab_size}, length {seq_len}; loss only at query positions"))
  return Source(info=info, num_examples=n, get=gen, pad=text_pad(seq_len))


class CopyExample:
  """Example generator for ``copy`` (see the module docstring)."""

  def __init__(self, *, data_seed: int, split_id: int, vocab_size: int, seq_len: int,
               copy_len: int):
    self.data_seed, self.split_id = data_seed, split_id
    self.vocab_size, self.seq_len, self.copy_len = vocab_size, seq_len, copy_len

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.data_seed, self.split_id, int(index)])
    t, n = self.seq_len, self.copy_len
    content = rng.integers(2, self.vocab_size, size=n)
    x = np.zeros(t + 1, np.int32)
    x[:n] = content
    x[n] = 1
    x[n + 1:2 * n + 1] = content
    weights = np.zeros(t, np.float32)
    weights[n:2 * n] = 1.0
    return {"inputs": x[:-1].copy(), "targets": x[1:].copy(), "weights": weights}


def copy_source(cfg: Mapping[str, Any], split: str) -> Source:
  vocab_size = positive_int(cfg, "vocab_size", 16)
  seq_len = positive_int(cfg, "seq_len", 64)
  copy_len = positive_int(cfg, "copy_len", max(seq_len // 2, 1))
  if vocab_size < 3:
    raise ValueError(f"copy needs vocab_size >= 3 (pad, separator, content); got {vocab_size}")
  if 2 * copy_len > seq_len:
    raise ValueError(f"copy needs 2 * copy_len <= seq_len; got copy_len={copy_len}, "
                     f"seq_len={seq_len}")
  n = _sizes(cfg, split)
  gen = CopyExample(data_seed=_data_seed(cfg), split_id=_SPLIT_ID[split], vocab_size=vocab_size,
                    seq_len=seq_len, copy_len=copy_len)
  info = DatasetInfo(
      name="copy", split=split, kind="text", num_examples=n, vocab_size=vocab_size,
      seq_len=seq_len,
      description=(f"copy task: {copy_len} random tokens, separator, copy; vocab {vocab_size}, "
                   f"length {seq_len}; loss only on the copy"))
  return Source(info=info, num_examples=n, get=gen, pad=text_pad(seq_len))
