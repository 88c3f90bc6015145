"""The chunked gated delta rule as Pallas kernels (Triton lowering on GPUs; interpret mode on CPUs).

Entry: op.gated_delta_rule_pallas (api.gated_delta_rule's impl="pallas"). Design, measurements
and how to benchmark and test: docs/kernel.md.

Modules, each importing only those above it:
  config          launch options of the two kernel paths (float32, bfloat16); residual choices
  common          static options, dots, masks, the chunk loop, launch options
  chunk           kernel 1: the chunk-local WY form (w, u, G, kd, T)
  states          the state pass (chunk-start states h and v')
  reverse         the reverse pass of the backward (dS recurrence and the map's cotangents)
  output          o: the chunk-parallel output kernel, and the fused sequential pass
  chunk_backward  chunk-parallel backward kernels: w..aqk from T, the closed-form local backward
  segments        sequence segments for the sequential passes where the grid is small
  forward         the forward of each path
  backward        the backward of each path
  op              the custom_vjp and the public entry
"""
