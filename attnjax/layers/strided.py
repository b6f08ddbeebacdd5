"""S2-Attention: heterogeneous context sharding among attention heads.

Paper: Lin et al. 2024, "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads"
(earlier title "Efficient LLM Training and Serving with Heterogeneous Context Sharding among
Attention Heads"); reference kernel library DKernel.
"""

from __future__ import annotations

from flax import nnx

from attnjax import masks as masks_lib
from attnjax.layers import common
from attnjax.layers.mha import MultiHeadAttention


def strided_head_masks(num_heads: int, stride: int, local_window: int, *, block: int = 1,
                       offset: int = 0, head_step: int | None = None,
                       num_kv_heads: int | None = None, kv_group_patterns: bool = True,
                       num_dense_heads: int = 0):
  """Per-head masks of S2-Attention (without the causal part), one per query head.

  Sparse head ``h`` has pattern index ``p = h // (H / Hkv)`` when ``kv_group_patterns`` (heads
  that share a KV head share a pattern, which keeps the KV-cache saving under GQA) else
  ``p = h``; it sees key ``j`` iff ``(j // block + p * step + offset) % stride == 0`` (its shard
  of the context, DKernel's vertical stride) or ``|i - j| <= local_window`` (the dense local
  window), with ``step = head_step`` or ``max(1, stride // num_patterns)``. The last
  ``num_dense_heads`` heads see everything. Returns a list of ``num_heads`` masks."""
  H = num_heads
  Hkv = num_kv_heads or H
  group = H // Hkv
  num_patterns = Hkv if kv_group_patterns else H
  step = head_step if head_step is not None else max(1, stride // num_patterns)
  out = []
  for h in range(H):
    if h >= H - num_dense_heads:
      out.append(masks_lib.full())
      continue
    p = h // group if kv_group_patterns else h
    # masks.strided_heads: head h sees ((j // block) + o) % stride == h % stride, so choose o
    # with (j // block + p * step + offset) % stride == 0  <=>  (j // block + o) % stride == h.
    o = (p * step + offset + h) % stride
    out.append(masks_lib.strided_heads(stride, local_window, block=block, offset=o))
  return out


class StridedHeadsAttention(MultiHeadAttention):
  """S2-Attention (Lin et al. 2024): each head attends to a different strided shard of the
  context plus a dense local window; together the heads cover the whole context.

  Semantics (positions ``i`` query, ``j`` key): sparse head ``h`` with pattern index ``p``
  (``h // (H / Hkv)`` with ``kv_group_patterns=True``, else ``h``) sees ``j`` iff
  ``(j // block + p * step + offset) % stride == 0`` or ``i - local_window <= j <= i +
  local_window``; ``step = head_step or max(1, stride // num_patterns)`` (DKernel's
  ``head_sliding_step``). ``num_dense_heads`` last heads are dense. With ``causal=True``
  (default, the DKernel setting) additionally ``j <= i``. ``block`` is the granularity of the
  shards (DKernel shards blocks of 16-64 tokens; ``block=1`` shards tokens).

  Differences from DKernel: the local window is token-level (``local_window`` tokens back)
  rather than ``local_blocks`` whole blocks. The pattern is passed to
  :func:`attnjax.attention` as a per-head mask (:func:`attnjax.masks.strided_heads`), so every
  backend that skips empty blocks gets the sparsity.

  All :class:`MultiHeadAttention` options apply (GQA, RoPE, QK-norm, gate, sinks, decoding
  with a KV cache). Raises ``ValueError`` when the patterns do not cover every residue modulo
  ``stride`` (then some distant keys are seen by no head) and there are no dense heads.
  """

  def __init__(self, num_heads: int, in_features: int, *, stride: int, local_window: int = 0,
               block: int = 1, offset: int = 0, head_step: int | None = None,
               kv_group_patterns: bool = True, num_dense_heads: int = 0, causal: bool = True,
               mask: masks_lib.Mask | None = None, rngs: nnx.Rngs, **kwargs):
    stride = common.check_int("stride", stride, 1)
    local_window = common.check_int("local_window", local_window, 0)
    block = common.check_int("block", block, 1)
    offset = common.check_int("offset", offset)
    num_dense_heads = common.check_int("num_dense_heads", num_dense_heads, 0)
    if head_step is not None:
      head_step = common.check_int("head_step", head_step, 1)
    common.check_int("num_heads", num_heads, 1)
    if num_dense_heads > num_heads:
      raise ValueError(f"num_dense_heads={num_dense_heads} must be <= num_heads={num_heads}")
    if num_heads < stride:
      raise ValueError(f"stride={stride} needs num_heads >= stride so that the heads together "
                       f"cover every key residue; got num_heads={num_heads}")
    num_kv_heads = kwargs.get("num_kv_heads") or num_heads
    if num_kv_heads >= 1 and num_heads % num_kv_heads == 0:
      head_masks = strided_head_masks(
          num_heads, stride, local_window, block=block, offset=offset, head_step=head_step,
          num_kv_heads=num_kv_heads, kv_group_patterns=bool(kv_group_patterns),
          num_dense_heads=num_dense_heads)
      if num_dense_heads == 0:
        group = num_heads // num_kv_heads
        num_patterns = num_kv_heads if kv_group_patterns else num_heads
        step = head_step if head_step is not None else max(1, stride // num_patterns)
        covered = {(-(p * step + offset)) % stride for p in range(num_patterns)}
        if len(covered) != stride:
          raise ValueError(
              f"stride={stride}: the {num_patterns} head patterns (step={step}, offset={offset}"
              f"{', one per KV group' if kv_group_patterns and group > 1 else ''}) cover only "
              f"{len(covered)} of the {stride} key residues; increase num_heads/num_kv_heads, "
              f"set head_step, set kv_group_patterns=False or add num_dense_heads")
      s2 = masks_lib.per_head(head_masks)
    else:
      s2 = None  # MultiHeadAttention raises the divisibility error below
    self.stride, self.local_window, self.block = stride, local_window, block
    self.num_dense_heads = num_dense_heads
    super().__init__(num_heads, in_features, causal=causal,
                     mask=common.combine_masks(s2, mask), rngs=rngs, **kwargs)


__all__ = ["StridedHeadsAttention", "strided_head_masks"]
