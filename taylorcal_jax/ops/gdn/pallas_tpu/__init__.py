"""The chunked gated delta rule as Pallas kernels for TPUs (Mosaic; the TPU interpreter on CPUs).

Entry: op.gated_delta_rule_pallas_tpu (api.gated_delta_rule's impl="pallas" or "auto" on a TPU
backend). Design and expected cost: docs/kernel_tpu.md.

Modules, each importing only those above it:
  config   the value block, chunk sizes, the inverse's block, residual choices
  common   static options, dots, masks, the in-kernel [C, C] inverse, pallas_call options
  forward  the forward kernel: chunks in order, S in VMEM, o (and h, v' for the backward)
  local    the chunk-local map in XLA (differentiated by jax.vjp in the backward)
  reverse  the reverse kernel: chunks last to first, dS in VMEM
  op       the custom_vjp and the public entry
"""
