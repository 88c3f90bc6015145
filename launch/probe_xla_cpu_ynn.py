"""An XLA:CPU cliff in jaxlib 0.10: full-vocabulary logits over many tokens.

One forward of a one-layer GDN model (hidden 512, vocab 8192, random weights) returning all
[1, T, V] logits, at T = 4096 and 8192, median of 3 after a warm-up. jaxlib 0.10's XLA:CPU groups
the chain of matmuls ending in the LM head into one YNNPACK fusion ("__ynn_fusion" in the
compiled HLO); measured on 2 cores: 0.26 s at 4096 tokens, 21.7 s at 8192. With
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= (no YNN fusions) 0.25 s and 0.49 s, but that
flag made the 8-layer prefills of bench_inference 1.4-1.8x slower at 1k-4k tokens, so it is not
set by default. Prefill and generation avoid the case altogether: they ask the model for the last
position's logits only (Transformer(..., last_logits_only=True): 0.28 s at 8192 tokens).

    python launch/probe_xla_cpu_ynn.py                                              # as is
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python launch/probe_xla_cpu_ynn.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    import jax
    import numpy as np

    from taylorcal_jax.models.config import ModelConfig
    from taylorcal_jax.models.student import StudentConfig
    from taylorcal_jax.models.teacher import init_params

    vocab = 8192
    cfg = ModelConfig(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    )
    model = StudentConfig.from_teacher(cfg, (), impl="chunked").model()
    params = init_params(cfg, jax.random.PRNGKey(1), mixers=model.mixers, gdn=model.gdn)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0][:, -1])
    print("XLA_FLAGS =", repr(os.environ.get("XLA_FLAGS", "")), "jax", jax.__version__)
    for t in (4096, 8192):
        tokens = jax.random.randint(jax.random.PRNGKey(0), (1, t), 1, vocab)
        jax.block_until_ready(fwd(params, tokens))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, tokens))
            times.append(time.perf_counter() - t0)
        print(f"T={t}: {np.median(times):.3f} s", flush=True)


if __name__ == "__main__":
    main()
