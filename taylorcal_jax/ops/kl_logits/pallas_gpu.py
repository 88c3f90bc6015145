"""KL(p || q) and its gradient in the student's logits as one Pallas kernel (Triton lowering on
GPUs; interpret mode on CPUs). The quantities are api.py's.

Letters: N rows, V vocab, BR rows per program, BV logits per load.

Grid (N / BR,): program i owns rows i BR .. i BR + BR - 1 of both logit arrays and makes two
passes over them in loads of [BR, BV]:

  1. online max and sum of each row (per load: m' = max(m, max_v z), s' = s exp(m - m') +
     sum_v exp(z - m')), for z^t and z^s together; then lse = m + log s;
  2. log p = z^t - lse^t, log q = z^s - lse^s, KL_n += sum_v p (log p - log q), and
     G = m_n (q - p) written in the gradient's dtype.

Each logit array is read twice and G written once; XLA's form reads each array three times
(max, sum, then KL and G). All arithmetic is float32. BV is the largest power of two up to
1024 that divides V and BR the largest up to 8 that divides N (Triton's loads need powers of
two; no load is masked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
_MAX_BV, _MIN_BV = 1024, 64
_MAX_BR = 8
_WARPS = 4


def _largest_power_of_two_dividing(n: int, cap: int) -> int:
    block = cap
    while block > 1 and n % block:
        block //= 2
    return block


def unsupported_reason(z_nv) -> str | None:
    """Why the kernel cannot take logits of this shape (api.py's "auto" asks), or None."""
    v = z_nv.shape[-1]
    if _largest_power_of_two_dividing(v, _MAX_BV) < _MIN_BV:
        return f"V={v} must be a multiple of {_MIN_BV} for the Pallas kernel"
    return None


def _kernel(zt_ref, zs_ref, valid_ref, g_ref, kl_ref, *, br, bv, v):
    rows = pl.ds(pl.program_id(0) * br, br)
    loads = v // bv

    def tile(ref, j):
        return ref[rows, pl.ds(pl.multiple_of(j * bv, bv), bv)].astype(F32)  # [BR, BV]

    def online(j, carry):
        stats = []
        for (m, s), ref in zip((carry[:2], carry[2:]), (zt_ref, zs_ref), strict=True):
            z = tile(ref, j)
            m_new = jnp.maximum(m, jnp.max(z, axis=1))
            s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
            stats += [m_new, s]
        return tuple(stats)

    empty = (jnp.full((br,), -jnp.inf, F32), jnp.zeros((br,), F32))  # max and sum of no logit
    m_t, s_t, m_s, s_s = lax.fori_loop(0, loads, online, empty + empty)
    lse_t, lse_s = m_t + jnp.log(s_t), m_s + jnp.log(s_s)
    valid = valid_ref[...] != 0  # [BR]

    def kl_and_grad(j, kl):
        log_p = tile(zt_ref, j) - lse_t[:, None]
        log_q = tile(zs_ref, j) - lse_s[:, None]
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        g = jnp.where(valid[:, None], q - p, 0.0)
        g_ref[rows, pl.ds(pl.multiple_of(j * bv, bv), bv)] = g.astype(g_ref.dtype)
        return kl + jnp.sum(p * (log_p - log_q), axis=1)

    kl = lax.fori_loop(0, loads, kl_and_grad, jnp.zeros((br,), F32))
    kl_ref[...] = jnp.where(valid, kl, 0.0)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _call(z_t_nv, z_s_nv, valid_n, grad_dtype, interpret):
    n, v = z_t_nv.shape
    br = _largest_power_of_two_dividing(n, _MAX_BR)
    bv = _largest_power_of_two_dividing(v, _MAX_BV)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    rows = pl.BlockSpec((br,), lambda i: (i,))
    launch = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=_WARPS)}
    g_nv, kl_n = pl.pallas_call(
        functools.partial(_kernel, br=br, bv=bv, v=v),
        grid=(n // br,),
        in_specs=[whole, whole, rows],
        out_specs=[whole, rows],
        out_shape=[
            jax.ShapeDtypeStruct((n, v), grad_dtype),
            jax.ShapeDtypeStruct((n,), F32),
        ],
        interpret=interpret,
        name="kl_from_logits",
        **launch,
    )(z_t_nv, z_s_nv, valid_n.astype(jnp.int32))
    return jnp.sum(kl_n), g_nv


def kl_and_grad_pallas(z_t_nv, z_s_nv, valid_n, grad_dtype, *, interpret: bool | None = None):
    """(total, G) of api.py by the kernel; interpret=None: interpret mode on CPU backends."""
    reason = unsupported_reason(z_t_nv)
    if reason:
        raise ValueError(f"{reason}; use impl='xla' for such logits")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _call(z_t_nv, z_s_nv, valid_n, jnp.dtype(grad_dtype), bool(interpret))
