"""A student in flash-linear-attention's own format: `fla.models.GatedDeltaNetForCausalLM`.

    write_fla_model(out_dir, config, params, dtype=None)   -> the directory (config.json +
                                                               safetensors; no code of ours)
    load: import fla; GatedDeltaNetForCausalLM.from_pretrained(dir)

fla's model is a GDN stack whose `attn` config puts softmax attention (its `fla.layers.Attention`,
which needs flash-attn) at chosen layers: one norm_eps for every RMSNorm (block norms and the
GDN output norm), a SwiGLU MLP, and attention with GQA, optional q/k/v bias, a sliding window
per layer group, default RoPE (rotate-half, base `rope_theta`) and head_dim = hidden / heads.
A student fits when its kept attention layers are expressible that way and the GDN output norm
shares the teacher's eps. Teachers that fit: Qwen2 / Qwen2.5 (q/k/v bias, default RoPE; the GDN
norm_eps must be the teacher's 1e-6, e.g. `--config.calibration.gdn.norm_eps=1e-6`), Mistral
(sliding window or none, default RoPE), Llama 2 / 3.0 (default RoPE). Teachers that do not:
Llama 3.1 / 3.2 (llama3 RoPE scaling), Qwen3 (per-head q/k RMSNorm), any linear or yarn RoPE,
and head_dim != hidden / heads. A student with no kept layers fits whatever the teacher's
attention was. Anything else raises UnsupportedExportError naming the feature;
`export.hf_torch` takes every student.

Names (`fla_tensor_name`): model.embeddings, model.layers.{i}.attn_norm / mlp_norm, attention
and GDN both under model.layers.{i}.attn.*, GDN convolutions as attn.{q,k,v}_conv1d.weight
[C, 1, W], model.norm, lm_head.
"""

from __future__ import annotations

import numpy as np

from taylorcal_jax.export.common import (
    MODEL_FIELDS,
    UnsupportedExportError,
    check_gdn_student,
    check_known_fields,
    format_tensors,
    write_model_dir,
)
from taylorcal_jax.models import hf_io
from taylorcal_jax.models.student import StudentConfig, check_params

TARGET = "flash-linear-attention's GatedDeltaNetForCausalLM format"
MODEL_TYPE = "gated_deltanet"
# Our module names -> fla's (the rest coincide).
_RENAMES = {
    "embed_tokens": "embeddings",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "self_attn": "attn",
    "gdn": "attn",
    "q_conv": "q_conv1d",
    "k_conv": "k_conv1d",
    "v_conv": "v_conv1d",
}


def fla_tensor_name(path: tuple[str, ...]) -> str:
    """Our param path -> fla's tensor name (the one place to adapt when param paths change)."""
    return hf_io.path_to_hf_name(tuple(_RENAMES.get(part, part) for part in path))


def _fla_layout(path, arr):
    """Dense kernels [in, out] -> [out, in]; conv kernels [W, C] -> nn.Conv1d's [C, 1, W]."""
    if path[-1] != "kernel":
        return arr
    if path[-2].endswith("_conv"):
        return arr.T[:, None, :]
    return arr.T


def _expand_v(gdn) -> float:
    return gdn.head_v_dim / gdn.head_k_dim


def check_fla_exportable(config: StudentConfig) -> None:
    """UnsupportedExportError naming the first feature fla's format cannot express."""
    check_gdn_student(config, TARGET)
    t, g = config.teacher, config.mixer_config
    check_known_fields(t, MODEL_FIELDS, TARGET)
    if g.norm_eps != t.rms_norm_eps:
        raise UnsupportedExportError(
            f"GDN norm_eps {g.norm_eps} differs from the teacher's rms_norm_eps {t.rms_norm_eps}: "
            f"{TARGET} has one norm_eps for all norms (calibrate with "
            f"calibration.gdn.norm_eps={t.rms_norm_eps}, or export with --format=hf)"
        )
    if int(g.head_k_dim * _expand_v(g)) != g.head_v_dim:  # how fla derives head_v_dim
        raise UnsupportedExportError(
            f"GDN head_v_dim {g.head_v_dim} is not head_k_dim {g.head_k_dim} times an expand_v "
            f"that {TARGET} reproduces"
        )
    if not config.keep_full_attention_layers:
        return
    kept = f"kept attention layers {list(config.keep_full_attention_layers)}"
    if t.qk_norm:
        raise UnsupportedExportError(
            f"per-head q/k RMSNorm (qk_norm, Qwen3) in the {kept} cannot be exported to {TARGET}"
        )
    if t.rope.rope_type != "default":
        raise UnsupportedExportError(
            f"RoPE scaling {t.rope.rope_type!r} in the {kept} cannot be exported to {TARGET} "
            "(default RoPE only)"
        )
    if t.head_dim * t.num_attention_heads != t.hidden_size:
        raise UnsupportedExportError(
            f"head_dim {t.head_dim} x {t.num_attention_heads} heads != hidden_size "
            f"{t.hidden_size} in the {kept}: {TARGET} sets head_dim = hidden / heads"
        )


def fla_config(config: StudentConfig, dtype_name: str) -> dict:
    """config.json for `fla.models.GatedDeltaNetConfig`."""
    check_fla_exportable(config)
    t, g = config.teacher, config.mixer_config
    by_window: dict = {}
    for i in config.keep_full_attention_layers:
        by_window.setdefault(t.sliding_windows[i], []).append(i)
    attn = [
        {
            "layers": layers,
            "num_heads": t.num_attention_heads,
            "num_kv_heads": t.num_key_value_heads,
            "qkv_bias": t.attention_bias,
            "window_size": window,
            "rope_theta": t.rope.theta,
        }
        for window, layers in by_window.items()
    ]
    return {
        "architectures": ["GatedDeltaNetForCausalLM"],
        "model_type": MODEL_TYPE,
        "dtype": dtype_name,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "hidden_act": "swish",
        "num_hidden_layers": t.num_hidden_layers,
        "norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "attn_mode": "chunk",
        "num_heads": g.num_heads,
        "head_dim": g.head_k_dim,
        "expand_v": _expand_v(g),
        "use_gate": True,
        "output_gate_activation": "swish",
        "allow_neg_eigval": False,
        "use_short_conv": g.use_short_conv,
        "conv_size": g.conv_size,
        "attn": attn or None,
        "use_cache": True,
    }


def fla_tensors(params, dtype=None) -> dict[str, np.ndarray]:
    return format_tensors(params, fla_tensor_name, _fla_layout, dtype)


def write_fla_model(out_dir, config: StudentConfig, params, dtype=None, *, max_shard_bytes=None):
    """Writes config.json + safetensors in fla's format into `out_dir`; returns its path."""
    check_fla_exportable(config)
    check_params(config, params, "fla's format")
    tensors = fla_tensors(params, dtype)
    return write_model_dir(
        out_dir, tensors, lambda dtype_name: fla_config(config, dtype_name), max_shard_bytes
    )
