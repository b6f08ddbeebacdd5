"""Attention registries of the models, the shared dense building block, and :func:`build_model`.

``LM_ATTENTIONS`` / ``VIT_ATTENTIONS`` map a name to an :class:`AttentionEntry`: a factory
``entry(dims, attention_kwargs, rngs=rngs) -> layer`` that builds the attention layer of one
block from the model's dimensions (:class:`LMDims` / :class:`ViTDims`) and the user's
``attention_kwargs`` (extra constructor arguments of the layer). Unknown names, unknown or
model-owned keyword arguments raise ``ValueError`` listing the valid choices (with a "did you
mean" from :mod:`difflib`).

Sharding. Model kernels are annotated with logical axis names: the attention layers' names of
:data:`attnjax.layers.common.AXIS_RULES` (``"embed"``, ``"heads"`` ...) plus the model-level
names of :data:`MODEL_AXIS_RULES` (``"mlp"`` and ``"vocab"`` -> mesh axis ``"tensor"``).
:data:`attnjax.layers.common.AXIS_RULES` is consulted first (at construction time), so a train
script that sets ``AXIS_RULES["embed"] = "fsdp"`` before building shards the model width of
every kernel (layers and models) over the ``"fsdp"`` mesh axis.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.layers import common
from attnjax.layers.agent import AgentAttention
from attnjax.layers.cascaded import CascadedGroupAttention
from attnjax.layers.channel import ChannelAttention
from attnjax.layers.hilo import HiLoAttention
from attnjax.layers.mha import MultiHeadAttention
from attnjax.layers.mla import MultiHeadLatentAttention
from attnjax.layers.moh import MixtureOfHeadsAttention
from attnjax.layers.neighborhood import NeighborhoodAttention2D
from attnjax.layers.spatial_reduction import SpatialReductionAttention
from attnjax.layers.strided import StridedHeadsAttention
from attnjax.layers.window import WindowAttention

# ---------------------------------------------------------------------------------------------
# Errors with "did you mean"
# ---------------------------------------------------------------------------------------------


def choice_error(what: str, value, valid) -> ValueError:
  """``ValueError`` for an unknown ``what`` naming the valid choices and close matches."""
  valid = sorted(str(v) for v in valid)
  close = difflib.get_close_matches(str(value), valid, n=3, cutoff=0.5)
  hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
  return ValueError(f"unknown {what} {value!r}{hint}; valid choices: "
                    + ", ".join(repr(v) for v in valid))


def lookup(registry: Mapping[str, Any], name, what: str):
  if not isinstance(name, str) or name not in registry:
    raise choice_error(what, name, registry)
  return registry[name]


# ---------------------------------------------------------------------------------------------
# Sharding annotations and the dense layer of embeddings / MLPs
# ---------------------------------------------------------------------------------------------

MODEL_AXIS_RULES: dict[str, str | None] = {
    "mlp": "tensor",    # MLP hidden units: tensor parallel
    "vocab": "tensor",  # vocabulary (embedding table rows, output projection columns)
    "classes": None,    # ViT classifier outputs
    "patch": None,      # flattened patch pixels / position-embedding token axis
}


def model_mesh_axes(*logical: str | None) -> tuple[str | None, ...]:
  """Mesh axis per logical axis: ``common.AXIS_RULES`` first, then :data:`MODEL_AXIS_RULES`."""
  out = []
  for name in logical:
    if name is None:
      out.append(None)
    elif name in common.AXIS_RULES:
      out.append(common.AXIS_RULES[name])
    elif name in MODEL_AXIS_RULES:
      out.append(MODEL_AXIS_RULES[name])
    else:
      raise choice_error("logical axis", name, {**common.AXIS_RULES, **MODEL_AXIS_RULES})
  return tuple(out)


def model_partitioned(init, *logical: str | None):
  """Like :func:`attnjax.layers.common.partitioned` with the model axis names added:
  metadata only without an active mesh, eager sharding under ``jax.set_mesh(mesh)``."""
  try:
    mesh_active = not jax.sharding.get_abstract_mesh().empty
  except Exception:  # pragma: no cover - jax without abstract meshes
    mesh_active = False
  kwargs = {} if mesh_active else {"eager_sharding": False}
  return nnx.with_partitioning(init, model_mesh_axes(*logical), **kwargs)


class Dense(nnx.Module):
  """``y = x W (+ b)`` with a float32 (``param_dtype``) kernel annotated ``(in_axis,
  out_axis)``, computed in ``dtype`` with float32 accumulation, returned in ``out_dtype``
  (default ``dtype``)."""

  def __init__(self, in_features: int, out_features: int, in_axis: str | None,
               out_axis: str | None, *, use_bias: bool = False, kernel_init=None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kernel_init = kernel_init or nnx.initializers.lecun_normal()
    self.dtype = dtype
    self.kernel = nnx.Param(model_partitioned(kernel_init, in_axis, out_axis)(
        rngs.params(), (int(in_features), int(out_features)), param_dtype))
    self.bias = nnx.Param(model_partitioned(nnx.initializers.zeros_init(), out_axis)(
        rngs.params(), (int(out_features),), param_dtype)) if use_bias else None

  def __call__(self, x, out_dtype=None):
    kernel = self.kernel[...].astype(self.dtype)
    kw = {}
    out_spec = common.explicit_out_spec(x, kernel, 1)  # explicit-axes mesh: state the output
    if out_spec is not None:                            # sharding (contracted axes may be split)
      kw["out_sharding"] = jax.sharding.PartitionSpec(*out_spec)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32, **kw)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(out_dtype or self.dtype)


# ---------------------------------------------------------------------------------------------
# Registry entries
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMDims:
  """What an LM attention factory gets from the model (``head_dim=None``: d_model/heads)."""
  d_model: int
  num_heads: int
  num_kv_heads: int | None
  head_dim: int | None
  rope_theta: float | None
  dtype: Any
  param_dtype: Any
  layer_index: int = 0
  num_layers: int = 1


@dataclasses.dataclass(frozen=True)
class ViTDims:
  """What a ViT attention factory gets from the model; ``grid = (H/p, W/p)`` patch grid."""
  dim: int
  num_heads: int
  grid: tuple
  dtype: Any
  param_dtype: Any
  layer_index: int = 0
  depth: int = 1


@dataclasses.dataclass(frozen=True)
class AttentionEntry:
  """A registered attention: ``entry(dims, attention_kwargs, rngs=rngs) -> nnx.Module``.

  ``needs_grid``: the layer is called as ``layer(x, grid_size=(gh, gw))`` on patch tokens only
  (vision); ``decodable``: the layer has ``init_cache``/``decode`` (language); ``doc``: one
  line on what it builds and which ``attention_kwargs`` it reads."""
  build: Callable
  doc: str
  needs_grid: bool = False
  decodable: bool = False

  def __call__(self, dims, attention_kwargs=None, *, rngs: nnx.Rngs):
    return self.build(dims, dict(attention_kwargs or {}), rngs)


def _init_params(cls) -> set[str]:
  """Keyword parameters of ``cls.__init__``, following ``**kwargs`` up the MRO."""
  names: set[str] = set()
  for klass in cls.__mro__:
    init = klass.__dict__.get("__init__")
    if init is None:
      continue
    more = False
    for p in inspect.signature(init).parameters.values():
      if p.kind is inspect.Parameter.VAR_KEYWORD:
        more = True
      elif p.name != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL:
        names.add(p.name)
    if not more:
      break
  return names


_LM_RESERVED = {"num_heads", "in_features", "num_kv_heads", "head_dim", "rope_theta", "dtype",
                "param_dtype", "rngs", "causal", "in_kv_features", "out_features"}
_VIT_RESERVED = {"dim", "num_heads", "in_features", "dtype", "param_dtype", "rngs", "causal",
                 "grid_size", "in_kv_features", "out_features"}


def _make(attention: str, cls, reserved, user: dict, *args, required=(), defaults=None, **fixed):
  """``cls(*args, **{**defaults, **user, **fixed})`` after checking the user's keys."""
  allowed = _init_params(cls) - reserved - set(fixed)
  for key in user:
    if key in reserved or key in fixed:
      raise ValueError(f"attention_kwargs[{key!r}] is set by the model for attention="
                       f"{attention!r}; set it on the model constructor instead (allowed "
                       f"attention_kwargs: {', '.join(sorted(allowed))})")
    if key not in allowed:
      raise choice_error(f"attention_kwargs key for attention={attention!r}", key, allowed)
  for key in required:
    if key not in user:
      raise ValueError(f"attention={attention!r} needs attention_kwargs[{key!r}] (allowed "
                       f"attention_kwargs: {', '.join(sorted(allowed))})")
  return cls(*args, **{**(defaults or {}), **user, **fixed})


# ---------------------------------------------------------------------------------------------
# Language-model attentions (all causal)
# ---------------------------------------------------------------------------------------------


def _mha_like(name, cls, kv_heads=None, required=(), defaults=None):
  """Factory of a :class:`MultiHeadAttention`-family layer. ``kv_heads``: a callable checking
  ``dims`` and returning ``num_kv_heads`` (default: the model's, ``None`` = ``num_heads``)."""

  def build(d: LMDims, user: dict, rngs):
    hkv = kv_heads(d) if kv_heads is not None else d.num_kv_heads
    return _make(name, cls, _LM_RESERVED, user, d.num_heads, d.d_model, required=required,
                 defaults=defaults, head_dim=d.head_dim, num_kv_heads=hkv,
                 rope_theta=d.rope_theta, causal=True, dtype=d.dtype,
                 param_dtype=d.param_dtype, rngs=rngs)
  return build


def _kv_mha(d: LMDims):
  if d.num_kv_heads not in (None, d.num_heads):
    raise ValueError(f"attention='mha' uses num_kv_heads == num_heads={d.num_heads}, got "
                     f"num_kv_heads={d.num_kv_heads}; use attention='gqa' (or 'mqa')")
  return d.num_heads


def _kv_gqa(d: LMDims):
  if d.num_kv_heads is None:
    raise ValueError(f"attention='gqa' needs num_kv_heads (a divisor of num_heads="
                     f"{d.num_heads}, e.g. {max(1, d.num_heads // 4)})")
  return d.num_kv_heads


def _kv_mqa(d: LMDims):
  if d.num_kv_heads not in (None, 1):
    raise ValueError(f"attention='mqa' uses num_kv_heads=1, got num_kv_heads={d.num_kv_heads}; "
                     f"use attention='gqa'")
  return 1


def _build_moh(d: LMDims, user: dict, rngs):
  shared = user.get("num_shared_heads", d.num_heads // 2)
  routed = d.num_heads - shared if isinstance(shared, int) else 0
  defaults = dict(num_shared_heads=d.num_heads // 2, top_k=max(1, routed // 2))
  return _mha_like("moh", MixtureOfHeadsAttention, defaults=defaults)(d, user, rngs)


def _build_mla(d: LMDims, user: dict, rngs):
  if d.num_kv_heads is not None:
    raise ValueError(f"attention='mla' shares one compressed latent across heads and takes no "
                     f"num_kv_heads (got {d.num_kv_heads}); leave num_kv_heads=None")
  if d.rope_theta is None:
    raise ValueError("attention='mla' uses decoupled RoPE and needs rope_theta (a float > 0)")
  hd = d.head_dim or d.d_model // d.num_heads
  defaults = dict(kv_lora_rank=4 * hd, qk_nope_head_dim=hd, v_head_dim=hd,
                  qk_rope_head_dim=max(2, (hd // 2) // 2 * 2))
  return _make("mla", MultiHeadLatentAttention, _LM_RESERVED, user, d.num_heads, d.d_model,
               defaults=defaults, rope_theta=d.rope_theta, causal=True, dtype=d.dtype,
               param_dtype=d.param_dtype, rngs=rngs)


LM_ATTENTIONS: dict[str, AttentionEntry] = {
    "mha": AttentionEntry(_mha_like("mha", MultiHeadAttention, _kv_mha),
                          "MultiHeadAttention, num_kv_heads == num_heads (Vaswani et al. 2017)",
                          decodable=True),
    "gqa": AttentionEntry(_mha_like("gqa", MultiHeadAttention, _kv_gqa),
                          "grouped-query attention; needs the model's num_kv_heads "
                          "(Ainslie et al. 2023)", decodable=True),
    "mqa": AttentionEntry(_mha_like("mqa", MultiHeadAttention, _kv_mqa),
                          "multi-query attention, one KV head (Shazeer 2019)", decodable=True),
    "gated": AttentionEntry(_mha_like("gated", MultiHeadAttention,
                                      defaults=dict(gate="elementwise")),
                            "output-gated attention G1 (Qiu et al. 2025); attention_kwargs "
                            "gate='elementwise' (default) | 'headwise'", decodable=True),
    "sliding_window": AttentionEntry(_mha_like("sliding_window", MultiHeadAttention,
                                               required=("window",)),
                                     "causal sliding window of attention_kwargs['window'] keys "
                                     "(Mistral); ring-buffer KV cache", decodable=True),
    "strided_heads": AttentionEntry(_mha_like("strided_heads", StridedHeadsAttention,
                                              required=("stride",)),
                                    "S2-Attention (Lin et al. 2024); attention_kwargs stride "
                                    "(required), local_window, block, ...", decodable=True),
    "moh": AttentionEntry(_build_moh, "mixture-of-heads (Jin et al. 2024), load-balance aux "
                          "loss; attention_kwargs num_shared_heads (default H/2), top_k",
                          decodable=True),
    "mla": AttentionEntry(_build_mla, "DeepSeek-V2 latent attention; attention_kwargs "
                          "kv_lora_rank (4 d_h), qk_nope_head_dim (d_h), qk_rope_head_dim "
                          "(d_h/2), v_head_dim (d_h), q_lora_rank, absorb", decodable=True),
}

# ---------------------------------------------------------------------------------------------
# ViT attentions (non-causal; grid layers see the (H/p, W/p) patch grid)
# ---------------------------------------------------------------------------------------------


def _odd_at_most(n: int, cap: int) -> int:
  k = min(cap, n)
  return k if k % 2 else max(1, k - 1)


def _swin_window(g: int) -> int:
  """Largest divisor of ``g`` that is <= 7 and leaves at least two windows (else ``g``)."""
  divs = [w for w in range(1, min(7, g) + 1) if g % w == 0 and w < g]
  return max(divs) if divs and max(divs) > 1 else g


def _vit(name, cls, defaults_fn=lambda d, u: {}, **fixed_fn):
  def build(d: ViTDims, user: dict, rngs):
    defaults = defaults_fn(d, user)
    fixed = {k: f(d, user) for k, f in fixed_fn.items()}
    return _make(name, cls, _VIT_RESERVED, user, d.dim, d.num_heads, defaults=defaults,
                 dtype=d.dtype, param_dtype=d.param_dtype, rngs=rngs, **fixed)
  return build


def _global(d: ViTDims, user: dict, rngs):
  return _make("global", MultiHeadAttention, _VIT_RESERVED, user, d.num_heads, d.dim,
               causal=False, dtype=d.dtype, param_dtype=d.param_dtype, rngs=rngs)


def _swin(d: ViTDims, user: dict, rngs):
  ws = user.pop("window_size", _swin_window(min(d.grid)))
  shift = user.pop("shift_size", None)
  ws_t = tuple(ws) if isinstance(ws, (tuple, list)) else (ws, ws)
  if shift is None:
    shift = tuple(w // 2 for w in ws_t)
  shift = shift if d.layer_index % 2 else 0   # Swin: W-MSA, SW-MSA, W-MSA, ...
  return _make("swin", WindowAttention, _VIT_RESERVED, user, d.dim, d.num_heads, ws,
               shift_size=shift, dtype=d.dtype, param_dtype=d.param_dtype, rngs=rngs)


VIT_ATTENTIONS: dict[str, AttentionEntry] = {
    "global": AttentionEntry(_global, "global multi-head self-attention (ViT, Dosovitskiy et "
                             "al. 2021)"),
    "neighborhood": AttentionEntry(
        _vit("neighborhood", NeighborhoodAttention2D,
             lambda d, u: {} if "kernel_size" in u else
             {"kernel_size": _odd_at_most(min(d.grid), 7)}),
        "2-D neighborhood attention (NAT); kernel_size default min(7, grid) made odd",
        needs_grid=True),
    "swin": AttentionEntry(_swin, "Swin window attention, shifted windows (window/2) in odd "
                           "blocks; window_size default: largest divisor <= 7 of the grid",
                           needs_grid=True),
    "hilo": AttentionEntry(_vit("hilo", HiLoAttention), "LITv2 HiLo attention "
                           "(window_size 2, alpha 0.5 by default)", needs_grid=True),
    "agent": AttentionEntry(
        _vit("agent", AgentAttention,
             lambda d, u: {"agent_num": min(7, *d.grid) ** 2},
             grid_size=lambda d, u: tuple(d.grid)),
        "agent attention (Han et al. 2024), agent_num default min(7, grid)^2, position biases "
        "sized for the patch grid", needs_grid=True),
    "spatial_reduction": AttentionEntry(
        _vit("spatial_reduction", SpatialReductionAttention,
             lambda d, u: {"sr_ratio": 2 if min(d.grid) >= 2 else 1}),
        "PVT spatial-reduction attention (sr_ratio default 2)", needs_grid=True),
    "cascaded": AttentionEntry(
        _vit("cascaded", CascadedGroupAttention,
             lambda d, u: {"key_dim": min(16, d.dim // d.num_heads),
                           "kernels": _odd_at_most(min(d.grid), 5),
                           "resolution": tuple(d.grid)}),
        "EfficientViT cascaded group attention over the whole patch grid", needs_grid=True),
    "channel": AttentionEntry(_vit("channel", ChannelAttention),
                              "DaViT channel group attention (all tokens, cls included)"),
}

# ---------------------------------------------------------------------------------------------
# build_model
# ---------------------------------------------------------------------------------------------


def _to_dict(cfg) -> dict:
  if hasattr(cfg, "to_dict"):          # ml_collections ConfigDict / FrozenConfigDict
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise ValueError(f"cfg must be a mapping (dict or ml_collections ConfigDict), got "
                     f"{type(cfg).__name__}")
  return dict(cfg)


def model_classes() -> dict:
  from attnjax.models.lm import DecoderLM  # pylint: disable=import-outside-toplevel
  from attnjax.models.vit import ViT  # pylint: disable=import-outside-toplevel
  return {"lm": DecoderLM, "vit": ViT}


def build_model(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  """Build a model from ``cfg``: a mapping with ``kind`` (``"lm"`` -> :class:`DecoderLM`,
  ``"vit"`` -> :class:`ViT`) and that constructor's keyword arguments (everything except
  ``rngs``). Unknown kinds, keys or attention names and missing required keys raise
  ``ValueError`` listing the valid choices."""
  cfg = _to_dict(cfg)
  if "kind" not in cfg:
    raise ValueError(f"cfg needs 'kind'; valid choices: {sorted(model_classes())}")
  kind = cfg.pop("kind")
  cls = lookup(model_classes(), kind, "model kind")
  params = inspect.signature(cls.__init__).parameters
  valid = {n for n, p in params.items() if n not in ("self", "rngs")
           and p.kind is inspect.Parameter.KEYWORD_ONLY}
  for key in cfg:
    if key not in valid:
      raise choice_error(f"cfg key for kind={kind!r}", key, valid)
  missing = sorted(n for n in valid if params[n].default is inspect.Parameter.empty
                   and n not in cfg)
  if missing:
    raise ValueError(f"cfg for kind={kind!r} is missing required keys {missing}; valid keys: "
                     + ", ".join(sorted(valid)))
  if cfg.get("attention_kwargs") is not None:
    cfg["attention_kwargs"] = _to_dict(cfg["attention_kwargs"])
  registry = LM_ATTENTIONS if kind == "lm" else VIT_ATTENTIONS
  if "attention" in cfg:
    lookup(registry, cfg["attention"], f"attention for kind={kind!r}")
  return cls(**cfg, rngs=rngs)


__all__ = ["LM_ATTENTIONS", "VIT_ATTENTIONS", "AttentionEntry", "LMDims", "ViTDims",
           "MODEL_AXIS_RULES", "model_mesh_axes", "model_partitioned", "Dense", "build_model",
           "choice_error", "lookup"]
