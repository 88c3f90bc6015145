"""y[N] = x[K] W[K, N] as one Pallas kernel (Triton lowering on GPUs; interpret mode on CPUs).

Letters: K rows of W (the contraction), N columns, BN columns per program, BK rows per load,
S segments of K.

Grid (N / BN, S): program (j, s) reads W's rows s K/S .. (s+1) K/S - 1 of columns
j BN .. j BN + BN - 1 in loads of [BK, BN], with the matching BK entries of x, and writes the
partial sums

    p[s, j BN + c] = sum_{r in segment s} x[r] W[r, j BN + c]          (float32)

so y = sum_s p[s] (one small XLA reduction, which XLA fuses into whatever follows). Splitting K
gives a 1536 x 1536 product 288 programs instead of 12, enough to keep every SM of an
H100/H200 loading (a matrix-vector product does 1 multiply-add per element read: it is bound by
the bandwidth, and that needs many loads in flight). The product is an elementwise multiply and
a column sum on the CUDA cores, not a tensor-core dot: with one row the tensor cores would
compute 15 padded rows for nothing, and the arithmetic is far below the load time either way.

x and W are read in their dtype and widened to float32; the result is float32 (api.py casts).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
_BLOCKS = (128, 64, 32, 16)  # candidate BN and BK: Triton's loads need powers of two


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch options (static, part of the jit cache key).

    programs: S is the least divisor of K / BK that gives (N / BN) * S at least this many
      programs (all of K / BK when none does): 2 per SM of an H100/H200's 132.
    block_n: the most columns per program (BN is the largest of 128, 64, 32, 16 up to this that
      divides N).
    block_k: the most rows per load (BK likewise, dividing K).
    warps: Triton warps per program.
    """

    programs: int = 264
    block_n: int = 128
    block_k: int = 64
    warps: int = 4

    def __post_init__(self):
        for name in ("programs", "block_n", "block_k", "warps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def plan(self, k: int, n: int) -> tuple[int, int, int] | None:
        """(BN, BK, S) for W [k, n], or None when no block divides k or n."""
        bn = next((b for b in _BLOCKS if b <= self.block_n and n % b == 0), None)
        bk = next((b for b in _BLOCKS if b <= self.block_k and k % b == 0), None)
        if bn is None or bk is None:
            return None
        steps = k // bk
        divisors = [s for s in range(1, steps + 1) if steps % s == 0]
        s = next((s for s in divisors if (n // bn) * s >= self.programs), steps)
        return bn, bk, s


def unsupported_reason(x_k, w_kn, config: GemvConfig | None = None) -> str | None:
    """Why the kernel cannot take these operands (api.py's "auto" asks), or None."""
    config = GemvConfig() if config is None else config
    if x_k.ndim != 1 or w_kn.ndim != 2 or x_k.shape[0] != w_kn.shape[0]:
        return f"shapes {x_k.shape} x {w_kn.shape} are not a vector [K] times a matrix [K, N]"
    if any(a.dtype == jnp.float64 for a in (x_k, w_kn)):
        return "float64 operands (the kernel sums in float32)"
    if config.plan(*w_kn.shape) is None:
        return f"W {w_kn.shape}: K and N must be multiples of {_BLOCKS[-1]}"
    return None


def _kernel(x_ref, w_ref, p_ref, *, bn, bk, segment):
    j, s = pl.program_id(0), pl.program_id(1)

    def step(i, acc_n):
        k0 = s * segment + i * bk
        x = x_ref[pl.ds(k0, bk)].astype(F32)  # [BK]
        w = w_ref[pl.ds(k0, bk), pl.ds(j * bn, bn)].astype(F32)  # [BK, BN]
        return acc_n + jnp.sum(x[:, None] * w, axis=0)

    p_ref[...] = lax.fori_loop(0, segment // bk, step, jnp.zeros((bn,), F32))


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def gemv_pallas(x_k, w_kn, *, interpret: bool = False, config: GemvConfig | None = None):
    """x [K] @ W [K, N] -> [N] float32 by the kernel (module docstring)."""
    config = GemvConfig() if config is None else config
    reason = unsupported_reason(x_k, w_kn, config)
    if reason:
        raise ValueError(f"{reason}; use impl='xla' for such operands")
    k, n = w_kn.shape
    bn, bk, s = config.plan(k, n)
    launch = {}
    if not interpret:
        launch = dict(compiler_params=plgpu.CompilerParams(num_warps=config.warps, num_stages=2))
    partial_sn = pl.pallas_call(
        functools.partial(_kernel, bn=bn, bk=bk, segment=k // s),
        grid=(n // bn, s),
        # x and W whole (each program loads its own slices), the partial sums in blocks
        in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((None, bn), lambda jj, ss: (ss, jj)),
        out_shape=jax.ShapeDtypeStruct((s, n), F32),
        interpret=interpret,
        name="gemv",
        **launch,
    )(x_k, w_kn)
    return jnp.sum(partial_sn, axis=0)
