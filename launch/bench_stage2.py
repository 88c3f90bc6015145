"""Distillation stage-2 throughput on one device: a sweep over the settings of the step.

Rows: every combination of --batch_sizes x --seq_lens x --remat x --chunk_sizes (positions per
KL chunk) x --attention_impls (layers.AttentionRuntime.sequence_impl of teacher and student:
"blocked" XLA query blocks, "cudnn" cuDNN's fused attention) x --gdn_fused_projections (the
student's GDNRuntime.fused_projections: its q, k, v, g projections as one product, whose
backward joins their cotangents, or as four), in that order (batch outermost).
Each row builds the stage-2 problem of
launch/bench_scaling.py (taylorcal_jax/train/distill.py on the training loop; the `copy`
student of the teacher with every --keep_every-th layer kept; --dtype compute over float32
masters; the row's remat and KL chunk) on a mesh of one device, and measures:

- compile_s: wall time of lowering and compiling one training step (loop.compiled_step). The
  loop then runs that executable (JAX reuses it), so no warm-up step compiles; a persistent
  compilation cache, when one is set, makes it a load.
- step time: --warmup_steps untimed steps, then --timed_steps timed ones on the training loop
  (bench_scaling.time_steps: a step's time is the wall time between two consecutive steps'
  metrics on the host, batch building and placement included); median_step_s is their
  median, and tokens_per_s = batch_size x seq_len / median_step_s.
- MFU = 6 N tokens_per_s / peak, N the student's parameter count and peak the dense bf16
  FLOP/s of the device (launch/recovery.py's `throughput` and PEAK_BF16_FLOPS; null on a
  device without a peak there, e.g. a CPU). mfu_with_teacher = (6 N + 2 N_teacher)
  tokens_per_s / peak also credits the teacher's forward on the same tokens;
  mfu_with_attention adds the causal softmax attention's q k^T and p v products, which hold
  no weights and so are not in N: 3x their forward FLOPs in the student's kept layers
  (forward and backward) and 1x in the teacher's layers (recovery.attention_flops_per_token):
  the model FLOPs of the step.
- executed FLOPs: XLA's cost analysis of the compiled step, per token
  (count_stage2_flops.step_flops), over 6 N (executed_over_counted) and over 6 N + 2 N_teacher
  (executed_over_necessary); hfu = executed FLOPs per token x tokens_per_s / peak, the share
  of the peak the device spends on the work it executes. XLA does not count inside custom
  calls: with the Pallas GDN kernel (--gdn_impl=auto on a GPU) the kernel's FLOPs are not in
  the count; --gdn_impl=chunked counts them all, timing the op's XLA form instead. A count
  below 6 N (0.22x on one H200) misses work the step must do: it is marked incomplete and no
  hfu is computed from it.
- memory: compiled_step_bytes, XLA's memory analysis of the step (arguments + outputs +
  temporaries - aliased), always; where the backend keeps allocator statistics (a GPU), also
  the allocator's peak_bytes_in_use after the row, the figure the report shows. That peak is
  process-wide: it is this row's peak when it rose during the row (allocator_peak_is_row),
  else an upper bound of it.

A row that fails (out of memory when compiling or running, or any other error) is recorded
with its one-line error, and the sweep goes on. The result files are rewritten after every
row, so a run cut short keeps the rows it finished; no row starts once --budget_s seconds
have passed since the sweep began (the teacher's loading included), and the rows left are
listed as not started.

The GPU command (one H200, one call of under 8 minutes). With the SmolLM2 GGUF staged as
launch/smollm2_gpu.sh does (`split` here, then a first call running `stage` carrying
workdirs/gguf_a), the second call carries workdirs/gguf_b and .whl/ (the wheels the device
lacks, ml-collections and gguf among them):

    cat ~/smollm2/*.part_a workdirs/gguf_b/*.part_b > /tmp/smollm2.gguf
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD timeout 470 python3 launch/bench_stage2.py --tag=h200 \\
        --smollm2_gguf=/tmp/smollm2.gguf --batch_sizes=8,16,32 --remat=true,false \\
        --chunk_sizes=512,2048 --budget_s=400 --out="$OUT"

The weights' values do not change the step's work: --random_smollm2 in place of
--smollm2_gguf needs no staging (one call, .whl/ carried).

A CPU dry run with tiny shapes (two rows, remat on and off), in well under a minute:

    python launch/bench_stage2.py --preset=small --out=/tmp/bench_stage2

Writes <out>/bench_stage2_<tag>.{json,md} (tag default: "small", or the device kind):
device, versions, date, command, git, settings, one row per setting, the rows not started.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time

import results_io  # launch/

DTYPES = ("bfloat16", "float32")
BOOLS = {"true": True, "false": False}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a sweep measures (the flags, or --preset=small)."""

    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]
    remat: tuple[bool, ...]
    chunk_sizes: tuple[int, ...]  # positions per KL chunk
    warmup_steps: int
    timed_steps: int
    dtype: str
    keep_every: int
    gdn_impl: str
    smollm2_gguf: str
    random_smollm2: bool
    budget_s: float  # no row starts after this many seconds (0: no limit)
    small: bool
    attention_impls: tuple[str, ...] = ("blocked",)  # layers.SEQUENCE_IMPLS
    gdn_fused_projections: tuple[bool, ...] = (True,)  # GDNRuntime.fused_projections, innermost

    def shape(self) -> dict:
        """The teacher's shape: SmolLM2-135M's, or the tiny stand-in of --preset=small."""
        import bench_scaling  # launch/

        if self.small:
            return bench_scaling.SMALL_SHAPES["stage2_smollm2"]
        return bench_scaling.SMOLLM2_135M


@dataclasses.dataclass(frozen=True)
class Point:
    """The settings of one row."""

    batch_size: int
    seq_len: int
    remat: bool
    chunk_size: int
    attention_impl: str = "blocked"
    gdn_fused_projections: bool = True

    def label(self) -> str:
        """The row's settings in words; the GDN projections named only when not joined (the
        models' default)."""
        label = (
            f"batch {self.batch_size} x {self.seq_len}, remat={self.remat}, "
            f"KL chunk {self.chunk_size}, attention {self.attention_impl}"
        )
        return label if self.gdn_fused_projections else label + ", GDN projections separate"


def _projections(fused: bool) -> str:
    return "joined" if fused else "separate"


# ------------------------------------------------------------------------- pure parts


def parse_ints(name: str, values) -> tuple[int, ...]:
    """The integers of a list flag; one-line ValueError for an entry that is not one."""
    out = []
    for v in values:
        try:
            out.append(int(v))
        except ValueError:
            raise ValueError(f"--{name}: {v!r} is not an integer") from None
    return tuple(out)


def parse_bools(name: str, values) -> tuple[bool, ...]:
    """The booleans ("true"/"false") of a list flag; one-line ValueError otherwise."""
    out = []
    for v in values:
        if v.lower() not in BOOLS:
            raise ValueError(f"--{name}: {v!r} is neither true nor false")
        out.append(BOOLS[v.lower()])
    return tuple(out)


def parse_axes(
    batch_sizes, seq_lens, remat, chunk_sizes, attention_impls, gdn_fused_projections=("true",)
) -> dict:
    """The sweep's axes (Settings fields) from their list flags' entries; one-line ValueError
    for a malformed entry."""
    return {
        "batch_sizes": parse_ints("batch_sizes", batch_sizes),
        "seq_lens": parse_ints("seq_lens", seq_lens),
        "remat": parse_bools("remat", remat),
        "chunk_sizes": parse_ints("chunk_sizes", chunk_sizes),
        "attention_impls": tuple(attention_impls),
        "gdn_fused_projections": parse_bools("gdn_fused_projections", gdn_fused_projections),
    }


def check_settings(s: Settings) -> None:
    """One-line ValueError for settings that cannot run, before any work."""
    import jax

    from taylorcal_jax.models.layers import SEQUENCE_IMPLS
    from taylorcal_jax.ops.dispatch import GPU_BACKENDS
    from taylorcal_jax.ops.gdn import api

    lists = {
        "batch_sizes": s.batch_sizes,
        "seq_lens": s.seq_lens,
        "remat": s.remat,
        "chunk_sizes": s.chunk_sizes,
        "attention_impls": s.attention_impls,
        "gdn_fused_projections": s.gdn_fused_projections,
    }
    for name, values in lists.items():
        if not values:
            raise ValueError(f"--{name} is empty")
        if len(set(values)) < len(values):
            raise ValueError(f"--{name}={','.join(map(str, values))} repeats a value")
    if min(s.batch_sizes) < 1:
        raise ValueError(f"--batch_sizes={min(s.batch_sizes)}: each must be at least 1")
    if min(s.seq_lens) < 2:
        raise ValueError(f"--seq_lens={min(s.seq_lens)}: each must be at least 2")
    shortest = min(s.seq_lens)
    for c in s.chunk_sizes:
        if not 1 <= c <= shortest:
            raise ValueError(
                f"--chunk_sizes={c}: each must be 1 to the shortest --seq_lens ({shortest})"
            )
    if s.warmup_steps < 1 or s.timed_steps < 1:
        raise ValueError("--warmup_steps and --timed_steps must be at least 1")
    if s.dtype not in DTYPES:
        raise ValueError(f"--dtype={s.dtype}: choose from {', '.join(DTYPES)}")
    if s.keep_every < 1:
        raise ValueError(f"--keep_every={s.keep_every} must be at least 1")
    if s.gdn_impl not in api.IMPLS:
        raise ValueError(f"--gdn_impl={s.gdn_impl}: choose from {', '.join(api.IMPLS)}")
    try:
        api.resolve_impl(s.gdn_impl)
    except api.ImplementationUnavailableError as e:
        raise ValueError(f"--gdn_impl={s.gdn_impl}: {e}") from None
    for impl in s.attention_impls:
        if impl not in SEQUENCE_IMPLS:
            raise ValueError(f"--attention_impls={impl}: choose from {', '.join(SEQUENCE_IMPLS)}")
    gpu = jax.default_backend() in GPU_BACKENDS
    if "cudnn" in s.attention_impls and (s.dtype != "bfloat16" or not gpu):
        raise ValueError("--attention_impls=cudnn needs --dtype=bfloat16 and a GPU")
    if s.budget_s < 0:
        raise ValueError(f"--budget_s={s.budget_s} must be >= 0 (0: no limit)")
    if not s.small and bool(s.smollm2_gguf) == s.random_smollm2:
        raise ValueError("give one of --smollm2_gguf=<file.gguf> and --random_smollm2")


def points(s: Settings) -> list[Point]:
    """The rows' settings, batch outermost, then sequence length, remat, KL chunk, attention,
    GDN projections."""
    axes = (s.batch_sizes, s.seq_lens, s.remat, s.chunk_sizes, s.attention_impls)
    return [Point(*p) for p in itertools.product(*axes, s.gdn_fused_projections)]


def one_line(error: BaseException, limit: int = 300) -> str:
    """The error as `<type>: <first non-empty line of its message>`, at most `limit`
    characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def counted_throughput(counts: dict, tokens_per_s, kind: str) -> dict:
    """recovery.throughput at tokens_per_s for a step whose `counts` hold n_student, n_teacher
    and {student,teacher}_attention_flops_per_token (a row of this sweep or of
    profile_steps)."""
    import recovery  # launch/

    return recovery.throughput(
        tokens_per_s,
        counts["n_student"],
        counts["n_teacher"],
        kind,
        student_attention=counts["student_attention_flops_per_token"],
        teacher_attention=counts["teacher_attention_flops_per_token"],
    )


def throughput_fields(row: dict, kind: str) -> dict:
    """median_step_s, tokens_per_s, mfu, mfu_with_teacher, mfu_with_attention and hfu of a row
    that has step_seconds, tokens_per_step, step_flops' fields and the models' attention FLOPs
    per token (module docstring)."""
    import bench_scaling  # launch/

    median_s = bench_scaling.median(row["step_seconds"])
    tps = row["tokens_per_step"] / median_s
    th = counted_throughput(row, tps, kind)
    peak = th["peak_bf16_flops"]
    return {
        "median_step_s": median_s,
        "tokens_per_s": tps,
        "mfu": th["mfu"],
        "mfu_with_teacher": th["mfu_with_teacher"],
        "mfu_with_attention": th["mfu_with_attention"],
        # a count below the model's own 6 N misses work XLA cannot see into (on a GPU: the
        # Pallas kernels and library GEMMs), so no utilisation is computed from it
        "hfu": None
        if peak is None or row["executed_over_counted"] < 1
        else row["executed_flops_per_token"] * tps / peak,
    }


def _peak(flops) -> str:
    return "unknown for this device (MFU n/a)" if flops is None else f"{flops / 1e12:g} TFLOP/s"


def _memory_cell(mem: dict | None) -> str:
    if not mem:
        return ""
    if mem.get("allocator_peak_bytes") is not None:
        bound = "" if mem["allocator_peak_is_row"] else "<= "
        return f"{bound}{results_io.gib_cell(mem['allocator_peak_bytes'])} GiB (allocator)"
    return f"{results_io.gib_cell(mem['compiled_step_bytes'])} GiB (compiled)"


def markdown(result: dict) -> str:
    """The result as a Markdown report."""
    s = result["settings"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    lines = [
        f"Stage-2 step throughput on {result['device']}, {result['date']}, "
        f"JAX {result['jax_version']}; teacher {result['teacher']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{s['warmup_steps']} warm-up + {s['timed_steps']} timed steps per row (median), "
        f"{s['dtype']} compute over float32 masters, every {s['keep_every']}th layer kept, "
        f"GDN op {result['gdn_impl_resolved']}. MFU = 6 N tokens/s / peak"
        + (f", N = {ok[0]['n_student']:,} student params" if ok else "")
        + f"; peak {_peak(result['peak_bf16_flops'])}; "
        "w/ teacher: + 2 N_teacher per token; + attention: + the causal softmax attention's "
        "q k^T and p v (student 3x forward, teacher 1x), the model FLOPs of the step; "
        "executed: XLA's FLOPs of the compiled step; HFU: executed FLOP/s / peak.",
        "",
    ]
    if not result["complete"]:
        lines += ["**Incomplete**: the sweep stopped before its last row.", ""]
    lines += [
        "| batch | seq | remat | KL chunk | attention | GDN projections | compile s | "
        "median step s | tokens/s | MFU | MFU w/ teacher | MFU w/ teacher + attention | "
        "executed / 6N | HFU | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        head = (
            f"| {r['batch_size']} | {r['seq_len']} | {r['remat']} | {r['chunk_size']} | "
            f"{r.get('attention_impl', 'blocked')} | "
            f"{_projections(r.get('gdn_fused_projections', True))} | "
        )
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        if r["status"] != "ok":
            cells = [compile_s, f"failed: {r['error']}", *[""] * 6, _memory_cell(r.get("memory"))]
        else:
            cells = [
                compile_s,
                f"{r['median_step_s']:.4f}",
                f"{r['tokens_per_s']:,.0f}",
                results_io.percent_cell(r["mfu"]),
                results_io.percent_cell(r["mfu_with_teacher"]),
                results_io.percent_cell(r["mfu_with_attention"]),
                f"{r['executed_over_counted']:.2f}"
                + (" (incomplete)" if r["executed_over_counted"] < 1 else ""),
                results_io.percent_cell(r["hfu"]),
                _memory_cell(r["memory"]),
            ]
        lines.append(head + " | ".join(cells) + " |")
    if result["not_started"]:
        lines += [
            "",
            f"Not started (--budget_s={s['budget_s']:g} reached): "
            + "; ".join(Point(**p).label() for p in result["not_started"])
            + ".",
        ]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: str, tag: str) -> dict:
    """<out_dir>/bench_stage2_<tag>.{json,md}, each written whole (a cut run leaves the
    previous complete file)."""

    path = results_io.write_result(
        out_dir, "bench_stage2", tag, result["settings"]["small"], result
    )
    md = results_io.write_text(path[: -len(".json")] + ".md", markdown(result))
    return {"json": path, "md": md}


# ------------------------------------------------------------------------- measurement


def measure(point: Point, s: Settings, cfg, teacher, mesh, kind: str) -> dict:
    """One row: compile, FLOP count and compiled memory, then the timed steps; a failure
    leaves what was measured before it, status "failed" and the one-line error."""
    import gc

    import bench_scaling  # launch/

    row = {**dataclasses.asdict(point), "tokens_per_step": point.batch_size * point.seq_len}
    peak_before = bench_scaling.allocator_peaks(mesh)
    try:
        _compile_and_time(row, point, s, cfg, teacher, mesh, kind)
        row["status"] = "ok"
    except Exception as e:  # a failing row (out of memory) is a result: the sweep goes on
        row.update(status="failed", error=one_line(e))
    gc.collect()  # the row's arrays in reference cycles, before the next row
    peak_after = bench_scaling.allocator_peaks(mesh)
    if peak_after is not None:
        row.setdefault("memory", {})
        row["memory"]["allocator_peak_bytes"] = peak_after[0]
        row["memory"]["allocator_peak_is_row"] = peak_after[0] > peak_before[0]
    return row


def compile_step(point: Point, s: Settings, cfg, teacher, mesh):
    """The row's stage-2 problem (bench_scaling.stage2_problem), its task on `mesh`, the training
    step compiled from the state's shapes (loop.compiled_step; the loop then runs that
    executable) and the seconds the compilation took: (problem, task, compiled, seconds)."""
    import bench_scaling  # launch/
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.train import loop

    problem = bench_scaling.stage2_problem(
        cfg,
        teacher,
        keep_every=s.keep_every,
        gdn_impl=s.gdn_impl,
        dtype=s.dtype,
        chunk_size=point.chunk_size,
        remat=point.remat,
        attention_impl=point.attention_impl,
        fused_projections=point.gdn_fused_projections,
    )
    task = problem.task(mesh)
    state = jax.eval_shape(  # shapes only: the loop builds the state it trains
        lambda p: loop.init_state(task, p, rng=jax.random.PRNGKey(0)), problem.student
    )
    batch = jax.ShapeDtypeStruct((point.batch_size, point.seq_len), jnp.int32)
    start = time.perf_counter()
    compiled = loop.compiled_step(task, state, batch, mesh=mesh, constants=teacher)
    return problem, task, compiled, time.perf_counter() - start


def attention_fields(problem, seq_len: int) -> dict:
    """{student,teacher}_attention_flops_per_token of a step's two models at seq_len
    (recovery.attention_flops_per_token)."""
    import recovery  # launch/

    return {
        f"{name}_attention_flops_per_token": recovery.attention_flops_per_token(
            model.config, model.mixers, seq_len
        )
        for name, model in (("student", problem.student_model), ("teacher", problem.teacher_model))
    }


def _compile_and_time(row: dict, point: Point, s: Settings, cfg, teacher, mesh, kind: str):
    """Adds to `row` as each is measured: compile_s, step_flops' fields and memory, then the
    steps' seconds, losses and throughput_fields."""
    import bench_scaling  # launch/
    import count_stage2_flops  # launch/

    problem, task, compiled, row["compile_s"] = compile_step(point, s, cfg, teacher, mesh)
    tokens = point.batch_size * point.seq_len
    row.update(count_stage2_flops.step_flops(compiled, problem.student, teacher, tokens))
    row.update(attention_fields(problem, point.seq_len))
    row["memory"] = {"compiled_step_bytes": bench_scaling.compiled_bytes(compiled)}
    del compiled
    batches = bench_scaling.random_batches(cfg.vocab_size, point.batch_size, point.seq_len)
    steps = s.warmup_steps + s.timed_steps
    _, seconds, losses = bench_scaling.time_steps(
        task, mesh, problem.student, teacher, batches, steps, point.label()
    )
    row["warmup_step_seconds"] = seconds[: s.warmup_steps]
    row["step_seconds"] = seconds[s.warmup_steps :]
    row["losses"] = losses
    row.update(throughput_fields(row, kind))


def run_sweep(s: Settings, out_dir: str, tag: str, cache_dir: str) -> dict:
    """Every row of `s` in order, the result files rewritten after each; the result."""
    import bench_scaling  # launch/
    import jax
    import parity_real_teacher  # launch/ (its versions())
    import recovery  # launch/

    from taylorcal_jax.ops.gdn import api
    from taylorcal_jax.utils import progress, sharding

    check_settings(s)
    t0 = time.perf_counter()
    log = results_io.progress_log(t0)
    progress.set_enabled(False)  # one line per row instead
    gguf_file = "" if s.small else s.smollm2_gguf
    log("loading the teacher ...")
    cfg, teacher, source = bench_scaling.stage2_teacher(s.shape(), "llama", gguf_file, cache_dir)
    mesh = sharding.make_mesh({"layers": 1, "data": 1, "fsdp": 1}, jax.devices()[:1])
    kind = jax.devices()[0].device_kind
    result = {
        "benchmark": "distillation stage-2 step throughput on one device",
        **results_io.provenance(),
        "versions": parity_real_teacher.versions(),
        "device_kind": kind,
        "peak_bf16_flops": recovery.PEAK_BF16_FLOPS.get(kind),
        "teacher": source,
        "shape": s.shape(),
        "gdn_impl_resolved": api.resolve_impl(s.gdn_impl),
        "settings": dataclasses.asdict(s),
        "rows": [],
        "not_started": [],
        "complete": False,
    }
    grid = points(s)
    for i, point in enumerate(grid):
        if s.budget_s and time.perf_counter() - t0 > s.budget_s:
            result["not_started"] = [dataclasses.asdict(p) for p in grid[i:]]
            log(f"--budget_s={s.budget_s:g} reached: {len(grid) - i} rows not started")
            break
        log(f"row {i + 1}/{len(grid)}: {point.label()}: compiling and running ...")
        row = measure(point, s, cfg, teacher, mesh, kind)
        result["rows"].append(row)
        write_outputs(result, out_dir, tag)
        log(f"row {i + 1}/{len(grid)}: {point.label()}: {_summary(row)}")
    else:
        result["complete"] = True
    paths = write_outputs(result, out_dir, tag)
    log(f"wrote {paths['json']} and {paths['md']}")
    return result


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"FAILED ({row['error']})"
    return (
        f"{row['tokens_per_s']:,.0f} tokens/s, MFU {results_io.percent_cell(row['mfu'])}, "
        f"compile {row['compile_s']:.1f} s, executed {row['executed_over_counted']:.2f}x 6N, "
        f"peak memory {_memory_cell(row['memory'])}"
    )


# ------------------------------------------------------------------------- command line


def small_settings(**overrides) -> Settings:
    """--preset=small: a tiny teacher, two rows (remat on and off), seconds on a CPU."""
    base = dict(
        batch_sizes=(2,),
        seq_lens=(32,),
        remat=(True, False),
        chunk_sizes=(16,),
        warmup_steps=1,
        timed_steps=2,
        dtype="bfloat16",
        keep_every=4,
        gdn_impl="chunked",
        smollm2_gguf="",
        random_smollm2=True,
        budget_s=0.0,
        small=True,
    )
    return Settings(**{**base, **overrides})


# What --preset=small sets, whatever the command line says (small_settings).
SMALL_PRESET_FLAGS = (
    "batch_sizes", "seq_lens", "remat", "chunk_sizes", "attention_impls",
    "gdn_fused_projections", "warmup_steps", "timed_steps", "dtype", "keep_every", "gdn_impl",
    "smollm2_gguf", "random_smollm2",
)  # fmt: skip


def settings_from_flags(f) -> Settings:
    """The Settings of the parsed flags `f` (ValueError for a malformed list entry)."""
    if f.preset == "small":
        import bench_scaling  # launch/

        bench_scaling.refuse_flags_of_preset(f, SMALL_PRESET_FLAGS)
        return small_settings(budget_s=f.budget_s)
    return Settings(
        **parse_axes(
            f.batch_sizes,
            f.seq_lens,
            f.remat,
            f.chunk_sizes,
            f.attention_impls,
            f.gdn_fused_projections,
        ),
        warmup_steps=f.warmup_steps,
        timed_steps=f.timed_steps,
        dtype=f.dtype,
        keep_every=f.keep_every,
        gdn_impl=f.gdn_impl,
        smollm2_gguf=f.smollm2_gguf,
        random_smollm2=f.random_smollm2,
        budget_s=f.budget_s,
        small=False,
    )


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        s = settings_from_flags(flags.FLAGS)
        check_settings(s)
        if s.smollm2_gguf and not s.small:
            from taylorcal_jax.models import gguf

            gguf.check_gguf_file(s.smollm2_gguf)  # a missing or wrong file fails here
    except (ValueError, ImportError) as e:
        raise app.UsageError(str(e)) from None
    run_sweep(s, flags.FLAGS.out, flags.FLAGS.tag, flags.FLAGS.cache_dir)


def define_flags() -> None:
    import bench_scaling  # launch/
    from absl import flags

    flags.DEFINE_enum("preset", "full", ["full", "small"], "small: tiny shapes (CPU dry run).")
    flags.DEFINE_list("batch_sizes", ["8"], "Sequences per step, one row each.")
    flags.DEFINE_list("seq_lens", ["2048"], "Tokens per sequence, one row each.")
    flags.DEFINE_list("remat", ["true", "false"], "Rematerialise each block: true and/or false.")
    flags.DEFINE_list("chunk_sizes", ["512"], "Positions per KL chunk, one row each.")
    flags.DEFINE_list(
        "attention_impls",
        ["blocked"],
        "Softmax attention of both models (layers.SEQUENCE_IMPLS; cudnn: GPU, bf16), one row each.",
    )
    flags.DEFINE_list(
        "gdn_fused_projections",
        ["true"],
        "The student's GDN q, k, v, g projections as one product (true) and/or four (false), "
        "one row each.",
    )
    flags.DEFINE_integer("warmup_steps", 2, "Untimed steps per row (after its compilation).")
    flags.DEFINE_integer("timed_steps", 8, "Timed steps per row (median).")
    flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "Compute dtype (float32 masters).")
    flags.DEFINE_integer("keep_every", 4, "Keep attention in every k-th layer.")
    flags.DEFINE_string("gdn_impl", "auto", "GDN op implementation.")
    flags.DEFINE_float("budget_s", 0.0, "No row starts after this many seconds (0: no limit).")
    bench_scaling.define_teacher_flags()
    flags.DEFINE_string("tag", "", "Result files bench_stage2_<tag>.{json,md}.")
    flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from absl import app

    define_flags()
    app.run(main)
