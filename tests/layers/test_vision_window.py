"""WindowAttention (Swin) against (1) a literal numpy transcription of Swin's W-MSA / SW-MSA
(roll, window partition, img_mask regions, relative_position_index, roll back) and (2) a dense
masked computation over the whole grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.backends.chunked import ChunkedBackend
from attnjax.layers.window import WindowAttention
from vision_helpers import P, linear, randn, rngs, softmax

DIM = 16


def rel_index(wh, ww):
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]
  rel = rel.transpose(1, 2, 0)
  rel[:, :, 0] += wh - 1
  rel[:, :, 1] += ww - 1
  rel[:, :, 0] *= 2 * ww - 1
  return rel.sum(-1)


def swin_reference(layer, x, window, shift):
  """Literal Swin (divisible grids): x [B, H, W, C] float64."""
  b, h, w, c = x.shape
  wh, ww = window
  sh, sw = shift
  nh = layer.num_heads
  hd = c // nh
  if sh or sw:
    x = np.roll(x, (-sh, -sw), axis=(1, 2))
  img_mask = np.zeros((h, w))
  cnt = 0
  hs = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh else (slice(None),)
  ws = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw else (slice(None),)
  for a in hs:
    for bb in ws:
      img_mask[a, bb] = cnt
      cnt += 1

  def partition(t):
    t = t.reshape(t.shape[0], h // wh, wh, w // ww, ww, *t.shape[3:])
    t = np.swapaxes(t, 2, 3)
    return t.reshape(-1, wh * ww, *t.shape[5:])

  mw = partition(img_mask[None, ..., None])[..., 0]  # [nW, N]
  attn_mask = mw[:, None, :] - mw[:, :, None]  # [nW, N, N]
  xw = partition(x)  # [B*nW, N, C]
  qkv = linear(xw, layer.qkv).reshape(xw.shape[0], wh * ww, 3, nh, hd).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
  attn = q @ np.swapaxes(k, -1, -2)  # [B*nW, nh, N, N]
  table = P(layer.relative_position_bias_table)
  attn = attn + table[rel_index(wh, ww).reshape(-1)].reshape(wh * ww, wh * ww, nh).transpose(
      2, 0, 1)[None]
  nw = mw.shape[0]
  attn = attn.reshape(b, nw, nh, wh * ww, wh * ww)
  attn = np.where(attn_mask[None, :, None] != 0, -np.inf, attn).reshape(-1, nh, wh * ww, wh * ww)
  o = (softmax(attn) @ v).transpose(0, 2, 1, 3).reshape(-1, wh * ww, c)
  o = o.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
  if sh or sw:
    o = np.roll(o, (sh, sw), axis=(1, 2))
  return linear(o, layer.proj)


def dense_reference(layer, x, window, shift):
  """Dense over all H*W tokens: token i sees token j iff, after cyclically shifting the
  (bottom/right padded) grid by -shift, both lie in the same window and their offset was not
  changed by the wrap-around. Bias = table[Swin index of the (unwrapped) offset]."""
  b, h, w, c = x.shape
  wh, ww = window
  sh, sw = shift
  hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
  nh = layer.num_heads
  hd = c // nh
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  ry, rx = (ys - sh) % hp, (xs - sw) % wp  # coordinates in the rolled, padded grid
  same_window = ((ry[:, None] // wh) == (ry[None] // wh)) & ((rx[:, None] // ww) == (rx[None] // ww))
  no_wrap = ((ry[:, None] - ry[None]) == (ys[:, None] - ys[None])) & (
      (rx[:, None] - rx[None]) == (xs[:, None] - xs[None]))
  mask = same_window & no_wrap
  dy = np.clip(ys[:, None] - ys[None] + wh - 1, 0, 2 * wh - 2)
  dx = np.clip(xs[:, None] - xs[None] + ww - 1, 0, 2 * ww - 2)
  table = P(layer.relative_position_bias_table)
  bias = table[dy * (2 * ww - 1) + dx].transpose(2, 0, 1)  # [nh, N, N]
  qkv = linear(x.reshape(b, h * w, c), layer.qkv).reshape(b, h * w, 3, nh, hd)
  s = np.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1]) * hd ** -0.5 + bias[None]
  s = np.where(mask, s, -np.inf)
  o = np.einsum("bhqk,bkhd->bqhd", softmax(s), qkv[:, :, 2]).reshape(b, h, w, c)
  return linear(o, layer.proj)


def make(heads, window, shift, seed=0, **kw):
  layer = WindowAttention(DIM, heads, window, shift_size=shift, rngs=rngs(seed), **kw)
  # a bias table with non-trivial magnitude, so that a wrong index would show
  table = layer.relative_position_bias_table
  table[...] = randn(seed + 100, table[...].shape)
  return layer


call = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("grid,heads,window,shift", [
    ((6, 8), 2, (3, 4), (0, 0)),
    ((6, 8), 2, (3, 4), (1, 2)),
    ((6, 8), 4, (2, 2), (1, 1)),
    ((6, 9), 2, (3, 3), (1, 1)),
])
def test_matches_swin_and_dense(grid, heads, window, shift):
  layer = make(heads, window, shift, seed=sum(grid) + heads)
  x = randn(heads, (2,) + grid + (DIM,))
  out = np.asarray(call(layer, x))
  xd = np.asarray(x, np.float64)
  np.testing.assert_allclose(out, swin_reference(layer, xd, window, shift), rtol=1e-4,
                             atol=2e-5)
  np.testing.assert_allclose(out, dense_reference(layer, xd, window, shift), rtol=1e-4,
                             atol=2e-5)


def test_padded_grid_masks_padding():
  """5 x 7 grid, 3 x 3 windows, shift 1: padding is masked (dense reference on real tokens)."""
  layer = make(2, 3, 1, seed=5)
  x = randn(9, (2, 5, 7, DIM))
  out = np.asarray(call(layer, x))
  np.testing.assert_allclose(out, dense_reference(layer, np.asarray(x, np.float64), (3, 3),
                                                  (1, 1)), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("impl", ["reference", ChunkedBackend(block_q=8, block_kv=8)])
def test_other_backends(impl):
  """Segment ids (shift regions + padding) and the bias score mod on other backends."""
  layer = make(2, (3, 4), (1, 2), seed=6, impl=impl)
  x = randn(8, (2, 5, 7, DIM))
  out = np.asarray(call(layer, x))
  np.testing.assert_allclose(out, dense_reference(layer, np.asarray(x, np.float64), (3, 4),
                                                  (1, 2)), rtol=1e-4, atol=2e-5)


def test_single_window_disables_shift_and_bf16():
  layer = make(2, (6, 8), (3, 4), seed=2, dtype=jnp.bfloat16)
  x = randn(3, (2, 6, 8, DIM)).astype(jnp.bfloat16)
  out = call(layer, x)
  assert out.dtype == jnp.bfloat16
  ref = dense_reference(layer, np.asarray(x.astype(jnp.float32), np.float64), (6, 8), (0, 0))
  err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 3e-2, err


def test_token_layout_jit_grad():
  layer = make(2, 3, 1, seed=1)
  x = randn(4, (1, 6, 6, DIM))
  flat = nnx.jit(lambda m, x: m(x, grid_size=(6, 6)))(layer, x.reshape(1, 36, DIM))
  np.testing.assert_allclose(np.asarray(flat).reshape(x.shape), np.asarray(call(layer, x)),
                             rtol=1e-6, atol=1e-6)

  @nnx.jit
  def grads(m, x):
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)

  g = grads(layer, x)
  gt = np.asarray(g["relative_position_bias_table"][...])
  assert gt.shape == (25, 2) and np.all(np.isfinite(gt)) and np.abs(gt).max() > 0
  assert np.all(np.isfinite(np.asarray(g["qkv"]["kernel"][...])))


def test_linen_bridge():
  """The layer wrapped for Flax Linen with nnx.bridge.to_linen computes the same function."""
  from flax import linen as nn
  from flax.nnx import bridge
  model = bridge.to_linen(WindowAttention, DIM, 2, 3, shift_size=1)
  x = randn(12, (1, 6, 6, DIM))
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
  out = jax.jit(model.apply)(variables, x)
  params = variables["params"]
  layer = make(2, 3, 1)
  for path, value in (("qkv.kernel", params["qkv"]["kernel"]), ("qkv.bias", params["qkv"]["bias"]),
                      ("proj.kernel", params["proj"]["kernel"]),
                      ("proj.bias", params["proj"]["bias"]),
                      ("relative_position_bias_table", params["relative_position_bias_table"])):
    obj = layer
    for part in path.split("."):
      obj = getattr(obj, part)
    obj[...] = jnp.asarray(nn.meta.unbox(value))
  np.testing.assert_allclose(np.asarray(out), dense_reference(layer, np.asarray(x, np.float64),
                                                              (3, 3), (1, 1)),
                             rtol=1e-4, atol=2e-5)


def test_bad_configuration():
  r = rngs(0)
  with pytest.raises(ValueError, match="num_heads"):
    WindowAttention(DIM, 3, 4, rngs=r)
  with pytest.raises(ValueError, match="shift_size"):
    WindowAttention(DIM, 2, 4, shift_size=4, rngs=r)
  layer = WindowAttention(DIM, 2, 7, rngs=r)
  with pytest.raises(ValueError, match=r"window_size=\(7, 7\) is larger than the token grid"):
    layer(jnp.ones((1, 6, 8, DIM)))
  with pytest.raises(ValueError, match="grid_size"):
    layer(jnp.ones((1, 63, DIM)), grid_size=(7, 8))
