"""Prefill and decode speed, cache memory and decode roofline: hybrid student vs its teacher.

docs/benchmarks.md §4. Letters: B batch, L context (prompt) length, N decoded tokens per
call, S = L + N cache slots.

Both models have the same shape and random weights (`model_shapes.random_params`; speed and
memory do not depend on the values), held as a server holds them: joined for decoding
(`decoding_params`, models/joined.py); the student keeps softmax attention in every
`keep_every`-th layer (uniform policy) and has a GDN mixer in the others. For each context L,
teacher and student in turn:

    prefill   one forward over [B, L] random tokens that fills a cache of S slots:
              tokens/s = B L / t. At batch 1, and at each larger B with B L <=
              max_prefill_tokens (a long prompt keeps the device busy at batch 1 already).
    decode    N greedy single-token steps, one jitted lax.scan, from the batch-1 prefill's cache
              replicated to B rows: tokens/s = B N / t, seconds per step = t / N. Once per
              decoding-attention implementation asked for (--decode_attention, e.g. "xla,pallas":
              layers.AttentionRuntime.decode_impl); the first one's figures are the row's.
    cache     bytes of the decoding cache of S slots at batch B.
    roofline  bytes one decoding step must move / measured copy bandwidth, where the bytes are
                  weights   every parameter once (the tied LM head reads the whole table)
                  KV read   K and V of the filled slots of every attention layer (step i of N
                            attends to L + i + 1 slots: averaged, L + (N + 1) / 2)
                  KV write  K and V of the new token
                  state     each fixed-size recurrent cache (GDN state [H, K, V] fp32), read and
                            written
              and the copy bandwidth is (bytes read + bytes written) / time of a jitted
              elementwise negation of a `copy_mib` array (a device-to-device copy's traffic),
              measured in the same run. fraction = roofline seconds per step / measured ones.

One prefill program per (model, L, B) and one decode program per (model, S, B), each compiled
once, ahead of its timings: the programs of a context together, in `compile_threads` threads
(XLA compiles without the GIL). Timings are medians of `repeats` calls after a warm-up call;
each decode call starts from a fresh copy of the cache, made outside the timing and donated
(the program updates it in place). A line is printed per (context, batch, model) and the
result files (.json, .md, .png) are rewritten after each.

    python launch/bench_inference.py --tag=h200   # Qwen2.5-1.5B shape, 4k-64k, batch 1 and 16
    python launch/bench_inference.py --tag=h200 --decode_attention=pallas,xla  # both kernels
    python launch/bench_inference.py --preset=cpu    # 8 layers, hidden 512, 1k-8k (CPU)
    python launch/bench_inference.py --preset=small  # seconds-long dry run
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import sys
import time

import model_shapes  # launch/ is on sys.path when run as a script
import results_io
from absl import app, flags

PRESETS = {
    # Qwen2.5-1.5B's shape (tied embeddings), the release's 25% uniform keep set
    "qwen2_5_1_5b": dict(
        model_shapes.QWEN2_5_1_5B, contexts="4096,16384,32768,65536", batches="1,16",
        decode_steps=64, dtype="bfloat16", max_prefill_tokens=16 * 16384, copy_mib=2048,
    ),
    "cpu": dict(
        layers=8, hidden=512, heads=8, kv=2, head_dim=64, mlp=1536, vocab=8192,
        contexts="1024,2048,4096,8192", batches="1,4", decode_steps=32, dtype="float32",
        max_prefill_tokens=8192, copy_mib=256,
    ),
    "small": dict(
        layers=4, hidden=64, heads=4, kv=2, head_dim=16, mlp=128, vocab=256,
        contexts="64,128", batches="1,2", decode_steps=4, dtype="float32",
        max_prefill_tokens=256, copy_mib=16,
    ),
}  # fmt: skip

# Targets a result is checked against (docs/benchmarks.md §4), on the rows it has.
TARGET_ROOFLINE_FRACTION = 0.70  # every decode row, teacher and student
TARGET_DECODE_SPEEDUP = {16: {32768: 2.2, 65536: 2.7}}  # batch -> context -> student / teacher
TARGET_PREFILL_PARITY_FROM = 16384  # student prefill tokens/s >= teacher's from this context on


class SettingsError(ValueError):
    """A bad command-line value (the message is the one line the user sees)."""


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_T0 = time.perf_counter()
log = results_io.progress_log(_T0)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise SettingsError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise SettingsError(f"--{name} must be positive integers, got {text!r}")
    return sorted(set(values))


# ---------------------------------------------------------------------------------- models


def build_models(
    config, keep, dtype, impl, decode_impl="auto", gdn_decode="auto", gdn_fused=None, gemv=None
):
    """(teacher, student) Flax modules of one shape; the student keeps attention in `keep`. GDN
    runs by op implementation `impl`, its decoding step by `gdn_decode` and its input
    projections joined when `gdn_fused` (GDNRuntime.fused_projections); a decoding step's
    attention runs by `decode_impl`; dense products of <= 16 rows (decoding) by `gemv`
    (`ops.gemv`), in both models. None: the runtime's default."""
    from taylorcal_jax.models.layers import AttentionRuntime
    from taylorcal_jax.models.mixers.gdn import GDNRuntime
    from taylorcal_jax.models.student import StudentConfig
    from taylorcal_jax.models.teacher import Transformer

    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    attention = AttentionRuntime(decode_impl=decode_impl, **given(gemv_impl=gemv))
    sc = StudentConfig.from_teacher(config, keep, mixer="gdn")
    runtime = GDNRuntime(
        impl=impl, decode_impl=gdn_decode, **given(fused_projections=gdn_fused, gemv_impl=gemv)
    )
    student = sc.model(dtype=dtype, runtime=runtime, attention_runtime=attention)
    return Transformer(config, dtype=dtype, attention_runtime=attention), student


def decoding_params(model, seed: int, dtype, joined: bool = True):
    """Random weights of `model` (model_shapes.random_params) joined for decoding, as the
    generation path holds them (models/joined.py), or as stored when not `joined`; ready on
    the device."""
    import jax

    from taylorcal_jax.models.joined import join_for_decoding

    params = model_shapes.random_params(model, jax.random.PRNGKey(seed), dtype)
    return jax.block_until_ready(join_for_decoding(params) if joined else params)


def empty_cache(model, batch: int, slots: int):
    """The model's empty decoding cache of `slots` token slots."""
    from taylorcal_jax.models.teacher import init_cache

    return init_cache(model, batch, slots)


def prefill_program(model, slots: int):
    """jit of (params, tokens [B, L]) -> (cache of `slots` slots holding the prompt,
    greedy next token [B], whether the last logits are finite)."""
    import jax
    import jax.numpy as jnp

    def prefill(params, tokens_bl):
        cache = empty_cache(model, tokens_bl.shape[0], slots)
        logits, cache, _ = model.apply(
            {"params": params}, tokens_bl, cache=cache, last_logits_only=True
        )
        last_bv = logits[:, -1]
        return cache, jnp.argmax(last_bv, -1).astype(jnp.int32), jnp.isfinite(last_bv).all()

    return jax.jit(prefill)


def decode_program(model, steps: int, unroll: int = 1):
    """jit of (params, cache, token [B]) -> (cache, token [B], all logits finite) after `steps`
    greedy single-token steps (one lax.scan, `unroll` steps per loop iteration); the cache is
    donated and updated in place."""
    import jax
    import jax.numpy as jnp

    def decode(params, cache, token_b):
        def step(carry, _):
            cache, token_b, finite = carry
            logits, cache, _ = model.apply({"params": params}, token_b[:, None], cache=cache)
            last_bv = logits[:, -1]
            next_b = jnp.argmax(last_bv, -1).astype(jnp.int32)
            return (cache, next_b, finite & jnp.isfinite(last_bv).all()), None

        carry, _ = jax.lax.scan(
            step, (cache, token_b, jnp.array(True)), length=steps, unroll=unroll
        )
        return carry

    return jax.jit(decode, donate_argnums=1)


def replicate_batch(cache, batch: int):
    """A batch-1 cache as `batch` identical rows (every non-scalar leaf has batch first)."""
    import jax
    import jax.numpy as jnp

    def tile(path, x):
        if x.ndim == 0:
            return x
        if x.shape[0] != 1:
            name = jax.tree_util.keystr(path)
            raise ValueError(f"cache leaf {name} {x.shape} has no leading batch axis of size 1")
        return jnp.repeat(x, batch, axis=0)

    return cache if batch == 1 else jax.tree_util.tree_map_with_path(tile, cache)


# ------------------------------------------------------------------------------ arithmetic


def _nbytes(x) -> int:
    return math.prod(x.shape) * x.dtype.itemsize


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in a pytree."""
    import jax

    return int(sum(_nbytes(x) for x in jax.tree.leaves(tree)))


def weight_bytes(model, dtype) -> int:
    """Bytes of `model`'s parameters in `dtype`, as stored: the weights a decoding step reads.
    Params joined for decoding may hold zero columns besides (models/joined.py); those are the
    implementation's cost, not the model's, so the roofline leaves them out."""
    import jax

    key = jax.random.PRNGKey(0)
    return tree_bytes(jax.eval_shape(lambda: model_shapes.random_params(model, key, dtype)))


def decode_step_bytes(weights: int, cache, context: int, steps: int) -> dict:
    """Bytes one decoding step must move (module docstring), averaged over `steps` steps after
    `context` prompt tokens, from the model's weight bytes (`weight_bytes`) and the shapes of a
    cache of any batch.

    Attention layer caches are the dicts {"k", "v"} of [B, S, Hkv, d] (read: the filled slots,
    written: one slot); every other layer cache is a recurrent mixer's fixed-size state (its
    floating-point leaves read and written); bookkeeping (the slot record's valid and index,
    next_position) is not counted.
    """
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.models.layers import SLOTS

    kv_read = kv_write = state = 0.0
    for name, layer in cache.items():
        if name in (SLOTS, "next_position"):
            continue
        if layer.keys() == {"k", "v"}:
            for x in (layer["k"], layer["v"]):
                per_slot = _nbytes(x) / x.shape[1]
                kv_read += per_slot * (context + (steps + 1) / 2)
                kv_write += per_slot
        else:
            floats = [x for x in jax.tree.leaves(layer) if jnp.issubdtype(x.dtype, jnp.floating)]
            state += 2 * sum(_nbytes(x) for x in floats)
    parts = dict(weights=weights, kv_read=kv_read, kv_write=kv_write, state_read_write=state)
    return {**parts, "total": sum(parts.values())}


def copy_bandwidth(nbytes: int, repeats: int, calls: int = 10) -> float:
    """(bytes read + bytes written) / s of a jitted elementwise negation of an `nbytes` array
    (a device-to-device copy's traffic): the ceiling of the decode roofline. Median over
    `repeats` batches of `calls` calls with one synchronisation each (dispatch overlaps)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.ones((nbytes // 4,), jnp.float32)
    negate = jax.jit(jnp.negative)
    jax.block_until_ready(negate(x))
    times = []
    for _ in range(repeats):
        y, t0 = None, time.perf_counter()
        for _ in range(calls):
            y = negate(x)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - t0) / calls)
    return 2 * x.size * x.dtype.itemsize / float(np.median(times))


# ------------------------------------------------------------------------------ measuring


def compile_all(jobs: dict, threads: int) -> tuple[dict, dict]:
    """{name: (jitted, args)} -> ({name: compiled}, {name: {"lower_s", "compile_s"}}); args
    may be ShapeDtypeStructs. Lowering (Python, holding the GIL) runs here one program after
    the other; XLA compiles them meanwhile, `threads` at a time. Logs each program when done."""
    compiled, seconds = {}, {}

    def compile_one(name, lowered):
        t0 = time.perf_counter()
        return name, lowered.compile(), time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = []
        for name, (jitted, args) in jobs.items():
            t0 = time.perf_counter()
            lowered = jitted.lower(*args)
            seconds[name] = {"lower_s": time.perf_counter() - t0}
            futures.append(pool.submit(compile_one, name, lowered))
        for future in concurrent.futures.as_completed(futures):
            name, program, s = future.result()
            compiled[name] = program
            seconds[name]["compile_s"] = s
            log(f"  compiled {name} in {seconds[name]['lower_s']:.1f} + {s:.1f} s")
    return compiled, seconds


def _timed(call):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(call())
    return time.perf_counter() - t0, out


def time_prefill(program, params, tokens, repeats):
    """(median seconds, outputs of the last call) over `repeats` calls after a warm-up."""
    import numpy as np

    out, times = None, []
    for i in range(repeats + 1):
        out = None  # free the previous call's cache first
        t, out = _timed(lambda: program(params, tokens))
        if i:
            times.append(t)
    return float(np.median(times)), out


def fresh_copy(cache):
    """A copy of `cache` on the device, finished: what a decode call donates, so that `cache`
    itself serves every call."""
    import jax
    import jax.numpy as jnp

    return jax.block_until_ready(jax.tree.map(jnp.copy, cache))


def time_decode(program, params, cache, token_b, repeats):
    """(median seconds per call, all logits finite); each call decodes from a fresh copy of
    `cache` (made untimed, donated to the program)."""
    import numpy as np

    finite, times = True, []
    for i in range(repeats + 1):
        fresh = fresh_copy(cache)
        t, (_, _, ok) = _timed(lambda fresh=fresh: program(params, fresh, token_b))
        del fresh
        finite &= bool(ok)
        if i:
            times.append(t)
    return float(np.median(times)), finite


# -------------------------------------------------------------------------------- results


def model_entry(prefill_s, tokens, decode_s, batch, steps, cache_bytes, step_bytes, bandwidth):
    """One (context, batch, model) result."""
    roofline = step_bytes["total"] / bandwidth
    return {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": None if prefill_s is None else tokens / prefill_s,
        **decode_figures(decode_s, batch, steps, roofline),
        "cache_bytes": cache_bytes,
        "decode_bytes_per_step": step_bytes,
        "roofline_s_per_step": roofline,
    }


def decode_figures(decode_s, batch, steps, roofline_s_per_step) -> dict:
    """One decoding-attention implementation's decode figures of a (context, batch, model)."""
    per_step = decode_s / steps
    return {
        "decode_s_per_step": per_step,
        "decode_tokens_per_s": batch / per_step,
        "roofline_fraction": roofline_s_per_step / per_step,
    }


def add_ratios(row: dict) -> None:
    """Student / teacher figures of a row that has both models."""
    t, s = row["teacher"], row["student"]
    row["decode_speedup"] = s["decode_tokens_per_s"] / t["decode_tokens_per_s"]
    row["decode_roofline_speedup"] = (
        t["decode_bytes_per_step"]["total"] / s["decode_bytes_per_step"]["total"]
    )
    both = t["prefill_tokens_per_s"] is not None and s["prefill_tokens_per_s"] is not None
    row["prefill_speedup"] = s["prefill_tokens_per_s"] / t["prefill_tokens_per_s"] if both else None
    row["cache_ratio"] = t["cache_bytes"] / s["cache_bytes"]


def evaluate_targets(rows) -> list[dict]:
    """Each target (TARGET_*) against the rows measured: {target, value, met}; met and value
    are None where the row was not measured."""

    def check(target, value, bar):
        return {"target": target, "value": value, "met": None if value is None else value >= bar}

    checks = []
    for row in rows:
        for name in ("teacher", "student"):
            if name in row:
                checks.append(check(
                    f"L={row['context']} B={row['batch']} {name} decode >= "
                    f"{TARGET_ROOFLINE_FRACTION:.0%} of its roofline",
                    row[name]["roofline_fraction"], TARGET_ROOFLINE_FRACTION,
                ))  # fmt: skip
    done = {(r["context"], r["batch"]): r for r in rows if "decode_speedup" in r}
    for batch, by_context in TARGET_DECODE_SPEEDUP.items():
        for context, bar in by_context.items():
            row = done.get((context, batch))
            checks.append(check(
                f"L={context} B={batch} decode student/teacher >= {bar}x",
                None if row is None else row["decode_speedup"], bar,
            ))  # fmt: skip
    for (context, batch), row in sorted(done.items()):
        if context >= TARGET_PREFILL_PARITY_FROM and row["prefill_speedup"] is not None:
            checks.append(check(
                f"L={context} B={batch} student prefill >= teacher's", row["prefill_speedup"], 1.0
            ))  # fmt: skip
    return checks


def markdown(result: dict) -> str:
    gb = 1e9
    lower_s = sum(x["lower_s"] for x in result["programs"].values())
    compile_s = sum(x.get("compile_s", 0.0) for x in result["programs"].values())
    lines = [
        f"# Inference: hybrid student vs teacher ({result['device']})",
        "",
        f"Shape {result['shape']}, {result['dtype']}, kept attention layers "
        f"{result['keep_full_attention_layers']}, GDN op {result['gdn_impl_resolved']}, GDN "
        f"decoding step {result.get('gdn_decode_resolved', 'xla')}, "
        f"decoding attention {_impl_names(result)[0]}, {result['decode_steps']} decoded tokens "
        f"per call, median of {result['repeats']}.",
        f"Command: `{result['command']}` ({result['date']}, jax {result['jax_version']}, git "
        f"{result['git']}, source digest {result['source_digest']}).",
        f"{'Complete' if result['complete'] else 'PARTIAL (cut short)'}: "
        f"{result['elapsed_s']:.0f} s in all; lowering {lower_s:.0f} s, compiling {compile_s:.0f} "
        "s (summed over the compile threads).",
        "",
        "Roofline of a decode row: the bytes one step must move (all weights once; K and V of "
        "the filled slots of every attention layer, averaged over the decoded tokens; the new "
        "token's K and V; each GDN state read and written) over the measured copy bandwidth, "
        f"{result['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ((read + written bytes) / time "
        f"of an elementwise negation of {result['copy_mib']} MiB). The step attends over all "
        "S = L + N slots of its cache (the unfilled ones masked); the roofline counts the "
        "filled ones. Prefill at batch B > 1 is "
        f"timed where B L <= {result['max_prefill_tokens']} tokens; decode starts from the "
        "batch-1 prefill's cache replicated to B rows.",
        "",
        "| context | batch | model | prefill tok/s | decode tok/s | ms/step | roofline ms/step "
        "| of roofline | GB/step | cache GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for name in ("teacher", "student"):
            if name not in row:
                continue
            m = row[name]
            prefill = (
                "-" if m["prefill_tokens_per_s"] is None else f"{m['prefill_tokens_per_s']:.0f}"
            )
            lines.append(
                f"| {row['context']} | {row['batch']} | {name} | {prefill} | "
                f"{m['decode_tokens_per_s']:.1f} | {1e3 * m['decode_s_per_step']:.3f} | "
                f"{1e3 * m['roofline_s_per_step']:.3f} | {m['roofline_fraction']:.0%} | "
                f"{m['decode_bytes_per_step']['total'] / gb:.3g} | {m['cache_bytes'] / gb:.3g} |"
            )
    lines += [
        "",
        "| context | batch | decode student/teacher | roofline student/teacher | "
        "prefill student/teacher | cache teacher/student |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "decode_speedup" in row:
            prefill = "-" if row["prefill_speedup"] is None else f"{row['prefill_speedup']:.2f}x"
            lines.append(
                f"| {row['context']} | {row['batch']} | {row['decode_speedup']:.2f}x | "
                f"{row['decode_roofline_speedup']:.2f}x | {prefill} | {row['cache_ratio']:.1f}x |"
            )
    lines += _impl_table(result)
    lines += ["", "Targets:", ""]
    for check in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
        value = "" if check["value"] is None else f" ({check['value']:.2f})"
        lines.append(f"- {check['target']}: {verdict}{value}")
    return "\n".join(lines) + "\n"


def _impl_names(result: dict) -> list[str]:
    """The decoding-attention implementations as asked for, with what "auto" ran as."""
    asked, ran = result["decode_attention"], result["decode_attention_resolved"]
    return [a if a == r else f"{a} ({r})" for a, r in zip(asked, ran, strict=True)]


def _impl_table(result: dict) -> list[str]:
    """Markdown lines comparing the decode of each decoding-attention implementation (none when
    one was run): ms/step and fraction of the roofline, and the first one's time over each."""
    impls = result["decode_attention"]
    if len(impls) < 2:
        return []
    names = _impl_names(result)
    head = " | ".join(f"{n} ms/step (of roofline)" for n in names)
    gains = " | ".join(f"{impls[0]} / {impl}" for impl in impls[1:])
    lines = [
        "",
        "Decode by decoding-attention implementation (the rows above: the first one):",
        "",
        f"| context | batch | model | {head} | {gains} |",
        "|---|---|---|" + "---|" * (2 * len(impls) - 1),
    ]
    for row in result["rows"]:
        for name in ("teacher", "student"):
            if name not in row:
                continue
            by = row[name]["decode_by_impl"]
            cells = [
                f"{1e3 * by[i]['decode_s_per_step']:.3f} ({by[i]['roofline_fraction']:.0%})"
                for i in impls
            ]
            first = by[impls[0]]["decode_s_per_step"]
            cells += [f"{first / by[i]['decode_s_per_step']:.2f}x" for i in impls[1:]]
            lines.append(f"| {row['context']} | {row['batch']} | {name} | {' | '.join(cells)} |")
    return lines


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    styles = {"teacher": "o-", "student": "s-"}
    for batch in result["batches"]:
        rows = [r for r in result["rows"] if r["batch"] == batch]
        for name, style in styles.items():
            have = [r for r in rows if name in r]
            ctx = [r["context"] for r in have]
            pre = [(r["context"], r[name]["prefill_tokens_per_s"]) for r in have]
            pre = [(c, v) for c, v in pre if v is not None]
            if pre:
                axes[0].plot(*zip(*pre, strict=True), style, label=f"{name} B={batch}")
            axes[1].plot(
                ctx,
                [r[name]["decode_tokens_per_s"] for r in have],
                style,
                label=f"{name} B={batch}",
            )
            roof = [batch / r[name]["roofline_s_per_step"] for r in have]
            axes[1].plot(ctx, roof, ":", color=axes[1].lines[-1].get_color())
            axes[2].plot(
                ctx, [r[name]["roofline_fraction"] for r in have], style, label=f"{name} B={batch}"
            )
    axes[2].axhline(TARGET_ROOFLINE_FRACTION, color="gray", lw=0.8, ls="--")
    titles = ("prefill tokens/s", "decode tokens/s (dotted: roofline)", "decode / roofline")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.suptitle(f"hybrid student vs teacher, {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, p: dict, with_plot: bool) -> str:
    """Rewrites <out>/bench_inference_<tag>.json and .md (and .png); returns the .json path."""
    result["elapsed_s"] = time.perf_counter() - _T0
    result["targets"] = evaluate_targets(result["rows"])
    path = results_io.write_result(p["out"], "bench_inference", p["tag"], False, result)
    stem = path[: -len(".json")]
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    if with_plot:
        plot(result, stem + ".png")
    return path


def _prefill_batches(p, context) -> list[int]:
    return [b for b in p["batches"] if b == 1 or b * context <= p["max_prefill_tokens"]]


def decode_job(name: str, impl: str, slots: int, batch: int) -> str:
    return f"{name} decode[{impl}] S={slots} B={batch}"


def compile_context(models, decoders, params, context, p, result) -> dict:
    """Every program of one context, compiled together: {name: compiled}; records each one's
    lowering and compile seconds and XLA's temporary bytes in result["programs"]. `models`
    prefill; `decoders` ({decode impl: models}) decode."""
    import jax
    import jax.numpy as jnp

    slots = context + p["decode_steps"]
    jobs = {}
    for name, m in models.items():
        for b in _prefill_batches(p, context):
            tokens = jax.ShapeDtypeStruct((b, context), jnp.int32)
            jobs[f"{name} prefill L={context} B={b}"] = (
                prefill_program(m, slots),
                (params[name], tokens),
            )
        for b in p["batches"]:
            cache = jax.eval_shape(lambda m=m, b=b: empty_cache(m, b, slots))
            token = jax.ShapeDtypeStruct((b,), jnp.int32)
            for impl, decoder in decoders.items():
                jobs[decode_job(name, impl, slots, b)] = (
                    decode_program(decoder[name], p["decode_steps"]),
                    (params[name], cache, token),
                )
    log(f"L={context}: compiling {len(jobs)} programs, {p['compile_threads']} at a time")
    t0 = time.perf_counter()
    compiled, seconds = compile_all(jobs, p["compile_threads"])
    log(f"L={context}: compiled in {time.perf_counter() - t0:.1f} s")
    for job, program in compiled.items():
        memory = program.memory_analysis()
        if memory is not None:
            seconds[job]["temp_bytes"] = int(memory.temp_size_in_bytes)
    result["programs"].update(seconds)
    return compiled


def measure_context(models, decoders, params, weights, compiled, context, p, bandwidth, result):
    """The rows of one context: the batch-1 prefill of each model (its cache starts every
    decode), then per batch and model the prefill (where timed) and the decode by each
    decoding-attention implementation (`decoders`' keys, the first one's figures the row's);
    `weights`: each model's `weight_bytes`, for the rooflines."""
    import jax

    steps, repeats, vocab = p["decode_steps"], p["repeats"], models["teacher"].config.vocab_size
    first = {}
    for name in models:
        tokens = jax.random.randint(jax.random.PRNGKey(context), (1, context), 1, vocab)
        program = compiled[f"{name} prefill L={context} B=1"]
        t, (cache, token, finite) = time_prefill(program, params[name], tokens, repeats)
        if not bool(finite):
            raise FloatingPointError(f"{name}: non-finite logits after a {context}-token prompt")
        first[name] = (t, cache, token)
    for batch in p["batches"]:
        row = {"context": context, "batch": batch}
        result["rows"].append(row)
        for name in models:
            t_prefill = first[name][0] if batch == 1 else None
            if batch > 1 and batch in _prefill_batches(p, context):
                tokens = jax.random.randint(jax.random.PRNGKey(batch), (batch, context), 1, vocab)
                program = compiled[f"{name} prefill L={context} B={batch}"]
                t_prefill, _ = time_prefill(program, params[name], tokens, repeats)
            cache = replicate_batch(first[name][1], batch)
            token = replicate_batch(first[name][2], batch)
            step_bytes = decode_step_bytes(weights[name], cache, context, steps)
            by_impl = {}
            for impl in decoders:
                program = compiled[decode_job(name, impl, context + steps, batch)]
                t_decode, finite = time_decode(program, params[name], cache, token, repeats)
                if not finite:
                    raise FloatingPointError(
                        f"{name}: non-finite logits decoding at L={context} ({impl} attention)"
                    )
                by_impl[impl] = t_decode
            primary = next(iter(by_impl))
            row[name] = m = model_entry(
                t_prefill,
                batch * context,
                by_impl[primary],
                batch,
                steps,
                tree_bytes(cache),
                step_bytes,
                bandwidth,
            )
            m["decode_by_impl"] = {
                impl: decode_figures(t, batch, steps, m["roofline_s_per_step"])
                for impl, t in by_impl.items()
            }
            del cache
            prefill = (
                "prefill -"
                if t_prefill is None
                else f"prefill {m['prefill_tokens_per_s']:.0f} tok/s ({t_prefill:.3f} s)"
            )
            log(
                f"L={context} B={batch} {name}: {prefill} | decode "
                f"{m['decode_tokens_per_s']:.1f} tok/s, {1e3 * m['decode_s_per_step']:.3f} "
                f"ms/step = {m['roofline_fraction']:.0%} of its roofline "
                f"({1e3 * m['roofline_s_per_step']:.3f} ms, "
                f"{m['decode_bytes_per_step']['total'] / 1e9:.3g} GB/step) | cache "
                f"{m['cache_bytes'] / 1e9:.3g} GB"
                + "".join(
                    f" | {impl} attention {1e3 * x['decode_s_per_step']:.3f} ms/step "
                    f"({x['roofline_fraction']:.0%})"
                    for impl, x in m["decode_by_impl"].items()
                )
            )
            if name == "student":
                add_ratios(row)
            write(result, p, with_plot=False)


# ----------------------------------------------------------------------------------- main


def define_flags() -> None:
    """The command line (defined only when run as a script: the module imports without it)."""
    flags.DEFINE_enum("preset", "qwen2_5_1_5b", list(PRESETS), "Model shape and sizes.")
    flags.DEFINE_string("contexts", None, "Comma-separated contexts (the preset's if unset).")
    flags.DEFINE_string("batches", None, "Comma-separated batch sizes, with 1 (the preset's).")
    flags.DEFINE_integer(
        "max_prefill_tokens", None, "Prefill at batch B > 1 is timed where B*L <= this (preset's)."
    )
    flags.DEFINE_integer("keep_every", 4, "The student keeps attention every k-th layer.")
    flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")
    flags.DEFINE_string("gdn_impl", "auto", "GDN op implementation for the prefill.")
    flags.DEFINE_string(
        "gdn_decode",
        "auto",
        "The student's GDN decoding step: auto (pallas on a GPU), xla, pallas.",
    )
    flags.DEFINE_string(
        "decode_attention",
        "auto",
        "Comma-separated decoding-attention implementations (auto, xla, pallas), each decode "
        "timed by each; the first one's figures are the rows'.",
    )
    flags.DEFINE_integer("compile_threads", 8, "Programs compiled at once.")
    flags.DEFINE_string("tag", "", "Result file tag (default: the device kind, or 'small').")
    flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")


def settings(
    preset,
    contexts=None,
    batches=None,
    max_prefill_tokens=None,
    keep_every=4,
    repeats=3,
    gdn_impl="auto",
    compile_threads=8,
    tag="",
    out=RESULTS_DIR,
    decode_attention="auto",
    gdn_decode="auto",
) -> dict:
    """The preset with the command line's overrides; SettingsError (one line) on a bad value."""
    from taylorcal_jax.ops.decode_attention import api as decode_api
    from taylorcal_jax.ops.gdn import api
    from taylorcal_jax.ops.gdn import decode_api as gdn_decode_api

    p = dict(PRESETS[preset], preset=preset, keep_every=keep_every, repeats=repeats,
             gdn_impl=gdn_impl, compile_threads=compile_threads, out=out,
             gdn_decode=gdn_decode)  # fmt: skip
    impls = [x.strip() for x in decode_attention.split(",")]
    bad = [x for x in impls if x not in decode_api.IMPLS]
    if bad or len(set(impls)) != len(impls):
        raise SettingsError(
            f"--decode_attention must list distinct entries of {decode_api.IMPLS}, got "
            f"{decode_attention!r}"
        )
    p["decode_attention"] = impls
    p["tag"] = tag or ("small" if preset == "small" else "")
    p["contexts"] = _ints(contexts or p["contexts"], "contexts")
    p["batches"] = _ints(batches or p["batches"], "batches")
    if 1 not in p["batches"]:
        raise SettingsError(
            f"--batches must include 1 (the prefill that fills the caches), got {p['batches']}"
        )
    if max_prefill_tokens is not None:
        p["max_prefill_tokens"] = max_prefill_tokens
    if p["max_prefill_tokens"] < 0:
        raise SettingsError(f"--max_prefill_tokens must be >= 0, got {p['max_prefill_tokens']}")
    if not 2 <= keep_every <= p["layers"]:
        raise SettingsError(
            f"--keep_every must be in [2, {p['layers']}] (a student with both mixers), got "
            f"{keep_every}"
        )
    for name in ("repeats", "compile_threads"):
        if p[name] < 1:
            raise SettingsError(f"--{name} must be >= 1, got {p[name]}")
    if gdn_impl not in api.IMPLS:
        raise SettingsError(f"--gdn_impl must be one of {api.IMPLS}, got {gdn_impl!r}")
    if gdn_decode not in gdn_decode_api.IMPLS:
        raise SettingsError(
            f"--gdn_decode must be one of {gdn_decode_api.IMPLS}, got {gdn_decode!r}"
        )
    return p


def _check_memory(models, params_bytes, p) -> None:
    """Stops before any timing when both models' weights and the largest decode (a cache and
    its fresh copy) cannot fit on the device (where it reports its memory)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return
    batch, slots = max(p["batches"]), max(p["contexts"]) + p["decode_steps"]
    caches = max(
        tree_bytes(jax.eval_shape(lambda m=m: empty_cache(m, batch, slots))) for m in models
    )
    need = params_bytes + 2 * caches
    if need > limit:
        raise SettingsError(
            f"B={batch} at L={max(p['contexts'])} needs {need / 1e9:.1f} GB (weights and two "
            f"copies of the cache) but the device allows {limit / 1e9:.1f} GB; lower --batches "
            "or --contexts"
        )


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        p = settings(
            f.preset, f.contexts, f.batches, f.max_prefill_tokens, f.keep_every, f.repeats,
            f.gdn_impl, f.compile_threads, f.tag, f.out, f.decode_attention, f.gdn_decode,
        )  # fmt: skip
        run(p)
    except SettingsError as e:
        raise app.UsageError(str(e)) from None


def run(p: dict) -> str:
    """The whole benchmark of settings `p`; returns the result .json path."""
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.ops.decode_attention import api as decode_api
    from taylorcal_jax.ops.gdn import api
    from taylorcal_jax.ops.gdn import decode_api as gdn_decode_api

    dtype = jnp.dtype(p["dtype"])
    steps, repeats = p["decode_steps"], p["repeats"]
    cfg = model_shapes.qwen2_config(p, max(p["contexts"]) + steps)
    keep = tuple(range(0, cfg.num_hidden_layers, p["keep_every"]))
    decoders = {}  # decode impl -> {"teacher": model, "student": model}
    for impl in p["decode_attention"]:
        teacher, student = build_models(cfg, keep, dtype, p["gdn_impl"], impl, p["gdn_decode"])
        decoders[impl] = {"teacher": teacher, "student": student}
    models = next(iter(decoders.values()))  # the prefill's (no decoding step in it)
    log(
        f"{jax.devices()[0].device_kind}: {p['preset']} shape, contexts {p['contexts']}, "
        f"batches {p['batches']}, kept layers {list(keep)}"
    )

    t0 = time.perf_counter()
    params = {name: decoding_params(m, i, dtype) for i, (name, m) in enumerate(models.items())}
    params_bytes = {name: tree_bytes(x) for name, x in params.items()}
    weights = {name: weight_bytes(m, dtype) for name, m in models.items()}
    log(
        f"random weights in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(f"{n} {b / 1e9:.3g} GB" for n, b in params_bytes.items())
    )
    _check_memory(models.values(), sum(params_bytes.values()), p)
    bandwidth = copy_bandwidth(p["copy_mib"] << 20, repeats)
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s ({p['copy_mib']} MiB, read + written)")

    shape = {k: p[k] for k in ("layers", "hidden", "heads", "kv", "head_dim", "mlp", "vocab")}
    result = {
        "benchmark": "prefill/decode throughput, cache memory and decode roofline, hybrid "
        "student vs teacher",
        "preset": p["preset"],
        "shape": shape,
        "contexts": p["contexts"],
        "batches": p["batches"],
        "decode_steps": steps,
        "dtype": p["dtype"],
        "keep_full_attention_layers": list(keep),
        "gdn_impl": p["gdn_impl"],
        "gdn_impl_resolved": api.resolve_impl(p["gdn_impl"]),
        "gdn_decode": p["gdn_decode"],
        "gdn_decode_resolved": gdn_decode_api.resolve_impl(p["gdn_decode"]),
        "decode_attention": p["decode_attention"],
        "decode_attention_resolved": [decode_api.resolve_impl(x) for x in p["decode_attention"]],
        "repeats": repeats,
        "max_prefill_tokens": p["max_prefill_tokens"],
        "copy_mib": p["copy_mib"],
        "copy_bandwidth_bytes_per_s": bandwidth,
        "param_bytes": params_bytes,
        "roofline": "decode_bytes_per_step.total / copy_bandwidth_bytes_per_s; the bytes are "
        "all parameters (read once), K and V of the filled slots of every attention layer "
        "(step i of decode_steps attends to context + i + 1 slots, averaged), the new token's "
        "K and V (written) and each recurrent state (read and written)",
        "timing": "median of `repeats` calls after a warm-up call, programs compiled before; "
        "decode = one jitted lax.scan of decode_steps greedy single-token steps from a fresh "
        "(donated) copy of the cache, divided by decode_steps",
        "programs": {},
        "rows": [],
        "complete": False,
        **results_io.provenance(),
    }
    path = write(result, p, with_plot=False)
    log(f"writing {path} (and .md, .png) as rows are measured")

    for context in p["contexts"]:
        compiled = compile_context(models, decoders, params, context, p, result)
        measure_context(models, decoders, params, weights, compiled, context, p, bandwidth, result)
        del compiled
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result.setdefault("peak_device_bytes", {})[str(context)] = stats["peak_bytes_in_use"]
        write(result, p, with_plot=True)

    result["complete"] = True
    path = write(result, p, with_plot=True)
    print(markdown(result))
    log(f"wrote {path} and its .md, .png")
    return path


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    define_flags()
    app.run(main)
