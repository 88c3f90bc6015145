"""Chunk-parallel gated delta rule (UT/WY form) as a `lax.scan` over chunks, in plain XLA.

Letters: B batch, T time, H heads, K key dim, V value dim, C chunk size, N number of chunks.

Same semantics as `reference.gated_delta_rule_reference`. The sequence is padded to N * C
tokens with g = 0, beta = 0, q = k = v = 0 (such tokens leave the state unchanged and their
outputs are dropped). Per (batch, head) and chunk, with q, k L2-normalised, s = K^-1/2,
G = cumsum(g) within the chunk, Gamma_ij = exp(G_i - G_j) for i >= j (0 above the diagonal)
and S the [K, V] state entering the chunk:

    A   = strict_lower(beta_i (k_i . k_j) Gamma_ij)       T = (I + A)^-1
    w   = T (beta * exp(G) * k)                            u = T (beta * v)
    v'  = u - w S                                          (the per-token corrections)
    o   = s [ (q * exp(G)) S + (Gamma * q k^T) v' ]
    S'  = exp(G_C) S + (k * exp(G_C - G))^T v'

T is never formed: w and u come from one unit-lower-triangular solve (forward substitution),
not from a power series, whose terms overflow under strong decay. Only G_i - G_j with i >= j
and G_C - G_j are exponentiated (both <= 0 for g <= 0), and masks are applied with `where`
before values reach a dot or an exp (0 * inf would be NaN, also in the gradients).

Arithmetic (G, A, the solve, the state, o) runs in float32 with bf16/fp16 inputs (float64 when
an input is float64); dots use Precision.HIGHEST so that float32 stays float32 on GPUs (no TF32).
The output has v's dtype; the final state is float32 (float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from taylorcal_jax.ops.gdn.reference import compute_dtype, l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(spec, a, b):
    return jnp.einsum(spec, a, b, precision=_HIGHEST)


def _chunk_step(state_bhkv, chunk, *, scale, use_qk_l2norm, cdt):
    """One chunk: (state entering, inputs [B,H,C,.]) -> (state leaving, o [B,H,C,V] in cdt)."""
    q, k, v, g, beta = (x.astype(cdt) for x in chunk)  # [B,H,C,K] x2, [B,H,C,V], [B,H,C] x2
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    c = g.shape[-1]
    big_g = jnp.cumsum(g, axis=-1)  # [B,H,C], G_i = g_1 + ... + g_i within the chunk
    big_g_last = big_g[..., -1:]  # [B,H,1]

    row = jnp.arange(c)[:, None]
    col = jnp.arange(c)[None, :]
    causal = row >= col  # [C,C], i >= j
    strict = row > col
    # Gamma_ij = exp(G_i - G_j) on i >= j only: the difference is zeroed before exp elsewhere,
    # so neither the value nor its gradient can see exp of a large positive number.
    diff = big_g[..., :, None] - big_g[..., None, :]  # [B,H,C,C]
    gamma = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)

    kk = _dot("bhik,bhjk->bhij", k, k)
    a = jnp.where(strict, beta[..., :, None] * kk * gamma, 0.0)  # strictly lower
    eye = jnp.eye(c, dtype=cdt)
    # (I + A) [w | u] = [beta exp(G) k | beta v], by forward substitution.
    rhs = jnp.concatenate(
        [(beta * jnp.exp(big_g))[..., None] * k, beta[..., None] * v], axis=-1
    )  # [B,H,C,K+V]
    wu = jax.lax.linalg.triangular_solve(
        eye + a, rhs, left_side=True, lower=True, unit_diagonal=True
    )
    w, u = wu[..., : k.shape[-1]], wu[..., k.shape[-1] :]

    v_new = u - _dot("bhck,bhkv->bhcv", w, state_bhkv)  # v' [B,H,C,V]
    qk = jnp.where(causal, _dot("bhik,bhjk->bhij", q, k) * gamma, 0.0)
    o = _dot("bhck,bhkv->bhcv", q * jnp.exp(big_g)[..., None], state_bhkv)
    o = scale * (o + _dot("bhij,bhjv->bhiv", qk, v_new))

    k_to_end = k * jnp.exp(big_g_last - big_g)[..., None]  # exp(G_C - G_j) <= 1
    new_state = jnp.exp(big_g_last)[..., None] * state_bhkv + _dot(
        "bhck,bhcv->bhkv", k_to_end, v_new
    )
    return new_state, o


def gated_delta_rule_chunked(
    q_bthk,
    k_bthk,
    v_bthv,
    g_bth,
    beta_bth,
    *,
    initial_state_bhkv=None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
):
    """Returns (o_bthv in v's dtype, final state [B, H, K, V] in float32/64, or None).

    Inputs in [B, T, H, .] layout; any T and any chunk_size >= 1 (T is padded up to a multiple).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    inputs = (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
    cdt = compute_dtype(*inputs, *(() if initial_state_bhkv is None else (initial_state_bhkv,)))
    b, t, h, kdim = q_bthk.shape
    vdim = v_bthv.shape[-1]
    scale = kdim**-0.5 if scale is None else scale
    c = chunk_size
    n = -(-t // c)
    pad = n * c - t

    def to_chunks(x):
        # [B,T,H,...] -> [N,B,H,C,...], zero-padded in time (zeros are the neutral pad token).
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, n, c) + x.shape[2:])
        return jnp.moveaxis(x, (1, 2), (0, 3))

    # Chunks stay in the input dtype (bf16 stays bf16 in memory); each step casts its slice.
    xs = tuple(to_chunks(x) for x in inputs)
    if initial_state_bhkv is None:
        state = jnp.zeros((b, h, kdim, vdim), cdt)
    else:
        state = initial_state_bhkv.astype(cdt)

    def body(state_bhkv, chunk):
        return _chunk_step(state_bhkv, chunk, scale=scale, use_qk_l2norm=use_qk_l2norm, cdt=cdt)

    # Memory of the backward pass: without rematerialisation, reverse-mode through the scan keeps
    # every intermediate of every chunk (Gamma, A, w, u, v', the [B,H,C,C] masks, ...), i.e.
    # O(N * C * (C + K + V)) per (b, h) on top of the states. With `jax.checkpoint` around the
    # body the scan saves only each step's inputs: its input slices (already held as `xs`) and the
    # one [B,H,K,V] state entering each chunk; the backward recomputes the chunk's internals from
    # those, one chunk at a time. Residual memory is therefore N = T / C states, never T (one per
    # token, as the per-token scan would keep) and never the chunk internals of all chunks at once.
    # prevent_cse=False is safe (and recommended) inside scan, which already prevents CSE.
    state, o_nbhcv = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), state, xs)
    o = jnp.moveaxis(o_nbhcv, (0, 3), (1, 2)).reshape(b, n * c, h, vdim)[:, :t]
    return o.astype(v_bthv.dtype), (state if output_final_state else None)
