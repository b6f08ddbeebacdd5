"""AgentAttention against a plain numpy re-implementation of the paper's computation:
A = AdaptiveAvgPool(Q), V_A = softmax(A K^T s + B1) V, O = softmax(Q A^T s + B2) V_A,
out = (O + DWConv(V)) W_proj, with the interpolated / row / column agent biases and the optional
spatial reduction of K/V. Non-square grids, overlapping adaptive-pool bins."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.backends.chunked import ChunkedBackend
from attnjax.layers.agent import AgentAttention
from vision_helpers import P, linear, randn, rngs, softmax

DIM = 16


def bilinear_matrix(n_in, n_out):
  """PyTorch bilinear interpolation weights (align_corners=False) along one axis."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(math.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    m[i, i0] += 1 - lam
    m[i, i1] += lam
  return m


def resize(t, size):  # [..., h, w] -> [..., H, W]
  mh, mw = bilinear_matrix(t.shape[-2], size[0]), bilinear_matrix(t.shape[-1], size[1])
  return np.einsum("Hh,...hw,Ww->...HW", mh, t, mw)


def adaptive_pool(x, out):  # x [B, H, W, C]
  h, w = x.shape[1:3]
  rows = []
  for i in range(out[0]):
    r0, r1 = (i * h) // out[0], math.ceil((i + 1) * h / out[0])
    cols = []
    for j in range(out[1]):
      c0, c1 = (j * w) // out[1], math.ceil((j + 1) * w / out[1])
      cols.append(x[:, r0:r1, c0:c1].mean(axis=(1, 2)))
    rows.append(np.stack(cols, 1))
  return np.stack(rows, 1)


def depthwise_conv(x, conv):  # x [B, H, W, C], flax kernel [k, k, 1, C]
  kern, bias = P(conv.kernel), P(conv.bias)
  k = kern.shape[0]
  p = k // 2
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = np.zeros_like(x) + bias
  for dy in range(k):
    for dx in range(k):
      out += xp[:, dy:dy + h, dx:dx + w] * kern[dy, dx, 0]
  return out


def reference(layer, x, agent_shape, sr, position_bias):
  b, h, w, c = x.shape
  nh = layer.num_heads
  hd = c // nh
  n = agent_shape[0] * agent_shape[1]
  q = linear(x, layer.q)  # [B, H, W, C]
  if sr > 1:
    kern = P(layer.sr.kernel)  # [r, r, C, C]
    kh, kw = h // sr, w // sr
    patches = x[:, :kh * sr, :kw * sr].reshape(b, kh, sr, kw, sr, c)
    xr = np.einsum("byixjc,ijco->byxo", patches, kern) + P(layer.sr.bias)
    mu = xr.mean(-1, keepdims=True)
    var = ((xr - mu) ** 2).mean(-1, keepdims=True)
    xr = (xr - mu) / np.sqrt(var + 1e-5) * P(layer.norm.scale) + P(layer.norm.bias)
  else:
    xr, kh, kw = x, h, w
  kv = linear(xr, layer.kv)
  k, v = kv[..., :c], kv[..., c:]
  agents = adaptive_pool(q, agent_shape).reshape(b, n, nh, hd)
  qh = q.reshape(b, h * w, nh, hd)
  kh_ = k.reshape(b, kh * kw, nh, hd)
  vh = v.reshape(b, kh * kw, nh, hd)
  s1 = np.einsum("bahd,bkhd->bhak", agents, kh_) * hd ** -0.5
  s2 = np.einsum("bqhd,bahd->bhqa", qh, agents) * hd ** -0.5
  if position_bias:
    b1 = resize(P(layer.an_bias), (kh, kw)) + P(layer.ah_bias) + P(layer.aw_bias)
    s1 = s1 + b1.reshape(nh, n, kh * kw)[None]
    b2 = resize(P(layer.na_bias), (h, w)).reshape(nh, n, h * w).transpose(0, 2, 1)
    b2 = b2 + (P(layer.ha_bias) + P(layer.wa_bias)).reshape(nh, h * w, n)
    s2 = s2 + b2[None]
  agent_v = np.einsum("bhak,bkhd->bahd", softmax(s1), vh)
  o = np.einsum("bhqa,bahd->bqhd", softmax(s2), agent_v).reshape(b, h, w, c)
  if sr > 1:
    v = resize(v.transpose(0, 3, 1, 2), (h, w)).transpose(0, 2, 3, 1)
  o = o + depthwise_conv(v, layer.dwc)
  return linear(o, layer.proj)


call = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("grid,heads,agents,sr,position_bias,impl", [
    ((6, 8), 2, 4, 1, True, "auto"),        # 2 x 2 agents on a non-square grid
    ((6, 8), 4, (4, 3), 1, True, "auto"),   # overlapping adaptive-pool bins (6 -> 4)
    ((6, 8), 2, (2, 3), 2, True, "auto"),   # spatial reduction of K/V, bilinear upsampled V
    ((5, 7), 2, 9, 1, False, "auto"),       # odd grid, no position bias
    ((6, 8), 2, (2, 3), 1, True, ChunkedBackend(block_q=8, block_kv=16)),  # bias= tiled
])
def test_matches_reference(grid, heads, agents, sr, position_bias, impl):
  layer = AgentAttention(DIM, heads, agent_num=agents, grid_size=grid, sr_ratio=sr,
                         position_bias=position_bias, qkv_bias=True, impl=impl,
                         rngs=rngs(heads + sr))
  if position_bias:  # biases with O(1) magnitude so that an indexing error would show
    for i, name in enumerate(["an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"]):
      p = getattr(layer, name)
      p[...] = randn(i, p[...].shape)
  x = randn(sum(grid), (2,) + grid + (DIM,))
  out = np.asarray(call(layer, x))
  shape = agents if isinstance(agents, tuple) else (math.isqrt(agents),) * 2
  ref = reference(layer, np.asarray(x, np.float64), shape, sr, position_bias)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


def test_bf16_token_layout_jit_grad():
  layer = AgentAttention(DIM, 2, agent_num=4, grid_size=(6, 8), dtype=jnp.bfloat16,
                         rngs=rngs(0))
  x = randn(5, (2, 6, 8, DIM)).astype(jnp.bfloat16)
  out = call(layer, x)
  assert out.dtype == jnp.bfloat16
  ref = reference(layer, np.asarray(x.astype(jnp.float32), np.float64), (2, 2), 1, True)
  err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 3e-2, err
  flat = nnx.jit(lambda m, x: m(x, grid_size=(6, 8)))(layer, x.reshape(2, 48, DIM))
  np.testing.assert_array_equal(np.asarray(flat, np.float32),
                                np.asarray(out, np.float32).reshape(2, 48, DIM))

  layer32 = AgentAttention(DIM, 2, agent_num=4, grid_size=(6, 8), rngs=rngs(0))
  g = nnx.jit(lambda m, x: nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))(
      layer32, x.astype(jnp.float32))
  for name in ("an_bias", "na_bias", "ah_bias", "wa_bias"):
    gb = np.asarray(g[name][...])
    assert np.all(np.isfinite(gb)) and np.abs(gb).max() > 0, name


def test_bad_configuration():
  r = rngs(0)
  with pytest.raises(ValueError, match="num_heads"):
    AgentAttention(DIM, 3, agent_num=4, grid_size=(6, 8), rngs=r)
  with pytest.raises(ValueError, match="agent_num"):
    AgentAttention(DIM, 2, agent_num=5, grid_size=(6, 8), rngs=r)
  with pytest.raises(ValueError, match="grid_size"):
    AgentAttention(DIM, 2, agent_num=4, rngs=r)
  layer = AgentAttention(DIM, 2, agent_num=4, grid_size=(6, 8), rngs=r)
  with pytest.raises(ValueError, match=r"grid_size=\(6, 8\)"):
    layer(jnp.ones((1, 8, 6, DIM)))
  with pytest.raises(ValueError, match="grid_size"):
    layer(jnp.ones((1, 47, DIM)), grid_size=(6, 8))
  layer = AgentAttention(DIM, 2, agent_num=49, position_bias=False, rngs=r)
  with pytest.raises(ValueError, match=r"agent_num=\(7, 7\) is larger than the token grid"):
    layer(jnp.ones((1, 6, 8, DIM)))
