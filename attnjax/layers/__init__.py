"""Flax NNX attention layers, one module per family. Every layer computes its attention through
:func:`attnjax.attention`, takes ``impl=`` and so runs on every backend.

Language / sequence: :class:`MultiHeadAttention` (MHA/GQA/MQA, RoPE, QK-norm, gating, KV-cache
decoding, sliding windows with a ring-buffer cache), :class:`StridedHeadsAttention` (S2),
:class:`MultiHeadLatentAttention` (MLA), :class:`MixtureOfHeadsAttention` (MoH).

Vision: :class:`NeighborhoodAttention1D`/``2D``/``3D``, :class:`WindowAttention` (Swin),
:class:`HiLoAttention`, :class:`AgentAttention`, :class:`SpatialReductionAttention` (PVT),
:class:`CascadedGroupAttention` (EfficientViT), :class:`ChannelAttention` (DaViT).
"""

from attnjax.layers.agent import AgentAttention
from attnjax.layers.cascaded import CascadedGroupAttention
from attnjax.layers.channel import ChannelAttention
from attnjax.layers.common import KVCache, LatentKVCache, CrossKV, RMSNorm, apply_rope
from attnjax.layers.hilo import HiLoAttention
from attnjax.layers.mha import (ContextParallel, MultiHeadAttention,
                                sliding_window_attention)
from attnjax.layers.mla import MultiHeadLatentAttention
from attnjax.layers.moh import MixtureOfHeadsAttention
from attnjax.layers.neighborhood import (NeighborhoodAttention1D, NeighborhoodAttention2D,
                                         NeighborhoodAttention3D)
from attnjax.layers.spatial_reduction import SpatialReductionAttention
from attnjax.layers.strided import StridedHeadsAttention
from attnjax.layers.window import WindowAttention

__all__ = [
    "ContextParallel",
    "MultiHeadAttention", "sliding_window_attention", "StridedHeadsAttention",
    "MultiHeadLatentAttention", "MixtureOfHeadsAttention", "KVCache", "LatentKVCache", "CrossKV",
    "RMSNorm", "apply_rope", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
    "NeighborhoodAttention3D", "WindowAttention", "HiLoAttention", "AgentAttention",
    "SpatialReductionAttention", "CascadedGroupAttention", "ChannelAttention",
]
