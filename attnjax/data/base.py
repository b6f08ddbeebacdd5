"""Shared pieces of the input pipelines: dataset info, the example-source protocol and the grain
pipeline that turns a source into sharded, shuffled, batched, checkpointable iterators.

Every source is *random access*: it knows its number of examples ``n`` and returns example ``i``
(a dict of numpy arrays) from the index alone. The pipeline is therefore a ``grain.MapDataset``
over batch indices and the iterator state is a single integer, which makes saving and restoring
the exact position cheap and exact.

Pipeline semantics (``build_dataset``):

* **Sharding** follows ``grain.sharding.ShardOptions(shard_index, shard_count,
  drop_remainder=True)``: each shard gets a contiguous block of indices.
  - train: ``n // shard_count`` examples per shard (the last ``n % shard_count`` examples are
    dropped) so every host has the same number of steps;
  - eval: the index range is first padded to a multiple of ``shard_count * batch_size``; indices
    ``>= n`` are *padding examples* (all zeros, with ``weights``/``mask`` 0), so every shard yields
    the same number of full batches and every real example is seen exactly once.
* **Order**: train examples are shuffled within the shard, with a fresh permutation per epoch:
  epoch ``e`` visits ``numpy.random.default_rng([seed, shard_index, e]).permutation`` of the
  shard's indices, and the epochs follow each other as one stream cut into batches (a batch may
  straddle two epochs). The order is a function of ``(seed, shard_index, shard_count)`` and the
  numpy version only. Eval is in index order and is not shuffled. (The permutation is computed
  per batch with numpy rather than with ``MapDataset.shuffle``, which costs ~0.3 ms per element
  in grain 0.2.18.)
* **Epochs**: train repeats ``num_epochs`` times (``None`` = forever); eval makes ``num_epochs``
  passes (``None`` = one pass).
* **Batching**: train yields only full batches (``floor(num_epochs * per_shard / batch_size)``
  of them); eval batches are always full thanks to the padding above.
* **Iteration and state**: a ``grain.MapDataset`` over batch indices (``range(num_batches)``
  mapped to example indices, then to the batch), iterated by ``to_iter_dataset()`` with
  ``cfg.read_threads`` prefetch threads; the state is ``{"next_index": batch}`` (another format
  with ``cfg.worker_count > 0``, see ``Dataset``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

SPLITS = ("train", "eval")


class DataUnavailableError(FileNotFoundError):
  """A dataset's files are not on this machine; the message says how to get them."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model needs to know about a dataset.

  Attributes:
    name: the registry name (``cfg.name``).
    split: ``"train"`` or ``"eval"``.
    kind: ``"text"`` (batches ``inputs``/``targets``/``weights``) or ``"image"`` (batches
      ``image``/``label``/``mask``).
    num_examples: real examples in the whole split (all shards, before padding or dropping):
      windows or sequences for text, images for images.
    description: one line on the source and its split.
    vocab_size: text only: token ids are in ``[0, vocab_size)``.
    seq_len: text only: ``T`` of ``inputs [B, T]``.
    num_classes: images only: labels are in ``[0, num_classes)``.
    image_shape: images only: ``(H, W, C)``.
    bytes_per_token: text only: bytes of text per token (``1.0`` for the byte-level corpora);
      ``None`` when tokens are not text bytes (``mqar``, ``copy``), whatever ``vocab_size`` is.
  """

  name: str
  split: str
  kind: str
  num_examples: int
  description: str
  vocab_size: int | None = None
  seq_len: int | None = None
  num_classes: int | None = None
  image_shape: tuple[int, int, int] | None = None
  bytes_per_token: float | None = None


@dataclasses.dataclass(frozen=True)
class Source:
  """A random-access split: ``get(i)`` for ``0 <= i < num_examples`` returns one example (a dict
  of numpy arrays, no batch axis); ``pad`` is the example used for eval padding (same keys,
  shapes and dtypes, with ``weights``/``mask`` 0). ``tokens`` is the split's token stream for
  stream-cut text sources (used by ``unigram_bits_per_byte``), else ``None``. ``get_batch``,
  when given, is a vectorized ``get``: int array ``[B]`` of valid indices -> batched dict."""

  info: DatasetInfo
  num_examples: int
  get: Callable[[int], dict[str, np.ndarray]]
  pad: dict[str, np.ndarray]
  tokens: np.ndarray | None = None
  get_batch: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None


def cfg_get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
  """``cfg[key]`` for a dict or an ml_collections ConfigDict, ``default`` when absent or None."""
  try:
    value = cfg.get(key, default)
  except AttributeError:  # a plain Mapping without .get
    value = cfg[key] if key in cfg else default
  return default if value is None else value


def positive_int(cfg: Mapping[str, Any], key: str, default: int | None) -> int | None:
  value = cfg_get(cfg, key, default)
  if value is None:
    return None
  if isinstance(value, bool) or int(value) != value or int(value) <= 0:
    raise ValueError(f"cfg.{key} must be a positive integer, got {value!r}")
  return int(value)


class _BatchLookup:
  """Batch of example indices ``[B]`` -> batched example dict; indices ``>= num_examples`` give
  the padding example. A picklable class (not a lambda) so the pipeline also works with grain's
  multiprocessing prefetch."""

  def __init__(self, source: Source):
    self._get = source.get
    self._get_batch = source.get_batch
    self._n = source.num_examples
    self._pad = source.pad

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    real = indices < self._n
    if self._get_batch is not None:
      out = self._get_batch(np.where(real, indices, 0))
      if not real.all():
        for k, v in self._pad.items():
          out[k][~real] = v
      return out
    examples = [self._get(int(i)) if r else self._pad for i, r in zip(indices, real)]
    return {k: np.stack([e[k] for e in examples]) for k in self._pad}


_INFINITE = 2**62  # "forever": batch indices of an endless train stream


class _TrainBatchIndices:
  """Train batch ``b`` -> example indices: positions ``b*B .. b*B+B-1`` of the endless stream
  ``epoch 0, epoch 1, ...``, epoch ``e`` being ``start + permutation_e(per_shard)`` with
  ``permutation_e = numpy.random.default_rng([seed, shard_index, e]).permutation``."""

  def __init__(self, *, start: int, per_shard: int, batch_size: int, seed: int,
               shard_index: int):
    self.start, self.per_shard, self.batch_size = start, per_shard, batch_size
    self.seed, self.shard_index = seed, shard_index
    self._cache: dict[int, np.ndarray] = {}

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_cache"} | {"_cache": {}}

  def _permutation(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)
    if perm is None:
      rng = np.random.default_rng([self.seed, self.shard_index, epoch])
      dtype = np.int32 if self.per_shard < 2**31 else np.int64
      perm = rng.permutation(self.per_shard).astype(dtype)
      if len(self._cache) >= 2:  # batches touch at most two consecutive epochs
        self._cache.pop(min(self._cache), None)
      self._cache[epoch] = perm
    return perm

  def __call__(self, batch_index: int) -> np.ndarray:
    positions = int(batch_index) * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, self.per_shard)
    out = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._permutation(int(epoch))[offsets[sel]]
    return self.start + out


class _EvalBatchIndices:
  """Eval batch ``b`` -> example indices ``start + (b*B mod per_shard) + [0, B)``, in order."""

  def __init__(self, *, start: int, per_shard: int, batch_size: int):
    self.start, self.per_shard, self.batch_size = start, per_shard, batch_size

  def __call__(self, batch_index: int) -> np.ndarray:
    first = int(batch_index) * self.batch_size % self.per_shard
    return self.start + first + np.arange(self.batch_size, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A batched, sharded input pipeline.

  Attributes:
    info: the ``DatasetInfo`` of the split.
    dataset: the batched ``grain.MapDataset`` (random access over batch indices).
    num_batches: batches one ``iterator()`` yields on this shard, ``None`` when infinite.
    read_options: grain ``ReadOptions`` (prefetch threads and buffer) used by ``iterator()``.
    worker_count: with ``> 0``, ``iterator()`` adds grain's multiprocessing prefetch with that
      many worker processes (``cfg.worker_count``; default 0 = threads only). Same batches in the
      same order, but a different state format; grain's workers read absl flags, so the
      script must have parsed them (``absl.app.run`` does).
  """

  info: DatasetInfo
  dataset: Any
  num_batches: int | None
  read_options: Any
  worker_count: int = 0

  def iterator(self):
    """A fresh ``grain.DatasetIterator`` from the start, yielding dicts of numpy arrays.

    ``it.get_state()`` is a small JSON-serialisable dict and ``it.set_state(state)`` on a fresh
    iterator of an identically built Dataset resumes at exactly the next batch;
    ``grain.checkpoint.CheckpointHandler`` (orbax) saves and restores it.
    """
    import grain
    ds = self.dataset.to_iter_dataset(self.read_options)
    if self.worker_count > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
    return iter(ds)

  def __iter__(self):
    return self.iterator()


def build_dataset(source: Source, cfg: Mapping[str, Any], *, split: str, batch_size: int,
                  seed: int, shard_index: int, shard_count: int,
                  num_epochs: int | None) -> Dataset:
  """Sharded, shuffled (train), repeated, batched grain pipeline over ``source``; see the
  module docstring for the exact semantics."""
  import grain  # imported lazily: only the data pipelines need grain

  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  if num_epochs is not None and (int(num_epochs) != num_epochs or num_epochs <= 0):
    raise ValueError(f"num_epochs must be None or a positive integer, got {num_epochs!r}")
  # Validates shard_index / shard_count with grain's own checks.
  shard = grain.sharding.ShardOptions(shard_index=int(shard_index), shard_count=int(shard_count),
                                      drop_remainder=True)
  batch_size, seed = int(batch_size), int(seed)
  n = source.num_examples
  if n <= 0:
    raise ValueError(f"dataset {source.info.name!r} split {split!r} has no examples")

  if split == "train":
    per_shard = n // shard.shard_count
    if per_shard < batch_size:
      raise ValueError(
          f"dataset {source.info.name!r} train split has {n} examples: {per_shard} per shard "
          f"({shard.shard_count} shards) is fewer than batch_size={batch_size}")
    total = _INFINITE if num_epochs is None else num_epochs * per_shard // batch_size
    indices = _TrainBatchIndices(start=per_shard * shard.shard_index, per_shard=per_shard,
                                 batch_size=batch_size, seed=seed,
                                 shard_index=shard.shard_index)
  else:
    per_shard = math.ceil(n / (shard.shard_count * batch_size)) * batch_size
    total = (1 if num_epochs is None else num_epochs) * per_shard // batch_size
    indices = _EvalBatchIndices(start=per_shard * shard.shard_index, per_shard=per_shard,
                                batch_size=batch_size)
  # grain drives the iteration (position = batch index: exact, tiny state, prefetch threads);
  # each batch index is mapped to its example indices, then the examples are looked up a batch
  # at a time (vectorized where the source allows it).
  ds = grain.MapDataset.range(total).map(indices).map(_BatchLookup(source))
  infinite = split == "train" and num_epochs is None
  read_options = grain.ReadOptions(
      num_threads=int(cfg_get(cfg, "read_threads", 2)),
      prefetch_buffer_size=int(cfg_get(cfg, "prefetch_batches", 8)))
  worker_count = int(cfg_get(cfg, "worker_count", 0))
  if worker_count < 0:
    raise ValueError(f"cfg.worker_count must be >= 0, got {worker_count}")
  return Dataset(info=source.info, dataset=ds, num_batches=None if infinite else total,
                 read_options=read_options, worker_count=worker_count)
