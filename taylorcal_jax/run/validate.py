"""Whole-config validation, before any work: one `ConfigError` line per problem found first.

Order: unknown fields (with the closest known one), types (each field's type is its
default's in configs/common.py), the stage list, the data and tokenizer sources if read, the
teacher's architecture (read from teacher.path's config.json, or the `teacher` section;
every stage works from it), then the checks of every listed stage that has work to do
(each `Stage.checks` entry covers the sections that stage reads: enums, ranges, paths, and
sizes against the teacher, e.g. sequence lengths against its positions), and last the mesh
against the devices (`mesh_sizes`, after jax.distributed starts; `check_devices` for the
stages the plan runs).

Stage modules write their checks with the helpers here (`one_of`, `positive`, ...), and
wrap library validators that raise ValueError in `config_errors(section)`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

from taylorcal_jax.data import split as split_lib
from taylorcal_jax.errors import ConfigError
from taylorcal_jax.models.config import SUPPORTED_MODEL_TYPES
from taylorcal_jax.run import fields
from taylorcal_jax.run import inputs as inputs_lib


def _get(config, path: str):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


# ------------------------------------------------------------------------------- helpers


def one_of(config, path: str, choices: Sequence[str]) -> None:
    value = _get(config, path)
    if value not in choices:
        near = fields.closest(str(value), choices)
        hint = f"did you mean {near!r}?" if near else ""
        raise ConfigError(f"{path}={value!r} is not one of {', '.join(choices)}", hint)


def positive(config, *paths: str) -> None:
    for path in paths:
        value = _get(config, path)
        if not value > 0:
            raise ConfigError(f"{path} must be positive, got {value}")


def at_least(config, path: str, low) -> None:
    value = _get(config, path)
    if value < low:
        raise ConfigError(f"{path} must be at least {low}, got {value}")


def not_eval_split(config, path: str, use: str) -> None:
    """A split field whose text a stage fits or chooses by (`use`) must not be eval.split, on
    which every perplexity is measured: that text would not be held out."""
    value = _get(config, path)
    if value == config.eval.split:
        other = next(s for s in split_lib.SPLITS if s != value)
        raise ConfigError(
            f"{path}={value!r} is eval.split: {use} the text the student is evaluated on",
            f"use another split ({path}={other!r})",
        )


def fits_positions(config, path: str, arch) -> None:
    """A sequence length field must not exceed the teacher's positions."""
    value = _get(config, path)
    if value > arch.max_position_embeddings:
        raise ConfigError(
            f"{path}={value} exceeds the teacher's max_position_embeddings "
            f"({arch.max_position_embeddings})",
            f"lower {path}",
        )


@contextlib.contextmanager
def config_errors(section: str) -> Iterator[None]:
    """Turns a library validator's ValueError into a ConfigError naming the section."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        msg = str(e)
        if not msg.startswith(section + "."):
            msg = f"{section}: {msg}"
        raise ConfigError(msg) from e


# ----------------------------------------------------------------------------- generic


def check_unknown_fields(config) -> None:
    unknown = fields.unknown_fields(config)
    if unknown:
        name, near = unknown[0]
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(
            f"unknown config field {name}{more}",
            f"did you mean {near}?" if near else "--print_config lists every field",
        )


def _type_ok(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            return False
        return not default or all(_type_ok(v, default[0]) for v in value)
    return isinstance(value, type(default))


def check_types(config) -> None:
    want = fields.flatten(fields.defaults())
    for path, value in fields.flatten(config).items():
        default = want[path]
        if not _type_ok(value, default):
            kind = type(default).__name__
            if isinstance(default, tuple) and default:
                kind = f"tuple of {type(default[0]).__name__}"
            article = "an" if kind[0] in "aeiou" else "a"
            raise ConfigError(f"{path}={value!r} has the wrong type; expected {article} {kind}")
        # NaN passes every range check (nan <= 0 is False); no field takes an infinity
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}={value!r} is not a finite number")


def check_seeds(config) -> None:
    """Every seed field (`seed`, `split_seed`, `init_seed`) in [0, 2**32): numpy's and JAX's
    generators take no negative seed, JAX's keys keep 32 bits of it (2**32 draws as 0 does),
    and they are first built inside a stage."""
    for path, value in fields.flatten(config).items():
        if path.rsplit(".", 1)[-1].endswith("seed") and not 0 <= value < 2**32:
            raise ConfigError(f"{path} must be in [0, 2**32), got {value}")


def check_stages(config, registry: Mapping) -> None:
    listed = list(config.stages)
    if not listed:
        raise ConfigError("config.stages is empty", f"stages: {', '.join(registry)}")
    for name in listed:
        if name not in registry:
            near = fields.closest(name, registry)
            hint = f"did you mean {near!r}?" if near else f"stages: {', '.join(registry)}"
            raise ConfigError(f"unknown stage {name!r} in config.stages", hint)
    twice = sorted({s for s in listed if listed.count(s) > 1})
    if twice:
        raise ConfigError(f"config.stages lists {', '.join(twice)} more than once")


def teacher_architecture(config, workdir: str):
    """ModelConfig of the teacher (vocabulary size a placeholder when it is pretrained here).

    A `.gguf` teacher.path is converted here, once, into the workdir's cache (models/gguf.py).
    """
    if config.teacher.path:
        return inputs_lib.external_teacher_architecture(config, workdir)
    t = config.teacher
    one_of(config, "teacher.model_type", SUPPORTED_MODEL_TYPES)
    positive(config, "teacher.vocab_multiple", "teacher.max_position_embeddings")
    positive(config, "teacher.rope_theta", "teacher.rms_norm_eps")
    with config_errors("teacher"):
        return inputs_lib.pretrained_architecture(t, t.vocab_multiple)


def validate(config, registry: Mapping, workdir: str) -> None:
    """Every check that needs no device (see the module docstring); ConfigError on the first."""
    from taylorcal_jax.run.plan import sections_read  # noqa: PLC0415

    check_unknown_fields(config)
    check_types(config)
    check_seeds(config)
    check_stages(config, registry)
    stages = [registry[name] for name in config.stages]
    read = set().union(*(sections_read(s, config) for s in stages))
    # a stage with nothing to do (align under `copy`, pretrain with a teacher.path) is skipped
    # by the plan, so its settings are not refused
    running = [s for s in stages if not s.not_needed(config)]
    if "data" in read:
        inputs_lib.check_corpus(config, [x for s in running for x in s.samples(config)])
    if "tokenizer" in read:
        inputs_lib.check_tokenizer_path(config)
    arch = teacher_architecture(config, workdir)  # every stage works from the teacher
    done = []
    for stage in running:
        for check in stage.checks:
            if check not in done:
                done.append(check)
                check(config, arch)


def mesh_sizes(config, num_devices: int) -> dict[str, int]:
    """{"layers": n, "data": m, "fsdp": f} of the mesh section on `num_devices` devices, or
    ConfigError."""
    from taylorcal_jax.run.context import mesh_axes  # noqa: PLC0415
    from taylorcal_jax.utils import sharding  # noqa: PLC0415

    axes = mesh_axes(config.mesh)
    for name, size in axes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name} must be positive or -1 (the rest), got {size}")
    rest = [f"mesh.{name}" for name, size in axes.items() if size == -1]
    if len(rest) > 1:
        raise ConfigError(
            f"{' and '.join(rest)} are both -1; one axis at most takes the devices the others "
            "leave",
            f"set all but one of them to a divisor of the {num_devices} devices",
        )
    try:
        return sharding.resolve_axis_sizes(axes, num_devices)
    except ValueError as e:
        given = " and ".join(f"mesh.{k}={v}" for k, v in axes.items())
        raise ConfigError(
            f"{given} do not fit the {num_devices} devices here",
            "set one of them to -1 (the devices the others leave) and the others to divisors "
            "of the device count",
        ) from e


def check_devices(config, registry: Mapping, sizes: Mapping[str, int], names) -> None:
    """The checks of the stages `names` (those the plan runs: a skipped stage's batch need
    not split over this run's devices) that depend on the mesh sizes."""
    for name in names:
        for check in registry[name].device_checks:
            check(config, sizes)
