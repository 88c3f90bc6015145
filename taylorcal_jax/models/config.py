"""Teacher architecture description, read from and written to Hugging Face `config.json`.

`ModelConfig` is a frozen (hashable) dataclass so it can be a static argument of
`jax.jit` and a field of Flax modules. It covers the decoder-only families this
project converts: Llama 3.x, Qwen2/2.5, Qwen3 and Mistral.

Parameter pytree layout shared by every model in `taylorcal_jax.models`
(Flax Linen names; a Dense `kernel` is the transpose of the HF `weight`):

    embed_tokens/embedding                      [V, D]
    layers_{i}/input_layernorm/scale            [D]
    layers_{i}/self_attn/{q,k,v}_proj/kernel    [D, H*d], [D, Hkv*d], [D, Hkv*d]
    layers_{i}/self_attn/{q,k,v}_proj/bias      (attention_bias only)
    layers_{i}/self_attn/o_proj/kernel          [H*d, D]
    layers_{i}/self_attn/{q,k}_norm/scale       [d] (Qwen3 only)
    layers_{i}/post_attention_layernorm/scale   [D]
    layers_{i}/mlp/{gate,up}_proj/kernel        [D, F]
    layers_{i}/mlp/down_proj/kernel             [F, D]
    norm/scale                                  [D]
    lm_head/kernel                              [D, V] (absent when embeddings are tied)

(`layers_{i}` and `self_attn` are spelled by models/paths.py.) Hybrid students keep this
layout; a converted layer holds its student mixer's params under the mixer's registry name
(e.g. `gdn`) in place of `self_attn`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this project can load."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from `rope_parameters` / `rope_scaling`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type == "default":
            return out
        out["factor"] = self.factor
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        if self.rope_type == "yarn":
            out.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow)
            if self.original_max_position_embeddings is not None:
                out["original_max_position_embeddings"] = self.original_max_position_embeddings
            for key in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
            if not self.truncate:
                out["truncate"] = False
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only softmax Transformer in the Hugging Face Llama layout."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: RopeConfig = RopeConfig()
    attention_bias: bool = False
    qk_norm: bool = False
    # Per-layer sliding window (None = full causal attention), length num_hidden_layers.
    sliding_windows: tuple[int | None, ...] = ()
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    # one end id, or the teacher's several (Llama 3.x Instruct lists three): generation stops at
    # any of them (`end_token_ids`)
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def end_token_ids(self) -> tuple[int, ...]:
        """The ids at which generation stops: eos_token_id as a tuple (empty for None)."""
        return id_tuple(self.eos_token_id)

    def __post_init__(self):
        # a list of end ids (config.json's, or a JSON round trip of this config) as a tuple:
        # the config is hashed as part of a model, a static argument of jitted calls
        object.__setattr__(self, "eos_token_id", token_ids(self.eos_token_id))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        _check_family_features(self.model_type, self.attention_bias, self.qk_norm)
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {self.rope.rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_hidden_layers)
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries for "
                f"{self.num_hidden_layers} layers"
            )

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ------------------------------------------------------------------ HF I/O

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a parsed HF `config.json` (transformers 4.x or 5.x keys)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu)")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=True is not supported")
        missing = [k for k in _REQUIRED_HF_KEYS if k not in hf]
        if missing:
            raise UnsupportedModelError(f"config.json lacks {', '.join(missing)}")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        if "head_dim" in hf and hf["head_dim"] is None and model_type in _HEAD_DIM_REQUIRED:
            # llama's and mistral's configs take a null head_dim as hidden / heads; qwen's do not
            raise UnsupportedModelError(f"head_dim is null, which {model_type} does not take")
        head_dim = hf.get("head_dim", _HEAD_DIM.get(model_type)) or hidden // num_heads
        num_kv_heads = hf.get("num_key_value_heads", _KV_HEADS.get(model_type)) or num_heads
        layers = hf["num_hidden_layers"]
        rope = _rope_from_hf(hf)
        # Qwen2 always has q/k/v biases (transformers hard-codes them); others read the key.
        attention_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
        _check_family_features(model_type, attention_bias, model_type == "qwen3")
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=_max_positions(hf),
            rope=rope,
            attention_bias=bool(attention_bias),
            qk_norm=model_type == "qwen3",
            sliding_windows=_sliding_windows_from_hf(hf, model_type, layers),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=_first_id(hf.get("bos_token_id", _BOS_EOS.get(model_type, (None,))[0])),
            # one or several: __post_init__
            eos_token_id=hf.get("eos_token_id", _BOS_EOS.get(model_type, (None, None))[1]),
            pad_token_id=_first_id(hf.get("pad_token_id")),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` contents transformers needs to rebuild this model."""
        arch = {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "mistral": "MistralForCausalLM",
        }[self.model_type]
        rope = self.rope.to_hf()
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            # Both spellings: transformers 5 reads rope_parameters, 4.x reads the others.
            "rope_parameters": rope,
            "rope_theta": self.rope.theta,
            "rope_scaling": None if self.rope.rope_type == "default" else rope,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _json_ids(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        windows = {w for w in self.sliding_windows if w is not None}
        if len(windows) > 1:
            raise ValueError("layers with different sliding windows cannot be written to HF")
        window = windows.pop() if windows else None
        if self.model_type == "mistral":
            out["sliding_window"] = window
            if window is not None and None in self.sliding_windows:
                # windowed and full layers: transformers reads this as ministral's config
                out["layer_types"] = _layer_types(self.sliding_windows)
        elif self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = window is not None
            out["sliding_window"] = window
            out["layer_types"] = _layer_types(self.sliding_windows)
        elif window is not None:
            raise ValueError("llama models have no sliding window")
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(hf)


def id_tuple(value) -> tuple[int, ...]:
    """A token id entry (None, an id, or a sequence of ids) as a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(i) for i in value)
    return (int(value),)


def token_ids(value) -> int | tuple[int, ...] | None:
    """config.json's token id entry as ModelConfig holds it: an int, a tuple of several (a
    list of one is its int), or None."""
    ids = id_tuple(value)
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _json_ids(value):
    return list(value) if isinstance(value, tuple) else value


def _first_id(value):
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    # transformers 5 takes rope_scaling whole when it is set, else rope_parameters (a config it
    # saved holds rope_parameters {rope_type: default} next to a rope_scaling added later)
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedModelError(
            f"RoPE parameters per layer type ({', '.join(params)}) are not supported; "
            "one set for every layer"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    # transformers refuses these scalings without the keys (yarn's factor may be null: then
    # max_position_embeddings / original_max_position_embeddings, as below)
    missing = [k for k in _REQUIRED_ROPE_KEYS.get(rope_type, ()) if k not in params]
    if missing:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} needs {', '.join(missing)} in the RoPE parameters"
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    kwargs: dict[str, Any] = {"theta": float(theta), "rope_type": rope_type}
    if rope_type in ("llama3", "yarn"):
        # transformers falls back to max_position_embeddings (standardize_rope_params).
        original = hf.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings"
        )
        kwargs["original_max_position_embeddings"] = original or _max_positions(hf)
        if rope_type == "yarn" and params.get("factor") is None:
            kwargs["factor"] = _max_positions(hf) / kwargs["original_max_position_embeddings"]
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    ):
        if params.get(key) is not None and key not in kwargs:
            kwargs[key] = params[key]
    return RopeConfig(**kwargs)


_REQUIRED_ROPE_KEYS = {
    "linear": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}

_REQUIRED_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)  # fmt: skip

# transformers' defaults for keys a config.json may leave out (its config classes' fields);
# a family absent from a table has None there, which means hidden / heads (head_dim) or the
# number of query heads (num_key_value_heads)
_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768}
# transformers' (bos, eos) where config.json has no such key (Qwen's configs default to none)
_BOS_EOS = {"llama": (1, 2), "mistral": (1, 2)}
_HEAD_DIM = {"qwen3": 128}
_HEAD_DIM_REQUIRED = ("qwen2", "qwen3")  # families whose configs refuse a null head_dim
_KV_HEADS = {"mistral": 8, "qwen2": 32, "qwen3": 32}
_SLIDING_WINDOW = 4096  # mistral's, and qwen's where use_sliding_window is set
_QWEN_MAX_WINDOW_LAYERS = 28


def family_features(model_type: str) -> dict[str, bool]:
    """The ModelConfig fields a family fixes: q/k/v biases in qwen2 (transformers always
    builds them) and nowhere else (llama and qwen3 put a bias on o_proj too when
    attention_bias is set, which this project does not model; mistral has none); q/k RMSNorm
    in qwen3 and nowhere else. So a config written by to_hf_dict means the same model there."""
    return {"attention_bias": model_type == "qwen2", "qk_norm": model_type == "qwen3"}


def _check_family_features(model_type: str, attention_bias: bool, qk_norm: bool) -> None:
    """UnsupportedModelError where the two fields differ from `family_features`."""
    want = family_features(model_type)
    if attention_bias != want["attention_bias"]:
        raise UnsupportedModelError(
            f"{model_type} has q/k/v biases (attention_bias=True)"
            if want["attention_bias"]
            else f"attention_bias=True is not supported for {model_type} (its o_proj bias is not "
            "modelled); of the supported families only qwen2 has attention biases"
        )
    if qk_norm != want["qk_norm"]:
        raise UnsupportedModelError(
            f"{model_type} has q/k RMSNorm (qk_norm=True)"
            if want["qk_norm"]
            else f"qk_norm=True is qwen3's; {model_type} has no q/k RMSNorm"
        )


def _max_positions(hf) -> int:
    return hf.get("max_position_embeddings", _MAX_POSITIONS.get(hf.get("model_type"), 2048))


def _sliding_windows_from_hf(hf, model_type, layers) -> tuple[int | None, ...]:
    """Per-layer windows as transformers builds them, its defaults for absent keys included."""
    window = hf.get("sliding_window", _SLIDING_WINDOW)
    layer_types = hf.get("layer_types")
    if layer_types is not None:  # a list transformers would refuse or not run, refused here
        by_type = _windows_of_layer_types(layer_types, window, layers)
    if model_type == "mistral":
        if "layer_types" not in hf:
            return (window,) * layers
        # transformers reads a mistral config with layer_types as ministral's: each layer
        # windowed or not by its type (all windowed where the list is null and a window set)
        if layer_types is None:
            return (window,) * layers
        return by_type
    if model_type in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window") or window is None:
            return (None,) * layers
        if layer_types is None:
            first_windowed = hf.get("max_window_layers", _QWEN_MAX_WINDOW_LAYERS)
            return tuple(None if i < first_windowed else window for i in range(layers))
        return by_type
    return (None,) * layers


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_types(windows) -> list[str]:
    return [_LAYER_TYPES[w is not None] for w in windows]


def _windows_of_layer_types(layer_types, window, layers) -> tuple[int | None, ...]:
    """`window` for a sliding_attention layer, None (full attention) for a full_attention one;
    UnsupportedModelError for another type or a list of the wrong length."""
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(
            f"layer_types {', '.join(map(repr, unknown))} not supported "
            f"(only {', '.join(_LAYER_TYPES)})"
        )
    if len(layer_types) != layers:
        raise UnsupportedModelError(
            f"layer_types has {len(layer_types)} entries for {layers} layers"
        )
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
