"""Frozen block-size configuration of the Pallas gated-delta-rule kernels (pallas_gpu.py).

Letters: B batch, T time, H heads, K key dim, V value dim, C chunk length, BV value block.

Every field is static (part of the jit cache key). Sizes must be powers of two (Triton): C in
{16, 32, 64}, BV divides V. `interpret=True` runs the kernels through Pallas' interpreter (CPU
tests); it is also switched on by the environment variable TAYLORCAL_PALLAS_INTERPRET=1.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class GDNPallasConfig:
    """Block sizes and launch options.

    forward: "fused" = two kernels (chunk-parallel w/u; sequential pass writing o and the state);
      "split" = three (chunk-parallel w/u/kd; sequential pass writing chunk-start states h and v';
      chunk-parallel output o = s (q exp(G)) h + aqk v'), as flash-linear-attention does.
    backward: chunk-local part of the backward: "xla" = recompute + jax.vjp in XLA (compiled and
      checked on an H100); "analytic" = the closed-form chunk-local backward in XLA
      (chunk_local_bwd.py) from T written by kernel 1; "pallas" = the same closed form as two
      chunk-parallel Pallas kernels (pallas_gpu_bwd.py: the WY part, then the q/k/g part), also
      from kernel 1's T. "analytic" and "pallas" need chunk_kernel "fla" (the body that writes T).
    chunk_kernel: kernel 1 body: "keep" (16 x 16 blocks of k, beta exp(G) k, beta v held in
      registers; 1.10 ms on an H100 at 8 x 4096 x 16 x 128) or "fla" (flash-linear-attention's
      layout: full [C, C] T, w and u as full C-row dots; pallas_gpu_chunk.py; 0.75 ms there).
    t_precision: precision of the [C, C] fp32 products that build T in the "fla" kernel for
      16-bit inputs: "bf16x3" (three bf16 passes, ~1e-5; compiled for sm_90 outside XLA: 212
      registers, no spills), "tf32x3" (three TF32 passes, ~1e-6; spills 1.2 KB there) or "tf32"
      (one pass, ~3e-4; 194 registers). fp32 inputs use f32_precision; interpret mode, HIGHEST.
    reverse: sequential part of the backward: "fused" (one reverse kernel per V-block doing every
      product and writing fp32 partial gradients per V-block; GPU-timed) or "split" (a reverse
      kernel that keeps only the dS recurrence and writes dS per chunk, then a chunk-parallel
      kernel over all of V for dw, dqg, dkd, daqk; pallas_gpu_reverse.py; in BF16_DEFAULT).
    state_segments: split the sequence into segments for the state pass and, with reverse =
      "split", the reverse pass (a segment's end state is affine in its start state;
      pallas_gpu_segments.py): 1 = off (GPU-timed), n > 1 = at most n segments, 0 = automatic
      (about one program per SM, so only small B * H is split). Needs K to be a multiple of the
      value block. In BF16_DEFAULT (0).
    block_v: value-dim block of the sequential kernels (one program per (V-block, b, h)).
    warps_chunk / warps_seq / warps_bwd / warps_out / warps_bwd_chunk / warps_bwd_qk /
      warps_bwd_grads: Triton warps of kernel 1, the sequential forward (and segment) kernels, the
      sequential backward kernels, the split output kernel (and the backward's qg/aqk kernel),
      backward="pallas"'s WY kernel and its q/k/g kernel, and the split reverse's chunk-parallel
      kernel.
    stages / stages_bwd / stages_f32: Triton software-pipelining depth for bf16 forward kernels,
      bf16 backward kernels, and all float32 kernels (fp32 tiles at depth 2 overflow the 227 KB of
      shared memory, seen on an H100). Compiled for sm_90 outside XLA, the reverse kernel needs
      208 KB of shared memory at depth 2 (one program per SM) and 80 KB at depth 1.
    f32_precision: dot precision used when the inputs are float32 ("highest" = exact fp32;
      "tf32x3" = three TF32 passes, about 1e-6 relative, faster). bf16 inputs always use bf16
      operands with float32 accumulation.
    residuals: what the forward keeps for the backward (backward "analytic" or "pallas" only):
      "inputs" = q, k, v, g, beta and the initial state, and the backward re-runs kernel 1 (the
      [C, C] inverse T included) and the state pass; "t" = also T (in the operand dtype) and G,
      so the backward forms w, u, kd, qg, aqk from T by one chunk-parallel kernel
      (pallas_gpu_bwd.prep_call) instead of inverting again: +[B, T, H, C] of memory;
      "states" = also the chunk-start states h and v' of the split forward, so the backward skips
      the state pass too: +[B, H, T/C * K, V] + [B, T, H, V] of memory, like FLA's h if it were
      kept. Only the forward run under differentiation keeps them.
    kd_in_states: split forward: the state pass applies kd = l2(k) exp(G_C - G) itself, from k
      and G (as kd^T v' = k^T (r v'), r = exp(G_C - G) / |k| per row), so kernel 1 does not write
      kd ([B, T, H, K] in the operand dtype, about a fifth of kernel 1's bytes). Only where the
      pass runs unsegmented; with segments kernel 1 still writes kd, which the segment-end kernel
      reads (pallas_gpu._state_pass_unsegmented).
    fused_primal: split forward: where nothing is kept for a backward (the forward run outside
      differentiation, or with residuals "inputs") and the state pass would run unsegmented, run
      the fused sequential pass instead (o written directly; no h or v' in memory).
    fused_programs: the fused pass halves its value block (from block_v, down to 16) while its
      grid has fewer programs than this (pallas_gpu.fused_block_v); 0 = block_v as it is.
    prefetch_programs / warps_prefetch: a sequential kernel (state pass, split reverse pass, and
      their segmented forms) whose grid has at most prefetch_programs programs (one wave: one
      program per SM) loads chunk i+1's tiles at the top of chunk i's step and carries them in
      registers (pallas_gpu.chunk_loop), at warps_prefetch warps (the carried tiles spill at 4);
      0 = never. Larger grids keep Triton's pipelining, where the other resident program hides
      the latency.
    norm_after_dot: kernel 1 ("fla") and the split output kernel give q and k to their dots as
      loaded and apply the L2 norms, s, beta and the decays to the dot results ([C, C] or [C, V]
      tiles) instead of to [C, K] fp32 copies of q and k: kk = diag(r) (k k^T) diag(r),
      w = (T diag(beta exp(G) r)) k, o = diag(s r_q exp(G)) (q S) + ... .
    """

    forward: str = "split"
    backward: str = "xla"
    chunk_kernel: str = "keep"
    reverse: str = "fused"
    state_segments: int = 1
    block_v: int = 64
    warps_chunk: int = 4
    warps_seq: int = 4
    warps_bwd: int = 4
    warps_out: int = 4
    warps_bwd_chunk: int = 8
    warps_bwd_qk: int = 8
    warps_bwd_grads: int = 8
    stages: int = 2
    stages_bwd: int = 2
    stages_f32: int = 1
    f32_precision: str = "highest"
    t_precision: str = "bf16x3"
    residuals: str = "inputs"
    kd_in_states: bool = False
    fused_primal: bool = False
    fused_programs: int = 0
    prefetch_programs: int = 0
    warps_prefetch: int = 8
    norm_after_dot: bool = False

    def __post_init__(self):
        if self.block_v & (self.block_v - 1) or self.block_v < 16:
            raise ValueError(f"block_v must be a power of two >= 16, got {self.block_v}")
        if self.fused_programs < 0:
            raise ValueError(f"fused_programs must be >= 0, got {self.fused_programs}")
        if self.prefetch_programs < 0:
            raise ValueError(f"prefetch_programs must be >= 0, got {self.prefetch_programs}")
        if self.forward not in ("fused", "split"):
            raise ValueError(f"forward must be 'fused' or 'split', got {self.forward!r}")
        if self.chunk_kernel not in ("keep", "fla"):
            raise ValueError(f"chunk_kernel must be 'keep' or 'fla', got {self.chunk_kernel!r}")
        if self.t_precision not in ("tf32x3", "bf16x3", "tf32"):
            raise ValueError(
                f"t_precision must be 'tf32x3', 'bf16x3' or 'tf32', got {self.t_precision!r}"
            )
        if self.state_segments < 0:
            raise ValueError(f"state_segments must be >= 0, got {self.state_segments}")
        if self.reverse not in ("fused", "split"):
            raise ValueError(f"reverse must be 'fused' or 'split', got {self.reverse!r}")
        if self.backward not in ("xla", "pallas", "analytic"):
            raise ValueError(
                f"backward must be 'xla', 'pallas' or 'analytic', got {self.backward!r}"
            )
        if self.backward in ("analytic", "pallas") and self.chunk_kernel == "keep":
            raise ValueError(
                f"backward={self.backward!r} reads T from kernel 1, which only chunk_kernel "
                f"'fla' writes; got chunk_kernel={self.chunk_kernel!r}"
            )
        if self.residuals not in ("inputs", "t", "states"):
            raise ValueError(f"residuals must be 'inputs', 't' or 'states', got {self.residuals!r}")
        if self.residuals != "inputs" and self.backward not in ("analytic", "pallas"):
            raise ValueError(
                f"residuals={self.residuals!r} feeds the closed-form backward; it needs "
                f"backward='analytic' or 'pallas', got backward={self.backward!r}"
            )
        if self.kd_in_states and self.forward != "split":
            raise ValueError("kd_in_states is an option of the split forward's state pass")
        if self.residuals == "states" and self.forward != "split":
            raise ValueError(
                "residuals='states' keeps the chunk-start states of the split forward; it needs "
                f"forward='split', got forward={self.forward!r}"
            )
        if self.f32_precision not in ("highest", "tf32x3"):
            raise ValueError(
                f"f32_precision must be 'highest' or 'tf32x3', got {self.f32_precision!r}"
            )


DEFAULT_CONFIG = GDNPallasConfig()  # the field defaults: the first GPU-checked configuration

# What gated_delta_rule_pallas runs when no config is given, by operand dtype.
# 16-bit inputs: the fastest configuration measured on an H100 (launch/results/gdn_kernel_h100.json,
# bench candidate "s5": kernel 1 in FLA's layout with one-pass TF32 products for T and the norms
# applied after the dots, the state pass applying kd itself, split and segmented reverse at 4
# warps, the closed-form chunk-local backward as two Pallas kernels, bf16 cotangent intermediates,
# the forward under differentiation keeping T, h and v' for the backward, the fused pass for a
# forward that keeps nothing, and the next chunk's tiles prefetched by one-wave sequential
# kernels). Session 5's sweeps, same process (gdn_sweep_h100_s5_*.json): the fused primal took the
# forward at 8 x 4096 x 16 x 128 from 1.16 to 0.96 ms and at 4 x 8192 x 16 x 128 from 1.26 to
# 1.11 ms; the norms after the dots took 15-25 us off the forward and 33-57 us off forward +
# backward; the prefetch 93-107 us off forward + backward at rows with one program per SM.
BF16_DEFAULT = GDNPallasConfig(
    backward="pallas",
    chunk_kernel="fla",
    reverse="split",
    state_segments=0,
    stages_bwd=1,
    warps_bwd=4,
    residuals="states",
    t_precision="tf32",
    kd_in_states=True,
    norm_after_dot=True,
    fused_primal=True,
    fused_programs=256,
    prefetch_programs=128,
)
# float32 inputs: DEFAULT_CONFIG, the configuration whose fp32 forward and gradients were compiled
# and checked on an H100 (exact to 6e-7); BF16_DEFAULT's fp32 path is checked in interpret mode
# only (its GPU test did not finish within the time it was given).
F32_DEFAULT = DEFAULT_CONFIG


def default_config(operand_dtype) -> GDNPallasConfig:
    """BF16_DEFAULT for bfloat16 operands, F32_DEFAULT otherwise (see above)."""
    import jax.numpy as jnp

    return BF16_DEFAULT if operand_dtype == jnp.bfloat16 else F32_DEFAULT


def config_with_residuals(operand_dtype, residuals: str = "auto") -> GDNPallasConfig:
    """default_config(operand_dtype) with `residuals` ("auto" = as it is). The fp32 default's
    backward recomputes through jax.vjp and keeps only the inputs, so there anything but "inputs"
    is an error."""
    cfg = default_config(operand_dtype)
    if residuals == "auto" or residuals == cfg.residuals:
        return cfg
    if residuals != "inputs" and cfg.backward not in ("analytic", "pallas"):
        raise ValueError(
            f"pallas residuals={residuals!r} needs the closed-form backward of the bf16 default; "
            f"the default for {np.dtype(operand_dtype).name} inputs keeps the inputs only ('auto' "
            "or 'inputs')"
        )
    return dataclasses.replace(cfg, residuals=residuals)


def default_interpret() -> bool:
    """Interpret on the CPU or when asked to by the environment; compile for GPUs otherwise."""
    if os.environ.get("TAYLORCAL_PALLAS_INTERPRET", "0") == "1":
        return True
    return jax.default_backend() == "cpu"
