"""Rotary position embeddings: the rotation of q and k by given cos and sin (HF's "rotate half").

Letters: B batch, T time, H heads, d head dim (even), P = d/2 rotation pairs.

Dims (j, j + P) form pair j; with cos, sin [B, T, d] of each token's position
(models/rope.rope_cos_sin: cos(concat(f, f)) s and sin(concat(f, f)) s),

    x_rot = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

computed in float32 and returned in x's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x_bthd: jnp.ndarray, cos_btd: jnp.ndarray, sin_btd: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [B, T, H, d] (computed in float32, returned in x's dtype)."""
    x = x_bthd.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]
    return out.astype(x_bthd.dtype)
