"""The tiny `ModelConfig` that unit tests build: `tiny_model_config(**overrides)`."""

from __future__ import annotations

from taylorcal_jax.models.config import ModelConfig, family_features

# The values most tests use; every other field keeps ModelConfig's own default.
TINY_MODEL_DEFAULTS = dict(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def tiny_model_config(**overrides) -> ModelConfig:
    """One place for the tiny test model's shape: TINY_MODEL_DEFAULTS and the features its
    family fixes (q/k/v biases in qwen2, q/k norm in qwen3), updated by `overrides`."""
    model_type = overrides.get("model_type", TINY_MODEL_DEFAULTS["model_type"])
    return ModelConfig(**{**TINY_MODEL_DEFAULTS, **family_features(model_type), **overrides})


def windowed_qwen2_config() -> ModelConfig:
    """A two-layer Qwen2 with biases whose layer 1 has a sliding window of 6 tokens, shorter
    than the sequences the attention tests run: full and windowed attention in one model."""
    return tiny_model_config(
        model_type="qwen2",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        head_dim=16,
        attention_bias=True,
        sliding_windows=(None, 6),
    )
