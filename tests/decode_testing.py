"""A prompt's cache, then a few greedy decoding steps by each of several models that share
params: what the tests of a decoding-step implementation compare."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from taylorcal_jax.models.teacher import init_cache

PROMPT_VALID = [[True] * 9, [False] * 3 + [True] * 6]  # row 1 left-padded by 3


def greedy_steps(models: dict, vocab_size: int, steps: int = 3, slots: int = 16) -> dict:
    """{name: (logits [2, steps, V] of `steps` greedy single-token steps, the jaxpr text of one
    step)} for every model of `models` (same architecture, one set of params): a 2-row prompt
    of 9 tokens (PROMPT_VALID) is prefilled into a cache of `slots` slots by the first model,
    and each model decodes from that cache."""
    first = next(iter(models.values()))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 1, vocab_size)
    params = first.init(jax.random.PRNGKey(1), tokens)["params"]
    _, cache, _ = first.apply(
        {"params": params},
        tokens,
        valid_bt=jnp.asarray(PROMPT_VALID),
        cache=init_cache(first, 2, slots),
        last_logits_only=True,
    )
    out = {}
    for name, model in models.items():
        step = jax.jit(lambda c, t, m=model: m.apply({"params": params}, t, cache=c)[:2])
        jaxpr = str(jax.make_jaxpr(step)(cache, tokens[:, -1:]))
        c, token, logits = cache, tokens[:, -1:], []
        for _ in range(steps):
            step_logits, c = step(c, token)
            token = jnp.argmax(step_logits[:, -1:], -1).astype(jnp.int32)
            logits.append(step_logits)
        out[name] = (jnp.concatenate(logits, axis=1), jaxpr)
    return out
