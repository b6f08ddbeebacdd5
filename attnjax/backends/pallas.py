"""The Pallas backends ``pallas_tpu`` and ``pallas_gpu``: attnjax problems on the block-sparse
flash kernels of :mod:`pallas_kernels.flash` (FlashAttention-2, Dao 2023).

The adapter turns a validated :class:`~attnjax.backends.base.Problem` into kernel arguments:

* layout: the GPU kernel reads ``[B, T, H, D]`` in place (``layout="bthd"``: no transposes);
  the TPU kernel gets head-major ``[B, H, T, D]`` copies. Sequences are padded to the block
  sizes (padded keys are masked by the kernel through ``kv_len``; padded query rows are
  dropped);
* the mask's static block map (cached numpy) -> :class:`~pallas_kernels.flash.common.BlockTables`,
  so the kernels visit only non-empty blocks and skip ``mask_mod`` on FULL ones. With segment ids
  the tables are rebuilt at run time per example from each block's segment-id range (a document
  mask skips the blocks between documents) — the same run-time table path data-dependent
  sparsity uses;
* ``mask.mask_mod`` and the score mod become in-tile callables; score-mod params are cut to the
  tile along the axes their :class:`~attnjax.scores.Tiling` names;
* a custom VJP: dq/dk/dv from the kernels' backward, sink gradients from the LSE, and gradients
  into score-mod params (ALiBi slopes, bias tables, low-rank factors, arrays captured by
  ``scores.from_function``) from a blockwise XLA pass over the non-empty tiles
  (:func:`_param_grads`) — computed only when some param is being differentiated.

On a CPU the kernels run in interpret mode, so both backends work anywhere for debugging and
tests; ``pallas_tpu`` refuses a GPU and ``pallas_gpu`` a TPU.
"""

from __future__ import annotations

import importlib
import numbers

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax import scores as scores_lib
from attnjax.backends import base

f32 = jnp.float32

_HW = {"tpu": "tpu", "gpu": "gpu"}
# Default blocks on hardware: TPU lanes are 128 wide; Triton dots want powers of two. On a GPU
# the forward may widen its key tiles to 128 (see PallasBackend.plan); the backward stays at
# 64 x 64 (64 x 128 cost it ~25% on an H100).
_DEFAULT_BLOCKS = {"tpu": (128, 128), "gpu": (64, 64)}
_DEFAULT_BLOCKS_BWD = {"tpu": (128, 128), "gpu": (64, 64)}
# GPU forward: 128-wide key tiles when the grid is small and the visited tiles mostly FULL.
# Measured on an H100 (bfloat16, D=64, T=8192; BENCHMARKS.md): B=1, H=8 causal (1024 programs,
# ~97% FULL) ran 10% faster at 64 x 128; causal at B=4, H=16 (8192 programs) and the sliding
# window (~60% FULL) at either size ran faster at 64 x 64. Only measured for 128-byte rows
# (D=64 at 16 bits), so wider rows (float32 D=64, D=128, ...) keep 64 x 64: their key and value
# tiles double in shared memory per pipeline stage and the gain is unmeasured.
_GPU_WIDE_KV, _GPU_WIDE_MAX_PROGRAMS, _GPU_WIDE_MIN_FULL = 128, 2048, 0.75
_GPU_WIDE_MAX_ROW_BYTES = 128


def _check_block(platform: str, name: str, val, compiled: bool | None) -> int:
  """A ``PallasBackend`` block size, checked against the kernel's rule (``compiled`` None: the
  mode is not known yet, so only the interpreted rule, which the compiled one implies)."""
  if isinstance(val, (bool, np.bool_)) or not isinstance(val, numbers.Integral) or val < 8:
    rule = "a multiple of 8" if platform == "tpu" else "a power of two"
    raise ValueError(f"{name} must be an int >= 8 and {rule} (pallas_{platform}), got {val!r}")
  val = int(val)
  if platform == "tpu":
    step = 128 if compiled else 8
    if val % step:
      why = ("compiled for TPU (interpret=False, or None on a TPU): q/k tiles and the "
             "lane-dense LSE and key-position rows are 128 wide" if compiled
             else "interpreted; a multiple of 128 when compiled for TPU hardware")
      raise ValueError(f"{name} must be a multiple of {step} for pallas_tpu ({why}), got "
                       f"{name}={val}; allowed e.g. {step}, {2 * step}, {4 * step}")
  else:
    floor = 16 if compiled else 8
    if val & (val - 1) or val < floor:
      why = ("compiled for GPU: tl.dot needs >= 16" if compiled
             else "interpreted; >= 16 when compiled for GPU hardware")
      raise ValueError(f"{name} must be a power of two >= {floor} for pallas_gpu ({why}), got "
                       f"{name}={val}; allowed e.g. {floor}, {2 * floor}, {4 * floor}")
  return val


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _round_up(x, m):
  return -(-x // m) * m


def _next_pow2(x):
  return 1 << max(0, int(x - 1).bit_length())


def _kernels(platform: str):
  return importlib.import_module(f"pallas_kernels.flash.{platform}")


def _common():
  return importlib.import_module("pallas_kernels.flash.common")


class PallasBackend(base.Backend):
  """Block-sparse flash attention on Pallas kernels for ``platform`` in {"tpu", "gpu"}.

  ``block_q``/``block_kv`` set the tile (defaults: 128x128 on TPU; 64x64 on GPU, where the
  forward widens its key tiles to 128 for small grids of mostly FULL tiles, see :meth:`plan`;
  shrunk to the sequence for short inputs). ``block_q_bwd``/``block_kv_bwd`` set the
  backward's separately (default: ``block_q``/``block_kv`` when those are given, else the
  platform's backward default). Block sizes are ints (numpy ints too) obeying the kernel's
  rule, checked here when the mode is known (``interpret`` given) and at call time otherwise:

  * TPU: a multiple of 8 interpreted; a multiple of 128 compiled (``block_q`` too, not only
    ``block_kv``: q/k tiles are (8, 128)-aligned and the LSE and key positions travel
    lane-dense as ``[1, block]`` rows);
  * GPU: a power of two, >= 8 interpreted and >= 16 compiled (``tl.dot`` needs 16).

  ``num_warps``/``num_stages`` are Triton's compiler parameters (GPU only; None: Pallas'
  defaults). ``interpret``: None interprets unless running on the kernel's own hardware (TPU:
  the TPU interpreter, ``pltpu.InterpretParams()``); True interprets (Pallas' generic
  interpreter); False compiles (lowering for another platform raises a ``ValueError`` naming
  ``interpret``); on TPU also a ``pltpu.InterpretParams``. ``segment_skip`` (bool) builds
  per-example block tables from segment-id ranges; on TPU they are scalar-prefetched into SMEM
  and the kernel splits a call whose tables exceed
  :data:`pallas_kernels.flash.smem.SMEM_TABLE_BUDGET` (256 KiB) over groups of examples (then kv
  heads, then table rows).
  """

  def __init__(self, platform: str, block_q: int | None = None, block_kv: int | None = None,
               interpret: bool | None = None, segment_skip: bool = True,
               num_warps: int | None = None, num_stages: int | None = None,
               block_q_bwd: int | None = None, block_kv_bwd: int | None = None):
    if platform not in _HW:
      raise ValueError(f"platform must be 'tpu' or 'gpu', got {platform!r}")
    if not (interpret is None or isinstance(interpret, (bool, np.bool_)) or (
        platform == "tpu" and type(interpret).__name__ == "InterpretParams")):
      raise ValueError(f"interpret must be None, True, False"
                       f"{' or a pltpu.InterpretParams' if platform == 'tpu' else ''}, got "
                       f"{interpret!r}")
    if not isinstance(segment_skip, (bool, np.bool_)):
      raise ValueError(f"segment_skip must be a bool, got {segment_skip!r}")
    interpret = bool(interpret) if isinstance(interpret, np.bool_) else interpret
    blocks = {}
    for name, val in (("block_q", block_q), ("block_kv", block_kv),
                      ("block_q_bwd", block_q_bwd), ("block_kv_bwd", block_kv_bwd)):
      blocks[name] = None if val is None else _check_block(
          platform, name, val, None if interpret is None else interpret is False)
    block_q, block_kv, block_q_bwd, block_kv_bwd = blocks.values()
    for name, val in (("num_warps", num_warps), ("num_stages", num_stages)):
      if val is None:
        continue
      if platform != "gpu":
        raise ValueError(f"{name} is a Triton (GPU) compiler parameter; the {platform} kernels "
                         f"take none, got {name}={val!r}")
      pow2 = name == "num_warps"
      if not isinstance(val, int) or val < 1 or (pow2 and val & (val - 1)):
        raise ValueError(f"{name} must be a positive int{' power of two' if pow2 else ''}, "
                         f"got {val!r}")
    self.num_warps, self.num_stages = num_warps, num_stages
    self.platform = platform
    self.block_q, self.block_kv = block_q, block_kv
    self.block_q_bwd = block_q_bwd or block_q
    self.block_kv_bwd = block_kv_bwd or block_kv
    self.interpret = interpret
    self.segment_skip = bool(segment_skip)
    dtypes = {"float32", "bfloat16"} | ({"float16"} if platform == "gpu" else set())
    self.capabilities = base.Capabilities(
        name=f"pallas_{platform}", platforms=frozenset({platform, "cpu"}),
        dtypes=frozenset(dtypes))

  def __repr__(self):
    extra = "".join(f", {n}={v}" for n, v in (
        ("block_q_bwd", self.block_q_bwd), ("block_kv_bwd", self.block_kv_bwd),
        ("num_warps", self.num_warps), ("num_stages", self.num_stages))
        if v is not None and not (n.endswith("_bwd") and v == getattr(self, n[:-4])))
    return (f"PallasBackend({self.platform!r}, block_q={self.block_q}, "
            f"block_kv={self.block_kv}{extra})")

  def _on_hardware(self) -> bool:
    return jax.default_backend() == self.platform

  def _compiled(self) -> bool:
    """Whether the kernels will be compiled (not interpreted): the setting they receive."""
    if self.interpret is None:
      return self._on_hardware()
    return self.interpret is False

  def block_sizes(self, q_len: int, kv_len: int, backward: bool = False) -> tuple[int, int]:
    if backward:
      dq, dk = _DEFAULT_BLOCKS_BWD[self.platform]
      bq, bk = self.block_q_bwd or dq, self.block_kv_bwd or dk
    else:
      dq, dk = _DEFAULT_BLOCKS[self.platform]
      bq, bk = self.block_q or dq, self.block_kv or dk
    compiled = self._compiled()
    if self.platform == "tpu":
      # Both block sizes are lane multiples (128) when compiled (the kernel keeps LSE and key
      # positions lane-dense); 8 suffices interpreted.
      lane = 128 if compiled else 8
      return min(bq, _round_up(q_len, lane)), min(bk, _round_up(kv_len, lane))
    floor = 16 if compiled else 8
    return (min(bq, max(floor, _next_pow2(q_len))), min(bk, max(floor, _next_pow2(kv_len))))

  def _check_compiled_blocks(self):
    """With ``interpret=None`` the mode is known only now: a chosen block the compiled kernel
    cannot take is named as this backend's argument (not the kernel's)."""
    if self.interpret is None and self._compiled():
      for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
        val = getattr(self, name)
        if val is not None:
          _check_block(self.platform, name, val, True)

  def unsupported_problem(self, p: base.Problem, platform: str | None) -> str | None:
    """On a GPU, compiled (not interpreted): what the Triton lowering cannot take, or None."""
    if self.platform != "gpu":
      return None
    compiled = (not self.interpret) if self.interpret is not None else platform == "gpu"
    if not compiled:
      return None
    sizes = {self.plan(p)[1:], self.block_sizes(p.q_len, p.kv_len, backward=True)}
    for bq, bk in sorted(sizes):
      why = _triton_unsupported(p, bq, bk)
      if why is not None:
        return why
    return None

  def plan(self, p: base.Problem):
    """``(block map, block_q, block_kv)`` of the forward. On a GPU with default tiles, the key
    tile is 128 wide instead of 64 when the grid has at most 2048 programs (too few to hide
    latency with narrow tiles), at least 75% of the visited 64 x 128 tiles are FULL (so the
    wider tiles add little masked work) and a key/value row (head dim padded to a power of
    two, times the item size) is at most 128 bytes; measured, see ``_GPU_WIDE_KV``."""
    bq, bk = self.block_sizes(p.q_len, p.kv_len)
    row_bytes = (_next_pow2(max(p.q.shape[-1], p.v.shape[-1], 16))
                 * jnp.dtype(p.q.dtype).itemsize)
    if (self.platform == "gpu" and self.block_kv is None and self.block_q is None
        and self._compiled() and bk < _GPU_WIDE_KV <= p.kv_len
        and row_bytes <= _GPU_WIDE_MAX_ROW_BYTES):
      wide = base.static_block_map(p, bq, _GPU_WIDE_KV)
      visited = int((wide != masks_lib.EMPTY).sum())
      programs = p.batch * p.num_q_heads * wide.shape[-2]
      if (programs <= _GPU_WIDE_MAX_PROGRAMS
          and (wide == masks_lib.FULL).sum() >= _GPU_WIDE_MIN_FULL * visited):
        return wide, bq, _GPU_WIDE_KV
    return base.static_block_map(p, bq, bk), bq, bk

  def __call__(self, p: base.Problem):
    self._check_compiled_blocks()
    common = _common()
    kern = _kernels(self.platform)
    B, Tq, Hq, D = p.q.shape
    Tk, Hkv, Dv = p.k.shape[1], p.k.shape[2], p.v.shape[-1]
    bm, bq, bk = self.plan(p)
    bqb, bkb = self.block_sizes(p.q_len, p.kv_len, backward=True)
    # Pad to a multiple of both tilings (powers of two, or lane multiples on TPU).
    Tqp = int(_round_up(Tq, np.lcm(bq, bqb)))
    Tkp = int(_round_up(Tk, np.lcm(bk, bkb)))
    bm = _pad_map(bm, Tqp // bq, Tkp // bk)

    # The GPU kernel reads [B, T, H, D] in place; the TPU kernel's tiles need the sequence on
    # the sublane axis, so it gets head-major copies.
    bthd = self.platform == "gpu"
    to_kernel = (lambda x: x) if bthd else (lambda x: x.transpose(0, 2, 1, 3))
    q = to_kernel(_pad(p.q, 1, Tqp))
    k = to_kernel(_pad(p.k, 1, Tkp))
    v = to_kernel(_pad(p.v, 1, Tkp))
    q_pos, kv_pos = p.positions()
    q_pos = _pad(q_pos, 1, Tqp, "edge")
    kv_pos = _pad(kv_pos, 1, Tkp, "edge")
    qseg = kvseg = None
    if p.q_segment_ids is not None:
      qseg = _pad(p.q_segment_ids, 1, Tqp, "edge")
      kvseg = _pad(p.kv_segment_ids, 1, Tkp, "edge")

    def tables(bm, bq, bk):
      bm4 = bm[None]  # [1, H|1, nq, nk]
      if qseg is not None and self.segment_skip:
        return common.tables_from_block_map_jnp(
            _segment_block_map(bm4, qseg, kvseg, bq, bk),
            max_kv=int((bm != masks_lib.EMPTY).sum(-1).max(initial=1)),
            max_q=int((bm != masks_lib.EMPTY).sum(-2).max(initial=1)))
      return common.tables_from_block_map(bm4)

    mask = p.mask
    sinks = None if p.sinks is None else p.sinks.astype(f32)

    def kernel_kw(bm, bq, bk):
      """Kernel arguments at one tiling (the in-tile callables are built for its tile shape)."""
      fwd_t, dkv_t = tables(bm, bq, bk)
      mask_fn, mask_params, mod, flat_params, specs, treedef, n_mod, score_fn = _kernel_fns(
          p, bq, bk, Tqp, Tkp)
      kw = dict(fwd_tables=fwd_t, dkv_tables=dkv_t, kv_len=Tk, scale=float(p.scale),
                mask_fn=mask_fn, score_fn=score_fn, score_param_specs=specs, block_q=bq,
                block_kv=bk, interpret=self.interpret)
      if self.platform == "gpu":
        kw.update(num_warps=self.num_warps, num_stages=self.num_stages, layout="bthd")
      return kw, (mask_params, mod, flat_params, specs, treedef, n_mod)

    kw, (mask_params, mod, flat_params, specs, treedef, n_mod) = kernel_kw(bm, bq, bk)
    n_mask, mask_params_bwd = len(mask_params), ()
    if (bqb, bkb) == (bq, bk):
      kw_bwd, bwd_mask = kw, (n_mod, n_mod + n_mask)
    else:
      bm_b = _pad_map(base.static_block_map(p, bqb, bkb), Tqp // bqb, Tkp // bkb)
      kw_bwd, (mask_params_b, *_) = kernel_kw(bm_b, bqb, bkb)
      # The mask's constants were traced at each tiling; a constant built from the tile shape
      # differs between them, so the backward then gets its own (equal ones are shared). The
      # comparison uses the constants as the mask holds them: the kernel copies (int32 for
      # bool, jnp arrays) are fresh tracers under jit.
      same = isinstance(mask, masks_lib.Full) or _same_consts(
          _traced_mask(mask, bq, bk)[1].consts, _traced_mask(mask, bqb, bkb)[1].consts)
      if same and len(mask_params) == len(mask_params_b):
        bwd_mask = (n_mod, n_mod + n_mask)
      else:
        mask_params_bwd = mask_params_b
        bwd_mask = (n_mod + n_mask, n_mod + n_mask + len(mask_params_b))
    static = _Static(kern=kern, kw=kw, kw_bwd=kw_bwd, mod=mod, treedef=treedef,
                     specs=specs[:n_mod], bm=bm, bq=bq, bk=bk, Tk=Tk, mask=mask, n_mod=n_mod,
                     n_mask=n_mask, bwd_mask=bwd_mask, bthd=bthd)
    out, lse = _make_core(static)(q, k, v, sinks,
                                  tuple(flat_params) + mask_params + mask_params_bwd, qseg,
                                  kvseg, q_pos, kv_pos)
    out = (out[:, :Tq] if bthd else out[:, :, :Tq].transpose(0, 2, 1, 3)).astype(p.q.dtype)
    if p.return_lse:
      return out, lse[:, :, :Tq].transpose(0, 2, 1)
    return out


def _kernel_fns(p: base.Problem, bq: int, bk: int, Tqp: int, Tkp: int):
  """The kernels' in-tile callables and their array params: ``(mask_fn, mask_params, mod,
  flat_params, specs, treedef, n_mod, score_fn)`` (see ``_mask_for_kernel`` and the score-mod
  binding below)."""
  common = _common()
  mask = p.mask
  mask_fn, mask_params, mask_in_score = _mask_for_kernel(mask, bq, bk)

  mod, flat_params, specs, treedef = None, (), (), None
  if p.score_mod is not None:
    mod = p.score_mod.bind((1, 1, bq, bk), (1, 1, 1, 1), (1, 1, 1, 1), (1, 1, bq, 1),
                           (1, 1, 1, bk))
    params = mod.pad_params(Tqp, Tkp)
    flat_params, treedef = jax.tree.flatten(params)
    tilings = jax.tree.leaves(mod.tiling, is_leaf=lambda x: isinstance(x, scores_lib.Tiling))
    specs = tuple(common.ParamSpec(batch_axis=t.batch_axis, head_axis=t.head_axis,
                                   q_axis=t.q_axis, kv_axis=t.kv_axis) for t in tilings)
  n_mod = len(flat_params)
  specs = specs + (common.ParamSpec(),) * len(mask_params)   # mask arrays: passed whole

  score_fn = None
  if mod is not None or mask_in_score is not None:
    fn = mod.fn if mod is not None else None

    def score_fn(ptile, s, b, h, qp, kp):
      if fn is not None:
        prm = jax.tree.unflatten(treedef, list(ptile[:n_mod]))
        s = fn(prm, s[None, None], jnp.reshape(b, (1, 1, 1, 1)), jnp.reshape(h, (1, 1, 1, 1)),
               qp[None, None], kp[None, None])[0, 0]
      if mask_in_score is not None:
        s = jnp.where(mask_in_score(ptile[n_mod:], qp, kp, h), s, -jnp.inf)
      return s
  return mask_fn, mask_params, mod, flat_params, specs, treedef, n_mod, score_fn


# Primitives the Pallas Triton lowering cannot compile inside a kernel (a table lookup in a
# score mod is a gather; Triton has no gather from register tensors). Used only when this jax's
# own table of Triton lowering rules cannot be read (it is private API).
_TRITON_UNSUPPORTED = frozenset({"gather", "scatter", "scatter-add", "scatter_add", "sort",
                                 "dynamic_slice", "dynamic_update_slice", "argsort", "erf"})


def _triton_bad_primitives(prims: set) -> list:
  try:
    from jax._src.pallas.triton import lowering as triton_lowering
    known = {p.name for p in triton_lowering.triton_lowering_rules}
  except Exception:  # noqa: BLE001 - private API moved: fall back to the known gaps
    return sorted(prims & _TRITON_UNSUPPORTED)
  return sorted(prims - known)


def _primitives(jaxpr) -> set:
  out = set()
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          out |= _primitives(getattr(inner, "jaxpr", inner))
  return out


def _triton_unsupported(p: base.Problem, bq: int, bk: int) -> str | None:
  """Why the compiled GPU kernel cannot take ``p``'s mask/score mod, or None: every array in a
  Triton kernel must have power-of-two dimensions, and some primitives do not lower."""
  Tqp, Tkp = _round_up(p.q_len, bq), _round_up(p.kv_len, bk)
  mask_fn, mask_params, mod, flat_params, specs, treedef, n_mod, score_fn = _kernel_fns(
      p, bq, bk, Tqp, Tkp)
  tiles = []
  for x, sp in zip(tuple(flat_params) + tuple(mask_params), specs):
    shape = list(jnp.shape(x))
    for ax, n in ((sp.batch_axis, 1), (sp.head_axis, 1), (sp.q_axis, bq), (sp.kv_axis, bk)):
      if ax is not None:
        shape[ax] = n
    bad = [d for d in shape if d & (d - 1)]
    what = "score_mod" if len(tiles) < n_mod else "mask"
    if bad:
      return (f"a {what} array of shape {tuple(jnp.shape(x))} on the compiled GPU kernel: its "
              f"tile {tuple(shape)} has dimensions {bad} that are not powers of two (Pallas "
              "Triton needs power-of-two arrays); use impl='chunked' or 'xla'")
    tiles.append(jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(x)))
  fns = []
  if mask_fn is not None:
    fns.append(("mask", lambda: jax.make_jaxpr(mask_fn)(
        jax.ShapeDtypeStruct((bq, 1), jnp.int32), jax.ShapeDtypeStruct((1, bk), jnp.int32),
        jnp.int32(0))))
  if score_fn is not None:
    # Forward and backward: the dq/dkv kernels pull ds back through jax.vjp of the score fn,
    # whose derivative can hold primitives the forward does not (e.g. a custom JVP rule's).
    # A score fn with no reverse-mode derivative at all (a while loop with traced bounds)
    # fails the backward on every backend alike; its forward is still checked and served.
    args = (tuple(tiles), jax.ShapeDtypeStruct((bq, bk), jnp.float32), jnp.int32(0),
            jnp.int32(0), jax.ShapeDtypeStruct((bq, 1), jnp.int32),
            jax.ShapeDtypeStruct((1, bk), jnp.int32))

    def fwd_and_vjp(tiles, s, b, h, qp, kp):
      out, pull = jax.vjp(lambda s: score_fn(tiles, s, b, h, qp, kp).astype(jnp.float32), s)
      return out, pull(out)

    def trace_score():
      try:
        return jax.make_jaxpr(fwd_and_vjp)(*args)
      except Exception:  # noqa: BLE001 - not differentiable: only the forward can run
        return jax.make_jaxpr(score_fn)(*args)

    fns.append(("score_mod" if n_mod else "mask", trace_score))
  for what, trace in fns:
    bad = _triton_bad_primitives(_primitives(trace().jaxpr))
    if bad:
      return (f"this {what} on the compiled GPU kernel: it uses {bad}, which the Pallas Triton "
              "lowering cannot compile (e.g. a table lookup); use impl='chunked' or 'xla'")
  return None


class _Static:
  """Everything static about one call (closed over by the custom VJP)."""

  def __init__(self, **kw):
    self.__dict__.update(kw)


def _pad_map(bm: np.ndarray, nq: int, nk: int) -> np.ndarray:
  """The block map grown to ``[.., nq, nk]`` with EMPTY blocks (rows/columns of padding only:
  padded keys are masked by ``kv_len`` and padded query rows are dropped)."""
  grow = [(0, 0)] * (bm.ndim - 2) + [(0, nq - bm.shape[-2]), (0, nk - bm.shape[-1])]
  return np.pad(bm, grow, constant_values=masks_lib.EMPTY) if any(g[1] for g in grow) else bm


def _pad(x, axis, size, mode="constant"):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, mode=mode)


def _segment_block_map(bm4, qseg, kvseg, bq, bk):
  """``int8[B, H|1, nq, nk]``: the static map with blocks whose query and key segment-id ranges
  are disjoint (per example) set EMPTY."""
  B = qseg.shape[0]
  qs = qseg.reshape(B, -1, bq)
  ks = kvseg.reshape(B, -1, bk)
  qmin, qmax = qs.min(-1), qs.max(-1)
  kmin, kmax = ks.min(-1), ks.max(-1)
  overlap = (qmax[:, :, None] >= kmin[:, None, :]) & (kmax[:, None, :] >= qmin[:, :, None])
  return jnp.where(overlap[:, None], jnp.asarray(bm4), masks_lib.EMPTY).astype(jnp.int8)


def _traced_mask(mask: masks_lib.Mask, bq: int, bk: int):
  """``(mask_mod(q, k, h), its closed jaxpr at a bq x bk tile)``; the jaxpr's ``consts`` are the
  arrays the mask holds, as the mask holds them (compare these, not converted copies)."""
  per_head = mask.per_head

  def raw(qp, kp, h):
    return mask.mask_mod(qp, kp, h if per_head else None)

  return raw, jax.make_jaxpr(raw)(jnp.zeros((bq, 1), jnp.int32),
                                  jnp.zeros((1, bk), jnp.int32), jnp.int32(0))


def _mask_for_kernel(mask: masks_lib.Mask, bq: int, bk: int):
  """``(mask_fn, mask_params, mask_in_score)`` for the kernels.

  A mask made of index arithmetic becomes ``mask_fn`` (evaluated on PARTIAL tiles only). A
  mask holding arrays (``masks.dense``, a ``from_function`` closure over a table) cannot be a
  kernel constant: its arrays are hoisted into ``mask_params`` (passed whole, bool as int32)
  and the mask is applied through the score function (``mask_in_score``), on every visited
  tile — EMPTY tiles are still skipped from the block map."""
  if isinstance(mask, masks_lib.Full):
    return None, (), None
  raw, closed = _traced_mask(mask, bq, bk)
  if not closed.consts:
    return raw, (), None
  jaxpr = closed.jaxpr
  dtypes = [jnp.result_type(c) for c in closed.consts]
  params = tuple(jnp.asarray(c).astype(jnp.int32) if dt == jnp.bool_ else jnp.asarray(c)
                 for c, dt in zip(closed.consts, dtypes))

  def in_score(mp, qp, kp, h):
    mp = [x.astype(jnp.bool_) if dt == jnp.bool_ else x for x, dt in zip(mp, dtypes)]
    (vis,) = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, mp))(qp, kp, h)
    return vis

  return None, params, in_score


def _same_consts(a, b) -> bool:
  """Whether two traces' mask constants are the same arrays (identical, or equal values)."""
  if len(a) != len(b):
    return False
  for x, y in zip(a, b):
    if x is y:
      continue
    if jnp.shape(x) != jnp.shape(y) or jnp.result_type(x) != jnp.result_type(y):
      return False
    try:
      if not np.array_equal(np.asarray(x), np.asarray(y)):
        return False
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      return False   # distinct traced values: pass both (correct, one more input)
  return True


def _kernel_kwargs(st: _Static, params, qseg, kvseg, q_pos, kv_pos, sinks, backward=False):
  """The kernel's keyword arguments; ``params`` holds the score mod's arrays, then the mask's
  constants as traced at the forward tiling, then (if they differ) at the backward's."""
  lo, hi = st.bwd_mask if backward else (st.n_mod, st.n_mod + st.n_mask)
  params = tuple(params[:st.n_mod]) + tuple(params[lo:hi])
  return dict(st.kw_bwd if backward else st.kw, score_params=params, q_segment_ids=qseg,
              kv_segment_ids=kvseg, q_pos=q_pos, kv_pos=kv_pos, sinks=sinks)


def _make_core(st: _Static):
  @jax.custom_vjp
  def core(q, k, v, sinks, params, qseg, kvseg, q_pos, kv_pos):
    return st.kern.flash_attention_fwd(
        q, k, v, **_kernel_kwargs(st, params, qseg, kvseg, q_pos, kv_pos, sinks))

  def fwd(*args):
    # symbolic_zeros=True wraps every array leaf as CustomVJPPrimal(value, perturbed).
    is_primal = lambda x: type(x).__name__ == "CustomVJPPrimal"
    perturbed = [x.perturbed for x in jax.tree.leaves(args[4], is_leaf=is_primal)]
    args = jax.tree.map(lambda x: x.value, args, is_leaf=is_primal)
    q, k, v, sinks, params, qseg, kvseg, q_pos, kv_pos = args
    out, lse = st.kern.flash_attention_fwd(
        q, k, v, **_kernel_kwargs(st, params, qseg, kvseg, q_pos, kv_pos, sinks))
    flag = (None,) if any(perturbed) else ()   # static pytree structure, not a traced bool
    res = (q, k, v, sinks, params, qseg, kvseg, q_pos, kv_pos, out, lse, flag)
    return (out, lse), res

  def bwd(res, cts):
    q, k, v, sinks, params, qseg, kvseg, q_pos, kv_pos, out, lse, flag = res
    want_params = len(flag) > 0
    g_out, g_lse = cts
    g_out = jnp.zeros(out.shape, out.dtype) if _is_zero(g_out) else g_out.astype(out.dtype)
    g_lse = jnp.zeros(lse.shape, f32) if _is_zero(g_lse) else g_lse.astype(f32)
    # dL/ds = p * (dp - delta); an LSE cotangent adds p * g_lse, i.e. delta -= g_lse.
    rows = jnp.sum(g_out.astype(f32) * out.astype(f32), axis=-1)
    delta = (rows.transpose(0, 2, 1) if st.bthd else rows) - g_lse   # [B, Hq, Tq] like lse
    kw = _kernel_kwargs(st, params, qseg, kvseg, q_pos, kv_pos, sinks, backward=True)
    dq, dk, dv = st.kern.flash_attention_bwd(q, k, v, out, lse, g_out, delta, **kw)
    dsinks = None
    if sinks is not None:
      lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
      p_sink = jnp.exp(sinks[None, :, None] - lse_safe)
      dsinks = -jnp.sum(p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
    zeros = lambda xs: tuple(scores_lib.param_cotangent(jnp.zeros(jnp.shape(x), f32), x)
                             for x in xs)
    mod_params, mask_params = params[:st.n_mod], params[st.n_mod:]
    if mod_params and want_params:
      hm = (lambda x: x.transpose(0, 2, 1, 3)) if st.bthd else (lambda x: x)  # head-major
      dparams = _param_grads(st, mod_params, hm(q), hm(k), hm(v), lse, hm(g_out), delta, qseg,
                             kvseg, q_pos, kv_pos)
    else:
      dparams = zeros(mod_params)
    dparams = dparams + zeros(mask_params)   # mask arrays are constants of the mask
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dsinks, dparams,
            None, None, None, None)

  core.defvjp(fwd, bwd, symbolic_zeros=True)
  return core


def _is_zero(x):
  return x is None or type(x).__name__ == "SymbolicZero"


# ----------------------------------------------------------------------------------------------
# Gradients into score-mod parameters (blockwise XLA pass over the non-empty tiles)
# ----------------------------------------------------------------------------------------------

def _param_grads(st: _Static, params, q, k, v, lse, do, delta, qseg, kvseg, q_pos, kv_pos):
  """``sum over visited tiles`` of the score mod's VJP w.r.t. its params at ``dS``.

  ``dS = P * (dP - delta)`` is recomputed per tile from the saved LSE, for every example and
  head at once (the bound score mod is vmapped over them, params cut per (example, head) as the
  kernel cuts them). Tiles come from the union over heads of the static block map."""
  B, Hq, Tqp, D = q.shape
  G = Hq // k.shape[1]
  bq, bk = st.bq, st.bk
  pairs = np.argwhere((st.bm != masks_lib.EMPTY).any(0)).astype(np.int32)
  fn = st.mod.fn
  treedef = st.treedef
  specs = st.specs
  heads = jnp.arange(Hq, dtype=jnp.int32)
  batch = jnp.arange(B, dtype=jnp.int32)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
  mask = st.mask
  Bp_q, Bp_k = q_pos.shape[0], kv_pos.shape[0]

  def in_axes(spec, x, kind):
    """The axis vmap maps for ``kind`` ("b" outer, "h" inner), or None (broadcast param)."""
    b_ax = spec.batch_axis if spec.batch_axis is not None and x.shape[spec.batch_axis] > 1 \
        else None
    h_ax = spec.head_axis if spec.head_axis is not None and x.shape[spec.head_axis] > 1 \
        else None
    if kind == "b":
      return b_ax
    if h_ax is not None and b_ax is not None and b_ax < h_ax:
      return h_ax - 1      # the outer vmap already removed the batch axis
    return h_ax

  def full_axes(spec, x):
    b = spec.batch_axis if spec.batch_axis is not None and x.shape[spec.batch_axis] > 1 else None
    h = spec.head_axis if spec.head_axis is not None and x.shape[spec.head_axis] > 1 else None
    return b, h

  def tile_of(x, spec, i, j):
    if spec.q_axis is not None and x.shape[spec.q_axis] > 1:
      x = jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=spec.q_axis)
    if spec.kv_axis is not None and x.shape[spec.kv_axis] > 1:
      x = jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=spec.kv_axis)
    return x

  def make_one(exp_axes):
    """The params' cotangent for one (example, head) tile. Inside the vmaps a param has lost
    its mapped batch/head axes; ``exp_axes`` puts them back as size-1 axes for the score mod."""
    def one(ptile, s, b, h, qp, kp, vis, lse_r, dp, dl):
      def f(pt):
        pt = [jnp.expand_dims(x, ax) if ax else x for x, ax in zip(pt, exp_axes)]
        prm = jax.tree.unflatten(treedef, pt)
        return fn(prm, s[None, None], b.reshape(1, 1, 1, 1), h.reshape(1, 1, 1, 1),
                  qp[None, None], kp[None, None])[0, 0]
      s2, vjp = jax.vjp(f, list(ptile))
      pr = jnp.where(vis, jnp.exp(s2 - lse_r[:, None]), 0.0)
      ds = pr * (dp - dl[:, None])
      return vjp(ds)[0]
    return one

  def step(acc, pair):
    i, j = pair[0], pair[1]
    qt = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=2)
    kt = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
    vt = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
    dot = jax.lax.dynamic_slice_in_dim(do, i * bq, bq, axis=2)
    kt = jnp.repeat(kt, G, axis=1) if G > 1 else kt
    vt = jnp.repeat(vt, G, axis=1) if G > 1 else vt
    # Same arithmetic as the kernels: float32 at full precision (GPU XLA would default to TF32).
    s = jnp.einsum("bhqd,bhkd->bhqk", qt, kt, preferred_element_type=f32,
                   precision=_precision(qt.dtype)) * st.kw["scale"]
    dp = jnp.einsum("bhqd,bhkd->bhqk", dot, vt, preferred_element_type=f32,
                    precision=_precision(vt.dtype))
    qp = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq, axis=1)      # [Bp, bq]
    kp = jax.lax.dynamic_slice_in_dim(kv_pos, j * bk, bk, axis=1)
    qp = jnp.broadcast_to(qp, (B, bq)) if Bp_q == 1 else qp
    kp = jnp.broadcast_to(kp, (B, bk)) if Bp_k == 1 else kp
    hh = heads[None, :, None, None]
    vis = jnp.broadcast_to(
        mask.mask_mod(qp[:, None, :, None], kp[:, None, None, :],
                      hh if mask.per_head else None), (B, Hq, bq, bk))
    kv_valid = (j * bk + jnp.arange(bk)) < st.Tk
    vis = vis & kv_valid
    if qseg is not None:
      qs = jax.lax.dynamic_slice_in_dim(qseg, i * bq, bq, axis=1)
      ks = jax.lax.dynamic_slice_in_dim(kvseg, j * bk, bk, axis=1)
      vis = vis & (qs[:, None, :, None] == ks[:, None, None, :])
    lse_t = jax.lax.dynamic_slice_in_dim(lse_safe, i * bq, bq, axis=2)
    dl_t = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=2)
    ptiles = [tile_of(x, sp, i, j) for x, sp in zip(params, specs)]
    # vmap over heads (inner) and examples (outer); params follow their batch/head axes.
    exp_axes = [tuple(a for a in full_axes(sp, x) if a is not None)
                for x, sp in zip(ptiles, specs)]
    f_h = jax.vmap(make_one(exp_axes), in_axes=([in_axes(sp, x, "h") for x, sp in zip(ptiles, specs)],
                                 0, None, 0, None, None, 0, 0, 0, 0))
    f_bh = jax.vmap(f_h, in_axes=([in_axes(sp, x, "b") for x, sp in zip(ptiles, specs)],
                                  0, 0, None, 0, 0, 0, 0, 0, 0))
    cts = f_bh(ptiles, s, batch, heads, qp[:, :, None], kp[:, None, :], vis, lse_t, dp, dl_t)
    new = []
    for a, ct, x, sp in zip(acc, cts, ptiles, specs):
      # cts carry leading [B, Hq] vmap axes; fold them back onto the param's own axes.
      ct = _fold_vmapped(ct, x, *full_axes(sp, x))
      new.append(_add_tile(a, ct, sp, i * bq, j * bk))
    return new, None

  acc0 = [jnp.zeros(x.shape, f32) for x in params]
  acc, _ = jax.lax.scan(step, acc0, jnp.asarray(pairs))
  return tuple(scores_lib.param_cotangent(a, x) for a, x in zip(acc, params))


def _fold_vmapped(ct, tile, b_ax, h_ax):
  """Cotangent of the vmapped (example, head) call, ``[B, Hq, *rest]`` with ``rest`` the tile's
  shape without its mapped axes, back to the tile's shape: unmapped leading axes are summed
  (broadcast params), mapped ones moved to their axis (``b_ax``/``h_ax`` on the full tile)."""
  ct = jnp.zeros(ct.shape, f32) if ct.dtype == jax.dtypes.float0 else ct.astype(f32)
  if h_ax is None:
    ct = ct.sum(axis=1)
  if b_ax is None:
    ct = ct.sum(axis=0)
  dest = [a for a in (b_ax, h_ax) if a is not None]
  if dest:
    ct = jnp.moveaxis(ct, list(range(len(dest))), dest)
  return ct.reshape(tile.shape)


def _add_tile(acc, ct, spec, q_start, kv_start):
  starts = [0] * acc.ndim
  if spec.q_axis is not None and acc.shape[spec.q_axis] > 1:
    starts[spec.q_axis] = q_start
  if spec.kv_axis is not None and acc.shape[spec.kv_axis] > 1:
    starts[spec.kv_axis] = kv_start
  if ct.shape == acc.shape:
    return acc + ct
  cur = jax.lax.dynamic_slice(acc, starts, ct.shape)
  return jax.lax.dynamic_update_slice(acc, cur + ct, starts)


def tpu_backend(**kw) -> PallasBackend:
  return PallasBackend("tpu", **kw)


def gpu_backend(**kw) -> PallasBackend:
  return PallasBackend("gpu", **kw)


__all__ = ["PallasBackend", "tpu_backend", "gpu_backend"]
