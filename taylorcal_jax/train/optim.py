"""Optimiser parts shared by every training run: schedules, parameter partitions, clipping.

Letters: L a leading axis of independent slices (e.g. stacked layers).

Schedules (`make_schedule`; `cosine_schedule` reads a run's options), step s, peak lr,
W warmup steps, S total steps, r end ratio:

    constant  lr(s) = peak * min(s / W, 1)
    cosine    lr(s) = peak * s / W                                     for s < W
                      peak * (r + (1 - r) (1 + cos(pi (s - W) / (S - W))) / 2)   after
                      (W >= S: the warm-up fills the run, which never decays)

A partition labels every parameter leaf with a group name or FROZEN; `make_optimizer` gives
each group its own optax transform through `optax.multi_transform` (FROZEN leaves get
`optax.set_to_zero()`, so they never move and keep no optimiser state), after one clipping
transform on the whole gradient:

    clip_by_global_norm(c)          g <- g * min(1, c / ||g||)       (optax's own)
    clip_slices_by_global_norm(c)   g[i] <- g[i] * min(1, c / ||g[i]||) for each i < L, the norm
                                    over the slice i of every leaf (leading axis L shared)

The per-slice form makes one optimiser over L stacked independent problems equal L separate
optimisers: clipping is the only non-elementwise part of AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import jax
import optax

FROZEN = "frozen"
SCHEDULES = ("constant", "cosine")


def make_schedule(
    name: str, peak: float, *, steps: int, warmup_steps: int, min_lr_ratio: float
) -> optax.Schedule:
    """The learning-rate schedule `name` (one of SCHEDULES), warming up linearly from 0."""
    if name == "constant":
        if warmup_steps == 0:  # (optax's warm-up schedule stays at 0 with 0 warm-up steps)
            return optax.constant_schedule(peak)
        return optax.warmup_constant_schedule(0.0, peak, warmup_steps)
    if name == "cosine":
        if warmup_steps >= steps:  # (optax's cosine needs steps left after the warm-up)
            return optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup_steps,
            decay_steps=steps,
            end_value=peak * min_lr_ratio,
        )
    raise ValueError(f"unknown schedule {name!r}; known: {SCHEDULES}")


class CosineOptions(Protocol):
    """The fields of a run's options that its cosine schedule reads."""

    learning_rate: float  # peak
    steps: int
    warmup_steps: int
    min_lr_ratio: float


def cosine_schedule(opts: CosineOptions) -> optax.Schedule:
    """make_schedule("cosine") from a run's options (pretraining, distillation stage 1)."""
    return make_schedule(
        "cosine",
        opts.learning_rate,
        steps=opts.steps,
        warmup_steps=opts.warmup_steps,
        min_lr_ratio=opts.min_lr_ratio,
    )


def matrices_only(leading_axes: int = 0) -> Callable:
    """AdamW's weight-decay mask: the weight matrices (at least 2 axes past `leading_axes`,
    e.g. 1 for params stacked over layers), not the norm scales, biases and GDN's per-head
    A_log and dt_bias, whose decay towards 0 would move the layers' decay rates."""
    return lambda params: jax.tree.map(lambda p: p.ndim - leading_axes >= 2, params)


def labels_by_key(group_of: Mapping[str, str]) -> Callable:
    """Partition of a dict of parameter subtrees: every leaf under key k gets group_of[k].

    The returned function raises ValueError naming any top-level key missing from group_of.
    """

    def labels(params):
        unknown = sorted(set(params) - set(group_of))
        if unknown:
            raise ValueError(f"parameters {unknown} belong to no group of {sorted(group_of)}")
        return {k: jax.tree.map(lambda _, g=group_of[k]: g, sub) for k, sub in params.items()}

    return labels


def clip_slices_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` applied on its own to each slice of a shared leading axis."""
    clip = optax.clip_by_global_norm(max_norm)

    def update_fn(updates, state, params=None):
        del params
        return jax.vmap(lambda u: clip.update(u, optax.EmptyState())[0])(updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(
    labels: Callable,
    groups: Mapping[str, optax.GradientTransformation],
    clip: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """chain(clip, multi_transform(groups + {FROZEN: set_to_zero}, labels))."""
    if FROZEN in groups:
        raise ValueError(f"group name {FROZEN!r} is reserved for frozen parameters")
    transforms = {**groups, FROZEN: optax.set_to_zero()}
    return optax.chain(clip, optax.multi_transform(transforms, labels))


def freeze(params, labels_tree):
    """params with FROZEN leaves behind stop_gradient (their gradient is an exact, free zero)."""
    return jax.tree.map(
        lambda p, g: jax.lax.stop_gradient(p) if g == FROZEN else p, params, labels_tree
    )
