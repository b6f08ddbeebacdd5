"""pallas_kernels.flash.tpu in interpret mode on CPU, against a float64 dense reference.

Every case draws fresh random inputs, computes ``out``, ``lse`` and the gradients (random
cotangents on both ``out`` and ``lse``) through ``flash_attention`` under ``jit``, and compares
them with a materialized float64 computation written here (mask evaluated on full index grids).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash import common
from pallas_kernels.flash import tpu as fa
from pallas_kernels.flash.common import ParamSpec

NAN_INIT = pltpu.InterpretParams(uninitialized_memory="nan")
# Interpret-mode programs are large and run once: cheap XLA compilation keeps the file fast.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_run(fn, *args):
  return jax.jit(fn).trace(*args).lower().compile(compiler_options=_FAST)(*args)


# ------------------------------------------------------------------------------------ helpers
def dense_mask(mask_fn, Hq, q_pos, kv_pos):
  """[Bp, Hq, Tq, Tk] bool from mask_fn on full index grids (numpy)."""
  out = []
  for b in range(q_pos.shape[0]):
    qp, kp = q_pos[b][:, None], kv_pos[b][None, :]
    out.append([np.broadcast_to(np.asarray(mask_fn(jnp.asarray(qp), jnp.asarray(kp),
                                                   jnp.int32(h))), (qp.shape[0], kp.shape[1]))
                for h in range(Hq)])
  return np.asarray(out, bool)


def block_map(vis, bq, bk):
  """[..., Tq, Tk] bool -> int8 [..., nq, nk] (0 empty / 1 partial / 2 full)."""
  *lead, Tq, Tk = vis.shape
  v = vis.reshape(*lead, Tq // bq, bq, Tk // bk, bk)
  anyv, allv = v.any(axis=(-3, -1)), v.all(axis=(-3, -1))
  return np.where(allv, 2, np.where(anyv, 1, 0)).astype(np.int8)


def expand(bm, bq, bk):
  return np.repeat(np.repeat(bm != 0, bq, axis=-2), bk, axis=-1)


def reference(q, k, v, sinks, vis, scale, score_dense=None):
  """float64 dense attention; vis [B|1, Hq|1, Tq, Tk] bool. Returns (out, lse)."""
  G = q.shape[1] // k.shape[1]
  k, v = jnp.repeat(k, G, axis=1), jnp.repeat(v, G, axis=1)
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
  if score_dense is not None:
    s = score_dense(s)
  vis = jnp.broadcast_to(jnp.asarray(vis), s.shape)
  s = jnp.where(vis, s, -jnp.inf)
  if sinks is not None:
    s = jnp.concatenate([s, jnp.broadcast_to(sinks[None, :, None, None], s.shape[:3] + (1,))], -1)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m)
  den = jnp.sum(e, -1, keepdims=True)
  p = e / jnp.where(den > 0, den, 1.0)
  lse = jnp.where(den[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(den > 0, den, 1.0))[..., 0],
                  -jnp.inf)
  out = jnp.einsum("bhqk,bhkd->bhqd", p[..., :v.shape[2]], v)
  return out, lse


def loss_fn(attn, cot, cot_lse):
  def f(q, k, v, sinks):
    out, lse = attn(q, k, v, sinks)
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * cot_lse
    return jnp.sum(out.astype(cot.dtype) * cot) + jnp.sum(lse_term), (out, lse)
  return f


def run_kernel(q, k, v, sinks, cot, cot_lse, **kw):
  attn = lambda q, k, v, s: fa.flash_attention(q, k, v, sinks=s, **kw)
  argnums = (0, 1, 2) + ((3,) if sinks is not None else ())
  g = jax.grad(loss_fn(attn, cot, cot_lse), argnums=argnums, has_aux=True)
  grads, (out, lse) = jit_run(g, q, k, v, sinks)
  return out, lse, grads


def run_reference(q, k, v, sinks, cot, cot_lse, vis, scale, score_dense=None):
  with jax.enable_x64(True):
    f64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
    attn = lambda q, k, v, s: reference(q, k, v, s, vis, scale, score_dense)
    argnums = (0, 1, 2) + ((3,) if sinks is not None else ())
    g = jax.grad(loss_fn(attn, f64(cot), f64(cot_lse)), argnums=argnums, has_aux=True)
    grads, (out, lse) = jit_run(g, f64(q), f64(k), f64(v), f64(sinks))
    return jax.tree.map(lambda x: np.asarray(x, np.float64), (out, lse, grads))


def rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30)


def check(got, want, bf16=False):
  (o, l, g), (o_r, l_r, g_r) = got, want
  o, l = np.asarray(o, np.float64), np.asarray(l, np.float64)
  np.testing.assert_array_equal(np.isneginf(l), np.isneginf(l_r))
  fin = np.isfinite(l_r)
  assert np.all(np.isfinite(o)) and all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in g)
  if bf16:
    assert rel_rms(o, o_r) < 2e-2
    assert np.max(np.abs(l[fin] - l_r[fin])) < 5e-2
    for name, a, b in zip("q k v sinks".split(), g, g_r):
      assert rel_rms(a, b) < 4e-2, name
  else:
    np.testing.assert_allclose(o, o_r, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l[fin], l_r[fin], rtol=1e-5, atol=1e-5)
    for name, a, b in zip("q k v sinks".split(), g, g_r):
      np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-4, atol=2e-4 *
                                 max(1.0, np.abs(b).max()), err_msg=f"d{name}")


def make_case(seed, B=2, Hq=2, Hkv=2, Tq=32, Tk=32, D=16, Dv=16, dtype=jnp.float32,
              sinks=False, q_mult=1.0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, Hq, Tq, D)) * q_mult
  k = rng.standard_normal((B, Hkv, Tk, D))
  v = rng.standard_normal((B, Hkv, Tk, Dv))
  cot = rng.standard_normal((B, Hq, Tq, Dv))
  cot_lse = rng.standard_normal((B, Hq, Tq))
  s = rng.standard_normal((Hq,)) if sinks else None
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v), None if s is None else jnp.asarray(s, jnp.float32),
          jnp.asarray(cot, jnp.float32), jnp.asarray(cot_lse, jnp.float32), rng)


def causal(qp, kp, h):
  return kp <= qp


def window(left, right):
  return lambda qp, kp, h: (kp >= qp - left) & (kp <= qp + right)


def positions(B, Tq, Tk):
  return (np.broadcast_to(np.arange(Tq, dtype=np.int32) + (Tk - Tq), (1, Tq)).copy(),
          np.arange(Tk, dtype=np.int32)[None])


def run_case(seed=0, *, mask_fn=None, bq=8, bk=8, kv_len=None, seg=False, score=None,
             per_head_tables=False, interpret=True, bf16=False, pad_in_tables=True, pos_shift=0,
             **shape):
  """Build a case, run kernel + reference, compare. ``score``: (score_fn, params, specs,
  dense(s, params) for the reference)."""
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  q, k, v, sinks, cot, cot_lse, rng = make_case(seed, dtype=dtype, **shape)
  B, Hq, Tq, _ = q.shape
  Tk = k.shape[2]
  kv_len = Tk if kv_len is None else kv_len
  qp, kp = positions(B, Tq, Tk)
  if pos_shift:  # per-example positions (Bp = B): query positions shift by pos_shift * b
    qp = qp + pos_shift * np.arange(B, dtype=np.int32)[:, None]
    kp = np.broadcast_to(kp, (B, Tk)).copy()
  vis = (dense_mask(mask_fn, Hq, qp, kp) if mask_fn is not None
         else np.ones((1, Hq, Tq, Tk), bool))
  vis = vis & (np.arange(Tk) < kv_len)
  if not per_head_tables and mask_fn is not None:
    assert np.all(vis == vis[:, :1]), "mask differs between heads: use per_head_tables"
  bm = block_map(vis if per_head_tables else vis[:, :1], bq, bk)
  if not pad_in_tables:  # FULL blocks that straddle kv_len: the kernel must still pad them
    bm = block_map(np.ones_like(vis[:, :1]), bq, bk)
  fwd_t, dkv_t = common.tables_from_block_map(bm)
  kw = dict(fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=qp, kv_pos=kp, kv_len=kv_len,
            scale=float(q.shape[-1]) ** -0.5, mask_fn=mask_fn, block_q=bq, block_kv=bk,
            interpret=interpret)
  full_vis = vis
  if seg:
    qs = np.sort(rng.integers(0, 3, (B, Tq)), axis=1).astype(np.int32)
    ks = np.sort(rng.integers(0, 3, (B, Tk)), axis=1).astype(np.int32)
    kw.update(q_segment_ids=qs, kv_segment_ids=ks)
    full_vis = full_vis & (qs[:, None, :, None] == ks[:, None, None, :])
  score_dense = None
  if score is not None:
    fn, params, specs, dense = score(rng, B, Hq, Tq, Tk)
    kw.update(score_fn=fn, score_params=tuple(jnp.asarray(p, jnp.float32) for p in params),
              score_param_specs=specs)
    score_dense = lambda s: dense(s, [jnp.asarray(p) for p in params], qp, kp)
  got = run_kernel(q, k, v, sinks, cot, cot_lse, **kw)
  want = run_reference(q, k, v, sinks, cot, cot_lse, full_vis, kw["scale"], score_dense)
  check(got, want, bf16=bf16)
  return got, want, kw


# -------------------------------------------------------------------------------- test cases
def test_full():
  run_case(0, bq=8, bk=16, B=1)


def test_causal():
  run_case(1, mask_fn=causal, bq=8, bk=8)


def test_sliding_window():
  run_case(2, mask_fn=window(6, 3), bq=8, bk=8, B=1)


def test_per_head_mask_gqa():
  # a different mask per global query head (tables with Ht = Hq), two query heads per kv head
  def fn(qp, kp, h):
    return jnp.where(h == 0, kp <= qp, jnp.where(h == 1, (kp >= qp - 4) & (kp <= qp),
                                                 jnp.where(h == 2, kp >= qp, kp <= qp - 20)))
  run_case(3, mask_fn=fn, per_head_tables=True, B=1, Hq=4, Hkv=2)


def test_segment_ids_and_sinks():
  # independent random q / kv segment ids: some rows see no key, so lse = sink there
  # per-example positions give per-example block maps: tables with Bt = B
  run_case(4, mask_fn=causal, seg=True, sinks=True, pos_shift=-5)


def test_softcap_over_alibi_head_param_gqa():
  def score(rng, B, Hq, Tq, Tk):
    slopes = rng.uniform(0.1, 1.0, (Hq,))
    fn = lambda t, s, b, h, qp, kp: 5.0 * jnp.tanh((s + t[0][0] * (kp - qp).astype(
        jnp.float32)) / 5.0)
    dense = lambda s, P, qp, kp: 5.0 * jnp.tanh(
        (s + P[0][None, :, None, None] * (kp[0][None, :] - qp[0][:, None])) / 5.0)
    return fn, (slopes,), (ParamSpec(head_axis=0),), dense
  run_case(7, mask_fn=causal, score=score, Hq=4, Hkv=2, B=1, q_mult=4.0)


def test_lowrank_q_kv_params():
  R = 4

  def score(rng, B, Hq, Tq, Tk):
    u = rng.standard_normal((B, Tq, Hq, R)) * 0.5
    w = rng.standard_normal((B, Tk, Hq, R)) * 0.5
    fn = lambda t, s, b, h, qp, kp: s + jax.lax.dot_general(
        t[0][0, :, 0, :], t[1][0, :, 0, :], (((1,), (1,)), ((), ())))
    dense = lambda s, P, qp, kp: s + jnp.einsum("bqhr,bkhr->bhqk", P[0], P[1])
    return fn, (u, w), (ParamSpec(batch_axis=0, q_axis=1, head_axis=2),
                        ParamSpec(batch_axis=0, kv_axis=1, head_axis=2)), dense
  run_case(8, mask_fn=window(8, 8), score=score, bq=8, bk=16)


def test_dense_bias_direct_block_and_batch_arg():
  def score(rng, B, Hq, Tq, Tk):
    bias = rng.standard_normal((1, Hq, Tq, Tk))
    fn = lambda t, s, b, h, qp, kp: s + t[0][0, 0] + 0.1 * b.astype(jnp.float32)
    dense = lambda s, P, qp, kp: s + P[0] + 0.1 * jnp.arange(s.shape[0])[:, None, None, None]
    return fn, (bias,), (ParamSpec(batch_axis=0, head_axis=1, q_axis=2, kv_axis=3),), dense
  spec = fa._prep_param(jnp.zeros((1, 2, 32, 32)), ParamSpec(0, 1, 2, 3), 0, 2, 2, 32, 32, 8,
                        8, 8)[1]
  assert spec.perm is None  # direct BlockSpec, no wrapper transpose
  run_case(9, mask_fn=causal, score=score, Hq=1, Hkv=1)


@pytest.mark.parametrize("Hkv", [2, 1])
def test_gqa_dv(Hkv):
  run_case(10 + Hkv, mask_fn=causal if Hkv == 2 else window(5, 2), Hq=4, Hkv=Hkv, D=16, Dv=8,
           B=1)


def test_cross_with_kv_padding():
  run_case(13, mask_fn=causal, Tq=16, Tk=48, kv_len=37, bq=8, bk=16, B=1)


def test_full_blocks_straddling_kv_len_are_padded():
  run_case(14, Tq=16, Tk=48, kv_len=41, bq=8, bk=16, pad_in_tables=False, B=1)


def test_empty_rows_nan_init():
  fn = lambda qp, kp, h: kp < qp - 8   # rows 0..8 see nothing; query block 0 is empty
  (o, l, g), _, _ = run_case(15, mask_fn=fn, B=1, Hq=2, Hkv=1, interpret=NAN_INIT, bq=8, bk=16)
  assert np.all(np.isneginf(np.asarray(l)[:, :, :9])) and np.all(np.asarray(o)[:, :, :9] == 0)
  assert np.all(np.asarray(g[0])[:, :, :9] == 0)


def test_bfloat16():
  run_case(17, mask_fn=causal, Hq=4, Hkv=2, bf16=True, B=1)


def test_runtime_tables_under_jit_nan_init():
  interpret = NAN_INIT
  B, Hq, T, bq = 1, 2, 32, 16
  nq = T // bq
  q, k, v, _, cot, cot_lse, rng = make_case(18, B=B, Hq=Hq, Hkv=1, Tq=T, Tk=T)
  kvb = rng.integers(0, nq, (B, Hq, nq, 2)).astype(np.int32)
  kvc = rng.integers(0, 3, (B, Hq, nq)).astype(np.int32)
  kvc[0, 0, 0] = 0  # an empty row
  qp, kp = positions(B, T, T)
  scale = 0.25

  def attn(q, k, v, s, kvb, kvc):
    fwd_t, dkv_t = common.tables_from_lists(kvb, kvc, nq)
    return fa.flash_attention(q, k, v, fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=qp, kv_pos=kp,
                              kv_len=T, scale=scale, mask_fn=window(12, 12), block_q=bq,
                              block_kv=bq, interpret=interpret)

  g = lambda q, k, v, kvb, kvc: jax.grad(
      loss_fn(lambda *a: attn(*a, kvb, kvc), cot, cot_lse), argnums=(0, 1, 2),
      has_aux=True)(q, k, v, None)
  got = jit_run(g, q, k, v, jnp.asarray(kvb), jnp.asarray(kvc))  # tables built under jit
  got = (got[1][0], got[1][1], got[0])
  bm = np.asarray(common.block_map_from_lists(kvb, kvc, nq))
  vis = expand(bm, bq, bq) & dense_mask(window(12, 12), Hq, qp, kp)
  want = run_reference(q, k, v, None, cot, cot_lse, vis, scale)
  check(got, want)
  assert np.all(np.isneginf(np.asarray(got[1])[0, 0, :bq]))


def neighborhood_2d(W, r):
  def fn(qp, kp, h):
    return (jnp.abs(qp // W - kp // W) <= r) & (jnp.abs(qp % W - kp % W) <= r)
  return fn


@pytest.mark.parametrize("name,mask_fn,T,bq,bk", [
    ("causal", causal, 64, 8, 8),
    ("window", window(9, 0), 64, 8, 16),
    ("neighborhood2d", neighborhood_2d(8, 1), 64, 16, 8),
])
def test_block_skipping_counts(name, mask_fn, T, bq, bk):
  q, k, v, *_ = make_case(19, B=1, Hq=2, Hkv=1, Tq=T, Tk=T, D=8, Dv=8)
  qp, kp = positions(1, T, T)
  bm = block_map(dense_mask(mask_fn, 1, qp, kp), bq, bk)
  assert 0 < (bm != 0).sum() < bm.size
  fwd_t, dkv_t = common.tables_from_block_map(bm)
  c_fwd, c_dq, c_dkv = jit_run(lambda q, k, v: fa._visit_counts(
      q, k, v, fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=qp, kv_pos=kp, kv_len=T, scale=0.3,
      mask_fn=mask_fn, block_q=bq, block_kv=bk, interpret=True), q, k, v)
  per_row, per_col = (bm[0, 0] != 0).sum(-1), (bm[0, 0] != 0).sum(-2)
  np.testing.assert_array_equal(np.asarray(c_fwd), np.broadcast_to(per_row, c_fwd.shape))
  np.testing.assert_array_equal(np.asarray(c_dq), np.broadcast_to(per_row, c_dq.shape))
  np.testing.assert_array_equal(np.asarray(c_dkv), np.broadcast_to(per_col, c_dkv.shape))
  assert int(np.asarray(c_fwd).sum()) == 2 * (bm != 0).sum()


def test_lowers_to_mosaic_for_tpu():
  """Cross-lower forward + backward for TPU (interpret=False, 128-blocks, bf16) on CPU: runs the
  Pallas -> Mosaic lowering of all three kernels (no TPU compile, so layouts are unchecked)."""
  B, Hq, Hkv, T, D, R = 1, 4, 2, 256, 128, 8
  qp, kp = positions(1, T, T)
  bm = block_map(dense_mask(causal, 1, qp, kp), 128, 128)
  fwd_t, dkv_t = common.tables_from_block_map(bm)
  lowrank = lambda t, s, b, h, qp, kp: s + t[0][0] * (kp - qp).astype(jnp.float32) + \
      jax.lax.dot_general(t[1][0, :, 0, :], t[2][0, :, 0, :], (((1,), (1,)), ((), ())))
  kw = dict(fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=qp, kv_pos=kp, kv_len=T - 3, scale=0.1,
            mask_fn=causal, score_fn=lowrank, q_segment_ids=jnp.zeros((B, T), jnp.int32),
            kv_segment_ids=jnp.zeros((B, T), jnp.int32), interpret=False,
            score_params=(jnp.ones((Hq,)), jnp.ones((B, T, Hq, R)), jnp.ones((B, T, Hq, R))),
            score_param_specs=(ParamSpec(head_axis=0), ParamSpec(0, 2, 1), ParamSpec(0, 2,
                                                                                      None, 1)))

  def f(q, k, v, sinks):
    o, l = fa.flash_attention(q, k, v, sinks=sinks, **kw)
    return o.astype(jnp.float32).sum() + l.sum()

  sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  exp = jax.export.export(jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))), platforms=["tpu"])(
      sds(B, Hq, T, D), sds(B, Hkv, T, D), sds(B, Hkv, T, 64),
      jax.ShapeDtypeStruct((Hq,), jnp.float32))
  assert exp.mlir_module().count("tpu_custom_call") == 3


# ------------------------------------------------------------------------------------- errors
def _err_kwargs(**over):
  B, H, T = 1, 2, 32
  q = jnp.ones((B, H, T, 8))
  bm = np.full((1, 1, 4, 4), 2, np.int8)
  fwd_t, dkv_t = common.tables_from_block_map(bm)
  qp, kp = positions(B, T, T)
  kw = dict(q=q, k=q, v=q, fwd_tables=fwd_t, dkv_tables=dkv_t, q_pos=qp, kv_pos=kp, kv_len=T,
            scale=0.3, block_q=8, block_kv=8, interpret=True)
  kw.update(over)
  return kw


@pytest.mark.parametrize("over,match", [
    (dict(block_q=12), "block_q"),
    (dict(block_kv=24), "block_kv=24 must divide"),
    (dict(block_q=64, interpret=False), "multiple of 128"),
    (dict(k=jnp.ones((1, 3, 32, 8)), v=jnp.ones((1, 3, 32, 8))), "Hq % Hkv"),
    (dict(k=jnp.ones((1, 2, 32, 4))), "head dim"),
    (dict(v=jnp.ones((1, 2, 16, 8))), "v must be"),
    (dict(fwd_tables=common.tables_from_block_map(np.ones((1, 1, 2, 4), np.int8))[0]),
     "fwd_tables"),
    (dict(dkv_tables=common.tables_from_block_map(np.ones((1, 3, 4, 4), np.int8))[1]),
     "dkv_tables"),
    (dict(q_pos=np.zeros((1, 16), np.int32)), "q_pos"),
    (dict(sinks=jnp.ones((3,))), "sinks"),
    (dict(kv_len=40), "kv_len"),
    (dict(q_segment_ids=np.zeros((1, 32), np.int32)), "segment_ids"),
    (dict(score_fn=lambda t, s, *a: s, score_params=(jnp.ones((5,)),),
          score_param_specs=(ParamSpec(head_axis=0),)), "score_params"),
])
def test_validation_errors(over, match):
  kw = _err_kwargs(**over)
  with pytest.raises(ValueError, match=match):
    fa.flash_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)
