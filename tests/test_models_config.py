"""ModelConfig <-> HF config.json: every family, rope types, sliding windows and bad inputs."""

import dataclasses
import json

import pytest
import transformers
from hf_factory import make_hf_config
from tiny_models import tiny_model_config

from taylorcal_jax.models.config import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    RopeConfig,
    UnsupportedModelError,
)
from taylorcal_jax.models.rope import rope_frequencies


def _from_hf(model_type, **kw):
    return ModelConfig.from_hf_dict(make_hf_config(model_type, **kw).to_dict())


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_families_round_trip(model_type):
    config = _from_hf(model_type, num_key_value_heads=1)
    assert config.model_type == model_type
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 16)
    assert config.attention_bias == (model_type == "qwen2")
    assert config.qk_norm == (model_type == "qwen3")
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    # transformers accepts what we write and reads the same architecture back.
    hf = transformers.AutoConfig.for_model(**config.to_hf_dict())
    assert ModelConfig.from_hf_dict(hf.to_dict()) == config


def test_several_end_ids_are_kept():
    # Llama 3.x Instruct's config.json lists three eos ids; generation stops at any of them
    config = _from_hf("llama", eos_token_id=[128001, 128008, 128009])
    assert config.eos_token_id == (128001, 128008, 128009)
    assert config.end_token_ids == (128001, 128008, 128009)
    assert config.to_hf_dict()["eos_token_id"] == [128001, 128008, 128009]
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    hash(config)  # a static jit argument
    assert _from_hf("llama", eos_token_id=[7]).eos_token_id == 7
    assert _from_hf("llama", eos_token_id=7).end_token_ids == (7,)
    assert _from_hf("llama", eos_token_id=None).end_token_ids == ()


def test_rope_types_parsed():
    c = _from_hf(
        "llama",
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 500000.0,
        },
    )
    assert c.rope == RopeConfig(
        theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=32
    )
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    # legacy transformers 4.x spelling: rope_theta + rope_scaling with "type"
    legacy = make_hf_config("llama").to_dict()
    legacy.pop("rope_parameters")
    legacy.update(rope_theta=1000.0, rope_scaling={"type": "linear", "factor": 2.0})
    c = ModelConfig.from_hf_dict(legacy)
    assert (c.rope.rope_type, c.rope.factor, c.rope.theta) == ("linear", 2.0, 1000.0)


def test_yarn_defaults_follow_transformers():
    hf = make_hf_config("llama", max_position_embeddings=256).to_dict()
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    c = ModelConfig.from_hf_dict(hf)
    assert c.rope.original_max_position_embeddings == 256
    inv_freq, scaling = rope_frequencies(c.rope, c.head_dim, c.max_position_embeddings)
    assert scaling == pytest.approx(0.1 * __import__("math").log(4.0) + 1.0)
    assert inv_freq.shape == (8,)


@pytest.mark.parametrize("window_key", [True, False], ids=["window", "no_window_key"])
@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_keys_left_out_of_config_json_get_transformers_defaults(model_type, window_key):
    # a trimmed config.json: windows, context length, KV heads and head dim as transformers'
    # config classes fill them in (Mistral's 4096-token window and 8 KV heads, Qwen's
    # max_window_layers 28, 4096-token window and 32 KV heads, Qwen3's head dim 128, the
    # families' max_position_embeddings)
    hf = dict(model_type=model_type, vocab_size=64, hidden_size=256, intermediate_size=64,
              num_hidden_layers=30, num_attention_heads=32)  # fmt: skip
    if model_type.startswith("qwen"):
        hf.update(use_sliding_window=True)
    if window_key:
        hf.update(sliding_window=8)
    ours, theirs = ModelConfig.from_hf_dict(hf), transformers.AutoConfig.for_model(**hf)
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or 256 // 32)
    kinds = getattr(theirs, "layer_types", None) or ["full_attention"] * 30
    if model_type == "mistral":  # every layer at its sliding_window
        kinds = ["sliding_attention"] * 30
    window = getattr(theirs, "sliding_window", None)
    want = tuple(window if k == "sliding_attention" else None for k in kinds)
    assert ours.sliding_windows == want
    # Llama's and Mistral's bos 1 and eos 2 (generation stopped nowhere without an eos)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)


def test_sliding_windows():
    assert _from_hf("mistral", sliding_window=7).sliding_windows == (7, 7)
    assert _from_hf("qwen2", sliding_window=7).sliding_windows == (None, None)  # not enabled
    c = _from_hf("qwen2", use_sliding_window=True, sliding_window=7, max_window_layers=1)
    assert c.sliding_windows == (None, 7)
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    c = _from_hf(
        "qwen3",
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    assert c.sliding_windows == (5, None, 5)


@pytest.mark.parametrize("layer_types", [["full_attention", "sliding_attention"] * 2, None])
def test_mistral_with_layer_types_windows_each_layer_as_transformers_does(tmp_path, layer_types):
    """transformers reads a mistral config.json holding layer_types as ministral's: a layer is
    windowed by its type, not every layer as plain mistral (a null list: all windowed)."""
    hf = make_hf_config("mistral", num_hidden_layers=4, sliding_window=5).to_dict()
    hf["layer_types"] = layer_types
    (tmp_path / "config.json").write_text(json.dumps(hf))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert theirs.model_type == "ministral"
    ours = ModelConfig.from_hf_dict(hf)
    want = tuple(5 if t == "sliding_attention" else None for t in theirs.layer_types)
    assert ours.sliding_windows == want
    assert ModelConfig.from_hf_dict(ours.to_hf_dict()) == ours


def test_layer_types_other_than_full_and_sliding_are_refused():
    hf = make_hf_config("qwen2", num_hidden_layers=2, use_sliding_window=True).to_dict()
    hf["layer_types"] = ["chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="layer_types 'chunked_attention' not"):
        ModelConfig.from_hf_dict(hf)
    hf["layer_types"] = ["full_attention"]
    with pytest.raises(UnsupportedModelError, match="layer_types has 1 entries for 2 layers"):
        ModelConfig.from_hf_dict(hf)
    # checked whether or not the windows are on (transformers' forward fails on the type)
    hf.update(use_sliding_window=False, layer_types=["chunked_attention", "full_attention"])
    with pytest.raises(UnsupportedModelError, match="layer_types 'chunked_attention' not"):
        ModelConfig.from_hf_dict(hf)
    mistral = {**make_hf_config("mistral", num_hidden_layers=2).to_dict(), "layer_types": []}
    with pytest.raises(UnsupportedModelError, match="layer_types has 0 entries for 2 layers"):
        ModelConfig.from_hf_dict(mistral)  # (transformers refuses it too; [] is not null)


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "linear"}, "rope_type 'linear' needs factor"),
        ({"rope_type": "yarn"}, "rope_type 'yarn' needs factor"),
        (
            {"rope_type": "llama3", "factor": 8.0},
            "rope_type 'llama3' needs low_freq_factor, high_freq_factor",
        ),
        (
            {
                "full_attention": {"rope_type": "default"},
                "sliding_attention": {"rope_type": "default"},
            },
            r"RoPE parameters per layer type \(full_attention, sliding_attention\)",
        ),
    ],
)
def test_rope_parameters_transformers_refuses_are_refused(rope, message):
    """Where transformers raises on the RoPE parameters, we do too, instead of running with
    made-up defaults (a linear factor of 1, llama3's frequency factors, theta 10000)."""
    hf = make_hf_config("qwen2").to_dict()
    hf["rope_parameters"] = {**rope, "rope_theta": 500.0} if "rope_type" in rope else rope
    hf.pop("rope_scaling", None)
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf_dict(hf)
    if "rope_type" in rope:
        with pytest.raises(KeyError):  # what transformers does with it
            transformers.AutoConfig.for_model(**hf)


def test_a_null_head_dim_is_hidden_over_heads_where_transformers_takes_it():
    for model_type in ("llama", "mistral"):
        hf = {**make_hf_config(model_type).to_dict(), "head_dim": None}
        assert ModelConfig.from_hf_dict(hf).head_dim == 64 // 4
    for model_type in ("qwen2", "qwen3"):
        hf = {**make_hf_config(model_type).to_dict(), "head_dim": None}
        with pytest.raises(UnsupportedModelError, match=f"head_dim is null, which {model_type}"):
            ModelConfig.from_hf_dict(hf)


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    # a config saved by transformers 5 (rope_parameters of the default type) to which yarn's
    # rope_scaling was added, as Qwen2.5's model cards say for long contexts
    hf = make_hf_config("qwen2", max_position_embeddings=256).to_dict()
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    hf["rope_theta"] = 1000000.0
    hf["rope_scaling"] = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    ours = ModelConfig.from_hf_dict(hf)
    theirs = transformers.AutoConfig.for_model(**hf).rope_parameters
    assert (ours.rope.rope_type, ours.rope.factor) == (theirs["rope_type"], theirs["factor"])
    assert ours.rope.theta == theirs["rope_theta"] == 1000000.0
    assert ours.rope.original_max_position_embeddings == 64


def test_features_a_family_fixes():
    # biases on q/k/v in qwen2 only, q/k norm in qwen3 only: what to_hf_dict writes must mean
    # the same model in transformers, and a pretrained teacher gets its family's features
    for model_type in SUPPORTED_MODEL_TYPES:
        config = tiny_model_config(model_type=model_type)
        assert config.attention_bias == (model_type == "qwen2")
        assert config.qk_norm == (model_type == "qwen3")
        assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    with pytest.raises(UnsupportedModelError, match="qwen3 has q/k RMSNorm"):
        tiny_model_config(model_type="qwen3", qk_norm=False)
    with pytest.raises(UnsupportedModelError, match="qwen2 has q/k/v biases"):
        tiny_model_config(model_type="qwen2", attention_bias=False)
    with pytest.raises(UnsupportedModelError, match="qk_norm=True is qwen3's"):
        tiny_model_config(model_type="llama", qk_norm=True)
    for model_type in ("llama", "qwen3"):  # transformers adds an o_proj bias with the flag
        with pytest.raises(UnsupportedModelError, match=f"not supported for {model_type}"):
            _from_hf(model_type, attention_bias=True)


def test_errors(tmp_path):
    base = make_hf_config("llama").to_dict()
    with pytest.raises(UnsupportedModelError, match="llama, qwen2, qwen3, mistral"):
        ModelConfig.from_hf_dict({**base, "model_type": "gpt_neox"})
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        ModelConfig.from_hf_dict({**base, "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="rope_type 'dynamic'"):
        ModelConfig.from_hf_dict(
            {**base, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}
        )
    with pytest.raises(ValueError, match="multiple of"):
        ModelConfig.from_hf_dict({**base, "num_key_value_heads": 3})
    with pytest.raises(UnsupportedModelError, match="config.json lacks vocab_size, hidden_size"):
        ModelConfig.from_hf_dict(
            {k: v for k, v in base.items() if k not in ("hidden_size", "vocab_size")}
        )
    config = ModelConfig.from_hf_dict(base)
    with pytest.raises(ValueError, match="sliding_windows has 1 entries"):
        dataclasses.replace(config, sliding_windows=(4,))
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(base))
    assert ModelConfig.from_json_file(tmp_path / "config.json") == config
    hash(config)  # static argument of jax.jit


ROPE_VARIANTS = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 3.0, "rope_theta": 500.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
     "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
     "rope_theta": 1000000.0, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
     "rope_theta": 10000.0, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
     "rope_theta": 10000.0, "attention_factor": 1.3},
]  # fmt: skip


@pytest.mark.parametrize("variant", ROPE_VARIANTS, ids=lambda v: v["rope_type"])
def test_rope_frequencies_match_transformers(variant):
    """inv_freq and attention scaling equal transformers' ROPE_INIT_FUNCTIONS (rel. 1e-6)."""
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = make_hf_config("llama", head_dim=32, rope_parameters=dict(variant))
    if variant["rope_type"] == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        ref_inv, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[variant["rope_type"]](hf, "cpu")
    c = ModelConfig.from_hf_dict(hf.to_dict())
    inv, scale = rope_frequencies(c.rope, c.head_dim, c.max_position_embeddings)
    ref_inv = ref_inv.numpy()
    assert np.max(np.abs(inv - ref_inv) / ref_inv) <= 1e-6
    assert scale == pytest.approx(float(ref_scale), rel=1e-7)
