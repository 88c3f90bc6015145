"""The decoder-only Transformer shared by the teacher and the hybrid students: the one forward.

Letters: B batch, T time, D hidden, V vocab, L layers, S cache slots.

    h_0 = E[tokens]
    h_{l+1} = block_l(h_l)              (mixer l = softmax attention or the student mixer,
                                         or, given keep flags, a traced choice between both)
    logits = rmsnorm(h_L) W_head        (W_head = E^T when embeddings are tied)

`valid_bt` marks real tokens (False for left padding); padding tokens are never attended to
and their outputs are meaningless. Positions default to cumsum(valid) - 1 (clipped at 0),
offset by the tokens already in the cache when decoding.

Cache (from `init_cache`): {layer_key(i): per-layer mixer cache (attention: {"k", "v"}),
SLOTS: the slot record of every attention layer ({"valid" [B, S] bool, "index"}, layers.py;
only in a model with attention layers), "next_position": [B] int32}. A call writes the record
once (`layers.write_slots`) and hands each attention layer the same `layers.SlotView` of it.
Prefill with T tokens, then call again with one token at a time; logits equal the full forward.
Logits are returned in float32.

Sharded params (`param_layout`, a `sharding.ParamLayout`; applying only, inside `shard_map`):
each device passes its shards of the params, and every top-level module (embedding, each
block, final norm, LM head) all-gathers its own params just before it runs, once its input is
computed. So a device holds one module's whole params at a time, never the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from taylorcal_jax.models.config import ModelConfig
from taylorcal_jax.models.layers import (
    SLOTS,
    AttentionRuntime,
    DecoderLayer,
    RMSNorm,
    SlotView,
    init_attention_cache,
    init_slots,
    write_slots,
)
from taylorcal_jax.models.mixers import MIXERS, StudentMixer
from taylorcal_jax.models.paths import ATTENTION, layer_key
from taylorcal_jax.utils import sharding


def resolve_mixers(
    config: ModelConfig, mixers: Sequence[str] | None, student_mixer: StudentMixer | None
) -> tuple[str, ...]:
    """Per-layer mixer names (None: all attention), checked against the layer count and the
    student mixer the model was given."""
    if mixers is None:
        return (ATTENTION,) * config.num_hidden_layers
    mixers = tuple(mixers)
    allowed = (ATTENTION, *MIXERS)
    if len(mixers) != config.num_hidden_layers:
        raise ValueError(
            f"mixers has {len(mixers)} entries for {config.num_hidden_layers} layers; "
            f"give one of {allowed} per layer"
        )
    bad = [m for m in mixers if m not in allowed]
    if bad:
        raise ValueError(f"unknown mixers {bad}; each entry must be one of {allowed}")
    students = sorted(set(mixers) - {ATTENTION})
    if students and (student_mixer is None or students != [student_mixer.name]):
        given = None if student_mixer is None else student_mixer.name
        raise ValueError(
            f"mixers use {students} but the model's student_mixer is {given!r}; give a "
            "StudentMixer of that kind (student_mixer=...)"
        )
    return mixers


class Transformer(nn.Module):
    """The model (module docstring). `mixers`: per-layer "attention" or the name of
    `student_mixer` (None: the teacher, all attention). `attention_runtime`: how the softmax
    attention layers compute (layers.AttentionRuntime; never saved). `param_layout`: the params
    come in shards laid out so, gathered one module at a time (module docstring); None: whole."""

    config: ModelConfig
    mixers: tuple[str, ...] | None = None
    student_mixer: StudentMixer | None = None
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block in the backward pass (saves activation memory)
    attention_runtime: AttentionRuntime = AttentionRuntime()
    param_layout: sharding.ParamLayout | None = None

    def _whole_params(self, module_cls, name: str, after):
        """`module_cls`, or with a `param_layout`: `module_cls` whose params (at `name`) are
        all-gathered whole each time it runs, once `after` (its input) is computed."""
        if self.param_layout is None:
            return module_cls
        layout = self.param_layout

        def gather(variables):
            return {"params": layout.gather((name,), variables["params"], after=after)}

        return nn.map_variables(module_cls, "params", trans_in_fn=gather)

    @nn.compact
    def __call__(
        self,
        tokens_bt,
        *,
        positions_bt=None,
        valid_bt=None,
        cache=None,
        keep_l=None,
        return_intermediates=False,
        last_logits_only=False,
    ):
        """(logits [B, T, V] float32, new cache or None, per-layer intermediates).

        keep_l: optional bool [L], may be traced (e.g. vmapped over candidate keep sets). Every
        layer then holds both its softmax attention and the student mixer (a union param tree,
        as `init` makes it with keep_l given) and layer l uses attention where keep_l[l], the
        student mixer elsewhere: exactly the student with that keep set, in one model call.
        Needs student_mixer and mixers=None; no cache.
        last_logits_only: norm and LM head on the last position only (logits [B, 1, V]), which is
        all a prefill needs: the full [B, T, V] logits are the largest array of a long prompt
        (65k tokens x a 152k vocab is 40 GB in float32).
        """
        c = self.config
        mixers = resolve_mixers(c, self.mixers, self.student_mixer)
        if self.param_layout is not None and self.is_initializing():
            raise ValueError("param_layout applies sharded params; init the model without it")
        if keep_l is not None:
            if self.student_mixer is None or self.mixers is not None:
                raise ValueError(
                    "keep_l chooses per layer between attention and the student mixer: build "
                    "the model with student_mixer=... and mixers=None"
                )
            if cache is not None:
                raise ValueError("keep_l cannot be combined with a decoding cache")
            keep_l = jnp.asarray(keep_l, bool)
            if keep_l.shape != (c.num_hidden_layers,):
                raise ValueError(f"keep_l must be [{c.num_hidden_layers}], got {keep_l.shape}")
        b, t = tokens_bt.shape
        attention_runtime = self.attention_runtime.for_call(
            padded=valid_bt is not None or cache is not None
        )
        if valid_bt is None:
            valid_bt = jnp.ones((b, t), bool)
        valid_bt = valid_bt.astype(bool)
        offset = jnp.zeros((b,), jnp.int32) if cache is None else cache["next_position"]
        if positions_bt is None:
            counts = jnp.cumsum(valid_bt.astype(jnp.int32), axis=1)
            positions_bt = jnp.maximum(offset[:, None] + counts - 1, 0)
        embed = self._whole_params(nn.Embed, "embed_tokens", tokens_bt)(
            c.vocab_size, c.hidden_size, dtype=self.dtype, name="embed_tokens"
        )
        h = embed(tokens_bt)
        new_cache, slots = None, None
        if cache is not None:
            new_cache = {}
            if SLOTS in cache:  # the model has attention layers
                new_cache[SLOTS] = write_slots(cache[SLOTS], valid_bt)
                slots = SlotView.of_call(cache[SLOTS], new_cache[SLOTS])
        inters = {}
        for i, mixer in enumerate(mixers):
            name = layer_key(i)
            layer_cls = self._whole_params(DecoderLayer, name, h)
            if self.remat:  # around the gather: the backward pass gathers the params again
                # argnums count self: (h, positions, valid, cache, slots, return_intermediates,
                # keep)
                layer_cls = nn.remat(layer_cls, static_argnums=(6,))
            layer = layer_cls(
                c, i, mixer, self.student_mixer, self.dtype, attention_runtime, name=name
            )
            layer_cache = None if cache is None else cache[name]
            keep = None if keep_l is None else keep_l[i]
            h, layer_cache, inter = layer(
                h, positions_bt, valid_bt, layer_cache, slots, return_intermediates, keep
            )
            if cache is not None:
                new_cache[name] = layer_cache
            if return_intermediates:
                inters[name] = inter
        if last_logits_only:
            h = h[:, -1:]
        h = self._whole_params(RMSNorm, "norm", h)(c.rms_norm_eps, self.dtype, name="norm")(h)
        if not c.tie_word_embeddings:
            head = self._whole_params(nn.Dense, "lm_head", h)
            logits = head(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head")(h)
        elif self.param_layout is None:
            logits = embed.attend(h)
        else:  # the table gathered again, after h: not kept whole through every layer
            table = self.param_layout.gather(
                ("embed_tokens",), self.variables["params"]["embed_tokens"], after=h
            )
            head = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, parent=None)
            logits = head.apply({"params": table}, h, method="attend")
        if cache is not None:
            new_cache["next_position"] = offset + valid_bt.sum(axis=1).astype(jnp.int32)
        return logits.astype(jnp.float32), new_cache, inters


def init_cache(model: Transformer, batch: int, max_len: int, dtype=None) -> dict:
    """Empty decoding cache of `model` with `max_len` token slots (dtype: the model's)."""
    config = model.config
    dtype = model.dtype if dtype is None else dtype
    mixers = resolve_mixers(config, model.mixers, model.student_mixer)
    cache: dict = {"next_position": jnp.zeros((batch,), jnp.int32)}
    if ATTENTION in mixers:
        cache[SLOTS] = init_slots(batch, max_len)
    for i, mixer in enumerate(mixers):
        if mixer == ATTENTION:
            cache[layer_key(i)] = init_attention_cache(config, batch, max_len, dtype)
        else:
            cache[layer_key(i)] = model.student_mixer.init_cache(config, batch, dtype)
    return cache


def init_params(config: ModelConfig, rng, *, mixers=None, student_mixer=None, dtype=jnp.float32):
    """Random params (float32) of the given architecture; mostly for tests and pretraining."""
    model = Transformer(config, None if mixers is None else tuple(mixers), student_mixer, dtype)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return model.init(rng, tokens)["params"]
