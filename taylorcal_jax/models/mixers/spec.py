"""What a student mixer brings to the model: one `Mixer` entry of the registry.

A student mixer replaces softmax attention in converted layers. Its entry supplies everything
the rest of the code needs to know about it, so that adding one is one module (defining the
entry) plus one line in `taylorcal_jax.models.mixers.MIXERS`:

    config_class    the architecture config: a frozen dataclass with
                    `from_teacher(model_config, **options)`, `to_dict()` and `from_dict(d)`;
                    this, and only this, is what a student directory saves
    runtime_class   runtime options (kernel choice, block sizes, ...): a frozen dataclass whose
                    fields all have defaults; given when a model is built, never saved
    module          (model_config, config, runtime, dtype, name) -> a Flax module called like
                    softmax attention: (x_btd, *, positions_bt, valid_bt, cache,
                    return_intermediates, row_scale_bt1=None) -> (y_btd, new cache or
                    None, intermediates); row_scale_bt1 given: the input is x_btd scaled per
                    row, the block's norm folded into the mixer's joined input kernel
                    (models/joined.py)
    init_cache      (model_config, config, batch, dtype) -> the empty decoding cache of a layer
    conversions     {name in CONVERSIONS: (attention params, model_config, config, rng) ->
                    mixer params of one layer}: the naive inits from the teacher's attention
    param_groups    mixer params -> a tree of the same structure whose leaves are group names
                    in PARAM_GROUPS ("slow", "fast" or "frozen"), for per-group learning rates
    diagnostics     (mixer params, x_ntd, valid_nt) -> {name: [H] numpy array}, per-head
                    figures of one layer on its inputs x (for calibration reports)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

CONVERSIONS = ("copy", "zero_gate", "small_gate")
PARAM_GROUPS = ("slow", "fast", "frozen")


@dataclasses.dataclass(frozen=True, eq=False)
class Mixer:
    """A registry entry (see the module docstring for each field's contract)."""

    name: str
    config_class: type
    runtime_class: type
    module: Callable[..., Any]
    init_cache: Callable[..., Any]
    conversions: Mapping[str, Callable[..., Any]]
    param_groups: Callable[[Any], Any]
    diagnostics: Callable[..., dict]

    def __post_init__(self):
        unknown = set(self.conversions) - set(CONVERSIONS)
        if unknown:
            raise ValueError(
                f"mixer {self.name!r} has conversions {sorted(unknown)} outside {CONVERSIONS}"
            )

    def conversion(self, strategy: str) -> Callable[..., Any]:
        if strategy not in self.conversions:
            raise ValueError(
                f"mixer {self.name!r} has no {strategy!r} conversion; it has "
                f"{', '.join(self.conversions)}"
            )
        return self.conversions[strategy]

    @property
    def runtime_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.runtime_class))
