"""Launch configuration of the Pallas gated-delta-rule kernels: one kernel path per operand dtype.

Letters: B batch, T time, H heads, K key dim, V value dim, C chunk length, BV value block,
NT = T / C chunks.

Two paths (composed in forward.py and backward.py; docs/kernel.md describes both):

  float32   kernel 1 by 16 x 16 blocks; the state pass writing the chunk-start states h and v';
            the output kernel. Backward: the chunk-local map recomputed in XLA and differentiated
            by jax.vjp, the state pass again, one reverse kernel per value block writing partial
            gradients. The forward keeps the inputs only. Takes float32 operands.
  bfloat16  kernel 1 in flash-linear-attention's layout with the norms applied after the dots. A
            forward outside differentiation runs the fused sequential pass (o written directly);
            under differentiation the state pass (forming kd itself where unsegmented) and the
            output kernel, keeping T, G and, with residuals "states", h and v'. Backward: w, u,
            kd, qg, aqk formed from T; the reverse recurrence (dS only) and a chunk-parallel
            gradient kernel; the closed-form chunk-local backward as two kernels. Sequential
            passes split the sequence into segments where their grid is small and prefetch the
            next chunk's tiles where it fits one wave. Takes bfloat16 operands, or float32 ones
            (exact dots: how the tests check this path against the fp64 loop).

The configuration of a path is its launch options: block sizes, warps, pipelining depths and
the program-count thresholds of the rules above. The field defaults are the configurations
measured fastest on an H100 (docs/kernel.md). Every field is static (part of the jit cache key).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

# What the forward run under differentiation keeps for the backward (gated_delta_rule_pallas's
# `residuals`; "auto" = the path's default):
#   "inputs"  q, k, v, g, beta and the initial state: the backward reruns kernel 1 (the [C, C]
#             inverse T included) and the state pass.
#   "t"       also T (in the operand dtype) and G, [B, T, H, C] more: the backward forms w, u, kd,
#             qg, aqk from T by one chunk-parallel kernel instead of inverting again.
#   "states"  also the chunk-start states h and v', [B, H, NT * K, V] + [B, T, H, V] more: the
#             backward skips the state pass too.
RESIDUALS = ("inputs", "t", "states")


def _check_power_of_two(name: str, value: int, least: int) -> None:
    if value < least or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {least}, got {value}")


@dataclasses.dataclass(frozen=True)
class F32Config:
    """The float32 path's launch options.

    block_v: value block of the sequential kernels (one program per (V-block, b, h)).
    warps: Triton warps of every kernel. Pipelining depth 1 throughout (fp32 tiles at depth 2
      overflow the shared memory of an H100).
    """

    path: ClassVar[str] = "float32"
    residuals: ClassVar[tuple[str, ...]] = ("inputs",)  # the XLA vjp recomputes everything else
    default_residuals: ClassVar[str] = "inputs"

    block_v: int = 64
    warps: int = 4

    def __post_init__(self):
        _check_power_of_two("block_v", self.block_v, 16)
        _check_power_of_two("warps", self.warps, 1)


@dataclasses.dataclass(frozen=True)
class BF16Config:
    """The bfloat16 path's launch options.

    block_v: value block of the sequential kernels (one program per (V-block, b, h)).
    warps: Triton warps of kernel 1, the output kernel and the sequential kernels (state pass,
      fused pass, reverse recurrence, and their segment-end kernels).
    warps_bwd_chunk: of the chunk-parallel backward kernels (w, u, kd, qg, aqk from T; the
      reverse gradients; the WY part and the q/k/g part of the chunk-local backward).
    stages / stages_bwd: Triton pipelining depth of the forward / backward kernels with bf16
      operands (float32 operands run at depth 1).
    fused_programs: the fused pass halves its value block (from block_v, down to 16) while its
      grid has fewer programs than this (output.fused_block_v).
    prefetch_programs / warps_prefetch: a sequential kernel whose grid has at most
      prefetch_programs programs (one wave, one program per SM) loads chunk i+1's tiles at the
      top of chunk i's step and carries them in registers (common.chunk_loop), at
      warps_prefetch warps; 0 = never.
    segment_programs: the state pass and the reverse recurrence split the sequence into NSEG
      segments, NSEG the largest divisor of NT <= segment_programs / programs (about one program
      per SM; segments.num_state_segments); 0 = never.
    """

    path: ClassVar[str] = "bfloat16"
    residuals: ClassVar[tuple[str, ...]] = RESIDUALS
    default_residuals: ClassVar[str] = "states"  # the fastest backward

    block_v: int = 64
    warps: int = 4
    warps_bwd_chunk: int = 8
    warps_prefetch: int = 8
    stages: int = 2
    stages_bwd: int = 1
    fused_programs: int = 256
    prefetch_programs: int = 128
    segment_programs: int = 128

    def __post_init__(self):
        _check_power_of_two("block_v", self.block_v, 16)
        for name in ("warps", "warps_bwd_chunk", "warps_prefetch"):
            _check_power_of_two(name, getattr(self, name), 1)
        for name in ("stages", "stages_bwd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("fused_programs", "prefetch_programs", "segment_programs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


GDNPallasConfig = F32Config | BF16Config


SMALL_HEAD_DIM = 64  # heads of at most this K and V take BF16_SMALL_HEADS
# The chunk-parallel backward kernels work on [C, K] and [C, V] tiles; at K = V = 64 eight warps
# are too many for them: on one H100 at SmolLM2-135M's stage-2 shape (24 x 2048 x 9 x 64) four
# took the forward + backward from 2.121 to 1.759 ms (launch/results/gdn_kernel_d64_*.json),
# while at K = V = 128 eight stay the fastest (docs/kernel.md).
BF16_SMALL_HEADS = BF16Config(warps_bwd_chunk=4)


def default_config(operand_dtype, key_dim: int, value_dim: int) -> GDNPallasConfig:
    """F32Config() for float32 operands; for bfloat16 ones BF16Config(), or BF16_SMALL_HEADS
    where K and V are at most SMALL_HEAD_DIM."""
    if operand_dtype != jnp.bfloat16:
        return F32Config()
    small = max(key_dim, value_dim) <= SMALL_HEAD_DIM
    return BF16_SMALL_HEADS if small else BF16Config()


def resolve_residuals(config: GDNPallasConfig, residuals: str) -> str:
    """The RESIDUALS entry that `residuals` names for this path ("auto" = its default_residuals);
    raises ValueError saying which the path takes."""
    if residuals == "auto":
        return config.default_residuals
    if residuals not in RESIDUALS:
        raise ValueError(f"residuals must be 'auto' or one of {RESIDUALS}, got {residuals!r}")
    if residuals not in config.residuals:
        raise ValueError(
            f"residuals={residuals!r} feeds the closed-form backward of the bfloat16 path; the "
            f"{config.path} path keeps {', '.join(config.residuals)} only (or 'auto')"
        )
    return residuals
