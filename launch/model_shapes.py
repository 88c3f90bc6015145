"""Model shapes of the benchmarks: configs (Qwen2 layout by default) from a dims dict, and fast
random weights.

dims keys: layers, hidden, heads (query), kv (key/value heads), head_dim, mlp, vocab.
"""

from __future__ import annotations

import functools

# Qwen2.5-1.5B (tied embeddings): the reference shape of docs/benchmarks.md §2-4
QWEN2_5_1_5B = dict(
    layers=28, hidden=1536, heads=12, kv=2, head_dim=128, mlp=8960, vocab=151936
)  # fmt: skip


def model_config(dims: dict, max_positions: int, model_type: str):
    """A tied-embedding ModelConfig of these dims and `model_type` ("qwen2", "llama", ...)."""
    from taylorcal_jax.models.config import ModelConfig, family_features

    return ModelConfig(
        model_type=model_type,
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["mlp"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv"],
        head_dim=dims["head_dim"],
        tie_word_embeddings=True,
        max_position_embeddings=max_positions,
        **family_features(model_type),
    )


def qwen2_config(dims: dict, max_positions: int):
    """A tied-embedding qwen2 ModelConfig of these dims."""
    return model_config(dims, max_positions, "qwen2")


def random_params(model, rng, dtype):
    """Random parameters of a Flax `model`, made on the device in `dtype`, for speed benchmarks.

    The tree's shapes come from `jax.eval_shape` of `model.init` (traced, never run); each leaf
    is then drawn by one small jitted program per distinct shape:

        leaf of >= 2 dims [fan_in, ...]:  N(0, 1 / fan_in)   (dense kernels, embedding table)
        leaf of <= 1 dim:                 1                  (norm scales, biases, GDN A_log and
                                                              dt_bias: a decay of about e^-3.5)

    Speed and memory do not depend on the values; these keep every activation and logit of a
    deep model finite in bf16 (unit-variance projections, residual stream growing additively).
    Running `model.init` itself instead (its initialisers, in float32, then a cast) took 90 s for
    the Qwen2.5-1.5B shape on an H100.
    """
    import jax
    import jax.numpy as jnp

    tokens = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(rng, tokens))["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(rng, len(leaves))
    values = [
        _random_leaf(key, tuple(leaf.shape), jnp.dtype(dtype))
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, values)


@functools.cache
def _leaf_program(shape: tuple[int, ...], dtype):
    import jax
    import jax.numpy as jnp

    if len(shape) <= 1:
        return jax.jit(lambda key: jnp.ones(shape, dtype))
    std = shape[0] ** -0.5
    return jax.jit(lambda key: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype))


def _random_leaf(key, shape, dtype):
    return _leaf_program(shape, dtype)(key)
