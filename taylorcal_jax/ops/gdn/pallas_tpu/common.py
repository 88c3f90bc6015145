"""Helpers shared by the TPU gated-delta-rule kernels: options, masks, the [C, C] inverse.

Letters: K key dim, V value dim, C chunk length, BV value block.

Within a chunk, G = cumsum g (formed in XLA: cumsum does not lower in Mosaic) and
Gamma_ij = exp(G_i - G_j) is formed only where i >= j (masked before the exp: exp(G_i - G_j)
with i < j can overflow). The kernels' dots are taylorcal_jax.ops.pallas_dot.mm (fp32
accumulation on the MXU; fp32 operands at HIGHEST precision, 16-bit ones at the MXU's own).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from taylorcal_jax.ops.gdn.call_options import Static
from taylorcal_jax.ops.gdn.pallas_tpu.config import INVERSE_BLOCK
from taylorcal_jax.ops.pallas_dot import mm

F32 = jnp.float32


def iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def last_row(x_c1):
    """x[C-1] of a [C, 1] column as a [1, 1] value (a masked sum: no sub-tile slicing)."""
    c = x_c1.shape[0]
    return jnp.sum(jnp.where(iota(x_c1.shape, 0) == c - 1, x_c1, 0.0), axis=0, keepdims=True)


def column(row_1c):
    """A [1, C] row as a [C, 1] column (diagonal mask and a lane sum: no transpose), so that
    per-token scalars travel in HBM as rows, not as lane-padded columns."""
    c = row_1c.shape[1]
    eye = iota((c, c), 0) == iota((c, c), 1)
    return jnp.sum(jnp.where(eye, row_1c, 0.0), axis=1, keepdims=True)


def unit_lower_inverse(a_cc, block: int = INVERSE_BLOCK):
    """(I + A)^-1 for strictly lower-triangular A [C, C] in fp32, by [C, C] dots only.

    With D the B x B diagonal blocks of A (B = block) and O = A - D:
    I + A = (I + D)(I + N), N = (I + D)^-1 O, so (I + A)^-1 = (I + N)^-1 (I + D)^-1.
    (I + D)^-1 by X <- I - D X from X = I, B - 1 times: each step fixes the next row of every
    diagonal block, i.e. forward substitution done on all rows at once (every iterate is the
    inverse of a row truncation, never a power of A, so nothing grows beyond T itself).
    (I + N)^-1 likewise by C / B - 1 steps of Y <- I - N Y (N is strictly block lower: block
    forward substitution). B - 1 + C / B + 1 dots in all, each a full [C, C] MXU product.
    """
    c = a_cc.shape[0]
    if c % block or block & (block - 1):
        raise ValueError(f"chunk {c} must be a multiple of the power-of-two block {block}")
    shift = jnp.int32(block.bit_length() - 1)  # iota's dtype, also under 64-bit mode
    row, col = iota((c, c), 0), iota((c, c), 1)
    eye = jnp.where(row == col, 1.0, 0.0).astype(F32)
    same_block = lax.shift_right_logical(row, shift) == lax.shift_right_logical(col, shift)
    diag = jnp.where(same_block, a_cc, 0.0)
    inv_diag = eye
    for _ in range(block - 1):
        inv_diag = eye - mm(diag, inv_diag, 1, 0, F32)
    n = mm(inv_diag, a_cc - diag, 1, 0, F32)
    inv_n = eye
    for _ in range(c // block - 1):
        inv_n = eye - mm(n, inv_n, 1, 0, F32)
    return mm(inv_n, inv_diag, 1, 0, F32)


def pallas_options(name: str, st: Static, semantics: tuple[str, ...]) -> dict:
    """pallas_call's name, grid semantics and interpret mode: the TPU interpreter (which keeps
    VMEM scratch and grid order as on a TPU) on CPUs, Mosaic otherwise."""
    return dict(
        name=name,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=pltpu.InterpretParams() if st.interpret else False,
    )
