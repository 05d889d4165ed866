"""Greedy decoding with a KV cache, jitted end to end.

Two layers:

- :func:`greedy_loop` is model-agnostic: given the logits for the first new token and a
  ``step_fn(cache, token [b], step) -> (logits [b, V], cache)``, it runs a
  ``jax.lax.while_loop`` that stops when every row has produced ``eos_token_id`` (or after
  ``max_new_tokens``) and pads finished rows. Encoder-decoder models reuse it with their own
  step function (decoder cache + encoder outputs in ``cache``).
- :func:`greedy_generate` drives a decoder-only model (``LlamaModel``): cache init, prefill
  of the (left-padded) prompt, then one token per step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

Array = Any
StepFn = Callable[[Any, Array, Array], tuple[Array, Any]]


def greedy_loop(step_fn: StepFn, cache: Any, first_logits: Array, max_new_tokens: int,
                eos_token_id: Optional[int] = None, pad_token_id: int = 0) -> Array:
    """Greedy tokens ``[b, max_new_tokens]`` from first logits ``[b, V]`` and a step function.

    ``step_fn(cache, token [b] int32, step: int32 scalar) -> (logits [b, V], cache)`` consumes
    the token produced at ``step`` (0-based). After a row emits ``eos_token_id`` its later
    tokens are ``pad_token_id``; the loop ends early once every row is done.
    """
    b = first_logits.shape[0]
    token = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
    done = (token == eos_token_id) if eos_token_id is not None else jnp.zeros((b,), bool)

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, token, tokens, done, cache = state
        logits, cache = step_fn(cache, token, i - 1)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_token_id, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i))
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
        return i + 1, nxt, tokens, done, cache

    state = (jnp.array(1, jnp.int32), token, tokens, done, cache)
    return jax.lax.while_loop(cond, body, state)[2]


def init_cache(model, variables: Mapping[str, Any], batch: int, max_len: int) -> Any:
    """Zero KV cache for ``batch`` rows of ``max_len`` tokens (soft-prompt inserts extend it).

    Traced with ``jax.eval_shape`` (no compute): every cache entry starts at zero.
    """
    ids = jnp.zeros((batch, max_len), jnp.int32)

    def run():
        _, mut = model.apply(dict(variables), ids, jnp.ones_like(ids), decode=True,
                             mutable=["cache"])
        return mut["cache"]

    shapes = jax.eval_shape(run)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def greedy_generate(model, variables: Mapping[str, Any], input_ids: Array,
                    attention_mask: Optional[Array], max_new_tokens: int,
                    eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None
                    ) -> Array:
    """Greedy continuation of a decoder-only model with a KV cache.

    input_ids, attention_mask ``[b, l]`` (prompts left-padded; 1 = real token);
    ``variables`` = ``{"params": base, "peft": delta?}``. Returns the new tokens
    ``[b, max_new_tokens]`` (after a row's EOS: ``pad_token_id``, default ``eos_token_id``
    or 0). Equals Hugging Face ``generate(do_sample=False)`` token for token.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = (jnp.ones_like(input_ids) if attention_mask is None
            else jnp.asarray(attention_mask, jnp.int32))
    if not bool(jnp.all(mask[:, -1] > 0)):
        raise ValueError("attention_mask: every prompt must end with a real token "
                         "(left-pad batches for generation)")
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    variables = {k: v for k, v in dict(variables).items() if k != "cache"}
    return _generate(model, int(max_new_tokens), eos_token_id, int(pad_token_id), variables,
                     input_ids, mask)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _generate(model, max_new_tokens: int, eos_token_id: Optional[int], pad_token_id: int,
              variables: Mapping[str, Any], input_ids: Array, mask: Array) -> Array:
    """Compiled once per (model, shapes, token ids), not per call."""
    b, l = input_ids.shape
    cache = init_cache(model, variables, b, l + max_new_tokens)
    out, mut = model.apply({**variables, "cache": cache}, input_ids, mask, decode=True,
                           prefill=True, mutable=["cache"])

    def step(cache, token, _):
        o, m = model.apply({**variables, "cache": cache}, token[:, None],
                           jnp.ones((b, 1), jnp.int32), decode=True, prefill=False,
                           mutable=["cache"])
        return o["logits"][:, -1], m["cache"]

    return greedy_loop(step, mut["cache"], out["logits"][:, -1], max_new_tokens, eos_token_id,
                       pad_token_id)
