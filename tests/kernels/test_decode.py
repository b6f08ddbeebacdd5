"""pallas_kernels.decode (split-K decode over a KV cache) against a float64 numpy reference.

Both kernels run in interpret mode on CPU: "gpu" (Pallas Triton semantics) and "tpu" (the Mosaic
interpreter, ``pltpu.InterpretParams`` with ``uninitialized_memory="nan"`` so an output entry the
kernel never writes poisons the result). Every case is jitted; fresh random inputs per case.
Tolerances: float32 inputs within 2e-5 of float64 (CPU matmuls are exact float32); bfloat16
within a relative RMS error of 1.5e-2 (bf16 epsilon is 7.8e-3; inputs are rounded to bf16 before
the reference sees them).
"""

from __future__ import annotations

import contextlib
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode import common, decode_attention, decode_partials

PLATFORMS = ["gpu", "tpu"]


def reference(q, k, v, lengths, *, q_positions=None, kv_positions=None, window_left=None,
              sinks=None, softcap=None, scale=None):
  """Materialized attention in float64 with the documented visibility rule."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  lengths = np.asarray(lengths)
  B, Tq, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  scale = 1 / np.sqrt(D) if scale is None else scale
  s = np.einsum("bthd,bshd->bhts", q, kr) * scale
  if softcap is not None:
    s = softcap * np.tanh(s / softcap)
  qp = (lengths[:, None] - Tq + np.arange(Tq)[None]) if q_positions is None else q_positions
  kp = np.broadcast_to(np.arange(S)[None], (B, S)) if kv_positions is None else kv_positions
  qp, kp = np.asarray(qp)[:, :, None], np.asarray(kp)[:, None, :]
  vis = (kp >= 0) & (kp < lengths[:, None, None]) & (kp <= qp)
  if window_left is not None:
    vis &= kp >= qp - window_left
  s = np.where(vis[:, None], s, -np.inf)
  m = s.max(-1)
  if sinks is not None:
    sk = np.asarray(sinks, np.float64)[None, :, None]
    m = np.maximum(m, sk)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(s - m[..., None])
  den = e.sum(-1) + (np.exp(sk - m) if sinks is not None else 0.0)
  out = np.einsum("bhts,bshd->bthd", e / np.where(den > 0, den, 1.0)[..., None], vr)
  lse = np.where(den > 0, m + np.log(np.where(den > 0, den, 1.0)), -np.inf)
  return out, lse.transpose(0, 2, 1)


def ring_positions(lengths, capacity):
  """Slot s of a ring buffer of ``capacity`` holds the latest position p < length with
  p % capacity == s (-1 if none)."""
  L = np.asarray(lengths)[:, None]
  s = np.arange(capacity)[None]
  latest = s + capacity * ((L - 1 - s) // capacity)
  return np.where(L - 1 - s >= 0, latest, -1).astype(np.int32)


def _inputs(rng, B, Tq, Hq, Hkv, S, D, Dv, dtype):
  q = jnp.asarray(rng.normal(size=(B, Tq, Hq, D)), dtype)
  k = jnp.asarray(rng.normal(size=(B, S, Hkv, D)), dtype)
  v = jnp.asarray(rng.normal(size=(B, S, Hkv, Dv)), dtype)
  return q, k, v


def _check(out, ref, dtype):
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  assert np.all(np.isfinite(out))
  if dtype == jnp.float32:
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  else:
    rel = np.sqrt(np.mean((out - ref) ** 2) / max(np.mean(ref ** 2), 1e-30))
    assert rel < 1.5e-2, rel


def _check_lse(lse, ref_lse):
  assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
  lse = np.asarray(lse, np.float64)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  fin = np.isfinite(ref_lse)
  np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=2e-5, rtol=2e-5)


# name: (B, Tq, Hq, Hkv, S, D, Dv, dtype, static kwargs, runtime extras)
CASES = {
    # MHA, one token, lengths 0 and S in the batch, lse.
    "mha_t1": (4, 1, 4, 4, 64, 16, 16, jnp.float32,
               dict(block_kv=16, num_splits=1, return_lse=True), ()),
    # GQA (G=2), 3 tokens, Dv != D, sliding window, sinks, softcap, 3 splits over 4 blocks.
    "gqa_window_sinks_softcap": (3, 3, 4, 2, 64, 16, 8, jnp.float32,
                                 dict(block_kv=16, num_splits=3, window_left=13, softcap=5.0,
                                      scale=0.3, return_lse=True), ("sinks",)),
    # MQA (G=4), 3 tokens, ring buffer of 32 slots over up to 90 tokens, window, 2 splits.
    "mqa_ring_window": (4, 3, 4, 1, 32, 16, 16, jnp.float32,
                        dict(block_kv=16, num_splits=2, window_left=20, return_lse=True),
                        ("ring",)),
    # bfloat16, GQA, default block_kv / num_splits (S=40: GPU pads to a multiple of 32),
    # explicit query positions.
    "bf16_defaults": (3, 2, 4, 2, 40, 16, 32, jnp.bfloat16, dict(), ("q_positions",)),
}


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, platform):
  B, Tq, Hq, Hkv, S, D, Dv, dtype, static, extras = CASES[name]
  rng = np.random.default_rng(zlib.crc32(f"{name}/{platform}".encode()))
  q, k, v = _inputs(rng, B, Tq, Hq, Hkv, S, D, Dv, dtype)
  max_len = 90 if "ring" in extras else S
  lengths = np.concatenate([[0, max_len], rng.integers(1, max_len, size=B - 2)]).astype(np.int32)
  rng.shuffle(lengths)
  runtime = {}
  if "sinks" in extras:
    runtime["sinks"] = jnp.asarray(rng.normal(size=(Hq,)) * 2, jnp.float32)
  if "ring" in extras:
    runtime["kv_positions"] = jnp.asarray(ring_positions(lengths, S))
  if "q_positions" in extras:
    qp = lengths[:, None] - Tq + np.arange(Tq)[None] - rng.integers(0, 4, size=(B, 1))
    runtime["q_positions"] = jnp.asarray(qp, jnp.int32)
  kw = dict(static)
  if platform == "tpu":
    kw["interpret"] = pltpu.InterpretParams(uninitialized_memory="nan")
    if kw.get("block_kv") == 16 and name == "mha_t1":
      kw["block_kv"] = 8   # TPU interpret allows multiples of 8
  kw["platform"] = None if (platform == "gpu" and name == "bf16_defaults") else platform
  fn = jax.jit(functools.partial(decode_attention, **kw))
  # S=40 with default blocks on the GPU: no block size divides it, so the cache is padded.
  padded = platform == "gpu" and name == "bf16_defaults"
  with (pytest.warns(common.CachePaddingWarning, match="S=40") if padded
        else contextlib.nullcontext()):
    res = fn(q, k, v, jnp.asarray(lengths), **runtime)
  ref_kw = {key: (np.asarray(val) if val is not None else None) for key, val in runtime.items()}
  ref_kw.update({key: static[key] for key in ("window_left", "softcap", "scale") if key in static})
  ref_out, ref_lse = reference(q, k, v, lengths, **ref_kw)
  if static.get("return_lse"):
    out, lse = res
    _check_lse(lse, ref_lse)
  else:
    out = res
  assert out.shape == (B, Tq, Hq, Dv) and out.dtype == dtype
  _check(out, ref_out, dtype)
  # Queries that see nothing (length 0, no sink) return exactly 0.
  empty = np.isneginf(ref_lse)
  assert np.all(np.asarray(jnp.asarray(out, jnp.float32))[empty] == 0)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_skips_blocks_beyond_length(platform):
  """Executed blocks per example == blocks overlapping [0, length); splits are balanced."""
  B, Tq, Hq, Hkv, S, D = 5, 1, 2, 1, 64, 16
  bk, ns = 16, 3
  rng = np.random.default_rng(7)
  q, k, v = _inputs(rng, B, Tq, Hq, Hkv, S, D, D, jnp.float32)
  lengths = np.array([0, 1, 17, 33, 64], np.int32)

  @jax.jit
  def run(q, k, v, lengths):
    prep = common.prepare(q, k, v, lengths, scale=None, q_positions=None, kv_positions=None,
                          window_left=None, softcap=None, block_kv=bk, num_splits=ns,
                          platform=platform, interpret=True)
    acc, m, l, executed = decode_partials(prep, platform=platform, interpret=True,
                                          count_blocks=True)
    return common.combine(prep, acc, m, l), executed

  out, executed = run(q, k, v, jnp.asarray(lengths))
  executed = np.asarray(executed)                       # [B, ns, Hkv | 1]
  expected = -(-lengths // bk)
  np.testing.assert_array_equal(executed.sum(1), np.broadcast_to(expected[:, None],
                                                                 executed.sum(1).shape))
  assert executed.max(1).max() == -(-expected.max() // ns)   # balanced: ceil(n / ns) per split
  _check(out, reference(q, k, v, lengths)[0], jnp.float32)


def test_block_tables_skip_outside_window():
  """With a window only blocks intersecting [q - window, q] are listed (cost ~ window)."""
  lengths = jnp.array([256, 100, 0], jnp.int32)
  q_hi = lengths - 1
  q_lo = jnp.maximum(q_hi - 40, 0)
  tables = jax.jit(functools.partial(common.block_tables, kv_pos=None, num_blocks=16,
                                     block_kv=16, num_splits=4))
  blocks, counts = tables(lengths, q_lo, q_hi)
  np.testing.assert_array_equal(np.asarray(counts).sum(1), [3, 4, 0])
  listed = [sorted({int(x) for s in range(4) for x in np.asarray(blocks)[0, s, :counts[0, s]]})]
  assert listed == [[13, 14, 15]]
  # Entries past a split's count repeat the last block visited (on TPU: no new DMA).
  blocks, counts = np.asarray(blocks), np.asarray(counts)
  for b in range(2):
    flat = [x for s in range(4) for x in
            list(blocks[b, s, :counts[b, s]]) + [None] * (blocks.shape[-1] - counts[b, s])]
    seq = blocks[b].reshape(-1)
    for j, x in enumerate(flat):
      assert seq[j] == (x if x is not None else seq[j - 1])


def test_gradient_raises():
  rng = np.random.default_rng(3)
  q, k, v = _inputs(rng, 1, 1, 2, 2, 16, 16, 16, jnp.float32)
  f = lambda q: decode_attention(q, k, v, jnp.array([5], jnp.int32), block_kv=16).sum()
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.jit(jax.grad(f))(q)


@pytest.mark.parametrize("kwargs, match", [
    (dict(hkv=3), "divisible by kv heads"),
    (dict(lengths=np.array([3, 4], np.float32)), "lengths must be int32"),
    (dict(lengths=np.array([3], np.int32)), "lengths must be int32"),
    (dict(block_kv=24, platform="gpu"), "block_kv=24 is not allowed on gpu"),
    (dict(block_kv=12, platform="tpu"), "block_kv=12 is not allowed on tpu"),
    (dict(block_kv=64, platform="tpu", interpret=False), "multiple of 128"),
    (dict(block_kv=64, s=96, platform="gpu"), "must divide the cache length"),
    (dict(platform="cuda"), "platform='cuda' is not supported"),
    (dict(interpret="yes"), "interpret='yes' is not supported"),
    (dict(num_splits=0), "num_splits"),
    (dict(num_splits=9, block_kv=16), "num_splits"),
    (dict(q_positions=np.zeros((2, 3), np.int32)), "q_positions must be"),
    (dict(kv_positions=np.zeros((2, 5), np.int32)), "kv_positions must be"),
    (dict(sinks=np.zeros(3, np.float32)), "sinks must be"),
    (dict(window_left=-1), "window_left"),
    (dict(softcap=-2.0), "softcap"),
    (dict(dv_rank3=True), "rank 4"),
    (dict(hkv=1, dtypes=(jnp.float32, jnp.bfloat16)), "share one dtype"),
    (dict(hkv=1, dtypes=(jnp.float16,) * 2, platform="tpu", interpret=False),
     "not supported on tpu"),
])
def test_bad_input_raises(kwargs, match):
  kwargs = dict(kwargs)
  hkv, s, d = kwargs.pop("hkv", 2), kwargs.pop("s", 128), kwargs.pop("d", 16)
  rng = np.random.default_rng(1)
  q, k, v = _inputs(rng, 2, 1, 4, hkv, s, d, 16, jnp.float32)
  qdt, kdt = kwargs.pop("dtypes", (jnp.float32, jnp.float32))
  q, k, v = q.astype(qdt), k.astype(kdt), v.astype(kdt)
  if kwargs.pop("dv_rank3", False):
    v = v[:, :, 0]
  lengths = kwargs.pop("lengths", np.array([3, 4], np.int32))
  kwargs.setdefault("platform", "gpu")
  with pytest.raises(ValueError, match=match):
    decode_attention(q, k, v, lengths, **kwargs)


@pytest.mark.parametrize("platform, lowering_platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_lowers_for_hardware(platform, lowering_platform):
  """Compiled-mode (interpret=False) lowering to Mosaic / Triton IR succeeds on CPU with every
  feature on (hardware block sizes, bf16 GQA, ring positions, window, sinks, softcap, lse).
  This checks the kernels against the Pallas lowering rules, not the device compilers."""
  B, S, Hkv, Hq, D, Dv, Tq, dt = 2, 512, 2, 8, 128, 64, 2, jnp.bfloat16
  sds = jax.ShapeDtypeStruct
  fn = jax.jit(functools.partial(decode_attention, platform=platform, interpret=False,
                                 block_kv=128 if platform == "tpu" else 64, num_splits=2,
                                 window_left=100, softcap=30.0, return_lse=True))
  lowered = fn.trace(sds((B, Tq, Hq, D), dt), sds((B, S, Hkv, D), dt), sds((B, S, Hkv, Dv), dt),
                     sds((B,), jnp.int32), kv_positions=sds((B, S), jnp.int32),
                     sinks=sds((Hq,), jnp.float32)).lower(lowering_platforms=(lowering_platform,))
  assert ("tpu_custom_call" if platform == "tpu" else "__gpu") in lowered.as_text()


def test_gpu_pads_head_dims():
  """On a GPU (interpret=False) head dims that Triton cannot take (not a power of two >= 16) are
  zero-padded by ``prepare`` (with a warning: that copies the cache each call); the softmax
  scale still uses the true D, and the padded problem's output equals the reference."""
  from pallas_kernels.decode import common as dcommon
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((2, 1, 4, 24), (2, 64, 2, 24), (2, 64, 2, 8)))
  with pytest.warns(common.CachePaddingWarning, match="copies the whole KV cache"):
    prep = dcommon.prepare(q, k, v, jnp.full((2,), 64, jnp.int32), scale=None,
                           q_positions=None, kv_positions=None, window_left=None, softcap=None,
                           block_kv=None, num_splits=None, platform="gpu", interpret=False)
  assert prep.q.shape[-1] == 32 and prep.k.shape[-1] == 32 and prep.v.shape[-1] == 16
  assert (prep.d, prep.dv) == (24, 8) and prep.scale == pytest.approx(24 ** -0.5)
  np.testing.assert_array_equal(prep.k[..., 24:], 0)
  np.testing.assert_array_equal(prep.v[..., 8:], 0)
  # The padded problem gives the unpadded answer (kernel run interpreted on the padded prep).
  lengths = np.array([64, 37], np.int32)
  with pytest.warns(common.CachePaddingWarning, match="head dims"):
    prep = dcommon.prepare(q, k, v, jnp.asarray(lengths), scale=None, q_positions=None,
                           kv_positions=None, window_left=None, softcap=None, block_kv=16,
                           num_splits=2, platform="gpu", interpret=False)
  acc, m, l = decode_partials(prep, platform="gpu", interpret=True)
  out, lse = dcommon.combine(prep, acc, m, l, return_lse=True)
  ref, ref_lse = reference(q, k, v, lengths)
  assert out.shape == ref.shape == (2, 1, 4, 8)
  _check(out, ref, jnp.float32)
  _check_lse(lse, ref_lse)
