"""The fused sequence attention (`AttentionRuntime.sequence_impl`) equals the blocked path.

`layers.fused_causal_attention` hands q, k, v to `jax.nn.dot_product_attention`. Its "xla"
implementation runs here on the CPU and checks our side of the call: layout, grouped heads,
scale, causal mask and sliding window. "cudnn" is the same call with another implementation
and needs a GPU (the gpu-marked test below).

Metric: rel = max|a - b| / max|b| in float32; 1e-5 for the op, the logits and the gradients
of a whole model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config, windowed_qwen2_config

from taylorcal_jax.models.layers import (
    AttentionRuntime,
    MaskSpec,
    attend,
    fused_causal_attention,
    resolve_sequence_impl,
)
from taylorcal_jax.models.teacher import Transformer, init_params


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _config():
    return windowed_qwen2_config()


@pytest.mark.parametrize("window", [None, 5])
def test_fused_op_equals_attend(window):
    t, h, hkv, d = 23, 6, 2, 8
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = 2.0 * jax.random.normal(kq, (2, t, h, d))
    k = 2.0 * jax.random.normal(kk, (2, t, hkv, d))
    v = jax.random.normal(kv, (2, t, hkv, d))
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    spec = MaskSpec(idx, idx, jnp.ones((2, t), bool), window)
    want = attend(q, k, v, spec, jnp.float32)
    got = fused_causal_attention(q, k, v, window, jnp.float32, "xla")
    assert got.shape == want.shape
    assert _rel(got, want) <= 1e-5


def _logits_and_grads(model, params, tokens, valid=None):
    def loss(p):
        logits = model.apply({"params": p}, tokens, valid_bt=valid)[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def test_model_with_fused_attention_equals_blocked():
    config = _config()
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, size=(2, 17)))
    fused = Transformer(config, attention_runtime=AttentionRuntime(sequence_impl="xla"))
    logits, grads = _logits_and_grads(fused, params, tokens)
    want_logits, want_grads = _logits_and_grads(Transformer(config), params, tokens)
    assert _rel(logits, want_logits) <= 1e-5
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert _rel(g, w) <= 1e-5

    # the fused call is really made: its jaxpr differs from the blocked path's
    def jaxpr(model):
        return str(jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens)[0])(params))

    assert jaxpr(fused) != jaxpr(Transformer(config))


def test_padded_call_takes_the_blocked_path():
    # with key validity given the fused kernels cannot mask: the call must equal the blocked one
    config = _config()
    params = init_params(config, jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 96, size=(2, 13)))
    valid = jnp.asarray(np.arange(13)[None, :] >= np.array([[0], [4]]))
    fused = Transformer(config, attention_runtime=AttentionRuntime(sequence_impl="xla"))
    got = fused.apply({"params": params}, tokens, valid_bt=valid)[0]
    want = Transformer(config).apply({"params": params}, tokens, valid_bt=valid)[0]
    ok = np.asarray(valid)
    np.testing.assert_array_equal(np.asarray(got)[ok], np.asarray(want)[ok])
    assert AttentionRuntime(sequence_impl="cudnn").for_call(padded=True).sequence_impl == "blocked"
    assert AttentionRuntime(sequence_impl="cudnn").for_call(padded=False).sequence_impl == "cudnn"


def test_unknown_sequence_impl_is_refused():
    with pytest.raises(ValueError, match="sequence_impl must be one of"):
        AttentionRuntime(sequence_impl="flash")
    with pytest.raises(ValueError, match="attention impl must be one of"):
        resolve_sequence_impl("flash", jnp.bfloat16)


@pytest.mark.parametrize(
    "choice, dtype, backend, platform, want",
    [
        ("auto", jnp.bfloat16, "gpu", "cuda 12080", "cudnn"),
        ("auto", jnp.float16, "cuda", "cuda 12080", "cudnn"),
        ("auto", jnp.float32, "gpu", "cuda 12080", "blocked"),  # cuDNN takes bf16/fp16 only
        ("auto", jnp.bfloat16, "gpu", "rocm 6.3", "blocked"),  # no cuDNN on AMD GPUs
        ("auto", jnp.bfloat16, "cpu", "cpu", "blocked"),
        ("auto", jnp.bfloat16, "tpu", "tpu", "blocked"),
        ("xla", jnp.bfloat16, "gpu", "cuda 12080", "xla"),  # a named one is kept
        ("cudnn", jnp.float32, "cpu", "cpu", "cudnn"),  # (the stage checks refuse it there)
    ],
)
def test_auto_sequence_impl_is_cudnn_only_on_nvidia_gpus_in_half_precision(
    choice, dtype, backend, platform, want
):
    assert resolve_sequence_impl(choice, dtype, backend, platform) == want


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["windowed_d16", "smollm2_heads"])
def test_cudnn_equals_blocked_in_bf16_on_gpu(shape):
    # a sliding-window layer with head dim 16, and SmolLM2-135M's attention (9 query heads on
    # 3 KV heads of dim 64, no window), so that a failure says which of the two cuDNN refused
    if shape == "windowed_d16":
        config = _config()
    else:
        config = tiny_model_config(
            vocab_size=96,
            hidden_size=576,
            intermediate_size=96,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
        )
    params = init_params(config, jax.random.PRNGKey(2))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 96, size=(4, 256)))
    fused = Transformer(
        config, dtype=jnp.bfloat16, attention_runtime=AttentionRuntime(sequence_impl="cudnn")
    )
    logits, grads = _logits_and_grads(fused, params, tokens)
    want_logits, want_grads = _logits_and_grads(
        Transformer(config, dtype=jnp.bfloat16), params, tokens
    )
    assert _rel(logits, want_logits) <= 2e-2
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert _rel(g, w) <= 5e-2
