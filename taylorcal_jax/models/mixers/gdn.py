"""Gated DeltaNet (GDN): the first student mixer, and its registry entry `SPEC`.

Letters: B batch, T time, H heads, K key dim (per head), V value dim (per head), D hidden,
C channels of a short convolution (H*K or H*V), W convolution width, N sequences, G = H / Hkv.

Exactly flash-linear-attention's `GatedDeltaNet(expand_v=1, use_gate=True)` (docs/method.md §2):

    q = silu(x Wq)   k = silu(x Wk)   v = silu(x Wv)            [B, T, H, K|V]
        (with the short-conv option: q = silu(causal_depthwise_conv_W(x Wq)), same for k, v)
    beta_t = sigmoid(x_t Wb)                                     [B, T, H]
    g_t    = -exp(A_log) * softplus(x_t Wa + dt_bias)            [B, T, H], log decay <= 0
    S'  = exp(g_t) S_{t-1}                                       (the decayed state is what
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T                      the delta rule corrects;
    o_t = K^-1/2 S_t^T q_t                                        q, k L2-normalised and the
                                                                  scale inside the op)
    y_t = Wo concat_h[ rmsnorm(o_t) * w_norm * silu(x_t Wg) ]    (rmsnorm eps = norm_eps)

Padding: where `valid_bt` is False the projected q, k, v (before the convolution) are zeroed
and beta = g = 0, so such a token neither writes to nor decays the state S, and the
convolution sees zeros there. Valid tokens must form one contiguous block per row (left or
right padding); with left padding the zeros in the convolution window are the same as the
zero initial convolution state of a fresh cache, so results equal the unpadded sequence.

Cache (`init_gdn_cache`): {"state": [B, H, K, V] float32} plus, with the short conv,
{"conv": {"q": [B, W-1, H*K], "k": [B, W-1, H*K], "v": [B, W-1, H*V]}}, the last W-1
pre-convolution inputs of valid tokens. With a cache and T == 1 the mixer takes one O(1)
recurrent step (`ops.gdn.decode_api`: the definition's step rearranged to read the state once
for both of its products and write it once; `GDNRuntime.decode_impl` picks XLA's form or one
Pallas kernel); without the short conv and with joined projections (the default) the step
takes the two joined products as they are and forms q, k, v, g and beta itself
(`decode_api.decode_step_from_projections`, the same definitions: ops/gdn/step_inputs.py);
with T > 1 it runs the op from the cached state (prefill or continuation).

Parameters (Flax names; on disk `model.layers.{i}.gdn.*` via hf_io, see models/student.py):
    {q,k}_proj/kernel [D, H*K], {v,g}_proj/kernel [D, H*V], {a,b}_proj/kernel [D, H],
    o_proj/kernel [H*V, D], A_log [H], dt_bias [H], o_norm/scale [V],
    {q,k,v}_conv/kernel [W, C] (short conv only; kernel[W-1] multiplies the current token).
Standard init (FLA / PyTorch): dense and conv kernels U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
A ~ U(0, 16] with A_log = log A, dt log-uniform in [1e-3, 1e-1] floored at 1e-4 and
dt_bias = softplus^-1(dt), o_norm scale 1.

Saved architecture (`GDNConfig`): H, K, V, short conv and its width, norm eps. Runtime options
(`GDNRuntime`: op implementation, chunk size, Pallas residual policy) only choose how the same
function is computed and are never saved.

Conversions from a teacher attention layer (docs/method.md §3; needs H = the teacher's query heads
and K = V = its head dim):

    copy        Wq -> q_proj and Wo -> o_proj (the teacher's values; convert/naive.py makes
                every mixer param float32); Wk, Wv ->
                k_proj, v_proj [D, Hkv*d] -> [D, H*d], kv head j repeated for the G query heads
                j*G .. j*G+G-1 (HF `repeat_kv` order); a, b, g projections, A_log, dt_bias and
                o_norm by the standard init; the short convs (if any) are the identity (1 at
                the current-token tap), so the conv variant starts equal to the conv-free one.
                Dropped by necessity: q/k/v biases (no constant direction in rmsnorm(h) to
                fold them into), Qwen3's q/k norm scales (GDN L2-normalises q and k itself),
                RoPE.
    zero_gate   copy, then g_proj = 0: silu(0) = 0, so the layer outputs exactly 0
    small_gate  copy, then g_proj *= SMALL_GATE_FACTOR (0.02)

Parameter groups (learning rates in alignment and distillation): "slow" q/k/v projections and
convs; "fast" a/b/g projections, A_log, dt_bias; "frozen" o_proj and o_norm.
Diagnostics per head: half_life = ln 2 / (exp(A_log) softplus(dt_bias)) tokens (the decay at
x Wa = 0) and write_gate = the mean of sigmoid(x Wb) over valid tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from taylorcal_jax.models import joined
from taylorcal_jax.models.config import ModelConfig
from taylorcal_jax.models.layers import joined_product, repeat_kv_kernel
from taylorcal_jax.models.mixers.spec import Mixer
from taylorcal_jax.ops.gdn import api, decode_api, step_inputs
from taylorcal_jax.ops.gemv import api as gemv_api
from taylorcal_jax.ops.gemv.api import dense_dot_general, dense_product

NAME = "gdn"
SMALL_GATE_FACTOR = 0.02


@dataclasses.dataclass(frozen=True)
class GDNConfig:
    """Architecture of the GDN mixers of a student (saved with it; hashable, jit-static)."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int
    use_short_conv: bool = False
    conv_size: int = 4
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("num_heads", "head_k_dim", "head_v_dim", "conv_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GDNConfig.{name} must be a positive int, got {value!r}")
        if self.use_short_conv and self.conv_size < 2:
            raise ValueError(f"conv_size must be >= 2 with use_short_conv, got {self.conv_size}")
        if not self.norm_eps > 0:
            raise ValueError(f"GDNConfig.norm_eps must be positive, got {self.norm_eps}")

    @classmethod
    def from_teacher(cls, config: ModelConfig, **options) -> GDNConfig:
        """H = teacher's query heads, K = V = teacher head_dim (expand_v = 1); options set
        use_short_conv, conv_size, norm_eps."""
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


@dataclasses.dataclass(frozen=True)
class GDNRuntime:
    """How the gated delta rule is computed (never saved): `impl` and `chunk_size` of
    `ops.gdn.api.gated_delta_rule`, and `pallas_residuals`, what the Pallas backward keeps
    (api.PALLAS_RESIDUALS). The defaults are the op's; runs take theirs from the config.
    `decode_impl`: how a cached single-token step runs (`ops.gdn.decode_api.IMPLS`); "auto"
    is the Pallas step on a GPU and XLA's form elsewhere (ops/gdn/decode_api.py says why).
    `fused_projections`: x Wq, x Wk, x Wv and x Wg as one product with the four kernels joined
    along their outputs, and x Wa, x Wb as another (the same parameters, the same sums). Why:
    at batch 1 XLA runs each 1536-wide product of a decoding step as its own reduction at about
    0.8 TB/s, and the a/b products fused with the input norm take 18 us per layer on an H100
    (launch/results/profile_steps_h100_gdn_step.md): fewer, wider products mean fewer launches.
    XLA's GPU simplifier turns a vector-matrix product whose operands hold fewer than 10M
    elements into a reduction, and the joined 1536 x 6144 one is still under that, so this
    saves launches, not the reduction's speed. On by default: on one H100 the
    Qwen2.5-1.5B-shaped student's decoding step took 2.56 ms instead of 3.18 at 16k and batch 1
    (0.80x), and 3.58 instead of 3.57 at 32k and batch 16
    (launch/results/probe_decode_h100_gemv.json, variants "pallas_gdn_step_fused" and
    "pallas_gdn_step").
    `gemv_impl`: the mixer's dense products when they multiply at most 16 rows (a decoding
    step of batch <= 16), as `layers.AttentionRuntime.gemv_impl` (`ops.gemv`); "auto" by
    default, for the reason given there."""

    impl: str = "auto"
    chunk_size: int = 64
    pallas_residuals: str = "auto"
    decode_impl: str = "auto"
    fused_projections: bool = True
    gemv_impl: str = "auto"

    def __post_init__(self):
        if self.impl not in api.IMPLS:
            raise ValueError(f"GDN impl must be one of {api.IMPLS}, got {self.impl!r}")
        if self.decode_impl not in decode_api.IMPLS:
            raise ValueError(
                f"GDN decode_impl must be one of {decode_api.IMPLS}, got {self.decode_impl!r}"
            )
        value = self.chunk_size
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"GDN chunk_size must be a positive int, got {value!r}")
        if self.pallas_residuals not in api.PALLAS_RESIDUALS:
            raise ValueError(
                f"GDN pallas_residuals must be one of {api.PALLAS_RESIDUALS}, got "
                f"{self.pallas_residuals!r}"
            )
        if self.gemv_impl not in gemv_api.IMPLS:
            raise ValueError(
                f"GDN gemv_impl must be one of {gemv_api.IMPLS}, got {self.gemv_impl!r}"
            )
        if not isinstance(self.fused_projections, bool):
            raise ValueError(
                f"GDN fused_projections must be True or False, got {self.fused_projections!r}"
            )


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
    in `dtype`. `config` is unused (the registry's init_cache signature)."""
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


def _run_op(q, k, v, g, beta, state, runtime: GDNRuntime):
    """Prefill / continuation through the op dispatcher (impl and chunk size from `runtime`)."""
    return api.gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        initial_state_bhkv=state,
        output_final_state=state is not None,
        impl=runtime.impl,
        chunk_size=runtime.chunk_size,
        pallas_residuals=runtime.pallas_residuals,
    )


# ---------------------------------------------------------------------------- module


class ShortConvKernel(nn.Module):
    """Holds a depthwise causal conv kernel [W, C] (param "kernel"); see `causal_conv`."""

    width: int
    channels: int

    @nn.compact
    def __call__(self):
        return self.param("kernel", torch_linear_init, (self.width, self.channels), jnp.float32)


class DenseKernel(nn.Module):
    """Holds the kernel [D_in, D_out] of a bias-free nn.Dense (param "kernel", the same name,
    shape and init), for products the caller forms itself (GatedDeltaNet's fused projections)."""

    features_in: int
    features: int

    @nn.compact
    def __call__(self):
        shape = (self.features_in, self.features)
        return self.param("kernel", torch_linear_init, shape, jnp.float32)


class GatedRMSNorm(nn.Module):
    """rmsnorm(o) * scale * silu(gate) per head (param "scale" [V], init 1)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, o_bthv, gate_bthv):
        scale = self.param("scale", nn.initializers.ones, (o_bthv.shape[-1],), jnp.float32)
        return gated_rmsnorm(o_bthv, gate_bthv, scale, self.eps).astype(self.dtype)


class GatedDeltaNet(nn.Module):
    """The GDN mixer; called like softmax attention (`layers.Attention`).

    `positions_bt` is accepted and unused (no RoPE in GDN layers).
    """

    config: ModelConfig
    gdn: GDNConfig
    runtime: GDNRuntime = GDNRuntime()
    dtype: Any = jnp.float32

    def _dense(self, features, name, dtype=None):
        return nn.Dense(
            features,
            use_bias=False,
            dtype=self.dtype if dtype is None else dtype,
            kernel_init=torch_linear_init,
            dot_general=dense_dot_general(self.runtime.gemv_impl),
            name=name,
        )

    def _joined_kernel(self, group: str, widths):
        """The kernels of `joined.GROUPS[group]` (output widths `widths`) joined along their
        outputs, from the params as stored (XLA fuses the join into its product)."""
        d, parts = self.config.hidden_size, joined.GROUPS[group]
        kernels = [DenseKernel(d, f, name=n)() for n, f in zip(parts, widths, strict=True)]
        return jnp.concatenate(kernels, axis=1)

    def _decoding_product(self, x_btd, row_scale_bt1=None):
        """With params joined for decoding, x [Wq | Wk | Wv | Wg | Wa | Wb | 0] [B, T, C] in
        float32 (`joined.GDN_QKVGAB`: one product of the six kernels, zero columns after them),
        scaled per row by row_scale_bt1 where given (the block's norm folded in, joined.py);
        else None. The gate logits keep float32 sums, their operands rounded to the compute
        dtype (x already is: the norm's output, or the residual stream where the norm is folded
        in)."""
        return joined_product(self, joined.GDN_QKVGAB, x_btd, self.runtime.gemv_impl,
                              row_scale_bt1, out_dtype=jnp.float32)  # fmt: skip

    def _joined_products(self, x_btd, row_scale_bt1=None):
        """x [Wq | Wk | Wv | Wg] [B, T, 2 H K + 2 H V] in the compute dtype and the gate logits
        x [Wa | Wb] [B, T, 2 H] in float32: with params joined for decoding the one product of
        `_decoding_product` split; else two products of the kernels joined here, the gate
        logits from x and Wa, Wb in float32."""
        gdn, h = self.gdn, self.gdn.num_heads
        width = 2 * gdn.key_dim + 2 * gdn.value_dim
        y = self._decoding_product(x_btd, row_scale_bt1)
        if y is not None:
            return y[..., :width].astype(self.dtype), y[..., width : width + 2 * h]
        dot = functools.partial(dense_product, impl=self.runtime.gemv_impl)
        sizes = (gdn.key_dim, gdn.key_dim, gdn.value_dim, gdn.value_dim)
        w = self._joined_kernel(joined.GDN_QKVG, sizes)
        w_ab = self._joined_kernel(joined.GDN_AB, (h, h))
        return dot(x_btd.astype(self.dtype), w.astype(self.dtype)), dot(
            x_btd.astype(jnp.float32), w_ab
        )

    def _projections(self, x_btd, row_scale_bt1=None):
        """x Wq, x Wk [B, T, H*K], x Wv, x Wg [B, T, H*V] in the compute dtype, and the gate
        logits x Wa, x Wb [B, T, H] in float32: separate nn.Dense products, or the two joined
        products (`_joined_products`) split, under `runtime.fused_projections` or with params
        joined for decoding (`joined.join_for_decoding`; the same sums)."""
        gdn, h = self.gdn, self.gdn.num_heads
        wide = (("q_proj", gdn.key_dim), ("k_proj", gdn.key_dim))
        wide += (("v_proj", gdn.value_dim), ("g_proj", gdn.value_dim))
        if not self._joins_products():
            outs = [self._dense(features, name)(x_btd) for name, features in wide]
            gates = [self._dense(h, n, jnp.float32)(x_btd) for n in ("a_proj", "b_proj")]
            return (*outs, *gates)
        qkvg, ab = self._joined_products(x_btd, row_scale_bt1)
        sizes = [features for _, features in wide]
        return (*jnp.split(qkvg, np.cumsum(sizes)[:-1], axis=-1), *jnp.split(ab, 2, -1))

    def _joins_products(self) -> bool:
        return self.runtime.fused_projections or self.has_variable("params", joined.GDN_QKVGAB)

    def _decay_params(self):
        A_log = self.param("A_log", init_A_log, (self.gdn.num_heads,), jnp.float32)
        dt_bias = self.param("dt_bias", init_dt_bias, (self.gdn.num_heads,), jnp.float32)
        return A_log, dt_bias

    def _step_from_projections(self, x_btd, valid_bt, state_bhkv, row_scale_bt1):
        """A cached one-token step without the short conv: (o [B, 1, H, V], gate logits
        [B, 1, H*V], new state), the activations and gates taken inside the step
        (decode_api.decode_step_from_projections). With params joined for decoding the step
        reads q, k, v and the gate logits from the one float32 product, passed whole as both
        operands: its slices would be XLA kernels of their own."""
        gdn = self.gdn
        gate_at, width = 2 * gdn.key_dim + gdn.value_dim, 2 * gdn.key_dim + 2 * gdn.value_dim
        y = self._decoding_product(x_btd, row_scale_bt1)
        if y is None:
            qkvg, ab = self._joined_products(x_btd)
            operands, layout = (qkvg[:, 0], ab[:, 0]), {}
        else:
            qkvg = y
            operands, layout = (y[:, 0], y[:, 0]), {"ab_column": width, "dtype": self.dtype}
        o, state = decode_api.decode_step_from_projections(
            *operands, *self._decay_params(), valid_bt[:, 0], state_bhkv,
            impl=self.runtime.decode_impl, **layout,
        )  # fmt: skip
        return o[:, None], qkvg[..., gate_at:width].astype(self.dtype), state

    def _step_or_sequence(self, x_btd, valid_bt, cache, row_scale_bt1):
        """Every other call: (o [B, T, H, V], gate logits [B, T, H*V], new state or None,
        new conv history or None)."""
        gdn = self.gdn
        b, t, _ = x_btd.shape
        h, kd, vd = gdn.num_heads, gdn.head_k_dim, gdn.head_v_dim
        q, k, v, gate, a, b_logit = self._projections(x_btd, row_scale_bt1)
        new_conv, act_valid = None, valid_bt
        if gdn.use_short_conv:
            # padding zeroed before the convolution, which then sees zeros there; its convolved
            # q, k, v are left as they are (g = beta = 0 keep such a token out of the state)
            q, k, v = (jnp.where(valid_bt[..., None], z, 0) for z in (q, k, v))
            conv_cache = {} if cache is None else cache["conv"]
            new_conv, convolved, act_valid = {}, [], None
            for name, z in (("q", q), ("k", k), ("v", v)):
                kernel = ShortConvKernel(gdn.conv_size, z.shape[-1], name=f"{name}_conv")()
                state = conv_cache.get(name)
                if state is None:
                    state = jnp.zeros((b, gdn.conv_size - 1, z.shape[-1]), self.dtype)
                y, new_conv[name] = causal_conv(z, kernel, state, valid_bt)
                convolved.append(y)
            q, k, v = convolved
        q = step_inputs.activation(q, act_valid).reshape(b, t, h, kd)
        k = step_inputs.activation(k, act_valid).reshape(b, t, h, kd)
        v = step_inputs.activation(v, act_valid).reshape(b, t, h, vd)
        g, beta = step_inputs.gates(a, b_logit, *self._decay_params(), valid_bt[..., None])
        if cache is not None and t == 1:
            o, state = decode_api.gated_delta_rule_decode_step(
                q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache["state"],
                impl=self.runtime.decode_impl,
            )  # fmt: skip
            o = o[:, None]
        else:
            o, state = _run_op(
                q, k, v, g, beta, None if cache is None else cache["state"], self.runtime
            )
        return o, gate, state, new_conv

    @nn.compact
    def __call__(
        self, x_btd, *, positions_bt=None, valid_bt=None, cache=None, return_intermediates=False,
        row_scale_bt1=None,
    ):  # fmt: skip
        """row_scale_bt1: the input is x_btd scaled per row by it, the block's norm folded into
        the joined input kernel (joined.py); None: the input is x_btd."""
        del positions_bt
        gdn = self.gdn
        b, t, _ = x_btd.shape
        if valid_bt is None:
            valid_bt = jnp.ones((b, t), bool)
        x = x_btd.astype(self.dtype)
        one_step = cache is not None and t == 1 and not gdn.use_short_conv
        if one_step and self._joins_products():
            o, gate, state = self._step_from_projections(x, valid_bt, cache["state"], row_scale_bt1)
            new_conv = None
        else:
            o, gate, state, new_conv = self._step_or_sequence(x, valid_bt, cache, row_scale_bt1)
        new_cache = None
        if cache is not None:
            new_cache = {"state": state.astype(jnp.float32)}
            if new_conv is not None:
                new_cache["conv"] = new_conv

        gate = gate.reshape(b, t, gdn.num_heads, gdn.head_v_dim)
        normed = GatedRMSNorm(gdn.norm_eps, dtype=self.dtype, name="o_norm")(o, gate)
        y = self._dense(self.config.hidden_size, "o_proj")(normed.reshape(b, t, -1))
        inter = {"attn_context": o, "attn_out": y} if return_intermediates else {}
        return y, new_cache, inter


def _module(model_config: ModelConfig, gdn: GDNConfig, runtime: GDNRuntime, *, dtype, name):
    return GatedDeltaNet(model_config, gdn, runtime, dtype, name=name)


# ------------------------------------------------------------------------- conversions


def _check_conversion(model_config: ModelConfig, gdn: GDNConfig) -> None:
    t = model_config
    if (gdn.num_heads, gdn.head_k_dim, gdn.head_v_dim) != (
        t.num_attention_heads,
        t.head_dim,
        t.head_dim,
    ):
        raise ValueError(
            "naive conversion needs GDN heads/dims equal to the teacher's "
            f"(H={t.num_attention_heads}, K=V={t.head_dim}); got H={gdn.num_heads}, "
            f"K={gdn.head_k_dim}, V={gdn.head_v_dim}. Build the GDNConfig with "
            "GDNConfig.from_teacher."
        )


@functools.partial(jax.jit, static_argnums=(1, 2))
def _new_parts(attn, model_config: ModelConfig, gdn: GDNConfig, rng):
    """Every `copy` param except q_proj and o_proj (the teacher's own arrays), in one compiled
    program per configuration and shapes (the rng is traced); the new ones drawn in float32
    (convert/naive.py makes the whole mixer float32)."""
    t = model_config
    d = t.hidden_size
    groups = t.num_kv_groups
    r_a, r_b, r_g, r_A, r_dt = jax.random.split(rng, 5)
    out = {
        "k_proj": {
            "kernel": repeat_kv_kernel(attn["k_proj"]["kernel"], t.num_key_value_heads, groups)
        },
        "v_proj": {
            "kernel": repeat_kv_kernel(attn["v_proj"]["kernel"], t.num_key_value_heads, groups)
        },
        "a_proj": {"kernel": torch_linear_init(r_a, (d, gdn.num_heads))},
        "b_proj": {"kernel": torch_linear_init(r_b, (d, gdn.num_heads))},
        "g_proj": {"kernel": torch_linear_init(r_g, (d, gdn.value_dim))},
        "A_log": init_A_log(r_A, (gdn.num_heads,)),
        "dt_bias": init_dt_bias(r_dt, (gdn.num_heads,)),
        "o_norm": {"scale": jnp.ones((gdn.head_v_dim,), jnp.float32)},
    }
    if gdn.use_short_conv:
        for name, width in (("q", gdn.key_dim), ("k", gdn.key_dim), ("v", gdn.value_dim)):
            kernel = jnp.zeros((gdn.conv_size, width), jnp.float32).at[-1].set(1.0)
            out[f"{name}_conv"] = {"kernel": kernel}
    return out


def copy_from_attention(attn, model_config: ModelConfig, gdn: GDNConfig, rng) -> dict:
    """`copy`: GDN params of one layer from its teacher attention params (module docstring)."""
    _check_conversion(model_config, gdn)
    return {
        "q_proj": {"kernel": attn["q_proj"]["kernel"]},
        "o_proj": {"kernel": attn["o_proj"]["kernel"]},
        **_new_parts(attn, model_config, gdn, rng),
    }


def _scaled_gate(params: dict, factor: float) -> dict:
    kernel = params["g_proj"]["kernel"]
    return {
        **params,
        "g_proj": {"kernel": jnp.zeros_like(kernel) if factor == 0 else kernel * factor},
    }


def zero_gate_from_attention(attn, model_config: ModelConfig, gdn: GDNConfig, rng) -> dict:
    """`zero_gate`: `copy` with g_proj = 0 (the layer outputs exactly 0)."""
    return _scaled_gate(copy_from_attention(attn, model_config, gdn, rng), 0.0)


def small_gate_from_attention(attn, model_config: ModelConfig, gdn: GDNConfig, rng) -> dict:
    """`small_gate`: `copy` with g_proj scaled by SMALL_GATE_FACTOR."""
    return _scaled_gate(copy_from_attention(attn, model_config, gdn, rng), SMALL_GATE_FACTOR)


# ------------------------------------------------------------ parameter groups, diagnostics

_GROUP_OF = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "q_conv", "k_conv", "v_conv"), "slow"),
    **dict.fromkeys(("a_proj", "b_proj", "g_proj", "A_log", "dt_bias"), "fast"),
    **dict.fromkeys(("o_proj", "o_norm"), "frozen"),
}


def param_groups(params) -> dict:
    """The group of every leaf of one layer's GDN params (module docstring)."""
    unknown = set(params) - set(_GROUP_OF)
    if unknown:
        raise ValueError(f"unexpected GDN params {sorted(unknown)}: give them a group in gdn.py")
    return {k: jax.tree.map(lambda _, g=_GROUP_OF[k]: g, v) for k, v in params.items()}


def diagnostics(params, x_ntd, valid_nt) -> dict[str, np.ndarray]:
    """Per head: half-life in tokens (decay at x Wa = 0) and the mean write gate on x."""
    gamma = np.exp(np.asarray(params["A_log"], np.float64)) * np.log1p(
        np.exp(np.asarray(params["dt_bias"], np.float64))
    )
    x = np.asarray(x_ntd, np.float32)
    w = np.asarray(valid_nt, np.float32)[..., None]
    beta = 1.0 / (1.0 + np.exp(-(x @ np.asarray(params["b_proj"]["kernel"], np.float32))))
    return {"half_life": math.log(2.0) / gamma, "write_gate": (beta * w).sum((0, 1)) / w.sum()}


SPEC = Mixer(
    name=NAME,
    config_class=GDNConfig,
    runtime_class=GDNRuntime,
    module=_module,
    init_cache=init_gdn_cache,
    conversions={
        "copy": copy_from_attention,
        "zero_gate": zero_gate_from_attention,
        "small_gate": small_gate_from_attention,
    },
    param_groups=param_groups,
    diagnostics=diagnostics,
)
