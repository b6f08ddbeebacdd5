"""SpatialReductionAttention (PVT SRA, PVTv2 linear SRA) against a plain numpy re-implementation:
Q from every token, K/V from the conv-reduced (or adaptive-pooled) and layer-normed grid."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.layers.spatial_reduction import SpatialReductionAttention
from vision_helpers import P, linear, randn, rngs, softmax

DIM = 16


def layer_norm(x, ln):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * P(ln.scale) + P(ln.bias)


def gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def reference(layer, x, sr, linear_sra, pool):
  b, h, w, c = x.shape
  nh = layer.num_heads
  hd = c // nh
  q = linear(x, layer.q).reshape(b, h * w, nh, hd)
  if linear_sra:
    pooled = np.zeros((b, pool, pool, c))
    for i in range(pool):
      for j in range(pool):
        r0, r1 = (i * h) // pool, math.ceil((i + 1) * h / pool)
        c0, c1 = (j * w) // pool, math.ceil((j + 1) * w / pool)
        pooled[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    xr = pooled @ P(layer.sr.kernel)[0, 0] + P(layer.sr.bias)
    xr = gelu(layer_norm(xr, layer.norm))
  elif sr > 1:
    kh, kw = h // sr, w // sr
    patches = x[:, :kh * sr, :kw * sr].reshape(b, kh, sr, kw, sr, c)
    xr = np.einsum("byixjc,ijco->byxo", patches, P(layer.sr.kernel)) + P(layer.sr.bias)
    xr = layer_norm(xr, layer.norm)
  else:
    xr = x
  kv = linear(xr.reshape(b, -1, c), layer.kv).reshape(b, -1, 2, nh, hd)
  s = np.einsum("bqhd,bkhd->bhqk", q, kv[:, :, 0]) * hd ** -0.5
  o = np.einsum("bhqk,bkhd->bqhd", softmax(s), kv[:, :, 1]).reshape(b, h, w, c)
  return linear(o, layer.proj)


call = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("grid,heads,sr,linear_sra,pool", [
    ((6, 8), 2, 1, False, 7),
    ((6, 8), 2, 2, False, 7),
    ((7, 9), 4, 2, False, 7),   # not divisible: the conv drops the last row / column
    ((6, 8), 2, 1, True, 3),    # PVTv2 linear SRA, overlapping adaptive bins on 8 -> 3
])
def test_matches_reference(grid, heads, sr, linear_sra, pool):
  layer = SpatialReductionAttention(DIM, heads, sr_ratio=sr, linear=linear_sra, pool_size=pool,
                                    qkv_bias=True, rngs=rngs(sr + heads))
  x = randn(sum(grid), (2,) + grid + (DIM,))
  out = np.asarray(call(layer, x))
  ref = reference(layer, np.asarray(x, np.float64), sr, linear_sra, pool)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


def test_bf16_token_layout_jit_grad():
  layer = SpatialReductionAttention(DIM, 2, sr_ratio=2, dtype=jnp.bfloat16, rngs=rngs(0))
  x = randn(1, (2, 6, 8, DIM)).astype(jnp.bfloat16)
  out = call(layer, x)
  assert out.dtype == jnp.bfloat16
  ref = reference(layer, np.asarray(x.astype(jnp.float32), np.float64), 2, False, 7)
  err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 3e-2, err
  flat = nnx.jit(lambda m, x: m(x, grid_size=(6, 8)))(layer, x.reshape(2, 48, DIM))
  np.testing.assert_array_equal(np.asarray(flat, np.float32),
                                np.asarray(out, np.float32).reshape(2, 48, DIM))
  layer32 = SpatialReductionAttention(DIM, 2, sr_ratio=2, rngs=rngs(0))
  g = nnx.jit(lambda m, x: nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))(
      layer32, x.astype(jnp.float32))
  gk = np.asarray(g["sr"]["kernel"][...])
  assert np.all(np.isfinite(gk)) and np.abs(gk).max() > 0


def test_bad_configuration():
  r = rngs(0)
  with pytest.raises(ValueError, match="num_heads"):
    SpatialReductionAttention(DIM, 5, rngs=r)
  with pytest.raises(ValueError, match="sr_ratio"):
    SpatialReductionAttention(DIM, 2, sr_ratio=0, rngs=r)
  layer = SpatialReductionAttention(DIM, 2, sr_ratio=8, rngs=r)
  with pytest.raises(ValueError, match=r"sr_ratio=\(8, 8\) is larger than the token grid"):
    layer(jnp.ones((1, 6, 8, DIM)))
  with pytest.raises(ValueError, match="grid_size"):
    layer(jnp.ones((1, 48, DIM)), grid_size=(6, 7))
