"""Tests of attnjax.data: the grain input pipelines (all offline, tiny sizes)."""

import collections
import gzip
import itertools
import json
import os

import numpy as np
import pytest

grain = pytest.importorskip("grain")
tfds = pytest.importorskip("tensorflow_datasets")

from attnjax import data  # noqa: E402
from attnjax.data import images as images_mod  # noqa: E402
from attnjax.data import text as text_mod  # noqa: E402

STDLIB = {"name": "stdlib_text", "seq_len": 16, "max_bytes": 6000}
MQAR = {"name": "mqar", "vocab_size": 64, "seq_len": 48, "num_kv_pairs": 6,
        "num_train_examples": 60, "num_eval_examples": 20}


def take(it, n):
  return [next(it) for _ in range(n)]


def rows(batches, key="inputs"):
  """The rows of a list of batches, as hashable bytes."""
  return [row.tobytes() for b in batches for row in b[key]]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def batches_differ(a, b):
  return any(not np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


# --------------------------------------------------------------------------- registry and errors


def test_list_datasets_and_unknown_name():
  names = data.list_datasets()
  for name in ["stdlib_text", "digits", "fashion_mnist_idx", "mqar", "copy",
               "tfds:tiny_shakespeare", "tfds:lm1b", "tfds:mnist", "tfds:fashion_mnist",
               "tfds:cifar10"]:
    assert name in names
  with pytest.raises(ValueError, match="stdlib_text.*mqar"):
    data.make_dataset({"name": "imagenet"}, split="train", batch_size=2, seed=0)
  with pytest.raises(ValueError, match="split"):
    data.make_dataset(STDLIB, split="validation", batch_size=2, seed=0)


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(seed=-1),
                                    dict(shard_index=2, shard_count=2), dict(num_epochs=0)])
def test_bad_arguments(kwargs):
  args = dict(split="train", batch_size=2, seed=0) | kwargs
  with pytest.raises(ValueError):
    data.make_dataset(MQAR, **args)


def test_config_dict_is_accepted():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict(MQAR)
  ds = data.make_dataset(cfg, split="eval", batch_size=4, seed=0)
  assert ds.info.seq_len == 48 and ds.info.vocab_size == 64 and ds.num_batches == 5


# --------------------------------------------------------------------------- stdlib_text


def test_stdlib_text_batches_are_shifted_windows_of_the_stream():
  ds = data.make_dataset(STDLIB, split="train", batch_size=4, seed=0, num_epochs=1)
  info = ds.info
  assert (info.kind, info.vocab_size, info.seq_len) == ("text", 256, 16)
  tokens = data.make_source(STDLIB, "train").tokens
  assert len(tokens) == 6000 and info.num_examples == (6000 - 1) // 16
  windows = collections.Counter(tokens[i * 16: i * 16 + 17].tobytes()
                                for i in range(info.num_examples))
  batches = list(ds.iterator())
  assert len(batches) == ds.num_batches == info.num_examples // 4
  seen = collections.Counter()
  for b in batches:
    assert b["inputs"].shape == (4, 16) and b["inputs"].dtype == np.int32
    assert b["targets"].dtype == np.int32 and b["weights"].dtype == np.float32
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    np.testing.assert_array_equal(b["weights"], 1.0)
    for x, y in zip(b["inputs"], b["targets"]):
      seen[np.concatenate([x, y[-1:]]).astype(np.uint8).tobytes()] += 1
  # One epoch visits each window at most once (all but the last partial batch's).
  assert seen <= windows and seen.total() == len(batches) * 4


def test_stdlib_split_is_by_file_and_disjoint():
  root = text_mod.sysconfig.get_paths()["stdlib"]
  files = text_mod.stdlib_files(root)
  assert files == sorted(files) and len(files) > 100
  assert not any(f.startswith(("site-packages/", "dist-packages/")) for f in files)
  eval_files = {f for f in files if text_mod.stdlib_split_of(f, 5.0) == "eval"}
  train_files = set(files) - eval_files
  assert 0.01 < len(eval_files) / len(files) < 0.12
  assert eval_files and train_files and not eval_files & train_files
  # The eval stream is exactly the eval files concatenated in sorted order (then capped).
  for split, split_files in [("eval", eval_files), ("train", train_files)]:
    first = sorted(split_files)[:20]
    stream = b"".join(open(os.path.join(root, f), "rb").read() for f in first)
    assert data.make_source(STDLIB, split).tokens.tobytes() == stream[:6000]


def test_eval_split_covers_every_byte_once_with_padding():
  cfg = dict(STDLIB, max_bytes=1000)
  tokens = data.make_source(cfg, "eval").tokens
  ds = data.make_dataset(cfg, split="eval", batch_size=8, seed=0)
  batches = list(ds.iterator())
  assert len(batches) == ds.num_batches == -(-ds.info.num_examples // 8)
  w = np.concatenate([b["weights"] for b in batches])
  t = np.concatenate([b["targets"] for b in batches])
  assert w.sum() == len(tokens) - 1
  np.testing.assert_array_equal(t[w > 0], tokens[1:])
  assert (t[w == 0] == 0).all()


def test_unigram_baseline_is_sane():
  cfg = dict(STDLIB, max_bytes=40_000)
  bits = data.unigram_bits_per_byte(cfg)
  assert 3.0 < bits < 8.0
  # A bigram model (add-0.01) of the same train split predicts the eval split better.
  train = data.make_source(cfg, "train").tokens.astype(np.int64)
  evals = data.make_source(cfg, "eval").tokens.astype(np.int64)
  pair = np.bincount(train[:-1] * 256 + train[1:], minlength=256 * 256).reshape(256, 256) + 0.01
  log_p = np.log2(pair) - np.log2(pair.sum(1, keepdims=True))
  bigram_bits = -log_p[evals[:-1], evals[1:]].mean()
  assert bigram_bits < bits
  # And the unigram model itself beats the uniform 8 bits on the training text.
  assert text_mod.unigram_cross_entropy_bits(train, train) < 8.0
  with pytest.raises(ValueError, match="byte-stream"):
    data.unigram_bits_per_byte(MQAR)


def test_unigram_baseline_on_given_target_counts():
  """``eval_counts`` scores the baseline on exactly the given targets (what a run evaluated):
  the counts of a full pass over the eval batches give the default, a prefix its own value."""
  cfg = dict(STDLIB, max_bytes=40_000)
  train = data.make_source(cfg, "train").tokens
  batches = list(data.make_dataset(cfg, split="eval", batch_size=8, seed=0).iterator())

  def counts(bs):
    return sum(np.bincount(b["targets"].ravel(), weights=b["weights"].ravel(), minlength=256)
               for b in bs)

  full = data.unigram_bits_per_byte(cfg, eval_counts=counts(batches))
  assert full == pytest.approx(data.unigram_bits_per_byte(cfg), rel=1e-12)
  prefix = np.concatenate([b["targets"][b["weights"] > 0] for b in batches[:3]])
  part = data.unigram_bits_per_byte(cfg, eval_counts=counts(batches[:3]))
  assert part == pytest.approx(text_mod.unigram_cross_entropy_bits(train, prefix), rel=1e-12)
  assert abs(part - full) > 1e-3
  with pytest.raises(ValueError, match=r"eval_counts has shape \(3,\), expected \(256,\)"):
    data.unigram_bits_per_byte(cfg, eval_counts=np.ones(3))
  with pytest.raises(ValueError, match="exactly one of eval_tokens and eval_counts"):
    text_mod.unigram_cross_entropy_bits(train)


# --------------------------------------------------------------------------- order and state


@pytest.mark.parametrize("cfg", [STDLIB, {"name": "digits"}, MQAR], ids=lambda c: c["name"])
def test_order_is_deterministic_given_seed(cfg):
  def first(seed):
    return take(data.make_dataset(cfg, split="train", batch_size=4, seed=seed).iterator(), 3)
  assert_batches_equal(first(7), first(7))
  assert batches_differ(first(7), first(8))


def test_epochs_are_reshuffled_permutations():
  ds = data.make_dataset(MQAR, split="train", batch_size=6, seed=3, num_epochs=2)
  batches = list(ds.iterator())
  assert len(batches) == ds.num_batches == 20
  epoch1, epoch2 = rows(batches[:10]), rows(batches[10:])
  assert len(set(epoch1)) == 60 and set(epoch1) == set(epoch2) and epoch1 != epoch2


def test_batches_straddle_epochs_without_losing_examples():
  ds = data.make_dataset(MQAR, split="train", batch_size=7, seed=0, num_epochs=2)
  batches = list(ds.iterator())
  assert len(batches) == ds.num_batches == 120 // 7
  counts = collections.Counter(rows(batches))
  assert len(counts) == 60 and max(counts.values()) == 2 and counts.total() == 119
  assert set(rows(batches[:8])) < set(rows(batches))  # epoch 1 (56 rows) then batch 8 straddles


@pytest.mark.parametrize("cfg,split", [(STDLIB, "train"), ({"name": "digits"}, "train"),
                                       (MQAR, "train"), (MQAR, "eval")],
                         ids=["stdlib", "digits", "mqar", "mqar-eval"])
def test_get_state_set_state_resumes_exactly(cfg, split):
  def fresh():
    return data.make_dataset(cfg, split=split, batch_size=2, seed=5).iterator()
  it = fresh()
  take(it, 3)
  state = it.get_state()
  state = json.loads(json.dumps(state))  # what a checkpoint stores
  expected = take(it, 4)
  restored = fresh()
  restored.set_state(state)
  assert_batches_equal(take(restored, 4), expected)


def test_grain_checkpoint_handler_round_trip(tmp_path):
  it = data.make_dataset(MQAR, split="train", batch_size=4, seed=1).iterator()
  take(it, 5)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(tmp_path, item=it)
  expected = take(it, 2)
  restored = data.make_dataset(MQAR, split="train", batch_size=4, seed=1).iterator()
  restored = handler.restore(tmp_path, item=restored)
  assert_batches_equal(take(restored, 2), expected)


# --------------------------------------------------------------------------- sharding


def test_train_shards_are_disjoint_and_equal():
  shards = [list(data.make_dataset(MQAR, split="train", batch_size=4, seed=0, shard_index=i,
                                   shard_count=3, num_epochs=1).iterator()) for i in range(3)]
  assert [len(s) for s in shards] == [5, 5, 5]
  sets = [set(rows(s)) for s in shards]
  assert all(len(s) == 20 for s in sets)
  for a, b in itertools.combinations(sets, 2):
    assert not a & b
  whole = set(rows(list(data.make_dataset(MQAR, split="train", batch_size=4, seed=0,
                                          num_epochs=1).iterator())))
  assert set().union(*sets) == whole


def test_eval_shards_pad_to_equal_batches_and_cover_once():
  cfg = {"name": "digits"}
  n = data.make_dataset(cfg, split="eval", batch_size=16, seed=0).info.num_examples
  shards = [list(data.make_dataset(cfg, split="eval", batch_size=16, seed=0, shard_index=i,
                                   shard_count=4).iterator()) for i in range(4)]
  assert len({len(s) for s in shards}) == 1
  masks = np.concatenate([b["mask"] for s in shards for b in s])
  assert masks.sum() == n == 450
  real = sorted(x.tobytes() for s in shards for b in s for x in b["image"][b["mask"] > 0])
  pad = np.concatenate([b["image"][b["mask"] == 0] for s in shards for b in s])
  assert (pad == 0).all() and len(pad) == len(masks) - n
  whole = data.make_dataset(cfg, split="eval", batch_size=n, seed=0).iterator()
  assert real == sorted(x.tobytes() for x in next(whole)["image"])


# --------------------------------------------------------------------------- synthetic


def test_mqar_targets_are_the_values_of_the_queried_keys():
  k, v = MQAR["num_kv_pairs"], MQAR["vocab_size"]
  for split in ["train", "eval"]:
    batch = next(data.make_dataset(MQAR, split=split, batch_size=8, seed=0).iterator())
    assert batch["inputs"].shape == (8, 48) and batch["weights"].dtype == np.float32
    for x, y, w in zip(batch["inputs"], batch["targets"], batch["weights"]):
      keys, values = x[0:2 * k:2], x[1:2 * k:2]
      assert len(set(keys)) == k and len(set(values)) == k
      assert ((1 <= keys) & (keys < v // 2)).all() and ((v // 2 <= values) & (values < v)).all()
      pairs = dict(zip(keys.tolist(), values.tolist()))
      query = np.flatnonzero(w)
      assert len(query) == k and (query >= 2 * k).all() and (query % 2 == 0).all()
      assert sorted(x[query].tolist()) == sorted(keys.tolist())  # every key queried once
      for p in query:
        assert y[p] == pairs[x[p]]
      others = np.setdiff1d(np.arange(2 * k, 48), query)
      assert (x[others] == 0).all() and (y[w == 0] == 0).all()


def test_synthetic_content_is_fixed_by_index_and_splits_differ():
  def all_rows(split, seed):
    return set(rows(list(data.make_dataset(MQAR, split=split, batch_size=4, seed=seed,
                                           num_epochs=1).iterator())))
  assert all_rows("train", 0) == all_rows("train", 1)  # the seed only changes the order
  assert not all_rows("train", 0) & all_rows("eval", 0)
  other = set(rows(list(data.make_dataset(dict(MQAR, data_seed=1), split="eval",
                                          batch_size=4, seed=0).iterator())))
  assert other != all_rows("eval", 0)


def test_mqar_rejects_impossible_configs():
  with pytest.raises(ValueError, match="seq_len"):
    data.make_dataset(dict(MQAR, seq_len=20), split="train", batch_size=2, seed=0)
  with pytest.raises(ValueError, match="num_kv_pairs"):
    data.make_dataset(dict(MQAR, vocab_size=8), split="train", batch_size=2, seed=0)


def test_copy_task():
  cfg = {"name": "copy", "vocab_size": 10, "seq_len": 15, "copy_len": 6}
  batch = next(data.make_dataset(cfg, split="train", batch_size=4, seed=0).iterator())
  x, y, w = batch["inputs"], batch["targets"], batch["weights"]
  assert x.shape == y.shape == w.shape == (4, 15)
  np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
  for xi, yi, wi in zip(x, y, w):
    prefix = xi[:6]
    assert ((2 <= prefix) & (prefix < 10)).all() and xi[6] == 1
    np.testing.assert_array_equal(np.flatnonzero(wi), np.arange(6, 12))
    np.testing.assert_array_equal(yi[wi > 0], prefix)
    assert (xi[13:] == 0).all()


# --------------------------------------------------------------------------- images


def test_digits_split_and_normalization():
  split = images_mod.digits_split_indices()
  train, evals = split["train"], split["eval"]
  assert len(train) == 1347 and len(evals) == 450
  assert not set(train) & set(evals) and len(set(train) | set(evals)) == 1797
  from sklearn.datasets import load_digits
  labels = load_digits().target
  assert (np.bincount(labels[evals], minlength=10) >= 17).all()  # stratified: ~45 per class
  ds = data.make_dataset({"name": "digits"}, split="train", batch_size=1347 // 3, seed=0,
                         num_epochs=1)
  info = ds.info
  assert (info.kind, info.num_classes, info.image_shape) == ("image", 10, (8, 8, 1))
  batches = list(ds.iterator())
  images = np.concatenate([b["image"] for b in batches])
  assert images.shape == (1347, 8, 8, 1) and images.dtype == np.float32
  assert abs(images.mean()) < 1e-4 and abs(images.std() - 1.0) < 1e-4
  assert batches[0]["label"].dtype == np.int32 and (batches[0]["mask"] == 1).all()


def _write_idx(path, array, code):
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(payload)


def test_idx_reader(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, size=(3, 5, 4)).astype(np.uint8)
  _write_idx(tmp_path / "a-idx3-ubyte.gz", a, 0x08)
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / "a-idx3-ubyte.gz")), a)
  b = rng.normal(size=(7,)).astype(np.float32)
  _write_idx(tmp_path / "b", b, 0x0D)
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / "b")), b)
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
  with pytest.raises(ValueError, match="not a valid IDX file: bad magic number"):
    data.read_idx(str(tmp_path / "bad"))
  (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes() + b"x")
  with pytest.raises(ValueError, match=r"short is not a valid IDX file: .*shape \(10,\).*10 data "
                     r"bytes, but the file has 1 data bytes \(truncated\?\)"):
    data.read_idx(str(tmp_path / "short"))


@pytest.mark.parametrize("payload,match", [
    # the header declares 3 dimensions (16 bytes) but the file ends inside it
    (bytes([0, 0, 8, 3, 0]), r"declares 3 dimension\(s\), a 16-byte header, but the file has "
     r"only 5 bytes"),
    (bytes([0, 0, 8, 2]) + np.asarray([2, 3], ">u4").tobytes() + bytes(7),
     r"shape \(2, 3\).*6 data bytes, but the file has 7 data bytes \(trailing bytes\)"),
])
def test_idx_reader_truncated_or_padded_files_say_what_is_wrong(tmp_path, payload, match):
  """A truncated IDX header raised numpy's "buffer size must be a multiple of element size"."""
  path = tmp_path / "x-idx3-ubyte"
  path.write_bytes(payload)
  with pytest.raises(ValueError, match=rf"{path} is not a valid IDX file: .*{match}"):
    data.read_idx(str(path))


def test_idx_reader_truncated_gzip(tmp_path):
  """A cut-off .gz download raised EOFError from gzip."""
  a = np.random.default_rng(2).integers(0, 256, size=(4, 6, 6)).astype(np.uint8)
  full = tmp_path / "full-idx3-ubyte.gz"
  _write_idx(full, a, 0x08)
  cut = tmp_path / "cut-idx3-ubyte.gz"
  cut.write_bytes(full.read_bytes()[:-12])
  with pytest.raises(ValueError, match=rf"{cut} is not a valid IDX file: the gzip stream is "
                     r"corrupt or truncated"):
    data.read_idx(str(cut))


def test_fashion_mnist_idx_source(tmp_path):
  rng = np.random.default_rng(1)
  splits = {"train": 10, "t10k": 6}
  arrays = {}
  for prefix, n in splits.items():
    imgs = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    arrays[prefix] = (imgs, labels)
    suffix = ".gz" if prefix == "train" else ""  # both spellings are accepted
    _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", imgs, 0x08)
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x08)
  cfg = {"name": "fashion_mnist_idx", "data_dir": str(tmp_path)}
  ds = data.make_dataset(cfg, split="eval", batch_size=4, seed=0)
  assert ds.info.image_shape == (28, 28, 1) and ds.info.num_examples == 6
  batches = list(ds.iterator())
  assert len(batches) == 2
  label = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(label[:6], arrays["t10k"][1])
  np.testing.assert_array_equal(mask, [1] * 6 + [0] * 2)
  train_pixels = arrays["train"][0] / 255.0
  image = np.concatenate([b["image"] for b in batches])[:6, ..., 0]
  expected = (arrays["t10k"][0] / 255.0 - train_pixels.mean()) / train_pixels.std()
  np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-5)
  train = next(data.make_dataset(cfg, split="train", batch_size=5, seed=0).iterator())
  assert train["image"].shape == (5, 28, 28, 1) and train["label"].dtype == np.int32


@pytest.mark.skipif(not os.path.isdir(images_mod.FASHION_MNIST_DEBIAN_DIR),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_idx_debian_files():
  ds = data.make_dataset({"name": "fashion_mnist_idx"}, split="eval", batch_size=1000, seed=0)
  assert ds.info.num_examples == 10_000 and ds.num_batches == 10
  batch = next(ds.iterator())
  assert batch["image"].shape == (1000, 28, 28, 1) and set(batch["label"]) == set(range(10))
  assert abs(batch["image"].mean()) < 0.1 and abs(batch["image"].std() - 1) < 0.1


def test_fashion_mnist_idx_missing_files_say_how_to_get_them(tmp_path):
  cfg = {"name": "fashion_mnist_idx", "data_dir": str(tmp_path)}
  with pytest.raises(data.DataUnavailableError, match="dataset-fashion-mnist"):
    data.make_dataset(cfg, split="train", batch_size=2, seed=0)
  with pytest.raises(FileNotFoundError):  # DataUnavailableError is a FileNotFoundError
    data.make_dataset(cfg, split="eval", batch_size=2, seed=0)


# --------------------------------------------------------------------------- TFDS (mocked)


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3))])
def test_tfds_images_mocked(name, shape):
  with tfds.testing.mock_data(num_examples=10):
    records = tfds.data_source(name, split="test")
    raw = np.stack([records[i]["image"] for i in range(10)])
    raw_labels = np.array([records[i]["label"] for i in range(10)])
    ds = data.make_dataset({"name": f"tfds:{name}"}, split="eval", batch_size=4, seed=0)
    assert ds.info.image_shape == shape and ds.info.num_classes == 10
    batches = list(ds.iterator())
    train = take(data.make_dataset({"name": f"tfds:{name}"}, split="train", batch_size=4,
                                   seed=0).iterator(), 3)
  assert len(batches) == 3
  image = np.concatenate([b["image"] for b in batches])
  label = np.concatenate([b["label"] for b in batches])
  assert image.shape == (12,) + shape and image.dtype == np.float32
  np.testing.assert_array_equal(label[:10], raw_labels)
  _, _, mean, std = data.tfds_sources.IMAGE_DATASETS[name]
  np.testing.assert_allclose(image[:10], (raw / 255.0 - np.array(mean)) / np.array(std),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1] * 10 + [0] * 2)
  assert all(b["image"].shape == (4,) + shape for b in train)


def test_tfds_tiny_shakespeare_mocked():
  cfg = {"name": "tfds:tiny_shakespeare", "seq_len": 8}
  with tfds.testing.mock_data(num_examples=6):
    records = tfds.data_source("tiny_shakespeare", split="validation")
    text = "".join(records[i]["text"] for i in range(6)).encode()
    ds = data.make_dataset(cfg, split="eval", batch_size=4, seed=0)
    batches = list(ds.iterator())
    train = take(data.make_dataset(cfg, split="train", batch_size=4, seed=0).iterator(), 2)
    bits = data.unigram_bits_per_byte(cfg)
  t = np.concatenate([b["targets"] for b in batches])
  w = np.concatenate([b["weights"] for b in batches])
  assert t[w > 0].astype(np.uint8).tobytes() == text[1:]
  for b in batches + train:
    np.testing.assert_array_equal(b["targets"][:, :-1][b["weights"][:, 1:] > 0],
                                  b["inputs"][:, 1:][b["weights"][:, 1:] > 0])
  assert 0.0 < bits < 8.0


def test_tfds_lm1b_mocked_one_padded_sentence_per_row():
  cfg = {"name": "tfds:lm1b", "seq_len": 12}
  with tfds.testing.mock_data(num_examples=5):
    records = tfds.data_source("lm1b", split="test")
    sentences = [records[i]["text"].encode() + b"\n" for i in range(5)]
    batches = list(data.make_dataset(cfg, split="eval", batch_size=5, seed=0).iterator())
  assert len(batches) == 1
  b = batches[0]
  assert b["inputs"].shape == (5, 12) and b["inputs"].dtype == np.int32
  for x, y, w, s in zip(b["inputs"], b["targets"], b["weights"], sentences):
    s = s[:13]
    n = len(s) - 1
    assert x[:n].astype(np.uint8).tobytes() == s[:-1]
    assert y[:n].astype(np.uint8).tobytes() == s[1:]
    np.testing.assert_array_equal(w, [1] * n + [0] * (12 - n))


@pytest.mark.parametrize("text", ["héllo", "héllo".encode(), np.bytes_("héllo".encode()),
                                  np.array("héllo".encode(), dtype=object)])
def test_sentences_accept_the_text_types_tfds_returns(text):
  row = text_mod.PaddedSentences([{"text": text}], seq_len=8)(0)
  data_bytes = "héllo\n".encode()
  n = len(data_bytes) - 1
  assert row["inputs"][:n].astype(np.uint8).tobytes() == data_bytes[:-1]
  assert row["targets"][:n].astype(np.uint8).tobytes() == data_bytes[1:]
  np.testing.assert_array_equal(row["weights"], [1] * n + [0] * (8 - n))


def test_tfds_unprepared_dataset_says_how_to_build_it(tmp_path):
  cfg = {"name": "tfds:mnist", "data_dir": str(tmp_path)}
  with pytest.raises(data.DataUnavailableError, match="tfds build mnist"):
    data.make_dataset(cfg, split="train", batch_size=2, seed=0)


def test_bytes_per_token_comes_from_the_dataset_not_the_vocabulary_size():
  """Byte-level corpora declare 1 byte per token; synthetic token-id tasks declare none, even
  with exactly 256 ids, so the training loop reports no bits/byte for them."""
  from attnjax.training import loop  # pylint: disable=import-outside-toplevel
  text = data.make_source(STDLIB, "eval").info
  assert text.bytes_per_token == 1.0 and loop._bytes_per_token(text) == 1.0
  copy = {"name": "copy", "vocab_size": 256, "seq_len": 15, "copy_len": 6}
  for cfg in (MQAR, dict(MQAR, vocab_size=256), copy):
    info = data.make_source(cfg, "eval").info
    assert info.kind == "text" and info.bytes_per_token is None, cfg
    assert loop._bytes_per_token(info) is None, cfg
