"""The student mixers: a registry of `Mixer` entries (see spec.py for what an entry supplies).

    MIXERS = {"gdn": Gated DeltaNet (gdn.py)}

A new mixer is one module defining its entry plus one line here. The rest of the code reaches
a mixer only through its entry: `get_mixer(name)`, `mixer_for_config(config)` (the entry of an
architecture config) or a `StudentMixer` (an architecture config with its runtime options, the
unit a model is built from).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from taylorcal_jax.models.mixers import gdn
from taylorcal_jax.models.mixers.spec import CONVERSIONS, PARAM_GROUPS, Mixer

# Names are parameter keys too (paths.mixer_key); "attention" is the teacher's softmax attention.
MIXERS: dict[str, Mixer] = {gdn.SPEC.name: gdn.SPEC}

__all__ = [
    "CONVERSIONS",
    "MIXERS",
    "PARAM_GROUPS",
    "Mixer",
    "StudentMixer",
    "get_mixer",
    "mixer_for_config",
]


def get_mixer(name: str) -> Mixer:
    """The registry entry `name`; ValueError naming the known mixers otherwise."""
    if name not in MIXERS:
        raise ValueError(f"unknown student mixer {name!r}; known: {', '.join(MIXERS)}")
    return MIXERS[name]


def mixer_for_config(config) -> Mixer:
    """The entry whose architecture config class `config` is an instance of."""
    for spec in MIXERS.values():
        if isinstance(config, spec.config_class):
            return spec
    known = ", ".join(s.config_class.__name__ for s in MIXERS.values())
    raise ValueError(
        f"{type(config).__name__} is not the architecture config of a student mixer ({known})"
    )


@dataclasses.dataclass(frozen=True)
class StudentMixer:
    """A student mixer as a model runs it: its architecture config (what a student saves) and
    its runtime options (None: the entry's runtime defaults). Hashable, so jit-static."""

    config: Any
    runtime: Any = None

    def __post_init__(self):
        spec = mixer_for_config(self.config)
        if self.runtime is None:
            object.__setattr__(self, "runtime", spec.runtime_class())
        elif not isinstance(self.runtime, spec.runtime_class):
            raise ValueError(
                f"runtime options of {spec.name!r} must be a {spec.runtime_class.__name__}, "
                f"got {type(self.runtime).__name__}"
            )

    @property
    def spec(self) -> Mixer:
        return mixer_for_config(self.config)

    @property
    def name(self) -> str:
        return self.spec.name

    def module(self, model_config, *, dtype=jnp.float32, name: str | None = None):
        """The Flax module of one layer of this mixer."""
        return self.spec.module(model_config, self.config, self.runtime, dtype=dtype, name=name)

    def init_cache(self, model_config, batch: int, dtype) -> Any:
        return self.spec.init_cache(model_config, self.config, batch, dtype)

    @classmethod
    def from_options(cls, name: str, model_config, options: Mapping[str, Any]) -> StudentMixer:
        """Mixer `name` for a teacher, from one flat mapping of options (e.g. a config
        section): the runtime fields go to the runtime options, the rest to
        `config_class.from_teacher`."""
        spec = get_mixer(name)
        options = dict(options)
        known = {f.name for f in dataclasses.fields(spec.config_class)} | set(spec.runtime_fields)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown {name} options {unknown}; known: {sorted(known)}")
        runtime = {k: options.pop(k) for k in spec.runtime_fields if k in options}
        return cls(
            spec.config_class.from_teacher(model_config, **options),
            spec.runtime_class(**runtime),
        )
