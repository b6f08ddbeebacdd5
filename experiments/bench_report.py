"""Reports of experiments/bench_attention.py: the records of what a run measured (``Row``,
``PassResult``), the header, the ratio columns (base/this, this/causal,
this/best peer TFLOP/s, per-round paired ratios of interleaved timings), the markdown table with
its column descriptions and the issue targets, and the CSV."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import os
import platform
import statistics
import sys
from typing import TYPE_CHECKING

import jax

import attnjax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_peers_hw as hw  # noqa: E402
from bench_common import (MIB, cores, cpu_model, dist_version, git_rev,  # noqa: E402
                          meminfo_kib)
from bench_peers import chunked_plans  # noqa: E402

if TYPE_CHECKING:
  from bench_attention import Bench


# ---------------------------------------------------------------------------- what was measured
@dataclasses.dataclass
class PassResult:
  status: str = "not run"               # ok | skipped (...) | error: ... | n/a ...
  ms: float | None = None               # median time of one call
  compile_s: float | None = None       # JAX: lower+compile; torch: not separable (first_s)
  first_s: float | None = None         # the first (untimed) execution; torch.compile runs here
  temp_mib: float | None = None
  rss_mib: float | None = None
  err: float | None = None
  repeats: int = 0
  wall_s: float = 0.0
  note: str = ""
  round_s: dict = dataclasses.field(default_factory=dict)   # interleaved: round -> seconds
  per_sample: int = 1                   # calls per timed sample (--calls-per-sample)
  timed_compiles: int | None = None     # torch.compile: compilations inside the timed calls


@dataclasses.dataclass
class Row:
  mask: str
  kind: str
  T: int
  impl: str
  family: str
  fwd: PassResult = dataclasses.field(default_factory=PassResult)
  bwd: PassResult = dataclasses.field(default_factory=PassResult)
  err_vs: str = ""
  notes: list = dataclasses.field(default_factory=list)
  ratios: dict = dataclasses.field(default_factory=dict)
  flops: float | None = None            # forward FLOPs over visible pairs (hw.attention_flops)
  tflops: dict = dataclasses.field(default_factory=dict)   # {"fwd", "fwdbwd"}: TFLOP/s


# -------------------------------------------------------------------------------------- header
def machine_lines(args, per_sample: int) -> list[str]:
  """The header of the reports: machine, versions, problem and timing settings (``per_sample``:
  JAX calls per timed sample)."""
  load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
  torch_v, tok_v = dist_version("torch"), dist_version("tokamax")
  devs = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
  return [
      f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"- CPU: {cpu_model()}; {cores()} cores usable (os.cpu_count()={os.cpu_count()}); "
      f"RAM {meminfo_kib('MemTotal') / MIB:.1f} GiB; load average at start "
      + " ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in load),
      f"- python {platform.python_version()}; jax {jax.__version__} "
      f"(jaxlib {dist_version('jaxlib')}, devices: {devs}); attnjax {attnjax.__version__} "
      f"(git {git_rev()}); torch {torch_v or 'not installed'}; "
      f"tokamax {tok_v or 'not installed'}",
      f"- threads: XLA uses the {cores()} cores of the process affinity; torch.set_num_threads"
      f"({args.threads}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(unset)'}",
      f"- problem: B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}; "
      f"sliding window = masks.sliding_window({args.window}, 0); neighborhood kernel "
      f"{args.nb_kernel} on a {args.nb_grid} 2-D grid; chunked at T={max(args.lengths)}: "
      f"{chunked_plans(args)}",
      f"- timing: median of {args.repeats} calls after max(1, {args.warmup}) warm-up call(s)"
      + (" (interleaved: one call of every case of a length per round; ratios also paired "
         "per round)" if args.interleave else " (back to back per case)") + "; "
      + (f"each JAX sample = {per_sample} calls dispatched back to back, "
         "synchronized once; " if per_sample > 1 else "")
      + f"max {args.max_seconds_per_case:g} s per case; memory limit "
      f"{args.max_memory_gib:.1f} GiB; errors vs attnjax reference for T <= {args.ref_max_t}",
  ]


def compute_ratios(rows: list[Row], base_label: str):
  by = {(r.kind, r.T, r.impl): r for r in rows}
  best: dict = {}   # (kind, T, pass) -> best peer TFLOP/s
  for r in rows:
    r.tflops = {}
    for key, res, mult in (("fwd", r.fwd, 1.0), ("fwdbwd", r.bwd, hw.FWDBWD_FACTOR)):
      if r.flops is not None and res.status == "ok" and res.ms:
        r.tflops[key] = r.flops * mult / (res.ms * 1e-3) / 1e12
        if r.family != "attnjax":
          b = (r.kind, r.T, key)
          best[b] = max(best.get(b, 0.0), r.tflops[key])
  for r in rows:
    base = by.get((r.kind, r.T, base_label))
    rat = {}
    if base is not None:
      rat["fwd_time"] = _ratio(base.fwd.ms, r.fwd.ms)
      rat["fwdbwd_time"] = _ratio(base.bwd.ms, r.bwd.ms)
      rat["fwd_time_paired"] = _paired(base.fwd, r.fwd)
      rat["fwdbwd_time_paired"] = _paired(base.bwd, r.bwd)
      rat["fwd_temp"] = _ratio(base.fwd.temp_mib, r.fwd.temp_mib)
      rat["fwdbwd_temp"] = _ratio(base.bwd.temp_mib, r.bwd.temp_mib)
    causal = by.get(("causal", r.T, r.impl))
    if causal is not None and r.kind != "causal":
      rat["vs_causal_fwd"] = _ratio(r.fwd.ms, causal.fwd.ms)
      rat["vs_causal_fwd_paired"] = _paired(r.fwd, causal.fwd)
      rat["vs_causal_fwdbwd"] = _ratio(r.bwd.ms, causal.bwd.ms)
      rat["density_vs_causal"] = _ratio(r.flops, causal.flops)
    for key in ("fwd", "fwdbwd"):
      rat[f"vs_best_peer_{key}"] = _ratio(r.tflops.get(key), best.get((r.kind, r.T, key)))
    r.ratios = rat


def _ratio(a, b):
  if a is None or b is None or b == 0:
    return None
  return a / b


@dataclasses.dataclass(frozen=True)
class Paired:
  """Per-round ratios a/b of two interleaved timings: median and range over the rounds."""
  median: float
  lo: float
  hi: float
  n: int


def _paired(a: PassResult, b: PassResult) -> Paired | None:
  if a.status != "ok" or b.status != "ok":
    return None
  rounds = sorted(set(a.round_s) & set(b.round_s))
  ratios = [a.round_s[i] / b.round_s[i] for i in rounds if b.round_s[i] > 0]
  if not ratios:
    return None
  return Paired(statistics.median(ratios), min(ratios), max(ratios), len(ratios))


def _fmt(x, kind="num"):
  if x is None:
    return ""
  if kind == "err":
    return f"{x:.1e}"
  if kind == "ratio":
    return f"{x:.3g}"
  if x >= 100:
    return f"{x:.0f}"
  return f"{x:.3g}"


def _cell(res: PassResult, value, kind="num"):
  if res.status != "ok" and value is None:
    return res.status if res.status != "not run" else ""
  return _fmt(value, kind)


COLUMNS = [
    ("mask", "mask (T is the token count; neighborhood: grid and kernel)"),
    ("T", "sequence length"),
    ("impl", "attnjax backend or peer"),
    ("fwd ms", "forward: median ms per call"),
    ("fwd+bwd ms", "forward+backward (grad of sum(out*ct) wrt q,k,v): median ms"),
    ("fwd temp MiB", "XLA compiled temp memory of the forward"),
    ("fwd+bwd temp MiB", "XLA compiled temp memory of forward+backward"),
    ("base/this fwd", "ratio-base forward time / this row's forward time"),
    ("base/this fwd+bwd", "ratio-base fwd+bwd time / this row's"),
    ("base/this fwd temp", "ratio-base forward temp memory / this row's"),
    ("base/this fwd+bwd temp", "ratio-base fwd+bwd temp memory / this row's"),
    ("this/causal fwd", "this row's forward time / same impl's causal forward at the same T"),
    ("this/causal fwd+bwd", "same for forward+backward"),
    ("visible/causal", "visible pairs of this mask / of causal at the same T (time "
     "proportional to density: this/causal fwd ~ visible/causal)"),
    ("fwd TFLOP/s", "forward FLOPs over visible pairs only / time"),
    ("fwd+bwd TFLOP/s", "3.5x forward FLOPs (FlashAttention-2 convention) / time"),
    ("this/best peer fwd", "this row's fwd TFLOP/s / best peer's (non-attnjax) at the same "
     "mask and T"),
    ("this/best peer fwd+bwd", "same for forward+backward"),
    ("err out", "max |out - base out| (base: see 'err vs')"),
    ("err grads", "max |dq,dk,dv - base| "),
    ("err vs", "what the errors compare with"),
    ("notes", "how the mask was expressed, skips, reduced repeats"),
]


def row_cells(r: Row) -> list[str]:
  rat = r.ratios
  return [
      r.mask, str(r.T), r.impl,
      _cell(r.fwd, r.fwd.ms), _cell(r.bwd, r.bwd.ms),
      _fmt(r.fwd.temp_mib), _fmt(r.bwd.temp_mib),
      _fmt(rat.get("fwd_time"), "ratio"), _fmt(rat.get("fwdbwd_time"), "ratio"),
      _fmt(rat.get("fwd_temp"), "ratio"), _fmt(rat.get("fwdbwd_temp"), "ratio"),
      _fmt(rat.get("vs_causal_fwd"), "ratio"), _fmt(rat.get("vs_causal_fwdbwd"), "ratio"),
      _fmt(rat.get("density_vs_causal"), "ratio"),
      _fmt(r.tflops.get("fwd"), "ratio"), _fmt(r.tflops.get("fwdbwd"), "ratio"),
      _fmt(rat.get("vs_best_peer_fwd"), "ratio"), _fmt(rat.get("vs_best_peer_fwdbwd"), "ratio"),
      _fmt(r.fwd.err, "err"), _fmt(r.bwd.err, "err"), r.err_vs,
      "; ".join(r.notes).replace("|", "/"),
  ]


def targets(rows: list[Row], base_label: str, args) -> list[str]:
  """Issue 2's targets, evaluated where the run measured them."""
  by = {(r.kind, r.T, r.impl): r for r in rows}
  peers = {r.impl for r in rows}
  tok = next((p for p in peers if p.startswith("tokamax")), "tokamax(xla_chunked)")
  flex = next((p for p in peers if p.startswith("torch_flex")), "torch_flex")
  causal_ts = sorted({r.T for r in rows if r.kind == "causal"})

  def pick_t(target):
    if target in causal_ts or not causal_ts:
      return target, ""
    return causal_ts[-1], f" (measured at T={causal_ts[-1]}; the target is stated at T={target})"

  t, t_note = pick_t(args.target_t)
  tm, tm_note = pick_t(args.target_mem_t)
  lines = []

  def check(desc, kind, T, peer, field, bound):
    bound_s = f"1/{round(1 / bound)}" if bound < 0.1 else f"{bound:g}"
    r = by.get((kind, T, peer))
    val = r.ratios.get(field) if r is not None else None
    paired = r.ratios.get(field + "_paired") if r is not None else None
    if val is None:
      status = "not measured"
      if r is not None:
        why = [x.status for x in (r.fwd, r.bwd) if x.status != "ok"]
        if why:
          status += f" ({'; '.join(sorted(set(why)))})"
      lines.append(f"| {desc} | <= {bound_s} | {status} | |")
      return
    if paired is not None and paired.n > 1:
      # the verdict reads the paired median; a range straddling the bound is flagged
      val = paired.median
      shown = (f"{paired.median:.3g} (per-round {paired.lo:.3g} to {paired.hi:.3g}, "
               f"{paired.n} rounds)")
      ok = "met" if val <= bound else "NOT met"
      if paired.lo <= bound < paired.hi:
        ok += " (range straddles the bound)"
    else:
      shown, ok = f"{val:.3g}", ("met" if val <= bound else "NOT met")
    lines.append(f"| {desc} | <= {bound_s} | {shown} | {ok} |")

  b = base_label
  lines.append(f"Targets of issue 2 (ratio = {b} / peer; lower is better; time ratios are "
               f"per-round paired medians when timed interleaved){t_note or tm_note}:")
  lines.append("")
  lines.append("| target | bound | measured | |")
  lines.append("|---|---|---|---|")
  check(f"causal fwd T={t}: {b} / {tok}", "causal", t, tok, "fwd_time", 0.6)
  check(f"causal fwd T={t}: {b} / jax.nn(xla)", "causal", t, "jax.nn(xla)", "fwd_time", 0.4)
  check(f"causal fwd T={t}: {b} / torch_sdpa", "causal", t, "torch_sdpa", "fwd_time", 1.5)
  check(f"causal fwd+bwd T={t}: {b} / {tok}", "causal", t, tok, "fwdbwd_time", 0.5)
  check(f"causal fwd+bwd T={t}: {b} / torch_sdpa", "causal", t, "torch_sdpa", "fwdbwd_time",
        2.5)
  check(f"sliding fwd T={t}: {b} sliding / {b} causal", "sliding", t, b, "vs_causal_fwd", 0.15)
  check(f"sliding fwd T={t}: {b} / {flex}", "sliding", t, flex, "fwd_time", 1.5)
  check(f"causal fwd temp T={tm}: {b} / jax.nn(xla)", "causal", tm, "jax.nn(xla)", "fwd_temp",
        1 / 50)
  check(f"causal fwd+bwd temp T={tm}: {b} / jax.nn(xla)", "causal", tm, "jax.nn(xla)",
        "fwdbwd_temp", 1 / 30)
  lines += targets_issue3(by, t, t_note)
  return lines


def targets_issue3(by, t, t_note) -> list[str]:
  """Issue 3 (Pallas on hardware): causal fwd TFLOP/s >= 0.7x the best peer at T=target, and
  sliding-window time proportional to density ((sliding/causal time) / (sliding/causal visible)
  = 1 when exactly proportional)."""
  impls = sorted({i for (_, _, i) in by if hw.pallas_platform(i)})
  if not impls:
    return []
  out = ["", f"Targets of issue 3 (Pallas; meaningful only on the kernel's hardware){t_note}:",
         "", "| target | bound | measured | |", "|---|---|---|---|"]
  for i in impls:
    r = by.get(("causal", t, i))
    v = r.ratios.get("vs_best_peer_fwd") if r else None
    out.append(f"| causal fwd T={t}: {i} TFLOP/s / best peer's | >= 0.7 | "
               + ("not measured | |" if v is None else
                  f"{v:.3g} | {'met' if v >= 0.7 else 'NOT met'} |"))
    r = by.get(("sliding", t, i))
    tr, dr = (r.ratios.get("vs_causal_fwd"), r.ratios.get("density_vs_causal")) if r else (0, 0)
    v = _ratio(tr, dr)
    out.append(f"| sliding fwd T={t}: {i} (sliding/causal time) / (sliding/causal visible "
               f"pairs) | ~1 (proportional) | " + ("not measured | |" if v is None else
                                                   f"{v:.3g} | |"))
  return out


def render_markdown(rows: list[Row], bench: Bench, header: list[str], elapsed: float) -> str:
  out = io.StringIO()
  out.write("# Attention benchmark (experiments/bench_attention.py)\n\n")
  out.write("\n".join(header) + "\n")
  out.write(f"- ratio base: `{bench.base_label}`; total run time {elapsed:.0f} s\n")
  cmd = " ".join(["python", "experiments/bench_attention.py"] + list(bench.args.argv))
  out.write(f"- command: `{cmd}`\n\n")
  names = [c[0] for c in COLUMNS]
  out.write("| " + " | ".join(names) + " |\n")
  out.write("|" + "|".join("---" for _ in names) + "|\n")
  for r in rows:
    out.write("| " + " | ".join(row_cells(r)) + " |\n")
  out.write("\nColumns: " + "; ".join(f"**{n}**: {d}" for n, d in COLUMNS) + ".\n\n")
  out.write("\n".join(targets(rows, bench.base_label, bench.args)) + "\n")
  return out.getvalue()


CSV_FIELDS = [
    "mask", "kind", "T", "impl", "family",
    "fwd_status", "fwd_ms", "fwd_repeats", "fwd_compile_s", "fwd_first_call_s", "fwd_temp_mib",
    "fwd_rss_mib", "fwd_err",
    "fwdbwd_status", "fwdbwd_ms", "fwdbwd_repeats", "fwdbwd_compile_s", "fwdbwd_first_call_s",
    "fwdbwd_temp_mib", "fwdbwd_rss_mib", "fwdbwd_err", "err_vs",
    "ratio_base", "base_over_this_fwd_time", "base_over_this_fwdbwd_time",
    "base_over_this_fwd_temp", "base_over_this_fwdbwd_temp",
    "this_over_causal_fwd_time", "this_over_causal_fwdbwd_time", "visible_over_causal",
    "fwd_flops", "fwd_tflops", "fwdbwd_tflops", "this_over_best_peer_fwd_tflops",
    "this_over_best_peer_fwdbwd_tflops",
    "paired_base_over_this_fwd_time", "paired_base_over_this_fwd_time_lo",
    "paired_base_over_this_fwd_time_hi", "paired_base_over_this_fwdbwd_time",
    "paired_base_over_this_fwdbwd_time_lo", "paired_base_over_this_fwdbwd_time_hi",
    "paired_this_over_causal_fwd_time", "paired_this_over_causal_fwd_time_lo",
    "paired_this_over_causal_fwd_time_hi", "notes",
]


def render_csv(rows: list[Row], bench: Bench, header: list[str]) -> str:
  out = io.StringIO()
  for line in header:
    out.write("# " + line.lstrip("- ") + "\n")
  w = csv.writer(out)
  w.writerow(CSV_FIELDS)
  for r in rows:
    rat = r.ratios
    vals = [r.mask, r.kind, r.T, r.impl, r.family]
    for p in (r.fwd, r.bwd):
      vals += [p.status, p.ms, p.repeats or None, p.compile_s, p.first_s, p.temp_mib, p.rss_mib,
               p.err]
    vals += [r.err_vs, bench.base_label, rat.get("fwd_time"), rat.get("fwdbwd_time"),
             rat.get("fwd_temp"), rat.get("fwdbwd_temp"), rat.get("vs_causal_fwd"),
             rat.get("vs_causal_fwdbwd"), rat.get("density_vs_causal"), r.flops,
             r.tflops.get("fwd"), r.tflops.get("fwdbwd"), rat.get("vs_best_peer_fwd"),
             rat.get("vs_best_peer_fwdbwd")]
    for field in ("fwd_time_paired", "fwdbwd_time_paired", "vs_causal_fwd_paired"):
      pr = rat.get(field)
      vals += [pr.median, pr.lo, pr.hi] if pr is not None else [None] * 3
    vals.append("; ".join(r.notes))
    w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in vals])
  return out.getvalue()
