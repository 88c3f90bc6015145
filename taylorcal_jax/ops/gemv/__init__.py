"""Few rows times a matrix, y[M, N] = x[M, K] W[K, N] with M <= 16: the dense products of a
decoding step at batch 1 to 16.

Why a kernel of our own: XLA's GPU compiler rewrites a dot whose one side is a vector and whose
operands hold fewer than 10M elements into a multiply and a reduction, and those reductions
read the matrix at about a quarter of the HBM bandwidth (0.8 TB/s for a 1536 x 1536 bf16
projection on an H100; launch/results/profile_steps_h100_gdn_step.md). At batch 16 XLA's GEMMs
read the MLP's weights at about 2.1 TB/s there, 71% of the copy bandwidth. docs/benchmarks.md §4.

Entry: api.dense_dot_general (a `dot_general` for flax's nn.Dense). Modules, each importing only
those above it:
  pallas_gpu  the product as a Pallas kernel (Triton on GPUs, interpret mode on CPUs): column
              blocks of W times segments of K, one program each, then a sum over the segments
  api         implementation choice ("auto" | "xla" | "pallas"), the few-row test, the
              backward (XLA's products)
"""
