"""Launch configuration of the TPU (Mosaic) Pallas gated-delta-rule kernels, and residual choices.

Letters: K key dim, V value dim, C chunk length, BV value block.

TPU tiling: the last two dims of every block are multiples of (8, 128) for float32 and (16, 128)
for bfloat16, or equal to the array's dims. The kernels' blocks are [C, K], [C, BV], [C, C],
[K, BV] and [1, C] (G and beta per chunk, as rows): C is a multiple of 16 (CHUNK_SIZES), K and
C are whole array dims, and BV is V itself or a multiple of 128 dividing V.
"""

from __future__ import annotations

import dataclasses

CHUNK_SIZES = (16, 32, 64, 128)
# Diagonal block of the in-kernel inverse (common.unit_lower_inverse): B - 1 + C / B + 1
# [C, C] dots, fewest at B = sqrt(C); 8 for C <= 64, and 8 or 16 tie at C = 128.
INVERSE_BLOCK = 8
LANES = 128  # TPU vector lanes: the last dim of a block is a multiple of it or the whole dim

# What the forward run under differentiation keeps for the backward (`residuals`; "auto" =
# "states"):
#   "inputs"  q, k, v, g, beta and the initial state: the backward reruns the forward kernel to
#             get the chunk-start states h and v'.
#   "states"  also h [B*H, NT * K, V] (fp32) and v' [B*H, T, V]: the backward skips that rerun.
RESIDUALS = ("inputs", "states")
DEFAULT_RESIDUALS = "states"


@dataclasses.dataclass(frozen=True)
class TPUConfig:
    """block_v: value block of every kernel (one program per (b*h, value block) runs the
    chunks in order); used as is when it divides V, else V must not exceed it (BV = V)."""

    block_v: int = 128

    def __post_init__(self):
        if self.block_v < LANES or self.block_v % LANES:
            raise ValueError(f"block_v must be a multiple of {LANES}, got {self.block_v}")

    def value_block(self, vdim: int) -> int:
        """BV for value dim V: V when V <= block_v, else block_v (which must divide V)."""
        if vdim <= self.block_v:
            return vdim
        if vdim % self.block_v:
            raise ValueError(f"V={vdim} must be a multiple of block_v={self.block_v} or <= it")
        return self.block_v


def resolve_residuals(residuals: str) -> str:
    """The RESIDUALS entry `residuals` names ("auto" = DEFAULT_RESIDUALS); ValueError otherwise."""
    if residuals == "auto":
        return DEFAULT_RESIDUALS
    if residuals not in RESIDUALS:
        raise ValueError(
            f"residuals must be 'auto' or one of {RESIDUALS} for the TPU kernels, got {residuals!r}"
        )
    return residuals
