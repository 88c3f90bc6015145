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

A folded norm (`dense_product(norm_eps=eps)`, models/joined.py): the product is

    r (x W),   r = rms_row_scale(x, eps) = 1 / sqrt(mean(x^2) + eps)  per row, float32,

formed on the float32 sums before the cast. On XLA's path r is `rms_row_scale`, an XLA
reduction (a kernel of its own per norm on a GPU, about 1.3 us in a decoding step: docs/
kernel.md); the kernel forms r itself from the rows it reads (pallas_gpu.py), which saves that
kernel. `rms_row_scale` is also the models' RMSNorm (layers.RMSNorm): one definition.

Differentiable: the backward is the VJP of the XLA form, r(x) (x W) in float32 (without a norm
XLA's two products, dx = g W^T, dW = x^T g; with one, dx also through r); decoding steps are
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


def rms_row_scale(x, eps):
    """r = 1 / sqrt(mean(x^2) + eps) over the last axis, float32 [..., 1]: rmsnorm(x) = r x
    scale."""
    x32 = x.astype(F32)
    return lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def _xla_sums(x, w_kn, norm_eps):
    """x W in float32 by XLA's dot, times r = rms_row_scale(x, norm_eps) per row where norm_eps
    is given: what the kernel computes, in XLA's form."""
    y = lax.dot_general(x, w_kn, _DENSE_DIMS(x.ndim), preferred_element_type=F32)
    return y if norm_eps is None else y * rms_row_scale(x, norm_eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gemv(x_mk, w_kn, norm_eps):
    """x W in float32 (the kernel's sums; callers cast), times r per row with norm_eps."""
    from taylorcal_jax.ops.gemv.pallas_gpu import gemv_pallas

    interpret = jax.default_backend() == "cpu"
    return gemv_pallas(x_mk, w_kn, interpret=interpret, norm_eps=norm_eps)


def _gemv_fwd(x_mk, w_kn, norm_eps):
    return _gemv(x_mk, w_kn, norm_eps), (x_mk, w_kn)


def _gemv_bwd(norm_eps, residuals, g_mn):
    _, vjp = jax.vjp(functools.partial(_xla_sums, norm_eps=norm_eps), *residuals)
    return vjp(g_mn)


_gemv.defvjp(_gemv_fwd, _gemv_bwd)


def max_rows(impl: str) -> int:
    """The most rows of x that `impl` sends to the kernel (module docstring)."""
    return 1 if impl == "auto" else MAX_ROWS


def _kernel_takes(x_mk, w_kn) -> bool:
    from taylorcal_jax.ops.gemv import pallas_gpu

    return pallas_gpu.unsupported_reason(x_mk, w_kn) is None


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                 impl, norm_eps=None):  # fmt: skip
    # norm_eps comes from dense_product alone, with the dense dimension numbers
    few_rows = (
        impl != "xla"
        and rhs.ndim == 2
        and dimension_numbers == _DENSE_DIMS(lhs.ndim)
        and math.prod(lhs.shape[:-1]) <= max_rows(impl)
        and preferred_element_type in (None, F32)
    )
    dtype = jnp.result_type(lhs, rhs) if preferred_element_type is None else preferred_element_type
    if few_rows:
        x_mk = lhs.reshape(-1, lhs.shape[-1])
        # whether the kernel takes them is asked once, here, for "pallas" and "auto" alike
        if _kernel_takes(x_mk, rhs) and resolve_impl(impl) == "pallas":
            y_mn = _gemv(x_mk, rhs, norm_eps)
            return y_mn.astype(dtype).reshape(*lhs.shape[:-1], rhs.shape[1])
    if norm_eps is not None:
        return _xla_sums(lhs, rhs, norm_eps).astype(dtype)
    return lax.dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type
    )


def dense_product(x, w_kn, *, impl: str = "xla", out_dtype=None, norm_eps: float | None = None):
    """x[..., K] W[K, N] under `impl` (module docstring): nn.Dense's product, bias-free. The
    result is in the operands' promoted dtype, or float32 sums kept as such with
    out_dtype=jnp.float32 (XLA's preferred_element_type). norm_eps: a norm folded into W, the
    result is r (x W) with r = rms_row_scale(x, norm_eps), formed on the float32 sums (module
    docstring)."""
    return _dot_general(x, w_kn, _DENSE_DIMS(x.ndim), None, out_dtype, impl=impl, norm_eps=norm_eps)


@functools.cache
def dense_dot_general(impl: str = "xla"):
    """nn.Dense's `dot_general` under `impl` (module docstring). Cached: one function per impl,
    so modules built with the same impl compare equal."""
    if impl not in IMPLS:
        raise ValueError(f"unknown dense product impl {impl!r}; valid: {', '.join(IMPLS)}")
    return functools.partial(_dot_general, impl=impl)
