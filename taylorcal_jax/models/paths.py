"""Where things live in the parameter pytree of a `Transformer` (and in its decoding cache).

    params[layer_key(i)]                      block i ("layers_{i}")
    params[layer_key(i)][mixer_key(name)]     its mixer: "self_attn" for softmax attention,
                                              the registry name for a student mixer ("gdn")

Every module that reads or writes these paths goes through the helpers below, so the layout
is spelled out once. The helpers never modify their input: they return new dicts that share
every untouched subtree with it.
"""

from __future__ import annotations

import re

ATTENTION = "attention"  # the teacher's softmax attention, as a per-layer mixer name
ATTENTION_KEY = "self_attn"  # its parameter key (Hugging Face's name)
_LAYER_KEY = re.compile(r"layers_(\d+)")


def layer_key(layer: int) -> str:
    """Key of block `layer` in the params (and in the decoding cache)."""
    return f"layers_{layer}"


def layer_index(key: str) -> int | None:
    """Inverse of `layer_key`: the block index of `key`, None for any other key."""
    m = _LAYER_KEY.fullmatch(key)
    return int(m.group(1)) if m else None


def mixer_key(name: str) -> str:
    """Parameter key of mixer `name` inside a block: "self_attn" for attention, else `name`."""
    return ATTENTION_KEY if name == ATTENTION else name


def layer_mixer(params, layer: int, name: str):
    """The params of mixer `name` in block `layer`."""
    return params[layer_key(layer)][mixer_key(name)]


def has_layer_mixer(params, layer: int, name: str) -> bool:
    return mixer_key(name) in params.get(layer_key(layer), {})


def with_layer_mixer(params, layer: int, name: str, mixer_params, *, drop_attention=False):
    """Copy of `params` whose block `layer` holds `mixer_params` as mixer `name`; with
    drop_attention the block's softmax attention params are removed (a converted layer)."""
    key = layer_key(layer)
    block = {k: v for k, v in params[key].items() if not (drop_attention and k == ATTENTION_KEY)}
    block[mixer_key(name)] = mixer_params
    return {**params, key: block}
