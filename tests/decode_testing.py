"""A prompt's cache, then a few greedy decoding steps by each of several models that share
params: what the tests of a decoding-step implementation compare."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxpr_testing import equations

from taylorcal_jax.models.teacher import init_cache

PROMPT_VALID = [[True] * 9, [False] * 3 + [True] * 6]  # row 1 left-padded by 3


def pallas_calls(jaxpr) -> int:
    """pallas_call equations in `jaxpr`, sub-jaxprs included (`jaxpr_testing.equations`)."""
    return len(equations(jaxpr, "pallas_call"))


def greedy_steps(
    models: dict, vocab_size: int, steps: int = 3, slots: int = 16, rows: int = 2,
    params_map=None,
) -> dict:  # fmt: skip
    """{name: (logits [rows, steps, V] of `steps` greedy single-token steps, the Pallas kernel
    launches of one step (`pallas_calls`))} for every model of `models` (same architecture, one
    set of params): a prompt of 9 tokens in `rows` rows (1 or 2; PROMPT_VALID) is prefilled
    into a cache of `slots` slots by the first model, and each model decodes from that cache,
    with the params as `params_map` returns them when given (e.g. joined for decoding)."""
    first = next(iter(models.values()))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (rows, 9), 1, vocab_size)
    params = first.init(jax.random.PRNGKey(1), tokens)["params"]
    _, cache, _ = first.apply(
        {"params": params},
        tokens,
        valid_bt=jnp.asarray(PROMPT_VALID[:rows]),
        cache=init_cache(first, rows, slots),
        last_logits_only=True,
    )
    decoding = params if params_map is None else params_map(params)
    out = {}
    for name, model in models.items():
        step = jax.jit(lambda c, t, m=model: m.apply({"params": decoding}, t, cache=c)[:2])
        calls = pallas_calls(jax.make_jaxpr(step)(cache, tokens[:, -1:]).jaxpr)
        c, token, logits = cache, tokens[:, -1:], []
        for _ in range(steps):
            step_logits, c = step(c, token)
            token = jnp.argmax(step_logits[:, -1:], -1).astype(jnp.int32)
            logits.append(step_logits)
        out[name] = (jnp.concatenate(logits, axis=1), calls)
    return out
