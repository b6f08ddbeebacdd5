"""Input pipelines for the experiment scripts: grain pipelines over random-access sources.

```python
from attnjax import data
ds = data.make_dataset({"name": "stdlib_text", "seq_len": 256}, split="train", batch_size=32,
                       seed=0, shard_index=jax.process_index(), shard_count=jax.process_count())
it = ds.iterator()          # grain DatasetIterator: next(it) -> dict of numpy arrays
state = it.get_state()      # JSON-serialisable; it.set_state(state) resumes exactly
```

Datasets (``list_datasets()``):

=========================  =====  ==========================================================
name                       kind   source
=========================  =====  ==========================================================
``stdlib_text``            text   the Python standard library's sources, byte-level (offline)
``tfds:tiny_shakespeare``  text   TFDS, byte-level windows
``tfds:lm1b``              text   TFDS, byte-level, one padded sentence per row
``mqar``                   text   synthetic multi-query associative recall (Zoology)
``copy``                   text   synthetic copy task
``digits``                 image  scikit-learn's bundled 8x8 digits (offline)
``fashion_mnist_idx``      image  Fashion-MNIST IDX files (Debian ``dataset-fashion-mnist``)
``tfds:mnist``             image  TFDS
``tfds:fashion_mnist``     image  TFDS
``tfds:cifar10``           image  TFDS
=========================  =====  ==========================================================

Batches:

* text: ``{"inputs": int32 [B, T], "targets": int32 [B, T], "weights": float32 [B, T]}``. For
  the corpora, ``targets`` are ``inputs`` shifted by one (next-token prediction) and ``weights``
  are 0 on padding. For ``mqar``/``copy`` the targets are the task's answers and ``weights`` are
  1 only where the loss counts (see ``attnjax.data.synthetic``).
* image: ``{"image": float32 [B, H, W, C] (normalized), "label": int32 [B],
  "mask": float32 [B]}``; ``mask`` is 0 only on eval padding.

Splits are ``"train"`` (shuffled by ``seed``, repeated ``num_epochs`` times, ``None`` = forever,
full batches only) and ``"eval"`` (one pass in order, padded to full batches with zero-weight
examples so every real example counts once). Sharding, ordering and padding are specified in
``attnjax.data.base``. Common cfg keys: ``name``; ``max_examples`` (cap the examples of a split);
``read_threads`` (2) and ``prefetch_batches`` (8) for grain's prefetch threads; ``worker_count``
(0) for grain's multiprocessing prefetch (see ``Dataset``); the rest are per source
(see each module's docstring).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from attnjax.data import images, synthetic, text, tfds_sources
from attnjax.data.base import SPLITS, DataUnavailableError, Dataset, DatasetInfo, Source
from attnjax.data.base import build_dataset, cfg_get, positive_int
from attnjax.data.images import read_idx

__all__ = ["make_dataset", "list_datasets", "unigram_bits_per_byte", "Dataset", "DatasetInfo",
           "DataUnavailableError", "read_idx"]


def _tfds(name: str) -> Callable[[Mapping[str, Any], str], Source]:
  return lambda cfg, split: tfds_sources.tfds_source(name, cfg, split)


_REGISTRY: dict[str, Callable[[Mapping[str, Any], str], Source]] = {
    "stdlib_text": text.stdlib_text_source,
    "tfds:tiny_shakespeare": _tfds("tiny_shakespeare"),
    "tfds:lm1b": _tfds("lm1b"),
    "mqar": synthetic.mqar_source,
    "copy": synthetic.copy_source,
    "digits": images.digits_source,
    "fashion_mnist_idx": images.fashion_mnist_idx_source,
    "tfds:mnist": _tfds("mnist"),
    "tfds:fashion_mnist": _tfds("fashion_mnist"),
    "tfds:cifar10": _tfds("cifar10"),
}


def list_datasets() -> list[str]:
  """The valid values of ``cfg.name``."""
  return list(_REGISTRY)


def make_source(cfg: Mapping[str, Any], split: str) -> Source:
  """The random-access source of ``cfg.name``'s ``split`` (``cfg.max_examples`` applied)."""
  name = cfg_get(cfg, "name", None)
  if name not in _REGISTRY:
    raise ValueError(f"unknown dataset name {name!r}; valid names: {', '.join(_REGISTRY)}")
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  source = _REGISTRY[name](cfg, split)
  max_examples = positive_int(cfg, "max_examples", None)
  if max_examples is not None and max_examples < source.num_examples:
    source = dataclasses.replace(
        source, num_examples=max_examples,
        info=dataclasses.replace(source.info, num_examples=max_examples))
  return source


def make_dataset(cfg, *, split: str, batch_size: int, seed: int, shard_index: int = 0,
                 shard_count: int = 1, num_epochs: int | None = None) -> Dataset:
  """Builds the input pipeline of ``cfg.name`` for ``split``.

  Args:
    cfg: a mapping (dict or ml_collections ConfigDict) with ``name`` and source keys.
    split: ``"train"`` or ``"eval"`` (mapped to the source's own split names).
    batch_size: examples per batch *on this shard* (per host).
    seed: shuffling seed of the train split (``0 <= seed < 2**32``); eval ignores it. The data
      itself (corpus split, synthetic examples) does not depend on it.
    shard_index, shard_count: this host's data-parallel slice (``jax.process_index()``,
      ``jax.process_count()``); shards are disjoint and yield equal numbers of batches.
    num_epochs: passes over the split; ``None`` = forever for train, one pass for eval.

  Returns:
    a ``Dataset``: ``.iterator()`` gives a checkpointable grain iterator, ``.info`` a
    ``DatasetInfo``, ``.num_batches`` the batches per iterator (``None`` if infinite).

  Raises:
    ValueError: unknown name (the message lists the valid ones) or bad arguments.
    DataUnavailableError (a FileNotFoundError): the data is not on this machine; the message
      says how to get it.
  """
  source = make_source(cfg, split)
  return build_dataset(source, cfg, split=split, batch_size=batch_size, seed=seed,
                       shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs)


def unigram_bits_per_byte(cfg, eval_counts=None) -> float:
  """Baseline for the byte-level corpora (``stdlib_text``, ``tfds:tiny_shakespeare``).

  The cross-entropy, in bits per byte, of the add-one-smoothed unigram byte distribution of the
  train split evaluated on eval bytes: by default on the bytes the whole eval split predicts
  (every eval byte but the first, i.e. exactly the positions with weight 1 in a full pass over
  the eval batches); with ``eval_counts`` (a ``[256]`` array: how often each byte value is a
  target, weighted by ``weights``) on exactly those targets, e.g. the positions a run scored
  with its first ``eval_steps`` eval batches (``attnjax.training.run`` does this). It is the loss
  of a model that ignores context; any LM should beat it. Uses the same cfg (``max_bytes``
  etc.) as the data.
  """
  train = make_source(cfg, "train")
  if train.tokens is None:
    raise ValueError(f"unigram_bits_per_byte needs a byte-stream corpus (stdlib_text, "
                     f"tfds:tiny_shakespeare), not {cfg_get(cfg, 'name')!r}")
  if eval_counts is not None:
    return text.unigram_cross_entropy_bits(train.tokens, eval_counts=eval_counts)
  evaluation = make_source(cfg, "eval")
  return text.unigram_cross_entropy_bits(train.tokens, evaluation.tokens[1:])
