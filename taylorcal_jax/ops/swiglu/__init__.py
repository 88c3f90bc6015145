"""A whole SwiGLU MLP for one decoding row as one kernel:

    y = (silu(r x W_g) * (r x W_u)) W_d

with the gate and up kernels joined as W_gu = [W_g | W_u] (models/joined.py) and r the row
scale of the RMSNorm folded into W_gu (1 where none is).

Why a kernel of its own: at batch 1 the MLP is the largest part of a decoding step (three quarters
of the Qwen2.5-1.5B-shaped teacher's weight bytes), and run as products it is four kernels per
layer: the joined gate-and-up product, a fusion that sums its partial sums and forms
silu(g) u, the down product, and the sum of that one's partial sums. Each of the short ones
costs a launch's latency while the memory is idle (1.6-1.9 us each on an H100,
launch/results/profile_steps_h100_decode_launches.md). Here each program owns a block of the
intermediate's columns from x to its share of the down product, so the kernel needs no other
program's result and leaves one sum over the blocks to XLA.

Entry: api.swiglu_mlp and api.runs_fused (the MLP module asks). Modules, each importing only
those above it:
  pallas_gpu  the kernel (Triton on GPUs, interpret mode on CPUs)
  api         the implementation choice ("auto" | "xla" | "pallas"), XLA's form, the backward
"""
