"""Helpers shared by the Pallas gated-delta-rule kernels: options, masks, loops, launch.

Letters: T time (Tp padded to a multiple of C), K key dim, V value dim, C chunk length,
BV value block.

Within a chunk, G = cumsum g and Gamma_ij = exp(G_i - G_j) is formed only where i >= j (masked
before the exp: exp(G_i - G_j) with i < j can overflow). The kernels' dots are
taylorcal_jax.ops.pallas_dot.mm.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn.call_options import Static
from taylorcal_jax.ops.gdn.reference import L2_EPS

F32 = jnp.float32


def rnorm(x, use_l2=True):
    """1 / |x| per row ([C]) of a [C, D] tile, in fp32, as reference.l2_normalize scales by;
    ones without the L2 norm (use_l2 False)."""
    if not use_l2:
        return jnp.ones(x.shape[:1], F32)
    xf = x.astype(F32)
    return lax.rsqrt(jnp.sum(xf * xf, axis=-1) + L2_EPS)


def iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def gamma(gg, mask):
    """Gamma [C, C]: exp(G_i - G_j) where mask (i >= j or i > j), 1 elsewhere; masked before the
    exp, so that no exp(G_i - G_j) with i < j (which can overflow) is ever formed."""
    return jnp.exp(jnp.where(mask, gg[:, None] - gg[None, :], 0.0))


def last(x, c):
    """x[C-1] of a [C] vector without value slicing."""
    return jnp.sum(jnp.where(iota((c,), 0) == c - 1, x, 0.0))


def chunk_rows(i, c):
    """Rows [i C, (i + 1) C) of a [Tp, ...] ref, marked aligned when i is traced (the marker does
    not lower for a Python int, as chunk_loop's first load has)."""
    return pl.ds(i * c if isinstance(i, int) else pl.multiple_of(i * c, c), c)


def chunk_end(ref, i, c):
    """ref[i * C + C - 1] (G_C of chunk i) as a [1] value, by a one-element load. The sequential
    kernels use it in place of `last` over the chunk's [C] rows: there a block-wide reduction
    (shared memory and a barrier) would sit on the loop carry's path every step."""
    return ref[pl.ds(i * c + c - 1, 1)]


def chunk_end_decay(ref, i, c):
    """exp(G_C) of chunk i as a [1, 1] value (chunk_end)."""
    return jnp.exp(chunk_end(ref, i, c))[:, None]


def chunk_loop(nt, load, step, init, prefetch: bool, reverse: bool = False):
    """carry = step(i, load(i), carry) over the chunks i = 0 .. nt-1 (nt-1 .. 0 with reverse).

    `load(i)` reads chunk i's tiles from the refs (a tuple); `step` does the rest. With prefetch,
    chunk i+1's loads are issued at the top of chunk i's step and handed on in the loop carry, so
    their memory latency overlaps chunk i's products. Without it, Triton's own pipelining of the
    loop issues the next chunk's copies after this chunk's last use of their buffers, i.e. at the
    end of the step, and waits for them at the top of the next one, so with one program per SM
    the latency sits between the steps. The carried tiles cost registers, hence seq_launch's
    rule. The last step's prefetch re-reads its own chunk (clamped index) and is dropped."""
    chunk = (lambda n: nt - 1 - n) if reverse else (lambda n: n)
    if not prefetch:
        return lax.fori_loop(0, nt, lambda n, s: step(chunk(n), load(chunk(n)), s), init)

    def body(n, carry):
        s, tiles = carry
        nxt = load(chunk(jnp.minimum(n + 1, nt - 1)))
        return step(chunk(n), tiles, s), nxt

    return lax.fori_loop(0, nt, body, (init, load(chunk(0))))[0]


class SeqSpecs(NamedTuple):
    """BlockSpecs of a sequential pass: one program per (V-block j, b, h) over all Tp rows, or,
    segmented, per (V-block j, segment s, b, h) over the rows of segment s."""

    k: pl.BlockSpec  # its [rows, K] of a [B, Tp, H, K] operand
    c: pl.BlockSpec  # its [rows, C] of a [B, Tp, H, C] operand
    v: pl.BlockSpec  # its [rows, BV] (V-block j) of a [B, Tp, H, V] operand
    t: pl.BlockSpec  # its [rows] of a [B, Tp, H] operand
    hs: pl.BlockSpec  # its chunk-start states [rows / C * K, BV] of [B, H, NT * K, V]
    state: pl.BlockSpec  # its [K, BV] of a state [B, H, K, V] ([B, H, NSEG, K, V] segmented)


def seq_specs(rows: int, c: int, kdim: int, bv: int, segmented: bool = False) -> SeqSpecs:
    """SeqSpecs of programs over `rows` rows each: Tp, or a segment's NSC * C when segmented."""

    def spec(block, index):
        # index(j, s, b, h) -> block indices; the unsegmented grid (j, b, h) is segment 0
        if segmented:
            return pl.BlockSpec(block, index)
        return pl.BlockSpec(block, lambda j, bb, hh: index(j, 0, bb, hh))

    if segmented:
        state = spec((None, None, None, kdim, bv), lambda j, s, bb, hh: (bb, hh, s, 0, j))
    else:
        state = spec((None, None, kdim, bv), lambda j, s, bb, hh: (bb, hh, 0, j))
    return SeqSpecs(
        k=spec((None, rows, None, kdim), lambda j, s, bb, hh: (bb, s, hh, 0)),
        c=spec((None, rows, None, c), lambda j, s, bb, hh: (bb, s, hh, 0)),
        v=spec((None, rows, None, bv), lambda j, s, bb, hh: (bb, s, hh, j)),
        t=spec((None, rows, None), lambda j, s, bb, hh: (bb, s, hh)),
        hs=spec((None, None, rows // c * kdim, bv), lambda j, s, bb, hh: (bb, hh, s, j)),
        state=state,
    )


def with_s0(specs, args, s0, state_spec):
    """(in_specs, operands) with the initial state (BlockSpec state_spec) appended when there is
    one. Without one (s0 None) the sequential kernels start from zero and no zeros array is made
    or read."""
    if s0 is None:
        return specs, args
    return specs + [state_spec], args + [s0]


def start_state(refs, has_s0, shape):
    """(the loop's starting state, the remaining refs) of a kernel with an optional s0 ref."""
    if has_s0:
        return refs[0][...].astype(F32), refs[1:]
    return jnp.zeros(shape, F32), refs


def launch(name: str, st: Static, warps: int, dt, bwd: bool = False) -> dict:
    """pallas_call's `name` and `compiler_params` for one kernel: Triton warps, and pipelining
    depth 1 for fp32 operands (fp32 tiles at depth 2 overflow the shared memory of an H100),
    else the config's stages (forward kernels) or stages_bwd (backward kernels)."""
    if st.interpret:
        return dict(name=name)
    from jax.experimental.pallas import triton as plgpu

    stages = 1 if dt == F32 else (st.cfg.stages_bwd if bwd else st.cfg.stages)
    return dict(name=name, compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))


def seq_launch(name: str, st: Static, programs: int, dt, bwd: bool = False):
    """(prefetch, launch options) of a sequential kernel with `programs` programs: the bfloat16
    path's chunk_loop prefetch, at config.warps_prefetch warps, where the grid fits one wave
    (programs <= config.prefetch_programs: one program per SM, nothing else to hide the loads'
    latency); config.warps and Triton's pipelining otherwise."""
    cfg = st.cfg
    if cfg.path == "bfloat16" and cfg.prefetch_programs and programs <= cfg.prefetch_programs:
        return True, launch(name, st, cfg.warps_prefetch, dt, bwd)
    return False, launch(name, st, cfg.warps, dt, bwd)
