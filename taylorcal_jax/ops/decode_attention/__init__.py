"""Attention of one query token per sequence over a KV cache (a decoding step), grouped-query.

Entry: api.decode_attention. Modules, each importing only those above it:
  reference   the XLA form: two batched products over the cache as it lies (the definition)
  pallas_gpu  flash decoding as a Pallas kernel (Triton on GPUs, interpret mode on CPUs): the
              cache split over S into blocks handled by separate programs, then a combine
  api         implementation choice ("auto" | "xla" | "pallas") and input checks
"""
