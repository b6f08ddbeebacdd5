"""ChannelAttention (DaViT) against a plain numpy re-implementation of the paper's formula
A_g = softmax(C_g^-0.5 Q_g^T K_g), out_g = (A_g V_g^T)^T, per channel group."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.layers.channel import ChannelAttention
from vision_helpers import linear, randn, rngs, softmax

DIM = 16


def reference(layer, x, groups):
  """x [B, N, C] float64."""
  b, n, c = x.shape
  cg = c // groups
  qkv = linear(x, layer.qkv)
  q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
  outs = []
  for g in range(groups):
    sl = slice(g * cg, (g + 1) * cg)
    qg, kg, vg = q[..., sl], k[..., sl], v[..., sl]  # [B, N, C_g]
    a = softmax(np.swapaxes(qg, 1, 2) @ kg * cg ** -0.5)  # [B, C_g, C_g]
    outs.append(np.swapaxes(a @ np.swapaxes(vg, 1, 2), 1, 2))  # [B, N, C_g]
  return linear(np.concatenate(outs, -1), layer.proj)


call = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("shape,groups", [((2, 48, DIM), 2), ((2, 5, 7, DIM), 4)])
def test_matches_reference(shape, groups):
  layer = ChannelAttention(DIM, groups, qkv_bias=True, rngs=rngs(groups))
  x = randn(groups, shape)
  out = np.asarray(call(layer, x))
  assert out.shape == shape
  xd = np.asarray(x, np.float64).reshape(shape[0], -1, DIM)
  np.testing.assert_allclose(out.reshape(xd.shape), reference(layer, xd, groups), rtol=1e-4,
                             atol=2e-5)


def test_token_permutation_equivariance_bf16_jit_grad():
  layer = ChannelAttention(DIM, 2, rngs=rngs(0))
  x = randn(1, (2, 48, DIM))
  perm = np.random.default_rng(0).permutation(48)
  out = call(layer, x)
  np.testing.assert_allclose(np.asarray(call(layer, x[:, perm])), np.asarray(out)[:, perm],
                             rtol=1e-5, atol=1e-5)

  layer16 = ChannelAttention(DIM, 2, dtype=jnp.bfloat16, rngs=rngs(0))
  xb = x.astype(jnp.bfloat16)
  outb = call(layer16, xb)
  assert outb.dtype == jnp.bfloat16 and layer16.qkv.kernel[...].dtype == jnp.float32
  ref = reference(layer16, np.asarray(xb.astype(jnp.float32), np.float64), 2)
  err = np.linalg.norm(np.asarray(outb, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 3e-2, err

  g = nnx.jit(lambda m, x: nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))(layer, x)
  gk = np.asarray(g["qkv"]["kernel"][...])
  assert np.all(np.isfinite(gk)) and np.abs(gk).max() > 0


def test_bad_configuration():
  r = rngs(0)
  with pytest.raises(ValueError, match="num_heads"):
    ChannelAttention(DIM, 3, rngs=r)
  layer = ChannelAttention(DIM, 2, rngs=r)
  with pytest.raises(ValueError, match="dim=16"):
    layer(jnp.ones((1, 10, 8)))
  with pytest.raises(ValueError, match="grid_size"):
    layer(jnp.ones((1, 10, DIM)), grid_size=(3, 4))
