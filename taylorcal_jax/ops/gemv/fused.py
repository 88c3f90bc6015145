"""The second half of a pre-norm block, h + MLP(RMSNorm(h)), with the norm and the SwiGLU gate
inside the few-row kernel's products at batch 1 (pallas_gpu.py's prologues).

    y = h + (silu(x_n W_gate) * (x_n W_up)) W_down,   x_n = RMSNorm(h)

`residual_mlp(h, scale, w_gate_up, w_down, ...)` takes the MLP's gate and up kernels joined
along their outputs, W_gate_up [D, 2F] (models/joined.py), and W_down [F, D]. When h is one
row (a decoding step of batch 1) and `impl` resolves to "pallas" it runs two kernels: the gate-
and-up product with the norm in its prologue, leaving its partial sums unreduced, then the down
product whose prologue reduces its own columns of those sums and applies the gate; the down
product's partial sums, the cast and the residual add are one XLA fusion after it. The
separate form launches five kernels more per block: the norm's two, the reduction of the
gate-and-up sums with the gate, and on the way in the sum of squares
(launch/results/profile_steps_h100_decode_joined.md). Otherwise, and as the kernels' backward,
XLA's ops in the same order (`reference`). `impl` as api.py's: "auto" is the kernels for one
row on a GPU.

`rms_norm` and `swiglu` are the math of models/layers.py's RMSNorm and MLP too, so that the
fused and the separate forms compute the same values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from taylorcal_jax.ops.gemv.api import dense_product, resolve_impl

F32 = jnp.float32


def rms_norm(x, scale, eps: float, dtype):
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32, rounded to dtype, times the
    weight `scale` in dtype."""
    x32 = x.astype(F32)
    normed = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return normed.astype(dtype) * scale.astype(dtype)


def swiglu(gate, up):
    """SwiGLU's gate: silu(gate) * up, in their dtype."""
    return jax.nn.silu(gate) * up


def reference(h, scale, w_gate_up, w_down, *, eps: float, dtype, impl: str = "xla"):
    """residual_mlp by separate ops (module docstring), the products as api.dense_product under
    `impl` (XLA's dot, or the plain kernel for the rows it takes)."""
    gate_up = dense_product(rms_norm(h, scale, eps, dtype), w_gate_up.astype(dtype), impl=impl)
    y = dense_product(swiglu(*jnp.split(gate_up, 2, axis=-1)), w_down.astype(dtype), impl=impl)
    return h + y.astype(h.dtype)


def _kernels(h, scale, w_gate_up, w_down, *, eps, dtype, impl):
    from taylorcal_jax.ops.gemv.pallas_gpu import gemv_partials

    interpret = jax.default_backend() == "cpu"
    gate_up_s = gemv_partials(h.reshape(1, -1), w_gate_up, scale, prologue="norm", eps=eps,
                              dt=dtype, interpret=interpret)  # fmt: skip
    gate_up = jnp.sum(gate_up_s, axis=0).astype(dtype)  # one XLA fusion with the gate
    y = dense_product(swiglu(*jnp.split(gate_up, 2)), w_down.astype(dtype), impl=impl)
    return h + y.reshape(h.shape).astype(h.dtype)


def _kernels_take(h, w_gate_up) -> bool:
    from taylorcal_jax.ops.gemv import pallas_gpu

    return pallas_gpu.unsupported_reason(h.reshape(1, -1), w_gate_up, prologue="norm") is None


def residual_mlp(h, scale, w_gate_up, w_down, *, eps: float, dtype, impl: str = "xla"):
    """h + MLP(RMSNorm(h)) (module docstring): h [..., D], the norm's weight `scale` [D],
    W_gate_up [D, 2F], W_down [F, D]; `dtype` the compute dtype; the result in h's dtype."""
    dtype = jnp.dtype(dtype)
    options = dict(eps=eps, dtype=dtype, impl=impl)
    one_row = h.size == h.shape[-1]
    if impl != "xla" and one_row and h.dtype != jnp.float64:
        if _kernels_take(h, w_gate_up) and resolve_impl(impl) == "pallas":

            @jax.custom_vjp
            def run(*args):
                return _kernels(*args, **options)

            def fwd(*args):
                return run(*args), args

            def bwd(args, g):  # decoding is not differentiated; a differentiated call stays right
                return jax.vjp(lambda *a: reference(*a, **options), *args)[1](g)

            run.defvjp(fwd, bwd)
            return run(h, scale, w_gate_up, w_down)
    return reference(h, scale, w_gate_up, w_down, **options)
