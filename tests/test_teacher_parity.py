"""Parity of our Flax teacher with transformers' PyTorch models on tiny random checkpoints.

Error metric throughout: rel_err(a, b) = max|a - b| / max|b| over the compared logits
(b = transformers). fp32 tolerance 1e-4; bf16 params+compute vs our fp32: 5e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_factory import load_torch_model, make_tiny_checkpoint, torch_logits

from taylorcal_jax.models.hf_io import load_pretrained, save_pretrained
from taylorcal_jax.models.teacher import Transformer

B, T = 2, 24

CASES = {
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    "llama_tied_mqa": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama_linear": (
        "llama",
        dict(rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 500.0}),
    ),
    "llama_llama3": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
            }
        ),
    ),
    "llama_yarn": (
        "llama",
        dict(
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
        ),
    ),
    "qwen2_bias": ("qwen2", dict()),
    "qwen2_per_layer_window": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
    "qwen3_qknorm_tied": ("qwen3", dict(tie_word_embeddings=True)),
    "mistral_window": ("mistral", dict(sliding_window=7)),
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 160, size=(B, T))


def _forward(config, params, tokens, dtype=jnp.float32, valid=None, positions=None):
    model = Transformer(config, dtype=dtype)
    fn = jax.jit(
        lambda p, x, v, pos: model.apply({"params": p}, x, valid_bt=v, positions_bt=pos)[0]
    )
    return np.asarray(fn(params, jnp.asarray(tokens), valid, positions))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_fp32(case, ckpt_root, tokens):
    model_type, overrides = CASES[case]
    # One family is written sharded by transformers, to read its index format too.
    shard = "30KB" if case == "llama_gqa" else None
    path = make_tiny_checkpoint(ckpt_root, model_type, name=case, max_shard_size=shard, **overrides)
    if shard:
        assert (path / "model.safetensors.index.json").exists()
    config, params = load_pretrained(path)
    ref = torch_logits(load_torch_model(path), tokens)
    ours = _forward(config, params, tokens)
    assert rel_err(ours, ref) <= 1e-4, case
    if overrides.get("tie_word_embeddings"):
        assert "lm_head" not in params


def test_left_padded_batch_matches_transformers(ckpt_root):
    """Left padding + sliding window: valid positions agree with HF given mask and positions."""
    path = make_tiny_checkpoint(ckpt_root, "mistral", name="mistral_pad", sliding_window=5)
    config, params = load_pretrained(path)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 160, size=(3, 20))
    valid = np.ones((3, 20), bool)
    valid[1, :4] = False
    valid[2, :11] = False
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    ref = torch_logits(load_torch_model(path), tokens, attention_mask=valid, position_ids=positions)
    # Ours with default positions (cumsum(valid) - 1) must equal HF with explicit ones.
    ours = _forward(config, params, tokens, valid=jnp.asarray(valid), positions=None)
    assert rel_err(ours[valid], ref[valid]) <= 1e-4
    # Row 0 (no padding) must not change because other rows are padded.
    alone = _forward(config, params, tokens[:1])
    assert rel_err(ours[0], alone[0]) <= 1e-5


def test_bf16_close_to_fp32(ckpt_root, tokens):
    path = make_tiny_checkpoint(ckpt_root, "qwen3", name="qwen3_bf16")
    config, params32 = load_pretrained(path)
    _, params16 = load_pretrained(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params16))
    ref = _forward(config, params32, tokens)
    ours = _forward(config, params16, tokens, dtype=jnp.bfloat16)
    err = rel_err(ours, ref)
    assert np.isfinite(ours).all()
    assert err <= 5e-2, err
    # bf16 params computed in fp32 are exactly the rounded-weights model, close too.
    assert rel_err(_forward(config, params16, tokens), ref) <= 5e-2


def test_bf16_checkpoint_loads(ckpt_root, tokens):
    """A checkpoint stored in bf16 by transformers loads and matches HF's fp32 upcast."""
    import torch

    path = make_tiny_checkpoint(ckpt_root, "llama", name="llama_bf16_disk", dtype=torch.bfloat16)
    config, params = load_pretrained(path)
    assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    ref = torch_logits(load_torch_model(path, dtype=torch.float32), tokens)
    ours = _forward(config, jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params), tokens)
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("case", ["llama_yarn", "qwen2_per_layer_window", "qwen3_qknorm_tied"])
def test_round_trip_through_transformers(case, ckpt_root, tokens, tmp_path):
    """ours -> save_pretrained (sharded) -> transformers loads -> same logits as the original."""
    model_type, overrides = CASES[case]
    path = make_tiny_checkpoint(ckpt_root, model_type, name=f"rt_{case}", **overrides)
    config, params = load_pretrained(path)
    out = save_pretrained(tmp_path / "saved", config, params, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists()
    ref = torch_logits(load_torch_model(path), tokens)
    again = torch_logits(load_torch_model(out), tokens)
    assert rel_err(again, ref) <= 1e-6
    config2, params2 = load_pretrained(out)
    assert config2 == config
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), params, params2)
    )


def test_intermediates_match_transformers(ckpt_root, tokens):
    """resid_in / attn_in / attn_context / attn_out equal HF's (hidden_states, hooks on norms and
    o_proj), rel. error <= 1e-4 each, so statistics and alignment see the real teacher."""
    import torch

    path = make_tiny_checkpoint(ckpt_root, "qwen3", name="qwen3_inter", num_key_value_heads=1)
    config, params = load_pretrained(path)
    model = load_torch_model(path)
    captured = {}

    def hook(key, use_input):
        def fn(module, args, out):
            captured[key] = (args[0] if use_input else out).detach().float().numpy()

        return fn

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.input_layernorm.register_forward_hook(hook((i, "attn_in"), False)))
        handles.append(layer.self_attn.o_proj.register_forward_hook(hook((i, "ctx"), True)))
        handles.append(layer.self_attn.o_proj.register_forward_hook(hook((i, "out"), False)))
    with torch.no_grad():
        hf = model(torch.as_tensor(tokens), output_hidden_states=True)
    for h in handles:
        h.remove()
    _, _, inter = Transformer(config).apply(
        {"params": params}, jnp.asarray(tokens), return_intermediates=True
    )
    for i in range(config.num_hidden_layers):
        li = inter[f"layers_{i}"]
        assert rel_err(li["resid_in"], hf.hidden_states[i].numpy()) <= 1e-4
        assert rel_err(li["attn_in"], captured[(i, "attn_in")]) <= 1e-4
        ctx = np.asarray(li["attn_context"])
        assert ctx.shape == (B, T, config.num_attention_heads, config.head_dim)
        assert rel_err(ctx.reshape(B, T, -1), captured[(i, "ctx")]) <= 1e-4
        assert rel_err(li["attn_out"], captured[(i, "out")]) <= 1e-4


def test_a_tied_config_with_its_own_stored_head_loads_untied(tmp_path, tokens):
    """A checkpoint whose config.json ties the embeddings but whose file holds a different
    lm_head.weight (a fine-tune that trained its head): transformers unties it and uses the
    stored head; so do we, instead of running the embedding as the head."""
    import json

    path = make_tiny_checkpoint(tmp_path, "qwen2", name="own_head", tie_word_embeddings=False)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    config, params = load_pretrained(path)
    assert not config.tie_word_embeddings and "lm_head" in params
    assert (
        rel_err(_forward(config, params, tokens), torch_logits(load_torch_model(path), tokens))
        < 1e-4
    )


def test_a_single_file_is_read_before_an_earlier_saves_index(tmp_path, tokens):
    """transformers' save_pretrained, writing one file where a sharded save was, leaves the old
    index; transformers then reads model.safetensors, and so do we."""
    path = make_tiny_checkpoint(tmp_path, "llama", name="resaved", max_shard_size="30KB")
    load_torch_model(path).save_pretrained(path)
    assert (path / "model.safetensors").exists() and (
        path / "model.safetensors.index.json"
    ).exists()
    config, params = load_pretrained(path)
    assert (
        rel_err(_forward(config, params, tokens), torch_logits(load_torch_model(path), tokens))
        < 1e-4
    )
