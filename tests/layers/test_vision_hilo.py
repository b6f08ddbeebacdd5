"""HiLoAttention (LITv2) against a plain numpy re-implementation of the paper's two branches:
Hi-Fi = dense attention restricted to s x s blocks, Lo-Fi = attention to s x s average-pooled
keys/values; outputs concatenated [Hi-Fi, Lo-Fi]. Non-square and non-divisible grids."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.layers.hilo import HiLoAttention
from vision_helpers import linear, randn, rngs, softmax

DIM = 16


def mha(q, k, v, scale, mask=None):
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if mask is not None:
    s = np.where(mask, s, -np.inf)
  return np.einsum("bhqk,bkhd->bqhd", softmax(s), v)


def reference(layer, x, heads, s, alpha):
  b, h, w, c = x.shape
  hd = c // heads
  l_heads = heads if s == 1 else int(heads * alpha)
  h_heads = heads - l_heads
  xf = x.reshape(b, h * w, c)
  parts = []
  if h_heads:
    qkv = linear(xf, layer.h_qkv).reshape(b, h * w, 3, h_heads, hd)
    ys, xs = np.divmod(np.arange(h * w), w)
    block = (ys // s) * 1000 + xs // s
    mask = block[:, None] == block[None, :]
    o = mha(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], hd ** -0.5, mask)
    parts.append(linear(o.reshape(b, h * w, h_heads * hd), layer.h_proj))
  if l_heads:
    q = linear(xf, layer.l_q).reshape(b, h * w, l_heads, hd)
    pooled = np.stack([x[:, i:i + s, j:j + s].mean(axis=(1, 2))
                       for i in range(0, h, s) for j in range(0, w, s)], axis=1)
    kv = linear(pooled, layer.l_kv).reshape(b, -1, 2, l_heads, hd)
    o = mha(q, kv[:, :, 0], kv[:, :, 1], hd ** -0.5)
    parts.append(linear(o.reshape(b, h * w, l_heads * hd), layer.l_proj))
  return np.concatenate(parts, -1).reshape(b, h, w, c)


call = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("grid,heads,s,alpha", [
    ((6, 8), 4, 2, 0.5),    # non-square, the paper's default split
    ((4, 10), 4, 2, 0.75),  # non-square, 3 Lo-Fi heads + 1 Hi-Fi head
    ((5, 7), 2, 2, 0.5),    # not divisible by s: Hi-Fi pads (masked), Lo-Fi partial pool
    ((6, 9), 4, 3, 0.0),    # pure Hi-Fi = window attention
    ((6, 8), 4, 2, 1.0),    # pure Lo-Fi = spatial reduction with average pooling
    ((4, 6), 4, 1, 0.5),    # s = 1: all heads Lo-Fi, standard MHSA
])
def test_matches_reference(grid, heads, s, alpha):
  layer = HiLoAttention(DIM, heads, window_size=s, alpha=alpha, qkv_bias=True,
                        rngs=rngs(heads + s))
  x = randn(grid[0] * 10 + grid[1], (2,) + grid + (DIM,))
  out = np.asarray(call(layer, x))
  ref = reference(layer, np.asarray(x, np.float64), heads, s, alpha)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


def test_bf16_token_layout_jit_grad():
  layer = HiLoAttention(DIM, 4, window_size=2, alpha=0.5, dtype=jnp.bfloat16, rngs=rngs(1))
  x = randn(2, (2, 6, 4, DIM)).astype(jnp.bfloat16)
  out = call(layer, x)
  assert out.dtype == jnp.bfloat16 and layer.h_qkv.kernel[...].dtype == jnp.float32
  ref = reference(layer, np.asarray(x.astype(jnp.float32), np.float64), 4, 2, 0.5)
  err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 3e-2, err
  flat = nnx.jit(lambda m, x: m(x, grid_size=(6, 4)))(layer, x.reshape(2, 24, DIM))
  np.testing.assert_array_equal(np.asarray(flat, np.float32),
                                np.asarray(out, np.float32).reshape(2, 24, DIM))

  layer32 = HiLoAttention(DIM, 4, window_size=2, alpha=0.5, rngs=rngs(1))
  g = nnx.jit(lambda m, x: nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))(
      layer32, x.astype(jnp.float32))
  for branch in ("h_qkv", "l_kv"):
    gk = np.asarray(g[branch]["kernel"][...])
    assert np.all(np.isfinite(gk)) and np.abs(gk).max() > 0


def test_bad_configuration():
  r = rngs(0)
  with pytest.raises(ValueError, match="num_heads"):
    HiLoAttention(DIM, 3, rngs=r)
  with pytest.raises(ValueError, match="alpha"):
    HiLoAttention(DIM, 4, alpha=1.5, rngs=r)
  with pytest.raises(ValueError, match="window_size"):
    HiLoAttention(DIM, 4, window_size=0, rngs=r)
  layer = HiLoAttention(DIM, 4, window_size=4, rngs=r)
  with pytest.raises(ValueError, match=r"window_size=\(4, 4\) is larger than the token grid"):
    layer(jnp.ones((1, 3, 8, DIM)))
  with pytest.raises(ValueError, match="grid_size"):
    layer(jnp.ones((1, 30, DIM)), grid_size=(4, 8))


def test_alpha_accepts_numpy_and_jax_scalars_and_rejects_bools():
  """alpha=np.float32(0.5) used to be rejected as "not a number in [0, 1]", while alpha=True
  was accepted (as 1). Numpy/jax real scalars give the same layer as the Python float."""
  x = randn(0, (1, 4, 4, DIM))
  want = np.asarray(HiLoAttention(DIM, 4, alpha=0.5, rngs=rngs(0))(x))
  for alpha in (np.float32(0.5), np.float64(0.5), jnp.float32(0.5)):
    layer = HiLoAttention(DIM, 4, alpha=alpha, rngs=rngs(0))
    assert layer.l_heads == 2 and isinstance(layer.alpha, float)
    np.testing.assert_array_equal(np.asarray(layer(x)), want)
  assert HiLoAttention(DIM, 4, alpha=np.int64(1), rngs=rngs(0)).l_heads == 4
  for bad in (True, np.True_, "0.5"):
    with pytest.raises(ValueError, match=r"HiLoAttention: alpha .*must be a real number in "
                       r"\[0.0, 1.0\] \(int or float, not bool\)"):
      HiLoAttention(DIM, 4, alpha=bad, rngs=rngs(0))
