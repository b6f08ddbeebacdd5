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

Peers (each used only when importable):

* ``jax_nn``: ``jax.nn.dot_product_attention(implementation="xla")`` -- causal via ``is_causal``,
  sliding window via ``local_window_size=(left, right)``, neighborhood via an explicit boolean
  ``[1, 1, T, T]`` mask passed as an argument (its bytes are an input, not temp memory).
* ``tokamax``: ``tokamax.dot_product_attention(implementation="xla_chunked")``, same mapping.
* ``torch_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on CPU -- ``is_causal`` for
  causal, a boolean ``attn_mask`` for the others.
* ``torch_flex``: ``torch.nn.attention.flex_attention.flex_attention`` with a ``create_block_mask``
  block mask built from a mask_mod equal to the attnjax mask, compiled with ``torch.compile`` when
  that works (else eager; the label says which). PyTorch 2.13 has no CPU backward for flex.
* ``jax_nn_cudnn`` (GPU only): ``jax.nn.dot_product_attention(implementation="cudnn")`` in
  bfloat16, same mask mapping as ``jax_nn``; if cuDNN rejects the explicit neighborhood mask the
  row says "skipped" with cuDNN's reason.
* ``splash`` (TPU only): ``jax.experimental.pallas.ops.tpu.splash_attention.make_splash_mha`` with
  ``CausalMask`` / ``LocalMask`` / ``NumpyMask`` (neighborhood) in a ``MultiHeadMask``.
  On other platforms these two rows read "skipped (needs a GPU/TPU ...)".

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
import csv
import dataclasses
import datetime
import importlib
import importlib.metadata
import io
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from attnjax import masks as masks_lib
from attnjax.backends.chunked import ChunkedBackend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_peers_hw as hw  # noqa: E402
from bench_common import (cores as _cores, cpu_model as _cpu_model, float_at_least,  # noqa: E402
                          int_at_least, nonnegative_int, positive_int)

MIB = 1024.0 * 1024.0
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [1024]
ALL_MASKS = ["causal", "sliding", "neighborhood"]
ALL_PEERS = ["jax_nn", "tokamax", "torch_sdpa", "torch_flex", "jax_nn_cudnn", "splash"]


def peer_label(peer: str, args) -> str:
  """The impl label (table rows, ``--ratio-base``) of a ``--peers`` entry."""
  if peer == "torch_flex":
    return "torch_flex(compiled)" if args.flex_compile == "on" else "torch_flex(eager)"
  return {"jax_nn": "jax.nn(xla)", "tokamax": "tokamax(xla_chunked)",
          "jax_nn_cudnn": "jax.nn(cudnn)"}.get(peer, peer)


def impl_labels(args) -> list[str]:
  """The impl labels of a run's rows, in table order (``--impl`` then ``--peers``)."""
  out = []
  for spec in args.impl:
    if spec == "chunked" or spec.startswith("chunked:"):
      out.append(_chunked_backend(spec, args)[1])
    else:
      out.append(spec)
  return out + [peer_label(p, args) for p in args.peers]


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
    args.max_memory_gib = 0.7 * _meminfo_kib("MemAvailable") / MIB
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


# ----------------------------------------------------------------------------- machine facts
def _meminfo_kib(field: str) -> float:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith(field + ":"):
          return float(line.split()[1])
  except OSError:
    pass
  return 8 * 1024 * 1024.0


def _version(dist_name: str) -> str | None:
  """Installed version of a distribution, without importing it (torch imports slowly)."""
  try:
    return importlib.metadata.version(dist_name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git_rev() -> str:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                         text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return (rev + ("+dirty" if dirty else "")) or "?"
  except Exception:  # noqa: BLE001
    return "?"


def machine_lines(args) -> list[str]:
  load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
  torch_v, tok_v = _version("torch"), _version("tokamax")
  devs = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
  return [
      f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"- CPU: {_cpu_model()}; {_cores()} cores usable (os.cpu_count()={os.cpu_count()}); "
      f"RAM {_meminfo_kib('MemTotal') / MIB:.1f} GiB; load average at start "
      + " ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in load),
      f"- python {platform.python_version()}; jax {jax.__version__} "
      f"(jaxlib {_version('jaxlib')}, devices: {devs}); attnjax {attnjax.__version__} "
      f"(git {_git_rev()}); torch {torch_v or 'not installed'}; "
      f"tokamax {tok_v or 'not installed'}",
      f"- threads: XLA uses the {_cores()} cores of the process affinity; torch.set_num_threads"
      f"({args.threads}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(unset)'}",
      f"- problem: B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}; "
      f"sliding window = masks.sliding_window({args.window}, 0); neighborhood kernel "
      f"{args.nb_kernel} on a {args.nb_grid} 2-D grid; chunked at T={max(args.lengths)}: "
      f"{_chunked_plans(args)}",
      f"- timing: median of {args.repeats} calls after max(1, {args.warmup}) warm-up call(s)"
      + (" (interleaved: one call of every case of a length per round; ratios also paired "
         "per round)" if args.interleave else " (back to back per case)") + "; "
      + (f"each JAX sample = {calls_per_sample(args)} calls dispatched back to back, "
         "synchronized once; " if calls_per_sample(args) > 1 else "")
      + f"max {args.max_seconds_per_case:g} s per case; memory limit "
      f"{args.max_memory_gib:.1f} GiB; errors vs attnjax reference for T <= {args.ref_max_t}",
  ]


def _rss_reset() -> int | None:
  """Reset the peak-RSS counter (Linux clear_refs) and return the current RSS in bytes."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return _status_bytes("VmRSS")
  except OSError:
    return None


def _status_bytes(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


# ------------------------------------------------------------------------------------- masks
@dataclasses.dataclass
class MaskCase:
  kind: str          # causal | sliding | neighborhood
  label: str
  T: int
  mask: Any          # attnjax mask
  grid: tuple | None = None
  _dense: np.ndarray | None = None
  _visible: int | None = None

  def visible(self) -> int:
    """Exact count of visible (query, key) pairs (block map + partial blocks; no [T, T])."""
    if self._visible is None:
      self._visible = hw.visible_pairs(self.mask, self.T)
    return self._visible

  def dense(self) -> np.ndarray:
    """[T, T] bool, True = visible (for peers that need an explicit mask)."""
    if self._dense is None:
      T = self.T
      if self.kind == "causal":
        self._dense = np.tri(T, T, dtype=bool)
      elif self.kind == "sliding":
        left = self.mask.left
        self._dense = np.tri(T, T, dtype=bool) & ~np.tri(T, T, -left - 1, dtype=bool)
      else:
        pos = np.arange(T)
        self._dense = self.mask.dense_np(pos, pos)
    return self._dense


def _near_square(T: int) -> tuple[int, int]:
  r = math.isqrt(T)
  while T % r:
    r -= 1
  return r, T // r


def make_mask_case(kind: str, T: int, args) -> MaskCase | tuple[str, int, str]:
  """A MaskCase, or (label, T, reason) when the mask can't be built at this T."""
  if kind == "causal":
    return MaskCase("causal", "causal", T, masks_lib.causal())
  if kind == "sliding":
    return MaskCase("sliding", f"sliding({args.window},0)", T,
                    masks_lib.sliding_window(args.window, 0))
  if args.nb_grid == "square":
    s = math.isqrt(T)
    grid = (s, s)
  else:
    grid = _near_square(T)
  label = f"neighborhood {grid[0]}x{grid[1]} k{args.nb_kernel}"
  if args.nb_kernel > min(grid):
    return (label, grid[0] * grid[1],
            f"kernel {args.nb_kernel} exceeds the grid side {min(grid)}")
  return MaskCase("neighborhood", label, grid[0] * grid[1],
                  masks_lib.neighborhood(grid, args.nb_kernel), grid)


# ------------------------------------------------------------------------------------ impls
@dataclasses.dataclass
class Runner:
  label: str
  family: str                           # attnjax | jax | torch
  # JAX: fn(q, k, v, *extra) -> out and extra args; torch: fn(q, k, v) -> out
  build: Callable[[MaskCase], tuple[Callable, tuple, str]] | None = None
  unavailable: str | None = None        # reason this runner can't run at all
  backward: bool = True                 # False: fwd+bwd "n/a"
  backward_note: str = ""
  mem_estimate: Callable[[MaskCase, bool], float] | None = None  # torch: bytes
  skip_errors_for: tuple = ()           # mask kinds whose errors read "skipped (unsupported)"
  # called once per sequence length, before any case of that length is built (torch.compile:
  # clear the compile cache of the previous length)
  prepare_length: Callable[[], None] | None = None
  # a counter of compilations made so far (torch.compile): a timed call that moves it compiled
  # inside the timed rounds; such cases also get one more warm-up call just before the rounds
  compile_count: Callable[[], int] | None = None


def _chunked_plans(args) -> str:
  """How each ``chunked`` impl of ``--impl`` computes each mask at the longest length (tiles
  or a band)."""
  T = max(args.lengths)
  out = []
  for spec in args.impl:
    if spec != "chunked" and not spec.startswith("chunked:"):
      continue
    impl, label = _chunked_backend(spec, args)
    plans = []
    for kind in args.masks:
      case = make_mask_case(kind, T, args)
      if isinstance(case, tuple):
        continue
      x = jax.ShapeDtypeStruct((args.batch, case.T, args.heads, args.head_dim), args.dtype)
      p = attnjax.build_problem(x, x, x, mask=case.mask)
      plans.append(f"{case.label}: {impl.describe(p)}")
    out.append(f"{label} ({'; '.join(plans)})")
  return "; ".join(out) or "not measured"


def _chunked_backend(spec: str, args):
  """``(ChunkedBackend, label)`` for ``--impl chunked`` or ``chunked:BQxBK``."""
  if spec == "chunked":
    label = "chunked"
    if (args.block_q, args.block_kv) != (None, None):
      label = f"chunked:{args.block_q or 'auto'}x{args.block_kv or 'auto'}"
    return ChunkedBackend(args.block_q, args.block_kv), label
  try:
    bq, bk = (int(x) for x in spec.split(":", 1)[1].lower().split("x"))
  except ValueError:
    raise SystemExit(f"--impl {spec!r}: expected chunked:BQxBK, e.g. chunked:128x512")
  return ChunkedBackend(bq, bk), spec


def attnjax_runner(spec: str, args) -> Runner:
  if spec == "chunked" or spec.startswith("chunked:"):
    impl, label = _chunked_backend(spec, args)
  elif hw.pallas_platform(spec) and ":" in spec:
    from attnjax.backends.pallas import PallasBackend
    try:
      bq, bk = (int(x) for x in spec.split(":", 1)[1].lower().split("x"))
    except ValueError:
      raise SystemExit(f"--impl {spec!r}: expected pallas_gpu:BQxBK, e.g. pallas_gpu:128x64")
    impl, label = PallasBackend(hw.pallas_platform(spec), bq, bk), spec
  else:
    impl, label = spec, spec
    if spec not in attnjax.available_backends():
      return Runner(label, "attnjax", unavailable=f"backend {spec!r} is not registered "
                    f"(available: {', '.join(sorted(attnjax.available_backends()))})")

  plat = hw.pallas_platform(spec)
  note = ("INTERPRET MODE (--allow-interpret): timings are not performance"
          if plat and plat != jax.default_backend() else "")

  def build(mc: MaskCase):
    def fn(q, k, v):
      return attnjax.attention(q, k, v, mask=mc.mask, impl=impl)
    return fn, (), note
  return Runner(label, "attnjax", build)


def jax_nn_runner() -> Runner:
  def build(mc: MaskCase):
    kw = {}
    extra, note = (), ""
    if mc.kind == "causal":
      kw["is_causal"] = True
      note = "is_causal=True"
    elif mc.kind == "sliding":
      kw["local_window_size"] = (mc.mask.left, mc.mask.right)
      note = f"local_window_size=({mc.mask.left}, {mc.mask.right}), dense compute"
    else:
      extra = (jnp.asarray(mc.dense())[None, None],)
      note = "explicit [T,T] bool mask input"

    def fn(q, k, v, *m):
      return jax.nn.dot_product_attention(q, k, v, mask=m[0] if m else None,
                                          implementation="xla", **kw)
    return fn, extra, note
  return Runner(peer_label("jax_nn", None), "jax", build)


def tokamax_runner() -> Runner:
  try:
    tokamax = importlib.import_module("tokamax")
  except Exception as e:  # noqa: BLE001
    return Runner(peer_label("tokamax", None), "jax",
                  unavailable=f"tokamax not importable ({type(e).__name__})")

  # tokamax reads its absl flags lazily and then parses sys.argv, which fails on this script's
  # own options ("Unknown command line flag"): mark absl flags as parsed (defaults) first.
  from absl import flags as absl_flags
  if not absl_flags.FLAGS.is_parsed():
    absl_flags.FLAGS.mark_as_parsed()

  def build(mc: MaskCase):
    kw, extra, note = {}, (), ""
    if mc.kind == "causal":
      kw["is_causal"] = True
      note = "is_causal=True"
    elif mc.kind == "sliding":
      kw["local_window_size"] = (mc.mask.left, mc.mask.right)
      note = f"local_window_size=({mc.mask.left}, {mc.mask.right}), no block skipping"
    else:
      extra = (jnp.asarray(mc.dense())[None, None],)
      note = "explicit [T,T] bool mask input"

    def fn(q, k, v, *m):
      return tokamax.dot_product_attention(q, k, v, mask=m[0] if m else None,
                                           implementation="xla_chunked", **kw)
    return fn, extra, note
  return Runner(peer_label("tokamax", None), "jax", build)


def _torch():
  import torch
  return torch


def torch_sdpa_runner(args) -> Runner:
  try:
    torch = _torch()
  except Exception as e:  # noqa: BLE001
    return Runner("torch_sdpa", "torch", unavailable=f"torch not importable ({type(e).__name__})")
  import torch.nn.functional as F

  def build(mc: MaskCase):
    if mc.kind == "causal":
      def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
      return fn, (), "is_causal=True"
    m = torch.from_numpy(mc.dense())

    def fn(q, k, v):
      return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return fn, (), "boolean attn_mask [T,T]"

  def mem(mc: MaskCase, backward: bool) -> float:
    b, h, t, d = args.batch, args.heads, mc.T, args.head_dim
    dt = _torch_dtype(args.dtype)
    q = torch.empty(b, h, t, d, dtype=dt, requires_grad=backward)
    m = None if mc.kind == "causal" else torch.empty(t, t, dtype=torch.bool)
    try:
      choice = int(torch._fused_sdp_choice(q, q, q, m, 0.0, mc.kind == "causal"))
    except Exception:  # noqa: BLE001
      choice = 0
    if choice == 0:   # math fallback materializes [B, H, T, T]
      return b * h * t * t * 4.0 * (4 if backward else 2)
    return 8.0 * b * h * t * d * 4
  return Runner("torch_sdpa", "torch", build, mem_estimate=mem)


def _torch_flex_mask_mod(mc: MaskCase):
  torch = _torch()
  if mc.kind == "causal":
    def mod(b, h, qi, ki):
      return qi >= ki
  elif mc.kind == "sliding":
    left, right = mc.mask.left, mc.mask.right

    def mod(b, h, qi, ki):
      return (ki >= qi - left) & (ki <= qi + right)
  else:
    (rows, cols), kern = mc.grid, mc.mask.kernel_size[0]
    # NATTEN, dilation 1, stride 1, non-causal: window of kern keys per axis centred on the
    # query (kern//2 left), shifted inward at the borders.
    half = kern // 2

    def mod(b, h, qi, ki):
      qr, qc = qi // cols, qi % cols
      kr, kc = ki // cols, ki % cols
      r0 = torch.clamp(qr - half, 0, rows - kern)
      c0 = torch.clamp(qc - half, 0, cols - kern)
      return (kr >= r0) & (kr < r0 + kern) & (kc >= c0) & (kc < c0 + kern)
  return mod


def torch_flex_runner(args) -> Runner:
  label = peer_label("torch_flex", args)
  try:
    _torch()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  except Exception as e:  # noqa: BLE001
    return Runner(label, "torch", unavailable=f"torch flex_attention not importable "
                  f"({type(e).__name__})")

  def build(mc: MaskCase):
    torch = _torch()
    bm = create_block_mask(_torch_flex_mask_mod(mc), None, None, mc.T, mc.T, device="cpu")
    note = f"block mask {bm.BLOCK_SIZE[0]}x{bm.BLOCK_SIZE[1]}, sparsity {bm.sparsity():.0f}%"
    if args.flex_compile == "on":
      # No torch._dynamo.reset() here: it would drop the compiled code of the cases of this
      # length built before, which would then recompile in their first timed call
      # (prepare_length resets once per length, before any case is built).
      compiled = torch.compile(flex_attention, dynamic=False)
      fallback = {}

      def fn(q, k, v):
        if not fallback:
          try:
            return compiled(q, k, v, block_mask=bm)
          except NotImplementedError:
            raise
          except Exception as e:  # noqa: BLE001 - inductor/compiler failure: run eager
            fallback["why"] = f"torch.compile failed ({_short(e, 80)}); ran eager"
        return _flex_eager(q, k, v, bm)
      fn.fallback = fallback
      return fn, (), note

    def fn(q, k, v):
      return _flex_eager(q, k, v, bm)
    return fn, (), note

  def _flex_eager(q, k, v, bm):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")   # "flex_attention called without torch.compile"
      return flex_attention(q, k, v, block_mask=bm)

  def mem(mc: MaskCase, backward: bool) -> float:
    if args.flex_compile == "on":
      return 8.0 * args.batch * args.heads * mc.T * args.head_dim * 4
    return args.batch * args.heads * mc.T * mc.T * 4.0 * 3   # eager: dense scores

  compiled_kw = {}
  if args.flex_compile == "on":
    compiled_kw = dict(prepare_length=lambda: _flex_prepare_length(len(args.masks)),
                       compile_count=_torch_compile_count)
  return Runner(label, "torch", build, backward=False,
                backward_note="n/a (torch 2.13 flex_attention has no CPU backward)",
                mem_estimate=mem, **compiled_kw)


def _flex_prepare_length(num_cases: int):
  """Before the flex cases of a new length are built: a fresh dynamo cache (every compiled
  case of one length then lives in it side by side, none evicting another) with room for all of
  them, so none falls back to eager or recompiles later."""
  torch = _torch()
  torch._dynamo.reset()
  cfg = torch._dynamo.config
  name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
  need = 2 * num_cases + 2
  if getattr(cfg, name, need) < need:
    setattr(cfg, name, need)


def _torch_compile_count() -> int:
  """Frames dynamo has compiled in this process (a cache hit does not count)."""
  from torch._dynamo.utils import counters
  return int(counters["frames"]["total"])


def _torch_dtype(name: str):
  torch = _torch()
  return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def make_runners(args) -> list[Runner]:
  runners = [attnjax_runner(s, args) for s in args.impl]
  for p in args.peers:
    if p == "jax_nn":
      runners.append(jax_nn_runner())
    elif p == "tokamax":
      runners.append(tokamax_runner())
    elif p == "torch_sdpa":
      runners.append(torch_sdpa_runner(args))
    elif p == "torch_flex":
      runners.append(torch_flex_runner(args))
    elif p in ("jax_nn_cudnn", "splash"):
      label = peer_label(p, args)
      why, build, skip_kinds = (hw.cudnn_peer if p == "jax_nn_cudnn" else hw.splash_peer)()
      runners.append(Runner(label, "jax", lambda mc, b=build: b(mc, args), unavailable=why,
                            skip_errors_for=skip_kinds))
  labels = [r.label for r in runners]
  dup = {x for x in labels if labels.count(x) > 1}
  if dup:
    raise SystemExit(f"duplicate impl labels {sorted(dup)}")
  return runners


# ------------------------------------------------------------------------------- measurement
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


def _timed_calls(call, warmup, repeats, budget_s, res: PassResult, defer=None, call_once=None,
                 compile_count=None):
  """Warm up (the first call, then call() max(1, warmup) - 1 more times), then time `repeats`
  calls of call() (which blocks; fewer when they would take the whole case past `budget_s`
  seconds). A sample of call() is ``res.per_sample`` executions; ``call_once`` (one execution)
  makes the first call, so ``res.first_s`` is one execution's time. Returns the first call's
  output. With `defer`, the timed calls are not made here: ``defer(call, n)`` hands them to the
  caller's interleaved rounds. ``compile_count`` (a counter of compilations): the compilations
  made during the timed calls go to ``res.timed_compiles``."""
  base = _rss_reset()
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
  peak = _status_bytes("VmHWM")
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
  torch = _torch()
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


def _short(e: BaseException, n=160) -> str:
  msg = " ".join(str(e).split())
  return f"{type(e).__name__}: {msg[:n]}{'...' if len(msg) > n else ''}"


class Bench:
  def __init__(self, args):
    self.args = args
    self.runners = make_runners(args)
    self.rows: list[Row] = []
    self.slow: dict[tuple[str, str, str], str] = {}   # (impl, mask kind, pass) -> reason
    self.limit_bytes = args.max_memory_gib * 1024 * MIB
    self.dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    if any(r.family == "torch" and not r.unavailable for r in self.runners):
      _torch().set_num_threads(args.threads)
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
      self.log(f"  reference failed: {_short(e)}")
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
        row.fwd.status = row.bwd.status = f"error: {_short(e)}"
        self.log(f"  {r.label}: build failed\n{traceback.format_exc()}")
        continue
      if note:
        row.notes.append(note)
      if r.family == "torch" and torch_in is None:
        torch = _torch()
        tdt = _torch_dtype(args.dtype)
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
            res.status = f"skipped (unsupported here: {_short(e, 100)})"
          else:
            res.status = f"error: {_short(e)}"
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
        j["res"].status = f"error: {_short(e)}"
      j["res"].timed_compiles = 0
    rounds = max((j["n"] for j in jobs), default=0)
    for rd in range(rounds):
      self.log(f"[T={T}] timing round {rd + 1}/{rounds} ({sum(j['n'] > rd for j in jobs)} "
               "cases)")
      for j in jobs:
        if rd >= j["n"] or j["res"].status != "ok":
          continue
        res = j["res"]
        base = _rss_reset()
        c0 = j["count"]() if j["count"] is not None else None
        try:
          t0 = time.perf_counter()
          j["call"]()
          res.round_s[rd] = (time.perf_counter() - t0) / res.per_sample
        except Exception as e:  # noqa: BLE001
          res.status = f"error: {_short(e)}"
          continue
        if c0 is not None:
          res.timed_compiles = (res.timed_compiles or 0) + j["count"]() - c0
        peak = _status_bytes("VmHWM")
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


# ----------------------------------------------------------------------------------- reports
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


def main(argv=None) -> dict:
  """Run the benchmark; returns {"rows": [Row], "markdown": str, "csv": str}."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  bench = Bench(args)
  header = machine_lines(args)
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
