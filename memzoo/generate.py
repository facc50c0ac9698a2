"""Generation: prefill with the parallel path, then decode token by token with the step path.

Memories decode with O(1) state per layer (their ``step``); attention layers with a KV cache.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.models.lm import LM

Array = jax.Array


def sample_token(logits: Array, key: Array, temperature: float = 0.0, top_k: int = 0) -> Array:
    """Greedy (temperature 0) or temperature / top-k sampling from logits [B, V] -> [B]."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, prompt, max_len):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(prompt.shape[0], max_len)
    logits, cache = model(prompt, cache=cache)
    return logits, cache


@partial(jax.jit, static_argnames=("graphdef", "steps", "temperature", "top_k"))
def _decode(graphdef, state, cache, first, key, steps, temperature, top_k):
    model = nnx.merge(graphdef, state)

    def body(carry, key_t):
        tok, cache = carry
        logits, cache = model(tok[:, None], cache=cache)
        nxt = sample_token(logits[:, -1], key_t, temperature, top_k)
        return (nxt, cache), nxt

    keys = jax.random.split(key, steps)
    (_, cache), toks = jax.lax.scan(body, (first, cache), keys)
    return toks.T, cache


def generate(
    model: LM,
    prompt: Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> Array:
    """Continue ``prompt`` int [B, P] (P >= 1) by ``max_new_tokens``; returns [B, P + N]."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int [batch, time>=1], got shape {prompt.shape}")
    if max_new_tokens <= 0:
        return prompt
    graphdef, state = nnx.split(model)
    max_len = prompt.shape[1] + max_new_tokens
    logits, cache = _prefill(graphdef, state, prompt, max_len)
    key0, key = jax.random.split(jax.random.key(seed))
    first = sample_token(logits[:, -1], key0, temperature, top_k)
    if max_new_tokens == 1:
        return jnp.concatenate([prompt, first[:, None]], axis=1)
    rest, _ = _decode(
        graphdef, state, cache, first, key, max_new_tokens - 1, float(temperature), int(top_k)
    )
    return jnp.concatenate([prompt, first[:, None], rest], axis=1)
