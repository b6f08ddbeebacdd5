"""Edge cases of the Pallas kernels and the ``pallas_tpu``/``pallas_gpu`` adapter (interpret mode
on CPU): a ``-inf`` sink on rows that see no key, ``interpret=False`` off the kernel's hardware,
block-size / dtype / argument validation, out-of-range runtime block ids, the SMEM budget split
of the TPU kernel's scalar-prefetched tables, and the decode cache padding.

Numbers are checked against a float64 dense reference written here (visibility from explicit
index arithmetic, softmax safe on empty rows); fresh random inputs per case.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks as M
from attnjax import scores as S
from attnjax.backends.pallas import PallasBackend
from pallas_kernels.decode import CachePaddingWarning, decode_attention
from pallas_kernels.decode import common as dcommon
from pallas_kernels.flash import common
from pallas_kernels.flash import gpu as fgpu
from pallas_kernels.flash import smem
from pallas_kernels.flash import tpu as ftpu

pytestmark = pytest.mark.pallas
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_run(fn, *args):
  return jax.jit(fn).trace(*args).lower().compile(compiler_options=_FAST)(*args)


# ------------------------------------------------------------------------ float64 reference
def reference(q, k, v, vis, sinks, scale, bias=None):
  """Dense attention, head-major ``[B, H, T, D]``; ``vis [B|1, Hq|1, Tq, Tk]`` bool; rows that
  see nothing (and no sink) give out 0, lse -inf. Returns ``(out, lse [B, Hq, Tq])``."""
  G = q.shape[1] // k.shape[1]
  k, v = jnp.repeat(k, G, axis=1), jnp.repeat(v, G, axis=1)
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
  if bias is not None:
    s = s + bias
  s = jnp.where(jnp.broadcast_to(vis, s.shape), s, -jnp.inf)
  if sinks is not None:
    s = jnp.concatenate([s, jnp.broadcast_to(sinks[None, :, None, None], s.shape[:3] + (1,))], -1)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m)
  den = jnp.sum(e, -1, keepdims=True)
  p = e / jnp.where(den > 0, den, 1.0)
  lse = jnp.where(den[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(den > 0, den, 1.0))[..., 0],
                  -jnp.inf)
  return jnp.einsum("bhqk,bhkd->bhqd", p[..., :v.shape[2]], v), lse


def loss(attn, cot, cot_lse):
  """Random cotangents on out and on the finite LSE entries; returns (value, (out, lse))."""
  def f(*args):
    out, lse = attn(*args)
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * cot_lse
    return jnp.sum(out.astype(cot.dtype) * cot) + jnp.sum(lse_term), (out, lse)
  return f


def grads_f64(attn, args, cot, cot_lse):
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    g, (out, lse) = jax.grad(loss(attn, f64(cot), f64(cot_lse)), argnums=tuple(range(len(args))),
                             has_aux=True)(*map(f64, args))
    return jax.tree.map(lambda x: np.asarray(x, np.float64), (out, lse, g))


def assert_matches(got, want, tol=2e-5):
  (o, l, g), (o_r, l_r, g_r) = jax.tree.map(lambda x: np.asarray(x, np.float64), got), want
  np.testing.assert_array_equal(np.isneginf(l), np.isneginf(l_r))
  fin = np.isfinite(l_r)
  np.testing.assert_allclose(l[fin], l_r[fin], rtol=tol, atol=tol)
  np.testing.assert_allclose(o, o_r, rtol=tol, atol=tol)
  for i, (a, b) in enumerate(zip(g, g_r)):
    assert np.all(np.isfinite(a)), f"grad {i} not finite"
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()),
                               err_msg=f"grad {i}")


def rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


# ------------------------------------------------- 1. -inf sink on rows that see no key
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_kernel_neg_inf_sink_on_empty_rows(platform):
  """Standalone kernels: head 0 has a -inf sink (no sink), rows 0..3 see no key. LSE -inf,
  out 0, and every gradient (dsinks included) finite and equal to float64."""
  rng = np.random.default_rng(1)
  B, H, T, D = 1, 2, 16, 8
  q, k, v = rand(rng, B, H, T, D), rand(rng, B, H, T, D), rand(rng, B, H, T, D)
  cot, cot_lse = rand(rng, B, H, T, D), rand(rng, B, H, T)
  sinks = jnp.asarray([-jnp.inf, 0.3], jnp.float32)
  mask_fn = lambda qp, kp, h: kp <= qp - 4
  pos = np.arange(T, dtype=np.int32)[None]
  vis = np.arange(T)[None, :] <= np.arange(T)[:, None] - 4
  fwd_t, dkv_t = common.tables_from_block_map(np.ones((2, 2), np.int8))
  mod = ftpu if platform == "tpu" else fgpu
  kw = dict(fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=pos, kv_pos=pos, kv_len=T, scale=0.35,
            mask_fn=mask_fn, block_q=8, block_kv=8, interpret=True)
  attn = lambda q, k, v, s: mod.flash_attention(q, k, v, sinks=s, **kw)
  g, (out, lse) = jit_run(jax.grad(loss(attn, cot, cot_lse), argnums=(0, 1, 2, 3),
                                   has_aux=True), q, k, v, sinks)
  want = grads_f64(lambda q, k, v, s: reference(q, k, v, vis, s, 0.35), (q, k, v, sinks), cot,
                   cot_lse)
  assert np.all(np.isneginf(np.asarray(lse)[0, 0, :4])) and np.all(np.asarray(out)[0, 0, :4] == 0)
  assert_matches((out, lse, g), want)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_backend_neg_inf_sink_on_empty_rows(platform):
  """attnjax.attention with sinks [-inf, 0.5] and causal(offset=-1) (query 0 sees nothing):
  LSE -inf, output 0 and finite gradients equal to float64, as on xla/chunked."""
  rng = np.random.default_rng(2)
  B, T, H, D = 1, 16, 2, 8
  q, k, v = rand(rng, B, T, H, D), rand(rng, B, T, H, D), rand(rng, B, T, H, D)
  cot, cot_lse = rand(rng, B, T, H, D), rand(rng, B, T, H)
  sinks = jnp.asarray([-jnp.inf, 0.5], jnp.float32)
  be = PallasBackend(platform, block_q=8, block_kv=8, interpret=True)
  attn = lambda q, k, v, s: aj.attention(q, k, v, mask=M.causal(offset=-1), sinks=s, impl=be,
                                         return_lse=True)
  g, (out, lse) = jit_run(jax.grad(loss(attn, cot, cot_lse), argnums=(0, 1, 2, 3),
                                   has_aux=True), q, k, v, sinks)
  vis = np.arange(T)[None, :] <= np.arange(T)[:, None] - 1
  hm = lambda x: x.transpose(0, 2, 1, 3)

  def ref(q, k, v, s):
    o, l = reference(hm(q), hm(k), hm(v), vis, s, D ** -0.5)
    return hm(o), l.transpose(0, 2, 1)
  want = grads_f64(ref, (q, k, v, sinks), cot, cot_lse)
  assert np.isneginf(float(lse[0, 0, 0])) and np.all(np.asarray(out)[0, 0, 0] == 0)
  assert_matches((out, lse, g), want)


# ------------------------------------------------ 2. interpret=False off the kernel's hardware
def _x(T=37):
  return jnp.asarray(np.random.default_rng(3).standard_normal((1, T, 2, 8)), jnp.float32)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_backend_interpret_false_off_hardware_names_interpret(platform):
  if jax.default_backend() == platform:
    pytest.skip("on the kernel's own hardware")
  x = _x()
  with pytest.raises(ValueError, match=f"interpret=False.*{platform.upper()}.*lowered for cpu"):
    aj.attention(x, x, x, impl=PallasBackend(platform, interpret=False))


def test_block_sizes_follow_interpret_setting():
  """The adapter's tiles follow the mode the kernel will run in, not the host."""
  assert PallasBackend("tpu", interpret=False).block_sizes(40, 40) == (128, 128)
  assert PallasBackend("tpu", interpret=True).block_sizes(40, 40) == (40, 40)
  assert PallasBackend("gpu", interpret=False).block_sizes(5, 5) == (16, 16)
  assert PallasBackend("gpu", interpret=True).block_sizes(5, 5) == (8, 8)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_decode_interpret_false_off_hardware_names_interpret(platform):
  if jax.default_backend() == platform:
    pytest.skip("on the kernel's own hardware")
  rng = np.random.default_rng(4)
  q, kv = rand(rng, 1, 1, 2, 16), rand(rng, 1, 128, 2, 16)
  with pytest.raises(ValueError, match=f"interpret=False.*{platform.upper()}.*lowered for cpu"):
    decode_attention(q, kv, kv, jnp.asarray([5], jnp.int32), platform=platform,
                     interpret=False, block_kv=128 if platform == "tpu" else 64)


def test_tpu_kernel_interpret_false_off_tpu():
  """Standalone TPU kernel: hardware block sizes -> the lowering names interpret=False; a block
  size only valid interpreted -> the block error also says how to run here."""
  if jax.default_backend() == "tpu":
    pytest.skip("on a TPU")
  T = 128
  x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 1, T, 8)), jnp.float32)
  pos = np.arange(T, dtype=np.int32)[None]
  fwd_t, dkv_t = common.tables_from_block_map(np.ones((1, 1), np.int8))
  kw = dict(fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=pos, kv_pos=pos, kv_len=T, scale=0.3,
            interpret=False)
  with pytest.raises(ValueError, match="interpret=False is compiled for TPU.*lowered for cpu"):
    ftpu.flash_attention_fwd(x, x, x, block_q=128, block_kv=128, **kw)
  fwd_t, dkv_t = common.tables_from_block_map(np.ones((16, 16), np.int8))
  kw.update(fwd_tables=fwd_t, dkv_tables=dkv_t)
  with pytest.raises(ValueError, match="multiple of 128.*pass interpret=True"):
    ftpu.flash_attention_fwd(x, x, x, block_q=8, block_kv=8, **kw)


# ------------------------------------------------------------ 3. block sizes in PallasBackend
@pytest.mark.parametrize("kw,match", [
    (dict(platform="tpu", block_q=12), "block_q must be a multiple of 8 for pallas_tpu.*12"),
    (dict(platform="gpu", block_q=24), "block_q must be a power of two >= 8 for pallas_gpu.*24"),
    (dict(platform="tpu", block_kv=64, interpret=False),
     "block_kv must be a multiple of 128 for pallas_tpu .compiled"),
    (dict(platform="tpu", block_q=64, interpret=False), "block_q must be a multiple of 128"),
    (dict(platform="gpu", block_q=8, interpret=False), "block_q must be a power of two >= 16"),
    (dict(platform="gpu", block_kv=True), "block_kv must be an int"),
    (dict(platform="tpu", block_q=8.0), "block_q must be an int"),
])
def test_backend_block_size_rules(kw, match):
  with pytest.raises(ValueError, match=match):
    PallasBackend(**kw)


def test_backend_accepts_numpy_ints_and_checks_at_call_on_hardware():
  be = PallasBackend("gpu", block_q=np.int64(16), block_kv=np.int32(8))
  assert (be.block_q, be.block_kv) == (16, 8) and type(be.block_q) is int
  assert PallasBackend("tpu", block_q=np.int64(256), interpret=False).block_q == 256
  # interpret=None: the compiled rule applies once the kernel would compile (on the hardware).
  x = _x(16)
  for platform, bad in (("tpu", dict(block_q=64)), ("gpu", dict(block_kv=8))):
    be = PallasBackend(platform, **bad)
    be._on_hardware = lambda: True
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name} must be .*compiled"):
      aj.attention(x, x, x, impl=be)


def test_tpu_kernel_block_sizes_accept_numpy_ints():
  rng = np.random.default_rng(6)
  B, H, T, D = 1, 1, 16, 8
  q, k, v = rand(rng, B, H, T, D), rand(rng, B, H, T, D), rand(rng, B, H, T, D)
  pos = np.arange(T, dtype=np.int32)[None]
  fwd_t, dkv_t = common.tables_from_block_map(np.ones((2, 2), np.int8))
  kw = dict(fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=pos, kv_pos=pos, kv_len=T, scale=0.3,
            interpret=True)
  out, lse = ftpu.flash_attention_fwd(q, k, v, block_q=np.int64(8), block_kv=np.int32(8), **kw)
  o_r, l_r = reference(*(np.asarray(x, np.float64) for x in (q, k, v)), np.ones((T, T), bool),
                       None, 0.3)
  np.testing.assert_allclose(out, o_r, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(lse, l_r, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="block_q must be a positive multiple of 8"):
    ftpu.flash_attention_fwd(q, k, v, block_q=True, block_kv=8, **kw)


# ------------------------------------------------------------- 4. TPU kernel dtypes
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.int32])
def test_tpu_kernel_rejects_unsupported_dtypes(dtype):
  T = 16
  x = jnp.ones((1, 1, T, 8), dtype)
  pos = np.arange(T, dtype=np.int32)[None]
  fwd_t, dkv_t = common.tables_from_block_map(np.ones((2, 2), np.int8))
  with pytest.raises(ValueError, match="allowed: float32, bfloat16"):
    ftpu.flash_attention_fwd(x, x, x, fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=pos, kv_pos=pos,
                             kv_len=T, scale=0.3, block_q=8, block_kv=8, interpret=True)


# ------------------------------------------------------ 5. tables_from_lists out-of-range ids
@pytest.mark.parametrize("bad", [5, 2, -1])
def test_tables_from_lists_rejects_out_of_range_ids(bad):
  blocks = np.array([[[[0, 1], [1, bad]]]], np.int32)
  counts = np.array([[[2, 2]]], np.int32)
  with pytest.raises(ValueError, match=rf"kv_blocks\[0, 0, 1, 1\] = {bad} .*query block 1.*"
                                       r"\[0, num_kv_blocks=2\)"):
    common.tables_from_lists(blocks, counts, num_kv_blocks=2)
  with pytest.raises(ValueError, match="query block 1"):
    common.tables_from_lists(jnp.asarray(blocks), jnp.asarray(counts), num_kv_blocks=2)


def test_tables_from_lists_ignores_entries_past_counts_and_runs_under_jit():
  blocks = np.array([[[[0, 7], [1, 0]]]], np.int32)   # 7 is past row 0's count
  counts = np.array([[[1, 2]]], np.int32)
  fwd, _ = common.tables_from_lists(blocks, counts, num_kv_blocks=2)
  np.testing.assert_array_equal(np.asarray(fwd.counts), [[[1, 2]]])
  traced = jax.jit(lambda b, c: common.tables_from_lists(b, c, 2)[0].counts)(blocks, counts)
  np.testing.assert_array_equal(np.asarray(traced), [[[1, 2]]])


# ------------------------------------------------------------------ 6. argument checks
def _decode_args():
  rng = np.random.default_rng(7)
  return rand(rng, 2, 1, 4, 8), rand(rng, 2, 32, 2, 8), jnp.asarray([5, 32], jnp.int32)


def test_decode_traced_scale_raises_clearly():
  q, kv, L = _decode_args()
  with pytest.raises(ValueError, match="scale must be a static Python float"):
    jax.jit(lambda s: decode_attention(q, kv, kv, L, scale=s, interpret=True))(0.3)


@pytest.mark.parametrize("softcap", [True, "2.0", float("inf"), 0.0, -1.0])
def test_decode_softcap_must_be_a_positive_real(softcap):
  q, kv, L = _decode_args()
  with pytest.raises(ValueError, match="softcap must be None or a finite real number > 0"):
    decode_attention(q, kv, kv, L, softcap=softcap, interpret=True)


def test_decode_numpy_scale_and_softcap_accepted():
  """numpy scalars are static numbers: accepted, and the result equals float64."""
  q, kv, L = _decode_args()
  out = decode_attention(q, kv, kv, L, scale=np.float32(0.3), softcap=np.float64(2.0),
                         interpret=True, block_kv=16)
  qn, kn = np.asarray(q, np.float64), np.asarray(kv, np.float64)
  kr = np.repeat(kn, 2, axis=2)
  s = np.einsum("bthd,bshd->bhts", qn, kr) * np.float64(np.float32(0.3))
  s = 2.0 * np.tanh(s / 2.0)
  s = np.where(np.arange(32)[None, None, None, :] < np.asarray(L)[:, None, None, None], s,
               -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhts,bshd->bthd", p, kr), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mod", [ftpu, fgpu], ids=["tpu", "gpu"])
def test_flash_kernels_reject_non_bool_interpret(mod):
  T = 16
  x = jnp.ones((1, 1, T, 8), jnp.float32)
  pos = np.arange(T, dtype=np.int32)[None]
  fwd_t, dkv_t = common.tables_from_block_map(np.ones((2, 2), np.int8))
  with pytest.raises(ValueError, match="interpret must be None, True.*'yes'"):
    mod.flash_attention_fwd(x, x, x, fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=pos, kv_pos=pos,
                            kv_len=T, scale=0.3, block_q=8, block_kv=8, interpret="yes")


@pytest.mark.parametrize("kw,match", [
    (dict(platform="tpu", segment_skip="no"), "segment_skip must be a bool"),
    (dict(platform="gpu", segment_skip=0), "segment_skip must be a bool"),
    (dict(platform="tpu", interpret="yes"), "interpret must be None, True, False or a pltpu"),
    (dict(platform="gpu", interpret=1), "interpret must be None, True, False, got 1"),
])
def test_backend_flag_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    PallasBackend(**kw)


# ---------------------------------------------------- 8. SMEM budget: split pallas_calls
def test_plan_keeps_tables_under_budget():
  """The review's case (B=16, T=8192, 128 x 128 tiles, causal, per-example tables: ~530 KB of
  tables) is split over groups of examples, each under the budget; per-head tables of a long
  sequence are split over kv heads and then rows; the parts are equal (balanced: 6+6+6 over 16
  examples, not 7+7+2) and tile the grid exactly once (the last may reach into padding)."""
  cases = [((16, 1, 64), 16, 8, 1, 64, smem.SMEM_TABLE_BUDGET),      # (geom, B, Hkv, G, rows, .)
           ((1, 4, 1024), 2, 2, 2, 1024, smem.SMEM_TABLE_BUDGET),
           ((3, 4, 3), 3, 2, 2, 5, 100)]
  for geom, B, Hkv, G, n_rows, budget in cases:
    assert smem.table_bytes(geom, G, B, Hkv, n_rows) > budget
    p_ = smem.plan(geom, B, Hkv, G, n_rows, budget)
    parts = p_.parts
    assert len(parts) == p_.n and p_.pb * p_.nb - B < p_.nb and p_.pr * p_.nr - n_rows < p_.nr
    covered = np.zeros((B, Hkv, n_rows), int)
    for p in parts:
      covered[p.b0:p.b0 + p.nb, p.h0:p.h0 + p.nh, p.r0:p.r0 + p.nr] += 1
      assert smem.table_bytes(geom, G, p.nb, p.nh, p.nr) <= budget
    assert np.all(covered == 1)
  assert [p.b0 for p in smem.plan((16, 1, 64), 16, 8, 1, 64, 256 * 1024).parts] == [0, 6, 12]
  assert {p.nb for p in smem.plan((16, 1, 64), 16, 8, 1, 64, 256 * 1024).parts} == {6}


def _pallas_calls(f, *args):
  """(pallas_call equations, loops) in the jaxpr of ``f``: a split runs one pallas_call in a
  loop over its parts."""
  text = str(jax.make_jaxpr(f)(*args))
  return text.count("pallas_call"), text.count("scan[") + text.count("while[")


def test_split_calls_give_identical_numbers(monkeypatch):
  """pallas_tpu with segment ids (per-example tables), a per-head mask (per-head tables),
  sinks and a batch- and head-dependent low-rank bias: output, LSE and the gradients (q, k, v,
  sinks, bias factors) are bit-identical whether the tables go in one pallas_call per kernel or
  are split over example groups (uneven: 2 + 1), or over examples, kv heads and table rows (one
  row per call); and they equal float64."""
  rng = np.random.default_rng(8)
  B, T, Hq, Hkv, D, R = 3, 20, 4, 2, 8, 2
  q, k, v = rand(rng, B, T, Hq, D), rand(rng, B, T, Hkv, D), rand(rng, B, T, Hkv, D)
  u, w = rand(rng, B, T, Hq, R) * 0.5, rand(rng, B, T, Hq, R) * 0.5
  sinks = rand(rng, Hq)
  cot, cot_lse = rand(rng, B, T, Hq, D), rand(rng, B, T, Hq)
  seg = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
  mask = M.per_head([M.causal(), M.sliding_window(5, 0), M.causal(), M.sliding_window(3, 2)])
  be = PallasBackend("tpu", block_q=8, block_kv=8, interpret=True)

  def attn(q, k, v, s, u, w):
    return aj.attention(q, k, v, mask=mask, sinks=s, segment_ids=seg, impl=be,
                        score_mod=S.low_rank_bias(u, w), return_lse=True)

  g = jax.grad(loss(attn, cot, cot_lse), argnums=tuple(range(6)), has_aux=True)
  args = (q, k, v, sinks, u, w)
  runs, default = {}, smem.SMEM_TABLE_BUDGET
  for budget, n_fwd in ((default, 1), (700, 2), (1, B * Hkv * 3)):
    monkeypatch.setattr(smem, "SMEM_TABLE_BUDGET", budget)
    fwd_only = lambda *a: attn(*a)[0]
    assert _pallas_calls(fwd_only, *args) == (1, int(n_fwd > 1)), budget
    runs[budget] = jax.tree.map(np.asarray, jit_run(g, *args))
  base = runs[default]
  for budget, got in runs.items():
    jax.tree.map(np.testing.assert_array_equal, got, base)

  # float64 reference
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  per_head = [j <= i, (j <= i) & (j >= i - 5), j <= i, (j >= i - 3) & (j <= i + 2)]
  vis = np.stack(per_head)[None] & (seg[:, None, :, None] == seg[:, None, None, :])
  hm = lambda x: x.transpose(0, 2, 1, 3)

  def ref(q, k, v, s, u, w):
    bias = jnp.einsum("bihr,bjhr->bhij", u, w)
    o, l = reference(hm(q), hm(k), hm(v), vis, s, D ** -0.5, bias)
    return hm(o), l.transpose(0, 2, 1)
  grads, (out, lse) = base
  assert_matches((out, lse, grads), grads_f64(ref, args, cot, cot_lse))


def test_split_standalone_kernel_runtime_tables_nan_init(monkeypatch):
  """The standalone TPU kernel with per-example, per-head run-time tables (tables_from_lists,
  GQA) under the TPU interpreter with NaN-filled memory: split into one call per (example, kv
  head, row), every output entry is written and out, LSE and d{q,k,v} equal the single call
  bit for bit and float64."""
  from jax.experimental.pallas import tpu as pltpu
  rng = np.random.default_rng(10)
  B, Hq, Hkv, T, D, bq = 2, 2, 1, 16, 8, 8
  nq = T // bq
  q, k, v = rand(rng, B, Hq, T, D), rand(rng, B, Hkv, T, D), rand(rng, B, Hkv, T, D)
  cot, cot_lse = rand(rng, B, Hq, T, D), rand(rng, B, Hq, T)
  kvb = rng.integers(0, nq, (B, Hq, nq, 2)).astype(np.int32)
  kvc = rng.integers(0, 3, (B, Hq, nq)).astype(np.int32)
  pos = np.arange(T, dtype=np.int32)[None]
  mask_fn = lambda qp, kp, h: kp <= qp + 3

  def attn(q, k, v):
    fwd_t, dkv_t = common.tables_from_lists(kvb, kvc, nq)
    return ftpu.flash_attention(q, k, v, fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=pos,
                                kv_pos=pos, kv_len=T, scale=0.3, mask_fn=mask_fn, block_q=bq,
                                block_kv=bq,
                                interpret=pltpu.InterpretParams(uninitialized_memory="nan"))

  g = jax.grad(loss(attn, cot, cot_lse), argnums=(0, 1, 2), has_aux=True)
  runs = []
  for budget, n_calls in ((smem.SMEM_TABLE_BUDGET, 1), (1, B * Hkv * nq)):
    monkeypatch.setattr(smem, "SMEM_TABLE_BUDGET", budget)
    assert _pallas_calls(lambda *a: attn(*a)[0], q, k, v) == (1, int(n_calls > 1))
    runs.append(jax.tree.map(np.asarray, jit_run(g, q, k, v)))
  jax.tree.map(np.testing.assert_array_equal, runs[1], runs[0])
  bm = np.asarray(common.block_map_from_lists(kvb, kvc, nq)) != 0
  vis = np.repeat(np.repeat(bm, bq, -2), bq, -1) & (np.arange(T)[None, :] <= np.arange(T)[:, None]
                                                     + 3)
  want = grads_f64(lambda q, k, v: reference(q, k, v, vis, None, 0.3), (q, k, v), cot, cot_lse)
  grads, (out, lse) = runs[1]
  assert_matches((out, lse, grads), want)


# -------------------------------------------------------------- 9. decode cache padding
def test_decode_pads_cache_to_smallest_sufficient_size():
  assert dcommon.default_block_kv(37, 2, 64, "gpu", False) == 16          # 48 slots, not 64
  assert dcommon.default_block_kv(37, 2, 64, "tpu", True) == 8            # 40 slots
  assert dcommon.default_block_kv(300, 2, 64, "tpu", False) == 128        # 384 slots, not 512
  assert dcommon.default_block_kv(64, 2, 64, "gpu", False) == 64          # divides: unchanged
  assert dcommon.default_block_kv(100, 2, 64, "gpu", False) == 16         # 112; ties -> larger
  # a small relative padding keeps the large block (short grid): 1000 -> 1024 slots, block 128
  assert dcommon.default_block_kv(1000, 2, 64, "gpu", False) == 128
  assert dcommon.default_block_kv(1000, 2, 64, "tpu", False) == 512
  rng = np.random.default_rng(9)
  B, S, Hq, Hkv, D = 2, 37, 4, 2, 16
  q, k, v = rand(rng, B, 1, Hq, D), rand(rng, B, S, Hkv, D), rand(rng, B, S, Hkv, D)
  L = np.array([37, 20], np.int32)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    out, lse = decode_attention(q, k, v, jnp.asarray(L), platform="gpu", interpret=True,
                                return_lse=True)
  assert any(issubclass(r.category, CachePaddingWarning) and "padded to 48 slots" in
             str(r.message) for r in rec)
  qn, kn, vn = (np.repeat(np.asarray(x, np.float64), 2 if x is not q else 1, axis=2)
                for x in (q, k, v))
  s = np.einsum("bthd,bshd->bhts", qn, kn) / np.sqrt(D)
  s = np.where(np.arange(S)[None, None, None, :] < L[:, None, None, None], s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.exp(s - m)
  np.testing.assert_allclose(out, np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), vn),
                             rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(lse, (m[..., 0] + np.log(p.sum(-1))).transpose(0, 2, 1),
                             rtol=2e-5, atol=2e-5)


def test_platform_check_under_disable_jit_and_across_accelerators():
  """The platform check (pallas_kernels.platform) ran its eager impl through jax.jit, which under
  jax.disable_jit() re-entered the impl forever (RecursionError); and lowering a kernel for the
  *other* accelerator passed the check (a TPU kernel lowered for CUDA got Pallas' internal
  error). Now: the named ValueError in both cases; the kernel's own platform lowers."""
  from pallas_kernels import platform as plat  # pylint: disable=import-outside-toplevel
  x = jnp.arange(4.0)
  with jax.disable_jit():
    with pytest.raises(ValueError, match="interpret=False"):
      plat.require_platform(x, "tpu", "the TPU flash kernel")
  for kernel, lowering in (("tpu", "tpu"), ("gpu", "cuda")):   # its own platform: a no-op
    text = jax.jit(lambda x, k=kernel: plat.require_platform(x, k, "k") * 2).trace(x).lower(
        lowering_platforms=(lowering,)).as_text()
    assert "multiply" in text and "pallas_kernels_needs_platform" not in text
  with pytest.raises(ValueError, match=r"compiled for TPU \(Mosaic\), but it is being lowered "
                                       r"for cuda"):
    jax.jit(lambda x: plat.require_platform(x, "tpu", "k")).trace(x).lower(
        lowering_platforms=("cuda",))
  with pytest.raises(ValueError, match=r"compiled for GPU \(Triton\), but it is being lowered "
                                       r"for tpu"):
    jax.jit(lambda x: plat.require_platform(x, "gpu", "k")).trace(x).lower(
        lowering_platforms=("tpu",))


# ------------------------------------------- 8b. SMEM split: equal parts, one compiled kernel
def _split_case(rng, B, Hq, Hkv, Tq, Tk, kv_len, bs, runtime_tables):
  """Standalone-kernel inputs (head-major) exercising everything a part must get right: GQA,
  Tq != Tk, kv_len < Tk, per-example positions, segment ids, sinks (one -inf), a per-example
  per-head bias param and a score_fn that uses the global example/head indices; plus the
  float64 visibility and bias."""
  nq, nk = Tq // bs, Tk // bs
  q, k, v = rand(rng, B, Hq, Tq, 8), rand(rng, B, Hkv, Tk, 8), rand(rng, B, Hkv, Tk, 8)
  sinks = rand(rng, Hq).at[1].set(-jnp.inf)
  shift = rng.integers(-3, 4, (B, 1))
  q_pos = (np.arange(Tq)[None] + (Tk - Tq) + shift).astype(np.int32)
  kv_pos = np.broadcast_to(np.arange(Tk, dtype=np.int32), (B, Tk)).copy()
  qseg = np.sort(rng.integers(0, 2, (B, Tq)), axis=1).astype(np.int32)
  kseg = np.sort(rng.integers(0, 2, (B, Tk)), axis=1).astype(np.int32)
  bias = rand(rng, B, Hq, Tq, Tk) * 0.5
  if runtime_tables:
    kvb = rng.integers(0, nk, (B, Hq, nq, 3)).astype(np.int32)
    kvc = rng.integers(0, 4, (B, Hq, nq)).astype(np.int32)
    fwd_t, dkv_t = common.tables_from_lists(jnp.asarray(kvb), jnp.asarray(kvc), nk)
    bm = np.asarray(common.block_map_from_lists(kvb, kvc, nk)) != 0
  else:
    bm = np.asarray(M.causal().block_map(Tq, Tk, bs, bs)).reshape(1, 1, nq, nk)
    bm = np.minimum(bm, 1)   # PARTIAL only: the per-example shifted positions break FULL blocks
    fwd_t, dkv_t = common.tables_from_block_map(bm)
    bm = bm != 0
  vis = np.repeat(np.repeat(bm, bs, -2), bs, -1)
  vis = vis & (kv_pos[:, None, None, :] <= q_pos[:, None, :, None])
  vis = vis & (np.arange(Tk) < kv_len) & (qseg[:, None, :, None] == kseg[:, None, None, :])
  hb = np.arange(B)[:, None, None, None] * 0.1 - np.arange(Hq)[None, :, None, None] * 0.05
  kw = dict(fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=q_pos, kv_pos=kv_pos, kv_len=kv_len,
            scale=0.35, mask_fn=lambda qp, kp, h: kp <= qp, q_segment_ids=qseg,
            kv_segment_ids=kseg, score_params=(bias,),
            score_param_specs=(common.ParamSpec(0, 1, 2, 3),),
            score_fn=lambda t, s, b, h, qp, kp: s + t[0][0, 0] + 0.1 * b - 0.05 * h,
            block_q=bs, block_kv=bs)
  return (q, k, v, sinks), kw, vis, np.asarray(bias) + hb


@pytest.mark.parametrize("case", [
    # (B, Hq, Hkv, Tq, Tk, kv_len, runtime tables, budgets): per-example per-head tables split
    # over examples (5 = 3 + 3 - 1 padded), kv heads (3 = 2 + 2 - 1) and rows; broadcast
    # tables (MQA, Tq > Tk) split over rows only (3 + 3 + 3 - 1 ...).
    (5, 6, 3, 24, 40, 35, True, (2000, 600, 250, 1)),
    (3, 4, 1, 40, 24, 21, False, (60, 1)),
])
def test_split_uneven_parts_one_kernel_identical_numbers(monkeypatch, case):
  """Equal, padded parts: the split call has one pallas_call per kernel (in a loop), and out,
  LSE, dq, dk, dv and dsinks equal the unsplit call bit for bit and float64, for uneven
  example / kv-head / row splits, GQA, Tq != Tk and kv_len < Tk."""
  B, Hq, Hkv, Tq, Tk, kv_len, runtime, budgets = case
  rng = np.random.default_rng(21)
  args, kw, vis, bias = _split_case(rng, B, Hq, Hkv, Tq, Tk, kv_len, 8, runtime)
  cot, cot_lse = rand(rng, B, Hq, Tq, 8), rand(rng, B, Hq, Tq)
  attn = lambda q, k, v, s: ftpu.flash_attention(q, k, v, sinks=s, interpret=True, **kw)
  g = jax.grad(loss(attn, cot, cot_lse), argnums=(0, 1, 2, 3), has_aux=True)
  runs, pads = [], set()
  for budget in (smem.SMEM_TABLE_BUDGET,) + budgets:
    monkeypatch.setattr(smem, "SMEM_TABLE_BUDGET", budget)
    plans = [smem.plan(t.blocks.shape[:2] + t.blocks.shape[3:], B, Hkv, Hq // Hkv, rows,
                       budget) for t, rows in ((kw["fwd_tables"], Tq // 8),
                                               (kw["dkv_tables"], Tk // 8))]
    pads |= {n for p in plans for n in ("pad_b", "pad_h", "pad_r") if getattr(p, n)}
    assert _pallas_calls(lambda *a: attn(*a)[0], *args) == (1, int(plans[0].n > 1)), budget
    runs.append(jax.tree.map(np.asarray, jit_run(g, *args)))
  assert pads == ({"pad_b", "pad_h", "pad_r"} if runtime else {"pad_r"})
  for got in runs[1:]:
    jax.tree.map(np.testing.assert_array_equal, got, runs[0])
  want = grads_f64(lambda q, k, v, s: reference(q, k, v, vis, s, 0.35, bias), args, cot,
                   cot_lse)
  grads, (out, lse) = runs[-1]
  assert_matches((out, lse, grads), want)


def test_split_uneven_parts_nan_interpreter(monkeypatch):
  """Under the TPU interpreter with NaN-filled memory, padded parts (examples, kv heads, rows)
  leave no output unwritten and give the generic interpreter's numbers bit for bit."""
  from jax.experimental.pallas import tpu as pltpu
  rng = np.random.default_rng(22)
  B, Hq, Hkv, Tq, Tk = 3, 4, 2, 24, 16
  args, kw, _, _ = _split_case(rng, B, Hq, Hkv, Tq, Tk, 13, 8, True)
  cot, cot_lse = rand(rng, B, Hq, Tq, 8), rand(rng, B, Hq, Tq)
  pads = set()
  for budget in (100, 500):   # rows padded in the forward / dQ, examples in dK/dV
    monkeypatch.setattr(smem, "SMEM_TABLE_BUDGET", budget)
    for t, rows in ((kw["fwd_tables"], Tq // 8), (kw["dkv_tables"], Tk // 8)):
      p = smem.plan(t.blocks.shape[:2] + t.blocks.shape[3:], B, Hkv, Hq // Hkv, rows, budget)
      assert p.n > 1
      pads |= {n for n in ("pad_b", "pad_h", "pad_r") if getattr(p, n)}
    runs = []
    for interp in (True, pltpu.InterpretParams(uninitialized_memory="nan")):
      attn = lambda q, k, v, s, i=interp: ftpu.flash_attention(q, k, v, sinks=s, interpret=i,
                                                               **kw)
      g = jax.grad(loss(attn, cot, cot_lse), argnums=(0, 1, 2, 3), has_aux=True)
      runs.append(jax.tree.map(np.asarray, jit_run(g, *args)))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(runs[1][0]))
    jax.tree.map(np.testing.assert_array_equal, runs[1], runs[0])
  assert pads == {"pad_b", "pad_r"}


def test_split_lowers_to_one_mosaic_kernel_per_pass(monkeypatch):
  """A many-part split (per-example per-head run-time tables over examples, kv heads and rows)
  cross-lowers for TPU with exactly one Mosaic custom call per pass (forward, dQ, dK/dV)."""
  B, Hq, Hkv, T, D = 3, 4, 2, 512, 128
  nb = T // 128
  kvb = jnp.asarray(np.random.default_rng(23).integers(0, nb, (B, Hq, nb, 2)), jnp.int32)
  kvc = jnp.full((B, Hq, nb), 2, jnp.int32)
  pos = np.arange(T, dtype=np.int32)[None]

  def f(q, k, v, sinks):
    fwd_t, dkv_t = common.tables_from_lists(kvb, kvc, nb)
    o, l = ftpu.flash_attention(q, k, v, fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=pos,
                                kv_pos=pos, kv_len=T - 5, scale=0.1, sinks=sinks,
                                mask_fn=lambda qp, kp, h: kp <= qp, interpret=False)
    return o.astype(jnp.float32).sum() + l.sum()

  sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  args = (sds(B, Hq, T, D), sds(B, Hkv, T, D), sds(B, Hkv, T, D),
          jax.ShapeDtypeStruct((Hq,), jnp.float32))
  monkeypatch.setattr(smem, "SMEM_TABLE_BUDGET", 1)
  assert smem.plan((B, Hq, 2), B, Hkv, Hq // Hkv, nb, 1).n == B * Hkv * nb
  text = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))).trace(*args).lower(
      lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3
