"""Naive teacher -> student conversions (docs/method.md §3), as pure functions on param dicts.

For every converted layer (not in `keep_full_attention_layers`) the teacher's attention params
`self_attn/*` are replaced by the student mixer's params, made by the mixer's own conversion
(its registry entry, `Mixer.conversions`; GDN's are described in models/mixers/gdn.py):

    copy        the teacher's projections carried over where the mixer has a counterpart,
                the rest by the mixer's standard init
    zero_gate   copy, with the output gated to exactly 0: the student equals the teacher with
                those attention sublayers removed
    small_gate  copy, with the output gate scaled down

Converted layer i uses the key fold_in(rng, i), so a layer's params do not depend on which
other layers are converted. The new mixer's params are float32 whatever the teacher's dtype:
they are what phase 2 and distillation train, and from a bf16 checkpoint an update of 1e-4
to a weight of 0.05 is below half its bf16 spacing and rounds away. Everything else (kept
layers, embeddings, norms, MLPs, head) is the teacher's, unchanged (the same arrays).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from taylorcal_jax.models.mixers import CONVERSIONS, get_mixer
from taylorcal_jax.models.paths import (
    ATTENTION,
    has_layer_mixer,
    layer_key,
    layer_mixer,
    with_layer_mixer,
)
from taylorcal_jax.models.student import StudentConfig

Params = dict[str, Any]


def convert(strategy: str, teacher_params: Params, config: StudentConfig, rng) -> Params:
    """The student params of `config` under naive conversion `strategy` (CONVERSIONS)."""
    if strategy not in CONVERSIONS:
        raise ValueError(f"unknown conversion {strategy!r}; choose from {CONVERSIONS}")
    conversion = get_mixer(config.mixer_name).conversion(strategy)
    n = config.teacher.num_hidden_layers
    missing = [i for i in range(n) if not has_layer_mixer(teacher_params, i, ATTENTION)]
    if missing:
        raise ValueError(
            f"teacher params lack {layer_key(missing[0])}/self_attn; pass the teacher's params "
            "(all-attention), not a student's"
        )
    student = dict(teacher_params)
    for i in config.converted_layers:
        attn = layer_mixer(teacher_params, i, ATTENTION)
        mixer = conversion(attn, config.teacher, config.mixer_config, jax.random.fold_in(rng, i))
        mixer = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), mixer)
        student = with_layer_mixer(student, i, config.mixer_name, mixer, drop_attention=True)
    return student


def copy_init(teacher_params: Params, config: StudentConfig, rng) -> Params:
    """`copy`: see the module docstring."""
    return convert("copy", teacher_params, config, rng)


def zero_gate(teacher_params: Params, config: StudentConfig, rng) -> Params:
    """`zero_gate`: converted layers output exactly 0."""
    return convert("zero_gate", teacher_params, config, rng)


def small_gate(teacher_params: Params, config: StudentConfig, rng) -> Params:
    """`small_gate`: `copy` with a small output gate."""
    return convert("small_gate", teacher_params, config, rng)


NAIVE_STRATEGIES: dict[str, Callable[[Params, StudentConfig, Any], Params]] = {
    "copy": copy_init,
    "zero_gate": zero_gate,
    "small_gate": small_gate,
}
