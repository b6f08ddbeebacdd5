"""Hardware pieces of experiments/bench_attention.py: exact FLOP counts over a mask's visible
(query, key) pairs, the interpret-mode guard of the Pallas backends, and the peers that only run
on their own hardware (cuDNN attention on GPU, splash attention on TPU).

FLOPs (FlashAttention-2 convention, Dao 2023): only visible pairs count. Forward:
``2 * B * Hq * visible * (D + Dv)`` (QK^T and PV, one multiply-add = 2 FLOPs); backward: 2.5x the
forward (five matmuls instead of two), so a timed forward+backward call does 3.5x the forward.
Softmax/exp work and recomputation are not counted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BWD_FACTOR = 2.5                 # backward FLOPs / forward FLOPs
FWDBWD_FACTOR = 1.0 + BWD_FACTOR  # what a forward+backward call does
_ROWS_PER_CHUNK = 1 << 24        # booleans per dense_np slab (16 MiB)


def visible_pairs(mask, T: int, block: int = 256) -> int:
  """Exact number of visible (query, key) pairs of an attnjax mask on a T x T problem.

  Uses the mask's block map: a FULL block counts block**2 pairs (FULL is exact: the kernels skip
  the mask there), EMPTY none, and the PARTIAL blocks of each query-block row are evaluated with
  ``mask.dense_np`` -- memory O(block * partial keys). Block 256 shares the cached block map of
  the default chunked backend (interval masks: milliseconds at T=64k; a neighborhood mask's map
  is a numpy scan, ~3 s at T=16k)."""
  if getattr(mask, "per_head", False):
    raise ValueError("per-head masks: count each head's mask")
  bm = np.asarray(mask.block_map(T, T, block, block))
  total = int(np.count_nonzero(bm == 2)) * block * block
  for i in range(bm.shape[0]):
    cols = np.flatnonzero(bm[i] == 1)
    if cols.size:
      kv = (cols[:, None] * block + np.arange(block)).ravel()
      kv = kv[kv < T]
      step = max(1, _ROWS_PER_CHUNK // block)   # bound the slab's size
      q = np.arange(i * block, min((i + 1) * block, T))
      for j in range(0, kv.size, step):
        total += int(np.count_nonzero(mask.dense_np(q, kv[j:j + step])))
  return total


def attention_flops(visible: int, batch: int, heads: int, d: int, dv: int | None = None,
                    backward: bool = False) -> float:
  """FLOPs of one forward (or forward+backward) call over `visible` (query, key) pairs."""
  fwd = 2.0 * batch * heads * visible * (d + (d if dv is None else dv))
  return fwd * (FWDBWD_FACTOR if backward else 1.0)


# ------------------------------------------------------------------------ Pallas interpret guard
def pallas_platform(spec: str) -> str | None:
  """'gpu' / 'tpu' for pallas_gpu[:BQxBK] / pallas_tpu[:BQxBK], else None."""
  name = spec.split(":", 1)[0]
  return {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}.get(name)


def interpret_refusal(specs, allow_interpret: bool) -> str | None:
  """The message refusing Pallas impls that would run in interpret mode here, or None."""
  here = jax.default_backend()
  bad = [s for s in specs if pallas_platform(s) not in (None, here)]
  if not bad:
    return None
  if here in ("gpu", "tpu"):
    return (f"--impl {' '.join(bad)}: JAX runs on '{here}'; these kernels are for another "
            "platform (pallas_gpu needs a GPU, pallas_tpu a TPU)")
  if allow_interpret:
    return None
  return (f"--impl {' '.join(bad)}: this machine runs JAX on '{here}', so the Pallas kernels "
          "would run in interpret mode (a Python emulation, orders of magnitude slower: its "
          "timings mean nothing). Run on the kernel's hardware, or pass --allow-interpret "
          "(tiny sizes only, e.g. --lengths 32) to check that the path works.")


# ---------------------------------------------------------------------------- hardware peers
def _no_platform(platform: str) -> str | None:
  here = jax.default_backend()
  if here != platform:
    return f"needs a {platform.upper()} (JAX default backend is '{here}')"
  return None


def cudnn_peer():
  """(unavailable reason | None, build(mc, args) -> (fn, extra, note), skip_kinds_on_error)."""
  why = _no_platform("gpu")

  def build(mc, args):
    kw, extra, note = {}, (), "cuDNN, bfloat16"
    if mc.kind == "causal":
      kw["is_causal"] = True
      note += ", is_causal=True"
    elif mc.kind == "sliding":   # cuDNN's sliding window is a left window on the causal mask
      kw["local_window_size"] = (mc.mask.left, mc.mask.right)
      kw["is_causal"] = mc.mask.right == 0
      note += f", local_window_size=({mc.mask.left}, {mc.mask.right}), is_causal"
    else:
      extra = (jnp.asarray(mc.dense())[None, None],)
      note += ", explicit [T,T] bool mask"

    def fn(q, k, v, *m):
      dt = q.dtype
      q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
      out = jax.nn.dot_product_attention(q, k, v, mask=m[0] if m else None,
                                         implementation="cudnn", **kw)
      return out.astype(dt)
    return fn, extra, note
  return why, build, ("neighborhood",)


def splash_peer():
  """Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) with the same mask."""
  why = _no_platform("tpu")
  if why is None:
    try:
      from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: F401
          splash_attention_kernel, splash_attention_mask)
    except Exception as e:  # noqa: BLE001
      why = f"splash_attention not importable ({type(e).__name__})"

  def build(mc, args):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    T, H = mc.T, args.heads
    if mc.kind == "causal":
      one, note = sm.CausalMask((T, T)), "CausalMask"
    elif mc.kind == "sliding":
      one = sm.LocalMask((T, T), (mc.mask.left, mc.mask.right), offset=0)
      note = f"LocalMask(({mc.mask.left}, {mc.mask.right}))"
    else:
      one, note = sm.NumpyMask(mc.dense()), "NumpyMask of the dense mask"
    bq, bk = min(512, T), min(1024, T)
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=min(512, T),
                           block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=min(512, T),
                           block_q_dq=bq, block_kv_dq=bk)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * H), block_sizes=blocks,
                                head_shards=1, q_seq_shards=1)
    scale = 1.0 / math.sqrt(args.head_dim)

    def fn(q, k, v):   # [B, T, H, D] -> splash's [H, T, D] per example (it does not scale q)
      q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * scale, k, v))
      return jnp.swapaxes(jax.vmap(kernel)(q, k, v), 1, 2)
    return fn, (), f"{note}, blocks q{bq} kv{bk}"
  return why, build, ()
