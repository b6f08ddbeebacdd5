#!/usr/bin/env python
"""Tile and launch-parameter sweep of the GPU flash kernel (``pallas_gpu``) on a real NVIDIA GPU.

For each mask and each configuration ``BQxBK[:warps[:stages]]`` (used for forward and backward)
or ``default`` (the backend's own tiles) it times the forward and the
forward+backward of ``attnjax.attention(impl=PallasBackend("gpu", ...))`` next to
``jax.nn.dot_product_attention(implementation="cudnn")`` (the best peer on a GPU), and checks
every configuration's output and gradients against a float32 full-precision dense computation
of the same inputs (relative Frobenius error; bfloat16 inputs land near 3e-3), or against cuDNN
where the dense logits would exceed ``--ref-max-bytes``.

It also times the adapter's layout work alone (the ``[B, T, H, D]`` <-> ``[B, H, T, D]``
transposes of q, k, v and the output) so the kernel's share of a call is visible.

Timing: every case is compiled and warmed up, then timed in interleaved rounds; in a round each
case runs ``--calls`` back-to-back calls, synchronized once, so launch latency overlaps as in a
training step. Reported: median ms per call over the rounds, TFLOP/s over visible pairs only
(forward ``2 * B * H * visible * (D + Dv)``, forward+backward 3.5x that), and time relative to
cuDNN. GPU only: refuses to run elsewhere (interpret-mode timings mean nothing).

  python experiments/sweep_pallas_gpu.py --lengths 8192 --configs 64x64 128x64:4:3 128x128:8:2
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax as aj
from attnjax import masks as M
from attnjax.backends.pallas import PallasBackend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import float_at_least, nonnegative_int, positive_int  # noqa: E402

MASKS = ("causal", "sliding")
DEFAULT_CONFIGS = ("default", "64x64", "64x128", "128x64:4:3", "128x64:8:3", "128x128:8:2")
CONFIG_FORM = "'default' or BQxBK[:warps[:stages]] with positive integers, e.g. 64x64, 128x64:4:3"


def parse_config(text: str):
  """``"default"`` -> ``(None,) * 4``; ``"BQxBK[:warps[:stages]]"`` -> ``(bq, bk, warps,
  stages)`` (an empty or absent warps/stages field = the backend's choice, None). A malformed
  or non-positive entry raises ``argparse.ArgumentTypeError`` naming the expected form (it is
  the ``type=`` of ``--configs``, so the error comes before anything needs a GPU)."""
  if text == "default":  # the backend's own choice (forward and backward tiles may differ)
    return None, None, None, None
  parts = text.split(":")
  tiles = parts[0].lower().split("x")
  try:
    if len(parts) > 3 or len(tiles) != 2:
      raise ValueError
    bq, bk = (int(x) for x in tiles)
    warps = int(parts[1]) if len(parts) > 1 and parts[1] else None
    stages = int(parts[2]) if len(parts) > 2 and parts[2] else None
  except ValueError:
    raise argparse.ArgumentTypeError(f"bad config {text!r}: expected {CONFIG_FORM}") from None
  if min(x for x in (bq, bk, warps, stages) if x is not None) < 1:
    raise argparse.ArgumentTypeError(f"bad config {text!r}: block sizes, warps and stages must "
                                     f"be >= 1 (expected {CONFIG_FORM})")
  return bq, bk, warps, stages


def make_mask(name: str, window: int):
  if name == "causal":
    return M.causal(), dict(is_causal=True)
  if name == "sliding":
    return M.causal() & M.sliding_window(window, 0), dict(is_causal=True,
                                                          local_window_size=(window, 0))
  raise ValueError(f"--masks: unknown mask {name!r}; allowed: {', '.join(MASKS)}")


def visible_pairs(name: str, t: int, window: int) -> int:
  if name == "causal":
    return t * (t + 1) // 2
  w = window + 1
  return sum(min(i + 1, w) for i in range(t))


def parse_args(argv=None) -> argparse.Namespace:
  """Every option is checked here, before the GPU check: a typo fails at once, anywhere."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--lengths", type=positive_int, nargs="+", default=[8192])
  ap.add_argument("--batch", type=positive_int, default=1)
  ap.add_argument("--heads", type=positive_int, default=8)
  ap.add_argument("--head-dim", type=positive_int, default=64)
  ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
  ap.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
  ap.add_argument("--window", type=nonnegative_int, default=511)
  ap.add_argument("--configs", nargs="+", type=parse_config, default=None,
                  help=f"tile configurations: {CONFIG_FORM} (default: "
                  f"{' '.join(DEFAULT_CONFIGS)})")
  ap.add_argument("--rounds", type=positive_int, default=7)
  ap.add_argument("--calls", type=positive_int, default=10)
  ap.add_argument("--no-backward", action="store_true")
  ap.add_argument("--ref-max-bytes", type=float_at_least(0.0), default=4 * 2**30,
                  help="largest [B, H, T, T] float32 logits the dense reference may materialize")
  ap.add_argument("--out-csv", default=None)
  args = ap.parse_args(argv)
  if args.configs is None:
    args.configs = [parse_config(c) for c in DEFAULT_CONFIGS]
  return args


def main(argv=None):
  args = parse_args(argv)
  if jax.default_backend() != "gpu":
    sys.exit("sweep_pallas_gpu.py needs a GPU (the kernels would run in interpret mode)")
  configs = args.configs
  dt = jnp.dtype(args.dtype)
  B, H, D = args.batch, args.heads, args.head_dim
  rows = []
  for T in args.lengths:
    key = jax.random.split(jax.random.key(T), 4)
    q, k, v, ct = (jax.random.normal(x, (B, T, H, D), jnp.float32) for x in key)
    q, k, v, ct = (x.astype(dt) for x in (q, k, v, ct))
    cases = {}
    refs = {}
    for mname in args.masks:
      mask, nn_kw = make_mask(mname, args.window)
      vis = visible_pairs(mname, T, args.window)

      def loss_of(f):
        return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))

      def ref_fn(q, k, v, mask=mask):
        with jax.default_matmul_precision("highest"):
          return aj.attention(q, k, v, mask=mask, impl="xla")

      impls = {"cudnn": lambda q, k, v, kw=nn_kw: jax.nn.dot_product_attention(
          q, k, v, implementation="cudnn", **kw)}
      if B * H * T * T * 4 <= args.ref_max_bytes:  # dense float32 reference fits
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        r_out = jax.jit(ref_fn)(*f32)
        r_grads = jax.jit(jax.grad(loss_of(ref_fn), argnums=(0, 1, 2)))(*f32)
      else:  # too large to materialize: errors are against cuDNN
        r_out = jax.jit(impls["cudnn"])(q, k, v).astype(jnp.float32)
        r_grads = [g.astype(jnp.float32) for g in
                   jax.jit(jax.grad(loss_of(impls["cudnn"]), argnums=(0, 1, 2)))(q, k, v)]
        print(f"T={T} {mname}: errors are against cuDNN (dense reference > "
              f"{args.ref_max_bytes / 2**30:.0f} GiB)", file=sys.stderr)
      refs[mname] = (r_out, r_grads)
      for bq, bk, w, s in configs:
        be = PallasBackend("gpu", block_q=bq, block_kv=bk, num_warps=w, num_stages=s)
        label = ("pallas default" if bq is None else
                 f"pallas {bq}x{bk} w{w or '-'} s{s or '-'}")
        impls[label] = lambda q, k, v, be=be, mask=mask: aj.attention(q, k, v, mask=mask,
                                                                     impl=be)
      for label, f in impls.items():
        fwd = jax.jit(f)
        bwd = None if args.no_backward else jax.jit(jax.grad(loss_of(f), argnums=(0, 1, 2)))
        try:
          out = fwd(q, k, v)
          err = float(jnp.linalg.norm(out.astype(jnp.float32) - r_out) / jnp.linalg.norm(r_out))
          gerr = float("nan")
          if bwd is not None:
            g = bwd(q, k, v)
            gerr = max(float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
                       for a, b in zip(g, r_grads))
          cases[(mname, label)] = dict(fwd=fwd, bwd=bwd, err=err, gerr=gerr, vis=vis, t_f=[],
                                       t_b=[])
        except Exception as e:  # a config the compiler rejects (e.g. shared memory) is reported
          msg = str(e).splitlines()[0][:160]
          print(f"T={T} {mname} {label}: failed: {type(e).__name__}: {msg}", file=sys.stderr)
          rows.append(dict(T=T, mask=mname, impl=label, error=msg))
    layout = jax.jit(lambda q, k, v: tuple(x.transpose(0, 2, 1, 3) for x in (q, k, v, q)))
    cases[("-", "layout transposes only")] = dict(fwd=layout, bwd=None, err=float("nan"),
                                                  gerr=float("nan"), vis=0, t_f=[], t_b=[])

    def timed(fn):
      jax.block_until_ready(fn(q, k, v))
      t0 = time.perf_counter()
      for _ in range(args.calls):
        r = fn(q, k, v)
      jax.block_until_ready(r)
      return (time.perf_counter() - t0) / args.calls * 1e3

    for c in cases.values():  # warm-up
      jax.block_until_ready(c["fwd"](q, k, v))
      if c["bwd"] is not None:
        jax.block_until_ready(c["bwd"](q, k, v))
    for _ in range(args.rounds):
      for c in cases.values():
        c["t_f"].append(timed(c["fwd"]))
        if c["bwd"] is not None:
          c["t_b"].append(timed(c["bwd"]))
    for (mname, label), c in cases.items():
      tf = statistics.median(c["t_f"])
      tb = statistics.median(c["t_b"]) if c["t_b"] else float("nan")
      flops = 2.0 * B * H * c["vis"] * (D + D)
      base = cases.get((mname, "cudnn"))
      rows.append(dict(
          T=T, mask=mname, impl=label, fwd_ms=tf, fwdbwd_ms=tb,
          fwd_tflops=flops / tf / 1e9 if c["vis"] else float("nan"),
          fwdbwd_tflops=3.5 * flops / tb / 1e9 if c["vis"] and c["t_b"] else float("nan"),
          fwd_vs_cudnn=tf / statistics.median(base["t_f"]) if base else float("nan"),
          fwdbwd_vs_cudnn=(tb / statistics.median(base["t_b"]) if base and base["t_b"]
                           else float("nan")),
          err_out=c["err"], err_grads=c["gerr"]))
  cols = ["T", "mask", "impl", "fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops",
          "fwd_vs_cudnn", "fwdbwd_vs_cudnn", "err_out", "err_grads", "error"]
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; B={B} H={H} D={D} "
        f"{args.dtype}; window {args.window}; {args.rounds} rounds x {args.calls} calls")
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  for r in rows:
    print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                            for c in cols) + " |")
  if args.out_csv:
    with open(args.out_csv, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=cols)
      w.writeheader()
      for r in rows:
        w.writerow({c: r.get(c, "") for c in cols})


if __name__ == "__main__":
  main()
