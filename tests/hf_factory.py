"""Tiny random Hugging Face (PyTorch) checkpoints for tests, one per supported family.

    path = make_tiny_checkpoint(tmp_path, "llama", num_key_value_heads=1, tie_word_embeddings=True)

writes `config.json` + `model.safetensors` with transformers' own `save_pretrained` into
`tmp_path / name` (default name: the model_type) and returns that directory. Keyword overrides
go straight into the transformers config class (e.g. `rope_parameters={...}`, `sliding_window`).

Weights are re-drawn with O(1) activations so attention is far from uniform (transformers'
default init, std 0.02, would make every test insensitive to RoPE and masking errors):
Linear weights N(0, 1/fan_in), embeddings N(0, 1), norm weights 1 + N(0, 0.2^2), biases
N(0, 0.5^2). `load_torch_model(path)` reloads the checkpoint with transformers for comparisons.
"""

from __future__ import annotations

import pathlib

import torch
import transformers

CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "mistral": transformers.MistralConfig,
}

TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def make_hf_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"no tiny config for {model_type!r}; known: {sorted(CONFIG_CLASSES)}")
    kwargs = {**TINY, **overrides}
    return CONFIG_CLASSES[model_type](**kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draws all parameters in place with O(1)-activation scales (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * noise
            elif name.endswith("bias"):
                value = 0.5 * noise
            elif "embed_tokens" in name:
                value = noise
            else:  # Linear weight [out, in]
                value = noise / p.shape[1] ** 0.5
            p.copy_(value.to(p.dtype))
    return model


def make_tiny_checkpoint(
    tmp_path,
    model_type: str,
    *,
    name: str | None = None,
    seed: int = 0,
    dtype=None,
    max_shard_size: str | None = None,
    **overrides,
) -> pathlib.Path:
    """Builds, randomizes and saves a tiny `*ForCausalLM`; returns the checkpoint directory.

    dtype: torch dtype to store the weights in (default float32).
    max_shard_size: e.g. "20KB" to make transformers write a sharded checkpoint with an index.
    """
    config = make_hf_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    path = pathlib.Path(tmp_path) / (name or model_type)
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def load_torch_model(path, dtype=torch.float32) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager"
    )
    return model.eval()


def torch_logits(model, tokens, attention_mask=None, position_ids=None):
    """float32 numpy logits [B, T, V] of a transformers model for int numpy tokens [B, T]."""
    import numpy as np

    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64))
    if position_ids is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(position_ids, dtype=np.int64))
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens, dtype=np.int64)), **kwargs)
    return out.logits.float().numpy()
