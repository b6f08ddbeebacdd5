"""Small models assembled from :mod:`attnjax.layers`: a decoder-only LM and a ViT.

* :class:`DecoderLM` — pre-norm decoder LM (Vaswani et al. 2017) with RoPE (Su et al. 2021),
  SwiGLU MLPs (Shazeer 2020) and any causal attention of :data:`LM_ATTENTIONS`; KV-cache
  decoding (:meth:`DecoderLM.init_cache`, :meth:`DecoderLM.decode`) and :func:`generate`.
* :class:`ViT` — Vision Transformer (Dosovitskiy et al. 2021) with any 2-D attention of
  :data:`VIT_ATTENTIONS`.
* :func:`build_model` — either model from a config mapping with ``kind`` in ``{"lm", "vit"}``.
"""

from attnjax.models.generate import generate
from attnjax.models.lm import DecoderLM
from attnjax.models.registry import LM_ATTENTIONS, VIT_ATTENTIONS, build_model
from attnjax.models.vit import ViT

__all__ = ["DecoderLM", "ViT", "build_model", "generate", "LM_ATTENTIONS", "VIT_ATTENTIONS"]
