"""Chunked gated delta rule as Pallas kernels (Triton lowering on GPUs; interpret mode on CPUs).

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length, NT = Tp / C chunks, BV value block, NV = V / BV.

Per (b, h) and chunk, with q, k L2-normalised, s = K^-1/2, G = cumsum(g) inside the chunk,
Gamma_ij = exp(G_i - G_j) (i >= j only), S the [K, V] state entering the chunk:

    A   = strict_lower(beta_i (k_i . k_j) Gamma_ij)      T = (I + A)^-1
    w   = T (beta exp(G) k)                               u = T (beta v)
    v'  = u - w S
    o   = s (q exp(G)) S + (s causal * Gamma * q k^T) v'
    S'  = exp(G_C) S + (k exp(G_C - G))^T v'

Forward = two kernels. `_chunk_kernel` (grid NT x B x H) normalises k, builds A from 16 x 16
blocks, inverts the diagonal blocks by forward substitution, merges the off-diagonal blocks of T
by small exact dots and writes w, u (input dtype) and G (fp32). `_seq_kernel` (grid NV x B x H)
loops over chunks with the fp32 state [K, BV] as the loop carry, recomputes the q/k norms and
writes o and the final state (no h or v' in memory). Inputs stay in [B, T, H, D] layout (B and H
squeezed by BlockSpecs).

Backward (one custom_vjp): the chunk-local map (q, k, v, g, beta) -> (w, u, qg = s q exp(G),
kd = k exp(G_C - G), aqk = s causal Gamma q k^T, lgc = G_C at each chunk's last row) is
recomputed in XLA under jax.vjp; two Pallas kernels do the sequential part: `_states_kernel`
(chunk-start states h and v') and `_reverse_kernel` (reverse pass over chunks with dS as the
carry: dv' = aqk^T do + kd dS', dS = exp(G_C) dS' + qg^T do - w^T dv', and the partial
gradients of w, qg, kd, aqk, G_C per V-block); their cotangents go back through the XLA vjp.

Variants (GDNPallasConfig; the above is the field defaults; config.BF16_DEFAULT, the fastest
measured on an H100, uses all of these but the "analytic" backward):
forward="split" (states pass writing h and v', then a chunk-parallel output kernel);
chunk_kernel="fla" (pallas_gpu_chunk.py); backward="analytic" (chunk_local_bwd.py: the closed-form
chunk-local backward in XLA from T written by kernel 1) or "pallas" (pallas_gpu_bwd.py: the same
closed form as two chunk-parallel Pallas kernels);
residuals="t" / "states" (the forward run under differentiation keeps T and G / also h and v';
the backward then forms w, u, kd, qg, aqk from T by pallas_gpu_bwd.prep_call and, with "states",
skips the state pass); reverse="split" (pallas_gpu_reverse.py); state_segments
(pallas_gpu_segments.py, sequence segments for the sequential passes at small B * H);
kd_in_states (the split forward's state pass applies kd to v' from k, so kernel 1 does not write
it); norm_after_dot (kernel 1 and the output kernel give q and k to their dots as loaded and scale
the results); fused_primal (a forward that keeps nothing for a backward runs the fused sequential
pass, at a value block chosen by fused_programs); prefetch_programs (one-wave sequential kernels
load the next chunk's tiles during this chunk's step, chunk_loop).
Without an initial state the sequential kernels start from zero (no zeros array, no fill kernel).

Padding: T is padded to a multiple of C with q = k = v = 0, g = 0, beta = 0 (state unchanged).
Numerics: bf16 inputs -> bf16 dot operands, fp32 accumulation; G, A, T, S in fp32; float32 inputs
-> fp32 dots at config.f32_precision. Only G_i - G_j (i >= j) and G_C - G_j are exponentiated.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn.chunked import unit_lower_inverse
from taylorcal_jax.ops.gdn.config import GDNPallasConfig, config_with_residuals, default_interpret

F32 = jnp.float32
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class _Static:
    chunk: int
    scale: float
    use_l2: bool
    interpret: bool
    cfg: GDNPallasConfig


# ----------------------------------------------------------------------------- helpers


def _l2(x):
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _EPS)


def _rnorm(x, use_l2=True):
    """1 / |x| per row ([C]) of a [C, D] tile, in fp32, as _l2 scales by; ones without the L2
    norm (use_l2 False)."""
    if not use_l2:
        return jnp.ones(x.shape[:1], F32)
    xf = x.astype(F32)
    return lax.rsqrt(jnp.sum(xf * xf, axis=-1) + _EPS)


def _f32_precision(st: _Static):
    if st.interpret or st.cfg.f32_precision == "highest":
        return lax.Precision.HIGHEST
    return lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _mm(a, b, ca, cb, dt, prec):
    """Dot contracting a's dim ca with b's dim cb; operands in dt, fp32 result."""
    a, b = a.astype(dt), b.astype(dt)
    return lax.dot_general(
        a,
        b,
        (((ca,), (cb,)), ((), ())),
        precision=prec if dt == F32 else None,
        preferred_element_type=F32,
    )


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _gamma(gg, mask):
    """Gamma [C, C]: exp(G_i - G_j) where mask (i >= j or i > j), 1 elsewhere; masked before the
    exp, so that no exp(G_i - G_j) with i < j (which can overflow) is ever formed."""
    return jnp.exp(jnp.where(mask, gg[:, None] - gg[None, :], 0.0))


def _inv_unit_lower16(a):
    """(I + a)^-1 for a strictly lower-triangular [16, 16] fp32 block, by forward substitution."""
    r, c = _iota((16, 16), 0), _iota((16, 16), 1)
    eye = (r == c).astype(F32)
    t = eye
    for i in range(1, 16):
        a_i = jnp.sum(jnp.where(r == i, a, 0.0), axis=0)  # row i of a
        row = -jnp.sum(a_i[:, None] * t, axis=0)  # -a_i @ t (rows < i of t are final)
        t = jnp.where(r == i, eye + row[None, :], t)
    return t


def _blocked_a_and_inverse(ks, gs, bs, dt, prec):
    """A and T = (I + A)^-1 of one chunk by 16 x 16 blocks, as dicts keyed (i, j), j <= i.

    A_ij = strict_lower(beta_i (k_i k_j^T) exp(G_i - G_j)) (masked before the exp on the
    diagonal blocks); T_ii by forward substitution, then T_ij = -T_ii sum_{m=j}^{i-1} A_im T_mj.
    ks, gs, bs: per 16-row block, k [16, K], cumulative G [16] and beta [16].
    """
    hp = lax.Precision.HIGHEST
    ns = len(ks)
    r16, c16 = _iota((16, 16), 0), _iota((16, 16), 1)
    a, t = {}, {}
    for i in range(ns):
        for j in range(i + 1):
            kk = _mm(ks[i], ks[j], 1, 1, dt, prec)
            diff = gs[i][:, None] - gs[j][None, :]
            if i == j:
                low = r16 > c16
                a[i, j] = jnp.where(
                    low, bs[i][:, None] * kk * jnp.exp(jnp.where(low, diff, 0.0)), 0.0
                )
            else:
                a[i, j] = bs[i][:, None] * kk * jnp.exp(diff)
    for i in range(ns):
        t[i, i] = _inv_unit_lower16(a[i, i])
        for j in range(i - 1, -1, -1):
            acc = _mm(a[i, j], t[j, j], 1, 0, F32, hp)
            for m in range(j + 1, i):
                acc = acc + _mm(a[i, m], t[m, j], 1, 0, F32, hp)
            t[i, j] = -_mm(t[i, i], acc, 1, 0, F32, hp)
    return a, t


def _launch(name: str, st: _Static, warps: int, dt, bwd: bool = False) -> dict:
    """pallas_call's `name` and `compiler_params` (Triton warps and pipelining depth) for one
    kernel."""
    if st.interpret:
        return dict(name=name)
    from jax.experimental.pallas import triton as plgpu

    stages = st.cfg.stages_f32 if dt == F32 else (st.cfg.stages_bwd if bwd else st.cfg.stages)
    return dict(name=name, compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))


# ----------------------------------------------------------------------------- kernel 1


def _chunk_kernel(k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, gcum_ref, *kd_ref, st, dt, prec):
    c = st.chunk
    ns = c // 16
    g = g_ref[...].astype(F32)  # [C]
    g_total = jnp.sum(g)
    rc, cc = _iota((c, c), 0), _iota((c, c), 1)
    gcum_ref[...] = jnp.sum(jnp.where(cc <= rc, g[None, :], 0.0), axis=1)
    r16c, c16c = _iota((16, c), 0), _iota((16, c), 1)
    ks, gs, bs, rks, rvs = [], [], [], [], []
    for i in range(ns):
        rows = pl.ds(16 * i, 16)
        k_i = k_ref[rows, :].astype(F32)
        if st.use_l2:
            k_i = _l2(k_i)
        g_i = jnp.sum(jnp.where(c16c <= r16c + 16 * i, g[None, :], 0.0), axis=1)  # G rows
        b_i = beta_ref[rows].astype(F32)
        v_i = v_ref[rows, :].astype(F32)
        ks.append(k_i)
        gs.append(g_i)
        bs.append(b_i)
        rks.append((b_i * jnp.exp(g_i))[:, None] * k_i)
        rvs.append(b_i[:, None] * v_i)
        if kd_ref:  # k exp(G_C - G) for the split forward's state pass
            kd_ref[0][rows, :] = (k_i * jnp.exp(g_total - g_i)[:, None]).astype(kd_ref[0].dtype)
    _, t = _blocked_a_and_inverse(ks, gs, bs, dt, prec)
    for i in range(ns):
        w_i = _mm(t[i, 0], rks[0], 1, 0, dt, prec)
        u_i = _mm(t[i, 0], rvs[0], 1, 0, dt, prec)
        for j in range(1, i + 1):
            w_i = w_i + _mm(t[i, j], rks[j], 1, 0, dt, prec)
            u_i = u_i + _mm(t[i, j], rvs[j], 1, 0, dt, prec)
        w_ref[pl.ds(16 * i, 16), :] = w_i.astype(w_ref.dtype)
        u_ref[pl.ds(16 * i, 16), :] = u_i.astype(u_ref.dtype)


def _chunk_call(k, v, g, beta, st: _Static, dt, with_kd=False, with_t=False):
    """(w, u, gcum[, kd][, T]); T ([B, Tp, H, C]) only from the "fla" body, in dt: the forward
    rounds T to dt before its w and u dots, and every backward use of T is a dot operand in dt, so
    the rounding loses nothing that is used (fp32 inputs keep fp32 T)."""
    b, tp, h, kd = k.shape
    vd = v.shape[-1]
    c = st.chunk
    nt = tp // c
    idx4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    idx3 = lambda i, bb, hh: (bb, i, hh)  # noqa: E731
    body = _chunk_kernel
    if st.cfg.chunk_kernel == "fla":
        from taylorcal_jax.ops.gdn.pallas_gpu_chunk import chunk_kernel_fla as body
    kern = functools.partial(body, st=st, dt=dt, prec=_f32_precision(st))
    extra_spec = [pl.BlockSpec((None, c, None, kd), idx4)] if with_kd else []
    extra_shape = [jax.ShapeDtypeStruct((b, tp, h, kd), dt)] if with_kd else []
    if with_t:
        if st.cfg.chunk_kernel != "fla":
            raise ValueError("T is written only by chunk_kernel 'fla'")
        kern = functools.partial(kern, with_t=True)
        extra_spec.append(pl.BlockSpec((None, c, None, c), idx4))
        extra_shape.append(jax.ShapeDtypeStruct((b, tp, h, c), dt))
    return pl.pallas_call(
        kern,
        grid=(nt, b, h),
        in_specs=[
            pl.BlockSpec((None, c, None, kd), idx4),
            pl.BlockSpec((None, c, None, vd), idx4),
            pl.BlockSpec((None, c, None), idx3),
            pl.BlockSpec((None, c, None), idx3),
        ],
        out_specs=[
            pl.BlockSpec((None, c, None, kd), idx4),
            pl.BlockSpec((None, c, None, vd), idx4),
            pl.BlockSpec((None, c, None), idx3),
        ]
        + extra_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, kd), dt),
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, tp, h), F32),
        ]
        + extra_shape,
        interpret=st.interpret,
        **_launch("gdn_chunk", st, st.cfg.warps_chunk, dt),
    )(k, v, g, beta)


# ----------------------------------------------------------------------------- kernel 2


def _last(x, c):
    """x[C-1] of a [C] vector without value slicing."""
    return jnp.sum(jnp.where(_iota((c,), 0) == c - 1, x, 0.0))


def _with_s0(specs, args, s0, kdim, bv):
    """(in_specs, operands) with the initial state appended when there is one. Without one
    (s0 None) the sequential kernels start from zero and no zeros array is made or read."""
    if s0 is None:
        return specs, args
    spec = pl.BlockSpec((None, None, kdim, bv), lambda j, bb, hh: (bb, hh, 0, j))
    return specs + [spec], args + [s0]


def _start_state(refs, has_s0, shape):
    """(the loop's starting state, the remaining refs) of a kernel with an optional s0 ref."""
    if has_s0:
        return refs[0][...].astype(F32), refs[1:]
    return jnp.zeros(shape, F32), refs


def _chunk_end(ref, i, c):
    """ref[i * C + C - 1] (G_C of chunk i) as a [1] value, by a one-element load. The sequential
    kernels use it in place of _last over the chunk's [C] rows: there a block-wide reduction
    (shared memory and a barrier) would sit on the loop carry's path every step."""
    return ref[pl.ds(i * c + c - 1, 1)]


def _chunk_end_decay(ref, i, c):
    """exp(G_C) of chunk i as a [1, 1] value (_chunk_end)."""
    return jnp.exp(_chunk_end(ref, i, c))[:, None]


def chunk_rows(i, c):
    """Rows [i C, (i + 1) C) of a [Tp, ...] ref, marked aligned when i is traced (the marker does
    not lower for a Python int, as chunk_loop's first load has)."""
    return pl.ds(i * c if isinstance(i, int) else pl.multiple_of(i * c, c), c)


def chunk_loop(nt, load, step, init, prefetch: bool, reverse: bool = False):
    """carry = step(i, load(i), carry) over the chunks i = 0 .. nt-1 (nt-1 .. 0 with reverse).

    `load(i)` reads chunk i's tiles from the refs (a tuple); `step` does the rest. With prefetch,
    chunk i+1's loads are issued at the top of chunk i's step and handed on in the loop carry, so
    their memory latency overlaps chunk i's products. Without it, Triton's own pipelining of the
    loop (num_stages 2) issues the next chunk's copies after this chunk's last use of their
    buffers, i.e. at the end of the step, and waits for them at the top of the next one (sm_90
    TTGIR of the state pass), so with one program per SM the latency sits between the steps. The
    carried tiles cost registers (spills at 4 warps), hence seq_launch's rule.
    The last step's prefetch re-reads its own chunk (clamped index) and is dropped."""
    chunk = (lambda n: nt - 1 - n) if reverse else (lambda n: n)
    if not prefetch:
        return lax.fori_loop(0, nt, lambda n, s: step(chunk(n), load(chunk(n)), s), init)

    def body(n, carry):
        s, tiles = carry
        nxt = load(chunk(jnp.minimum(n + 1, nt - 1)))
        return step(chunk(n), tiles, s), nxt

    return lax.fori_loop(0, nt, body, (init, load(chunk(0))))[0]


def seq_launch(name: str, st: _Static, programs: int, warps: int, dt, bwd: bool = False):
    """(prefetch, pallas_call launch options) of a sequential kernel with `programs` programs:
    chunk_loop's prefetch at config.warps_prefetch warps where the grid fits one wave
    (programs <= config.prefetch_programs: one program per SM, nothing else to hide the loads'
    latency), the kernel's own warps and Triton's pipelining otherwise."""
    if st.cfg.prefetch_programs and programs <= st.cfg.prefetch_programs:
        return True, _launch(name, st, st.cfg.warps_prefetch, dt, bwd)
    return False, _launch(name, st, warps, dt, bwd)


def _seq_kernel(q_ref, k_ref, w_ref, u_ref, gcum_ref, *refs, st, dt, prec, nt, has_s0):
    """Fused sequential pass: o and the final state, no h or v' in memory. q and k go to the
    dots as loaded, their norms (r_q, r_k) to the results:
        v' = u - w S,
        o  = diag(s r_q exp(G)) (q S) + (causal Gamma diag(s r_q) q k^T diag(r_k)) v',
        S' = exp(G_C) S + k^T diag(r_k exp(G_C - G)) v'.
    refs: (s0 if has_s0), o, final state."""
    c = st.chunk
    s_start, (o_ref, st_ref) = _start_state(refs, has_s0, (k_ref.shape[-1], u_ref.shape[-1]))
    causal = _iota((c, c), 0) >= _iota((c, c), 1)

    def load(i):
        rows = chunk_rows(i, c)
        last = _chunk_end(gcum_ref, i, c)
        return q_ref[rows, :], k_ref[rows, :], w_ref[rows, :], u_ref[rows, :], gcum_ref[rows], last

    def step(i, tiles, s):
        q, k, w, u, gg, gc_last = tiles
        rq, rk = st.scale * _rnorm(q, st.use_l2), _rnorm(k, st.use_l2)
        vp = u.astype(F32) - _mm(w, s, 1, 0, dt, prec)
        qk = _mm(q, k, 1, 1, dt, prec) * rq[:, None] * rk[None, :]
        aqk = jnp.where(causal, qk * _gamma(gg, causal), 0.0)
        o = (rq * jnp.exp(gg))[:, None] * _mm(q, s, 1, 0, dt, prec) + _mm(aqk, vp, 1, 0, dt, prec)
        o_ref[chunk_rows(i, c), :] = o.astype(o_ref.dtype)
        vs = vp * (rk * jnp.exp(gc_last - gg))[:, None]
        return s * jnp.exp(gc_last)[:, None] + _mm(k, vs, 0, 0, dt, prec)

    # no prefetch here: with five products per step the carried tiles cost more than they save
    # (launch/results/gdn_sweep_h100_s5_fused_primal_prefetch.json)
    st_ref[...] = chunk_loop(nt, load, step, s_start, prefetch=False)


def fused_block_v(st: _Static, b, h, vd) -> int:
    """The fused pass's value block: config.block_v, halved (down to 16) while the grid has fewer
    than config.fused_programs programs. One program per (V-block, b, h) runs the whole sequence;
    measured on an H100, the fused step ran best with two programs resident per SM (presumably
    one's loads overlapping the other's products): at 4 x 8192 x 16 x 128 BV 32 (256 programs)
    took 1.11 ms against 1.25 ms at BV 64 (128), while 8 x 4096 x 16 x 128 is fastest at BV 64
    (256 programs; 1.10 ms at BV 32)."""
    bv = min(st.cfg.block_v, vd)
    while bv > 16 and (vd // bv) * b * h < st.cfg.fused_programs:
        bv //= 2
    return bv


def _seq_call(q, k, w, u, gcum, s0, st: _Static, dt, out_dtype):
    b, tp, h, kd = q.shape
    vd = u.shape[-1]
    bv = fused_block_v(st, b, h, vd)
    nv = vd // bv
    full_k = pl.BlockSpec((None, tp, None, kd), lambda j, bb, hh: (bb, 0, hh, 0))
    full_v = pl.BlockSpec((None, tp, None, bv), lambda j, bb, hh: (bb, 0, hh, j))
    full_t = pl.BlockSpec((None, tp, None), lambda j, bb, hh: (bb, 0, hh))
    state = pl.BlockSpec((None, None, kd, bv), lambda j, bb, hh: (bb, hh, 0, j))
    kern = functools.partial(
        _seq_kernel,
        st=st,
        dt=dt,
        prec=_f32_precision(st),
        nt=tp // st.chunk,
        has_s0=s0 is not None,
    )
    specs, args = _with_s0([full_k, full_k, full_k, full_v, full_t], [q, k, w, u, gcum], s0, kd, bv)
    return pl.pallas_call(
        kern,
        grid=(nv, b, h),
        in_specs=specs,
        out_specs=[full_v, state],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, vd), out_dtype),
            jax.ShapeDtypeStruct((b, h, kd, vd), F32),
        ],
        interpret=st.interpret,
        **_launch("gdn_seq", st, st.cfg.warps_seq, dt),
    )(*args)


def _out_kernel(q_ref, k_ref, gcum_ref, h_ref, vp_ref, o_ref, *, st, dt, prec):
    """Split forward, chunk-parallel: o = s (q exp(G)) h + (s causal Gamma q k^T) v'."""
    c = st.chunk
    causal = _iota((c, c), 0) >= _iota((c, c), 1)
    gg = gcum_ref[...]
    decay = _gamma(gg, causal)
    if st.cfg.norm_after_dot:  # q, k into the dots as loaded; norms, s and decays on the results
        # the same o as _seq_kernel's step; written out here too, as the order of the loads
        # decides this kernel's registers and shared memory (offline sm_90)
        q, k = q_ref[...], k_ref[...]
        rq, rk = st.scale * _rnorm(q, st.use_l2), _rnorm(k, st.use_l2)
        qk = _mm(q, k, 1, 1, dt, prec) * rq[:, None] * rk[None, :]
        aqk = jnp.where(causal, qk * decay, 0.0)
        o = (rq * jnp.exp(gg))[:, None] * _mm(q, h_ref[...], 1, 0, dt, prec)
        o_ref[...] = (o + _mm(aqk, vp_ref[...], 1, 0, dt, prec)).astype(o_ref.dtype)
        return
    q = q_ref[...].astype(F32)
    k = k_ref[...].astype(F32)
    if st.use_l2:
        q, k = _l2(q), _l2(k)
    q = q * st.scale
    qk = _mm(q, k, 1, 1, dt, prec)
    aqk = jnp.where(causal, qk * decay, 0.0)
    o = _mm(q * jnp.exp(gg)[:, None], h_ref[...], 1, 0, dt, prec) + _mm(
        aqk, vp_ref[...], 1, 0, dt, prec
    )
    o_ref[...] = o.astype(o_ref.dtype)


def _states_call(w, u, kd, gc_src, s0, st: _Static, dt, bwd=False, kd_from_k=False):
    """Sequential state pass: (h [B, H, NT*K, V] chunk-start states, v' [B,Tp,H,V], final S).
    kd_from_k: `kd` is k itself and gc_src the cumulative G of every row; the kernel forms
    kd = l2(k) exp(G_C - G) as it goes (config.kd_in_states; never with segments)."""
    if st.cfg.state_segments != 1 and not kd_from_k:
        from taylorcal_jax.ops.gdn.pallas_gpu_segments import states_call_segmented

        out = states_call_segmented(w, u, kd, gc_src, s0, st, dt, bwd)
        if out is not None:
            return out
    b, tp, h, kdim = w.shape
    vd = u.shape[-1]
    nt = tp // st.chunk
    bv = min(st.cfg.block_v, vd)
    prefetch, launch = seq_launch("gdn_states", st, (vd // bv) * b * h, st.cfg.warps_seq, dt, bwd)
    fk = pl.BlockSpec((None, tp, None, kdim), lambda j, bb, hh: (bb, 0, hh, 0))
    fv = pl.BlockSpec((None, tp, None, bv), lambda j, bb, hh: (bb, 0, hh, j))
    ft = pl.BlockSpec((None, tp, None), lambda j, bb, hh: (bb, 0, hh))
    state = pl.BlockSpec((None, None, kdim, bv), lambda j, bb, hh: (bb, hh, 0, j))
    hs = pl.BlockSpec((None, None, nt * kdim, bv), lambda j, bb, hh: (bb, hh, 0, j))
    specs, args = _with_s0([fk, fv, fk, ft], [w, u, kd, gc_src], s0, kdim, bv)
    return pl.pallas_call(
        functools.partial(
            _states_kernel,
            st=st,
            dt=dt,
            prec=_f32_precision(st),
            nt=nt,
            kdim=kdim,
            kd_from_k=kd_from_k,
            has_s0=s0 is not None,
            prefetch=prefetch,
        ),
        grid=(vd // bv, b, h),
        in_specs=specs,
        out_specs=[hs, fv, state],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, nt * kdim, vd), dt),
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, h, kdim, vd), F32),
        ],
        interpret=st.interpret,
        **launch,
    )(*args)


def _out_call(q, k, gcum, hmat, vp, st: _Static, dt, out_dtype):
    b, tp, h, kdim = q.shape
    vd = vp.shape[-1]
    c = st.chunk
    idx4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_out_kernel, st=st, dt=dt, prec=_f32_precision(st)),
        grid=(tp // c, b, h),
        in_specs=[
            pl.BlockSpec((None, c, None, kdim), idx4),
            pl.BlockSpec((None, c, None, kdim), idx4),
            pl.BlockSpec((None, c, None), lambda i, bb, hh: (bb, i, hh)),
            pl.BlockSpec((None, None, kdim, vd), lambda i, bb, hh: (bb, hh, i, 0)),
            pl.BlockSpec((None, c, None, vd), idx4),
        ],
        out_specs=pl.BlockSpec((None, c, None, vd), idx4),
        out_shape=jax.ShapeDtypeStruct((b, tp, h, vd), out_dtype),
        interpret=st.interpret,
        **_launch("gdn_out", st, st.cfg.warps_out, dt),
    )(q, k, gcum, hmat, vp)


def _forward(q, k, v, g, beta, s0, st: _Static, keep=False):
    """((o, final state), kept): kept = None, or with `keep` (config.residuals "t" / "states")
    (G, T, (h, v') or None) for the backward."""
    dt = _operand_dtype(q, k, v)
    unsegmented = _state_pass_unsegmented(st, *k.shape, v.shape[-1])
    split = st.cfg.forward == "split"
    if split and not keep and st.cfg.fused_primal and unsegmented:
        split = False  # nothing kept for a backward: o straight from the sequential pass
    kd_in_states = split and st.cfg.kd_in_states and unsegmented
    with_kd = split and not kd_in_states
    w, u, gcum, *extra = _chunk_call(k, v, g, beta, st, dt, with_kd=with_kd, with_t=keep)
    tmat = extra.pop() if keep else None
    if not split:
        out = _seq_call(q, k, w, u, gcum, s0, st, dt, v.dtype)
        return out, ((gcum, tmat, None) if keep else None)
    kd = k if kd_in_states else extra[0]
    hmat, vp, s_final = _states_call(w, u, kd, gcum, s0, st, dt, kd_from_k=kd_in_states)
    out = _out_call(q, k, gcum, hmat, vp, st, dt, v.dtype), s_final
    if not keep:
        return out, None
    return out, (gcum, tmat, (hmat, vp) if st.cfg.residuals == "states" else None)


def _state_pass_unsegmented(st: _Static, b, tp, h, kdim, vd) -> bool:
    """Whether the state pass runs unsegmented for these shapes. config.kd_in_states takes effect
    only there (the segment-end kernel reads kd as well, so with segments kernel 1 writes it), and
    so does config.fused_primal (the fused pass has no segmented form)."""
    if st.cfg.state_segments == 1:
        return True
    from taylorcal_jax.ops.gdn.pallas_gpu_segments import num_state_segments

    return num_state_segments(st, b, tp, h, kdim, vd) == 1


def _operand_dtype(*xs):
    return jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in xs) else F32


# ----------------------------------------------------------------------------- backward


def _stage1(q, k, v, g, beta, *, st: _Static, dt):
    """Chunk-local quantities in XLA: (w, u, qg, kd, aqk, lgc), all [B, Tp, H, *]."""
    b, tp, h, kdim = q.shape
    vd = v.shape[-1]
    c = st.chunk
    nt = tp // c
    prec = lax.Precision.HIGHEST if dt == F32 else None

    def ein(spec, x, y):
        return jnp.einsum(
            spec, x.astype(dt), y.astype(dt), precision=prec, preferred_element_type=F32
        )

    q, k, v = (x.astype(F32) for x in (q, k, v))
    if st.use_l2:
        q, k = _l2(q), _l2(k)
    q5, k5 = q.reshape(b, nt, c, h, kdim), k.reshape(b, nt, c, h, kdim)
    v5 = v.reshape(b, nt, c, h, vd)
    gg = jnp.cumsum(g.astype(F32).reshape(b, nt, c, h), axis=2)  # [B,NT,C,H]
    gc = gg[:, :, -1:, :]
    be = beta.astype(F32).reshape(b, nt, c, h)
    ri, ci = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
    diff = jnp.moveaxis(gg, 2, -1)[..., :, None] - jnp.moveaxis(gg, 2, -1)[..., None, :]
    strict, causal = ri > ci, ri >= ci  # diff: [B,NT,H,C,C]
    kk = ein("bnihk,bnjhk->bnhij", k5, k5)
    a = jnp.where(
        strict,
        jnp.moveaxis(be, 2, -1)[..., :, None] * kk * jnp.exp(jnp.where(strict, diff, 0.0)),
        0.0,
    )
    # Exact blocked inversion by matmuls, not LAPACK trsm (which can deadlock on XLA:CPU, where
    # the interpret-mode tests run this backward).
    tinv = unit_lower_inverse(a)
    rk = (be * jnp.exp(gg))[..., None] * k5
    rv = be[..., None] * v5
    w = ein("bnhij,bnjhk->bnihk", tinv, rk)
    u = ein("bnhij,bnjhv->bnihv", tinv, rv)
    qg = st.scale * q5 * jnp.exp(gg)[..., None]
    qk = ein("bnihk,bnjhk->bnhij", q5, k5)
    aqk = jnp.where(causal, st.scale * qk * jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    aqk = jnp.moveaxis(aqk, 2, 3)  # [B,NT,C(i),H,C(j)]
    kd = k5 * jnp.exp(gc - gg)[..., None]
    lgc = jnp.where(jnp.arange(c)[None, None, :, None] == c - 1, gc, 0.0)
    outs = (w, u, qg, kd, aqk)
    outs = tuple(x.reshape(b, tp, h, x.shape[-1]).astype(dt) for x in outs)
    return outs + (lgc.reshape(b, tp, h),)


def _states_kernel(
    w_ref,
    u_ref,
    kd_ref,
    gc_ref,
    *refs,
    st,
    dt,
    prec,
    nt,
    kdim,
    kd_from_k=False,
    has_s0=True,
    prefetch=False,
):
    """gc_ref: any [Tp] vector whose last entry in each chunk is G_C (cumsum G or lgc); with
    kd_from_k, kd_ref holds k and gc_ref the cumulative G of every row, and the scaling that makes
    kd is applied here to v' instead (off the carry's path for the norms: they depend on loads
    only), so that kernel 1 need not write kd.
    refs: (s0 if has_s0), h, v', final state."""
    c = st.chunk
    s_start, (h_ref, vp_ref, st_ref) = _start_state(refs, has_s0, (kdim, u_ref.shape[-1]))

    def load(i):
        rows = chunk_rows(i, c)
        tiles = (w_ref[rows, :], u_ref[rows, :], kd_ref[rows, :], _chunk_end(gc_ref, i, c))
        return tiles + ((gc_ref[rows],) if kd_from_k else ())

    def step(i, tiles, s):
        w, u, kd, gc_last, *gg = tiles
        rows = chunk_rows(i, c)
        h_ref[pl.ds(pl.multiple_of(i * kdim, kdim), kdim), :] = s.astype(h_ref.dtype)
        vp = u.astype(F32) - _mm(w, s, 1, 0, dt, prec)
        vp_ref[rows, :] = vp.astype(vp_ref.dtype)
        if kd_from_k:
            # kd^T v' = k^T (diag(r) v') with r = exp(G_C - G) / |k|: scale the [C, BV] v' (fp32,
            # in registers) rather than form a [C, K] fp32 kd; k goes to the dot as loaded
            vp = vp * (jnp.exp(gc_last - gg[0]) * _rnorm(kd, st.use_l2))[:, None]
        return s * jnp.exp(gc_last)[:, None] + _mm(kd, vp, 0, 0, dt, prec)

    st_ref[...] = chunk_loop(nt, load, step, s_start, prefetch)


def _reverse_kernel(
    do_ref,
    aqk_ref,
    qg_ref,
    kd_ref,
    w_ref,
    lgc_ref,
    h_ref,
    vp_ref,
    dst_ref,
    du_ref,
    dw_ref,
    dqg_ref,
    dkd_ref,
    daqk_ref,
    dlgc_ref,
    ds0_ref,
    *,
    st,
    dt,
    prec,
    nt,
    kdim,
):
    c = st.chunk

    def body(n, dsp):
        i = nt - 1 - n
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        s = h_ref[pl.ds(pl.multiple_of(i * kdim, kdim), kdim), :].astype(F32)
        do = do_ref[rows, :].astype(F32)
        vp = vp_ref[rows, :].astype(F32)
        kd = kd_ref[rows, :]
        w = w_ref[rows, :]
        egc = jnp.exp(jnp.sum(lgc_ref[rows]))
        dvp = _mm(aqk_ref[rows, :], do, 0, 0, dt, prec) + _mm(kd, dsp, 1, 0, dt, prec)
        du_ref[rows, :] = dvp.astype(du_ref.dtype)
        dw_ref[rows, :] = -_mm(dvp, s, 1, 1, dt, prec)
        dqg_ref[rows, :] = _mm(do, s, 1, 1, dt, prec)
        daqk_ref[rows, :] = _mm(do, vp, 1, 1, dt, prec)
        dkd_ref[rows, :] = _mm(vp, dsp, 1, 1, dt, prec)
        dgc = egc * jnp.sum(s * dsp)
        dlgc_ref[rows] = jnp.full((c,), dgc, F32)
        return egc * dsp + _mm(qg_ref[rows, :], do, 0, 0, dt, prec) - _mm(w, dvp, 0, 0, dt, prec)

    ds0_ref[...] = lax.fori_loop(0, nt, body, dst_ref[...].astype(F32))


def _chunk_end_g(gcum, chunk):
    """lgc: G_C on each chunk's last row, 0 elsewhere ([B, Tp, H]; the states pass reads G_C
    from it, and its cotangent is dG_C)."""
    last = (jnp.arange(gcum.shape[1]) % chunk == chunk - 1)[None, :, None]
    return jnp.where(last, gcum, 0.0)


def _backward_seq(w, u, qg, kd, aqk, lgc, s0, do, dst, st: _Static, dt, states=None):
    """(du, dw, dqg, dkd, daqk, dlgc, ds0): the states recompute (skipped when the forward kept
    `states` = (h, v'); u is then not read) and the reverse pass."""
    if st.cfg.reverse == "split":
        from taylorcal_jax.ops.gdn.pallas_gpu_reverse import backward_seq_split

        return backward_seq_split(w, u, qg, kd, aqk, lgc, s0, do, dst, st, dt, states)
    b, tp, h, kdim = w.shape
    vd = do.shape[-1]
    c = st.chunk
    nt = tp // c
    bv = min(st.cfg.block_v, vd)
    nv = vd // bv
    prec = _f32_precision(st)
    fk = pl.BlockSpec((None, tp, None, kdim), lambda j, bb, hh: (bb, 0, hh, 0))
    fc = pl.BlockSpec((None, tp, None, c), lambda j, bb, hh: (bb, 0, hh, 0))
    fv = pl.BlockSpec((None, tp, None, bv), lambda j, bb, hh: (bb, 0, hh, j))
    ft = pl.BlockSpec((None, tp, None), lambda j, bb, hh: (bb, 0, hh))
    state = pl.BlockSpec((None, None, kdim, bv), lambda j, bb, hh: (bb, hh, 0, j))
    hs = pl.BlockSpec((None, None, nt * kdim, bv), lambda j, bb, hh: (bb, hh, 0, j))
    pk = pl.BlockSpec((None, None, tp, None, kdim), lambda j, bb, hh: (j, bb, 0, hh, 0))
    pc = pl.BlockSpec((None, None, tp, None, c), lambda j, bb, hh: (j, bb, 0, hh, 0))
    pt = pl.BlockSpec((None, None, tp, None), lambda j, bb, hh: (j, bb, 0, hh))
    hmat, vp = states if states is not None else _states_call(w, u, kd, lgc, s0, st, dt, True)[:2]
    du, dw, dqg, dkd, daqk, dlgc, ds0 = pl.pallas_call(
        functools.partial(_reverse_kernel, st=st, dt=dt, prec=prec, nt=nt, kdim=kdim),
        grid=(nv, b, h),
        in_specs=[fv, fc, fk, fk, fk, ft, hs, fv, state],
        out_specs=[fv, pk, pk, pk, pc, pt, state],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, vd), F32),
            jax.ShapeDtypeStruct((nv, b, tp, h, kdim), F32),
            jax.ShapeDtypeStruct((nv, b, tp, h, kdim), F32),
            jax.ShapeDtypeStruct((nv, b, tp, h, kdim), F32),
            jax.ShapeDtypeStruct((nv, b, tp, h, c), F32),
            jax.ShapeDtypeStruct((nv, b, tp, h), F32),
            jax.ShapeDtypeStruct((b, h, kdim, vd), F32),
        ],
        interpret=st.interpret,
        **_launch("gdn_reverse", st, st.cfg.warps_bwd, dt, bwd=True),
    )(do, aqk, qg, kd, w, lgc, hmat, vp, dst)
    # partial gradients per V-block, summed here
    return du, dw.sum(0), dqg.sum(0), dkd.sum(0), daqk.sum(0), dlgc.sum(0), ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gdn(q, k, v, g, beta, s0, st: _Static):
    return _forward(q, k, v, g, beta, s0, st)[0]


def _gdn_fwd(q, k, v, g, beta, s0, st):
    out, kept = _forward(q, k, v, g, beta, s0, st, keep=st.cfg.residuals != "inputs")
    return out, (q, k, v, g, beta, s0) + (kept or ())


def _gdn_bwd(st, res, cts):
    q, k, v, g, beta, s0, *kept = res
    do, dst = cts
    dt = _operand_dtype(q, k, v)
    if st.cfg.backward in ("analytic", "pallas"):  # closed form from kernel 1's T
        from taylorcal_jax.ops.gdn import pallas_gpu_bwd as pb

        if kept:  # T and G (and perhaps h, v') from the forward: no second inversion
            gcum, tmat, states = kept
            names = ("w", "kd", "qg", "aqk") if states is not None else pb.PREP_OUTPUTS
            got = pb.prep_call(q, k, v, beta, gcum, tmat, st, dt, names)
            w, u, kd, qg, aqk = (got.get(n) for n in pb.PREP_OUTPUTS)
        else:
            w, u, gcum, kd, tmat = _chunk_call(k, v, g, beta, st, dt, with_kd=True, with_t=True)
            got = pb.prep_call(q, k, v, beta, gcum, tmat, st, dt, ("qg", "aqk"))
            qg, aqk, states = got["qg"], got["aqk"], None
        lgc = _chunk_end_g(gcum, st.chunk)
        du, dw, dqg, dkd, daqk, dlgc, ds0 = _backward_seq(
            w, u, qg, kd, aqk, lgc, s0, do.astype(dt), dst.astype(F32), st, dt, states
        )
        if st.cfg.backward == "pallas":
            local = pb.chunk_local_backward_call
            kw = dict(st=st, dt=dt, g_dtype=g.dtype)
        else:
            from taylorcal_jax.ops.gdn.chunk_local_bwd import chunk_local_backward as local

            kw = dict(chunk=st.chunk, scale=st.scale, use_l2=st.use_l2, dt=dt)
        dq, dk, dv, dg, dbeta = local(q, k, v, beta, gcum, tmat, dw, du, dqg, dkd, daqk, dlgc, **kw)
        cast = lambda x, ref: x.astype(ref.dtype)  # noqa: E731
        return (
            cast(dq, q), cast(dk, k), cast(dv, v), cast(dg, g), cast(dbeta, beta),
            None if s0 is None else ds0.astype(s0.dtype),
        )  # fmt: skip
    (w, u, qg, kd, aqk, lgc), vjp = jax.vjp(
        functools.partial(_stage1, st=st, dt=dt), q, k, v, g, beta
    )
    du, dw, dqg, dkd, daqk, dlgc, ds0 = _backward_seq(
        w, u, qg, kd, aqk, lgc, s0, do.astype(dt), dst.astype(F32), st, dt
    )
    cast = lambda x, ref: x.astype(ref.dtype)  # noqa: E731
    dq, dk, dv, dg, dbeta = vjp(
        (cast(dw, w), cast(du, u), cast(dqg, qg), cast(dkd, kd), cast(daqk, aqk), dlgc)
    )
    return dq, dk, dv, dg, dbeta, None if s0 is None else ds0.astype(s0.dtype)


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


# ----------------------------------------------------------------------------- public entry


def unsupported_reason(q_bthk, k_bthk, v_bthv, chunk_size) -> str | None:
    """Why the Pallas kernels cannot take these inputs (api.py's "auto" hook), or None."""
    if chunk_size not in (16, 32, 64):
        return f"chunk_size must be 16, 32 or 64 for the Pallas kernels, got {chunk_size}"
    for name, d in (("K", q_bthk.shape[-1]), ("V", v_bthv.shape[-1])):
        if d < 16 or d & (d - 1):
            return f"{name}={d} must be a power of two >= 16 for the Pallas kernels"
    if any(x.dtype == jnp.float64 for x in (q_bthk, k_bthk, v_bthv)):
        return "float64 inputs (the kernels compute in float32)"
    return None


def gated_delta_rule_pallas(
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
    interpret: bool | None = False,
    config: GDNPallasConfig | None = None,
    residuals: str = "auto",
):
    """Gated delta rule by Pallas kernels; returns (o_bthv in v's dtype, final state fp32 or None).

    Same semantics as reference.gated_delta_rule_reference. interpret=None picks interpret mode
    on CPU backends (config.default_interpret). config=None picks config.default_config of the
    operand dtype (bf16 when q, k and v all are), with its `residuals` replaced unless "auto"
    (config.config_with_residuals; only with config=None). Differentiable (custom_vjp) in all
    float inputs and the initial state.
    """
    if q_bthk.ndim != 4 or k_bthk.shape != q_bthk.shape or v_bthv.shape[:3] != q_bthk.shape[:3]:
        raise ValueError(
            f"expected q, k [B,T,H,K] and v [B,T,H,V]; got {q_bthk.shape}, "
            f"{k_bthk.shape}, {v_bthv.shape}"
        )
    b, t, h, kdim = q_bthk.shape
    vd = v_bthv.shape[-1]
    if g_bth.shape != (b, t, h) or beta_bth.shape != (b, t, h):
        raise ValueError(
            f"g and beta must be [B,T,H]={b, t, h}; got {g_bth.shape}, {beta_bth.shape}"
        )
    reason = unsupported_reason(q_bthk, k_bthk, v_bthv, chunk_size)
    if reason:
        raise ValueError(f"{reason}; use impl='chunked' for such inputs")
    if interpret is None:
        interpret = default_interpret()
    if config is None:
        config = config_with_residuals(_operand_dtype(q_bthk, k_bthk, v_bthv), residuals)
    elif residuals != "auto":
        raise ValueError("residuals is chosen by `config` when one is given; pass one or the other")
    st = _Static(
        chunk=chunk_size,
        scale=float(kdim**-0.5 if scale is None else scale),
        use_l2=bool(use_qk_l2norm),
        interpret=bool(interpret),
        cfg=config,
    )
    if initial_state_bhkv is None:
        s0 = None  # the kernels start from zero: no zeros array to fill and read
    else:
        if initial_state_bhkv.shape != (b, h, kdim, vd):
            raise ValueError(
                f"initial_state must be [B,H,K,V]={(b, h, kdim, vd)}, got "
                f"{initial_state_bhkv.shape}"
            )
        s0 = initial_state_bhkv.astype(F32)
    pad = (-t) % chunk_size
    q, k, v, g, beta = q_bthk, k_bthk, v_bthv, g_bth.astype(F32), beta_bth
    if pad:
        p4 = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, p4) for x in (q, k, v))
        g, beta = (jnp.pad(x, p4[:3]) for x in (g, beta))
    o, s_final = _gdn(q, k, v, g, beta, s0, st)
    if pad:
        o = o[:, :t]
    return o, (s_final if output_final_state else None)
