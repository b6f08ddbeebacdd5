#!/usr/bin/env python
"""Attention benchmark: attnjax backends side by side with peers, measured in one run.

For each mask (causal, causal sliding window, 2-D neighborhood) and each sequence length this
measures, for every attnjax backend in ``--impl`` and every peer in ``--peers``:

* time: median wall time of ``--repeats`` calls after warm-up, of the forward pass and of
  forward+backward (gradients of ``sum(out * ct)`` w.r.t. q, k, v for a fixed random cotangent
  ``ct``). JAX functions are jitted and timed through their compiled executable with
  ``block_until_ready``; PyTorch forward runs under ``inference_mode``, forward+backward with
  ``torch.autograd.grad``. By default the timed calls are **interleaved**: every case of one
  sequence length (all masks, impls and passes) is compiled and warmed up first, then timed in
  ``--repeats`` rounds of one call each, so a slow spell of a shared machine hits all of them
  alike (cases compiled on first use, torch.compile'd flex, get one more untimed call right
  before the rounds; a compilation during the timed calls would be noted on the row). Ratios
  of two timings are then also reported **paired**: the median over rounds of the per-round
  ratio, with its range (the targets table uses these). ``--no-interleave`` times
  each case's calls back to back instead.
* compiled temp memory (JAX only): ``jax.jit(f).lower(...).compile().memory_analysis()
  .temp_size_in_bytes`` of the forward and of the forward+backward executable.
* (CSV only) peak RSS growth of the process during the timed calls (all peers, PyTorch
  included): an indicative number only (allocator caching makes it a lower bound).
* the largest absolute difference of the output and of dq/dk/dv from a base (the attnjax
  ``reference`` backend for T <= ``--ref-max-t``, else the first attnjax backend measured), so a
  peer that expresses the mask differently would show up.

Peers (each used only when importable; ``bench_peers.py`` says how each expresses the masks):
``jax_nn``, ``tokamax``, ``torch_sdpa``, ``torch_flex``, ``jax_nn_cudnn`` (GPU only), ``splash``
(TPU only); off their hardware the last two rows read "skipped (needs a GPU/TPU ...)".

Pallas backends: ``--impl pallas_gpu`` / ``pallas_tpu`` (or ``pallas_gpu:BQxBK`` for
``PallasBackend(platform, BQ, BK)``). Off their hardware the kernels run in interpret mode; the
script refuses that unless ``--allow-interpret`` is given (for checking the path on tiny sizes:
such timings are not performance).

TFLOP/s (``bench_peers_hw.py``, FlashAttention-2 convention): only the visible (query, key)
pairs of the mask count, counted exactly from the mask. Forward FLOPs
``2 * B * H * visible * (D + Dv)`` (= ``4 * B * H * D * visible`` here, Dv = D); the backward is
2.5x the forward, so a timed forward+backward call counts 3.5x the forward FLOPs. A peer that
computes the masked-out pairs too (dense jax.nn) is still credited only with the visible ones.
"this/best peer" divides a row's TFLOP/s by the highest TFLOP/s among the peers (non-attnjax
rows) that ran on the same mask and T -- issue 3's "at least 0.7x the best peer" reads off it.

The 2-D neighborhood mask needs a token grid: ``--nb-grid square`` (default) uses the square grid
``s x s`` with ``s = isqrt(T)``, so its rows have ``T = s*s`` (equal to T for 1024, 4096, 16384;
8100 for 8192); ``--nb-grid exact`` keeps T and uses the most nearly square ``r x c`` grid
(64 x 128 for 8192).

Ratios are "base / this row" with base = ``--ratio-base`` (default: the first chunked backend), the
form in which issue 2 states its targets (e.g. chunked causal forward at most 0.6x tokamax), and
"this row / the same backend's causal row at the same T" (sliding window vs causal).

Examples::

  python experiments/bench_attention.py --quick                  # smoke run, < 2 minutes
  python experiments/bench_attention.py --out-md bench.md --out-csv bench.csv   # full size
  python experiments/bench_attention.py --lengths 512 1024 --repeats 2 --impl chunked xla \\
      --block-q 128 --block-kv 512 --peers jax_nn torch_sdpa
  python experiments/bench_attention.py --lengths 16384 --masks causal --peers jax_nn \\
      --max-memory-gib 0 --ref-max-t 0                            # compiled memory only
  # issue 3 on a GPU (on a TPU: --impl pallas_tpu --peers splash jax_nn)
  python experiments/bench_attention.py --impl pallas_gpu --peers jax_nn_cudnn jax_nn \\
      --dtype bfloat16 --lengths 2048 4096 8192 16384 --ref-max-t 4096 --out-md gpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import attnjax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_peers_hw as hw  # noqa: E402
from bench_common import (MIB, cores as _cores, float_at_least, meminfo_kib,  # noqa: E402
                          nonnegative_int, positive_int, rss_reset, short_error, status_bytes)
from bench_peers import (ALL_PEERS, MaskCase, impl_labels, import_torch,  # noqa: E402
                         make_mask_case, make_runners, torch_dtype)
from bench_report import (PassResult, Row, compute_ratios, machine_lines,  # noqa: E402
                          render_csv, render_markdown)

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [1024]
ALL_MASKS = ["causal", "sliding", "neighborhood"]


# ------------------------------------------------------------------------------------ options
def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="See the module docstring for what each column means.")
  ap.add_argument("--quick", action="store_true",
                  help=f"small smoke run: lengths {QUICK_LENGTHS}, 3 repeats, flex eager "
                  "(explicit flags still win)")
  ap.add_argument("--lengths", type=positive_int, nargs="+", default=None,
                  help=f"sequence lengths (default {DEFAULT_LENGTHS}; with --quick "
                  f"{QUICK_LENGTHS})")
  ap.add_argument("--masks", nargs="+", choices=ALL_MASKS, default=ALL_MASKS)
  ap.add_argument("--impl", nargs="+", default=["chunked", "xla"],
                  help="attnjax backends: registered names (xla, chunked, pallas_tpu, "
                  "pallas_gpu, ...) or chunked:BQxBK for a chunked backend with other block "
                  "sizes, pallas_gpu:BQxBK / pallas_tpu:BQxBK likewise (default: chunked xla)")
  ap.add_argument("--allow-interpret", action="store_true",
                  help="let pallas_gpu/pallas_tpu run in interpret mode off their hardware "
                  "(tiny sizes, path checks only: the timings are not performance)")
  ap.add_argument("--block-q", type=positive_int, default=None,
                  help="block_q of plain 'chunked' (default: the backend's automatic choice)")
  ap.add_argument("--block-kv", type=positive_int, default=None,
                  help="block_kv of plain 'chunked' (default: the backend's automatic choice)")
  ap.add_argument("--peers", nargs="*", default=ALL_PEERS, choices=ALL_PEERS,
                  help="peers to measure when importable (default: all); '--peers' alone: none")
  ap.add_argument("--ratio-base", default=None,
                  help="impl label the ratio columns divide by, one of the run's row labels "
                  "(an --impl entry or a peer's label such as 'jax.nn(xla)'; default: the "
                  "first chunked impl)")
  ap.add_argument("--batch", type=positive_int, default=1)
  ap.add_argument("--heads", type=positive_int, default=8)
  ap.add_argument("--head-dim", type=positive_int, default=64)
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  ap.add_argument("--window", type=nonnegative_int, default=511,
                  help="sliding window left size: masks.sliding_window(W, 0), keys i-W..i")
  ap.add_argument("--nb-kernel", type=positive_int, default=13,
                  help="neighborhood kernel per axis")
  ap.add_argument("--nb-grid", choices=["square", "exact"], default="square",
                  help="square: s x s grid with s = isqrt(T) (T becomes s*s); exact: keep T, "
                  "most nearly square grid")
  ap.add_argument("--repeats", type=positive_int, default=None,
                  help="timed calls (median); default 5, 3 with --quick")
  ap.add_argument("--no-interleave", dest="interleave", action="store_false",
                  help="time each case's calls back to back (default: interleaved rounds over "
                  "all cases of one T, see the module docstring)")
  ap.add_argument("--calls-per-sample", type=positive_int, default=None,
                  help="JAX calls dispatched back to back per timed sample, synchronized once "
                  "(time = sample / calls). Default 1 on CPU, 10 on GPU/TPU, where a per-call "
                  "synchronization would add tens of microseconds to sub-millisecond kernels")
  ap.add_argument("--warmup", type=nonnegative_int, default=1,
                  help="untimed calls before timing (at least 1 is always made: its output is "
                  "the one checked)")
  ap.add_argument("--max-seconds-per-case", type=float_at_least(0.0, strict=True),
                  default=120.0,
                  help="a case (compile + calls) that took longer than this at some T is "
                  "skipped at larger T ('skipped (slow)'); repeats are also cut so one case "
                  "stays near this budget")
  ap.add_argument("--max-memory-gib", type=float_at_least(0.0), default=None,
                  help="do not run a case whose estimated memory exceeds this (JAX: compiled "
                  "temp + output; torch: estimate); default 70%% of MemAvailable. 0 gives a "
                  "compile-only run: JAX temp memory for every case, nothing executed")
  ap.add_argument("--ref-max-t", type=nonnegative_int, default=2048,
                  help="compare against the attnjax reference backend up to this T (else "
                  "against the first attnjax impl); 0 disables the reference")
  ap.add_argument("--no-backward", action="store_true", help="forward only")
  ap.add_argument("--flex-compile", choices=["auto", "on", "off"], default="auto",
                  help="torch.compile flex_attention (auto: on unless --quick)")
  ap.add_argument("--threads", type=positive_int, default=None,
                  help="torch threads (default: the cores XLA uses = process CPU affinity)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--target-t", type=positive_int, default=8192,
                  help="T of the issue's time targets")
  ap.add_argument("--target-mem-t", type=positive_int, default=16384,
                  help="T of the issue's memory targets")
  ap.add_argument("--out-md", default=None, help="write the markdown report here")
  ap.add_argument("--out-csv", default=None, help="write the CSV here")
  ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
  args = ap.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if args.lengths is None:
    args.lengths = QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS
  if args.repeats is None:
    args.repeats = 3 if args.quick else 5
  if args.repeats < 1:
    ap.error("--repeats must be >= 1")
  if args.flex_compile == "auto":
    args.flex_compile = "off" if args.quick else "on"
  if args.threads is None:
    args.threads = _cores()
  if args.max_memory_gib is None:
    args.max_memory_gib = 0.7 * meminfo_kib("MemAvailable") / MIB
  args.lengths = sorted(set(args.lengths))
  refusal = hw.interpret_refusal(args.impl, args.allow_interpret)
  if refusal:
    ap.error(refusal)
  if args.ratio_base is not None:
    labels = impl_labels(args)
    if args.ratio_base not in labels:
      ap.error(f"--ratio-base {args.ratio_base!r} is not a row of this run; allowed values "
               f"(--impl and --peers labels): {', '.join(repr(x) for x in labels)}")
  return args



# ------------------------------------------------------------------------------- measurement

def _timed_calls(call, warmup, repeats, budget_s, res: PassResult, defer=None, call_once=None,
                 compile_count=None):
  """Warm up (the first call, then call() max(1, warmup) - 1 more times), then time `repeats`
  calls of call() (which blocks; fewer when they would take the whole case past `budget_s`
  seconds). A sample of call() is ``res.per_sample`` executions; ``call_once`` (one execution)
  makes the first call, so ``res.first_s`` is one execution's time. Returns the first call's
  output. With `defer`, the timed calls are not made here: ``defer(call, n)`` hands them to the
  caller's interleaved rounds. ``compile_count`` (a counter of compilations): the compilations
  made during the timed calls go to ``res.timed_compiles``."""
  base = rss_reset()
  t_start = time.perf_counter()
  first = (call_once or call)()
  t_first = time.perf_counter() - t_start
  res.first_s = t_first
  # A sample's time, estimated from the first call (an upper bound: it may include autotuning).
  t_sample = t_first * (res.per_sample if call_once is not None else 1)
  for _ in range(max(1, warmup) - 1):
    call()
  left = budget_s - (time.perf_counter() - t_start)
  n = repeats
  if t_sample * repeats > left:
    n = max(1, min(repeats, int(left // max(t_sample, 1e-9))))
    if n < repeats:
      res.note = f"{n} repeat(s) to stay within --max-seconds-per-case"
  if defer is not None:
    res.status = "ok"
    defer(call, n)
    return first
  times = []
  c0 = compile_count() if compile_count is not None else None
  for _ in range(n):
    t0 = time.perf_counter()
    call()
    times.append((time.perf_counter() - t0) / res.per_sample)
  if c0 is not None:
    res.timed_compiles = compile_count() - c0
  res.ms = statistics.median(times) * 1e3
  res.repeats = n
  peak = status_bytes("VmHWM")
  if base is not None and peak is not None:
    res.rss_mib = max(peak - base, 0) / MIB
  res.status = "ok"
  return first


def calls_per_sample(args) -> int:
  n = getattr(args, "calls_per_sample", None)
  if n is None:
    return 1 if jax.default_backend() == "cpu" else 10
  if n < 1:
    raise SystemExit(f"--calls-per-sample must be >= 1, got {n}")
  return n


def _jax_pass(fn, arrays, extra, ct, backward, args, res: PassResult, limit_bytes,
              skip: str | None = None, defer=None):
  """Compile and report temp memory; then, unless `skip` (a status) or the memory limit says
  otherwise, time the pass."""
  if backward:
    def loss(q, k, v, ct_, *m):
      return jnp.sum(fn(q, k, v, *m).astype(jnp.float32) * ct_.astype(jnp.float32))
    grad = jax.grad(loss, argnums=(0, 1, 2))

    def f(q, k, v, ct_, *m):
      return grad(q, k, v, ct_, *m)
    call_args = (*arrays, ct, *extra)
  else:
    f = fn
    call_args = (*arrays, *extra)
  t0 = time.perf_counter()
  compiled = jax.jit(f).lower(*call_args).compile()
  res.compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  if mem is not None:
    res.temp_mib = mem.temp_size_in_bytes / MIB
    need = mem.temp_size_in_bytes + mem.output_size_in_bytes
    if need > limit_bytes:
      res.status = f"skipped (memory: needs {_size(need)} > {_size(limit_bytes)})"
      return None
  if skip:
    res.status = skip
    return None

  res.per_sample = calls_per_sample(args)

  def call():  # per_sample back-to-back executions, one synchronization
    out = None
    for _ in range(res.per_sample):
      out = compiled(*call_args)
    return jax.block_until_ready(out)
  budget = max(args.max_seconds_per_case - res.compile_s, 1e-3)
  out = _timed_calls(call, args.warmup, args.repeats, budget, res, defer,
                     call_once=lambda: jax.block_until_ready(compiled(*call_args)))
  if backward:
    return [np.asarray(x, np.float32) for x in out]
  return [np.asarray(out, np.float32)]


def _torch_pass(fn, tensors, ct, backward, args, res: PassResult, defer=None,
                compile_count=None):
  torch = import_torch()
  if backward:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]

    def call():
      out = fn(*leaves)
      return torch.autograd.grad(out, leaves, ct)
  else:
    def call():
      with torch.inference_mode():
        return fn(*tensors)
  out = _timed_calls(call, args.warmup, args.repeats, args.max_seconds_per_case, res, defer,
                     compile_count=compile_count)
  if backward:   # [B, H, T, D] -> [B, T, H, D]
    return [x.detach().float().numpy().transpose(0, 2, 1, 3) for x in out]
  return [out.float().numpy().transpose(0, 2, 1, 3)]


def _size(nbytes: float) -> str:
  if nbytes >= 1024 * MIB:
    return f"{nbytes / MIB / 1024:.1f} GiB"
  return f"{nbytes / MIB:.1f} MiB"


def _max_err(got, base):
  if got is None or base is None:
    return None
  return float(max(np.max(np.abs(g - b)) for g, b in zip(got, base)))


class Bench:
  def __init__(self, args):
    self.args = args
    self.runners = make_runners(args)
    self.rows: list[Row] = []
    self.slow: dict[tuple[str, str, str], str] = {}   # (impl, mask kind, pass) -> reason
    self.limit_bytes = args.max_memory_gib * 1024 * MIB
    self.dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    if any(r.family == "torch" and not r.unavailable for r in self.runners):
      import_torch().set_num_threads(args.threads)
    base = args.ratio_base
    if base is None:
      base = next((r.label for r in self.runners if r.label.startswith("chunked")),
                  self.runners[0].label if self.runners else "")
    self.base_label = base
    self.pending: list[dict] = []   # interleaved timing jobs of the current length

  def log(self, msg):
    if not self.args.quiet:
      print(msg, file=sys.stderr, flush=True)

  def _reference(self, mc, arrays, ct):
    """Reference outputs and grads (attnjax reference backend), or None."""
    if mc.T > self.args.ref_max_t:
      return None
    try:
      def fn(q, k, v):
        return attnjax.attention(q, k, v, mask=mc.mask, impl="reference")
      out = jax.jit(fn)(*arrays)
      out_np = [np.asarray(out, np.float32)]
      if self.args.no_backward:
        return out_np, None
      def loss(q, k, v, ct_):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct_.astype(jnp.float32))
      grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*arrays, ct)
      return out_np, [np.asarray(g, np.float32) for g in grads]
    except Exception as e:  # noqa: BLE001
      self.log(f"  reference failed: {short_error(e)}")
      return None

  def run_mask_case(self, mc: MaskCase):
    args = self.args
    B, H, D = args.batch, args.heads, args.head_dim
    rng = np.random.default_rng(args.seed)
    q_np, k_np, v_np, ct_np = (rng.standard_normal((B, mc.T, H, D), dtype=np.float32)
                               for _ in range(4))
    arrays = tuple(jnp.asarray(x, self.dtype) for x in (q_np, k_np, v_np))
    ct = jnp.asarray(ct_np, self.dtype)
    torch_in = None
    ref = self._reference(mc, arrays, ct)
    base_fwd, base_bwd, err_vs = (ref[0], ref[1], "reference") if ref else (None, None, "")

    for r in self.runners:
      row = Row(mc.label, mc.kind, mc.T, r.label, r.family)
      row.flops = hw.attention_flops(mc.visible(), B, H, D)
      self.rows.append(row)
      if r.unavailable:
        row.fwd.status = row.bwd.status = f"skipped ({r.unavailable})"
        continue
      try:
        fn, extra, note = r.build(mc)
      except Exception as e:  # noqa: BLE001
        row.fwd.status = row.bwd.status = f"error: {short_error(e)}"
        self.log(f"  {r.label}: build failed\n{traceback.format_exc()}")
        continue
      if note:
        row.notes.append(note)
      if r.family == "torch" and torch_in is None:
        torch = import_torch()
        tdt = torch_dtype(args.dtype)
        torch_in = [torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).to(tdt)
                    for x in (q_np, k_np, v_np, ct_np)]
      passes = [False] if args.no_backward else [False, True]
      for backward in passes:
        res = row.bwd if backward else row.fwd
        pname = "fwd+bwd" if backward else "fwd"
        if backward and not r.backward:
          res.status = r.backward_note or "n/a"
          continue
        key = (r.label, mc.kind, pname)
        skip = self.slow.get(key)
        if skip and r.family == "torch":
          res.status = skip
          continue
        if r.family == "torch" and r.mem_estimate is not None:
          need = r.mem_estimate(mc, backward)
          if need > self.limit_bytes:
            res.status = (f"skipped (memory: estimated {_size(need)} > "
                          f"{_size(self.limit_bytes)})")
            continue
        self.log(f"  {mc.label:<28} T={mc.T:<6} {r.label:<24} {pname} ...")
        t0 = time.perf_counter()
        got = None
        defer = None
        if args.interleave:
          def defer(call, n, res=res, key=key, backward=backward, row=row, pname=pname,
                    count=r.compile_count):
            self.pending.append(dict(call=call, n=n, res=res, key=key, backward=backward,
                                     row=row, pname=pname, count=count))
        try:
          if r.family == "torch":
            got = _torch_pass(fn, torch_in[:3], torch_in[3], backward, args, res, defer,
                              r.compile_count)
          else:
            # compiled even when skipped as slow: the temp memory is still reported
            got = _jax_pass(fn, arrays, extra, ct, backward, args, res, self.limit_bytes, skip,
                            defer)
        except Exception as e:  # noqa: BLE001
          if mc.kind in r.skip_errors_for:
            res.status = f"skipped (unsupported here: {short_error(e, 100)})"
          else:
            res.status = f"error: {short_error(e)}"
            self.log(traceback.format_exc())
        res.wall_s = time.perf_counter() - t0
        if res.note:
          row.notes.append(f"{pname}: {res.note}")
        if not (args.interleave and res.status == "ok"):
          self._mark_slow(res, key, backward, mc.T)
          self._note_timed_compiles(res, row, pname)
        if got is None:
          continue
        if backward:
          if base_bwd is None and r.family == "attnjax":
            base_bwd, err_vs = got, err_vs or r.label
          res.err = _max_err(got, base_bwd)
        else:
          if base_fwd is None and r.family == "attnjax":
            base_fwd, err_vs = got, r.label
          res.err = _max_err(got, base_fwd)
        timed = (f"{res.ms:.4g} ms" if res.ms is not None else
                 "timed in the rounds below" if args.interleave else "nan ms")
        self.log(f"    {res.status}: {timed}, compile {res.compile_s or 0:.1f} s, first call "
                 f"{res.first_s or 0:.2f} s, case {res.wall_s:.1f} s")
      fallback = getattr(fn, "fallback", None)
      if fallback:
        row.notes.append(fallback["why"])
      row.err_vs = err_vs if (row.fwd.err is not None or row.bwd.err is not None) else ""

  def _mark_slow(self, res: PassResult, key, backward: bool, T: int):
    """A case that took longer than --max-seconds-per-case is skipped at larger T."""
    if res.status == "ok" and res.wall_s > self.args.max_seconds_per_case:
      why = f"skipped (slow: {res.wall_s:.0f} s at T={T} > {self.args.max_seconds_per_case:g} s)"
      self.slow[key] = why
      if not backward:
        self.slow.setdefault((key[0], key[1], "fwd+bwd"), why)

  def _note_timed_compiles(self, res: PassResult, row: Row, pname: str):
    if res.timed_compiles:
      msg = (f"{pname}: {res.timed_compiles} torch.compile compilation(s) inside the timed "
             "calls: these times include compilation")
      row.notes.append(msg)
      self.log(f"  WARNING {row.impl} {row.mask}: {msg}")

  def time_rounds(self, T: int):
    """Interleaved timing of every pending case: round r makes one call of each case that
    still has repeats left, in the same order every round. Cases compiled on first use
    (torch.compile) first get one more untimed call, right before the rounds, so that anything
    built after their warm-up cannot leave a compilation in round 1; compilations still seen
    during the rounds are counted (``timed_compiles``) and noted on the row."""
    jobs, self.pending = self.pending, []
    rewarm = [j for j in jobs if j["count"] is not None and j["res"].status == "ok"]
    if rewarm:
      self.log(f"[T={T}] re-warming {len(rewarm)} compiled case(s) before timing")
    for j in rewarm:
      try:
        j["call"]()
      except Exception as e:  # noqa: BLE001
        j["res"].status = f"error: {short_error(e)}"
      j["res"].timed_compiles = 0
    rounds = max((j["n"] for j in jobs), default=0)
    for rd in range(rounds):
      self.log(f"[T={T}] timing round {rd + 1}/{rounds} ({sum(j['n'] > rd for j in jobs)} "
               "cases)")
      for j in jobs:
        if rd >= j["n"] or j["res"].status != "ok":
          continue
        res = j["res"]
        base = rss_reset()
        c0 = j["count"]() if j["count"] is not None else None
        try:
          t0 = time.perf_counter()
          j["call"]()
          res.round_s[rd] = (time.perf_counter() - t0) / res.per_sample
        except Exception as e:  # noqa: BLE001
          res.status = f"error: {short_error(e)}"
          continue
        if c0 is not None:
          res.timed_compiles = (res.timed_compiles or 0) + j["count"]() - c0
        peak = status_bytes("VmHWM")
        if base is not None and peak is not None:
          res.rss_mib = max(res.rss_mib or 0.0, max(peak - base, 0) / MIB)
    for j in jobs:
      res = j["res"]
      if res.status == "ok" and res.round_s:
        res.ms = statistics.median(res.round_s.values()) * 1e3
        res.repeats = len(res.round_s)
        res.wall_s += sum(res.round_s.values())
      self._mark_slow(res, j["key"], j["backward"], T)
      self._note_timed_compiles(res, j["row"], j["pname"])

  def run(self, on_progress=None):
    for T in self.args.lengths:
      self.run_length(T, on_progress)
    return self.rows

  def run_length(self, T, on_progress=None):
    for r in self.runners:   # before any case of this length is built
      if r.prepare_length is not None and not r.unavailable:
        r.prepare_length()
    for kind in self.args.masks:
      mc = make_mask_case(kind, T, self.args)
      if isinstance(mc, tuple):
        label, t_eff, why = mc
        for r in self.runners:
          row = Row(label, kind, t_eff, r.label, r.family)
          row.fwd.status = row.bwd.status = f"skipped ({why})"
          self.rows.append(row)
        continue
      self.log(f"[{mc.label}, T={mc.T}]")
      self.run_mask_case(mc)
      if on_progress and not self.args.interleave:
        on_progress()
    self.time_rounds(T)
    if on_progress:
      on_progress()




def main(argv=None) -> dict:
  """Run the benchmark; returns {"rows": [Row], "markdown": str, "csv": str}."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  bench = Bench(args)
  header = machine_lines(args, calls_per_sample(args))
  result = {}

  def write():
    compute_ratios(bench.rows, bench.base_label)
    md = render_markdown(bench.rows, bench, header, time.perf_counter() - t_start)
    cs = render_csv(bench.rows, bench, header)
    if args.out_md:
      with open(args.out_md, "w") as f:
        f.write(md)
    if args.out_csv:
      with open(args.out_csv, "w", newline="") as f:
        f.write(cs)
    result.update(rows=bench.rows, markdown=md, csv=cs)

  bench.run(on_progress=write)   # partial reports survive an interrupted long run
  write()
  print(result["markdown"])
  return result


if __name__ == "__main__":
  main()
