"""The few-row dense product alone: XLA's dot against our kernel (taylorcal_jax/ops/gemv) under
launch configurations, on the weight shapes of a decoding step, as a fraction of the copy
bandwidth.

Letters: M rows of x (a decoding step's batch), K x N the weight.

A decoding step at batch 1 reads every weight once and does one multiply-add per weight
element, so each product is bound by the bandwidth: its ceiling is K N bytes-per-element / the
copy bandwidth (bench_inference.copy_bandwidth, the roofline's bandwidth). Per (shape, M) row:

- the weights: enough distinct random bf16 copies of W (2 to 16) that they together exceed
  the preset's rotation_mib, or 16 where that takes more (16 of the 1536 x 1536 weights are
  75.5 MB, still above an H100's 50 MB L2 cache, which holds one 27 MB MLP weight; a product
  repeated on one W would read it from there), each multiplied by its own random x [M, K],
  back to back in one jitted call, as a decoding step runs its products (no two products
  share an operand: XLA merges products that do, e.g. one x times several W, into one);
- the time of one product: the median over repeats of (wall time of `calls` such calls, one
  synchronisation at the end) / (calls x products per call);
- "xla": lax.dot_general as the models compute it (nn.Dense); "kernel <config>": gemv_pallas
  under one GemvConfig, its float32 partial sums reduced by XLA in the same call (part of its
  cost);
- each kernel row's largest relative error against XLA's float32 product of the same operands.

Writes <out>/bench_gemv_<tag>.{json,md}, rewritten after every shape.

    python launch/bench_gemv.py --tag=h100           # Qwen2.5-1.5B's decode products
    python launch/bench_gemv.py --preset=small       # CPU dry run (interpret mode), seconds
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import results_io  # launch/
from absl import app, flags
from bench_inference import RESULTS_DIR, copy_bandwidth  # launch/

MAX_COPIES = 16
# (name, K, N) of the Qwen2.5-1.5B decoding step's products (docs/benchmarks.md §4)
QWEN2_5_1_5B_SHAPES = (
    ("attention q / o, GDN o", 1536, 1536),
    ("GDN q,k,v,g joined", 1536, 6144),
    ("MLP gate or up", 1536, 8960),
    ("MLP gate and up joined", 1536, 17920),
    ("MLP down", 8960, 1536),
)
PRESETS = {
    "qwen2_5_1_5b": dict(
        shapes=QWEN2_5_1_5B_SHAPES,
        rows=(1, 16),
        rotation_mib=128,
        calls=50,
        repeats=5,
        programs=(264, 528, 1056, 2112),
        block_n=(128,),
        block_k=(64, 128),
        warps=(4, 8),
    ),  # fmt: skip
    "small": dict(
        shapes=(("small", 64, 96),),
        rows=(1, 3),
        rotation_mib=0,
        calls=1,
        repeats=1,
        programs=(4, 16, 32),
        block_n=(32,),
        block_k=(32,),
        warps=(4,),
    ),  # fmt: skip
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One timing: a product of x [m, k] by W [k, n] by `impl` ("xla" or "kernel")."""

    shape: str
    m: int
    k: int
    n: int
    impl: str
    config: dict | None
    seconds: float
    bytes_per_s: float
    of_copy_bandwidth: float
    max_rel_error: float | None


def configs(p: dict, m: int) -> list:
    """The GemvConfigs timed at m rows: the whole grid of the preset at one row (the batch-1
    products, the kernel's use), the default alone at more rows."""
    from taylorcal_jax.ops.gemv.pallas_gpu import GemvConfig

    if m > 1:
        return [GemvConfig()]
    grid = itertools.product(p["programs"], p["block_n"], p["block_k"], p["warps"])
    swept = [GemvConfig(programs=a, block_n=b, block_k=c, warps=d) for a, b, c, d in grid]
    return [GemvConfig(), *swept]  # the default first; measure_shape skips repeated launches


def time_products(product, xs, weights, calls: int, repeats: int) -> float:
    """Seconds per product: median over `repeats` of `calls` jitted calls, each multiplying
    xs[i] by weights[i] for every i (no two products share an operand, so that XLA merges
    none), over calls x len(weights)."""
    import jax
    import numpy as np

    call = jax.jit(lambda xs, ws: [product(x, w) for x, w in zip(xs, ws, strict=True)])
    jax.block_until_ready(call(xs, weights))
    times = []
    for _ in range(repeats):
        out, t0 = None, time.perf_counter()
        for _ in range(calls):
            out = call(xs, weights)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / (calls * len(weights)))
    return float(np.median(times))


def measure_row(shape, xs, weights, exact, impl, config, p, bandwidth, log) -> Row:
    """One timing (module docstring): XLA's product when `config` is None, else the kernel's
    under `config`, with its largest relative error against `exact` (float32, xs[0] W[0])."""
    import jax
    import numpy as np
    from jax import lax

    from taylorcal_jax.ops.gemv.pallas_gpu import gemv_pallas

    interpret = jax.default_backend() == "cpu"
    (m, k), n = xs[0].shape, weights[0].shape[1]
    if config is None:
        product = lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ())))  # noqa: E731
    else:
        product = lambda x, w: gemv_pallas(x, w, interpret=interpret, config=config)  # noqa: E731
    seconds = time_products(product, xs, weights, p["calls"], p["repeats"])
    err = None
    if config is not None:
        got = np.asarray(product(xs[0], weights[0]), np.float32)
        err = float(np.max(np.abs(got - exact)) / np.max(np.abs(exact)))
    w_bytes = weights[0].size * weights[0].dtype.itemsize
    asdict = None if config is None else dataclasses.asdict(config)
    row = Row(shape, m, k, n, impl, asdict, seconds, w_bytes / seconds,
              w_bytes / seconds / bandwidth, err)  # fmt: skip
    what = impl if config is None else f"kernel {asdict}"
    log(f"  {shape} [{m}, {k}] x [{k}, {n}] {what}: {seconds * 1e6:.2f} us, "
        f"{row.of_copy_bandwidth:.0%} of the copy bandwidth")  # fmt: skip
    return row


def measure_shape(name, k, n, p, bandwidth, log) -> list[Row]:
    """Every row of one weight shape (module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    w_bytes = k * n * 2
    # distinct weights, at most MAX_COPIES (each is a call site of the compiled program)
    copies = min(MAX_COPIES, max(2, -(-(p["rotation_mib"] << 20) // w_bytes)))
    keys = jax.random.split(jax.random.key(k * 7919 + n), copies + 1)
    weights = [jax.random.normal(r, (k, n), jnp.bfloat16) * k**-0.5 for r in keys[1:]]
    rows = []
    for m in p["rows"]:
        rx = jax.random.split(jax.random.fold_in(keys[0], m), copies)
        xs = [jax.random.normal(r, (m, k), jnp.bfloat16) for r in rx]
        wide = (xs[0].astype(jnp.float32), weights[0].astype(jnp.float32))
        exact = np.asarray(jnp.dot(*wide, precision="highest"))
        args = (xs, weights, exact)
        rows.append(measure_row(name, *args, "xla", None, p, bandwidth, log))
        timed = set()  # configs that launch the same programs are timed once
        for config in configs(p, m):
            launch = (config.plan(k, n), config.warps)
            if launch[0] is not None and launch not in timed:
                timed.add(launch)
                rows.append(measure_row(name, *args, "kernel", config, p, bandwidth, log))
    return rows


def markdown(result: dict) -> str:
    """The result as a table per shape and rows: XLA, the best kernel config, the default."""
    from taylorcal_jax.ops.gemv.pallas_gpu import GemvConfig

    lines = [
        f"# Few-row products alone: {result['device']}",
        "",
        f"{result['date']}, JAX {result['jax_version']}, git {result['git']}, source digest "
        f"{result['source_digest']}. Command: `{result['command']}`.",
        "",
        f"Copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; bf16 weights "
        f"rotated over {result['settings']['rotation_mib']} MiB (at most 16 copies); median of "
        f"{result['settings']['repeats']} x {result['settings']['calls']} calls.",
        "",
        "| weight | K x N | rows | XLA us | XLA of bw | best kernel us | best of bw | best config "
        "| default kernel us | default of bw | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    default = dataclasses.asdict(GemvConfig())
    groups = {}
    for r in result["rows"]:
        groups.setdefault((r["shape"], r["k"], r["n"], r["m"]), []).append(r)
    for (shape, k, n, m), rows in groups.items():
        xla = next(r for r in rows if r["impl"] == "xla")
        kernels = [r for r in rows if r["impl"] == "kernel"]
        if not kernels:
            continue
        best = min(kernels, key=lambda r: r["seconds"])
        dflt = next((r for r in kernels if r["config"] == default), None)
        cfg = ", ".join(f"{a}={b}" for a, b in best["config"].items())
        err = max(r["max_rel_error"] for r in kernels)
        d_us = "" if dflt is None else f"{dflt['seconds'] * 1e6:.2f}"
        d_bw = "" if dflt is None else f"{dflt['of_copy_bandwidth']:.0%}"
        lines.append(
            f"| {shape} | {k} x {n} | {m} | {xla['seconds'] * 1e6:.2f} | "
            f"{xla['of_copy_bandwidth']:.0%} | {best['seconds'] * 1e6:.2f} | "
            f"{best['of_copy_bandwidth']:.0%} | {cfg} | {d_us} | {d_bw} | {err:.1e} |"
        )
    return "\n".join(lines) + "\n"


def run(p: dict) -> str:
    """Every shape of settings `p`; returns the .json path."""
    import jax

    log = results_io.progress_log()
    bandwidth = copy_bandwidth(64 << 20 if p["preset"] == "small" else 2048 << 20, 5)
    log(f"{jax.devices()[0].device_kind}: copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    result = {
        "benchmark": "few-row products alone: XLA against ops/gemv's kernel",
        **results_io.provenance(),
        "settings": {a: list(b) if isinstance(b, tuple) else b for a, b in p.items()},
        "copy_bandwidth_bytes_per_s": bandwidth,
        "rows": [],
    }
    path = ""
    for name, k, n in p["shapes"]:
        log(f"{name}: [{k}, {n}]")
        result["rows"] += [
            dataclasses.asdict(r) for r in measure_shape(name, k, n, p, bandwidth, log)
        ]
        path = results_io.write_result(
            p["out"], "bench_gemv", p["tag"], p["preset"] == "small", result
        )
        results_io.write_text(path[: -len(".json")] + ".md", markdown(result))
    log(f"wrote {path} and its .md")
    return path


def main(argv):
    del argv
    f = flags.FLAGS
    p = dict(
        PRESETS[f.preset],
        preset=f.preset,
        out=f.out,
        tag=f.tag or ("small" if f.preset == "small" else ""),
    )
    run(p)


if __name__ == "__main__":
    flags.DEFINE_enum("preset", "qwen2_5_1_5b", list(PRESETS), "Weight shapes and the sweep.")
    flags.DEFINE_string("tag", "", "Result file tag (default: the device kind, or 'small').")
    flags.DEFINE_string("out", RESULTS_DIR, "Out dir.")
    app.run(main)
