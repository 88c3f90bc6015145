"""Greedy and sampled generation for teachers and hybrid students alike (prefill + decode).

Letters: B batch, P prompt length, N new tokens, V vocab.

The prompt batch [B, P] is left-padded (`valid_bt` False on padding). One prefill call fills the
mixed cache (`teacher.init_cache`: KV cache for softmax layers with their shared slot record,
each student mixer's own cache, e.g. the recurrent state and conv history of GDN layers), then a
`lax.scan` decodes one token per step:

    x_{P+n} = sample(logits(x_{<P+n}) / temperature)     (argmax when temperature == 0)

with optional top-k and nucleus (top-p) truncation. After an end token (`eos_token_id`: one id
or several, as `ModelConfig.end_token_ids`) a row keeps running (fixed shapes) but its later
tokens are replaced by `pad_id` and marked invalid.

Both run with the params joined for decoding (`models.joined.join_for_decoding`: the kernels of
products that share an input joined once per call, not once per token; a no-op on params that
are already joined, as the generation command passes them).

`generate` runs prefill and every step in one compiled call; `generate_stream` runs the same
prefill and step functions one call at a time and yields each step's tokens as they are made
(the same tokens for the same arguments), for printing text as it comes. `left_pad` builds the
[B, P] batch and its mask from prompts of different lengths.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taylorcal_jax.models.config import id_tuple
from taylorcal_jax.models.joined import join_for_decoding
from taylorcal_jax.models.teacher import init_cache


def sample_logits(logits_bv, rng, *, temperature: float, top_k: int | None, top_p: float | None):
    """Next tokens [B] from float32 logits: argmax for temperature 0, else a truncated sample."""
    if temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = truncated_logits(logits_bv.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def truncated_logits(logits_bv, top_k: int | None, top_p: float | None):
    """The logits with -inf outside the top k and outside the nucleus of mass top_p (ties at
    either cut kept). top_k at or above the vocabulary and top_p = 1 cut nothing: the float32
    cumulative sum can reach 1 before the tail, which the nucleus rule would then drop."""
    logits = logits_bv
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        # Smallest logit still inside the nucleus (the top token always is).
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


# Below this a sample is the argmax in all but name, and float32 logits / temperature can
# overflow to inf (or divide by a temperature that float32 rounds to 0), which gives NaN.
MIN_TEMPERATURE = 1e-6


def _check_options(max_new_tokens, temperature, top_k, top_p):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf")):
        raise ValueError(
            f"temperature must be 0 (greedy) or a finite value >= {MIN_TEMPERATURE}, got "
            f"{temperature}"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Token id lists -> (tokens [B, P] int32, valid [B, P] bool), each prompt right-aligned
    after pad_id padding; P = the longest prompt, or `length` (at least that)."""
    if not prompts or any(len(ids) == 0 for ids in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(ids) for ids in prompts)
    p = longest if length is None else length
    if p < longest:
        raise ValueError(f"length {p} is shorter than the longest prompt ({longest} tokens)")
    tokens = np.full((len(prompts), p), pad_id, np.int32)
    valid = np.zeros((len(prompts), p), bool)
    for i, ids in enumerate(prompts):
        tokens[i, p - len(ids) :] = ids
        valid[i, p - len(ids) :] = True
    return tokens, valid


def _step_keys(rng, max_new_tokens):
    """(key of the token sampled after prefill, [max_new_tokens - 1] keys of the later steps)."""
    rng, first_rng = jax.random.split(rng)
    return first_rng, jax.random.split(rng, max_new_tokens - 1)


def _prefill(model, params, prompt_bt, valid_bt, rng, max_len, sample):
    """Fills a fresh cache of max_len slots with the prompt; (first new tokens [B], cache)."""
    b = prompt_bt.shape[0]
    cache = init_cache(model, b, max_len)
    logits, cache, _ = model.apply(
        {"params": params}, prompt_bt, valid_bt=valid_bt, cache=cache, last_logits_only=True
    )
    return sample(logits[:, -1], rng), cache


def _decode(model, params, token_b, cache, rng, sample):
    """One decoding step: feeds token_b [B]; (next tokens [B], cache)."""
    logits, cache, _ = model.apply({"params": params}, token_b[:, None], cache=cache)
    return sample(logits[:, -1], rng), cache


def _sampler(temperature, top_k, top_p):
    return functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id", "pad_id",
    ),
)  # fmt: skip
def _generate(
    model, params, prompt_bt, valid_bt, rng, *, max_new_tokens, temperature, top_k, top_p,
    eos_token_id, pad_id,
):  # fmt: skip
    b, p = prompt_bt.shape
    params = join_for_decoding(params)
    sample = _sampler(temperature, top_k, top_p)
    first_rng, rngs = _step_keys(rng, max_new_tokens)
    first, cache = _prefill(
        model, params, prompt_bt, valid_bt, first_rng, p + max_new_tokens, sample
    )

    def step(carry, step_rng):
        token_b, cache, done_b = carry
        nxt, cache = _decode(model, params, token_b, cache, step_rng, sample)
        if eos_token_id:
            done_b = done_b | jnp.isin(token_b, jnp.asarray(eos_token_id, token_b.dtype))
        return (nxt, cache, done_b), (nxt, done_b)

    done0 = jnp.zeros((b,), bool)
    _, (rest, done_rest) = jax.lax.scan(step, (first, cache, done0), rngs)
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    # A token is valid unless an earlier token of its row was EOS.
    valid = jnp.concatenate([~done0[:, None], ~done_rest.T], axis=1)
    return jnp.where(valid, tokens, pad_id), valid


@functools.partial(jax.jit, static_argnames=("model", "max_len", "temperature", "top_k", "top_p"))
def _prefill_call(model, params, prompt_bt, valid_bt, rng, *, max_len, temperature, top_k, top_p):
    sample = _sampler(temperature, top_k, top_p)
    return _prefill(model, params, prompt_bt, valid_bt, rng, max_len, sample)


@functools.partial(
    jax.jit,
    static_argnames=("model", "temperature", "top_k", "top_p"),
    donate_argnames=("cache",),  # the KV cache is updated in place, not copied every step
)
def _decode_call(model, params, token_b, cache, rng, *, temperature, top_k, top_p):
    return _decode(model, params, token_b, cache, rng, _sampler(temperature, top_k, top_p))


_join_call = jax.jit(join_for_decoding)


def _prepare(prompt_bt, valid_bt, rng, temperature, vocab_size):
    """Checked (prompt int32 [B, P], valid bool [B, P], rng). Ids outside the vocabulary,
    padding included, would embed as NaN and every later token would be the argmax of NaN."""
    prompt_bt = jnp.asarray(prompt_bt, jnp.int32)
    if prompt_bt.ndim != 2:
        raise ValueError(f"prompt_bt must be [B, P] token ids, got shape {prompt_bt.shape}")
    if not isinstance(prompt_bt, jax.core.Tracer) and prompt_bt.size:
        ids = np.asarray(prompt_bt)  # on the host: under a trace (make_jaxpr) min() is staged
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"prompt token ids must be in the model's vocabulary [0, {vocab_size}), got "
                f"[{low}, {high}] (a tokenizer larger than the model's?)"
            )
    if valid_bt is None:
        valid_bt = jnp.ones(prompt_bt.shape, bool)
    valid_bt = jnp.asarray(valid_bt, bool)
    if valid_bt.shape != prompt_bt.shape:
        raise ValueError(f"valid_bt shape {valid_bt.shape} != prompt shape {prompt_bt.shape}")
    if not isinstance(valid_bt, jax.core.Tracer):
        # generation continues from the last position of each row: its valid tokens must end
        # there (left padding); a right-padded row would continue from a pad
        v = np.asarray(valid_bt)
        bad = np.flatnonzero(~v[:, -1] | (np.diff(v.astype(np.int8), axis=1) < 0).any(axis=1))
        if bad.size:
            raise ValueError(
                f"prompt rows {bad[:4].tolist()} are not left-padded: each row's valid tokens "
                "must be one run ending at its last position (eval.generate.left_pad)"
            )
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.PRNGKey(...)")
    if rng is None:
        rng = jax.random.PRNGKey(0)  # unused by greedy decoding
    return prompt_bt, valid_bt, rng


def generate(
    model,
    params,
    prompt_bt,
    *,
    max_new_tokens: int,
    valid_bt=None,
    rng=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
) -> dict:
    """Continues each (left-padded) prompt by `max_new_tokens` tokens.

    model: a `Transformer` (teacher or student); params: its params.
    temperature 0 (default) is greedy decoding; otherwise rng (a PRNG key) is required.
    Returns {"tokens": [B, N] int32 (pad_id after EOS), "valid": [B, N] bool}.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p)
    prompt_bt, valid_bt, rng = _prepare(
        prompt_bt, valid_bt, rng, temperature, model.config.vocab_size
    )
    tokens, valid = _generate(
        model,
        params,
        prompt_bt,
        valid_bt,
        rng,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        eos_token_id=id_tuple(eos_token_id),  # a static argument: hashable
        pad_id=pad_id,
    )
    return {"tokens": tokens, "valid": valid}


def generate_stream(
    model,
    params,
    prompt_bt,
    *,
    max_new_tokens: int,
    valid_bt=None,
    rng=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> Iterator[np.ndarray]:
    """Yields the new token of every row ([B] int32 numpy) after each step, as `generate` with
    the same arguments makes them (a row's tokens after its end token are not replaced here);
    stops after max_new_tokens steps, or once every row has produced one of eos_token_id."""
    _check_options(max_new_tokens, temperature, top_k, top_p)
    prompt_bt, valid_bt, rng = _prepare(
        prompt_bt, valid_bt, rng, temperature, model.config.vocab_size
    )
    options = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
    first_rng, rngs = _step_keys(rng, max_new_tokens)
    max_len = prompt_bt.shape[1] + max_new_tokens
    params = _join_call(params)
    token, cache = _prefill_call(
        model, params, prompt_bt, valid_bt, first_rng, max_len=max_len, **options
    )
    done, ends = np.zeros(prompt_bt.shape[0], bool), id_tuple(eos_token_id)
    for step in range(max_new_tokens):
        if step:
            token, cache = _decode_call(model, params, token, cache, rngs[step - 1], **options)
        out = np.asarray(token)
        yield out
        if ends:
            done |= np.isin(out, ends)
            if done.all():
                return
