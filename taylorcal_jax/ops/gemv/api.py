"""The dense products of the models, with a kernel for few-row products (package docstring).

`dense_dot_general(impl)` is a `dot_general` for flax's nn.Dense (`dot_general=`): the product
x[..., K] W[K, N] of a Dense layer. When the leading dims of x multiply to at most 16 (a
decoding step of batch <= 16) and `impl` resolves to "pallas", it runs pallas_gpu.gemv_pallas;
every other call is lax.dot_general, as nn.Dense's default.

Implementations (`impl`, dispatch.KERNEL_IMPLS):
  "xla"     lax.dot_general always
  "pallas"  the kernel for the products of 1-16 rows that it takes (K and N multiples of 16,
            not float64; interpret mode off a GPU: slow, how the tests run it); XLA's dot for
            the rest, since one runtime setting covers all of a model's products (a GDN
            layer's [D, H] gate products are too narrow)
  "auto"    on a GPU backend the kernel for the one-row products it takes, XLA's dot for the
            rest; "xla" elsewhere; logged once (the models' default). One row only: on one
            H200 the kernel took the batch-1 decoding steps to 0.87x-0.91x of the time with
            XLA's products and the batch-16 ones to 1.08x-1.18x
            (launch/results/probe_decode_h200_gemv_config.json; docs/kernel.md)
The kernel's result is float32, cast to the operands' promoted dtype, as XLA's dot returns it,
or kept in float32 where the caller asks for it (preferred_element_type float32).
Differentiable: the backward is XLA's two products (dx = g W^T, dW = x^T g); decoding steps are
not differentiated for speed, but a differentiated one-token call stays correct.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax

from taylorcal_jax.ops.dispatch import KERNEL_IMPLS, resolve_gpu_kernel

MAX_ROWS = 16  # pallas_gpu.MAX_ROWS, kept here so that the kernel's module loads only when used

logger = logging.getLogger(__name__)

IMPLS = KERNEL_IMPLS
F32 = jnp.float32
_DENSE_DIMS = lambda ndim: (((ndim - 1,), (0,)), ((), ()))  # noqa: E731  x's last with W's first


def resolve_impl(impl: str, x_mk=None, w_kn=None) -> str:
    """ "xla" or "pallas": what `impl` runs as here (dispatch.resolve_gpu_kernel). With the
    operands given, "auto" also asks whether the kernel takes them."""

    def unsupported():
        from taylorcal_jax.ops.gemv import pallas_gpu

        return pallas_gpu.unsupported_reason(x_mk, w_kn)

    return resolve_gpu_kernel(
        "few-row dense product", impl, logger, None if x_mk is None else unsupported
    )


@jax.custom_vjp
def _gemv(x_mk, w_kn):
    """x W in float32 (the kernel's sums; callers cast)."""
    from taylorcal_jax.ops.gemv.pallas_gpu import gemv_pallas

    return gemv_pallas(x_mk, w_kn, interpret=jax.default_backend() == "cpu")


def _gemv_fwd(x_mk, w_kn):
    return _gemv(x_mk, w_kn), (x_mk, w_kn)


def _gemv_bwd(residuals, g_mn):
    x_mk, w_kn = residuals

    def dot(x, w):  # the primal as XLA computes it, float32 like the kernel's result
        return lax.dot_general(x, w, _DENSE_DIMS(2), preferred_element_type=F32)

    _, vjp = jax.vjp(dot, x_mk, w_kn)
    return vjp(g_mn)


_gemv.defvjp(_gemv_fwd, _gemv_bwd)


def max_rows(impl: str) -> int:
    """The most rows of x that `impl` sends to the kernel (module docstring)."""
    return 1 if impl == "auto" else MAX_ROWS


def _kernel_takes(x_mk, w_kn) -> bool:
    from taylorcal_jax.ops.gemv import pallas_gpu

    return pallas_gpu.unsupported_reason(x_mk, w_kn) is None


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                 impl):  # fmt: skip
    few_rows = (
        impl != "xla"
        and rhs.ndim == 2
        and dimension_numbers == _DENSE_DIMS(lhs.ndim)
        and math.prod(lhs.shape[:-1]) <= max_rows(impl)
        and preferred_element_type in (None, F32)
    )
    if few_rows:
        x_mk = lhs.reshape(-1, lhs.shape[-1])
        # whether the kernel takes them is asked once, here, for "pallas" and "auto" alike,
        # and only where `impl` runs as "pallas" (off a GPU "auto" never loads the kernel)
        if resolve_impl(impl) == "pallas" and _kernel_takes(x_mk, rhs):
            dtype = jnp.result_type(lhs, rhs) if preferred_element_type is None else F32
            return _gemv(x_mk, rhs).astype(dtype).reshape(*lhs.shape[:-1], rhs.shape[1])
    return lax.dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type
    )


def dense_product(x, w_kn, *, impl: str = "xla", out_dtype=None):
    """x[..., K] W[K, N] under `impl` (module docstring): nn.Dense's product, bias-free. The
    result is in the operands' promoted dtype, or float32 sums kept as such with
    out_dtype=jnp.float32 (XLA's preferred_element_type)."""
    return _dot_general(x, w_kn, _DENSE_DIMS(x.ndim), None, out_dtype, impl=impl)


@functools.cache
def dense_dot_general(impl: str = "xla"):
    """nn.Dense's `dot_general` under `impl` (module docstring). Cached: one function per impl,
    so modules built with the same impl compare equal."""
    if impl not in IMPLS:
        raise ValueError(f"unknown dense product impl {impl!r}; valid: {', '.join(IMPLS)}")
    return functools.partial(_dot_general, impl=impl)
