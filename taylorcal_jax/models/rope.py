"""Rotary position embeddings (RoPE) with the Hugging Face scaling variants.

Letters: B batch, T time, H heads, d head dim (even), P = d/2 rotation pairs.

The rotation uses HF's "rotate half" layout: dims (j, j + P) form pair j, rotated by the angle
`pos * inv_freq[j]`:

    x_rot = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
    cos = cos(concat(f, f)) * s,  sin = sin(concat(f, f)) * s,  f = pos * inv_freq

`inv_freq` and the attention scaling `s` follow transformers' `modeling_rope_utils`:

- default: inv_freq_j = theta^(-2j/d), s = 1.
- linear:  inv_freq / factor.
- llama3:  wavelength w = 2 pi / inv_freq; w > L/low_freq_factor -> inv_freq / factor;
           w < L/high_freq_factor -> unchanged; in between, blend with
           r = (L/w - low) / (high - low): (1 - r) inv_freq / factor + r inv_freq
           (L = original_max_position_embeddings).
- yarn:    per-pair blend of inv_freq (extrapolation) and inv_freq / factor (interpolation)
           with a linear ramp over the correction range [low, high] from beta_fast/beta_slow;
           s = attention_factor or 0.1 * ln(factor) + 1 (mscale variants as in transformers).
           Since both q and k are rotated with cos/sin scaled by s, the logits scale by s^2.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from taylorcal_jax.models.config import ModelConfig, RopeConfig


def rope_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int):
    """Returns (inv_freq [d/2] float32 numpy, attention_scaling float) as transformers does."""
    dim = head_dim
    base = rope.theta
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(base) ** exps)).astype(np.float32)
    scaling = 1.0
    kind = rope.rope_type
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif kind == "llama3":
        old_len = rope.original_max_position_embeddings or max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_llama = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * inv_llama / rope.factor + smooth * inv_llama
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, inv_llama).astype(np.float32)
    elif kind == "yarn":
        inv_freq, scaling = _yarn(rope, dim, max_position_embeddings)
    else:
        raise ValueError(f"unknown rope_type {kind!r}")
    return inv_freq.astype(np.float32), float(scaling)


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int):
    base = rope.theta
    orig = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(
                factor, rope.mscale_all_dim
            )
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(num_rotations):
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    extra_factor = (1 - ramp).astype(np.float32)
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq.astype(np.float32), attention_factor


def rope_cos_sin(config: ModelConfig, positions_bt: jnp.ndarray):
    """cos, sin [B, T, d] in float32 for integer positions [B, T]."""
    inv_freq, scaling = rope_frequencies(
        config.rope, config.head_dim, config.max_position_embeddings
    )
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rope(x_bthd: jnp.ndarray, cos_btd: jnp.ndarray, sin_btd: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [B, T, H, d] (computed in float32, returned in x's dtype)."""
    x = x_bthd.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]
    return out.astype(x_bthd.dtype)
