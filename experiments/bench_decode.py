#!/usr/bin/env python
"""Decode benchmark: ``pallas_kernels.decode.decode_attention`` (split-K, Flash-Decoding) against
``attnjax.attention(impl="xla")`` for one new token over a full KV cache of length S, on the
current platform.

Per cache length: ms per call (median over ``--repeats`` rounds after warm-up), the effective
bandwidth (bytes of K and V read, ``2 * B * S * Hkv * D * itemsize``, over the time -- decode is
memory-bound, so GB/s is its figure of merit, not FLOP/s), "xla/decode" (> 1 = the kernel is
faster) and the largest absolute difference between the two outputs.

Timing: both programs are compiled and warmed up, then timed in ``--repeats`` interleaved
rounds; in a round each runs ``--calls-per-sample`` calls dispatched back to back and
synchronized once (time / calls = one call; default 10 on GPU/TPU, where a per-call host wait
would add tens of microseconds to sub-millisecond kernels, 1 on CPU), decode then xla. "xla/decode"
is the median over rounds of the per-round ratio (paired), with its range.

Off the kernel's hardware the kernels run in interpret mode: refused unless
``--allow-interpret`` (tiny sizes only; those timings are not performance).

  python experiments/bench_decode.py                     # GPU or TPU: S = 1k .. 32k
  python experiments/bench_decode.py --allow-interpret --lengths 256 --repeats 1   # CPU check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from pallas_kernels.decode import decode_attention
from pallas_kernels.decode import common as decode_common

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import nonnegative_int, positive_int  # noqa: E402


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--lengths", type=positive_int, nargs="+",
                  default=[1024, 2048, 4096, 8192, 16384, 32768], help="KV cache lengths S")
  ap.add_argument("--batch", type=positive_int, default=8)
  ap.add_argument("--heads", type=positive_int, default=32, help="query heads")
  ap.add_argument("--kv-heads", type=positive_int, default=8, help="must divide --heads")
  ap.add_argument("--head-dim", type=positive_int, default=128)
  ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
  ap.add_argument("--block-kv", type=positive_int, default=None,
                  help="keys per block (GPU: power of two >= 16; TPU: multiple of 128)")
  ap.add_argument("--num-splits", type=positive_int, default=None)
  ap.add_argument("--repeats", type=positive_int, default=20, help="timed rounds (median)")
  ap.add_argument("--calls-per-sample", type=positive_int, default=None,
                  help="calls dispatched back to back per timed sample, synchronized once "
                  "(default 10 on GPU/TPU, 1 on CPU)")
  ap.add_argument("--warmup", type=nonnegative_int, default=2,
                  help="untimed calls of each program before timing (at least 1 is made)")
  ap.add_argument("--allow-interpret", action="store_true",
                  help="run the kernel in interpret mode off its hardware (tiny sizes only)")
  args = ap.parse_args(argv)
  here = jax.default_backend()
  if here not in ("gpu", "tpu") and not args.allow_interpret:
    ap.error(f"JAX runs on '{here}': decode_attention would run in interpret mode (a Python "
             "emulation; its timings mean nothing). Run on a GPU/TPU, or pass "
             "--allow-interpret with tiny --lengths to check the path.")
  if args.heads % args.kv_heads:
    ap.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads} (grouped-query "
             "attention)")
  if args.block_kv is not None:
    plat = decode_common.resolve_platform(None)   # the kernel decode_attention runs here
    interp = decode_common.resolve_interpret(plat, None)
    try:
      decode_common.check_block_kv(args.block_kv, plat, interp)
    except ValueError as e:
      where = (f" (JAX runs on '{here}': the {plat} kernel runs in interpret mode)"
               if interp else "")
      ap.error(f"--block-kv: {e}{where}")
  if args.calls_per_sample is None:
    args.calls_per_sample = 10 if here in ("gpu", "tpu") else 1
  return args


def _sample(f, a, calls: int) -> float:
  """Seconds per call of ``calls`` calls dispatched back to back, synchronized once."""
  t0 = time.perf_counter()
  out = None
  for _ in range(calls):
    out = f(*a)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / calls


def time_interleaved(cases: dict, warmup: int, repeats: int, calls: int):
  """``cases``: name -> (f, args). Compile and warm up every case, then ``repeats`` rounds of
  one sample (``calls`` calls, one synchronization) of each case in turn. Returns the first
  outputs and the per-call seconds of every round, per case."""
  outs = {name: jax.block_until_ready(f(*a)) for name, (f, a) in cases.items()}
  for _ in range(max(0, warmup - 1)):
    for f, a in cases.values():
      jax.block_until_ready(f(*a))
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (f, a) in cases.items():
      times[name].append(_sample(f, a, calls))
  return outs, times


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  dt = jnp.dtype(args.dtype)
  B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
  interp = jax.default_backend() not in ("gpu", "tpu")
  dec = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, block_kv=args.block_kv,
                                                    num_splits=args.num_splits))
  ref = jax.jit(lambda q, k, v: attnjax.attention(q, k, v, impl="xla"))
  print(f"# decode: B={B} Hq={Hq} Hkv={Hkv} D={D} {args.dtype}; jax {jax.__version__} on "
        f"{', '.join(sorted({d.device_kind for d in jax.devices()}))}; {args.repeats} "
        f"interleaved rounds of {args.calls_per_sample} call(s) per program, one "
        f"synchronization per round"
        + (" -- INTERPRET MODE: timings are not performance" if interp else ""))
  print("| S | decode ms | decode GB/s | xla ms | xla GB/s | xla/decode (paired) | range "
        "| max abs diff |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  rng = np.random.default_rng(0)
  for S in args.lengths:
    q = jnp.asarray(rng.standard_normal((B, 1, Hq, D), np.float32), dt)
    k, v = (jnp.asarray(rng.standard_normal((B, S, Hkv, D), np.float32), dt) for _ in range(2))
    n = jnp.full((B,), S, jnp.int32)
    outs, times = time_interleaved({"decode": (dec, (q, k, v, n)), "xla": (ref, (q, k, v))},
                                   args.warmup, args.repeats, args.calls_per_sample)
    ms_d = statistics.median(times["decode"]) * 1e3
    ms_x = statistics.median(times["xla"]) * 1e3
    paired = [x / d for x, d in zip(times["xla"], times["decode"]) if d > 0]
    gb = 2.0 * B * S * Hkv * D * dt.itemsize / 1e9
    err = float(jnp.max(jnp.abs(outs["decode"].astype(jnp.float32)
                                - outs["xla"].astype(jnp.float32))))
    row = dict(S=S, decode_ms=ms_d, xla_ms=ms_x, decode_gbs=gb / (ms_d * 1e-3),
               xla_gbs=gb / (ms_x * 1e-3), speedup=statistics.median(paired),
               speedup_lo=min(paired), speedup_hi=max(paired), err=err,
               decode_round_s=times["decode"], xla_round_s=times["xla"])
    rows.append(row)
    print(f"| {S} | {ms_d:.4g} | {row['decode_gbs']:.4g} | {ms_x:.4g} | {row['xla_gbs']:.4g} | "
          f"{row['speedup']:.3g} | {row['speedup_lo']:.3g} - {row['speedup_hi']:.3g} | "
          f"{err:.1e} |", flush=True)
  return rows


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
