"""Autoregressive generation with a :class:`attnjax.models.DecoderLM` (greedy or sampled).

Sampling draws from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
tokens (Fan et al. 2018, "Hierarchical Neural Story Generation"); ``temperature = 0`` is greedy
decoding (argmax, ties to the lower token id). Step ``i`` (0-based) of the generation uses the
key ``jax.random.fold_in(rng, i)``, in both the cached and the uncached path, so the two give
the same tokens for the same ``rng`` (up to float rounding of the logits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.backends.base import explicit_spec
from attnjax.layers import common


def sample_logits(logits, key, temperature: float, top_k: int | None):
  """Next tokens ``int32 [B]`` from ``logits [B, V]``: argmax if ``temperature == 0``, else a
  sample of ``softmax(logits / temperature)`` over the ``top_k`` largest logits (all when
  ``top_k`` is None)."""
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if top_k is None:
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
  vals, idx = jax.lax.top_k(logits, top_k)                     # exactly k candidates
  choice = jax.random.categorical(key, vals / temperature, axis=-1)
  return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "use_cache"))
def _generate(graphdef, state, prompt, rng, *, max_new_tokens, temperature, top_k, use_cache):
  model = nnx.merge(graphdef, state)
  B, T0 = prompt.shape
  total = T0 + max_new_tokens
  spec = explicit_spec(prompt)   # explicit-axes mesh: the buffer is sharded like the prompt
  kw = {} if spec is None else {"out_sharding": jax.sharding.PartitionSpec(*spec)}
  buf = jnp.zeros((B, total), jnp.int32, **kw).at[:, :T0].set(prompt)
  sample = lambda logits, i: sample_logits(
      logits, None if temperature == 0 else jax.random.fold_in(rng, i), temperature, top_k)
  if not use_cache:
    # The oracle: the whole (fixed-size) buffer through the parallel forward at every step;
    # causality makes the not-yet-generated tail irrelevant to the logits at position t - 1.
    def body(i, buf):
      t = T0 + i
      logits = model(buf)
      nxt = sample(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), i)
      return jax.lax.dynamic_update_index_in_dim(buf, nxt, t, axis=1)
    return jax.lax.fori_loop(0, max_new_tokens, body, buf)

  # a batch-sharded prompt (explicit mesh) gets caches split the same way over their batch axis
  # (where the mesh axis is free in them: a prompt split over "tensor" leaves head-split caches)
  cache = model.init_cache(B, total)
  if spec is not None and spec[0] is not None:
    cache = common.shard_cache_batch(cache, spec[0], strict=False)
  logits, cache = model.decode(prompt, cache)                  # prefill
  nxt = sample(logits[:, -1], 0)
  buf = buf.at[:, T0].set(nxt)

  def step(i, carry):
    buf, cache, tok = carry
    logits, cache = model.decode(tok[:, None], cache)          # one token per step
    nxt = sample(logits[:, 0], i)
    return jax.lax.dynamic_update_index_in_dim(buf, nxt, T0 + i, axis=1), cache, nxt
  buf, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (buf, cache, nxt))
  return buf


def generate(model, prompt, max_new_tokens: int, *, rng=None, temperature: float = 0.0,
             top_k: int | None = None, use_cache: bool = True):
  """Extend ``prompt int [B, T0]`` by ``max_new_tokens`` tokens; returns ``int32 [B, T0 +
  max_new_tokens]`` (the prompt, then the generated tokens).

  ``temperature = 0``: greedy; ``temperature > 0``: sample ``softmax(logits / temperature)``
  restricted to the ``top_k`` largest logits (all if None), with ``rng`` (a JAX key; required
  when sampling); prompt ids outside ``[0, vocab_size)`` raise ``ValueError``.
  ``use_cache=True`` prefills the prompt into ``model.init_cache`` and then decodes one token
  per step inside a ``jax.lax.fori_loop`` (one compiled program per model structure, shapes and
  sampling settings); ``use_cache=False`` recomputes the full forward
  over the fixed-size token buffer at every step (slow; the reference for tests, and the way
  to generate with an attention that has no KV cache). All prompts have length ``T0``.
  Context parallelism (``model.set_context_parallel``) is ignored by the cached path and an
  error with ``use_cache=False``.
  """
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be an int array [B, T0] with T0 >= 1, got "
                     f"{prompt.dtype}{prompt.shape}")
  if callable(getattr(model, "check_tokens", None)):
    model.check_tokens(prompt, "prompt")  # ids in [0, vocab_size) (generation runs under jit)
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
  temperature = float(temperature)
  if not temperature >= 0.0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  vocab = getattr(model, "vocab_size", None)
  if top_k is not None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1 or \
        (vocab is not None and top_k > vocab):
      raise ValueError(f"top_k must be None or an int in [1, vocab_size={vocab}], got {top_k!r}")
    top_k = int(top_k)
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng, a JAX random key")
  if rng is None:
    rng = jax.random.key(0)  # unused by greedy decoding
  prompt = prompt.astype(jnp.int32)
  if max_new_tokens == 0:
    return prompt
  if not use_cache and getattr(model, "context_parallel", None) is not None:
    raise ValueError("generate(use_cache=False) runs the parallel forward on tokens in natural "
                     "order, but the model has context parallelism enabled (tokens in a "
                     "load-balancing layout); call model.set_context_parallel(None) first, or "
                     "use use_cache=True (decoding ignores context parallelism)")
  if use_cache and hasattr(model, "_require_decodable"):
    model._require_decodable()  # pylint: disable=protected-access  (clear error before tracing)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt, rng, max_new_tokens=int(max_new_tokens),
                   temperature=temperature if temperature > 0 else 0.0,
                   top_k=top_k if temperature > 0 else None, use_cache=bool(use_cache))


__all__ = ["generate", "sample_logits"]
