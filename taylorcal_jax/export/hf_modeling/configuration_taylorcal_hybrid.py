"""Configuration of the hybrid causal LM in modeling_taylorcal_hybrid.py (model_type
"taylorcal_hybrid"): the teacher's softmax attention in some layers, Gated DeltaNet in the others.

taylorcal_jax's exporter writes this file, the modelling file and a config.json into the model
directory. Fields:

    teacher architecture   vocab_size, hidden_size, intermediate_size, num_hidden_layers,
                           num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps,
                           max_position_embeddings, attention_bias (q/k/v biases), qk_norm
                           (per-head q/k RMSNorm), sliding_windows (one per layer, None = full
                           causal attention), tie_word_embeddings, bos/eos/pad_token_id
    rope                   the teacher's RoPE parameters (theta, rope_type, factor, ...)
    rope_inv_freq          [head_dim / 2] rotation frequencies and the cos/sin scale, computed
    rope_attention_scaling from `rope` when exporting: these two are what the model applies
    mixers                 per layer "attention" (softmax attention) or "gdn" (Gated DeltaNet)
    gdn                    the GDN architecture: num_heads, head_k_dim, head_v_dim,
                           use_short_conv, conv_size, norm_eps
    gdn_kernels            how GDN layers run, chosen when loading (not in the exported
                           config.json): "auto" (flash-linear-attention's kernels for CUDA
                           tensors when it is installed, else the PyTorch recurrence), "fla" or
                           "torch", e.g. from_pretrained(path, trust_remote_code=True,
                           gdn_kernels="fla")
    teacher_model_type     provenance: the teacher's model_type and where it was loaded from
    teacher_path
"""

from __future__ import annotations

from transformers import PretrainedConfig

MIXERS = ("attention", "gdn")
GDN_KERNELS = ("auto", "fla", "torch")
GDN_KEYS = ("num_heads", "head_k_dim", "head_v_dim", "use_short_conv", "conv_size", "norm_eps")


class TaylorcalHybridConfig(PretrainedConfig):
    model_type = "taylorcal_hybrid"

    def __init__(
        self,
        vocab_size: int = 64,
        hidden_size: int = 32,
        intermediate_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        num_key_value_heads: int = 1,
        head_dim: int = 16,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 2048,
        rope: dict | None = None,
        rope_inv_freq: list[float] | None = None,
        rope_attention_scaling: float = 1.0,
        attention_bias: bool = False,
        qk_norm: bool = False,
        sliding_windows: list[int | None] | None = None,
        mixers: list[str] | None = None,
        gdn: dict | None = None,
        gdn_kernels: str = "auto",
        teacher_model_type: str | None = None,
        teacher_path: str | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope = dict(rope or {"theta": 10000.0, "rope_type": "default"})
        self.rope_inv_freq = None if rope_inv_freq is None else [float(f) for f in rope_inv_freq]
        self.rope_attention_scaling = float(rope_attention_scaling)
        self.attention_bias = attention_bias
        self.qk_norm = qk_norm
        self.sliding_windows = list(sliding_windows or [None] * num_hidden_layers)
        self.mixers = list(mixers or ["attention"] * num_hidden_layers)
        self.gdn = dict(gdn or {})
        self.gdn_kernels = gdn_kernels
        self.teacher_model_type = teacher_model_type
        self.teacher_path = teacher_path
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self) -> dict:
        """What config.json holds: everything but `gdn_kernels`, a load-time choice (a model
        loaded with "fla" and saved again must load where fla is not installed)."""
        out = super().to_dict()
        out.pop("gdn_kernels", None)
        return out

    def _check(self) -> None:
        n = self.num_hidden_layers
        for name in ("sliding_windows", "mixers"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} layers")
        bad = sorted({m for m in self.mixers if m not in MIXERS})
        if bad:
            raise ValueError(f"unknown mixers {bad}; each layer is one of {MIXERS}")
        if "gdn" in self.mixers:
            missing = [k for k in GDN_KEYS if k not in self.gdn]
            if missing:
                raise ValueError(f"config.gdn lacks {missing} but the model has GDN layers")
        if self.gdn_kernels not in GDN_KERNELS:
            raise ValueError(f"gdn_kernels must be one of {GDN_KERNELS}, got {self.gdn_kernels!r}")
        if self.rope_inv_freq is not None and len(self.rope_inv_freq) != self.head_dim // 2:
            raise ValueError(
                f"rope_inv_freq has {len(self.rope_inv_freq)} entries, head_dim / 2 is "
                f"{self.head_dim // 2}"
            )
