#!/usr/bin/env python
"""Context-parallel attention: communication volume, work balance and exactness per strategy.

For every strategy (ring with contiguous / zigzag / striped layouts, all_gather, ulysses, usp)
and mask (causal, causal sliding window, causal chunked, full) this reports, per device:

* communication: bytes *received* per device by the collectives of the forward program and of
  the forward+backward (gradient) program,
  - from a model stated below (``model_bytes``), and
  - measured from the compiled HLO: every collective-permute / all-gather / all-to-all /
    reduce-scatter / all-reduce, its result shape, multiplied by the trip count of the while
    loops around it, with the same per-op convention:
      collective-permute  result bytes
      all-gather          result bytes * (g-1)/g       (g = replica group size)
      all-to-all          result bytes * (g-1)/g
      reduce-scatter      result bytes * (g-1)          (ring reduce-scatter)
      all-reduce          result bytes * 2 (g-1)/g      (ring all-reduce)
  The two must agree; a mismatch is printed and makes the script exit with status 1.
* work balance: per-device attention FLOPs from :func:`attnjax.parallel.flop_balance_report`
  (token granularity): ``max/mean`` over devices and, for lock-step rings, critical path / ideal.
* exactness: the largest absolute difference of the output and of dq/dk/dv from single-device
  :func:`attnjax.attention` on the same inputs (natural order).
* time: only on real multi-device accelerators (``jax.default_backend() != "cpu"``): median of
  ``--repeats`` calls after warm-up, forward and forward+backward. On simulated CPU devices no
  time is reported (their numbers say nothing about interconnects).

Communication model (bytes received per device; ``L = T / n`` local tokens, ``b`` = bytes per
element, ``K = B L Hkv D b``, ``V = B L Hkv Dv b``, ``Q = B L Hq D b``, ``O = B L Hq Dv b``,
``s = B L 4`` segment ids; ``S`` = ring steps that have work, from the static schedule):

* ring, forward: ``(S-1) (K + V + s)`` -- K/V/segment ids move one hop per step.
  backward adds ``R (K + V + s)`` (K/V replayed: ``R = S-1``, but ``R = 0`` when ``S = 2``:
  the single forward hop and its replay compute the same ``ppermute`` of the same K/V and XLA
  merges them, keeping the received chunk alive instead) ``+ (S-1+[S>1]) (K + V) * 4/b``
  (float32 dK/dV travel with K/V, then one hop home).
* all_gather, forward: ``(n-1) (K + V + s)``; backward adds the reduce-scatter of dK, dV:
  ``(n-1) (K + V)``.
* The forward+backward program returns the output and its VJP for a cotangent ``ct`` (as in a
  training step, the output is needed, so its communication is not dead code).
* ulysses (K/V heads repeated to ``max(Hkv, n)`` when ``Hkv < n``: ``K', V'``), forward:
  ``(n-1)/n (Q + K' + V' + O) + (n-1) s``; backward adds ``(n-1)/n (O + Q + K' + V')``.
* usp (Ulysses degree ``u``, ring degree ``r``): the Ulysses terms with ``u``, plus the ring
  terms over ``r`` on the head-sharded super-shards (``K'`` and ``V'`` per device have the same
  size as after the all-to-all, segment ids ``u s``).

Run only at small sizes on CPU (default T=128 on 8 simulated devices)::

  python experiments/bench_context_parallel.py              # all strategies and masks
  python experiments/bench_context_parallel.py --quick      # causal + window, fewer layouts
  python experiments/bench_context_parallel.py --out-md cp.md
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import int_at_least, positive_int  # noqa: E402  (imports no jax/torch)

DEFAULT_DEVICES = 8
_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _flag_device_count(xla_flags: str) -> int | None:
  m = re.search(_COUNT_FLAG + r"=(\d+)", xla_flags or "")
  return int(m.group(1)) if m else None


def _parse_args(argv=None, environ=None):
  environ = os.environ if environ is None else environ
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--devices", type=int_at_least(2), default=None,
                  help=f"simulated CPU devices (CPU only; default {DEFAULT_DEVICES}). Set "
                  f"through XLA_FLAGS={_COUNT_FLAG}=N before jax starts; an XLA_FLAGS that "
                  "already sets a different count is an error")
  ap.add_argument("--seq-len", type=positive_int, default=128,
                  help="tokens T (a multiple of 2 x devices, >= 16)")
  ap.add_argument("--batch", type=positive_int, default=1)
  ap.add_argument("--heads", type=positive_int, default=8,
                  help="query heads (ulysses: a multiple of the device count)")
  ap.add_argument("--kv-heads", type=positive_int, default=2, help="must divide --heads")
  ap.add_argument("--head-dim", type=positive_int, default=16)
  ap.add_argument("--segments", action="store_true", help="add packed-document segment ids")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--repeats", type=positive_int, default=5)
  ap.add_argument("--out-md", default=None)
  args = ap.parse_args(argv)
  flagged = _flag_device_count(environ.get("XLA_FLAGS", ""))
  if flagged is not None and args.devices is not None and args.devices != flagged:
    ap.error(f"--devices {args.devices} would be ignored: XLA_FLAGS already sets "
             f"{_COUNT_FLAG}={flagged}. Pass --devices {flagged}, or remove that flag from "
             "XLA_FLAGS")
  args.devices = flagged or args.devices or DEFAULT_DEVICES
  if args.heads % args.kv_heads:
    ap.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
  if args.seq_len < 16:
    ap.error(f"--seq-len must be >= 16 (the window mask is T // 16 tokens), got {args.seq_len}")
  return args


def size_errors(args, n: int) -> list[str]:
  """What the sizes of ``args`` break on ``n`` devices (every strategy of the run must work)."""
  out = []
  if n % 2:
    out.append(f"usp (2-way Ulysses x ring) needs an even device count, got {n}")
  if args.seq_len % (2 * n):
    out.append(f"--seq-len {args.seq_len} must be a multiple of 2 x {n} devices (zigzag layout "
               f"of {2 * n} chunks)")
  if args.heads % n:
    out.append(f"--heads {args.heads} must be a multiple of the {n} devices (ulysses shards the "
               "heads)")
  return out


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" {_COUNT_FLAG}={ARGS.devices}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import attnjax as aj  # noqa: E402
from attnjax import masks as M  # noqa: E402
from attnjax import parallel  # noqa: E402
from attnjax.parallel import plan as plan_lib  # noqa: E402

COLLECTIVES = ("collective-permute", "all-gather", "all-to-all", "reduce-scatter", "all-reduce")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "u8": 1,
                "s8": 1, "pred": 1, "s16": 2, "u16": 2}


# ------------------------------------------------------------------------------ HLO parsing
def _shape_bytes(type_str: str) -> int:
  total = 0
  for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", type_str):
    if dt not in _DTYPE_BYTES:
      continue
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    total += n * _DTYPE_BYTES[dt]
  return total


def _group_size(line: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if m:
    return int(m.group(1).split(",")[-1])
  return num_devices


def hlo_collective_bytes(hlo: str, num_devices: int) -> dict:
  """Bytes received per device by kind, with while-loop trip counts applied."""
  comps, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m and not line.startswith(" "):
      name = m.group(1)
      comps[name] = {"lines": [], "entry": line.startswith("ENTRY")}
      continue
    if line.startswith("}"):
      name = None
      continue
    if name is not None:
      comps[name]["lines"].append(line)
  mult = {n: 0 for n in comps}

  def visit(n, k):
    if n not in comps:
      return
    mult[n] += k
    for line in comps[n]["lines"]:
      trip = 1
      if " while(" in line:
        t = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        trip = int(t.group(1)) if t else 1
      for key, callee in re.findall(r"\b(body|condition|to_apply|calls)=%?([\w.\-]+)", line):
        if key == "to_apply":
          continue  # reductions of collectives / sorts: no nested collectives
        visit(callee, k * (trip if key in ("body", "condition") else 1))
      for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
        for callee in re.findall(r"%?([\w.\-]+)", group):
          visit(callee, k)

  for n, c in comps.items():
    if c["entry"]:
      visit(n, 1)
  out = {kind: 0.0 for kind in COLLECTIVES}
  for n, c in comps.items():
    if not mult[n]:
      continue
    for line in c["lines"]:
      for kind in COLLECTIVES:
        m = re.search(rf"=\s*(.*?)\s{kind}(?:-start)?\(", line)
        if not m:
          continue
        nbytes = _shape_bytes(m.group(1))
        g = _group_size(line, num_devices)
        factor = {"collective-permute": 1.0, "all-gather": (g - 1) / g,
                  "all-to-all": (g - 1) / g, "reduce-scatter": g - 1.0,
                  "all-reduce": 2 * (g - 1) / g}[kind]
        out[kind] += mult[n] * nbytes * factor
  return out


# ------------------------------------------------------------------------------------ model
def _replay(steps):
  """K/V hops replayed by the ring backward (see the module docstring for S = 2)."""
  return 0 if steps == 2 else steps - 1


def model_bytes(strategy, *, B, T, Hq, Hkv, D, Dv, itemsize, n, u=1, steps=1, segments=False):
  """(forward, forward+backward) bytes received per device (see the module docstring)."""
  L = T // (n * u)
  s = B * L * 4 if segments else 0
  if strategy == "ring":
    K, V = B * L * Hkv * D * itemsize, B * L * Hkv * Dv * itemsize
    fwd = (steps - 1) * (K + V + s)
    bwd = _replay(steps) * (K + V + s) + (steps - 1 + (steps > 1)) * (K + V) * 4 / itemsize
    return fwd, fwd + bwd
  if strategy == "all_gather":
    K, V = B * L * Hkv * D * itemsize, B * L * Hkv * Dv * itemsize
    fwd = (n - 1) * (K + V + s)
    return fwd, fwd + (n - 1) * (K + V)
  g = n if strategy == "ulysses" else u
  hk = max(Hkv, g)
  Q, O = B * L * Hq * D * itemsize, B * L * Hq * Dv * itemsize
  K, V = B * L * hk * D * itemsize, B * L * hk * Dv * itemsize
  a2a = (g - 1) / g
  fwd = a2a * (Q + K + V + O) + (g - 1) * s
  bwd = a2a * (O + Q + K + V)
  if strategy == "usp":  # ring over n ranks on [B, u L, hk/u, D] blocks
    Kr, Vr, sr = K, V, u * s
    fwd += (steps - 1) * (Kr + Vr + sr)
    bwd += _replay(steps) * (Kr + Vr + sr) + (steps - 1 + (steps > 1)) * (Kr + Vr) * 4 / itemsize
  return fwd, fwd + bwd


# ------------------------------------------------------------------------------------ bench
def _ring_steps(mask, layout, n, heads):
  table = np.asarray(layout).reshape(n, -1)
  sched = plan_lib.ring_schedule(plan_lib.global_mask(mask), table, table, heads, 8)
  return sched.num_steps


def run_config(cfg, args, devices, rng, real_hw):
  strategy, scheme, mask_name, mask = cfg["strategy"], cfg["scheme"], cfg["mask_name"], cfg["mask"]
  n_all = len(devices)
  B, T, Hq, Hkv, D = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
  Dv = D
  if strategy == "usp":
    u = 2
    n = n_all // u
    mesh = jax.make_mesh((u, n), ("u", "sp"), devices=devices)
    kw = dict(axis="sp", ulysses_axis="u")
    seq_spec = ("sp", "u")
  else:
    u, n = 1, n_all
    mesh = jax.make_mesh((n,), ("sp",), devices=devices)
    kw = dict(axis="sp")
    seq_spec = "sp"
  layout = parallel.load_balance_permutation(T, n, scheme)
  q = rng.standard_normal((B, T, Hq, D)).astype(np.float32)
  k = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
  v = rng.standard_normal((B, T, Hkv, Dv)).astype(np.float32)
  seg = (np.cumsum(rng.random((B, T)) < 0.05, axis=1).astype(np.int32)
         if args.segments else None)
  ct = rng.standard_normal((B, T, Hq, Dv)).astype(np.float32)
  x_sh = NamedSharding(mesh, P(None, seq_spec, None, None))
  put = lambda x: jax.device_put(np.asarray(x).take(layout, axis=1), x_sh)
  qp, kp, vp, ctp = (put(x) for x in (q, k, v, ct))
  segp = None if seg is None else jax.device_put(seg.take(layout, axis=1),
                                                 NamedSharding(mesh, P(None, seq_spec)))

  def fwd(q, k, v):
    return parallel.context_parallel_attention(q, k, v, mesh=mesh, strategy=strategy,
                                               mask=mask, segment_ids=segp,
                                               load_balance=scheme, **kw)

  def grad(q, k, v):
    out, vjp = jax.vjp(fwd, q, k, v)
    return out, vjp(ctp)

  fwd_c = jax.jit(fwd).lower(qp, kp, vp).compile()
  grad_c = jax.jit(grad).lower(qp, kp, vp).compile()
  meas_f = sum(hlo_collective_bytes(fwd_c.as_text(), n_all).values())
  meas_g = sum(hlo_collective_bytes(grad_c.as_text(), n_all).values())
  steps = _ring_steps(mask, layout, n, Hq) if strategy in ("ring", "usp") else 1
  mod_f, mod_g = model_bytes(strategy, B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, itemsize=4, n=n,
                             u=u, steps=steps, segments=seg is not None)

  out = np.asarray(fwd_c(qp, kp, vp)).take(parallel.inverse_permutation(layout), axis=1)
  grads = [np.asarray(g).take(parallel.inverse_permutation(layout), axis=1)
           for g in grad_c(qp, kp, vp)[1]]
  ref = np.asarray(aj.attention(q, k, v, mask=mask, segment_ids=seg))
  ref_g = jax.grad(lambda q, k, v: jnp.sum(aj.attention(q, k, v, mask=mask, segment_ids=seg)
                                           * ct), argnums=(0, 1, 2))(q, k, v)
  err = max([float(np.max(np.abs(out - ref)))] +
            [float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(grads, ref_g)])

  rep = parallel.flop_balance_report(T, n, mask, strategy=strategy, scheme=scheme,
                                     num_heads=Hq, head_dim=D, batch=B, ulysses_shards=u)
  ideal = rep.total / rep.num_devices
  row = dict(strategy=strategy, scheme=scheme or "contiguous", mask=mask_name, steps=steps,
             model_fwd=mod_f, hlo_fwd=meas_f, model_grad=mod_g, hlo_grad=meas_g,
             max_over_mean=rep.max_over_mean, critical=rep.critical_path / ideal, err=err,
             t_fwd=None, t_grad=None)
  if real_hw:
    for key, c in (("t_fwd", fwd_c), ("t_grad", grad_c)):
      jax.block_until_ready(c(qp, kp, vp))
      ts = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(c(qp, kp, vp))
        ts.append(time.perf_counter() - t0)
      row[key] = float(np.median(ts))
  return row


def configs(args):
  T = args.seq_len
  masks = {"causal": M.causal(), "window": M.sliding_window(T // 16),
           "chunked": M.causal() & M.chunked(T // 4), "full": M.full()}
  if args.quick:
    masks = {k: masks[k] for k in ("causal", "window")}
  plans = [("ring", None), ("ring", "zigzag"), ("ring", "striped"), ("all_gather", None),
           ("all_gather", "zigzag"), ("ulysses", None), ("usp", "zigzag")]
  if args.quick:
    plans = [("ring", None), ("ring", "zigzag"), ("all_gather", "zigzag"), ("ulysses", None),
             ("usp", "zigzag")]
  for strategy, scheme in plans:
    for name, mask in masks.items():
      yield dict(strategy=strategy, scheme=scheme, mask_name=name, mask=mask)


def main(args):
  devices = jax.devices()
  real_hw = jax.default_backend() != "cpu" and len(devices) > 1
  if len(devices) < 2:
    sys.exit(f"need at least 2 devices, got {len(devices)}")
  errors = size_errors(args, len(devices))
  if errors:
    sys.exit("error: " + "; ".join(errors))
  rng = np.random.default_rng(0)
  lines = [
      f"# Context-parallel attention: {len(devices)} x {devices[0].device_kind} "
      f"({jax.default_backend()}{', simulated' if not real_hw else ''}), jax {jax.__version__}",
      "",
      f"B={args.batch} T={args.seq_len} Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} "
      f"float32{', packed segment ids' if args.segments else ''}. Bytes received per device "
      f"(KiB), model vs compiled HLO; work balance from flop_balance_report; err = max |diff| "
      f"of out, dq, dk, dv vs single-device attnjax.attention.",
      "",
      "| strategy | layout | mask | ring steps | fwd KiB model | fwd KiB HLO | fwd+bwd KiB model "
      "| fwd+bwd KiB HLO | max/mean FLOPs | critical path / ideal | err | time fwd / fwd+bwd |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  bad = 0
  for cfg in configs(args):
    row = run_config(cfg, args, devices, rng, real_hw)
    ok_f = np.isclose(row["model_fwd"], row["hlo_fwd"], rtol=1e-6)
    ok_g = np.isclose(row["model_grad"], row["hlo_grad"], rtol=1e-6)
    bad += not (ok_f and ok_g)
    timing = ("n/a (simulated)" if row["t_fwd"] is None else
              f"{row['t_fwd'] * 1e3:.2f} / {row['t_grad'] * 1e3:.2f} ms")
    line = (f"| {row['strategy']} | {row['scheme']} | {row['mask']} | {row['steps']} | "
            f"{row['model_fwd'] / 1024:.1f} | {row['hlo_fwd'] / 1024:.1f}"
            f"{'' if ok_f else ' MISMATCH'} | {row['model_grad'] / 1024:.1f} | "
            f"{row['hlo_grad'] / 1024:.1f}{'' if ok_g else ' MISMATCH'} | "
            f"{row['max_over_mean']:.3f} | {row['critical']:.3f} | {row['err']:.1e} | {timing} |")
    lines.append(line)
    print(line, flush=True)
  if args.out_md:
    with open(args.out_md, "w") as f:
      f.write("\n".join(lines) + "\n")
  if bad:
    print(f"{bad} configuration(s): communication model and HLO disagree", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main(ARGS)
