"""MultiHeadLatentAttention (DeepSeek-V2 MLA) against the paper's formulas; absorbed ==
unabsorbed; latent-only KV cache decoding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import scores
from attnjax.layers.common import LatentKVCache
from attnjax.layers.mla import MultiHeadLatentAttention
from layers_reference import (build, check_incremental, close, dense, f64, param, pos_mask,
                              rand, rel_err, rms, rope_complex, sdpa)

C = 16
BASE = dict(num_heads=4, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6,
            rope_theta=100.0)
CALL = nnx.jit(lambda m, x: m(x))
CALL_BOTH = nnx.jit(lambda m, x: (m(x, absorb=False), m(x, absorb=True)))


def ref_mla(m, x, qpos=None, sinks=None, logit_fn=None):
  """DeepSeek-V2 section 2.1 (decoupled RoPE), unabsorbed, in float64."""
  B, T, _ = x.shape
  pos = np.arange(T) if qpos is None else np.asarray(qpos)
  dn, dr, dc = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
  if m.q_lora_rank is None:
    q = dense(x, m.wq.kernel)
  else:
    q = dense(rms(dense(x, m.wq_a.kernel), param(m.q_norm.scale)), m.wq_b.kernel)
  q_c, q_r = q[..., :dn], rope_complex(q[..., dn:], pos, m.rope_theta)
  kv = dense(x, m.wkv_a.kernel)
  c = rms(kv[..., :dc], param(m.kv_norm.scale))                       # c_KV
  k_r = rope_complex(kv[..., None, dc:], pos, m.rope_theta)           # shared k_R, 1 head
  k_c = dense(c, m.w_uk.kernel)                                       # [B, T, H, dn]
  v = dense(c, m.w_uv.kernel)                                         # [B, T, H, dv]
  H = m.num_heads
  k = np.concatenate([k_c, np.repeat(k_r, H, axis=2)], axis=-1)
  qq = np.concatenate([q_c, q_r], axis=-1)
  if m.window is not None:
    allowed = pos_mask(pos, pos, lambda i, j: (j <= i) & (j > i - m.window))
  else:
    allowed = pos_mask(pos, pos, lambda i, j: j <= i)
  if m.sinks is not None:
    sinks = param(m.sinks)
  o = sdpa(qq, k, v, allowed, scale=1.0 / math.sqrt(dn + dr), sinks=sinks, logit_fn=logit_fn)
  return np.tensordot(o, param(m.wo.kernel), axes=[[2, 3], [0, 1]])


@pytest.mark.parametrize("extra", [dict(), dict(q_lora_rank=6, sinks=True), dict(window=3)],
                         ids=["plain", "q_lora_sinks", "window"])
def test_matches_reference_and_absorbed_equals_unabsorbed(extra):
  m = build(MultiHeadLatentAttention, in_features=C, **BASE, **extra)
  x = rand(1, (2, 10, C))
  un, ab = CALL_BOTH(m, x)
  want = ref_mla(m, x)
  close(un, want)
  close(ab, want)
  close(ab, f64(un), 1e-5)


def test_bfloat16():
  m32 = build(MultiHeadLatentAttention, in_features=C, q_lora_rank=6, **BASE)
  mbf = build(MultiHeadLatentAttention, in_features=C, q_lora_rank=6, dtype="bfloat16", **BASE)
  nnx.update(mbf, nnx.state(m32, nnx.Param))
  x = rand(2, (2, 12, C))
  un, ab = CALL_BOTH(mbf, x)
  assert un.dtype == ab.dtype == jnp.bfloat16
  want = ref_mla(m32, x)
  assert rel_err(un, want) < 3e-2 and rel_err(ab, want) < 3e-2


@pytest.mark.parametrize("absorb", [True, False])
def test_incremental_decoding_caches_only_the_latent(absorb):
  """Ragged prefill + decode steps through the latent cache (d_c + d_R numbers per token)
  equal the parallel forward, in the absorbed and the unabsorbed form."""
  m = build(MultiHeadLatentAttention, in_features=C, q_lora_rank=6, **BASE)
  x = rand(3, (2, 11, C))
  full = f64(CALL(m, x))
  cache = m.init_cache(2, 11)
  assert isinstance(cache, LatentKVCache)
  assert cache.latent.shape == (2, 11, BASE["kv_lora_rank"])
  assert cache.k_rope.shape == (2, 11, BASE["qk_rope_head_dim"])
  check_incremental(_DecodeWith(m, absorb), x, prompt_lens=[3, 2], steps=[1, 3, 1], full=full)


class _DecodeWith(nnx.Module):
  """Wraps an MLA layer so ``decode`` uses the given form."""

  def __init__(self, layer, absorb):
    self.layer, self.absorb_flag = layer, absorb

  def init_cache(self, b, n):
    return self.layer.init_cache(b, n)

  def decode(self, x, cache, num_new=None):
    return self.layer.decode(x, cache, num_new=num_new, absorb=self.absorb_flag)


def test_window_ring_cache_decoding():
  m = build(MultiHeadLatentAttention, in_features=C, window=4, **BASE)
  x = rand(4, (2, 12, C))
  cache = check_incremental(m, x, prompt_lens=[3, 1], steps=[1, 3, 1, 3])
  assert cache.capacity == 4


def test_causal_prefix_property():
  m = build(MultiHeadLatentAttention, in_features=C, **BASE)
  x = rand(5, (1, 12, C))
  full = f64(CALL(m, x))
  for t in (1, 6):
    close(CALL(m, x[:, :t]), full[:, :t])


def test_jit_and_grad():
  m = build(MultiHeadLatentAttention, in_features=C, q_lora_rank=6, sinks=True, **BASE)
  x = rand(6, (1, 6, C))
  grads = nnx.jit(nnx.grad(lambda m, x: jnp.mean(m(x) ** 2)))(m, x)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  for name in ("wq_a", "wq_b", "wkv_a", "w_uk", "w_uv", "wo"):
    assert float(jnp.abs(grads[name]["kernel"][...]).sum()) > 0, name
  assert float(jnp.abs(grads["sinks"][...]).sum()) > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(qk_rope_head_dim=3), "qk_rope_head_dim must be even"),
    (dict(kv_lora_rank=0), "kv_lora_rank must be >= 1"),
    (dict(absorb="yes"), "absorb"),
    (dict(dtype="float64"), "dtype"),
    (dict(v_head_dim=0), "v_head_dim must be >= 1, got 0"),      # 0 used to mean the default
    (dict(out_features=0), "out_features must be >= 1, got 0"),
])
def test_bad_configuration_raises(kwargs, match):
  cfg = dict(BASE, **kwargs)
  with pytest.raises(ValueError, match=match):
    MultiHeadLatentAttention(in_features=C, rngs=nnx.Rngs(0), **cfg)


def test_decode_checks_the_cache_and_its_capacity():
  """A latent cache of another batch / latent width raises naming the shapes (it used to fail
  in a broadcast); a prompt longer than a window-less cache raises (it used to give wrong
  outputs); num_new outside [0, T] raises."""
  m = build(MultiHeadLatentAttention, in_features=C, **BASE)
  x = rand(7, (2, 6, C))
  other = build(MultiHeadLatentAttention, in_features=C, **dict(BASE, kv_lora_rank=6))
  for cache, shown in ((m.init_cache(3, 8), r"latent \[3, 8, 8\]"),
                       (other.init_cache(2, 8), r"latent \[2, 8, 6\]")):
    with pytest.raises(ValueError, match=r"MultiHeadLatentAttention.decode: the cache does not "
                       r"fit.*" + shown + r".*expected latent \[2, S, 8\], k_rope \[2, S, 4\]"):
      m.decode(x, cache)
  with pytest.raises(ValueError, match="6 new tokens do not fit the KV cache: it holds 4"):
    m.decode(x, m.init_cache(2, 4))
  with pytest.raises(ValueError, match=r"num_new=\[7, 2\] must lie in \[0, T\]"):
    m.decode(x, m.init_cache(2, 8), num_new=jnp.asarray([7, 2]))


def test_constructor_score_mod_params_are_trained():
  """The constructor's score-mod table is an nnx.Param: its gradient (absorbed and unabsorbed
  form) equals float64 central differences of the reference with the same bias."""
  md = 2
  m = build(MultiHeadLatentAttention, in_features=C, **BASE,
            score_mod=scores.relative_bias(rand(8, (4, 2 * md + 1)), md))
  (leaf,) = m.stored_score_mod.leaves
  assert isinstance(leaf, nnx.Param)
  table = f64(leaf[...])
  x, w = rand(9, (1, 5, C)), rand(10, (1, 5, C))

  def logit_fn(tab):
    def fn(s):
      i, j = np.arange(s.shape[2])[:, None], np.arange(s.shape[3])[None, :]
      return s + tab[:, np.clip(j - i, -md, md) + md][None]
    return fn

  close(CALL(m, x), ref_mla(m, x, logit_fn=logit_fn(table)))
  ref_loss = lambda tab: float(np.sum(f64(w) * ref_mla(m, x, logit_fn=logit_fn(tab))))
  fd = np.zeros_like(table)
  for idx in np.ndindex(*table.shape):
    d = np.zeros_like(table)
    d[idx] = 1e-4
    fd[idx] = (ref_loss(table + d) - ref_loss(table - d)) / 2e-4
  assert np.abs(fd).max() > 1e-3
  for absorb in (False, True):
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(w * m(x, absorb=absorb))))(m)
    got = f64(g["stored_score_mod"]["leaves"][0][...])
    np.testing.assert_allclose(got, fd, atol=2e-4 * np.abs(fd).max())
