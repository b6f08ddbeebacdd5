"""Split-K decode attention over a KV cache (Flash-Decoding: Dao, Haziza, Massa, Sizov 2023,
"Flash-Decoding for long-context inference"), for TPU (Pallas Mosaic) and GPU (Pallas Triton).

:func:`decode_attention` is the entry point; semantics are in :mod:`pallas_kernels.decode.common`,
the kernels in :mod:`~pallas_kernels.decode.tpu` and :mod:`~pallas_kernels.decode.gpu`.
"""

from __future__ import annotations

import jax

from pallas_kernels.decode import common

__all__ = ["decode_attention", "decode_partials", "combine", "prepare", "CachePaddingWarning"]

prepare = common.prepare
CachePaddingWarning = common.CachePaddingWarning
combine = common.combine


def decode_partials(prep: common.Prepared, *, platform: str, interpret, count_blocks=False):
  """The per-split float32 partials of ``prep`` on ``platform`` (see the kernel modules)."""
  if platform == "tpu":
    from pallas_kernels.decode import tpu  # pylint: disable=import-outside-toplevel
    if interpret is True:
      from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
      interpret = pltpu.InterpretParams()
    return tpu.decode_partials(prep, interpret=interpret, count_blocks=count_blocks)
  from pallas_kernels.decode import gpu  # pylint: disable=import-outside-toplevel
  return gpu.decode_partials(prep, interpret=interpret, count_blocks=count_blocks)


def decode_attention(q, k_cache, v_cache, lengths, *, scale=None, q_positions=None,
                     kv_positions=None, window_left=None, sinks=None, softcap=None,
                     block_kv=None, num_splits=None, platform=None, interpret=None,
                     return_lse=False):
  """Attention of ``q [B, Tq, Hq, D]`` (a few new tokens) over a KV cache.

  Args:
    q: ``[B, Tq, Hq, D]`` queries (float32 / bfloat16 / float16).
    k_cache, v_cache: ``[B, S, Hkv, D]`` / ``[B, S, Hkv, Dv]`` (``Hq % Hkv == 0``); the layout of
      ``attnjax.layers.common.KVCache``.
    lengths: ``int32 [B]`` tokens written so far per example (ragged).
    scale: logit scale, default ``1/sqrt(D)``; a static Python float (a constant of the kernels:
      a traced value raises).
    q_positions: ``int [B, Tq]`` positions of the queries, default ``lengths[b] - Tq + t``.
    kv_positions: ``int [B, S]`` position held by each slot (``-1`` = empty; ring buffers),
      default the slot index.
    window_left: key ``kp`` visible to query ``qp`` only if ``kp >= qp - window_left``.
    sinks: ``[Hq]`` sink logits joining the softmax denominator (gpt-oss).
    softcap: ``c`` such that logits become ``c * tanh(logit / c)`` (before masking); a static
      finite real number > 0 (not a bool), or None.
    block_kv: keys per block. TPU: multiple of 128 (8 when interpreting); GPU: power of two
      >= 16. Must divide ``S``; left ``None``, a size dividing ``S`` is chosen, else the cache is
      padded internally to the smallest multiple of a candidate size (a copy on every call, with
      a ``CachePaddingWarning``: size caches to a multiple of 128). On a compiled GPU, head
      dims that are not powers of two >= 16 are zero-padded the same way (a copy of the cache,
      warned); store such caches padded.
    num_splits: splits of the live blocks (1..S/block_kv); default from S/block_kv, B and Hkv.
    platform: ``"tpu"`` or ``"gpu"``; default the running backend, ``"gpu"`` on CPU.
    interpret: None (default): interpret unless running on the platform's hardware. True:
      interpret; on ``"tpu"`` that is the TPU interpreter (``pltpu.InterpretParams()``, which
      models SMEM/VMEM and DMAs and is slow), unlike the flash TPU kernel, where True means
      Pallas' generic interpreter and None off TPU the TPU interpreter; on ``"gpu"`` Pallas'
      generic interpreter. False: compile (Mosaic / Triton); lowering it for any other
      platform raises a ``ValueError`` naming ``interpret``. For TPU also a
      ``pltpu.InterpretParams``. Anything else (e.g. a string) raises.
    return_lse: also return the natural-log LSE ``float32 [B, Tq, Hq]``.

  Key ``s`` is visible to query ``t`` iff ``0 <= kp < lengths[b]``, ``kp <= qp`` and (window)
  ``kp >= qp - window_left``. A query with an empty denominator returns 0 and LSE ``-inf``.
  Returns ``out [B, Tq, Hq, Dv]`` in ``q.dtype`` (and the LSE). Forward only: differentiating
  raises ``NotImplementedError``.
  """
  platform = common.resolve_platform(platform)
  interp = common.resolve_interpret(platform, interpret)
  prep = common.prepare(q, k_cache, v_cache, lengths, scale=scale, q_positions=q_positions,
                        kv_positions=kv_positions, window_left=window_left, softcap=softcap,
                        block_kv=block_kv, num_splits=num_splits, platform=platform,
                        interpret=interp is not False)
  sinks = common.check_sinks(sinks, prep.hq)

  def run(prep, sinks):
    acc, m, l = decode_partials(prep, platform=platform, interpret=interp)
    return common.combine(prep, acc, m, l, sinks, return_lse, out_dtype=q.dtype)

  return _forward_only(run, prep, sinks)


def _forward_only(f, *args):
  """``f(*args)`` with a VJP that raises: the decode kernels have no backward pass."""
  arrays, static = [], []
  leaves, tree = jax.tree_util.tree_flatten(args)
  for x in leaves:
    (arrays if isinstance(x, jax.Array) else static).append(x)
  is_array = [isinstance(x, jax.Array) for x in leaves]

  def rebuild(arrs):
    it_a, it_s = iter(arrs), iter(static)
    return jax.tree_util.tree_unflatten(
        tree, [next(it_a) if a else next(it_s) for a in is_array])

  @jax.custom_vjp
  def g(*arrs):
    return f(*rebuild(arrs))

  def fwd(*arrs):
    raise NotImplementedError("decode_attention is forward-only (decoding needs no gradient); "
                              "use attnjax.attention for a differentiable computation")

  g.defvjp(fwd, lambda res, ct: None)
  return g(*arrays)
