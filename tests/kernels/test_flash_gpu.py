"""GPU (Triton-lowered) block-sparse flash attention, run in Pallas interpret mode on CPU.

On a GPU host, ``PALLAS_GPU_COMPILED=1`` runs the same cases on the compiled kernels instead
(``interpret=None``: compiled when the default backend is a GPU).

Every case compares the kernel's forward (out, lse) and backward (dq, dk, dv, dsinks; random
cotangents on out and lse) with an independent float64 dense reference written here: logits are
materialized, ``mask_fn`` is evaluated on full index grids, then segment ids, key padding, sinks
and a NaN-free softmax. Block maps for the kernels' tables are computed from the dense mask at the
kernel's block sizes.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.flash import common, gpu
from pallas_kernels.flash.common import ParamSpec

BQ = BK = 16
INTERPRET = None if os.environ.get("PALLAS_GPU_COMPILED") == "1" else True


# ----------------------------------------------------------------------------- masks, score mods


def causal(qp, kp, h):
  return qp >= kp


def window(left, right):
  return lambda qp, kp, h: (kp >= qp - left) & (kp <= qp + right)


def per_head(qp, kp, h):  # head 0 causal, other heads a symmetric window of 8
  return jnp.where(h == 0, qp >= kp, (kp >= qp - 8) & (kp <= qp + 8))


def neighborhood_8x8(qp, kp, h):  # tokens on an 8x8 grid, 3x3 neighbourhood
  return (jnp.abs(qp // 8 - kp // 8) <= 1) & (jnp.abs(qp % 8 - kp % 8) <= 1)


def late_start(qp, kp, h):  # queries 0..19 see nothing: empty rows and an empty query block
  return kp <= qp - 20


def softcap(params, s, b, h, qp, kp):
  return 5.0 * jnp.tanh(s / 5.0)


def alibi(params, s, b, h, qp, kp):
  (slope,) = params  # tile [1]
  return s - slope[0] * jnp.abs(qp - kp).astype(jnp.float32)


def low_rank(params, s, b, h, qp, kp):
  u, w = params  # tiles [1, bq, 1, R], [1, bk, 1, R]
  return s + jnp.einsum("qr,kr->qk", u[0, :, 0, :], w[0, :, 0, :],
                       precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- reference


def dense_mask(mask_fn, q_pos, kv_pos, hq):
  """bool [Bp, Hq, Tq, Tk] from mask_fn on full index grids (True everywhere if None)."""
  bp = max(q_pos.shape[0], kv_pos.shape[0])
  qp = np.broadcast_to(q_pos, (bp, q_pos.shape[1]))
  kp = np.broadcast_to(kv_pos, (bp, kv_pos.shape[1]))
  if mask_fn is None:
    return np.ones((bp, hq, qp.shape[1], kp.shape[1]), bool)
  return np.stack([np.stack([np.asarray(mask_fn(jnp.asarray(qp[b])[:, None],
                                                 jnp.asarray(kp[b])[None, :], h))
                             for h in range(hq)]) for b in range(bp)])


def block_map(mask, bq=BQ, bk=BK):
  *lead, tq, tk = mask.shape
  m = mask.reshape(*lead, tq // bq, bq, tk // bk, bk)
  anyv, allv = m.any(axis=(-3, -1)), m.all(axis=(-3, -1))
  return np.where(allv, common.FULL, np.where(anyv, common.PARTIAL, common.EMPTY)).astype(np.int8)


def _cut(p, spec, b, h):
  idx = [slice(None)] * p.ndim
  if spec.batch_axis is not None:
    bb = b if p.shape[spec.batch_axis] > 1 else 0
    idx[spec.batch_axis] = slice(bb, bb + 1)
  if spec.head_axis is not None:
    hh = h if p.shape[spec.head_axis] > 1 else 0
    idx[spec.head_axis] = slice(hh, hh + 1)
  return p[tuple(idx)]


def reference(q, k, v, sinks, *, mask, scale, kv_len, q_pos, kv_pos, score_fn=None,
              params=(), specs=(), q_seg=None, kv_seg=None):
  """Float64 dense attention on [B, H, T, D]; mask bool broadcastable to [B, Hq, Tq, Tk]."""
  B, Hq, Tq, _ = q.shape
  Tk = k.shape[2]
  G = Hq // k.shape[1]
  k, v = jnp.repeat(k, G, axis=1), jnp.repeat(v, G, axis=1)
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
  if score_fn is not None:
    qp = np.broadcast_to(q_pos, (B, Tq))
    kp = np.broadcast_to(kv_pos, (B, Tk))
    s = jnp.stack([jnp.stack([
        score_fn(tuple(_cut(p, sp, b, h) for p, sp in zip(params, specs)), s[b, h], b, h,
                 jnp.asarray(qp[b])[:, None], jnp.asarray(kp[b])[None, :])
        for h in range(Hq)]) for b in range(B)])
  vis = np.broadcast_to(mask, s.shape) & (np.arange(Tk) < kv_len)
  if q_seg is not None:
    vis = vis & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
  m = jnp.max(jnp.where(vis, s, -jnp.inf), axis=-1)
  if sinks is not None:
    m = jnp.maximum(m, sinks[None, :, None])
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(vis, jnp.exp(s - m[..., None]), 0.0)
  den = e.sum(-1)
  if sinks is not None:
    den = den + jnp.exp(sinks[None, :, None] - m)
  den_safe = jnp.where(den > 0, den, 1.0)
  out = jnp.einsum("bhqk,bhkd->bhqd", e / den_safe[..., None], v)
  lse = jnp.where(den > 0, m + jnp.log(den_safe), -jnp.inf)
  return out, lse


# ----------------------------------------------------------------------------- harness


def ref_vjp(fn, args, cotangents):
  """Float64 outputs and input gradients of ``fn`` (jit-compiled: one compile, not one per op)."""
  with jax.enable_x64(True):
    def go(args, cts):
      outs, vjp = jax.vjp(fn, *args)
      return outs, vjp(cts)
    to64 = lambda a: None if a is None else jnp.asarray(a, jnp.float64)
    (out, lse), grads = jax.jit(go)(tuple(map(to64, args)), tuple(map(to64, cotangents)))
    return jax.tree.map(np.asarray, (out, lse, grads))


def rel_err(x, ref):
  """max |x - ref| / max |ref| over finite entries; inf if the -inf patterns differ."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  fin = np.isfinite(ref)
  if not np.array_equal(np.isfinite(x), fin):
    return np.inf
  x, ref = np.where(fin, x, 0), np.where(fin, ref, 0)
  return np.abs(np.where(fin, x - ref, 0)).max() / max(np.abs(np.where(fin, ref, 0)).max(), 1e-6)


def rel_rms(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  fin = np.isfinite(ref)
  if not np.array_equal(np.isfinite(x), fin):
    return np.inf
  d = np.where(fin, x, 0) - np.where(fin, ref, 0)
  return np.sqrt(np.mean(d ** 2)) / max(np.sqrt(np.mean(np.where(fin, ref, 0) ** 2)), 1e-12)


def run_case(seed, *, B=2, Hq=2, Hkv=None, Tq=32, Tk=None, D=16, Dv=None, mask_fn=None,
             kv_len=None, q_pos=None, seg=False, sinks=False, score_fn=None, params=(), specs=(),
             dtype=jnp.float32, qscale=1.0):
  rng = np.random.default_rng(seed)
  Hkv = Hkv or Hq
  Tk = Tk or Tq
  Dv = Dv or D
  kv_len = Tk if kv_len is None else kv_len
  q_pos = np.arange(Tq, dtype=np.int32)[None] if q_pos is None else q_pos
  kv_pos = np.arange(Tk, dtype=np.int32)[None]
  q = rng.standard_normal((B, Hq, Tq, D)) * qscale
  k = rng.standard_normal((B, Hkv, Tk, D))
  v = rng.standard_normal((B, Hkv, Tk, Dv))
  sk = rng.standard_normal(Hq) if sinks else None
  q_seg = kv_seg = None
  if seg:
    q_seg = np.sort(rng.integers(0, 3, (B, Tq)), axis=-1).astype(np.int32)
    kv_seg = q_seg if Tq == Tk else np.sort(rng.integers(0, 3, (B, Tk)), axis=-1).astype(np.int32)
  mask = dense_mask(mask_fn, q_pos, kv_pos, Hq)  # [Bp, Hq, Tq, Tk]
  bm = block_map(mask & (np.arange(Tk) < kv_len))  # [Bt = Bp, Hq, nq, nk]
  if mask_fn is not per_head:
    bm = bm[:, :1]  # head-independent masks give Ht = 1 tables
  ft, dt = common.tables_from_block_map(bm)
  scale = D ** -0.5
  kw = dict(fwd_tables=ft, dkv_tables=dt, q_pos=q_pos, kv_pos=kv_pos, kv_len=kv_len, scale=scale,
            mask_fn=mask_fn, score_fn=score_fn, score_params=tuple(jnp.asarray(p, jnp.float32)
                                                                   for p in params),
            score_param_specs=specs, q_segment_ids=q_seg, kv_segment_ids=kv_seg, block_q=BQ,
            block_kv=BK, interpret=INTERPRET)
  do = rng.standard_normal((B, Hq, Tq, Dv))
  dlse = rng.standard_normal((B, Hq, Tq))

  @jax.jit
  def kernel_vjp(q, k, v, sk, do, dlse):
    f = lambda q, k, v, sk: gpu.flash_attention(q, k, v, sinks=sk, **kw)
    outs, vjp = jax.vjp(f, q, k, v, sk)
    return outs, vjp((do, dlse))

  args = [jnp.asarray(a, dtype) for a in (q, k, v)] + [None if sk is None else
                                                       jnp.asarray(sk, jnp.float32)]
  (out, lse), grads = kernel_vjp(*args, jnp.asarray(do, dtype), jnp.asarray(dlse, jnp.float32))
  assert out.dtype == dtype and out.shape == (B, Hq, Tq, Dv)
  assert lse.dtype == jnp.float32 and lse.shape == (B, Hq, Tq)

  def ref(q, k, v, sk):
    return reference(q, k, v, sk, mask=mask, scale=scale, kv_len=kv_len, q_pos=q_pos,
                     kv_pos=kv_pos, score_fn=score_fn, params=tuple(jnp.asarray(p) for p in params),
                     specs=specs, q_seg=q_seg, kv_seg=kv_seg)

  r_out, r_lse, r_grads = ref_vjp(ref, (q, k, v, sk), (do, dlse))

  names = ["out", "lse", "dq", "dk", "dv", "dsinks"]
  got = [out, lse, *grads]
  want = [r_out, r_lse, *r_grads]
  for name, g, w in zip(names, got, want):
    if w is None:
      assert g is None, name
      continue
    assert np.all(np.isfinite(np.asarray(g, np.float32)) | np.isneginf(w)), f"{name} not finite"
    if dtype == jnp.float32:
      err = rel_err(g, w)
      assert err < 1e-4, f"{name}: max relative error {err:.2e}"
    else:
      err = rel_rms(g, w)
      assert err < 3e-2, f"{name}: relative RMS error {err:.2e}"
  return out, lse


# ----------------------------------------------------------------------------- cases


def softcap_alibi(params, s, b, h, qp, kp):
  return softcap((), alibi(params, s, b, h, qp, kp), b, h, qp, kp)


# Features are combined so that the file compiles few interpret-mode kernels; each feature is
# still covered by at least one case.
CASES = {
    "full_dv32": dict(B=1, Dv=32),
    "causal_segment_ids": dict(mask_fn=causal, seg=True),
    "sliding_window_sinks": dict(Tq=64, mask_fn=window(12, 3), sinks=True),
    "per_head_mask": dict(mask_fn=per_head),
    "softcap_alibi_head_param": dict(
        B=1, Hq=2, mask_fn=causal, score_fn=softcap_alibi, qscale=3.0,
        params=(np.array([0.3, 0.1]),), specs=(ParamSpec(head_axis=0),)),
    "gqa_4_2_dv24_padded": dict(Hq=4, Hkv=2, B=1, Dv=24, mask_fn=causal),
    "gqa_4_1_per_head": dict(Hq=4, Hkv=1, B=1, mask_fn=per_head),
    # bottom-right causal through per-example query positions (Bp = B, so tables have Bt = B)
    "cross_kv_padding": dict(Tq=32, Tk=64, kv_len=40, mask_fn=causal,
                             q_pos=np.arange(32, dtype=np.int32) + np.array([[8], [-4]])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
  run_case(list(CASES).index(name) + 100, **CASES[name])


def test_low_rank_bias_q_and_kv_tiled_params():
  rng = np.random.default_rng(7)
  B, Hq, T, R = 2, 2, 32, 4
  u = rng.standard_normal((B, T, Hq, R)) * 0.5
  w = rng.standard_normal((B, T, Hq, R)) * 0.5
  run_case(8, B=B, Hq=Hq, mask_fn=causal, score_fn=low_rank, params=(u, w),
           specs=(ParamSpec(0, 2, 1, None), ParamSpec(0, 2, None, 1)))


def test_empty_rows_give_zero_and_neg_inf():
  out, lse = run_case(11, mask_fn=late_start)
  assert np.all(np.asarray(out)[..., :20, :] == 0)
  assert np.all(np.isneginf(np.asarray(lse)[..., :20]))
  assert np.all(np.isfinite(np.asarray(lse)[..., 20:]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_half_precision_relative_rms(dtype):
  run_case(12, mask_fn=causal, dtype=dtype, sinks=True)


def test_runtime_tables_under_jit():
  rng = np.random.default_rng(13)
  B, Hq, T, D, K = 2, 2, 64, 16, 2
  n = T // BQ
  blocks = rng.integers(0, n, (B, Hq, n, K)).astype(np.int32)
  counts = rng.integers(0, K + 1, (B, Hq, n)).astype(np.int32)
  q, k, v, do = (rng.standard_normal((B, Hq, T, D)) for _ in range(4))
  dlse = rng.standard_normal((B, Hq, T))
  pos = np.arange(T, dtype=np.int32)[None]

  @jax.jit
  def run(q, k, v, blocks, counts, do, dlse):
    ft, dt = common.tables_from_lists(blocks, counts, n)
    f = lambda q, k, v: gpu.flash_attention(
        q, k, v, fwd_tables=ft, dkv_tables=dt, q_pos=pos, kv_pos=pos, kv_len=T, scale=0.25,
        mask_fn=causal, block_q=BQ, block_kv=BK)  # interpret=None: True off GPU
    outs, vjp = jax.vjp(f, q, k, v)
    return outs, vjp((do, dlse))

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  (out, lse), grads = run(f32(q), f32(k), f32(v), blocks, counts, f32(do), f32(dlse))
  bm = np.asarray(common.block_map_from_lists(blocks, counts, n)) != 0  # [B, Hq, n, n]
  mask = np.repeat(np.repeat(bm, BQ, axis=-2), BK, axis=-1) & np.tril(np.ones((T, T), bool))
  ref = lambda q, k, v: reference(q, k, v, None, mask=mask, scale=0.25, kv_len=T, q_pos=pos,
                                  kv_pos=pos)
  r_out, r_lse, r_grads = ref_vjp(ref, (q, k, v), (do, dlse))
  for name, g, w in zip(["out", "lse", "dq", "dk", "dv"], [out, lse, *grads],
                        [r_out, r_lse, *r_grads]):
    assert rel_err(g, w) < 1e-4, name


def test_static_tables_reordered_on_host():
  """Static (numpy) block tables are put FULL first on the host, so the compiled program holds
  the reordered tables as constants (no sort on the device); run-time tables sort on device."""
  T = 64
  bm = block_map(np.tril(np.ones((T, T), bool)))
  q = jnp.zeros((1, 2, T, 16), jnp.float32)
  pos = np.arange(T, dtype=np.int32)[None]

  def prims(ft, dt):
    f = lambda q: gpu.flash_attention(q, q, q, fwd_tables=ft, dkv_tables=dt, q_pos=pos,
                                      kv_pos=pos, kv_len=T, scale=0.25, mask_fn=causal,
                                      block_q=BQ, block_kv=BK)
    return str(jax.make_jaxpr(jax.grad(lambda q: f(q)[0].sum()))(q))

  ft, dt = common.tables_from_block_map(bm)
  assert "sort" not in prims(ft, dt)
  jt = tuple(common.BlockTables(*(jnp.asarray(a) for a in t)) for t in (ft, dt))
  assert "sort" in prims(*jt)
  ordered = gpu._full_first(ft)
  for r in range(ft.counts.shape[2]):   # each row: its FULL blocks, then its PARTIAL ones
    n, nf = ft.counts[0, 0, r], ordered[2][0, 0, r]
    full = ft.blocks[0, 0, r, :n][ft.full[0, 0, r, :n] != 0]
    part = ft.blocks[0, 0, r, :n][ft.full[0, 0, r, :n] == 0]
    assert list(ordered[0][0, 0, r, :n]) == list(full) + list(part) and nf == len(full)


def three_patterns(qp, kp, h):  # head 0 causal, head 1 sliding window, head 2 2-D neighbourhood
  return jnp.where(h == 0, causal(qp, kp, h),
                   jnp.where(h == 1, window(16, 0)(qp, kp, h), neighborhood_8x8(qp, kp, h)))


def test_loop_visits_only_nonempty_blocks():
  """Executed loop iterations (a debug counter in each kernel) equal the non-empty blocks, for
  causal, sliding-window and 2-D neighbourhood masks (one per head; GQA Hq=3, Hkv=1 so the dk/dv
  kernel loops over the three heads)."""
  rng = np.random.default_rng(21)
  B, Hq, Hkv, T, D = 1, 3, 1, 64, 16
  pos = np.arange(T, dtype=np.int32)[None]
  bm = block_map(dense_mask(three_patterns, pos, pos, Hq)[0])  # [Hq, nq, nk]
  ft, dt = common.tables_from_block_map(bm)
  nonempty = bm != common.EMPTY
  assert np.all(nonempty.sum((-2, -1)) < bm[0].size)  # every pattern has blocks to skip
  q = jnp.asarray(rng.standard_normal((B, Hq, T, D)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, Hkv, T, D)), jnp.float32) for _ in range(2))
  do = jnp.asarray(rng.standard_normal((B, Hq, T, D)), jnp.float32)
  fwd, dq, dkv = jax.jit(lambda q, k, v, do: gpu._visit_counts(
      q, k, v, do, fwd_tables=ft, dkv_tables=dt, q_pos=pos, kv_pos=pos, kv_len=T,
      scale=0.25, mask_fn=three_patterns, block_q=BQ, block_kv=BK, interpret=INTERPRET))(q, k, v, do)
  per_row = nonempty.sum(-1)  # [Hq, nq]
  np.testing.assert_array_equal(np.asarray(fwd)[0], per_row)
  np.testing.assert_array_equal(np.asarray(dq)[0], per_row)
  np.testing.assert_array_equal(np.asarray(dkv)[0, 0], nonempty.sum((0, 1)))  # over heads, rows
  assert int(np.asarray(fwd).sum()) == int(nonempty.sum())


def test_full_blocks_skip_mask_fn():
  """A block flagged FULL really skips mask_fn: mislabelling causal blocks FULL changes the
  output, labelling them PARTIAL reproduces causal attention."""
  rng = np.random.default_rng(31)
  T = 32
  pos = np.arange(T, dtype=np.int32)[None]
  q, k, v = (jnp.asarray(rng.standard_normal((1, 1, T, 16)), jnp.float32) for _ in range(3))
  outs = []
  for flag in (common.FULL, common.PARTIAL):
    ft, dt = common.tables_from_block_map(np.full((2, 2), flag, np.int8))
    outs.append(gpu.flash_attention_fwd(q, k, v, fwd_tables=ft, dkv_tables=dt, q_pos=pos,
                                        kv_pos=pos, kv_len=T, scale=0.25, mask_fn=causal,
                                        block_q=BQ, block_kv=BK, interpret=INTERPRET)[0])
  with jax.enable_x64(True):  # float64, not TF32, on a GPU
    ref = np.asarray(reference(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)), None,
                               mask=np.tril(np.ones((T, T), bool)), scale=0.25, kv_len=T,
                               q_pos=pos, kv_pos=pos)[0])
  assert rel_err(outs[1], ref) < 1e-4
  assert rel_err(outs[0], ref) > 1e-2


def _kw(T=32, bq=16, bk=16, Tk=None, **over):
  Tk = Tk or T
  pos_q = np.arange(T, dtype=np.int32)[None]
  pos_k = np.arange(Tk, dtype=np.int32)[None]
  nq, nk = T // bq if T % bq == 0 else 1, Tk // bk if Tk % bk == 0 else 1
  ft, dt = common.tables_from_block_map(np.full((nq, nk), common.FULL, np.int8))
  kw = dict(fwd_tables=ft, dkv_tables=dt, q_pos=pos_q, kv_pos=pos_k, kv_len=Tk, scale=0.25,
            block_q=bq, block_kv=bk, interpret=INTERPRET)
  kw.update(over)
  return kw


@pytest.mark.parametrize("shapes,kw,match", [
    (((1, 2, 32, 16), (1, 2, 32, 16)), _kw(bq=12), "block_q must be a power of two"),
    (((1, 2, 32, 16), (1, 2, 32, 16)), _kw(bk=4), "block_kv must be a power of two >= (8|16)"),
    (((1, 2, 32, 16), (1, 2, 32, 16)), _kw(bq=8, interpret=False), "power of two >= 16"),
    (((1, 2, 40, 16), (1, 2, 40, 16)), _kw(T=40), "must divide the sequence length 40"),
    (((1, 2, 32, 16), (1, 2, 32, 16)), _kw(layout="bshd"), "layout must be"),
    (((1, 3, 32, 16), (1, 2, 32, 16)), _kw(), "multiple of kv heads"),
    (((1, 2, 32, 16), (1, 2, 32, 16)), _kw(kv_len=33), "kv_len"),
    (((1, 2, 32, 16), (1, 2, 32, 16)),
     dict(_kw(), fwd_tables=common.tables_from_block_map(np.ones((4, 4), np.int8))[0]),
     "fwd_tables"),
    (((1, 2, 32, 16), (1, 2, 32, 16)),
     dict(_kw(), dkv_tables=common.tables_from_block_map(np.ones((3, 2, 2), np.int8))[1]),
     "dkv_tables"),
    (((1, 2, 32, 16), (1, 2, 32, 16)), _kw(q_pos=np.zeros((1, 16), np.int32)), "q_pos"),
    (((1, 2, 32, 16), (1, 2, 32, 16)), _kw(sinks=jnp.zeros(3)), "sinks"),
    (((1, 2, 32, 16), (1, 2, 32, 16)), _kw(q_segment_ids=np.zeros((1, 32), np.int32)),
     "given together"),
    (((1, 2, 32, 16), (1, 2, 32, 16)),
     _kw(score_fn=alibi, score_params=(np.ones(3),), score_param_specs=(ParamSpec(head_axis=0),)),
     "head"),
], ids=["bq_not_pow2", "bk_too_small", "gpu_min_block", "not_dividing", "bad_layout", "heads",
        "kv_len", "fwd_table_shape", "dkv_table_heads", "q_pos_shape", "sinks_shape",
        "segment_ids_pair", "score_param_head_axis"])
def test_bad_arguments_raise(shapes, kw, match):
  (qs, ks) = shapes
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal(qs), jnp.float32)
  k = jnp.asarray(rng.standard_normal(ks), jnp.float32)
  with pytest.raises(ValueError, match=match):
    gpu.flash_attention(q, k, k, **kw)


def test_bthd_layout_matches_head_major():
  """layout="bthd" reads [B, T, H, D] in place: forward, LSE and every gradient equal the
  head-major call on transposed inputs (GQA, Dv != D, sinks, segment ids, a partial mask)."""
  rng = np.random.default_rng(3)
  B, Hq, Hkv, T, D, Dv = 2, 4, 2, 48, 16, 32
  pos = np.arange(T, dtype=np.int32)[None]
  mask = dense_mask(window(20, 0), pos, pos, Hq)
  ft, dt = common.tables_from_block_map(block_map(mask)[:, :1])
  seg = np.sort(rng.integers(0, 2, (B, T)), axis=-1).astype(np.int32)
  kw = dict(fwd_tables=ft, dkv_tables=dt, q_pos=pos, kv_pos=pos, kv_len=T, scale=0.3,
            mask_fn=window(20, 0), q_segment_ids=seg, kv_segment_ids=seg, block_q=BQ,
            block_kv=BK, interpret=INTERPRET)
  q = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, T, Hkv, Dv)), jnp.float32)
  sk = jnp.asarray(rng.standard_normal(Hq), jnp.float32)
  do = jnp.asarray(rng.standard_normal((B, T, Hq, Dv)), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((B, Hq, T)), jnp.float32)
  hm = lambda x: x.transpose(0, 2, 1, 3)

  def run(layout, q, k, v, do):
    f = lambda q, k, v, sk: gpu.flash_attention(q, k, v, sinks=sk, layout=layout, **kw)
    outs, vjp = jax.vjp(f, q, k, v, sk)
    return outs, vjp((do, dlse))

  (o1, l1), g1 = jax.jit(functools.partial(run, "bthd"))(q, k, v, do)
  (o2, l2), g2 = jax.jit(functools.partial(run, "bhtd"))(hm(q), hm(k), hm(v), hm(do))
  assert o1.shape == (B, T, Hq, Dv) and l1.shape == (B, Hq, T)
  np.testing.assert_allclose(o1, hm(o2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)
  for a, b in zip(g1[:3], g2[:3]):
    np.testing.assert_allclose(a, hm(b), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g1[3], g2[3], rtol=1e-5, atol=1e-5)
