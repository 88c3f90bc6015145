"""Peak memory of statistics collection as the context grows (docs/benchmarks.md §2).

    python launch/bench_stats_memory.py                       # GPU: compile + run, 1k..32k
    python launch/bench_stats_memory.py --small --no_execute  # CPU dry run (compile only)

For each context length T (one sequence), three programs of a Qwen2.5-1.5B-shaped random
model (28 layers, hidden 1536, 12 heads, 2 kv heads, head dim 128; `--layers` fewer for a
quicker run; memory per layer is what grows with T):

    kernel     the blockwise statistics of one layer from q, k, v (distance, entropy, context)
    blockwise  `stats.collect(teacher_pass="blockwise")`: the whole teacher pass with the
               attention context from the blockwise kernel (what the pipeline runs)
    dense      `stats.collect(teacher_pass="model")`: the Transformer's own attention, which
               materialises [H, T, T] logits (for contrast; only compiled past --dense_max_t)

Memory is XLA's compiled memory analysis (temp + argument + output bytes), which is exact
for the program and works on every backend; on GPU the device's peak_bytes_in_use after
running (monotone over the run, so lengths go up) is recorded too, with the run time.
Writes launch/results/bench_stats_memory_<tag>.json (device, versions, date, command).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import model_shapes  # launch/ is on sys.path when run as a script
import results_io
from absl import app, flags

_SMALL = flags.DEFINE_bool("small", False, "Tiny model (CPU dry run).")
_LENGTHS = flags.DEFINE_list("lengths", "1024,4096,16384,32768", "Context lengths.")
_LAYERS = flags.DEFINE_integer("layers", 28, "Layers of the model.")
_BLOCK = flags.DEFINE_integer("block_size", 512, "Statistics block size.")
_EXECUTE = flags.DEFINE_bool("execute", True, "Run the programs (else compile only).")
_NO_EXECUTE = flags.DEFINE_bool("no_execute", False, "Same as --noexecute (compile only).")
_DENSE_MAX_T = flags.DEFINE_integer("dense_max_t", 16384, "Run the dense pass up to this T.")
_TAG = flags.DEFINE_string("tag", "", "Result file tag (default: device kind).")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")


def _analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        k: int(getattr(m, k))
        for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
        if hasattr(m, k)
    }
    out["total_bytes"] = sum(out.values())
    return out


def _peak():
    import jax

    s = jax.devices()[0].memory_stats() or {}
    return int(s["peak_bytes_in_use"]) if "peak_bytes_in_use" in s else None


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.calibrate import stats
    from taylorcal_jax.models.teacher import Transformer, init_params

    if _SMALL.value:
        dims = dict(hidden=64, heads=4, kv=2, head_dim=16, mlp=128, vocab=256, layers=2)
    else:
        dims = dict(model_shapes.QWEN2_5_1_5B, layers=_LAYERS.value)
    lengths = [int(t) for t in _LENGTHS.value]
    cfg = model_shapes.qwen2_config(dims, max(lengths))
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.PRNGKey(0))
    model = Transformer(cfg)
    rows = []
    for t in lengths:
        tokens = jax.random.randint(jax.random.PRNGKey(t), (1, t), 0, cfg.vocab_size)
        valid = jnp.ones((1, t), bool)
        q = jax.random.normal(jax.random.PRNGKey(1), (t, dims["heads"], dims["head_dim"]))
        kv = jax.random.normal(jax.random.PRNGKey(2), (t, dims["kv"], dims["head_dim"]))

        def kernel(q, k, v):
            return stats.attention_stats_sequence(
                q,
                k,
                jnp.ones((q.shape[0],), bool),
                scale=dims["head_dim"] ** -0.5,
                block_size=_BLOCK.value,
                v_tkd=v,
            )

        programs = {"kernel": (jax.jit(kernel), (q, kv, kv))}
        for name, tp in (("blockwise", "blockwise"), ("dense", "model")):
            fn = stats._collect_jit(
                model, cfg, tuple(range(cfg.num_hidden_layers)), _BLOCK.value, True, 1, tp, None
            )  # one device: no mesh
            programs[name] = (fn, (params, tokens, valid))
        row = {"T": t}
        for name, (fn, args) in programs.items():
            entry = {}
            try:
                compiled = fn.lower(*args).compile()
                entry.update(_analysis(compiled))
                execute = _EXECUTE.value and not _NO_EXECUTE.value
                run = execute and not (name == "dense" and t > _DENSE_MAX_T.value)
                if run:
                    jax.block_until_ready(compiled(*args))  # warm-up
                    times = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        jax.block_until_ready(compiled(*args))
                        times.append(time.perf_counter() - t0)
                    entry["seconds"] = statistics.median(times)  # of 3, after the warm-up
                    entry["device_peak_bytes_so_far"] = _peak()
            except Exception as e:  # noqa: BLE001 - OOM at long T is a result, not a crash
                entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row[name] = entry
            print(t, name, {k: v for k, v in entry.items()}, flush=True)
        rows.append(row)
    for name in ("kernel", "blockwise", "dense"):  # growth factor per 4x of T
        sizes = [(r["T"], r[name].get("temp_size_in_bytes")) for r in rows]
        for (t0, a), (t1, b) in zip(sizes, sizes[1:], strict=False):
            if a and b:
                rows[[r["T"] for r in rows].index(t1)][name][f"temp_growth_vs_T{t0}"] = b / a
    result = {
        "benchmark": "statistics collection memory vs context length (one sequence)",
        "model": dims,
        "block_size": _BLOCK.value,
        "rows": rows,
        **results_io.provenance(),
    }
    path = results_io.write_result(
        _OUT.value, "bench_stats_memory", _TAG.value, _SMALL.value, result
    )
    print("wrote", path)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    app.run(main)
