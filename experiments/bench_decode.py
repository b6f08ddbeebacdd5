#!/usr/bin/env python
"""Decode benchmark: ``pallas_kernels.decode.decode_attention`` (split-K, Flash-Decoding) against
``attnjax.attention(impl="xla")`` for one new token over a full KV cache of length S, on the
current platform.

Per cache length: median ms of ``--repeats`` jitted calls after warm-up, the effective bandwidth
(bytes of K and V read, ``2 * B * S * Hkv * D * itemsize``, over the time -- decode is
memory-bound, so GB/s is its figure of merit, not FLOP/s), "xla/decode" (time ratio, > 1 = the
kernel is faster) and the largest absolute difference between the two outputs.

Off the kernel's hardware the kernels run in interpret mode: refused unless
``--allow-interpret`` (tiny sizes only; those timings are not performance).

  python experiments/bench_decode.py                     # GPU or TPU: S = 1k .. 32k
  python experiments/bench_decode.py --allow-interpret --lengths 256 --repeats 1   # CPU check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from pallas_kernels.decode import decode_attention


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384,
                                                             32768])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--heads", type=int, default=32, help="query heads")
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
  ap.add_argument("--block-kv", type=int, default=None)
  ap.add_argument("--num-splits", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--allow-interpret", action="store_true",
                  help="run the kernel in interpret mode off its hardware (tiny sizes only)")
  args = ap.parse_args(argv)
  here = jax.default_backend()
  if here not in ("gpu", "tpu") and not args.allow_interpret:
    ap.error(f"JAX runs on '{here}': decode_attention would run in interpret mode (a Python "
             "emulation; its timings mean nothing). Run on a GPU/TPU, or pass "
             "--allow-interpret with tiny --lengths to check the path.")
  return args


def _time(f, a, warmup, repeats):
  out = jax.block_until_ready(f(*a))
  for _ in range(max(0, warmup - 1)):
    jax.block_until_ready(f(*a))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*a))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts) * 1e3, out


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  dt = jnp.dtype(args.dtype)
  B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
  interp = jax.default_backend() not in ("gpu", "tpu")
  dec = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, block_kv=args.block_kv,
                                                    num_splits=args.num_splits))
  ref = jax.jit(lambda q, k, v: attnjax.attention(q, k, v, impl="xla"))
  print(f"# decode: B={B} Hq={Hq} Hkv={Hkv} D={D} {args.dtype}; jax {jax.__version__} on "
        f"{', '.join(sorted({d.device_kind for d in jax.devices()}))}"
        + (" -- INTERPRET MODE: timings are not performance" if interp else ""))
  print("| S | decode ms | decode GB/s | xla ms | xla GB/s | xla/decode | max abs diff |")
  print("|---|---|---|---|---|---|---|")
  rows = []
  rng = np.random.default_rng(0)
  for S in args.lengths:
    q = jnp.asarray(rng.standard_normal((B, 1, Hq, D), np.float32), dt)
    k, v = (jnp.asarray(rng.standard_normal((B, S, Hkv, D), np.float32), dt) for _ in range(2))
    n = jnp.full((B,), S, jnp.int32)
    ms_d, out_d = _time(dec, (q, k, v, n), args.warmup, args.repeats)
    ms_x, out_x = _time(ref, (q, k, v), args.warmup, args.repeats)
    gb = 2.0 * B * S * Hkv * D * dt.itemsize / 1e9
    err = float(jnp.max(jnp.abs(out_d.astype(jnp.float32) - out_x.astype(jnp.float32))))
    row = dict(S=S, decode_ms=ms_d, xla_ms=ms_x, decode_gbs=gb / (ms_d * 1e-3),
               xla_gbs=gb / (ms_x * 1e-3), speedup=ms_x / ms_d, err=err)
    rows.append(row)
    print(f"| {S} | {ms_d:.4g} | {row['decode_gbs']:.4g} | {ms_x:.4g} | {row['xla_gbs']:.4g} | "
          f"{row['speedup']:.3g} | {err:.1e} |", flush=True)
  return rows


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
