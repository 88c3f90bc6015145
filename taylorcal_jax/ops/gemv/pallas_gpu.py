"""y[M, N] = x[M, K] W[K, N] for few rows (1 <= M <= 16) as one Pallas kernel (Triton lowering
on GPUs; interpret mode on CPUs).

Letters: M rows of x (a decoding step's batch), K rows of W (the contraction), N columns, BN
columns per program, BK rows per load, S segments of K.

Grid (N / BN, S): program (j, s) reads W's rows s K/S .. (s+1) K/S - 1 of columns
j BN .. j BN + BN - 1 in loads of [BK, BN], with the matching BK columns of x, and writes the
partial sums

    p[s, m, j BN + c] = sum_{r in segment s} x[m, r] W[r, j BN + c]          (float32)

so y = sum_s p[s] (one small XLA reduction, which XLA may fuse into what follows). Splitting K
gives a 1536 x 1536 product 288 programs instead of 12, enough to keep every SM of an
H100/H200 loading: with few rows the product does M multiply-adds per element of W read, so it
is bound by the bandwidth, and that needs many loads in flight.
One row: an elementwise multiply and a column sum on the CUDA cores (the tensor cores would
compute 15 padded rows for nothing). 2 to 16 rows: x padded with zero rows to 16, the least M
of a tensor-core dot, and one dot per load (bf16 operands when both are bf16, else fp32 at
HIGHEST, as ops/pallas_dot.mm).

x and W are read in their dtype; the sums and the result are float32 (api.py casts).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from taylorcal_jax.ops.pallas_dot import mm

F32 = jnp.float32
_BLOCKS = (128, 64, 32, 16)  # candidate BN and BK: Triton's loads need powers of two
MAX_ROWS = 16  # the most rows of x; 2..16 rows are padded to 16, the tensor cores' least M


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch options (static, part of the jit cache key).

    block_n: the most columns per program (BN is the largest of 128, 64, 32, 16 up to this that
      divides N).
    block_k: the most rows per load (BK is the largest of those up to this that divides K and
      leaves (N / BN) (K / BK) >= min_programs, so that S can reach `min_programs`; the least
      dividing one when none does).
    programs: S is the least divisor of K / BK that gives (N / BN) S at least this many
      programs (all of K / BK when none does).
    warps: Triton warps per program.

    The defaults (1056 programs, BK up to 128, 8 warps; before: 264, 64, 4) put more bytes in
    flight per SM for the wide weights of a decoding step: with them the kernel took the
    Qwen2.5-1.5B-shaped batch-1 decoding steps at 16k to 0.87x (teacher) and 0.91x (student)
    of the time with XLA's products on one H200 (launch/results/probe_decode_h200_gemv_config
    .json), where with the earlier options it took them to 0.96x and 1.05x on one H100
    (launch/results/probe_decode_h100_fused_gemv.json). Alone, outside a model, the products
    are too short to rank launch options reliably (launch/bench_gemv.py; docs/kernel.md). The
    1536 x 1536 weight keeps BK 64 through `min_programs`: at BK 128 it would get 144 programs
    of one load each.
    """

    programs: int = 1056
    min_programs: int = 264
    block_n: int = 128
    block_k: int = 128
    warps: int = 8

    def __post_init__(self):
        for name in ("programs", "min_programs", "block_n", "block_k", "warps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def plan(self, k: int, n: int) -> tuple[int, int, int] | None:
        """(BN, BK, S) for W [k, n], or None when no block divides k or n."""
        bn = next((b for b in _BLOCKS if b <= self.block_n and n % b == 0), None)
        bks = [b for b in _BLOCKS if b <= self.block_k and k % b == 0]
        if bn is None or not bks:
            return None
        bk = next((b for b in bks if (n // bn) * (k // b) >= self.min_programs), bks[-1])
        steps = k // bk
        divisors = [s for s in range(1, steps + 1) if steps % s == 0]
        s = next((s for s in divisors if (n // bn) * s >= self.programs), steps)
        return bn, bk, s


def unsupported_reason(x_mk, w_kn, config: GemvConfig | None = None) -> str | None:
    """Why the kernel cannot take these operands (api.py's "auto" asks), or None."""
    config = GemvConfig() if config is None else config
    if x_mk.ndim != 2 or w_kn.ndim != 2 or x_mk.shape[1] != w_kn.shape[0]:
        return f"shapes {x_mk.shape} x {w_kn.shape} are not rows [M, K] times a matrix [K, N]"
    if not 1 <= x_mk.shape[0] <= MAX_ROWS:
        return f"{x_mk.shape[0]} rows (the kernel takes 1 to {MAX_ROWS})"
    if any(a.dtype == jnp.float64 for a in (x_mk, w_kn)):
        return "float64 operands (the kernel sums in float32)"
    if config.plan(*w_kn.shape) is None:
        return f"W {w_kn.shape}: K and N must be multiples of {_BLOCKS[-1]}"
    return None


def _kernel(x_ref, w_ref, p_ref, *, bn, bk, segment, dt):
    j, s = pl.program_id(0), pl.program_id(1)
    one_row = len(x_ref.shape) == 1

    def step(i, acc):
        k0 = s * segment + i * bk
        w = w_ref[pl.ds(k0, bk), pl.ds(j * bn, bn)]  # [BK, BN]
        if one_row:  # multiply and column sums on the CUDA cores
            x = x_ref[pl.ds(k0, bk)].astype(F32)  # [BK]
            return acc + jnp.sum(x[:, None] * w.astype(F32), axis=0)
        return acc + mm(x_ref[:, pl.ds(k0, bk)], w, 1, 0, dt)  # [16, BK] @ [BK, BN]

    zeros = jnp.zeros((bn,) if one_row else (MAX_ROWS, bn), F32)
    p_ref[...] = lax.fori_loop(0, segment // bk, step, zeros)


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def gemv_pallas(x_mk, w_kn, *, interpret: bool = False, config: GemvConfig | None = None):
    """x [M, K] @ W [K, N] -> [M, N] float32 by the kernel (module docstring), 1 <= M <= 16."""
    config = GemvConfig() if config is None else config
    reason = unsupported_reason(x_mk, w_kn, config)
    if reason:
        raise ValueError(f"{reason}; use impl='xla' for such operands")
    (m, k), n = x_mk.shape, w_kn.shape[1]
    bn, bk, s = config.plan(k, n)
    dt = jnp.bfloat16 if x_mk.dtype == w_kn.dtype == jnp.bfloat16 else F32
    if m == 1:
        x, p_block, p_shape = x_mk[0], (None, bn), (s, n)
        p_index = lambda jj, ss: (ss, jj)  # noqa: E731
    else:  # the tensor cores' least M is 16: zero rows pad the block
        x = jnp.pad(x_mk, ((0, MAX_ROWS - m), (0, 0)))
        p_block, p_shape = (None, MAX_ROWS, bn), (s, MAX_ROWS, n)
        p_index = lambda jj, ss: (ss, 0, jj)  # noqa: E731
    launch = {}
    if not interpret:
        launch = dict(compiler_params=plgpu.CompilerParams(num_warps=config.warps, num_stages=2))
    partial_s = pl.pallas_call(
        functools.partial(_kernel, bn=bn, bk=bk, segment=k // s, dt=dt),
        grid=(n // bn, s),
        # x and W whole (each program loads its own slices), the partial sums in blocks
        in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec(p_block, p_index),
        out_shape=jax.ShapeDtypeStruct(p_shape, F32),
        interpret=interpret,
        name="gemv",
        **launch,
    )(x, w_kn)
    return jnp.sum(partial_s, axis=0).reshape(-1, n)[:m]
