"""The decoder-only Transformer shared by the teacher and the hybrid GDN student.

Letters: B batch, T time, D hidden, V vocab, L layers, S cache slots.

    h_0 = E[tokens]
    h_{l+1} = block_l(h_l)              (mixer l = softmax attention or GatedDeltaNet)
    logits = rmsnorm(h_L) W_head        (W_head = E^T when embeddings are tied)

`valid_bt` marks real tokens (False for left padding); padding tokens are never attended to
and their outputs are meaningless. Positions default to cumsum(valid) - 1 (clipped at 0),
offset by the tokens already in the cache when decoding.

Cache (from `init_cache`): {"layers_{i}": per-layer mixer cache, "next_position": [B] int32}.
Prefill with T tokens, then call again with one token at a time; logits equal the full forward.
Logits are returned in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from taylorcal_jax.models.config import ModelConfig
from taylorcal_jax.models.layers import DecoderLayer, RMSNorm, init_attention_cache

MIXERS = ("attention", "gdn")


def resolve_mixers(config: ModelConfig, mixers: Sequence[str] | None) -> tuple[str, ...]:
    if mixers is None:
        return ("attention",) * config.num_hidden_layers
    mixers = tuple(mixers)
    if len(mixers) != config.num_hidden_layers:
        raise ValueError(
            f"mixers has {len(mixers)} entries for {config.num_hidden_layers} layers; "
            "give one of 'attention' or 'gdn' per layer"
        )
    bad = [m for m in mixers if m not in MIXERS]
    if bad:
        raise ValueError(f"unknown mixers {bad}; each entry must be one of {MIXERS}")
    return mixers


class Transformer(nn.Module):
    config: ModelConfig
    mixers: tuple[str, ...] | None = None
    gdn: Any = None
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block in the backward pass (saves activation memory)

    @nn.compact
    def __call__(
        self,
        tokens_bt,
        *,
        positions_bt=None,
        valid_bt=None,
        cache=None,
        return_intermediates=False,
        last_logits_only=False,
    ):
        """(logits [B, T, V] float32, new cache or None, per-layer intermediates).

        last_logits_only: norm and LM head on the last position only (logits [B, 1, V]), which is
        all a prefill needs: the full [B, T, V] logits are the largest array of a long prompt
        (65k tokens x a 152k vocab is 40 GB in float32).
        """
        c = self.config
        mixers = resolve_mixers(c, self.mixers)
        if "gdn" in mixers and self.gdn is None:
            raise ValueError("mixers contain 'gdn' layers but no GDNConfig was given (gdn=...)")
        b, t = tokens_bt.shape
        if valid_bt is None:
            valid_bt = jnp.ones((b, t), bool)
        valid_bt = valid_bt.astype(bool)
        offset = jnp.zeros((b,), jnp.int32) if cache is None else cache["next_position"]
        if positions_bt is None:
            counts = jnp.cumsum(valid_bt.astype(jnp.int32), axis=1)
            positions_bt = jnp.maximum(offset[:, None] + counts - 1, 0)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="embed_tokens")
        h = embed(tokens_bt)
        new_cache = None if cache is None else {}
        inters = {}
        # argnums count self: (h, positions, valid, cache, return_intermediates) are 1..5
        layer_cls = nn.remat(DecoderLayer, static_argnums=(5,)) if self.remat else DecoderLayer
        for i, mixer in enumerate(mixers):
            name = f"layers_{i}"
            layer = layer_cls(c, i, mixer, self.gdn, self.dtype, name=name)
            layer_cache = None if cache is None else cache[name]
            h, layer_cache, inter = layer(
                h, positions_bt, valid_bt, layer_cache, return_intermediates
            )
            if cache is not None:
                new_cache[name] = layer_cache
            if return_intermediates:
                inters[name] = inter
        if last_logits_only:
            h = h[:, -1:]
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(h)
        if c.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head")(h)
        if cache is not None:
            new_cache["next_position"] = offset + valid_bt.sum(axis=1).astype(jnp.int32)
        return logits.astype(jnp.float32), new_cache, inters


def init_cache(
    config: ModelConfig,
    mixers: Sequence[str] | None,
    gdn: Any,
    batch: int,
    max_len: int,
    dtype=jnp.float32,
) -> dict:
    """Empty decoding cache for `Transformer(config, mixers, gdn)` with `max_len` token slots."""
    cache: dict = {"next_position": jnp.zeros((batch,), jnp.int32)}
    for i, mixer in enumerate(resolve_mixers(config, mixers)):
        if mixer == "attention":
            cache[f"layers_{i}"] = init_attention_cache(config, batch, max_len, dtype)
        else:
            from taylorcal_jax.models.gdn import init_gdn_cache  # lazy: optional student mixer

            cache[f"layers_{i}"] = init_gdn_cache(config, gdn, batch, dtype)
    return cache


def init_params(config: ModelConfig, rng, *, mixers=None, gdn=None, dtype=jnp.float32):
    """Random params (float32) of the given architecture; mostly for tests and pretraining."""
    model = Transformer(config, None if mixers is None else tuple(mixers), gdn, dtype)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return model.init(rng, tokens)["params"]
