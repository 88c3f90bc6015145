"""What both export formats share: the error for inexpressible students, the checks that the
student's mixer is Gated DeltaNet and that every config field is one the exporter translates,
the tensors in a format's names and layout, the directory of weights and config.json, and the
tokenizer copy."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from taylorcal_jax.data.tokenizer import end_token_ids, padding_id
from taylorcal_jax.models import hf_io
from taylorcal_jax.models.mixers import gdn

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The GDN architecture fields (models/mixers/gdn.py GDNConfig) that both formats translate.
GDN_FIELDS = {"num_heads", "head_k_dim", "head_v_dim", "use_short_conv", "conv_size", "norm_eps"}
# The teacher fields (models/config.py ModelConfig) that both formats translate (all of them;
# fla_format refuses some values in kept attention layers).
MODEL_FIELDS = {
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope",
    "attention_bias",
    "qk_norm",
    "sliding_windows",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
}


class UnsupportedExportError(ValueError):
    """The student uses a feature that the target format cannot express (the message names it)."""


def check_known_fields(config, known: set[str], target: str) -> None:
    """Raises UnsupportedExportError for a dataclass field outside `known` with a non-default
    value: a feature added to the student after this exporter, which `target` does not carry."""
    for field in dataclasses.fields(config):
        if field.name in known:
            continue
        value = getattr(config, field.name)
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        if default is dataclasses.MISSING or value != default:
            raise UnsupportedExportError(
                f"{type(config).__name__}.{field.name}={value!r} cannot be exported to {target}: "
                "the exporter does not translate this feature"
            )


def check_gdn_student(config, target: str) -> None:
    """UnsupportedExportError unless the student's mixer (a StudentConfig's) is Gated DeltaNet
    whose architecture uses only GDN_FIELDS."""
    if config.mixer_name != gdn.NAME:
        raise UnsupportedExportError(
            f"student mixer {config.mixer_name!r} cannot be exported to {target} "
            f"(it has softmax attention and {gdn.NAME!r} layers only)"
        )
    check_known_fields(config.mixer_config, GDN_FIELDS, target)


def format_tensors(params, name_fn, layout_fn, dtype=None) -> dict[str, np.ndarray]:
    """{name_fn(path): layout_fn(path, array)} of every parameter (dtype: cast every tensor;
    None keeps each one's)."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        arr = np.asarray(jax.device_get(value))
        if dtype is not None:
            arr = arr.astype(jnp.dtype(dtype))
        out[name_fn(path)] = layout_fn(path, arr)
    return out


def write_model_dir(out_dir, tensors: dict, config_fn, max_shard_bytes=None) -> pathlib.Path:
    """Writes `tensors` as safetensors (sharded above max_shard_bytes, hf_io's default when
    None) and config_fn(dtype name) as config.json into `out_dir`; returns its path. The dtype
    name is the tensors' one dtype (what transformers loads them as by default), or float32."""
    dtypes = {str(a.dtype) for a in tensors.values()}
    config = config_fn(dtypes.pop() if len(dtypes) == 1 else "float32")
    root = pathlib.Path(out_dir)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    hf_io.write_weights(root, tensors, **kwargs)
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return root


def has_tokenizer(path) -> bool:
    return os.path.exists(os.path.join(path, TOKENIZER_CONFIG_FILE))


def copy_tokenizer(src, dst, teacher) -> None:
    """Loads the tokenizer in `src` with transformers and saves it into `dst`, with what
    transformers needs to generate as our command does: a pad token (the EOS where the
    tokenizer has none, as our left padding uses; Llama's and Mistral's have none, and a batch
    would not pad) and generation_config.json stopping at the tokenizer's EOS and every end id
    of `teacher` (a ModelConfig; config.json holds the teacher's alone)."""
    from transformers import AutoTokenizer, GenerationConfig  # noqa: PLC0415 - only when exporting

    if not has_tokenizer(src):
        raise FileNotFoundError(f"no tokenizer in {src} (no {TOKENIZER_CONFIG_FILE})")
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(str(pathlib.Path(dst)))
    generation = GenerationConfig(
        bos_token_id=teacher.bos_token_id,
        eos_token_id=list(end_token_ids(tokenizer, teacher.end_token_ids)),
        pad_token_id=padding_id(tokenizer),
    )
    generation.save_pretrained(str(pathlib.Path(dst)))
