"""A student as a Hugging Face PyTorch model with its own modelling code, and back.

    write_hf_model(out_dir, config, params, dtype=None)   -> the directory
    read_hf_model(path, dtype=None)                       -> (StudentConfig, params)

The directory loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`:

    config.json                         `hybrid_config(config)`: model_type "taylorcal_hybrid",
                                        auto_map to the two files below, the teacher
                                        architecture, mixers per layer, the GDN architecture
                                        (GDNConfig.to_dict()), rope; no runtime options (the
                                        modelling code's kernel choice `gdn_kernels` is given
                                        when loading, default "auto")
    configuration_taylorcal_hybrid.py   copied from export/hf_modeling/ (torch + transformers
    modeling_taylorcal_hybrid.py        only; the math is in the modelling file's docstring)
    model.safetensors (or shards)       every parameter under `torch_tensor_name(path)`, Dense
                                        and conv kernels transposed to torch's [out, in] / [C, W]

`read_hf_model` accepts what transformers' save_pretrained writes after fine-tuning in PyTorch
(tied heads omitted, any dtype). Round trip: exact (same config, bit-identical parameters).
Every teacher feature of ModelConfig is expressed (RoPE as the frequencies of models/rope.py);
a student mixer other than GDN, or a config field this exporter does not know, raises
UnsupportedExportError naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
from flax import traverse_util

from taylorcal_jax.export.common import (
    MODEL_FIELDS,
    UnsupportedExportError,
    check_gdn_student,
    check_known_fields,
    format_tensors,
    write_model_dir,
)
from taylorcal_jax.models import hf_io
from taylorcal_jax.models.config import ModelConfig, RopeConfig
from taylorcal_jax.models.mixers import gdn
from taylorcal_jax.models.paths import ATTENTION
from taylorcal_jax.models.rope import rope_frequencies
from taylorcal_jax.models.student import StudentConfig, check_params

MODEL_TYPE = "taylorcal_hybrid"
MODELING_DIR = pathlib.Path(__file__).parent / "hf_modeling"
CONFIG_MODULE = "configuration_taylorcal_hybrid"
MODELING_MODULE = "modeling_taylorcal_hybrid"
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_MODULE}.TaylorcalHybridConfig",
    "AutoModelForCausalLM": f"{MODELING_MODULE}.TaylorcalHybridForCausalLM",
}
TARGET = "the Hugging Face PyTorch format"
# RoPE types whose frequencies do not depend on the position: the exported model applies them.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# config.json keys without which `student_config_from_hybrid` cannot rebuild the student: the
# teacher's fields (its model type renamed; token ids and teacher_path may be absent: None),
# the layer mixers and the GDN options.
TOKEN_IDS = {"bos_token_id", "eos_token_id", "pad_token_id"}
REQUIRED_KEYS = (
    "teacher_model_type",
    *sorted(MODEL_FIELDS - TOKEN_IDS - {"model_type"}),
    "mixers",
    "gdn",
)


# ------------------------------------------------------------------------ names


def torch_tensor_name(path: tuple[str, ...]) -> str:
    """Our param path -> the tensor name in the exported model: the one place to adapt when param
    paths change. The modules of modeling_taylorcal_hybrid.py are named like the teacher's
    Hugging Face modules, and a GDN layer's like ours (`model.layers.{i}.gdn.q_proj.weight`,
    `...gdn.A_log`, `...gdn.q_conv.weight`), so this is the student directory's mapping."""
    return hf_io.path_to_hf_name(path)


def _is_kernel(path) -> bool:
    """Dense kernels [in, out] and conv kernels [W, C] are stored transposed, as torch has them."""
    return path[-1] == "kernel"


# ------------------------------------------------------------------------ config


def check_exportable(config: StudentConfig) -> None:
    """UnsupportedExportError naming the first feature the exported model cannot express."""
    check_gdn_student(config, TARGET)
    rope_type = config.teacher.rope.rope_type
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedExportError(
            f"RoPE type {rope_type!r} cannot be exported to {TARGET}: the exported model applies "
            f"fixed frequencies ({', '.join(STATIC_ROPE_TYPES)})"
        )
    check_known_fields(config.teacher, MODEL_FIELDS, TARGET)


def hybrid_config(config: StudentConfig, dtype_name: str) -> dict:
    """The config.json of the exported model (fields: configuration_taylorcal_hybrid.py), whose
    weights are stored in `dtype_name` (what transformers loads them as by default)."""
    check_exportable(config)
    t = config.teacher
    inv_freq, scaling = rope_frequencies(t.rope, t.head_dim, t.max_position_embeddings)
    return {
        "architectures": ["TaylorcalHybridForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "model_type": MODEL_TYPE,
        "dtype": dtype_name,
        "teacher_model_type": t.model_type,
        "teacher_path": config.teacher_path,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope": dataclasses.asdict(t.rope),
        "rope_inv_freq": [float(f) for f in inv_freq],
        "rope_attention_scaling": float(scaling),
        "attention_bias": t.attention_bias,
        "qk_norm": t.qk_norm,
        "sliding_windows": list(t.sliding_windows),
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "mixers": list(config.mixers),
        "gdn": config.mixer_config.to_dict(),
        "use_cache": True,
    }


def student_config_from_hybrid(hf: dict) -> StudentConfig:
    """Inverse of `hybrid_config`."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r}")
    missing = [k for k in REQUIRED_KEYS if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    teacher = ModelConfig(
        model_type=hf["teacher_model_type"],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"],
        rms_norm_eps=hf["rms_norm_eps"],
        max_position_embeddings=hf["max_position_embeddings"],
        rope=RopeConfig(**hf["rope"]),
        attention_bias=hf["attention_bias"],
        qk_norm=hf["qk_norm"],
        sliding_windows=tuple(hf["sliding_windows"]),
        tie_word_embeddings=hf["tie_word_embeddings"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    mixers = list(hf["mixers"])
    if len(mixers) != teacher.num_hidden_layers:
        raise ValueError(f"mixers has {len(mixers)} entries for {teacher.num_hidden_layers} layers")
    stray = sorted(set(mixers) - {ATTENTION, gdn.NAME})
    if stray:
        raise ValueError(f"mixers lists {stray}; each layer is {ATTENTION!r} or {gdn.NAME!r}")
    keep = tuple(i for i, m in enumerate(mixers) if m == ATTENTION)
    arch = gdn.GDNConfig.from_dict(hf["gdn"])
    return StudentConfig(teacher, keep, arch, hf.get("teacher_path"))


# ------------------------------------------------------------------------ directories


def torch_tensors(params, dtype=None) -> dict[str, np.ndarray]:
    """{exported name: array in torch layout} (dtype: cast every tensor; None keeps each's)."""
    return format_tensors(
        params, torch_tensor_name, lambda path, arr: arr.T if _is_kernel(path) else arr, dtype
    )


def write_hf_model(out_dir, config: StudentConfig, params, dtype=None, *, max_shard_bytes=None):
    """Writes the model directory (module docstring) into `out_dir`; returns its path."""
    check_exportable(config)
    check_params(config, params, "a transformers model")
    tensors = torch_tensors(params, dtype)
    root = write_model_dir(
        out_dir, tensors, lambda dtype_name: hybrid_config(config, dtype_name), max_shard_bytes
    )
    for module in (CONFIG_MODULE, MODELING_MODULE):
        shutil.copyfile(MODELING_DIR / f"{module}.py", root / f"{module}.py")
    return root


def read_hf_model(path, dtype=None) -> tuple[StudentConfig, dict]:
    """An exported (or PyTorch-saved) directory -> (StudentConfig, params); dtype: cast to it."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(config_path) as f:
        config = student_config_from_hybrid(json.load(f))
    tensors = hf_io.read_weights(path)
    shapes = hf_io.expected_shapes(config.teacher, config.mixers, config.student_mixer())
    ignorable = {"lm_head.weight"} if config.teacher.tie_word_embeddings else set()
    flat = hf_io.params_from_tensors(
        path,
        tensors,
        shapes,
        ignorable=ignorable,
        dtype=dtype,
        name_fn=torch_tensor_name,
        what="the exported student",
    )
    return config, traverse_util.unflatten_dict(flat)
