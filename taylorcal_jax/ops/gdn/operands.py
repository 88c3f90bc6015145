"""The operand check of every gated-delta-rule entry (api, chunked, GPU and TPU Pallas), and the
Pallas kernels' dot operand dtype.

Letters: B batch, T time, H heads, K key dim, V value dim.
"""

from __future__ import annotations

import jax.numpy as jnp


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def check_operands(
    q_bthk, k_bthk, v_bthv, g_bth, beta_bth, initial_state_bhkv=None, chunk_size: int = 64
) -> tuple[int, int, int, int, int]:
    """(B, T, H, K, V) of q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H] and the optional
    initial state [B, H, K, V], all floating point, with chunk_size an int >= 1; else ValueError
    saying what is wrong and what is expected."""
    for name, x, rank, layout in (
        ("q", q_bthk, 4, "[B, T, H, K]"),
        ("k", k_bthk, 4, "[B, T, H, K]"),
        ("v", v_bthv, 4, "[B, T, H, V]"),
        ("g", g_bth, 3, "[B, T, H]"),
        ("beta", beta_bth, 3, "[B, T, H]"),
    ):
        if x.ndim != rank:
            raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {tuple(x.shape)}")
    named = {"q": q_bthk, "k": k_bthk, "v": v_bthv, "g": g_bth, "beta": beta_bth}
    for name, x in named.items():
        if not _is_float(x):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    b, t, h, kdim = q_bthk.shape
    if k_bthk.shape[:3] != (b, t, h):
        raise ValueError(
            f"q and k must agree on [B, T, H]: q {tuple(q_bthk.shape)}, k {tuple(k_bthk.shape)}"
        )
    if k_bthk.shape[3] != kdim:
        raise ValueError(
            f"q and k must have the same key dim K: q has {kdim}, k has {k_bthk.shape[3]}"
        )
    if v_bthv.shape[:3] != (b, t, h):
        raise ValueError(
            f"v must agree with q on [B, T, H] = {(b, t, h)}, got v {tuple(v_bthv.shape)}"
        )
    for name, x in (("g", g_bth), ("beta", beta_bth)):
        if tuple(x.shape) != (b, t, h):
            raise ValueError(
                f"{name} must have shape [B, T, H] = {(b, t, h)} (one value per token and "
                f"head), got {tuple(x.shape)}"
            )
    vdim = v_bthv.shape[3]
    if initial_state_bhkv is not None:
        expected = (b, h, kdim, vdim)
        if tuple(initial_state_bhkv.shape) != expected:
            raise ValueError(
                f"initial_state must have shape [B, H, K, V] = {expected}, "
                f"got {tuple(initial_state_bhkv.shape)}"
            )
        if not _is_float(initial_state_bhkv):
            raise ValueError(
                f"initial_state must be floating point (float32), got {initial_state_bhkv.dtype}"
            )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return b, t, h, kdim, vdim


def check_step_operands(
    q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv
) -> tuple[int, int, int, int]:
    """(B, H, K, V) of one decoding step's q, k [B, H, K], v [B, H, V], g, beta [B, H] and the
    state [B, H, K, V], all floating point; else ValueError saying what is wrong and what is
    expected (without it a g of [B, H, 1] or a sequence-layout [B, 1, H] broadcasts silently)."""
    named = {
        "q": (q_bhk, "[B, H, K]"),
        "k": (k_bhk, "[B, H, K]"),
        "v": (v_bhv, "[B, H, V]"),
        "g": (g_bh, "[B, H]"),
        "beta": (beta_bh, "[B, H]"),
        "state": (state_bhkv, "[B, H, K, V]"),
    }
    for name, (x, layout) in named.items():
        if x.ndim != layout.count(",") + 1:
            raise ValueError(f"{name} must be {layout} for one decoding step, got {tuple(x.shape)}")
        if not _is_float(x):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    b, h, kdim = q_bhk.shape
    vdim = v_bhv.shape[2]
    expected = {
        "k": (b, h, kdim),
        "v": (b, h, vdim),
        "g": (b, h),
        "beta": (b, h),
        "state": (b, h, kdim, vdim),
    }
    for name, shape in expected.items():
        if tuple(named[name][0].shape) != shape:
            raise ValueError(
                f"{name} must be {named[name][1]} = {shape} to match q {tuple(q_bhk.shape)} and "
                f"v {tuple(v_bhv.shape)}, got {tuple(named[name][0].shape)}"
            )
    return b, h, kdim, vdim


def operand_dtype(*xs):
    """bf16 when every array is bf16, else fp32: the dtype of the kernels' dot operands."""
    return jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in xs) else jnp.float32
