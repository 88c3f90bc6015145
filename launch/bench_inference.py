"""Prefill and decode throughput and cache memory: hybrid student vs its teacher (BENCHMARKS §4).

Letters: B batch, L context (prompt) length, N decoded tokens.

Both models have the same shape and random weights (speed and memory do not depend on the
values); the student keeps softmax attention in every `keep_every`-th layer (uniform policy) and
has a GDN mixer in the others. For each context L:

    prefill   one forward over [B, L] random tokens that fills the cache      -> tokens/s = B L / t
    decode    N single-token steps after that prefill, run as one lax.scan    -> tokens/s = B N / t
    cache     bytes of the decoding cache sized for L + N tokens: the teacher's KV cache grows as
              2 x layers x L x kv_heads x head_dim; the student's holds KV only for the kept
              layers plus a fixed [heads, d_k, d_v] fp32 state per GDN layer

Timings are medians of `repeats` calls after one warm-up call (compilation excluded), same
process, same device, teacher and student alternating per context. Writes
launch/results/bench_inference_<tag>.json (+ .md table and .png plot) with device, versions,
date and command.

    python launch/bench_inference.py                   # Qwen2.5-1.5B shape, 4k-64k (one GPU)
    python launch/bench_inference.py --preset=cpu      # a 8-layer model, 1k-8k contexts (CPU)
    python launch/bench_inference.py --preset=small    # seconds-long dry run
"""

from __future__ import annotations

import os
import sys
import time

import model_shapes  # launch/ is on sys.path when run as a script
import results_io
from absl import app, flags

PRESETS = {
    # Qwen2.5-1.5B's shape (tied embeddings), the release's 25% uniform keep set
    "qwen2_5_1_5b": dict(
        model_shapes.QWEN2_5_1_5B,
        contexts="4096,16384,32768,65536", batch=1, decode_steps=64, dtype="bfloat16",
    ),
    "cpu": dict(
        layers=8, hidden=512, heads=8, kv=2, head_dim=64, mlp=1536, vocab=8192,
        contexts="1024,2048,4096,8192", batch=1, decode_steps=32, dtype="float32",
    ),
    "small": dict(
        layers=4, hidden=64, heads=4, kv=2, head_dim=16, mlp=128, vocab=256,
        contexts="64,128", batch=2, decode_steps=4, dtype="float32",
    ),
}  # fmt: skip

_PRESET = flags.DEFINE_enum("preset", "qwen2_5_1_5b", list(PRESETS), "Model shape and contexts.")
_CONTEXTS = flags.DEFINE_string("contexts", None, "Comma-separated context lengths (override).")
_KEEP_EVERY = flags.DEFINE_integer("keep_every", 4, "Student keeps attention every k-th layer.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")
_IMPL = flags.DEFINE_string("gdn_impl", "auto", "GDN op implementation for the prefill.")
_TAG = flags.DEFINE_string("tag", "", "Result file tag (default: device kind, or the preset).")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")


def _median_time(fn, repeats):
    import jax
    import numpy as np

    jax.block_until_ready(fn())  # warm-up: compilation and first run
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cache_bytes(cache) -> int:
    """Bytes of every array in a decoding cache (KV, recurrent states, positions)."""
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def measure(model, params, *, batch, context, decode_steps, repeats, seed=0) -> dict:
    """Prefill and decode time, throughput and cache bytes of one model at one context."""
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.models.teacher import init_cache

    vocab = model.config.vocab_size
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (batch, context), 1, vocab)
    steps_tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (decode_steps, batch), 1, vocab)

    def fresh_cache():
        return init_cache(model, batch, context + decode_steps)

    @jax.jit
    def prefill(params, tokens):
        logits, cache, _ = model.apply(
            {"params": params}, tokens, cache=fresh_cache(), last_logits_only=True
        )
        return logits[:, -1], cache

    @jax.jit
    def decode(params, cache, steps_tokens):
        def step(cache, tok_b):
            logits, cache, _ = model.apply({"params": params}, tok_b[:, None], cache=cache)
            return cache, logits[:, -1]

        return jax.lax.scan(step, cache, steps_tokens)

    t_prefill = _median_time(lambda: prefill(params, tokens), repeats)
    _, cache = prefill(params, tokens)
    t_decode = _median_time(lambda: decode(params, cache, steps_tokens), repeats)
    logits = decode(params, cache, steps_tokens)[1]
    if not bool(jnp.isfinite(logits).all()):
        raise FloatingPointError(f"non-finite logits while decoding at context {context}")
    return {
        "context": context,
        "prefill_s": t_prefill,
        "prefill_tokens_per_s": batch * context / t_prefill,
        "decode_s_per_token": t_decode / decode_steps,
        "decode_tokens_per_s": batch * decode_steps / t_decode,
        "cache_bytes": cache_bytes(cache),
    }


def _markdown(result) -> str:
    lines = [
        f"# Inference: student vs teacher ({result['device']})",
        "",
        f"Shape {result['shape']}, batch {result['batch']}, {result['decode_steps']} decoded "
        f"tokens, kept layers {result['keep_full_attention_layers']}, dtype {result['dtype']}.",
        f"Command: `{result['command']}` ({result['date']}, jax {result['jax_version']}).",
        "",
        "| context | model | prefill tok/s | decode tok/s | cache MiB |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for name in ("teacher", "student"):
            m = row[name]
            lines.append(
                f"| {row['context']} | {name} | {m['prefill_tokens_per_s']:.0f} | "
                f"{m['decode_tokens_per_s']:.1f} | {m['cache_bytes'] / 2**20:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] for r in result["rows"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        ("prefill_tokens_per_s", "prefill tokens/s"),
        ("decode_tokens_per_s", "decode tokens/s"),
        ("cache_bytes", "cache MiB"),
    ]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, style in (("teacher", "o-"), ("student", "s-")):
            ys = [r[name][key] / (2**20 if key == "cache_bytes" else 1) for r in result["rows"]]
            ax.plot(ctx, ys, style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"hybrid student vs teacher, {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from taylorcal_jax.models.mixers.gdn import GDNRuntime
    from taylorcal_jax.models.student import StudentConfig
    from taylorcal_jax.models.teacher import Transformer, init_params
    from taylorcal_jax.ops.gdn import api

    p = dict(PRESETS[_PRESET.value])
    contexts = [int(x) for x in (_CONTEXTS.value or p["contexts"]).split(",")]
    if any(c < 1 for c in contexts):
        raise ValueError(f"contexts must be positive, got {contexts}")
    dtype = jnp.dtype(p["dtype"])
    cfg = model_shapes.qwen2_config(p, max(contexts) + p["decode_steps"])
    keep = tuple(range(0, cfg.num_hidden_layers, _KEEP_EVERY.value))
    sc = StudentConfig.from_teacher(cfg, keep, mixer="gdn")
    import jax

    teacher = Transformer(cfg, dtype=dtype)
    student = sc.model(dtype=dtype, runtime=GDNRuntime(impl=_IMPL.value))
    cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)  # noqa: E731
    t_params = cast(init_params(cfg, jax.random.PRNGKey(0)))
    s_params = cast(
        init_params(
            cfg, jax.random.PRNGKey(1), mixers=student.mixers, student_mixer=student.student_mixer
        )
    )
    rows = []
    for context in tqdm(contexts, desc="contexts", unit="context"):
        row = {"context": context}
        for name, model, params in (("teacher", teacher, t_params), ("student", student, s_params)):
            row[name] = measure(
                model,
                params,
                batch=p["batch"],
                context=context,
                decode_steps=p["decode_steps"],
                repeats=_REPEATS.value,
            )
        row["decode_speedup"] = (
            row["student"]["decode_tokens_per_s"] / row["teacher"]["decode_tokens_per_s"]
        )
        row["prefill_speedup"] = (
            row["student"]["prefill_tokens_per_s"] / row["teacher"]["prefill_tokens_per_s"]
        )
        row["cache_ratio"] = row["teacher"]["cache_bytes"] / row["student"]["cache_bytes"]
        rows.append(row)
        print(
            f"L={context}: prefill x{row['prefill_speedup']:.2f}, decode "
            f"x{row['decode_speedup']:.2f}, cache /{row['cache_ratio']:.1f}",
            flush=True,
        )
    shape = {k: p[k] for k in ("layers", "hidden", "heads", "kv", "head_dim", "mlp", "vocab")}
    result = {
        "benchmark": "prefill/decode throughput and cache memory, hybrid student vs teacher",
        "preset": _PRESET.value,
        "shape": shape,
        "batch": p["batch"],
        "decode_steps": p["decode_steps"],
        "dtype": p["dtype"],
        "keep_full_attention_layers": list(keep),
        "gdn_impl": _IMPL.value,
        "gdn_impl_resolved": api.resolve_impl(_IMPL.value),
        "repeats": _REPEATS.value,
        "timing": "median of `repeats` calls after one warm-up call; decode = one jitted "
        "lax.scan over decode_steps single-token steps, divided by decode_steps",
        "rows": rows,
        **results_io.provenance(),
    }
    tag = _TAG.value or ("small" if _PRESET.value == "small" else "")
    path = results_io.write_result(_OUT.value, "bench_inference", tag, False, result)
    stem = path[: -len(".json")]
    with open(stem + ".md", "w") as f:
        f.write(_markdown(result))
    _plot(result, stem + ".png")
    print(_markdown(result))
    print("wrote", path, stem + ".md", stem + ".png")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    app.run(main)
