"""Param surgery shared by calibration and alignment: stack per-layer subtrees on a leading axis.

Letters: L stacked layers. A student's converted layer i keeps its mixer params at
params["layers_{i}"]["gdn"]; `stack_mixers` turns the subtrees of `layers` into one tree whose
leaves are [L, ...], `unstack_mixers` writes such a tree back (returning new dicts, never
mutating the input).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def check_mixers(params, layers: Sequence[int], key: str = "gdn") -> None:
    """Raises ValueError unless every params["layers_{i}"] for i in layers has a `key` subtree."""
    missing = [i for i in layers if key not in params.get(f"layers_{i}", {})]
    if missing:
        raise ValueError(f"layers {missing} have no '{key}' params; is this the right student?")


def stack_mixers(params, layers: Sequence[int], key: str = "gdn"):
    """Tree of [L, ...] leaves from params["layers_{i}"][key] for i in layers."""
    check_mixers(params, layers, key)
    trees = [params[f"layers_{i}"][key] for i in layers]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_mixers(params, layers: Sequence[int], stacked, key: str = "gdn"):
    """Copy of params with params["layers_{i}"][key] replaced by slice j of `stacked`."""
    out = dict(params)
    for j, i in enumerate(layers):
        layer = dict(out[f"layers_{i}"])
        layer[key] = jax.tree.map(lambda x, j=j: x[j], stacked)
        out[f"layers_{i}"] = layer
    return out
