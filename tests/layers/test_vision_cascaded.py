"""CascadedGroupAttention (EfficientViT) against a Python-loop numpy re-implementation: channel
splits, cascade x~_j = x_j + o_{j-1}, depthwise conv on Q, absolute-offset attention biases,
ReLU + projection."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.backends.chunked import ChunkedBackend
from attnjax.layers.cascaded import CascadedGroupAttention
from vision_helpers import P, linear, randn, rngs, softmax

DIM = 16


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


def reference(layer, x, heads, key_dim, resolution):
  b, h, w, c = x.shape
  d = c // heads
  n = h * w
  pts = [(i, j) for i in range(h) for j in range(w)]
  offsets = np.array([[abs(p[0] - q[0]) * resolution[1] + abs(p[1] - q[1]) for q in pts]
                      for p in pts])
  ab = P(layer.attention_biases)
  outs, feat = [], None
  for i in range(heads):
    xi = x[..., i * d:(i + 1) * d]
    feat = xi if i == 0 else feat + xi
    qkv = linear(feat, layer.qkvs[i])
    q, k, v = qkv[..., :key_dim], qkv[..., key_dim:2 * key_dim], qkv[..., 2 * key_dim:]
    q = depthwise_conv(q, layer.dws[i])
    q, k, v = q.reshape(b, n, -1), k.reshape(b, n, -1), v.reshape(b, n, -1)
    attn = softmax(q @ np.swapaxes(k, 1, 2) * key_dim ** -0.5 + ab[i][offsets][None])
    feat = (attn @ v).reshape(b, h, w, d)
    outs.append(feat)
  return linear(np.maximum(np.concatenate(outs, -1), 0), layer.proj)


call = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("grid,heads,key_dim,kernels,resolution,impl", [
    ((6, 8), 4, 4, (3, 5, 3, 1), (6, 8), "auto"),
    ((5, 7), 2, 8, 3, (7, 7), "auto"),  # grid smaller than the bias table
    ((5, 7), 2, 8, 3, (7, 7), ChunkedBackend(block_q=8, block_kv=16)),
])
def test_matches_reference(grid, heads, key_dim, kernels, resolution, impl):
  layer = CascadedGroupAttention(DIM, heads, key_dim=key_dim, kernels=kernels,
                                 resolution=resolution, impl=impl, rngs=rngs(heads))
  layer.attention_biases[...] = randn(3, layer.attention_biases[...].shape)
  x = randn(sum(grid), (2,) + grid + (DIM,))
  out = np.asarray(call(layer, x))
  ref = reference(layer, np.asarray(x, np.float64), heads, key_dim, resolution)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


def test_bf16_token_layout_jit_grad():
  layer = CascadedGroupAttention(DIM, 4, key_dim=4, kernels=3, resolution=(6, 8),
                                 dtype=jnp.bfloat16, rngs=rngs(4))
  layer.attention_biases[...] = randn(3, layer.attention_biases[...].shape)
  x = randn(1, (2, 6, 8, DIM)).astype(jnp.bfloat16)
  out = call(layer, x)
  assert out.dtype == jnp.bfloat16
  ref = reference(layer, np.asarray(x.astype(jnp.float32), np.float64), 4, 4, (6, 8))
  err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 3e-2, err
  flat = nnx.jit(lambda m, x: m(x, grid_size=(6, 8)))(layer, x.reshape(2, 48, DIM))
  np.testing.assert_array_equal(np.asarray(flat, np.float32),
                                np.asarray(out, np.float32).reshape(2, 48, DIM))
  layer32 = CascadedGroupAttention(DIM, 4, key_dim=4, kernels=3, resolution=(6, 8),
                                   rngs=rngs(4))
  g = nnx.jit(lambda m, x: nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))(
      layer32, x.astype(jnp.float32))
  gb = np.asarray(g["attention_biases"][...])
  assert gb.shape == (4, 48) and np.all(np.isfinite(gb)) and np.abs(gb).max() > 0
  # the cascade: the first head's weights influence every head, so they get gradients
  assert np.abs(np.asarray(g["qkvs"][0]["kernel"][...])).max() > 0


def test_bad_configuration():
  r = rngs(0)
  with pytest.raises(ValueError, match="num_heads"):
    CascadedGroupAttention(DIM, 3, rngs=r)
  with pytest.raises(ValueError, match="kernels"):
    CascadedGroupAttention(DIM, 4, kernels=(3, 3), rngs=r)
  with pytest.raises(ValueError, match="kernels"):
    CascadedGroupAttention(DIM, 2, kernels=4, rngs=r)
  layer = CascadedGroupAttention(DIM, 2, key_dim=4, kernels=3, resolution=(4, 4), rngs=r)
  with pytest.raises(ValueError, match=r"resolution=\(4, 4\)"):
    layer(jnp.ones((1, 6, 8, DIM)))
  with pytest.raises(ValueError, match="grid_size"):
    layer(jnp.ones((1, 16, DIM)), grid_size=(4, 3))
