"""The XLA:CPU cliff behind taylorcal_jax/utils/xla_cpu.py: one forward of a one-layer GDN model
(hidden 512, vocab 8192, random weights) at 4096 and 8192 tokens, median of 3 after a warm-up.

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
