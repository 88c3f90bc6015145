"""The one entry point for the gated delta rule: validates inputs and picks the implementation.

Letters: B batch, T time, H heads, K key dim, V value dim.

For each (batch, head), with q_t, k_t L2-normalised (when use_qk_l2norm) and s = scale or K^-1/2:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - (exp(g_t) S_{t-1})^T k_t)^T      S: [K, V]
    o_t = s * S_t^T q_t

Semantics of flash-linear-attention's `chunk_gated_delta_rule(..., use_qk_l2norm_in_kernel=True)`
(g is the log decay, <= 0; beta one per head and token; GQA is the caller's business).

Implementations (`impl`):
  "reference"  per-token `lax.scan` (reference.py), the definition; slow, O(1) memory per token.
  "chunked"    chunk-parallel UT/WY form, `lax.scan` over chunks (chunked.py); any backend.
  "pallas"     the Pallas kernels of the backend, imported lazily: pallas_gpu/ on a GPU
               (docs/kernel.md), pallas_tpu/ on a TPU (docs/kernel_tpu.md; resolved as
               "pallas_tpu"). Asking for them where they cannot run (no GPU or TPU backend, or
               the package does not import) raises `ImplementationUnavailableError` with the
               reason; never a silent fallback.
  "auto"       "pallas" on a GPU or TPU backend when the backend's package imports and its
               op.unsupported_reason accepts these inputs, else "chunked"; the choice is logged
               once per (backend, choice).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from taylorcal_jax.ops.dispatch import GPU_BACKENDS, TPU_BACKEND, log_choice_once
from taylorcal_jax.ops.gdn.chunked import gated_delta_rule_chunked
from taylorcal_jax.ops.gdn.operands import check_operands
from taylorcal_jax.ops.gdn.pallas_gpu.config import RESIDUALS
from taylorcal_jax.ops.gdn.reference import gated_delta_rule_reference

logger = logging.getLogger(__name__)

IMPLS = ("reference", "chunked", "pallas", "auto")
# What the Pallas forward keeps for its backward (pallas_gpu.config.RESIDUALS; "auto" = the
# default of the operand dtype's kernel path: "states" for bf16, the fastest, "inputs" for fp32).
PALLAS_RESIDUALS = ("auto", *RESIDUALS)


class ImplementationUnavailableError(RuntimeError):
    """The requested implementation cannot run here (the message says why and what to use)."""


def _pallas_choice(backend: str) -> str:
    """What impl="pallas" resolves to on this backend."""
    return "pallas_tpu" if backend == TPU_BACKEND else "pallas"


def _load_pallas(reason_prefix: str):
    """Returns the backend's Pallas op module (pallas_gpu.op or pallas_tpu.op), or raises
    ImplementationUnavailableError saying why."""
    backend = jax.default_backend()
    if backend not in (*GPU_BACKENDS, TPU_BACKEND):
        raise ImplementationUnavailableError(
            f"{reason_prefix}: pallas_gpu needs a GPU backend and pallas_tpu a TPU backend, but "
            f"JAX's default backend is {backend!r}. Use impl='chunked' (or 'auto'); for CPU "
            "tests of the kernels call taylorcal_jax.ops.gdn.pallas_gpu.op.gated_delta_rule_pallas "
            "or taylorcal_jax.ops.gdn.pallas_tpu.op.gated_delta_rule_pallas_tpu with "
            "interpret=True."
        )
    package = "pallas_tpu" if backend == TPU_BACKEND else "pallas_gpu"
    try:
        if backend == TPU_BACKEND:
            from taylorcal_jax.ops.gdn.pallas_tpu import op
        else:
            from taylorcal_jax.ops.gdn.pallas_gpu import op
    except ImportError as e:
        raise ImplementationUnavailableError(
            f"{reason_prefix}: taylorcal_jax.ops.gdn.{package}.op could not be imported "
            f"({type(e).__name__}: {e}). Use impl='chunked' (or 'auto')."
        ) from e
    return op


def _log_once(backend: str, choice: str, why: str) -> str:
    return log_choice_once(logger, "gated_delta_rule", backend, choice, why)


def resolve_impl(
    impl: str,
    q_bthk=None,
    k_bthk=None,
    v_bthv=None,
    chunk_size: int = 64,
    pallas_residuals: str = "auto",
) -> str:
    """The implementation `impl` runs as here ("auto" resolved); raises if it cannot run.

    With the inputs given, "auto" also asks the backend's op.unsupported_reason whether the
    kernels take them and `pallas_residuals` (which the float32 GPU path and the TPU kernels
    take only in part), and uses "chunked" when they do not. "pallas" resolves to "pallas_tpu"
    on a TPU backend.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid choices are {', '.join(IMPLS)}")
    backend = jax.default_backend()
    if impl == "pallas":
        _load_pallas("impl='pallas' cannot run")
        return _pallas_choice(backend)
    if impl != "auto":
        return impl
    if backend not in (*GPU_BACKENDS, TPU_BACKEND):
        _log_once(backend, "chunked", "no GPU or TPU backend")
        return "chunked"
    try:
        pallas_op = _load_pallas("pallas unavailable")
    except ImplementationUnavailableError as e:
        _log_once(backend, "chunked", str(e))
        return "chunked"
    if q_bthk is not None:
        reason = pallas_op.unsupported_reason(
            q_bthk, k_bthk, v_bthv, chunk_size, residuals=pallas_residuals
        )
        if reason:
            _log_once(backend, "chunked", f"the Pallas kernel does not take these inputs: {reason}")
            return "chunked"
    choice = _pallas_choice(backend)
    _log_once(backend, choice, f"{backend} backend and its Pallas kernels import")
    return choice


def gated_delta_rule(
    q_bthk,
    k_bthk,
    v_bthv,
    g_bth,
    beta_bth,
    *,
    initial_state_bhkv=None,
    output_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    pallas_residuals: str = "auto",
):
    """Gated delta rule over a sequence.

    Args: q, k [B, T, H, K]; v [B, T, H, V]; g (log decay) and beta [B, T, H]; optional
    initial state [B, H, K, V]. chunk_size is used by "chunked" and "pallas". pallas_residuals
    (PALLAS_RESIDUALS) trades the Pallas backward's speed for memory under differentiation:
    "states" keeps T, h and v' per call ([B, H, T/C*K, V] + [B, T, H, V] more than "t", which
    keeps T only and reruns the state pass; "inputs" inverts again too). The TPU kernels keep
    "inputs" or "states" ("auto"; pallas_tpu.config.RESIDUALS) and refuse "t".
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid choices are {', '.join(IMPLS)}")
    if pallas_residuals not in PALLAS_RESIDUALS:
        raise ValueError(
            f"unknown pallas_residuals {pallas_residuals!r}; valid: {', '.join(PALLAS_RESIDUALS)}"
        )
    q_bthk, k_bthk, v_bthv, g_bth, beta_bth = (
        jnp.asarray(x) for x in (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
    )
    if initial_state_bhkv is not None:
        initial_state_bhkv = jnp.asarray(initial_state_bhkv)
    check_operands(q_bthk, k_bthk, v_bthv, g_bth, beta_bth, initial_state_bhkv, chunk_size)
    choice = resolve_impl(impl, q_bthk, k_bthk, v_bthv, chunk_size, pallas_residuals)
    kwargs = dict(
        initial_state_bhkv=initial_state_bhkv,
        output_final_state=output_final_state,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
    )
    args = (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
    if choice == "reference":
        return gated_delta_rule_reference(*args, **kwargs)
    if choice == "chunked":
        return gated_delta_rule_chunked(*args, chunk_size=chunk_size, **kwargs)
    pallas_op = _load_pallas("impl='pallas' cannot run")
    if choice == "pallas_tpu":
        return pallas_op.gated_delta_rule_pallas_tpu(
            *args, chunk_size=chunk_size, residuals=pallas_residuals, **kwargs
        )
    return pallas_op.gated_delta_rule_pallas(
        *args, chunk_size=chunk_size, interpret=False, residuals=pallas_residuals, **kwargs
    )
