"""Hybrid causal LM for transformers: the teacher's softmax attention in some layers, Gated
DeltaNet (GDN) linear attention in the others. taylorcal_jax's exporter writes this file next to
configuration_taylorcal_hybrid.py; load the directory with

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

Needs transformers 5 (transformers.cache_utils' layer classes); tested with 5.17 and 5.25. The
cache argument and output field are `past_key_values` before the rename to `cache` (5.25 has
`cache`; 5.17 has the old name): forward takes either, and the outputs use the one the installed
version declares (CACHE_FIELD), which is where generate() looks for it.

Letters: B batch, T new tokens, S key slots, D hidden, H heads, Hkv key/value heads, d head dim,
K / V GDN key / value head dims, W short-convolution width, C its channels.

    block l:  h <- h + mixer_l(rmsnorm(h)),  h <- h + mlp(rmsnorm(h))
    mlp(x)  = (silu(x Wgate) * x Wup) Wdown
    logits  = rmsnorm(h_L) Whead                 (Whead = E^T when embeddings are tied)

Softmax attention (mixer "attention", parameters `self_attn.*`):

    q = x Wq (+bq), k = x Wk (+bk), v = x Wv (+bv)    q, k <- rmsnorm_d(q), rmsnorm_d(k) (qk_norm)
    q, k <- rope(q, pos), rope(k, pos)   rotate-half pairs (j, j + d/2) by pos * rope_inv_freq[j],
                                         cos and sin scaled by rope_attention_scaling
    y = concat_h softmax(q.k / sqrt(d) + mask) v Wo,   query head h reads key/value head h // G
    mask(t, s): slot s holds a real token, s <= t, and t - s < window (sliding layers); t, s
                count slots (padding included), as in the transformers implementations

Gated DeltaNet (mixer "gdn", parameters `gdn.*`; flash-linear-attention's GatedDeltaNet with
expand_v = K / V and an output gate):

    q = silu(conv(x Wq)), k = silu(conv(x Wk)), v = silu(conv(x Wv))   [B, T, H, K|V]
        conv: the optional causal depthwise convolution, weight [C, W], weight[:, W-1] on the
        current token (identity when use_short_conv is off)
    beta_t = sigmoid(x_t Wb),  g_t = -exp(A_log) softplus(x_t Wa + dt_bias)    (in float32)
    q, k <- q / sqrt(|q|^2 + 1e-6), k / sqrt(|k|^2 + 1e-6)
    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T      S: [K, V] float32
    o_t = K^-1/2 S_t^T q_t
    y_t = Wo concat_h[ rmsnorm(o_t) * w_norm * silu(x_t Wg) ]                 (eps gdn.norm_eps)

    config.gdn_kernels: "fla" runs flash-linear-attention's fused_recurrent_gated_delta_rule
    (T <= 64, as fla's own layer does at inference) or chunk_gated_delta_rule; "torch" runs the
    recurrence above token by token; "auto" uses fla for CUDA tensors when it is installed.

Padding: `attention_mask` [B, past + T] is 1 on real tokens (left padding is 0). Positions count
real tokens (cumsum - 1). Padding is never attended to, and in GDN layers it writes nothing:
its q, k, v (before the convolution), beta and g are zeroed, so the state passes through, and a
left-padded prompt gives the outputs of the unpadded one.

Cache (`TaylorcalHybridCache`, created by forward when use_cache): an attention layer keeps its
keys and values (transformers' DynamicLayer, or DynamicSlidingWindowLayer holding the last
window - 1); a GDN layer keeps its state [B, H, K, V] float32 and, with the convolution, the last
W-1 inputs [B, W-1, C] of q, k and v. Prefill, then one token per call: the logits equal those of
one forward over the whole sequence.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_taylorcal_hybrid import TaylorcalHybridConfig

FLA_RECURRENT_MAX_TOKENS = 64  # fla's GatedDeltaNet layer switches to the chunked kernel above this
# The cache's name in model outputs (and in generate()'s calls of forward) in this transformers.
CACHE_FIELD = (
    "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
)


@functools.cache
def fla_kernels():
    """(chunk_gated_delta_rule, fused_recurrent_gated_delta_rule), or None without fla."""
    try:
        from fla.ops.gated_delta_rule import (
            chunk_gated_delta_rule,
            fused_recurrent_gated_delta_rule,
        )
    except ImportError:
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


# ------------------------------------------------------------------------ pure functions


def one_cache(cache, past_key_values):
    """The cache given under either name (see the module docstring), or None."""
    if cache is not None and past_key_values is not None:
        raise ValueError("give the cache as `cache` or as `past_key_values`, not both")
    return past_key_values if cache is None else cache


def rms_normalize(x, eps):
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def apply_rope(x_bthd, cos_btd, sin_btd):
    """x * cos + rotate_half(x) * sin, computed in float32, returned in x's dtype."""
    x = x_bthd.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    out = x * cos_btd[:, :, None] + rotated * sin_btd[:, :, None]
    return out.to(x_bthd.dtype)


def attention_mask_bts(valid_bs, q_slots_t, k_slots_s, window):
    """Boolean [B, T, S]: key slot valid, causal, inside the window. Each query also sees its own
    slot, which changes nothing for real tokens and keeps padding rows finite."""
    diff = q_slots_t[:, None] - k_slots_s[None, :]
    allowed = (diff >= 0) & valid_bs[:, None, :]
    if window is not None:
        allowed = allowed & (diff < window)
    return allowed | (diff == 0)[None]


def short_conv(x_btc, weight_cw, history_bwc, valid_bt):
    """Causal depthwise convolution of x after its history (the previous W-1 inputs).

    y_t = sum_j weight[:, j] * xp[t + j], xp = [history, x]. Returns (y [B, T, C], the new history:
    the W-1 inputs ending at the last real token of each row, or the old history if none).
    """
    width = weight_cw.shape[1]
    t = x_btc.shape[1]
    xp = torch.cat([history_bwc.to(x_btc.dtype), x_btc], dim=1)
    weight = weight_cw.to(x_btc.dtype)
    y = sum(xp[:, j : j + t] * weight[:, j] for j in range(width))
    steps = torch.arange(t, device=x_btc.device)
    last = torch.where(valid_bt, steps, -1).max(dim=1).values  # [B], -1 when no real token
    index = (last + 1)[:, None] + torch.arange(width - 1, device=x_btc.device)
    index = index[:, :, None].expand(-1, -1, xp.shape[-1])
    return y, torch.gather(xp, 1, index).to(history_bwc.dtype)


def l2_normalize(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule(q_bthk, k_bthk, v_bthv, g_bth, beta_bth, state_bhkv):
    """The recurrence of the module docstring, token by token, in float32.

    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32).
    """
    scale = q_bthk.shape[-1] ** -0.5
    q, k = l2_normalize(q_bthk.float()), l2_normalize(k_bthk.float())
    v, g, beta = v_bthv.float(), g_bth.float(), beta_bth.float()
    state = state_bhkv.float()
    outputs = []
    for t in range(q.shape[1]):
        state = state * torch.exp(g[:, t])[..., None, None]
        prediction_bhv = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        correction_bhv = beta[:, t, :, None] * (v[:, t] - prediction_bhv)
        state = state + k[:, t, :, :, None] * correction_bhv[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]) * scale)
    return torch.stack(outputs, dim=1).to(v_bthv.dtype), state


def gated_delta_rule_fla(q_bthk, k_bthk, v_bthv, g_bth, beta_bth, state_bhkv):
    """The same through flash-linear-attention's kernels (state layout [B, H, K, V])."""
    chunk, fused_recurrent = fla_kernels()
    kernel = fused_recurrent if q_bthk.shape[1] <= FLA_RECURRENT_MAX_TOKENS else chunk
    o, state = kernel(
        q=q_bthk,
        k=k_bthk,
        v=v_bthv,
        g=g_bth.float(),
        beta=beta_bth.to(q_bthk.dtype),
        scale=q_bthk.shape[-1] ** -0.5,
        initial_state=state_bhkv.float(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    return o.to(v_bthv.dtype), state.float()


# ------------------------------------------------------------------------ cache


class GatedDeltaNetCacheLayer:
    """Decoding state of one GDN layer: `state` [B, H, K, V] float32 and, with the short
    convolution, `conv` {"q", "k", "v": [B, W-1, C]}; None until the first call."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        self.state = None
        self.conv = None
        self.seen_tokens = 0

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = fn(self.state)
        if self.conv is not None:
            self.conv = {name: fn(x) for name, x in self.conv.items()}

    def reorder_cache(self, beam_idx) -> None:
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._map(lambda x: x[indices])

    def reset(self) -> None:
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a Gated DeltaNet state cannot be rolled back; decoding strategies that crop the "
            "cache (assisted or prompt-lookup decoding) are not supported"
        )

    def offload(self) -> None:  # a GDN state is small and stays on its device
        pass

    def prefetch(self) -> None:
        pass


class TaylorcalHybridCache(Cache):
    """One cache layer per model layer (see the module docstring)."""

    def __init__(self, config: TaylorcalHybridConfig):
        layers = []
        for mixer, window in zip(config.mixers, config.sliding_windows, strict=True):
            if mixer == "gdn":
                layers.append(GatedDeltaNetCacheLayer())
            elif window is None:
                layers.append(DynamicLayer())
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
        super().__init__(layers=layers)


# ------------------------------------------------------------------------ modules


class TaylorcalRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_normalize(x, self.eps).to(x.dtype) * self.weight.to(x.dtype)


class TaylorcalGatedRMSNorm(nn.Module):
    """rmsnorm(o) * weight * silu(gate) over the last axis, in float32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, o, gate):
        out = rms_normalize(o, self.eps) * self.weight.float() * F.silu(gate.float())
        return out.to(o.dtype)


class TaylorcalShortConvolution(nn.Module):
    """Holds a depthwise causal convolution kernel `weight` [C, W] (see `short_conv`)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, width))


class TaylorcalMLP(nn.Module):
    def __init__(self, config: TaylorcalHybridConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TaylorcalAttention(nn.Module):
    def __init__(self, config: TaylorcalHybridConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.window = c.sliding_windows[layer_idx]
        d = c.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        if c.qk_norm:
            self.q_norm = TaylorcalRMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = TaylorcalRMSNorm(self.head_dim, c.rms_norm_eps)

    def forward(self, x_btd, *, cos_btd, sin_btd, valid_bs, q_slots_t, cache):
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x_btd).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x_btd).view(b, t, self.kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos_btd, sin_btd), apply_rope(k, cos_btd, sin_btd)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, d]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        s = k.shape[2]
        # The returned keys are the last s slots (a sliding-window layer drops older ones).
        k_slots_s = q_slots_t[-1] + 1 - s + torch.arange(s, device=x_btd.device)
        mask = attention_mask_bts(valid_bs[:, k_slots_s], q_slots_t, k_slots_s, self.window)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], scale=self.head_dim**-0.5
        )
        return self.o_proj(ctx.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class TaylorcalGatedDeltaNet(nn.Module):
    def __init__(self, config: TaylorcalHybridConfig, layer_idx: int):
        super().__init__()
        g = config.gdn
        self.layer_idx = layer_idx
        self.heads, self.k_dim, self.v_dim = g["num_heads"], g["head_k_dim"], g["head_v_dim"]
        self.kernels = config.gdn_kernels
        if self.kernels == "fla" and fla_kernels() is None:
            raise ImportError(
                "config.gdn_kernels is 'fla' but flash-linear-attention is not installed "
                "(pip install flash-linear-attention), or use gdn_kernels='auto'"
            )
        d, hk, hv = config.hidden_size, self.heads * self.k_dim, self.heads * self.v_dim
        self.q_proj = nn.Linear(d, hk, bias=False)
        self.k_proj = nn.Linear(d, hk, bias=False)
        self.v_proj = nn.Linear(d, hv, bias=False)
        self.a_proj = nn.Linear(d, self.heads, bias=False)
        self.b_proj = nn.Linear(d, self.heads, bias=False)
        self.g_proj = nn.Linear(d, hv, bias=False)
        self.o_proj = nn.Linear(hv, d, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.o_norm = TaylorcalGatedRMSNorm(self.v_dim, g["norm_eps"])
        self.conv_size = g["conv_size"] if g["use_short_conv"] else None
        if self.conv_size is not None:
            self.q_conv = TaylorcalShortConvolution(hk, self.conv_size)
            self.k_conv = TaylorcalShortConvolution(hk, self.conv_size)
            self.v_conv = TaylorcalShortConvolution(hv, self.conv_size)

    def _use_fla(self, x) -> bool:
        if self.kernels == "auto":
            return x.is_cuda and fla_kernels() is not None
        return self.kernels == "fla"

    def forward(self, x_btd, *, valid_bt, cache_layer):
        b, t, _ = x_btd.shape
        mask = valid_bt[..., None]
        zero = torch.zeros((), dtype=x_btd.dtype, device=x_btd.device)
        qkv = {
            name: torch.where(mask, proj(x_btd), zero)
            for name, proj in (("q", self.q_proj), ("k", self.k_proj), ("v", self.v_proj))
        }
        if self.conv_size is not None:
            history = {} if cache_layer is None or cache_layer.conv is None else cache_layer.conv
            new_history = {}
            for name, conv in (("q", self.q_conv), ("k", self.k_conv), ("v", self.v_conv)):
                z = qkv[name]
                past = history.get(name)
                if past is None:
                    past = z.new_zeros(b, self.conv_size - 1, z.shape[-1])
                qkv[name], new_history[name] = short_conv(z, conv.weight, past, valid_bt)
            if cache_layer is not None:
                cache_layer.conv = new_history
        q = F.silu(qkv["q"]).view(b, t, self.heads, self.k_dim)
        k = F.silu(qkv["k"]).view(b, t, self.heads, self.k_dim)
        v = F.silu(qkv["v"]).view(b, t, self.heads, self.v_dim)

        x32 = x_btd.float()  # the gates in float32, from float32 weights
        a = F.linear(x32, self.a_proj.weight.float())
        beta = torch.sigmoid(F.linear(x32, self.b_proj.weight.float()))
        g = -torch.exp(self.A_log.float()) * F.softplus(a + self.dt_bias.float())
        g, beta = torch.where(mask, g, 0.0), torch.where(mask, beta, 0.0)

        state = None if cache_layer is None else cache_layer.state
        if state is None:
            state = q.new_zeros(b, self.heads, self.k_dim, self.v_dim, dtype=torch.float32)
        rule = gated_delta_rule_fla if self._use_fla(x_btd) else gated_delta_rule
        o, state = rule(q, k, v, g, beta, state)
        if cache_layer is not None:
            cache_layer.state = state
            cache_layer.seen_tokens += t

        gate = self.g_proj(x_btd).view(b, t, self.heads, self.v_dim)
        normed = self.o_norm(o, gate).to(x_btd.dtype)
        return self.o_proj(normed.reshape(b, t, self.heads * self.v_dim))


class TaylorcalHybridDecoderLayer(nn.Module):
    def __init__(self, config: TaylorcalHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer = config.mixers[layer_idx]
        self.input_layernorm = TaylorcalRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.mixer == "attention":
            self.self_attn = TaylorcalAttention(config, layer_idx)
        else:
            self.gdn = TaylorcalGatedDeltaNet(config, layer_idx)
        self.post_attention_layernorm = TaylorcalRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TaylorcalMLP(config)

    def forward(self, h, *, cos_btd, sin_btd, valid_bs, q_slots_t, cache):
        x = self.input_layernorm(h)
        if self.mixer == "attention":
            y = self.self_attn(
                x,
                cos_btd=cos_btd,
                sin_btd=sin_btd,
                valid_bs=valid_bs,
                q_slots_t=q_slots_t,
                cache=cache,
            )
        else:
            layer_cache = None if cache is None else cache.layers[self.layer_idx]
            y = self.gdn(x, valid_bt=valid_bs[:, -h.shape[1] :], cache_layer=layer_cache)
        h = h + y
        return h + self.mlp(self.post_attention_layernorm(h))


class TaylorcalHybridPreTrainedModel(PreTrainedModel):
    config_class = TaylorcalHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TaylorcalHybridDecoderLayer"]

    def _init_weights(self, module):
        """transformers' defaults (normal Linear/Embedding, unit norms), and for GDN the
        flash-linear-attention init: A ~ U(0, 16], dt log-uniform in [1e-3, 1e-1]."""
        super()._init_weights(module)
        if isinstance(module, TaylorcalGatedDeltaNet):
            a = torch.empty_like(module.A_log, dtype=torch.float32).uniform_(0, 16)
            init.copy_(module.A_log, torch.log(a.clamp(min=1e-4)))
            u = torch.rand_like(module.dt_bias, dtype=torch.float32)
            dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        elif isinstance(module, TaylorcalShortConvolution):
            bound = module.weight.shape[1] ** -0.5
            init.uniform_(module.weight, -bound, bound)


class TaylorcalHybridModel(TaylorcalHybridPreTrainedModel):
    def __init__(self, config: TaylorcalHybridConfig):
        super().__init__(config)
        if config.rope_inv_freq is None and "attention" in config.mixers:
            raise ValueError("config.rope_inv_freq is missing; export the model again")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            TaylorcalHybridDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = TaylorcalRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def rope_cos_sin(self, positions_bt):
        """cos, sin [B, T, d] float32 at integer positions."""
        inv_freq = torch.tensor(
            self.config.rope_inv_freq, dtype=torch.float32, device=positions_bt.device
        )
        freqs = positions_bt.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        scaling = self.config.rope_attention_scaling
        return torch.cos(emb) * scaling, torch.sin(emb) * scaling

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values=None,
        **kwargs,
    ):
        cache = one_cache(cache, past_key_values)
        refuse_unserved_outputs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = TaylorcalHybridCache(self.config)
        if cache is not None and not isinstance(cache, TaylorcalHybridCache):
            raise TypeError(
                f"cache must be a TaylorcalHybridCache (or None, then forward makes one), got "
                f"{type(cache).__name__}"
            )
        past = 0 if cache is None else int(cache.get_seq_length())
        if attention_mask is None:
            valid_bs = torch.ones(b, past + t, dtype=torch.bool, device=h.device)
        elif attention_mask.shape != (b, past + t):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; it must cover the "
                f"{past} cached and {t} new tokens: ({b}, {past + t})"
            )
        else:
            valid_bs = attention_mask.bool()
        if position_ids is None:
            position_ids = (valid_bs.long().cumsum(1) - 1).clamp(min=0)[:, -t:]
        cos, sin = (None, None)
        if "attention" in self.config.mixers:
            cos, sin = self.rope_cos_sin(position_ids)
        q_slots_t = past + torch.arange(t, device=h.device)
        for layer in self.layers:
            h = layer(
                h, cos_btd=cos, sin_btd=sin, valid_bs=valid_bs, q_slots_t=q_slots_t, cache=cache
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), **{CACHE_FIELD: cache})


def refuse_unserved_outputs(kwargs) -> None:
    """ValueError for an output this model does not return (transformers' models return them
    when asked; dropping the flag would hand back None where the caller expects tensors)."""
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise ValueError(f"{flag}=True is not supported by this exported model")


class TaylorcalHybridForCausalLM(TaylorcalHybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TaylorcalHybridConfig):
        super().__init__(config)
        self.model = TaylorcalHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() leaves the cache to forward, which makes a TaylorcalHybridCache

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int = 0,
        past_key_values=None,
        **kwargs,
    ):
        refuse_unserved_outputs(kwargs)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)}
        )
