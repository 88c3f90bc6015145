"""Attention of one query token per sequence over a KV cache (a decoding step), grouped-query.

Entries: api.decode_attention; api.append_and_attend (the step's token, as its joined q|k|v
product, rotated and written into the cache first). Modules, each importing only those above
it:
  reference      the XLA forms: two batched products over the cache as it lies (the
                 definition); RoPE and the cache writes before them
  pallas_gpu     flash decoding as a Pallas kernel (Triton on GPUs, interpret mode on CPUs): the
                 cache split over S into blocks handled by separate programs, then a combine
  pallas_append  pallas_gpu's partials kernel taking the token's product: RoPE, the cache
                 writes (in place) and the attention partials in one kernel
  api            implementation choice ("auto" | "xla" | "pallas") and input checks
"""
