"""The tile dot of the Pallas kernels (gated delta rule on GPUs and TPUs, flash decoding).

mm(a, b, ca, cb, dt) is the product of two 2-D tiles contracting a's dim ca with b's dim cb:
mm(a, b, 1, 0, dt) = a @ b, mm(a, b, 1, 1, dt) = a @ b.T, mm(a, b, 0, 0, dt) = a.T @ b.
Operands are cast to the operand dtype dt (bf16 for bf16 inputs, else fp32); the result is fp32
(the accumulation dtype of Triton's dots and of the MXU). fp32 operands run at f32_precision,
HIGHEST by default (exact fp32; on the MXU, bf16 x 6 passes); 16-bit operands at the hardware's
own precision (None): Triton and Mosaic take the same request, so one helper serves both.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def mm(a, b, ca: int, cb: int, dt, f32_precision=lax.Precision.HIGHEST):
    """Dot contracting a's dim ca with b's dim cb; operands cast to dt, fp32 result. fp32
    operands at f32_precision (a caller may ask for less, as the GPU chunk kernel's T inverse
    does), 16-bit operands at the hardware's own."""
    return lax.dot_general(
        a.astype(dt),
        b.astype(dt),
        (((ca,), (cb,)), ((), ())),
        precision=f32_precision if dt == F32 else None,
        preferred_element_type=F32,
    )
