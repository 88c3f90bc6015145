"""Hybrid student: a teacher config, the layers that keep softmax attention, GDN options.

Letters: L layers, D hidden, H heads, K key dim, V value dim.

The student is `Transformer(teacher, mixers=config.mixers, gdn=config.gdn)`: layer i keeps the
teacher's softmax attention ("self_attn") when i is in `keep_full_attention_layers`, else it
is a GatedDeltaNet ("gdn", see `taylorcal_jax.models.gdn`). Embeddings, norms, MLPs and the head
are the teacher's.

Student directory (`save_student` / `load_student`), round trip exact:

    student_config.json   {"format": "taylorcal_student", "version": 1, "teacher_path",
                           "teacher_config" (all ModelConfig fields), "keep_full_attention_layers",
                           "gdn" (all GDNConfig fields)}
    config.json           the teacher's HF config.json (for tools that read the architecture)
    model.safetensors     every parameter in its own dtype (or shards + index), written by
                          `hf_io.save_pretrained`: teacher-shaped parameters under their Hugging
                          Face names, GDN ones as `model.layers.{i}.gdn.*` ({q,k,v,a,b,g,o}_proj
                          .weight [out, in], A_log [H], dt_bias [H], o_norm.weight [V],
                          {q,k,v}_conv.weight [C, W]).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from taylorcal_jax.models.config import ModelConfig, RopeConfig
from taylorcal_jax.models.gdn import GDNConfig

STUDENT_CONFIG_FILE = "student_config.json"
FORMAT_NAME = "taylorcal_student"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """teacher + the layer indices that keep softmax attention + GDN options (hashable).

    `teacher_path` records where the teacher was loaded from (metadata only; may be None).
    """

    teacher: ModelConfig
    keep_full_attention_layers: tuple[int, ...]
    gdn: GDNConfig
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
        if not isinstance(self.gdn, GDNConfig):
            raise ValueError(f"gdn must be a GDNConfig, got {type(self.gdn).__name__}")

    @classmethod
    def from_teacher(
        cls, teacher: ModelConfig, keep, *, teacher_path=None, **gdn_options
    ) -> StudentConfig:
        """GDN heads and dims from the teacher (GDNConfig.from_teacher) plus `gdn_options`."""
        return cls(
            teacher, tuple(keep), GDNConfig.from_teacher(teacher, **gdn_options), teacher_path
        )

    @property
    def mixers(self) -> tuple[str, ...]:
        keep = set(self.keep_full_attention_layers)
        n = self.teacher.num_hidden_layers
        return tuple("attention" if i in keep else "gdn" for i in range(n))

    @property
    def converted_layers(self) -> tuple[int, ...]:
        """Indices of the GDN layers, ascending."""
        return tuple(i for i, m in enumerate(self.mixers) if m == "gdn")

    def model(self, dtype=jnp.float32):
        """The Flax module of this student."""
        from taylorcal_jax.models.teacher import Transformer

        return Transformer(self.teacher, mixers=self.mixers, gdn=self.gdn, dtype=dtype)

    # --------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "teacher_path": self.teacher_path,
            "teacher_config": dataclasses.asdict(self.teacher),
            "keep_full_attention_layers": list(self.keep_full_attention_layers),
            "gdn": self.gdn.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"not a student config (format {d.get('format')!r})")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"student config version {d.get('version')!r} is not supported "
                f"(this code reads version {FORMAT_VERSION})"
            )
        return cls(
            teacher=model_config_from_dict(d["teacher_config"]),
            keep_full_attention_layers=tuple(d["keep_full_attention_layers"]),
            gdn=GDNConfig.from_dict(d["gdn"]),
            teacher_path=d["teacher_path"],
        )


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of dataclasses.asdict(ModelConfig) after a JSON round trip (lists -> tuples)."""
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

    _check_layout(config, params)
    root = hf_io.save_pretrained(path, config.teacher, params, dtype=dtype)
    write_student_config(root / STUDENT_CONFIG_FILE, config)
    return root


def load_student(path: str | os.PathLike, dtype=None) -> tuple[StudentConfig, dict]:
    """Reads a student directory -> (StudentConfig, params); dtype as in hf_io.load_pretrained."""
    from taylorcal_jax.models import hf_io

    config = read_student_config(os.path.join(path, STUDENT_CONFIG_FILE))
    _, params = hf_io.load_pretrained(path, dtype, mixers=config.mixers, gdn=config.gdn)
    return config, params


def _check_layout(config: StudentConfig, params) -> None:
    for i, mixer in enumerate(config.mixers):
        layer = params.get(f"layers_{i}", {})
        want = "self_attn" if mixer == "attention" else "gdn"
        if want not in layer:
            raise ValueError(
                f"params layers_{i} has no {want!r} but the student config says layer {i} is "
                f"{mixer!r} (keep_full_attention_layers={list(config.keep_full_attention_layers)})"
            )
