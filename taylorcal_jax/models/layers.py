"""Building blocks of the Llama-family decoder: RMSNorm, softmax attention, SwiGLU MLP, block.

Letters: B batch, T query time, S key time (cache slots), D hidden, H query heads, Hkv key/value
heads, G = H / Hkv, d head dim, F MLP width.

    rmsnorm(x) = scale * x / sqrt(mean(x^2) + eps)              (computed in float32)
    attention:  q = x Wq (+bq), k = x Wk (+bk), v = x Wv (+bv)  per head
                q, k <- rmsnorm_d(q), rmsnorm_d(k)             (Qwen3 only)
                q, k <- rope(q, pos), rope(k, pos)
                P = softmax_s(q.k / sqrt(d) + mask)              (float32)
                context = P v  [B,T,H,d];  y = concat_h(context) Wo
    mask(t, s): key s is a valid token, s <= t, and t - s < window (sliding layers)
                t and s are indices in the sequence (cache slots when decoding), as in HF.
    mlp(x) = (silu(x Wgate) * x Wup) Wdown
    block:   h <- h + mixer(rmsnorm(h)),  h <- h + mlp(rmsnorm(h))
             (mixer = softmax attention or a student mixer of the registry, models/mixers)

Attention heads: query head h uses key/value head h // G (HF's `repeat_kv`).
Decoding steps (T == 1) go to `ops.decode_attention` (K and V read as they lie in the cache), by
the implementation `AttentionRuntime.decode_impl` names (a runtime option, never saved).
Unpadded multi-token passes without a cache (training, scoring) may instead go to a fused
kernel, `AttentionRuntime.sequence_impl` (`fused_causal_attention`: cuDNN's flash attention on
a GPU), which never forms the [B, H, T, S] probabilities. The dense products of a decoding
step (at most 16 rows) may go to a few-row kernel, `AttentionRuntime.gemv_impl` (`ops.gemv`).

Attention cache (one per attention layer): {"k": [B,S,Hkv,d], "v": [B,S,Hkv,d]}. Which slots
hold tokens is the same for every attention layer, so the model keeps it once, in its slot
record (`init_slots`, the model cache's SLOTS entry): {"valid": [B,S] bool, "index": int32
scalar (next slot to write)}. A call with T tokens writes slots [index, index + T) of every
layer's k and v and of valid, then index <- index + T (`write_slots`, once per call; it raises
where a concrete index + T > S: no wrap-around). Each attention layer gets the record's
`SlotView` of the call (start = index before the write, key validity after it), the same arrays
for every layer, so layers of the same window build their mask by one computation on the same
inputs, which XLA's CSE computes once.

Blocked queries (`attend` with T > block, default ATTEND_BLOCK = 1024): softmax is per query row,
so with the rows split into blocks Q_1..Q_n of `block` rows (T padded to n * block; the padded
rows are masked out and dropped)

    context[Q_i] = softmax_s(q[Q_i].k / sqrt(d) + mask[Q_i, :]) v        for each i, exactly,

one block at a time (`lax.map`), each against all S keys. mask[Q_i, :] is rebuilt inside the
loop from the O(T + S) inputs of the mask (`MaskSpec`: query/key indices, key validity, window),
so neither the [B,H,T,S] logits nor the [B,T,S] mask ever exist whole: peak memory is
O(B H block S) instead of O(B H T S) (12 heads x 32k x 32k x 4 B = 48 GB per layer, dense). The
block body is under `jax.checkpoint`, so the backward recomputes a block's probabilities rather
than saving all n of them and stays O(B H block S) too. T <= block (every decode step, short
prompts) takes the dense path unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from taylorcal_jax.models import joined
from taylorcal_jax.models.config import ModelConfig
from taylorcal_jax.models.paths import ATTENTION, mixer_key
from taylorcal_jax.models.rope import apply_rope, rope_cos_sin
from taylorcal_jax.ops.decode_attention import api as decode_api
from taylorcal_jax.ops.decode_attention.reference import NEG as _NEG  # one masked-logit value
from taylorcal_jax.ops.dispatch import GPU_BACKENDS, log_choice_once
from taylorcal_jax.ops.gemv import api as gemv_api
from taylorcal_jax.ops.gemv.api import dense_dot_general, dense_product

logger = logging.getLogger(__name__)

# The model cache's entry of the slot record (`init_slots`), shared by every attention layer.
SLOTS = "slots"

# Query rows per block of `attend(block=None)`, which every model uses. Read when a function is
# traced: set layers.ATTEND_BLOCK before the first trace (jit caches traces per function).
ATTEND_BLOCK = 1024

# Implementations of an unpadded multi-token pass (AttentionRuntime.sequence_impl).
SEQUENCE_IMPLS = ("blocked", "xla", "cudnn")
# What a training stage's config may name (distill.*.attention_impl): one of them, or "auto".
SEQUENCE_CHOICES = ("auto", *SEQUENCE_IMPLS)
# dtypes cuDNN's fused attention takes
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_sequence_impl(
    choice: str, dtype, backend: str | None = None, platform_version: str | None = None
) -> str:
    """The SEQUENCE_IMPLS member that `choice` (one of SEQUENCE_CHOICES) runs as: itself, or for
    "auto" "cudnn" on an NVIDIA GPU when `dtype` is bf16 or fp16, else "blocked". `backend` and
    `platform_version` default to this process's (jax.default_backend(), the first device's
    client.platform_version: "rocm ..." on AMD GPUs, where cuDNN does not exist).

    Why "auto" takes cuDNN: on one H100 a stage-2 step of SmolLM2-135M's shape (batch 8 x
    2048, bf16) ran at 3.2x the tokens/s of the blocked path (launch/results/
    bench_stage2_h100_cudnn.md), and the two agree within bf16 rounding there
    (tests/test_fused_attention.py's gpu test)."""
    if choice not in SEQUENCE_CHOICES:
        raise ValueError(f"attention impl must be one of {SEQUENCE_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    backend = backend or jax.default_backend()
    if backend not in GPU_BACKENDS:
        return log_choice_once(logger, "sequence attention", backend, "blocked", "no GPU")
    if platform_version is None:
        platform_version = jax.devices()[0].client.platform_version
    if "rocm" in platform_version.lower():
        return log_choice_once(logger, "sequence attention", backend, "blocked", "no cuDNN")
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        why = f"cuDNN's fused attention takes bf16/fp16, not {jnp.dtype(dtype).name}"
        return log_choice_once(logger, "sequence attention", backend, "blocked", why)
    return log_choice_once(logger, "sequence attention", backend, "cudnn", "NVIDIA GPU, bf16/fp16")


@dataclasses.dataclass(frozen=True)
class AttentionRuntime:
    """How softmax attention is computed (never saved). Hashable, so jit-static.

    `decode_impl`: a decoding step's attention (`ops.decode_attention.api.IMPLS`: "auto" = the
    Pallas kernel on a GPU, XLA elsewhere).
    `sequence_impl`: a multi-token pass without cache or padding (training, scoring), one of
    SEQUENCE_IMPLS: "blocked" (`attend`: query blocks of XLA softmax, O(block S) memory), or
    `jax.nn.dot_product_attention`'s implementation "cudnn" (cuDNN's fused flash attention, GPU
    only, bf16/fp16) or "xla" (its XLA form: [B, H, T, S] logits whole, the CPU reference of
    the fused call). Padded calls use "blocked" whatever is set (`for_call`).

    The default is "auto": on one H200 the kernel's decode steps took 0.44x-0.97x the time of
    the XLA form's, in every row measured (Qwen2.5-1.5B shape, 16k and 64k contexts, batch 1
    and 16; launch/results/bench_inference_h200_pallas.md), and it equals the XLA form there
    (the gpu tests of tests/test_decode_attention.py). Off a GPU "auto" is the XLA form.

    `gemv_impl`: the block's dense products outside a student mixer (attention's projections,
    the MLP) when they multiply at most 16 rows, a decoding step of batch <= 16
    (`ops.gemv.api.IMPLS`: "xla" XLA's dot; "pallas" our few-row kernel; "auto" that kernel
    for one-row products on a GPU, XLA's dot elsewhere). "auto" by default: on one H200, with
    the kernel's launch options of ops/gemv/pallas_gpu.GemvConfig, the kernel took the
    Qwen2.5-1.5B-shaped batch-1 decoding steps at 16k to 0.87x (teacher) and 0.91x (student)
    of the time with XLA's products, while at batch 16 its 16-row path took them to 1.08x and
    1.18x (launch/results/probe_decode_h200_gemv_config.json; docs/kernel.md), which "auto"
    leaves to XLA."""

    decode_impl: str = "auto"
    sequence_impl: str = "blocked"
    gemv_impl: str = "auto"

    def __post_init__(self):
        if self.decode_impl not in decode_api.IMPLS:
            raise ValueError(
                f"decode_impl must be one of {decode_api.IMPLS}, got {self.decode_impl!r}"
            )
        if self.sequence_impl not in SEQUENCE_IMPLS:
            raise ValueError(
                f"sequence_impl must be one of {SEQUENCE_IMPLS}, got {self.sequence_impl!r}"
            )
        if self.gemv_impl not in gemv_api.IMPLS:
            raise ValueError(f"gemv_impl must be one of {gemv_api.IMPLS}, got {self.gemv_impl!r}")

    def for_call(self, padded: bool) -> AttentionRuntime:
        """This runtime for one model call. A padded call (key validity given, or a cache whose
        unfilled slots are masked) takes the blocked path: the fused kernels see only the
        causal mask and the sliding window, not a per-key validity mask."""
        if padded and self.sequence_impl != "blocked":
            return dataclasses.replace(self, sequence_impl="blocked")
        return self


def rms_row_scale(x, eps):
    """r = 1 / sqrt(mean(x^2) + eps) over the last axis, float32 [..., 1]: rmsnorm(x) = r x
    scale."""
    x32 = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis, param "scale" [D] (HF `weight`)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        normed = x.astype(jnp.float32) * rms_row_scale(x, self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def _dense(features, use_bias, dtype, name, gemv_impl):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        dot_general=dense_dot_general(gemv_impl),
        name=name,
    )


def joined_product(
    module: nn.Module, group: str, x, gemv_impl: str, row_scale=None, out_dtype=None
):  # fmt: skip
    """x W (+ b) with the kernel (and bias) of `group` that the module's params hold when joined
    for decoding (`joined.join_for_decoding`), or None when they hold none. The result is in
    `module.dtype`, or the float32 sums kept with out_dtype=jnp.float32. row_scale [..., 1] (a
    norm folded into W, joined.py): the float32 sums are scaled by it per row before the bias,
    r (x W) = (r x) W."""
    if not module.has_variable("params", group):
        if row_scale is not None:
            raise ValueError(
                f"{module.name}: a folded norm's row scale needs the params joined for decoding "
                f"({group!r}, joined.join_for_decoding)"
            )
        return None
    dtype = module.dtype
    w = module.get_variable("params", group).astype(dtype)
    sums = jnp.float32 if row_scale is not None or out_dtype == jnp.float32 else None
    y = dense_product(x.astype(dtype), w, impl=gemv_impl, out_dtype=sums)
    if row_scale is not None:
        y = y * row_scale
    y = y.astype(dtype if out_dtype is None else out_dtype)
    if module.has_variable("params", joined.bias_name(group)):
        y = y + module.get_variable("params", joined.bias_name(group)).astype(y.dtype)
    return y


def attention_mask(q_index_bt, k_index_bs, k_valid_bs, window):
    """Boolean mask [B, T, S]: key valid, causal, and inside the sliding window (if any)."""
    diff = q_index_bt[:, :, None] - k_index_bs[:, None, :]
    mask = (diff >= 0) & k_valid_bs[:, None, :]
    if window is not None:
        mask &= diff < window
    return mask


class MaskSpec(NamedTuple):
    """The inputs of `attention_mask`, O(T + S): `attend` builds each query block's rows itself."""

    q_index_bt: jax.Array  # [B, T] int: query index (cache slot) of each query row
    k_index_bs: jax.Array  # [B, S] int: index of each key
    k_valid_bs: jax.Array  # [B, S] bool: key is a real token
    window: int | None = None  # sliding window (static), None for full attention

    def rows(self, q_index_bt):
        """The mask rows [B, t, S] of queries with indices q_index_bt [B, t]."""
        return attention_mask(q_index_bt, self.k_index_bs, self.k_valid_bs, self.window)


def _attend_dense(q_bthd, k_bshd, v_bshd, mask_bts, dtype):
    """All T query rows at once: materialises the [B, Hkv, G, T, S] float32 logits."""
    b, t, h, d = q_bthd.shape
    hkv = k_bshd.shape[2]
    q = q_bthd.reshape(b, t, hkv, h // hkv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k_bshd, preferred_element_type=jnp.float32).astype(
        jnp.float32
    ) * (d**-0.5)
    logits = jnp.where(mask_bts[:, None, None], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    ctx = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dtype), v_bshd.astype(dtype))
    return ctx.reshape(b, t, h, d)


def attend(
    q_bthd,
    k_bshd,
    v_bshd,
    mask,
    dtype,
    *,
    block: int | None = None,
    runtime: AttentionRuntime | None = None,
):
    """Grouped-query softmax attention -> context [B, T, H, d]; logits/softmax in float32.

    mask: a `MaskSpec` (the mask is built per query block, never whole) or a bool [B, T, S].
    block: query rows per block; None (what the models pass): the module-level ATTEND_BLOCK.
    runtime: None = AttentionRuntime().
    T == 1 (a decoding step) reads K and V in their cache layout (`ops.decode_attention`, by
    runtime.decode_impl); other T <= block is one dense pass; longer T runs block by block
    (module docstring), equal to the dense pass up to rounding, with O(B H block S) memory
    forward and backward.
    """
    block = ATTEND_BLOCK if block is None else block
    runtime = AttentionRuntime() if runtime is None else runtime
    b, t, h, d = q_bthd.shape
    if t <= block:
        mask_bts = mask.rows(mask.q_index_bt) if isinstance(mask, MaskSpec) else mask
        if t == 1:
            return decode_api.decode_attention(
                q_bthd, k_bshd, v_bshd, mask_bts[:, 0], dtype, impl=runtime.decode_impl
            )
        return _attend_dense(q_bthd, k_bshd, v_bshd, mask_bts, dtype)

    n = -(-t // block)
    pad = n * block - t

    def blocks(x, fill):  # [B, T, ...] -> [n, B, block, ...]; padded rows hold `fill`
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(b, n, block, *x.shape[2:]), 1, 0)

    row_ok = blocks(jnp.ones((b, t), bool), False)  # padded query rows see no key
    if isinstance(mask, MaskSpec):
        mask_src = blocks(mask.q_index_bt, 0)

        def mask_rows(src, ok):
            return mask.rows(src) & ok[:, :, None]
    else:
        mask_src = blocks(mask, False)

        def mask_rows(src, ok):
            return src & ok[:, :, None]

    @jax.checkpoint  # backward recomputes this block's probabilities: O(block * S) saved
    def one_block(xs):
        q_blk, src, ok = xs
        return _attend_dense(q_blk, k_bshd, v_bshd, mask_rows(src, ok), dtype)

    ctx = jax.lax.map(one_block, (blocks(q_bthd, 0), mask_src, row_ok))  # [n, B, block, H, d]
    return jnp.moveaxis(ctx, 0, 1).reshape(b, n * block, h, d)[:, :t]


def fused_causal_attention(q_bthd, k_bthd, v_bthd, window, dtype, implementation):
    """Causal grouped-query attention of an unpadded sequence through
    `jax.nn.dot_product_attention` (`implementation` "cudnn" or "xla") -> context [B, T, H, d].

    Query t sees keys s <= t (and t - s < window on sliding layers: `local_window_size` is
    (window - 1, 0)), scale d^-1/2, query head h on key/value head h // G: the mask and grouping
    of `attend` when every key is valid and query and key indices are 0..T-1."""
    d = q_bthd.shape[-1]
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(
        q_bthd.astype(dtype),
        k_bthd.astype(dtype),
        v_bthd.astype(dtype),
        scale=d**-0.5,
        is_causal=True,
        local_window_size=local,
        implementation=implementation,
    )


class Attention(nn.Module):
    """Softmax attention mixer (param key "self_attn" in a DecoderLayer). With params joined
    for decoding (`joined.join_for_decoding`) it forms q, k and v as one product."""

    config: ModelConfig
    layer_idx: int = 0
    dtype: Any = jnp.float32
    runtime: AttentionRuntime = AttentionRuntime()

    def setup(self):
        c = self.config
        bias, gemv = c.attention_bias, self.runtime.gemv_impl
        self.q_proj = _dense(c.num_attention_heads * c.head_dim, bias, self.dtype, "q_proj", gemv)
        self.k_proj = _dense(c.num_key_value_heads * c.head_dim, bias, self.dtype, "k_proj", gemv)
        self.v_proj = _dense(c.num_key_value_heads * c.head_dim, bias, self.dtype, "v_proj", gemv)
        self.o_proj = _dense(c.hidden_size, False, self.dtype, "o_proj", gemv)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.rms_norm_eps, self.dtype, name="q_norm")
            self.k_norm = RMSNorm(c.rms_norm_eps, self.dtype, name="k_norm")

    def _projections(self, x_btd, row_scale_bt1=None):
        """x Wq (+bq), x Wk (+bk), x Wv (+bv): three nn.Dense products, or one product with
        params joined for decoding (`joined.join_for_decoding`: the three kernels as one
        [D, (H + 2 Hkv) d] and their biases as one, the same sums), then split; row_scale_bt1
        as `__call__`'s."""
        gemv = self.runtime.gemv_impl
        y = joined_product(self, joined.ATTN_QKV, x_btd, gemv, row_scale_bt1)
        if y is None:
            return self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
        c = self.config
        q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        return jnp.split(y, (q_width, q_width + kv_width), axis=-1)

    def qkv(self, x_btd, positions_bt, row_scale_bt1=None):
        """q [B,T,H,d], k/v [B,T,Hkv,d] after bias, q/k-norm and RoPE."""
        c = self.config
        b, t, _ = x_btd.shape
        q, k, v = self._projections(x_btd, row_scale_bt1)
        q = q.reshape(b, t, c.num_attention_heads, c.head_dim)
        k = k.reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(c, positions_bt)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(
        self, x_btd, *, positions_bt, valid_bt, cache=None, slots=None,
        return_intermediates=False, row_scale_bt1=None,
    ):  # fmt: skip
        """cache: this layer's {"k", "v"} (module docstring), or None; with a cache, slots is
        the call's `SlotView` of the model's slot record. row_scale_bt1: the input is x_btd
        scaled per row by it, the block's norm folded into the joined q|k|v kernel (joined.py);
        None: the input is x_btd."""
        b, t, _ = x_btd.shape
        if cache is not None and slots is None:
            raise ValueError(
                f"attention layer {self.layer_idx} has a KV cache but no SlotView (slots=...); "
                f"the model builds it from its slot record, cache[{SLOTS!r}]"
            )
        q, k, v = self.qkv(x_btd, positions_bt, row_scale_bt1)
        window = self.config.sliding_windows[self.layer_idx]
        if cache is None and t > 1 and self.runtime.sequence_impl != "blocked":
            ctx = fused_causal_attention(q, k, v, window, self.dtype, self.runtime.sequence_impl)
            new_cache = None
        else:
            k, v, mask, new_cache = self._keys(k, v, valid_bt, cache, slots, window)
            ctx = attend(q, k.astype(self.dtype), v, mask, self.dtype, runtime=self.runtime)
        y = self.o_proj(ctx.reshape(b, t, -1))
        inter = {"attn_context": ctx} if return_intermediates else {}
        return y, new_cache, inter

    def _keys(self, k, v, valid_bt, cache, slots, window):
        """(k, v, MaskSpec, new cache) of the blocked and decoding paths: the call's own keys,
        or the cache with the call's keys written at slots [slots.start, slots.start + T)."""
        b, t = valid_bt.shape
        if cache is None:
            idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            return k, v, MaskSpec(idx, idx, valid_bt, window), None
        zero = jnp.zeros((), jnp.int32)
        at = (zero, slots.start, zero, zero)
        k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
        v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
        return k_all, v_all, slots.mask(t, window), {"k": k_all, "v": v_all}


def init_attention_cache(config: ModelConfig, batch: int, max_len: int, dtype) -> dict:
    """Empty KV cache of one attention layer, max_len slots: {"k", "v"} zeros [B,S,Hkv,d]."""
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def init_slots(batch: int, max_len: int) -> dict:
    """Empty slot record of max_len slots (module docstring): nothing valid, index 0."""
    return {"valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def write_slots(slots: dict, valid_bt) -> dict:
    """The slot record after a call of T tokens: valid[:, index : index + T] = valid_bt, index
    + T. Raises where the index is concrete and index + T > S (the cache would overflow).
    A traced index (a decoding loop under jit) is not checked: XLA clamps the write into the
    last slots, so such a caller sizes the cache for all its tokens (eval/generate does)."""
    start, valid_bs = slots["index"], slots["valid"]
    t, s = valid_bt.shape[1], valid_bs.shape[1]
    if not isinstance(start, jax.core.Tracer) and int(start) + t > s:
        raise ValueError(
            f"KV cache overflow: {int(start)} slots used + {t} new tokens > {s} slots; "
            "build the cache with a larger max_len"
        )
    zero = jnp.zeros((), jnp.int32)
    valid_bs = jax.lax.dynamic_update_slice(valid_bs, valid_bt.astype(bool), (zero, start))
    return {"valid": valid_bs, "index": start + t}


class SlotView(NamedTuple):
    """What every attention layer reads of the slot record in one call of T tokens: the call's
    tokens sit at slots start .. start + T - 1, and key slot s is a token where k_valid_bs[:, s].
    The model builds it once per call (`of_call`), so every layer's mask is the same computation
    on the same arrays."""

    start: jax.Array  # int32 scalar: the slot of the call's first token (index before the write)
    k_valid_bs: jax.Array  # [B, S] bool: key validity after the call's write

    @classmethod
    def of_call(cls, slots: dict, new_slots: dict) -> SlotView:
        """The view of the call that took the record from `slots` to `new_slots`
        (`write_slots`)."""
        return cls(slots["index"], new_slots["valid"])

    def mask(self, t: int, window: int | None) -> MaskSpec:
        """The call's MaskSpec: query t' at slot start + t', key s at slot s, k_valid_bs."""
        b, s = self.k_valid_bs.shape
        q_index_bt = jnp.broadcast_to(self.start + jnp.arange(t, dtype=jnp.int32), (b, t))
        k_index_bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        return MaskSpec(q_index_bt, k_index_bs, self.k_valid_bs, window)


def repeat_kv_kernel(kernel_dx, num_kv_heads: int, groups: int):
    """[D, Hkv*d] -> [D, Hkv*G*d], each head block repeated G times in place: the k/v
    projection as seen by the query heads (HF `repeat_kv`: query head h uses kv head h // G)."""
    d_in, width = kernel_dx.shape
    head_dim = width // num_kv_heads
    blocks = kernel_dx.reshape(d_in, num_kv_heads, head_dim)
    return jnp.repeat(blocks, groups, axis=1).reshape(d_in, num_kv_heads * groups * head_dim)


def attention_qkv(attn_params, config: ModelConfig, x_btd, positions_bt, *, dtype=jnp.float32):
    """Pure helper: (q [B,T,H,d], k [B,T,Hkv,d], v [B,T,Hkv,d]) of one attention layer.

    `attn_params` is the "self_attn" subtree of a layer; x is the attention input (post-norm).
    """
    module = Attention(config, dtype=dtype)
    return module.apply({"params": attn_params}, x_btd, positions_bt, method=Attention.qkv)


class MLP(nn.Module):
    """SwiGLU MLP; `gemv_impl` as AttentionRuntime's. With params joined for decoding
    (`joined.join_for_decoding`: gate and up as one kernel [D, 2F]) it forms x W_gate and x W_up
    as one product, then splits it. row_scale_bt1: as Attention's."""

    config: ModelConfig
    dtype: Any = jnp.float32
    gemv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, row_scale_bt1=None):
        f, gemv = self.config.intermediate_size, self.gemv_impl
        gate_up = joined_product(self, joined.MLP_GATE_UP, x, gemv, row_scale_bt1)
        if gate_up is not None:
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate = _dense(f, False, self.dtype, "gate_proj", gemv)(x)
            up = _dense(f, False, self.dtype, "up_proj", gemv)(x)
        down = _dense(self.config.hidden_size, False, self.dtype, "down_proj", gemv)
        return down(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block whose mixer is softmax attention ("self_attn") or the student mixer
    (`student_mixer`, a `mixers.StudentMixer`, under its registry name, e.g. "gdn").

    `keep` (a bool scalar, may be traced): the block holds both mixers and uses attention's
    output where keep, the student mixer's elsewhere (then `mixer` is ignored and there is no
    cache). The intermediates are then the mixer-independent ones only.
    `attention_runtime`: the softmax attention's runtime options.
    With params joined for decoding, a norm may be folded into the product after it
    (joined.py): the block then hands that product the unnormalised rows and their RMS scale.
    """

    config: ModelConfig
    layer_idx: int
    mixer: str = ATTENTION
    student_mixer: Any = None
    dtype: Any = jnp.float32
    attention_runtime: AttentionRuntime = AttentionRuntime()

    def _norm(self, name, x):
        """(input, row scale) of the product after the block's norm `name`: (rmsnorm(x), None),
        or (x, r) where the norm is folded into that product (joined.norm_folded)."""
        if joined.norm_folded(self, name):
            return x.astype(self.dtype), rms_row_scale(x, self.config.rms_norm_eps)
        return RMSNorm(self.config.rms_norm_eps, self.dtype, name=name)(x), None

    @nn.compact
    def __call__(
        self, h, positions_bt, valid_bt, cache=None, slots=None, return_intermediates=False,
        keep=None,
    ):  # fmt: skip
        """slots: the call's `SlotView`, handed to softmax attention with its cache."""
        c = self.config
        attn_in, in_scale = self._norm("input_layernorm", h)
        if in_scale is not None and return_intermediates:
            raise ValueError(
                "intermediates need the block's norms as stored, not folded for decoding "
                "(joined.join_for_decoding)"
            )

        def mixer_module(name):
            if name == ATTENTION:
                return Attention(
                    c, self.layer_idx, self.dtype, self.attention_runtime, name=mixer_key(name)
                )
            return self.student_mixer.module(c, dtype=self.dtype, name=mixer_key(name))

        where = {"positions_bt": positions_bt, "valid_bt": valid_bt}
        if keep is None:
            extra = {} if in_scale is None else {"row_scale_bt1": in_scale}
            if self.mixer == ATTENTION:
                extra["slots"] = slots
            y, new_cache, inter = mixer_module(self.mixer)(
                attn_in, **where, **extra, cache=cache, return_intermediates=return_intermediates
            )
        else:
            # Both mixers on the same input and a select: exactly the block with either mixer.
            if in_scale is not None:
                raise ValueError("a block holding both mixers needs its input norm unfolded")
            y_attn, _, _ = mixer_module(ATTENTION)(attn_in, **where)
            y_student, _, _ = mixer_module(self.student_mixer.name)(attn_in, **where)
            y, new_cache, inter = jnp.where(keep, y_attn, y_student.astype(y_attn.dtype)), None, {}
        out = h + y.astype(h.dtype)
        mlp_in, mlp_scale = self._norm("post_attention_layernorm", out)
        mlp = MLP(c, self.dtype, self.attention_runtime.gemv_impl, name="mlp")
        out = out + mlp(mlp_in, mlp_scale).astype(h.dtype)
        if return_intermediates:
            inter = {"resid_in": h, "attn_in": attn_in, **inter, "attn_out": y}
        else:
            inter = {}
        return out, new_cache, inter
