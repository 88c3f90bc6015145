"""Model shapes of the benchmarks: Qwen2-layout configs with random weights from a dims dict.

dims keys: layers, hidden, heads (query), kv (key/value heads), head_dim, mlp, vocab.
"""

from __future__ import annotations

# Qwen2.5-1.5B (tied embeddings): the reference shape of docs/benchmarks.md §2-4
QWEN2_5_1_5B = dict(
    layers=28, hidden=1536, heads=12, kv=2, head_dim=128, mlp=8960, vocab=151936
)  # fmt: skip


def qwen2_config(dims: dict, max_positions: int):
    """A tied-embedding qwen2 ModelConfig of these dims."""
    from taylorcal_jax.models.config import ModelConfig

    return ModelConfig(
        model_type="qwen2",
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["mlp"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv"],
        head_dim=dims["head_dim"],
        tie_word_embeddings=True,
        max_position_embeddings=max_positions,
    )
