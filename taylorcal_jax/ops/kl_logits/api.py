"""KL(p || q) from two rows of logits and its gradient in the second: the elementwise part of
the distillation loss (train/kl.py), by XLA's form or one Pallas kernel.

Letters: N rows (positions), V vocab. With z^t, z^s [N, V] float32 the teacher's and the
student's logits, p = softmax(z^t), q = softmax(z^s), m [N] the valid rows:

    KL_n = sum_v p_nv (log p_nv - log q_nv)        total = sum_n m_n KL_n
    G_nv = m_n (q_nv - p_nv) = d total / d z^s_nv   (because sum_v p_nv = 1)

`kl_and_grad(z_t_nv, z_s_nv, valid_n, grad_dtype, impl=)` returns (total float32, G in
`grad_dtype`). Implementations (`impl`, dispatch.KERNEL_IMPLS):
  "xla"     two log_softmax, then one pass for KL and G: XLA runs each softmax's max and sum as
            a pass of their own over the [N, V] logits, six reads of a logit array in all
  "pallas"  pallas_gpu.py: per block of rows, one pass over both rows for their online max and
            sum, one for KL and G: four reads (Triton on a GPU; interpret mode elsewhere)
  "auto"    "pallas" on a GPU backend when the kernel takes the shapes, else "xla"; logged once
On one H100 the kernel took SmolLM2-135M's stage-2 step at 24 x 2048 tokens to 197.5k-197.6k
tokens/s against 193.9k with XLA's form (launch/results/bench_stage2_h100_b24_kl_*.md).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from taylorcal_jax.ops.dispatch import KERNEL_IMPLS, resolve_gpu_kernel

logger = logging.getLogger(__name__)

IMPLS = KERNEL_IMPLS


def kl_and_grad_xla(z_t_nv, z_s_nv, valid_n, grad_dtype):
    """(total, G) of the module docstring by XLA's ops."""
    logp = jax.nn.log_softmax(z_t_nv, axis=-1)
    logq = jax.nn.log_softmax(z_s_nv, axis=-1)
    kl_n = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    total = jnp.sum(jnp.where(valid_n, kl_n, 0.0))
    g_nv = jnp.where(valid_n[:, None], jnp.exp(logq) - jnp.exp(logp), 0.0)
    return total, g_nv.astype(grad_dtype)


def kl_and_grad(z_t_nv, z_s_nv, valid_n, grad_dtype, *, impl: str = "auto"):
    """(total, G) of the module docstring by `impl`; z_t_nv, z_s_nv [N, V] float32, valid_n [N]
    bool. Not differentiable (the caller's custom_vjp uses G)."""

    def unsupported():
        from taylorcal_jax.ops.kl_logits import pallas_gpu

        return pallas_gpu.unsupported_reason(z_t_nv)

    if resolve_gpu_kernel("KL from logits", impl, logger, unsupported) == "pallas":
        from taylorcal_jax.ops.kl_logits.pallas_gpu import kl_and_grad_pallas

        return kl_and_grad_pallas(z_t_nv, z_s_nv, valid_n, grad_dtype)
    return kl_and_grad_xla(z_t_nv, z_s_nv, valid_n, grad_dtype)
