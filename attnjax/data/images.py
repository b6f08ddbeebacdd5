"""Image classification sources held in memory: ``digits`` and ``fashion_mnist_idx``.

Every image source yields ``{"image": float32 [H, W, C], "label": int32 [], "mask": float32 []}``
per example (batched: ``[B, H, W, C]``, ``[B]``, ``[B]``). Pixels are scaled to ``[0, 1]`` and
then normalized per channel, ``(x - mean) / std``. ``mask`` is 1 for real examples and 0 for the
padding examples that complete the last eval batch (see ``attnjax.data.base``); weight the eval
metrics by it.

``digits``
  scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``: 1,797 images,
  10 classes, pixels 0..16; shipped inside the package, so offline). Fixed stratified split:
  ``sklearn.model_selection.train_test_split(test_size=0.25, stratify=labels, random_state=0)``
  over the example indices (1,347 train / 450 eval), independent of the seed. Pixels / 16, then
  normalized with the mean and std of the train pixels (one channel). ``image_shape (8, 8, 1)``.

``fashion_mnist_idx``
  Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from the original IDX files in ``cfg.data_dir``:
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (train) and ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` (eval), each optionally gzipped (``.gz``). Default ``data_dir`` is
  ``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` package installs
  the gzipped files. Pixels / 255, normalized with the mean and std of the train images' pixels
  (computed from the train file, so both splits use the same constants). ``image_shape
  (28, 28, 1)``, 10 classes.
"""

from __future__ import annotations

import functools
import gzip
import os
from typing import Any, Mapping, Sequence

import numpy as np

from attnjax.data.base import DataUnavailableError, DatasetInfo, Source, cfg_get

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes -> numpy dtypes (multi-byte types are big-endian).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class NormalizedImages:
  """Example ``i``: ``images[i]`` (uint8 ``[H, W, C]`` or ``[H, W]``, or a record dict with
  ``image``/``label``) scaled by ``1 / scale`` and normalized with per-channel mean/std."""

  def __init__(self, images, labels, *, scale: float, mean: Sequence[float],
               std: Sequence[float]):
    self.images, self.labels = images, labels
    self.scale = float(scale)
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    if self.labels is None:  # records with "image" and "label" (TFDS)
      record = self.images[index]
      image, label = record["image"], record["label"]
    else:
      image, label = self.images[index], self.labels[index]
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
      image = image[:, :, None]
    image = (image / self.scale - self.mean) / self.std
    return {"image": image.astype(np.float32), "label": np.asarray(label, np.int32),
            "mask": np.asarray(1.0, np.float32)}

  def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorized ``__call__`` for in-memory arrays (``labels`` given)."""
    image = np.asarray(self.images[indices], np.float32)
    if image.ndim == 3:
      image = image[..., None]
    image = (image / self.scale - self.mean) / self.std
    return {"image": image.astype(np.float32),
            "label": np.asarray(self.labels[indices], np.int32),
            "mask": np.ones(len(indices), np.float32)}


def image_pad(image_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
  return {"image": np.zeros(image_shape, np.float32), "label": np.asarray(0, np.int32),
          "mask": np.asarray(0.0, np.float32)}


def image_source(getter: NormalizedImages, n: int, *, name: str, split: str,
                 image_shape: tuple[int, int, int], num_classes: int,
                 description: str) -> Source:
  info = DatasetInfo(name=name, split=split, kind="image", num_examples=n,
                     description=description, num_classes=num_classes,
                     image_shape=tuple(int(s) for s in image_shape))
  return Source(info=info, num_examples=n, get=getter, pad=image_pad(info.image_shape),
                get_batch=getter.batch if getter.labels is not None else None)


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  try:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
  except ImportError as e:
    raise DataUnavailableError(
        "the 'digits' dataset needs scikit-learn (its 8x8 digits ship inside the package): "
        "pip install scikit-learn  (or pip install 'attnjax[data]')") from e
  bunch = load_digits()
  images = np.asarray(bunch.images, np.float32)[..., None]  # [N, 8, 8, 1], values 0..16
  labels = np.asarray(bunch.target, np.int32)
  train_idx, eval_idx = train_test_split(np.arange(len(labels)), test_size=0.25,
                                         stratify=labels, random_state=0)
  indices = {"train": np.sort(train_idx), "eval": np.sort(eval_idx)}
  return images, labels, indices


def digits_split_indices() -> dict[str, np.ndarray]:
  """Indices into ``load_digits()`` of the fixed train / eval split (sorted)."""
  return _digits()[2]


def digits_source(cfg: Mapping[str, Any], split: str) -> Source:
  del cfg
  images, labels, indices = _digits()
  train_pixels = images[indices["train"]] / 16.0
  mean, std = float(train_pixels.mean()), float(train_pixels.std())
  idx = indices[split]
  getter = NormalizedImages(images[idx], labels[idx], scale=16.0, mean=[mean], std=[std])
  return image_source(
      getter, len(idx), name="digits", split=split, image_shape=(8, 8, 1), num_classes=10,
      description=(f"scikit-learn 8x8 digits, {split} split ({len(idx)} of {len(labels)}; "
                   "stratified 3/4 train, 1/4 eval, random_state=0)"))


# --------------------------------------------------------------------------- IDX files


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (the MNIST format; gzipped if the name ends in ``.gz``).

  Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D
  float32, 0x0E float64), the number of dimensions ``d``, ``d`` big-endian uint32 sizes, then the
  data in row-major order, big-endian.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, gzip.BadGzipFile) as e:  # a cut-off download of the .gz
    raise ValueError(f"{path} is not a valid IDX file: the gzip stream is corrupt or truncated "
                     f"({type(e).__name__}: {e})") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not a valid IDX file: bad magic number {data[:4]!r} (expected "
                     f"two zero bytes, a type code in "
                     f"{', '.join(hex(c) for c in _IDX_DTYPES)} and the number of dimensions)")
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:  # truncated inside the header (the dimension sizes)
    raise ValueError(f"{path} is not a valid IDX file: its magic number declares {ndim} "
                     f"dimension(s), a {header}-byte header, but the file has only {len(data)} "
                     f"bytes (truncated?)")
  shape = tuple(int(s) for s in np.frombuffer(data[4:header], ">u4"))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(f"{path} is not a valid IDX file: its header says shape {shape} of {dtype}, "
                     f"{expected} data bytes, but the file has {len(data) - header} data bytes "
                     f"({'truncated?' if len(data) - header < expected else 'trailing bytes'})")
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(data_dir: str, stem: str) -> str | None:
  for candidate in (stem, stem + ".gz"):
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  return None


@functools.lru_cache(maxsize=4)
def _idx_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  image_stem, label_stem = _IDX_FILES[split]
  paths = [_find_idx(data_dir, stem) for stem in (image_stem, label_stem)]
  if None in paths:
    raise DataUnavailableError(
        f"Fashion-MNIST IDX files not found in {data_dir!r} (need {image_stem}[.gz] and "
        f"{label_stem}[.gz]). Install Debian's package (apt-get install dataset-fashion-mnist, "
        f"which puts them in {FASHION_MNIST_DEBIAN_DIR}) or download them from "
        "https://github.com/zalandoresearch/fashion-mnist and set cfg.data_dir.")
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"{paths}: expected images [N, H, W] and labels [N], got {images.shape} "
                     f"and {labels.shape}")
  return images, labels.astype(np.int32)


@functools.lru_cache(maxsize=4)
def _idx_train_stats(data_dir: str) -> tuple[float, float]:
  """Mean and std of the train pixels / 255 (exact, from the byte histogram)."""
  train_images, _ = _idx_split(data_dir, "train")
  counts = np.bincount(train_images.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
  values = np.arange(256) / 255.0
  mean = float((counts * values).sum() / counts.sum())
  std = float(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum()))
  return mean, std


def fashion_mnist_idx_source(cfg: Mapping[str, Any], split: str) -> Source:
  data_dir = str(cfg_get(cfg, "data_dir", FASHION_MNIST_DEBIAN_DIR))
  mean, std = _idx_train_stats(data_dir)
  images, labels = _idx_split(data_dir, split)
  getter = NormalizedImages(images, labels, scale=255.0, mean=[mean], std=[std])
  return image_source(
      getter, len(labels), name="fashion_mnist_idx", split=split,
      image_shape=(images.shape[1], images.shape[2], 1), num_classes=10,
      description=f"Fashion-MNIST IDX files from {data_dir}, {split} split ({len(labels)} images)")
