"""A SwiGLU MLP's one decoding row by XLA's ops or one Pallas kernel (package docstring).

Letters: M rows of x, K input width, F intermediate width, N output width. With x [M, K] in the
compute dtype, r [M, 1] float32 the row scale of a folded norm, W_gu = [W_g | W_u] [K, 2F] and
W_d [F, N]:

    y = (silu(r x W_g) * (r x W_u)) W_d        float32 [M, N]

Implementations (`impl`, dispatch.KERNEL_IMPLS), chosen by `runs_fused`:
  "xla"     never fused: the MLP module runs its products (ops/gemv) and XLA's silu
  "pallas"  pallas_gpu.py for the operands it takes (one row; interpret mode off a GPU: slow,
            how the tests run it)
  "auto"    "pallas" on a GPU backend where the kernel takes the operands, else "xla"; logged
            once (the models' default, as the few-row products' "auto" is one-row only)
Differentiable: the backward is that of XLA's form (`swiglu_mlp_xla`); decoding steps are not
differentiated, but a differentiated one-token call stays correct.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax import lax

from taylorcal_jax.ops.dispatch import KERNEL_IMPLS, resolve_gpu_kernel

logger = logging.getLogger(__name__)

IMPLS = KERNEL_IMPLS
F32 = jnp.float32


def runs_fused(impl: str, x_mk, w_gu, w_d) -> bool:
    """Whether `impl` runs these operands through the kernel (module docstring)."""

    def unsupported():
        from taylorcal_jax.ops.swiglu import pallas_gpu

        return pallas_gpu.unsupported_reason(x_mk, w_gu, w_d)

    if resolve_gpu_kernel("SwiGLU MLP", impl, logger, unsupported) != "pallas":
        return False
    return impl == "auto" or unsupported() is None  # "auto" has asked already


def swiglu_mlp_xla(x_mk, r_m1, w_gu, w_d):
    """y of the module docstring by XLA's ops, float32 throughout after the products."""
    f = w_d.shape[0]
    gu = lax.dot_general(x_mk, w_gu, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    g, u = r_m1 * gu[:, :f], r_m1 * gu[:, f:]
    h = (jax.nn.silu(g) * u).astype(x_mk.dtype)
    return lax.dot_general(h, w_d, (((1,), (0,)), ((), ())), preferred_element_type=F32)


@jax.custom_vjp
def swiglu_mlp(x_mk, r_m1, w_gu, w_d):
    """y of the module docstring by the kernel (callers ask `runs_fused` first)."""
    from taylorcal_jax.ops.swiglu.pallas_gpu import swiglu_mlp_pallas

    return swiglu_mlp_pallas(x_mk, r_m1, w_gu, w_d, interpret=jax.default_backend() == "cpu")


def _fwd(x_mk, r_m1, w_gu, w_d):
    return swiglu_mlp(x_mk, r_m1, w_gu, w_d), (x_mk, r_m1, w_gu, w_d)


def _bwd(operands, g_mn):
    _, vjp = jax.vjp(swiglu_mlp_xla, *operands)
    return vjp(g_mn)


swiglu_mlp.defvjp(_fwd, _bwd)
