"""Peers and attnjax impls of experiments/bench_attention.py: the mask cases they run on
(``MaskCase``) and one ``Runner`` per impl, whose ``build(mask_case)`` returns
``(fn, extra, note)`` -- JAX: ``fn(q, k, v, *extra)``, torch: ``fn(q, k, v)`` in ``[B, H, T, D]``.

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
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
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
from bench_common import short_error  # noqa: E402

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


def chunked_plans(args) -> str:
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


def _jax_mask_args(mc: MaskCase, sliding_note: str):
  """``(kwargs, extra, note)`` expressing a mask case for a ``jax.nn``-style
  ``dot_product_attention``: ``is_causal``, ``local_window_size``, else an explicit
  ``[1, 1, T, T]`` bool mask passed as an argument."""
  if mc.kind == "causal":
    return {"is_causal": True}, (), "is_causal=True"
  if mc.kind == "sliding":
    return ({"local_window_size": (mc.mask.left, mc.mask.right)}, (),
            f"local_window_size=({mc.mask.left}, {mc.mask.right}), {sliding_note}")
  return {}, (jnp.asarray(mc.dense())[None, None],), "explicit [T,T] bool mask input"


def _jax_dpa_runner(peer: str, attention, implementation: str, sliding_note: str) -> Runner:
  def build(mc: MaskCase):
    kw, extra, note = _jax_mask_args(mc, sliding_note)

    def fn(q, k, v, *m):
      return attention(q, k, v, mask=m[0] if m else None, implementation=implementation, **kw)
    return fn, extra, note
  return Runner(peer_label(peer, None), "jax", build)


def jax_nn_runner() -> Runner:
  return _jax_dpa_runner("jax_nn", jax.nn.dot_product_attention, "xla", "dense compute")


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
  return _jax_dpa_runner("tokamax", tokamax.dot_product_attention, "xla_chunked",
                         "no block skipping")


def import_torch():
  import torch
  return torch


def torch_sdpa_runner(args) -> Runner:
  try:
    torch = import_torch()
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
    dt = torch_dtype(args.dtype)
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
  torch = import_torch()
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
    import_torch()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  except Exception as e:  # noqa: BLE001
    return Runner(label, "torch", unavailable=f"torch flex_attention not importable "
                  f"({type(e).__name__})")

  def build(mc: MaskCase):
    torch = import_torch()
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
            fallback["why"] = f"torch.compile failed ({short_error(e, 80)}); ran eager"
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
  torch = import_torch()
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


def torch_dtype(name: str):
  torch = import_torch()
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
