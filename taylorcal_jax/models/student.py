"""Hybrid student: a teacher config, the layers that keep softmax attention, a student mixer.

Letters: L layers, D hidden, H heads, K key dim, V value dim.

The student is `Transformer(teacher, mixers=config.mixers, student_mixer=...)`: layer i keeps
the teacher's softmax attention ("self_attn") when i is in `keep_full_attention_layers`, else
it is the student mixer (a registry entry, `taylorcal_jax.models.mixers`, e.g. "gdn"), whose
parameters live under the mixer's name. Embeddings, norms, MLPs and the head are the
teacher's. The config holds the mixer's architecture only; runtime options (e.g. GDN's kernel
choice and chunk size) are given when the model is built (`model(runtime=...)`), as are the
softmax attention's (`model(attention_runtime=...)`, e.g. the decoding step's kernel).

Student directory (`save_student` / `load_student`), round trip exact:

    student_config.json   {"format": "taylorcal_student", "version": 2, "teacher_path",
                           "teacher_config" (all ModelConfig fields),
                           "layer_mixers" (per layer: "attention" or the mixer's name),
                           "mixer_configs" ({name: its architecture config})}
                          Version 1 files ("keep_full_attention_layers" and "gdn", the GDN
                          config with its runtime fields, which are ignored) are still read.
    config.json           the teacher's HF config.json (for tools that read the architecture)
    model.safetensors     every parameter in its own dtype (or shards + index), written by
                          `hf_io.save_pretrained`: teacher-shaped parameters under their Hugging
                          Face names, the mixer's as `model.layers.{i}.<name>.*` (for GDN:
                          {q,k,v,a,b,g,o}_proj.weight [out, in], A_log [H], dt_bias [H],
                          o_norm.weight [V], {q,k,v}_conv.weight [C, W]).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from taylorcal_jax.models.config import ModelConfig, RopeConfig
from taylorcal_jax.models.layers import AttentionRuntime
from taylorcal_jax.models.mixers import StudentMixer, get_mixer, mixer_for_config
from taylorcal_jax.models.paths import ATTENTION
from taylorcal_jax.models.teacher import Transformer

STUDENT_CONFIG_FILE = "student_config.json"
FORMAT_NAME = "taylorcal_student"
FORMAT_VERSION = 2
_V1_MIXER = "gdn"  # version 1 files hold only GDN students, under this key


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """teacher + the layer indices that keep softmax attention + the architecture config of
    the student mixer of the other layers (an instance of a registry entry's config_class).
    Hashable.

    `teacher_path` records where the teacher was loaded from (metadata only; may be None).
    """

    teacher: ModelConfig
    keep_full_attention_layers: tuple[int, ...]
    mixer_config: Any
    teacher_path: str | None = None

    def __post_init__(self):
        keep = self.keep_full_attention_layers
        if isinstance(keep, (str, bytes)) or not hasattr(keep, "__iter__"):
            raise ValueError(
                f"keep_full_attention_layers must be a sequence of layer indices, got {keep!r}"
            )
        keep = tuple(keep)
        n = self.teacher.num_hidden_layers
        bad = [i for i in keep if not isinstance(i, int) or isinstance(i, bool)]
        if bad:
            raise ValueError(f"keep_full_attention_layers must hold ints, got {bad}")
        out = [i for i in keep if not 0 <= i < n]
        if out:
            raise ValueError(
                f"keep_full_attention_layers {out} out of range: the teacher has {n} layers "
                f"(valid indices 0..{n - 1})"
            )
        if len(set(keep)) != len(keep):
            dup = sorted({i for i in keep if keep.count(i) > 1})
            raise ValueError(f"keep_full_attention_layers has duplicates {dup}; list each once")
        if list(keep) != sorted(keep):
            raise ValueError(
                f"keep_full_attention_layers must be sorted ascending, got {list(keep)}; "
                f"use {sorted(keep)}"
            )
        object.__setattr__(self, "keep_full_attention_layers", keep)
        mixer_for_config(self.mixer_config)  # a registry mixer's architecture, else ValueError

    @classmethod
    def from_teacher(
        cls, teacher: ModelConfig, keep, *, mixer: str, teacher_path=None, **options
    ) -> StudentConfig:
        """Student mixer `mixer` sized from the teacher (`config_class.from_teacher`), with
        architecture `options` (e.g. use_short_conv for GDN)."""
        config = get_mixer(mixer).config_class.from_teacher(teacher, **options)
        return cls(teacher, tuple(keep), config, teacher_path)

    @property
    def mixer_name(self) -> str:
        return mixer_for_config(self.mixer_config).name

    @property
    def mixers(self) -> tuple[str, ...]:
        """Per layer: "attention" or the student mixer's name."""
        keep = set(self.keep_full_attention_layers)
        n = self.teacher.num_hidden_layers
        return tuple(ATTENTION if i in keep else self.mixer_name for i in range(n))

    @property
    def converted_layers(self) -> tuple[int, ...]:
        """Indices of the student-mixer layers, ascending."""
        return tuple(i for i, m in enumerate(self.mixers) if m != ATTENTION)

    def student_mixer(self, runtime=None) -> StudentMixer:
        """The student mixer with runtime options `runtime` (None: the entry's defaults)."""
        return StudentMixer(self.mixer_config, runtime)

    def model(self, dtype=jnp.float32, runtime=None, attention_runtime=None):
        """The Flax module of this student, its mixer run with `runtime` options and its softmax
        attention with `attention_runtime` (a layers.AttentionRuntime; None: the defaults)."""
        if attention_runtime is None:
            attention_runtime = AttentionRuntime()
        return Transformer(
            self.teacher,
            mixers=self.mixers,
            student_mixer=self.student_mixer(runtime),
            dtype=dtype,
            attention_runtime=attention_runtime,
        )

    # --------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """The saved form: architecture only (no runtime options)."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "teacher_path": self.teacher_path,
            "teacher_config": dataclasses.asdict(self.teacher),
            "layer_mixers": list(self.mixers),
            "mixer_configs": {self.mixer_name: self.mixer_config.to_dict()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"not a student config (format {d.get('format')!r})")
        version = d.get("version")
        if version == 1:
            return _from_v1(d)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"student config version {version!r} is not supported "
                f"(this code reads versions 1 and {FORMAT_VERSION})"
            )
        configs = d["mixer_configs"]
        if len(configs) != 1:
            raise ValueError(
                f"a student has one kind of student mixer; this one lists {sorted(configs)}"
            )
        ((name, arch),) = configs.items()
        teacher = model_config_from_dict(d["teacher_config"])
        layer_mixers = list(d["layer_mixers"])
        if len(layer_mixers) != teacher.num_hidden_layers:
            raise ValueError(
                f"layer_mixers has {len(layer_mixers)} entries for "
                f"{teacher.num_hidden_layers} layers"
            )
        stray = sorted(set(layer_mixers) - {ATTENTION, name})
        if stray:
            raise ValueError(f"layer_mixers name {stray}, which mixer_configs does not define")
        return cls(
            teacher=teacher,
            keep_full_attention_layers=tuple(
                i for i, m in enumerate(layer_mixers) if m == ATTENTION
            ),
            mixer_config=get_mixer(name).config_class.from_dict(arch),
            teacher_path=d["teacher_path"],
        )


def _from_v1(d: dict[str, Any]) -> StudentConfig:
    """Version 1: a GDN student whose "gdn" entry also held runtime options (dropped here)."""
    spec = get_mixer(_V1_MIXER)
    arch = {k: v for k, v in d[_V1_MIXER].items() if k not in spec.runtime_fields}
    return StudentConfig(
        teacher=model_config_from_dict(d["teacher_config"]),
        keep_full_attention_layers=tuple(d["keep_full_attention_layers"]),
        mixer_config=spec.config_class.from_dict(arch),
        teacher_path=d["teacher_path"],
    )


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of dataclasses.asdict(ModelConfig) after a JSON round trip (lists -> tuples;
    a list of end ids ModelConfig turns into a tuple itself)."""
    d = dict(d)
    d["rope"] = RopeConfig(**d["rope"])
    d["sliding_windows"] = tuple(d["sliding_windows"])
    return ModelConfig(**d)


def write_student_config(path: str | os.PathLike, config: StudentConfig) -> None:
    with open(path, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")


def read_student_config(path: str | os.PathLike) -> StudentConfig:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {STUDENT_CONFIG_FILE} at {path}; is this a student dir?")
    with open(path) as f:
        return StudentConfig.from_dict(json.load(f))


# ------------------------------------------------------------------------ directories


def save_student(path: str | os.PathLike, config: StudentConfig, params, *, dtype=None):
    """Writes a student directory (see module docstring); returns its path.

    dtype: cast every tensor (e.g. jnp.bfloat16); None keeps each parameter's dtype.
    """
    from taylorcal_jax.models import hf_io

    check_params(config, params)
    root = hf_io.save_pretrained(path, config.teacher, params, dtype=dtype)
    write_student_config(root / STUDENT_CONFIG_FILE, config)
    return root


def load_student(path: str | os.PathLike, dtype=None) -> tuple[StudentConfig, dict]:
    """Reads a student directory -> (StudentConfig, params); dtype as in hf_io.load_pretrained."""
    from taylorcal_jax.models import hf_io

    config = read_student_config(os.path.join(path, STUDENT_CONFIG_FILE))
    _, params = hf_io.load_pretrained(
        path, dtype, mixers=config.mixers, student_mixer=config.student_mixer()
    )
    return config, params


def check_params(config: StudentConfig, params, target: str = "a student directory") -> None:
    """ValueError unless `params` are those of the student `config` describes, path for path
    and shape for shape: a reader (load_student, transformers, fla) would refuse anything else
    or, for the exports, load it with the missing tensors drawn at random (e.g. params joined
    for decoding, models/joined.py, or a union of both mixers in every layer)."""
    from flax import traverse_util  # noqa: PLC0415

    from taylorcal_jax.models import hf_io  # noqa: PLC0415

    expected = hf_io.expected_shapes(config.teacher, config.mixers, config.student_mixer())
    given = {p: tuple(jnp.shape(v)) for p, v in traverse_util.flatten_dict(params).items()}
    missing = sorted("/".join(p) for p in set(expected) - set(given))
    unexpected = sorted("/".join(p) for p in set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"params do not match the student config, so they cannot be written as {target}: "
            f"missing {missing[:4]}, unexpected "
            f"{unexpected[:4]} (params joined for decoding are not written; write the params "
            "as loaded)"
        )
    wrong = sorted(p for p in expected if given[p] != expected[p])
    if wrong:
        p = wrong[0]
        raise ValueError(
            f"params do not match the student config: {'/'.join(p)} has shape {given[p]}, "
            f"not {expected[p]} ({len(wrong)} such), so they cannot be written as {target}"
        )
