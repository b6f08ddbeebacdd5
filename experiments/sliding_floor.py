#!/usr/bin/env python
"""How fast can a sliding window be on XLA:CPU, relative to the causal forward?

Issue 2 bounds ``chunked``'s sliding window (511, 0) forward at T=8192 by 0.15 of its own
causal forward. This script measures, in one process and in interleaved rounds (one call of
every case per round, paired ratios per round), the causal and sliding forwards of ``chunked``
next to *floors*: stripped-down programs that do a subset of the window's unavoidable work in
the shape XLA:CPU runs fastest (a scan over 128-row query blocks, all heads in one batched
matmul, the key tile a dynamic slice of head-major keys, as the band computation does):

* ``dots R x W``: only the two matmuls, ``S = Q K^T`` and ``S V``, of each ``R``-row query
  block against ``W`` keys. ``W = window + 1`` is exactly the visible pairs' FLOPs (every row
  of the window sees ``window + 1`` keys except the first ``window``); a band tile of ``R``
  rows must span ``W = window + R`` keys (rounded up to its 64-key steps). No mask, no
  softmax: not attention, a lower bound on its time.
* ``softmax R x W``: the same plus the softmax (row max, ``exp``, row sum, normalization),
  still with no mask: the least a correct unmasked kernel made of XLA ops does. (XLA:CPU fuses
  the exponential into the matmul here, so it can take less time than ``dots``.)

Every floor's inputs are laid out head-major before timing (free for the floor; the real
backends pay their layout inside the call). The floors' outputs are not attention and are not
checked. ``--flex`` adds PyTorch's compiled ``flex_attention`` (causal and sliding, same block
masks as ``bench_attention.py``) when torch is installed, for its own sliding / causal ratio.

Example (the BENCHMARKS.md run)::

  python experiments/sliding_floor.py --length 8192 --rounds 9 --flex
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax as aj
from attnjax import masks
from attnjax.backends.chunked import ChunkedBackend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import machine_summary, nonnegative_int, positive_int  # noqa: E402

BLOCK_Q = 128      # the band's query block (chunked's default)


def floor_fn(T: int, rows: int, width: int, softmax: bool):
  """A scan over ``rows``-row query blocks; each block multiplies against the ``width`` keys
  ending at its last row (clamped at 0): [B, H, T, D] head-major inputs."""
  nq = T // rows

  def f(qh, kh, vh):
    def row(_, i):
      qt = jax.lax.dynamic_slice_in_dim(qh, i * rows, rows, axis=2)
      k0 = jnp.clip((i + 1) * rows - width, 0, T - width)
      kt = jax.lax.dynamic_slice_in_dim(kh, k0, width, axis=2)
      vt = jax.lax.dynamic_slice_in_dim(vh, k0, width, axis=2)
      s = jnp.einsum("bhqd,bhkd->bhqk", qt, kt)
      if softmax:
        p = jnp.exp(s - s.max(axis=-1, keepdims=True))
        return None, jnp.einsum("bhqk,bhkd->bhqd", p, vt) / p.sum(axis=-1)[..., None]
      return None, jnp.einsum("bhqk,bhkd->bhqd", s, vt)
    return jax.lax.scan(row, None, jnp.arange(nq))[1]

  return jax.jit(f)


def torch_cases(T, H, D, window, q, k, v):
  import torch
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  flex = torch.compile(flex_attention, dynamic=False)
  tq, tk, tv = (torch.from_numpy(np.asarray(x)).permute(0, 2, 1, 3).contiguous()
                for x in (q, k, v))
  cases = {}
  for name, mod in (("causal", lambda b, h, i, j: j <= i),
                    ("sliding", lambda b, h, i, j: (j <= i) & (i - j <= window))):
    bm = create_block_mask(mod, None, None, T, T, device="cpu")

    def call(bm=bm):
      with torch.inference_mode():
        return flex(tq, tk, tv, block_mask=bm)
    cases[f"torch flex {name}"] = call
  return cases


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--length", type=positive_int, default=8192)
  ap.add_argument("--heads", type=positive_int, default=8)
  ap.add_argument("--head-dim", type=positive_int, default=64)
  ap.add_argument("--window", type=nonnegative_int, default=511, help="sliding window (left, 0)")
  ap.add_argument("--rounds", type=positive_int, default=7)
  ap.add_argument("--flex", action="store_true", help="also time PyTorch flex_attention")
  args = ap.parse_args(argv)
  T, H, D, W = args.length, args.heads, args.head_dim, args.window
  if T % BLOCK_Q or T < W + 1 + BLOCK_Q:
    ap.error(f"--length must be a multiple of {BLOCK_Q} and at least window + {1 + BLOCK_Q}, "
             f"got {T}")

  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(x, (1, T, H, D), jnp.float32) for x in (kq, kk, kv))
  qh, kh, vh = (jnp.asarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
  chunked = ChunkedBackend()
  cases = {}
  sliding = masks.causal() & masks.sliding_window(W, 0)
  for name, mask in (("chunked causal", masks.causal()), ("chunked sliding", sliding)):
    f = jax.jit(lambda q, k, v, mask=mask: aj.attention(q, k, v, mask=mask, impl=chunked))
    cases[name] = (lambda f=f: f(q, k, v))
  shapes = [(BLOCK_Q, W + 1)] + [(r, -(-(W + r) // 64) * 64) for r in (BLOCK_Q, 64, 32)]
  shapes = [(r, w) for r, w in shapes if w <= T]
  for rows, width in shapes:
    for softmax in (False, True):
      f = floor_fn(T, rows, width, softmax)
      cases[f"floor: {'softmax' if softmax else 'dots'} {rows} x {width}"] = (
          lambda f=f: f(qh, kh, vh))
  if args.flex:
    cases.update(torch_cases(T, H, D, W, q, k, v))

  def run(call):
    out = call()
    return jax.block_until_ready(out) if isinstance(out, jax.Array) else out

  for call in cases.values():          # compile and warm up
    run(call)
    run(call)
  times = {name: [] for name in cases}
  for _ in range(args.rounds):
    for name, call in cases.items():
      t0 = time.perf_counter()
      run(call)
      times[name].append(time.perf_counter() - t0)

  lines = [f"T={T}, H={H}, D={D}, window ({W}, 0), float32, {args.rounds} interleaved rounds; "
           f"{machine_summary()}; jax {jax.__version__}; "
           f"chunked sliding: {chunked.describe(aj.build_problem(q, k, v, mask=sliding))}",
           "", "| case | median ms | / causal (paired) | range |", "|---|---|---|---|"]
  ratios = {}
  for name, ts in times.items():
    denom = "torch flex causal" if name.startswith("torch") else "chunked causal"
    r = np.asarray(ts) / np.asarray(times[denom])
    ratios[name] = float(np.median(r))
    of = "" if denom == "chunked causal" else " (of torch flex causal)"
    lines.append(f"| {name} | {np.median(ts) * 1e3:.1f} | {np.median(r):.3f}{of} "
                 f"| {r.min():.3f} - {r.max():.3f} |")
  print("\n".join(lines))
  return {"times": times, "ratios": ratios, "markdown": "\n".join(lines)}


if __name__ == "__main__":
  main()
