"""Gated DeltaNet mixer: the linear-attention layer that replaces softmax attention in students.

Letters: B batch, T time, H heads, K key dim (per head), V value dim (per head), D hidden,
C channels of a short convolution (H*K or H*V), W convolution width.

Exactly flash-linear-attention's `GatedDeltaNet(expand_v=1, use_gate=True)` (METHOD.md §2):

    q = silu(x Wq)   k = silu(x Wk)   v = silu(x Wv)            [B, T, H, K|V]
        (with the short-conv option: q = silu(causal_depthwise_conv_W(x Wq)), same for k, v)
    beta_t = sigmoid(x_t Wb)                                     [B, T, H]
    g_t    = -exp(A_log) * softplus(x_t Wa + dt_bias)            [B, T, H], log decay <= 0
    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T  (q, k L2-normalised and
    o_t = K^-1/2 S_t^T q_t                                        the scale inside the op)
    y_t = Wo concat_h[ rmsnorm(o_t) * w_norm * silu(x_t Wg) ]    (rmsnorm eps = norm_eps)

Padding: where `valid_bt` is False the projected q, k, v (before the convolution) are zeroed
and beta = g = 0, so such a token neither writes to nor decays the state S, and the
convolution sees zeros there. Valid tokens must form one contiguous block per row (left or
right padding); with left padding the zeros in the convolution window are the same as the
zero initial convolution state of a fresh cache, so results equal the unpadded sequence.

Cache (from `init_gdn_cache`): {"state": [B, H, K, V] float32} plus, with the short conv,
{"conv": {"q": [B, W-1, H*K], "k": [B, W-1, H*K], "v": [B, W-1, H*V]}}, the last W-1
pre-convolution inputs of valid tokens. With a cache and T == 1 the mixer takes one O(1)
recurrent step (`gated_delta_rule_step`); with T > 1 it runs the chunked op from the cached
state (prefill or continuation).

Parameters (Flax names; on disk `model.layers.{i}.gdn.*` via hf_io, see models/student.py):
    {q,k}_proj/kernel [D, H*K], {v,g}_proj/kernel [D, H*V], {a,b}_proj/kernel [D, H],
    o_proj/kernel [H*V, D], A_log [H], dt_bias [H], o_norm/scale [V],
    {q,k,v}_conv/kernel [W, C] (short conv only; kernel[W-1] multiplies the current token).
Standard init (FLA / PyTorch): dense and conv kernels U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
A ~ U(0, 16] with A_log = log A, dt log-uniform in [1e-3, 1e-1] floored at 1e-4 and
dt_bias = softplus^-1(dt), o_norm scale 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from taylorcal_jax.models.config import ModelConfig
from taylorcal_jax.ops.gdn import api, reference

GDN_IMPLS = ("reference", "chunked", "pallas", "auto")


@dataclasses.dataclass(frozen=True)
class GDNConfig:
    """Static options of the Gated DeltaNet mixers of a student (hashable, jit-static)."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int
    use_short_conv: bool = False
    conv_size: int = 4
    norm_eps: float = 1e-5
    impl: str = "auto"
    chunk_size: int = 64
    pallas_residuals: str = "auto"  # api.PALLAS_RESIDUALS: the Pallas backward's memory/speed

    def __post_init__(self):
        for name in ("num_heads", "head_k_dim", "head_v_dim", "conv_size", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GDNConfig.{name} must be a positive int, got {value!r}")
        if self.use_short_conv and self.conv_size < 2:
            raise ValueError(f"conv_size must be >= 2 with use_short_conv, got {self.conv_size}")
        if self.impl not in GDN_IMPLS:
            raise ValueError(f"GDNConfig.impl must be one of {GDN_IMPLS}, got {self.impl!r}")
        if self.pallas_residuals not in api.PALLAS_RESIDUALS:
            raise ValueError(
                f"GDNConfig.pallas_residuals must be one of {api.PALLAS_RESIDUALS}, got "
                f"{self.pallas_residuals!r}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"GDNConfig.norm_eps must be positive, got {self.norm_eps}")

    @classmethod
    def from_teacher(cls, config: ModelConfig, **options) -> GDNConfig:
        """H = teacher's query heads, K = V = teacher head_dim (expand_v = 1); options override
        use_short_conv, conv_size, norm_eps, impl, chunk_size, pallas_residuals."""
        fixed = {"num_heads", "head_k_dim", "head_v_dim"}
        if fixed & set(options):
            raise ValueError(f"{sorted(fixed & set(options))} are set by the teacher config")
        return cls(
            num_heads=config.num_attention_heads,
            head_k_dim=config.head_dim,
            head_v_dim=config.head_dim,
            **options,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GDNConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown GDNConfig keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim


# ------------------------------------------------------------------------- initialisers


def torch_linear_init(rng, shape, dtype=jnp.float32):
    """PyTorch's default nn.Linear / nn.Conv1d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    `shape` is [fan_in, fan_out] (Flax Dense) or [W, C] for a depthwise conv (fan_in = W).
    """
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(rng, shape, dtype, -bound, bound)


def init_A_log(rng, shape, dtype=jnp.float32):
    """A ~ U(0, 16] (never exactly 0), A_log = log A."""
    a = 16.0 * (1.0 - jax.random.uniform(rng, shape, jnp.float32))
    return jnp.log(a).astype(dtype)


def softplus_inverse(y):
    """x with softplus(x) = y, for y > 0: y + log(-expm1(-y))."""
    return y + jnp.log(-jnp.expm1(-y))


def init_dt_bias(rng, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4):
    """dt log-uniform in [dt_min, dt_max], floored at dt_floor; dt_bias = softplus^-1(dt)."""
    u = jax.random.uniform(rng, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    return softplus_inverse(dt).astype(dtype)


# ----------------------------------------------------------------------- pure helpers


def gdn_gates(a_bth, b_bth, A_log_h, dt_bias_h):
    """(g_bth, beta_bth) in float32 from a = x Wa and b = x Wb:
    g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)."""
    a, b = a_bth.astype(jnp.float32), b_bth.astype(jnp.float32)
    g = -jnp.exp(A_log_h.astype(jnp.float32)) * jax.nn.softplus(a + dt_bias_h.astype(jnp.float32))
    return g, jax.nn.sigmoid(b)


def gated_rmsnorm(o_bthv, gate_bthv, scale_v, eps):
    """rmsnorm(o) * scale * silu(gate) over the last axis, computed in float32."""
    o = o_bthv.astype(jnp.float32)
    normed = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + eps)
    gate = gate_bthv.astype(jnp.float32)
    return normed * scale_v.astype(jnp.float32) * jax.nn.silu(gate)


def causal_conv(x_btc, kernel_wc, state_bwc, valid_bt):
    """Depthwise causal conv with history `state` (the previous W-1 inputs), no activation.

    Returns (y_btc, new_state_bwc). x must already be zero at invalid positions. The new state
    is the W-1 inputs ending at the last valid token of each row (the old state if none).
    """
    w = kernel_wc.shape[0]
    t = x_btc.shape[1]
    xp = jnp.concatenate([state_bwc.astype(x_btc.dtype), x_btc], axis=1)  # [B, W-1+T, C]
    kernel = kernel_wc.astype(x_btc.dtype)
    y = sum(xp[:, i : i + t] * kernel[i] for i in range(w))
    last = jnp.max(jnp.where(valid_bt, jnp.arange(t)[None, :], -1), axis=1)  # [B]
    new_state = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, w - 1))(
        xp, last + 1
    )
    return y, new_state.astype(state_bwc.dtype)


def init_gdn_cache(config: ModelConfig, gdn: GDNConfig, batch: int, dtype=jnp.float32) -> dict:
    """Empty decoding cache of one GDN layer: zero state (float32) and, if used, conv history
    in `dtype`. `config` is unused (kept parallel to `init_attention_cache`)."""
    del config
    cache = {
        "state": jnp.zeros((batch, gdn.num_heads, gdn.head_k_dim, gdn.head_v_dim), jnp.float32)
    }
    if gdn.use_short_conv:
        hist = gdn.conv_size - 1
        cache["conv"] = {
            "q": jnp.zeros((batch, hist, gdn.key_dim), dtype),
            "k": jnp.zeros((batch, hist, gdn.key_dim), dtype),
            "v": jnp.zeros((batch, hist, gdn.value_dim), dtype),
        }
    return cache


def _run_op(q, k, v, g, beta, state, gdn: GDNConfig):
    """Prefill / continuation through the op dispatcher (impl and chunk size from `gdn`)."""
    return api.gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        initial_state_bhkv=state,
        output_final_state=state is not None,
        impl=gdn.impl,
        chunk_size=gdn.chunk_size,
        pallas_residuals=gdn.pallas_residuals,
    )


def _step(q, k, v, g, beta, state):
    return reference.gated_delta_rule_step(q, k, v, g, beta, state)


# ---------------------------------------------------------------------------- module


class ShortConvKernel(nn.Module):
    """Holds a depthwise causal conv kernel [W, C] (param "kernel"); see `causal_conv`."""

    width: int
    channels: int

    @nn.compact
    def __call__(self):
        return self.param("kernel", torch_linear_init, (self.width, self.channels), jnp.float32)


class GatedRMSNorm(nn.Module):
    """rmsnorm(o) * scale * silu(gate) per head (param "scale" [V], init 1)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, o_bthv, gate_bthv):
        scale = self.param("scale", nn.initializers.ones, (o_bthv.shape[-1],), jnp.float32)
        return gated_rmsnorm(o_bthv, gate_bthv, scale, self.eps).astype(self.dtype)


class GatedDeltaNet(nn.Module):
    """The GDN mixer; call signature shared with softmax Attention (see CONTRACT / teacher.py).

    `positions_bt` is accepted and unused (no RoPE in GDN layers).
    """

    config: ModelConfig
    gdn: GDNConfig
    dtype: Any = jnp.float32

    def _dense(self, features, name):
        return nn.Dense(
            features, use_bias=False, dtype=self.dtype, kernel_init=torch_linear_init, name=name
        )

    @nn.compact
    def __call__(
        self, x_btd, *, positions_bt=None, valid_bt=None, cache=None, return_intermediates=False
    ):
        del positions_bt
        gdn = self.gdn
        b, t, _ = x_btd.shape
        h, kd, vd = gdn.num_heads, gdn.head_k_dim, gdn.head_v_dim
        if valid_bt is None:
            valid_bt = jnp.ones((b, t), bool)
        x = x_btd.astype(self.dtype)
        mask = valid_bt[..., None]

        q = jnp.where(mask, self._dense(gdn.key_dim, "q_proj")(x), 0)
        k = jnp.where(mask, self._dense(gdn.key_dim, "k_proj")(x), 0)
        v = jnp.where(mask, self._dense(gdn.value_dim, "v_proj")(x), 0)
        new_cache = None if cache is None else {}
        if gdn.use_short_conv:
            conv_cache = {} if cache is None else cache["conv"]
            new_conv = {}
            convolved = []
            for name, z in (("q", q), ("k", k), ("v", v)):
                kernel = ShortConvKernel(gdn.conv_size, z.shape[-1], name=f"{name}_conv")()
                state = conv_cache.get(name)
                if state is None:
                    state = jnp.zeros((b, gdn.conv_size - 1, z.shape[-1]), self.dtype)
                y, new_conv[name] = causal_conv(z, kernel, state, valid_bt)
                convolved.append(y)
            q, k, v = convolved
            if cache is not None:
                new_cache["conv"] = new_conv
        q = jax.nn.silu(q).reshape(b, t, h, kd)
        k = jax.nn.silu(k).reshape(b, t, h, kd)
        v = jax.nn.silu(v).reshape(b, t, h, vd)

        # Gates in float32 (as FLA does): a = x Wa, b = x Wb.
        a = nn.Dense(
            h, use_bias=False, dtype=jnp.float32, kernel_init=torch_linear_init, name="a_proj"
        )(x)
        b_logit = nn.Dense(
            h, use_bias=False, dtype=jnp.float32, kernel_init=torch_linear_init, name="b_proj"
        )(x)
        A_log = self.param("A_log", init_A_log, (h,), jnp.float32)
        dt_bias = self.param("dt_bias", init_dt_bias, (h,), jnp.float32)
        g, beta = gdn_gates(a, b_logit, A_log, dt_bias)
        g = jnp.where(valid_bt[..., None], g, 0.0)
        beta = jnp.where(valid_bt[..., None], beta, 0.0)

        if cache is not None and t == 1:
            o, state = _step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache["state"])
            o = o[:, None]
        else:
            o, state = _run_op(q, k, v, g, beta, None if cache is None else cache["state"], gdn)
        if cache is not None:
            new_cache["state"] = state.astype(jnp.float32)

        gate = self._dense(gdn.value_dim, "g_proj")(x).reshape(b, t, h, vd)
        normed = GatedRMSNorm(gdn.norm_eps, dtype=self.dtype, name="o_norm")(o, gate)
        y = self._dense(self.config.hidden_size, "o_proj")(normed.reshape(b, t, h * vd))
        inter = {"attn_context": o, "attn_out": y} if return_intermediates else {}
        return y, new_cache, inter
