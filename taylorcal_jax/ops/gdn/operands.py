"""The operand check of every gated-delta-rule entry (api, chunked, GPU and TPU Pallas), and the
Pallas kernels' dot operand dtype.

Letters: B batch, T time, H heads, K key dim, V value dim.
"""

from __future__ import annotations

import jax.numpy as jnp


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _check_layouts(operands, where: str) -> dict[str, int]:
    """{letter: size} of operands given as (name, array, letters), e.g. ("q", q, "BTHK"): every
    array floating point with one axis per letter, and every letter one size, the size of the
    first operand holding it; else ValueError naming the operand, its layout and what it must
    match. `where` ends the rank message ("" or " for one decoding step")."""
    for name, x, letters in operands:
        layout = "[" + ", ".join(letters) + "]"
        if x.ndim != len(letters):
            raise ValueError(
                f"{name} must have rank {len(letters)} ({layout}{where}), "
                f"got shape {tuple(x.shape)}"
            )
        if not _is_float(x):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    sizes: dict[str, int] = {}
    first = {}
    for name, x, letters in operands:
        expected = tuple(sizes.setdefault(a, n) for a, n in zip(letters, x.shape, strict=True))
        for a in letters:
            first.setdefault(a, name)
        if tuple(x.shape) != expected:
            by_source: dict[str, list[str]] = {}
            for a, n in zip(letters, x.shape, strict=True):
                if sizes[a] != n:
                    by_source.setdefault(first[a], []).append(a)
            source = "; ".join(f"{', '.join(a)} from {src}" for src, a in by_source.items())
            raise ValueError(
                f"{name} must have shape [{', '.join(letters)}] = {expected} ({source}), "
                f"got {tuple(x.shape)}"
            )
    return sizes


def check_operands(
    q_bthk, k_bthk, v_bthv, g_bth, beta_bth, initial_state_bhkv=None, chunk_size: int = 64
) -> tuple[int, int, int, int, int]:
    """(B, T, H, K, V) of q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H] and the optional
    initial state [B, H, K, V], all floating point, with chunk_size an int >= 1; else ValueError
    saying what is wrong and what is expected."""
    operands = [
        ("q", q_bthk, "BTHK"),
        ("k", k_bthk, "BTHK"),
        ("v", v_bthv, "BTHV"),
        ("g", g_bth, "BTH"),
        ("beta", beta_bth, "BTH"),
    ]
    if initial_state_bhkv is not None:
        operands.append(("initial_state", initial_state_bhkv, "BHKV"))
    sizes = _check_layouts(operands, where="")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return tuple(sizes[a] for a in "BTHKV")


def check_step_operands(
    q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv
) -> tuple[int, int, int, int]:
    """(B, H, K, V) of one decoding step's q, k [B, H, K], v [B, H, V], g, beta [B, H] and the
    state [B, H, K, V], all floating point; else ValueError saying what is wrong and what is
    expected (without it a g of [B, H, 1] or a sequence-layout [B, 1, H] broadcasts silently)."""
    operands = [
        ("q", q_bhk, "BHK"),
        ("k", k_bhk, "BHK"),
        ("v", v_bhv, "BHV"),
        ("g", g_bh, "BH"),
        ("beta", beta_bh, "BH"),
        ("state", state_bhkv, "BHKV"),
    ]
    sizes = _check_layouts(operands, where=" for one decoding step")
    return tuple(sizes[a] for a in "BHKV")


def operand_dtype(*xs):
    """bf16 when every array is bf16, else fp32: the dtype of the kernels' dot operands."""
    return jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in xs) else jnp.float32
