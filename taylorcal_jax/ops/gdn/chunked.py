"""Chunk-parallel gated delta rule (UT/WY form) in plain XLA: batched chunk work + a lean scan.

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

Two phases. (1) Everything that does not involve S, for all N chunks at once (batched over
[N, B, H]): the L2 norms, G, Gamma, A, w and u, the masked intra-chunk matrix Gamma * q k^T,
q * exp(G), k * exp(G_C - G) and exp(G_C). (2) A `lax.scan` over the chunks carrying only the
float32 state, two dots per step: [w; q exp(G)] S (one dot, stacked along C) gives w S and the
inter-chunk readout, and (k exp(G_C - G))^T v' updates the state. After the scan the intra-chunk
output (Gamma * q k^T) v' is again one batched dot over all chunks.

T (the C x C inverse; not the sequence length) is formed by exact blocked inversion
(`unit_lower_inverse`: Gaussian elimination on 1, 2, 4, ... sized diagonal blocks merged by small
matmuls; no LAPACK), not by a power series in A, whose terms overflow under strong decay; w and
u are then one matmul T [beta exp(G) k | beta v]. Only G_i - G_j with i >= j and G_C - G_j are
exponentiated (both <= 0 for g <= 0), and masks are applied with `where` before values reach a
dot or an exp (0 * inf would be NaN, also in the gradients).

Precision. Elementwise arithmetic, G, A, T, w, u, the state and o are float32 (float64 when an
input is float64). Dot operands: with 16-bit q/k/v (bf16, fp16) the dots k k^T, q k^T,
[w; q exp(G)] S, (k exp(G_C - G))^T v' and (Gamma q k^T) v' take operands in that dtype with
float32 accumulation (preferred_element_type), as flash-linear-attention does; the inversion of
I + A runs in float32 at Precision.HIGHEST (its merges compound rounding), and T [.|.] takes
float32 operands at the backend's default precision (TF32 on GPUs): rounding T to bf16 was the
largest single error term (bf16 inputs 1 x 2048 x 4 x 128 on the CPU, output vs the float32
recurrence: max-abs relative 9.7e-3 -> 6.0e-3, norm-relative 4.1e-3 -> 3.7e-3; the bf16
output rounding alone is 1.7e-3; flash-linear-attention shows 4.2e-3 on the H100). With
float32 q/k/v every dot is float32 at Precision.HIGHEST (no TF32 on GPUs, no single bf16 pass on
TPUs): k k^T feeds the inversion, whose conditioning amplifies operand rounding, and the state
dots are repeated N times along the recurrence, so a float32 caller gets float32 accuracy
throughout. float64 stays float64. One limit, shared by the Pallas kernels and
flash-linear-attention: the differences G_i - G_j lose float32 precision where one token's gate
is far more negative than its chunk's others (thousands and more below them), which the
per-token loop does not, and g = -inf gives NaN (-inf - -inf). The mixer's gates,
g = -exp(A_log) softplus(.), stay within tens of 0.

Gradients: plain autodiff under `jax.checkpoint` whose policy saves only named values: the
[B, H, K, V] state entering each chunk (N = T / C states, never one per token), v' (T vectors of
size V), T and the other outputs of phase (1) (per-token vectors, C x C matrices per chunk; see
`_run`). Phase (1)'s internals are recomputed chunk-parallel in the backward, followed by one
reverse scan. Forward-mode (jvp) works too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from taylorcal_jax.ops.gdn.operands import check_operands
from taylorcal_jax.ops.gdn.reference import compute_dtype, l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST
_STATE_NAME = "gdn_chunk_state"
_V_NEW_NAME = "gdn_v_new"
_T_NAME = "gdn_unit_lower_inverse"
_CHUNK_NAME = "gdn_chunk_parallel_outputs"


def _dot_options(q, k, v, cdt):
    """(operand dtype, precision) of every dot: 16-bit operands for 16-bit q/k/v, else cdt."""
    act = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if cdt == jnp.float32 and jnp.dtype(act).itemsize == 2:
        return act, None
    return cdt, _HIGHEST


def _hdot(a, b):
    """a @ b over the last two axes, exact in the input dtype (float32 / float64)."""
    return jnp.matmul(a, b, precision=_HIGHEST)


@jax.custom_jvp
def unit_lower_inverse(a):
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], by exact blocked inversion.

    Bottom-up over block sizes s = 1, 2, 4, ...: two neighbouring diagonal blocks with known
    inverses X1, X2 and the off-diagonal block L21 of I + A merge as
    [[L11, 0], [L21, L22]]^-1 = [[X1, 0], [-X2 L21 X1, X2]]. This is Gaussian elimination in
    another order (log2 C levels of small batched matmuls), not a power series in A. C is padded
    to a power of two with zeros (the padded inverse is block diagonal with an identity block).
    No LAPACK: jaxlib's batched CPU trsm can deadlock when two run concurrently on a small
    intra-op thread pool (seen with jaxlib 0.10.2 on 2 cores). Derivative: dT = -T dA T.
    """
    c = a.shape[-1]
    p = 1 << max(c - 1, 0).bit_length()  # next power of two >= c
    if p != c:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, p - c), (0, p - c)])
    batch = a.shape[:-2]
    inv = jnp.ones(batch + (p, 1, 1), a.dtype)  # inverses of the 1 x 1 diagonal blocks of I + A
    s = 1
    while s < p:
        nb = p // (2 * s)
        # Lower-left s x s block of each 2s x 2s diagonal block of A (= of I + A), by slicing
        # (no gather): blocks (i, j) laid out as [nb * nb, s, s], the diagonal i = j is every
        # (nb + 1)-th.
        l21 = a.reshape(batch + (nb, 2, s, nb, 2, s))[..., :, 1, :, :, 0, :]  # [...,nb,s,nb,s]
        l21 = jnp.swapaxes(l21, -3, -2).reshape(batch + (nb * nb, s, s))[..., :: nb + 1, :, :]
        x1, x2 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        y = -_hdot(_hdot(x2, l21), x1)
        top = jnp.concatenate([x1, jnp.zeros_like(x1)], axis=-1)
        bottom = jnp.concatenate([y, x2], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        s *= 2
    return inv.reshape(batch + (p, p))[..., :c, :c]


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    t = unit_lower_inverse(a)
    return t, -_hdot(_hdot(t, da), t)


def _chunk_parallel(q, k, v, g, beta, *, use_qk_l2norm, cdt, op, precision):
    """Phase (1) on [N,B,H,C,.] inputs: everything that does not depend on the state.

    Returns (wq [N,B,H,2C,K] = [w; q exp(G)] in op dtype, u [N,B,H,C,V] cdt,
    k_to_end [N,B,H,C,K] = k exp(G_C - G) in op dtype, decay [N,B,H] = exp(G_C) cdt,
    intra [N,B,H,C,C] = causal * Gamma * q k^T in op dtype).
    """

    def dot(spec, a, b):
        return jnp.einsum(
            spec, a.astype(op), b.astype(op), precision=precision, preferred_element_type=cdt
        )

    q, k, v, g, beta = (x.astype(cdt) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    c = g.shape[-1]
    big_g = jnp.cumsum(g, axis=-1)  # G_i = g_1 + ... + g_i within the chunk
    big_g_last = big_g[..., -1:]

    row = jnp.arange(c)[:, None]
    col = jnp.arange(c)[None, :]
    causal = row >= col  # [C,C], i >= j
    strict = row > col
    # Gamma_ij = exp(G_i - G_j) on i >= j only: the difference is zeroed before exp elsewhere,
    # so neither the value nor its gradient can see exp of a large positive number.
    diff = big_g[..., :, None] - big_g[..., None, :]
    gamma = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)

    a = jnp.where(strict, beta[..., :, None] * dot("...ik,...jk->...ij", k, k) * gamma, 0.0)
    # [w | u] = T [beta exp(G) k | beta v], T = (I + A)^-1 by blocked exact inversion.
    exp_g = jnp.exp(big_g)
    rhs = jnp.concatenate([(beta * exp_g)[..., None] * k, beta[..., None] * v], axis=-1)
    t_inv = checkpoint_name(unit_lower_inverse(a), _T_NAME)  # saved for the backward
    # float32 operands at the default precision even for 16-bit inputs: T is not bounded like
    # q, k, Gamma, and rounding it to bf16 was the largest single error term (see the docstring).
    wu = jnp.einsum("...ij,...jd->...id", t_inv, rhs, precision=precision)
    kdim = k.shape[-1]
    w, u = wu[..., :kdim], wu[..., kdim:]

    intra = jnp.where(causal, dot("...ik,...jk->...ij", q, k) * gamma, 0.0)
    wq = jnp.concatenate([w, q * exp_g[..., None]], axis=-2).astype(op)
    k_to_end = (k * jnp.exp(big_g_last - big_g)[..., None]).astype(op)  # exp(G_C - G_j) <= 1
    decay = jnp.exp(big_g_last[..., 0])
    # All outputs are saved for the backward (per-token vectors and one C x C matrix per chunk):
    # recomputing them there made the CPU forward+backward slower (XLA then re-derives them
    # inside larger fusions).
    outs = (wq, u, k_to_end, decay, intra.astype(op))
    return tuple(checkpoint_name(x, _CHUNK_NAME) for x in outs)


def _gated_delta_rule_chunked(
    q_bthk, k_bthk, v_bthv, g_bth, beta_bth, state_bhkv, scale, *, chunk_size, use_qk_l2norm
):
    """(o [B,T,H,V] in v's dtype, final state [B,H,K,V] in cdt); state_bhkv already in cdt."""
    cdt = state_bhkv.dtype
    op, precision = _dot_options(q_bthk, k_bthk, v_bthv, cdt)
    b, t, h, _ = q_bthk.shape
    vdim = v_bthv.shape[-1]
    c = chunk_size
    n = -(-t // c)
    pad = n * c - t

    def to_chunks(x):
        # [B,T,H,...] -> [N,B,H,C,...], zero-padded in time (zeros are the neutral pad token).
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, n, c) + x.shape[2:])
        return jnp.moveaxis(x, (1, 2), (0, 3))

    chunks = [to_chunks(x) for x in (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)]
    wq, u, k_to_end, decay, intra = _chunk_parallel(
        *chunks, use_qk_l2norm=use_qk_l2norm, cdt=cdt, op=op, precision=precision
    )

    def step(s_bhkv, xs):
        wq_c, u_c, k_to_end_c, decay_c = xs
        s_bhkv = checkpoint_name(s_bhkv, _STATE_NAME)  # saved for the backward, one per chunk
        ws_qs = jnp.einsum(
            "bhck,bhkv->bhcv", wq_c, s_bhkv.astype(op), precision=precision,
            preferred_element_type=cdt,
        )  # fmt: skip
        v_new = checkpoint_name((u_c - ws_qs[..., :c, :]).astype(op), _V_NEW_NAME)  # u - w S
        # exp(G_C) S as a dot without contraction (XLA makes it a multiply): its transpose then
        # reads the [B,H] decay, not a broadcast [B,H,K,V] copy that the backward would rebuild.
        decayed = jax.lax.dot_general(
            s_bhkv, decay_c, (((), ()), ((0, 1), (0, 1))), precision=_HIGHEST
        )
        s_bhkv = decayed + jnp.einsum(
            "bhck,bhcv->bhkv", k_to_end_c, v_new, precision=precision, preferred_element_type=cdt
        )
        return s_bhkv, (v_new, ws_qs[..., c:, :])  # v', (q exp(G)) S

    state_bhkv, (v_new, o_inter) = jax.lax.scan(step, state_bhkv, (wq, u, k_to_end, decay))
    o_intra = jnp.einsum(
        "nbhij,nbhjv->nbhiv", intra, v_new, precision=precision, preferred_element_type=cdt
    )
    o = scale * (o_inter + o_intra)  # [N,B,H,C,V]
    o = jnp.moveaxis(o, (0, 3), (1, 2)).reshape(b, n * c, h, vdim)[:, :t]
    return o.astype(v_bthv.dtype), state_bhkv


@functools.partial(jax.jit, static_argnums=(7, 8))
def _run(q_bthk, k_bthk, v_bthv, g_bth, beta_bth, state_bhkv, scale, chunk_size, use_qk_l2norm):
    """One compiled program per shape (eager callers too), under `jax.checkpoint`.

    Memory of the backward pass: reverse mode keeps only the inputs and named values: the state
    entering each chunk (one [B,H,K,V] per chunk, N = T / C of them) and v' (one V-vector per
    token, dot operand dtype) from inside the scan; T = (I + A)^-1 and Gamma * q k^T (one C x C
    matrix per chunk each, i.e. C floats per token); [w; q exp(G)] and k exp(G_C - G) (3K per
    token, operand dtype), u (V per token, float32) and exp(G_C). Gamma, A, the norms and the
    exponentials are recomputed in the backward, batched over all chunks, before one reverse
    scan. Never one state per token: for K = V = 128, C = 64, bf16 inputs, about 3.2 kB per
    token and head, of which the states are 1 kB and the inputs 0.8 kB.
    """

    def run(*args):
        return _gated_delta_rule_chunked(*args, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm)

    policy = jax.checkpoint_policies.save_only_these_names(
        _STATE_NAME, _V_NEW_NAME, _T_NAME, _CHUNK_NAME
    )
    return jax.checkpoint(run, policy=policy)(
        q_bthk, k_bthk, v_bthv, g_bth, beta_bth, state_bhkv, scale
    )


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
    inputs = (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
    b, _, h, kdim, vdim = check_operands(*inputs, initial_state_bhkv, chunk_size)
    cdt = compute_dtype(*inputs, *(() if initial_state_bhkv is None else (initial_state_bhkv,)))
    scale = kdim**-0.5 if scale is None else scale
    if initial_state_bhkv is None:
        state = jnp.zeros((b, h, kdim, vdim), cdt)
    else:
        state = initial_state_bhkv.astype(cdt)

    o, state = _run(*inputs, state, jnp.asarray(scale, cdt), chunk_size, use_qk_l2norm)
    return o, (state if output_final_state else None)
