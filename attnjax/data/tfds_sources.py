"""TensorFlow Datasets sources read without TensorFlow.

Records come from ``tfds.data_source(name, split=..., data_dir=cfg.data_dir, download=False)``:
random access into a dataset prepared in the ArrayRecord format. Nothing is downloaded at run
time; a dataset that is not prepared raises ``DataUnavailableError`` saying how to prepare it
(``tfds build NAME --file_format=array_record``, on a machine with internet access, then copy
the directory here). In tests, ``tfds.testing.mock_data(num_examples=...)`` replaces the records.

Split names: ``train`` -> ``"train"``; ``eval`` -> ``"validation"`` for ``tiny_shakespeare`` and
``"test"`` for the others (``cfg.eval_split`` overrides).

* ``tfds:tiny_shakespeare`` -- the texts of the split (one record in the real dataset) are
  concatenated, encoded as UTF-8 bytes and cut into windows like ``stdlib_text`` (see
  ``attnjax.data.text``); vocab 256. cfg: ``seq_len`` (256).
* ``tfds:lm1b`` -- one sentence per row, not packed: UTF-8 bytes of the sentence plus ``"\\n"``
  as end of sentence, truncated to ``seq_len + 1`` bytes and padded with 0 (weight 0); vocab 256.
  cfg: ``seq_len`` (128).
* ``tfds:mnist``, ``tfds:fashion_mnist``, ``tfds:cifar10`` -- ``image`` uint8 / 255, normalized
  per channel with the datasets' usual train-set constants (below), ``label`` int32, ``mask``.

Like every source, these honour ``cfg.max_examples`` (keep only the first ``n`` examples --
windows, sentences or images -- of the split), applied in ``attnjax.data.make_dataset``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from attnjax.data.base import DataUnavailableError, DatasetInfo, Source, cfg_get, positive_int
from attnjax.data.images import NormalizedImages, image_source
from attnjax.data.text import VOCAB_SIZE, PaddedSentences, stream_source, text_pad, to_bytes

# (image_shape, num_classes, per-channel mean, per-channel std of the train pixels in [0, 1])
IMAGE_DATASETS = {
    "mnist": ((28, 28, 1), 10, (0.1307,), (0.3081,)),
    "fashion_mnist": ((28, 28, 1), 10, (0.2860,), (0.3530,)),
    "cifar10": ((32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
TEXT_DATASETS = ("tiny_shakespeare", "lm1b")
_EVAL_SPLIT = {"tiny_shakespeare": "validation"}


def data_source(name: str, split: str, cfg: Mapping[str, Any]):
  """``tfds.data_source`` for our ``split`` ("train" / "eval"), with an actionable error."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataUnavailableError(
        f"'tfds:{name}' needs tensorflow-datasets: pip install 'attnjax[data]'") from e
  tfds_split = "train" if split == "train" else cfg_get(cfg, "eval_split",
                                                        _EVAL_SPLIT.get(name, "test"))
  data_dir = cfg_get(cfg, "data_dir", None)
  try:
    return tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types (NotImplementedError, AssertionError, ...)
    where = data_dir or "the default TFDS data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    raise DataUnavailableError(
        f"TFDS dataset {name!r} split {tfds_split!r} is not prepared in ArrayRecord format in "
        f"{where}. Prepare it on a machine with internet access with "
        f"`tfds build {name} --file_format=array_record --data_dir=DIR` (building may need "
        "TensorFlow installed there), copy DIR here and set cfg.data_dir=DIR. "
        f"(tfds said: {type(e).__name__}: {e})") from e


def tfds_source(name: str, cfg: Mapping[str, Any], split: str) -> Source:
  records = data_source(name, split, cfg)
  n = len(records)
  if name == "tiny_shakespeare":
    seq_len = positive_int(cfg, "seq_len", 256)
    text = b"".join(to_bytes(records[i]["text"]) for i in range(n))
    tokens = np.frombuffer(text, np.uint8)
    return stream_source(tokens, name=f"tfds:{name}", split=split, seq_len=seq_len,
                         description=f"TFDS tiny_shakespeare {split} split ({len(tokens)} "
                                     "bytes), byte-level windows")
  if name == "lm1b":
    seq_len = positive_int(cfg, "seq_len", 128)
    info = DatasetInfo(name=f"tfds:{name}", split=split, kind="text", num_examples=n,
                       vocab_size=VOCAB_SIZE, seq_len=seq_len, bytes_per_token=1.0,
                       description=f"TFDS lm1b {split} split, byte-level, one sentence per row "
                                   "padded (not packed), '\\n' ends a sentence")
    return Source(info=info, num_examples=n, get=PaddedSentences(records, seq_len),
                  pad=text_pad(seq_len))
  image_shape, num_classes, mean, std = IMAGE_DATASETS[name]
  getter = NormalizedImages(records, None, scale=255.0, mean=mean, std=std)
  return image_source(getter, n, name=f"tfds:{name}", split=split, image_shape=image_shape,
                      num_classes=num_classes,
                      description=f"TFDS {name} {split} split ({n} images)")
