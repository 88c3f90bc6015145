"""Param surgery shared by calibration and alignment: stack per-layer subtrees on a leading axis.

Letters: L stacked layers. A student's converted layer i keeps its mixer params at
`paths.layer_mixer(params, i, name)` (name: the student mixer's registry name);
`stack_mixers` turns the subtrees of `layers` into one tree whose leaves are [L, ...],
`unstack_mixers` writes such a tree back (returning new dicts, never mutating the input).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from taylorcal_jax.models.paths import has_layer_mixer, layer_mixer, mixer_key, with_layer_mixer


def check_mixers(params, layers: Sequence[int], name: str) -> None:
    """Raises ValueError unless every layer in `layers` has params of mixer `name`."""
    missing = [i for i in layers if not has_layer_mixer(params, i, name)]
    if missing:
        raise ValueError(
            f"layers {missing} have no '{mixer_key(name)}' params; is this the right student?"
        )


def stack_mixers(params, layers: Sequence[int], name: str):
    """Tree of [L, ...] leaves from the params of mixer `name` in each of `layers`."""
    check_mixers(params, layers, name)
    trees = [layer_mixer(params, i, name) for i in layers]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_mixers(params, layers: Sequence[int], stacked, name: str):
    """Copy of params whose mixer `name` in layers[j] is slice j of `stacked`."""
    out = params
    for j, i in enumerate(layers):
        out = with_layer_mixer(out, i, name, jax.tree.map(lambda x, j=j: x[j], stacked))
    return out
