"""One row through a SwiGLU MLP, y = (silu(r x W_g) * (r x W_u)) W_d, as one Pallas kernel
(Triton lowering on GPUs; interpret mode on CPUs).

Letters: K the input width, F the intermediate width, N the output width, BF intermediate
columns per program, BK rows of W_gu per load, BN columns of W_d per load. W_gu = [W_g | W_u]
[K, 2F] (the joined kernel of models/joined.py), W_d [F, N], x [1, K], r the row scale.

Grid (F / BF,): program j owns the intermediate columns c = j BF .. j BF + BF - 1 and

  1. sums g = x W_g[:, c] and u = x W_u[:, c] over K, in loads of [BK, BF] of each half;
  2. forms h = silu(r g) (r u), rounded to the compute dtype (the unfused MLP feeds its down
     product the compute dtype too);
  3. writes its share of the down product, p[j] = h W_d[c, :] (float32), in loads of [BF, BN];

so y = sum_j p[j], one small XLA reduction (F / BF rows of N float32). Until that sum no
program needs another's result: the down product's sum over F is split along the same blocks
that the gate and up products' columns are. The kernel reads each weight once, as the products
do, and saves the launches between them.

x's row is padded with 15 zero rows to 16 as it is loaded, the least M of a tensor-core dot (a
pad outside the kernel would be a launch of its own), so that every load feeds a dot (Triton pipelines those: several loads in flight per program, which a bound on the
bandwidth needs with only F / BF programs); the padded rows stay zero through h, so p sums
them to nothing. The operand dtype of the dots is bf16 for bf16 weights, else fp32 at HIGHEST
(ops/pallas_dot.mm); sums, scale and silu are float32.
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
ROWS = 16  # x padded to the tensor cores' least M
_BLOCKS = (256, 128, 64, 32, 16)  # candidate BF, BK, BN: Triton's loads need powers of two


@dataclasses.dataclass(frozen=True)
class SwigluConfig:
    """Launch options (static, part of the jit cache key): the most intermediate columns per
    program (BF, the largest of _BLOCKS up to it dividing F), the most rows of W_gu per load
    (BK, likewise dividing K), the most columns of W_d per load (BN, dividing N), Triton warps
    and pipeline stages per program.

    BF 32 gives the Qwen2.5-1.5B MLP (F = 8960) 280 programs, about two per SM of an H100 or
    H200, each reading 294 kB of weights."""

    block_f: int = 32
    block_k: int = 128
    block_n: int = 256
    warps: int = 4
    stages: int = 3

    def __post_init__(self):
        for name in ("block_f", "block_k", "block_n", "warps", "stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def plan(self, k: int, f: int, n: int) -> tuple[int, int, int] | None:
        """(BF, BK, BN) for those widths, or None when no block divides one of them."""
        blocks = []
        for most, width in ((self.block_f, f), (self.block_k, k), (self.block_n, n)):
            block = next((b for b in _BLOCKS if b <= most and width % b == 0), None)
            if block is None:
                return None
            blocks.append(block)
        return tuple(blocks)


def unsupported_reason(x_mk, w_gu, w_d, config: SwigluConfig | None = None) -> str | None:
    """Why the kernel cannot take these operands (api.py asks), or None."""
    config = SwigluConfig() if config is None else config
    if x_mk.ndim != 2 or w_gu.ndim != 2 or w_d.ndim != 2:
        return f"shapes {x_mk.shape}, {w_gu.shape}, {w_d.shape} are not x [M, K], W_gu, W_d"
    (m, k), (k_gu, f2), (f, n) = x_mk.shape, w_gu.shape, w_d.shape
    if k_gu != k or f2 != 2 * f:
        return f"W_gu {w_gu.shape} is not [K, 2F] for x {x_mk.shape} and W_d {w_d.shape}"
    if m != 1:
        return f"{m} rows (the kernel takes one)"
    if any(a.dtype == jnp.float64 for a in (x_mk, w_gu, w_d)):
        return "float64 operands (the kernel sums in float32)"
    if config.plan(k, f, n) is None:
        return f"K={k}, F={f}, N={n} must be multiples of {_BLOCKS[-1]}"
    return None


def _kernel(x_ref, r_ref, w_gu_ref, w_d_ref, p_ref, *, f, bf, bk, bn, dt):
    j = pl.program_id(0)
    k, n = x_ref.shape[1], w_d_ref.shape[1]
    gate_cols = pl.ds(pl.multiple_of(j * bf, bf), bf)
    up_cols = pl.ds(pl.multiple_of(f + j * bf, bf), bf)

    first_row = lax.broadcasted_iota(jnp.int32, (ROWS, bk), 0) == 0

    def gate_and_up(i, sums):
        rows = pl.ds(pl.multiple_of(i * bk, bk), bk)
        x = jnp.where(first_row, jnp.broadcast_to(x_ref[:, rows], (ROWS, bk)), 0)  # [16, BK]
        g = mm(x, w_gu_ref[rows, gate_cols], 1, 0, dt)  # [16, BF]
        u = mm(x, w_gu_ref[rows, up_cols], 1, 0, dt)
        return sums[0] + g, sums[1] + u

    zeros = jnp.zeros((ROWS, bf), F32)
    g, u = lax.fori_loop(0, k // bk, gate_and_up, (zeros, zeros))
    r = r_ref[...][:, None]  # [1, 1]
    g, u = r * g, r * u
    h = (g / (1.0 + jnp.exp(-g)) * u).astype(dt)  # silu(g) u, [16, BF]

    def down(c, carry):
        cols = pl.ds(pl.multiple_of(c * bn, bn), bn)
        y = mm(h, w_d_ref[gate_cols, cols], 1, 0, dt)  # [16, BN]
        p_ref[cols] = jnp.sum(y, axis=0)  # the padded rows of y are zero
        return carry

    lax.fori_loop(0, n // bn, down, 0)


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def swiglu_mlp_pallas(
    x_mk, r_m1, w_gu, w_d, *, interpret: bool = False, config: SwigluConfig | None = None
):
    """y [1, N] float32 = (silu(r x W_g) * (r x W_u)) W_d by the kernel (module docstring);
    x [1, K], r [1, 1] float32, W_gu [K, 2F], W_d [F, N]."""
    config = SwigluConfig() if config is None else config
    reason = unsupported_reason(x_mk, w_gu, w_d, config)
    if reason:
        raise ValueError(f"{reason}; use impl='xla' for such operands")
    (_, k), (f, n) = x_mk.shape, w_d.shape
    bf, bk, bn = config.plan(k, f, n)
    dt = jnp.bfloat16 if x_mk.dtype == w_gu.dtype == w_d.dtype == jnp.bfloat16 else F32
    r = jnp.asarray(r_m1, F32).reshape(1)
    launch = {}
    if not interpret:
        launch = dict(
            compiler_params=plgpu.CompilerParams(num_warps=config.warps, num_stages=config.stages)
        )
    whole = pl.BlockSpec(memory_space=pl.ANY)  # each program loads its own slices
    partial_jn = pl.pallas_call(
        functools.partial(_kernel, f=f, bf=bf, bk=bk, bn=bn, dt=dt),
        grid=(f // bf,),
        in_specs=[whole, pl.BlockSpec((1,), lambda j: (0,)), whole, whole],
        out_specs=pl.BlockSpec((None, n), lambda j: (j, 0)),
        out_shape=jax.ShapeDtypeStruct((f // bf, n), F32),
        interpret=interpret,
        name="swiglu_mlp",
        **launch,
    )(x_mk, r, w_gu, w_d)
    return jnp.sum(partial_jn, axis=0)[None, :]
