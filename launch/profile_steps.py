"""Where the time of a decode step and of a distillation stage-2 step goes: device kernels and
idle gaps, read from a JAX profiler trace (no Nsight needed).

Targets (--targets; rows in the order given, the decode targets' rows paired: per (L, B) one
row of each decode target asked for):

  decode_student, decode_teacher
      one call of bench_inference.decode_program: N = --decode_steps greedy single-token steps
      (one jitted lax.scan) of the student or the teacher of the Qwen2.5-1.5B shape (random
      weights, bench_inference.build_models), batch B, from a cache of L + N slots whose first L
      are filled (probe_decode.filled_cache: no prefill to compile); a row per (--context L,
      --batch B), decoding attention --decode_attention, the student's GDN decoding step
      --gdn_decode (XLA's programs or one Pallas kernel).
  stage2
      one distillation stage-2 training step (bench_scaling.stage2_problem, the program
      loop.compiled_step compiles, as bench_stage2 builds it) of SmolLM2-135M (--smollm2_gguf,
      or random weights of its shape with --random_smollm2); a row per point of --batch_sizes x
      --seq_lens x --remat x --chunk_sizes (bench_stage2.points).

Per row the program is compiled and called once (warm-up); then timed --calls times without the
profiler (the wall time a user sees); then called --calls times under
`jax.profiler.trace(dir, create_perfetto_trace=True)`, each call inside a
`jax.profiler.TraceAnnotation("profile_steps call <i>")`. Work a call needs but that is not
the step (a decode call's fresh copy of the cache, which it donates) is done before the call's
timer and annotation start. The trace file (perfetto_trace.json.gz under
<trace_dir>/<tag>/<row>/; never copied into the results) is summarised by
launch/trace_summary.py, whose docstring defines the figures: the device events of each call,
its wall and busy time and the gaps between, the busy time per kernel name, family and launch
count, and the model operations each of the top kernels computes.

How to read a row. Decode rows have the roofline of a step: bench_inference.decode_step_bytes
over the copy bandwidth measured in the same run (bench_inference.copy_bandwidth), next to the
busy time per step (busy / N) and the untraced wall time per step. busy >> roofline: the kernels
are slow (the top names say which); wall >> busy: the device idles (the gaps say where). Stage-2
rows have tokens/s and MFU (recovery.throughput: 6 N tokens/s over the bf16 peak) at the untraced
step time and at the busy time (what the kernels would give if the device never idled), the
MFU of the whole step's model FLOPs (with the teacher's forward and the softmax attention's
products, `mfu_with_attention`) at the untraced step time, and the
training loop's median step time (bench_scaling.time_steps, as bench_stage2 times it: batch
building and the metrics' fetch included), the cost of the loop around the step.

Traced against untraced: while profiling, XLA launches each kernel on its own (its command
buffers, i.e. CUDA graphs, are off under the profiler unless XLA_FLAGS has
--xla_enable_command_buffers_during_profiling=true) and the tracer adds a cost to each launch,
so the traced wall time and gaps are upper bounds of the untraced ones; the device durations of
the kernels are the kernels' own. Compare busy with the untraced wall time.

Results: <out>/profile_steps_<tag>.{json,md} (tag default: "small", or the device kind), written
whole after every row (a call cut at its time limit keeps the rows it finished), with device,
versions, date, command, git and XLA_FLAGS; the top --top names (and 10 families) of each row in
the .md, all of them in the .json. A failing row (out of memory) is recorded with its one-line error
and the next one runs; no row starts after --budget_s seconds (0: no limit), the rows left are
listed as not started.

The GPU command (one H200, one call of under 8 minutes; .whl/ carried for ml-collections):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD timeout 470 python3 launch/profile_steps.py --tag=h200 \\
        --targets=stage2,decode_student,decode_teacher --random_smollm2 \\
        --context=16384,65536 --batch=16,1 --decode_attention=pallas --budget_s=390 --out="$OUT"

A CPU dry run with tiny shapes (decode at L=64, B=2; a stage-2 step of the tiny teacher):

    python launch/profile_steps.py --preset=small --out=/tmp/profile_steps
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

import bench_inference as bench  # launch/ is on sys.path when run as a script
import bench_stage2
import results_io
import trace_summary as ts
from absl import app, flags

TARGETS = ("decode_student", "decode_teacher", "stage2")
NAME_CHARS = 100  # longer event names (C++ kernel templates) are cut in the .md, not the .json
# the decode model shapes of each preset (bench_inference's)
DECODE_PRESET = {"full": "qwen2_5_1_5b", "small": "small"}


class SettingsError(ValueError):
    """A bad command-line value (the message is the one line the user sees)."""


# ------------------------------------------------------------------------------ settings


# flag defaults (lists as comma-separated text); the decode rows' defaults are the preset's
DEFAULTS = dict(
    targets=",".join(TARGETS),
    decode_attention="auto",
    gdn_decode="auto",
    keep_every=4,
    calls=3,
    top=25,
    budget_s=0.0,
    batch_sizes="8",
    seq_lens="2048",
    remat="true",
    chunk_sizes="512",
    attention_impls="blocked",
    dtype="bfloat16",
    gdn_impl="auto",
    smollm2_gguf="",
    random_smollm2=False,
)
PRESET_ROWS = {  # --preset: decode contexts and batches when --context, --batch are unset
    "full": dict(context="16384,65536", batch="16,1"),
    "small": dict(context="64", batch="2"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run profiles (the flags)."""

    preset: str  # "full" or "small"
    targets: tuple[str, ...]
    contexts: tuple[int, ...]  # decode rows: every context x every batch
    batches: tuple[int, ...]
    decode_steps: int
    decode_attention: str
    gdn_decode: str  # the student's GDN decoding step (mixers.gdn.GDNRuntime.decode_impl)
    keep_every: int
    calls: int  # untraced timed calls, then traced calls, per row
    top: int  # names and families per row in the .md
    budget_s: float  # no row starts after this many seconds (0: no limit)
    stage2: bench_stage2.Settings  # its points are the stage-2 rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One profiled program: a decode target at (context, batch), or a stage-2 point."""

    target: str
    context: int = 0
    batch: int = 0
    point: bench_stage2.Point | None = None

    def label(self) -> str:
        if self.point is not None:
            return f"{self.target} {self.point.label()}"
        return f"{self.target} L={self.context} B={self.batch}"

    def key(self) -> str:
        """The row as a file name."""
        if self.point is not None:
            p = self.point
            return (
                f"{self.target}_b{p.batch_size}_t{p.seq_len}_remat{int(p.remat)}_kl{p.chunk_size}"
                f"_{p.attention_impl}"
            )
        return f"{self.target}_L{self.context}_B{self.batch}"


def _ints(text: str, name: str) -> tuple[int, ...]:
    """Distinct positive integers of a comma-separated flag, in the order given."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise SettingsError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if min(values) < 1 or len(set(values)) < len(values):
        raise SettingsError(f"--{name} must be distinct positive integers, got {text!r}")
    return values


def settings(
    preset: str = "full", context=None, batch=None, decode_steps=None, **flags_
) -> Settings:
    """The Settings of the flags (DEFAULTS for those not given); SettingsError (one line) on a
    bad value, before any work."""
    from taylorcal_jax.ops.decode_attention import api as decode_api
    from taylorcal_jax.ops.gdn import decode_api as gdn_decode_api

    unknown = set(flags_) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    f = {**DEFAULTS, **flags_}
    if preset not in PRESET_ROWS:
        raise SettingsError(f"--preset must be one of {sorted(PRESET_ROWS)}, got {preset!r}")
    targets = tuple(x.strip() for x in f["targets"].split(","))
    if any(t not in TARGETS for t in targets) or len(set(targets)) < len(targets):
        raise SettingsError(
            f"--targets must list distinct names of {', '.join(TARGETS)}, got {f['targets']!r}"
        )
    shape = bench.PRESETS[DECODE_PRESET[preset]]
    decode_steps = shape["decode_steps"] if decode_steps is None else decode_steps
    for name, value in (("decode_steps", decode_steps), ("calls", f["calls"]), ("top", f["top"])):
        if value < 1:
            raise SettingsError(f"--{name} must be >= 1, got {value}")
    if f["decode_attention"] not in decode_api.IMPLS:
        raise SettingsError(
            f"--decode_attention must be one of {', '.join(decode_api.IMPLS)}, got "
            f"{f['decode_attention']!r}"
        )
    if f["gdn_decode"] not in gdn_decode_api.IMPLS:
        raise SettingsError(
            f"--gdn_decode must be one of {', '.join(gdn_decode_api.IMPLS)}, got "
            f"{f['gdn_decode']!r}"
        )
    decodes = [t for t in targets if t != "stage2"]
    if decodes and not 2 <= f["keep_every"] <= shape["layers"]:
        raise SettingsError(
            f"--keep_every must be in [2, {shape['layers']}] (a student with both mixers), got "
            f"{f['keep_every']}"
        )
    if f["budget_s"] < 0:
        raise SettingsError(f"--budget_s must be >= 0 (0: no limit), got {f['budget_s']}")
    stage2 = _stage2_settings(preset, f, "stage2" in targets)
    if "stage2" in targets:
        try:
            bench_stage2.check_settings(stage2)
        except ValueError as e:
            raise SettingsError(str(e)) from None
    return Settings(
        preset=preset,
        targets=targets,
        contexts=_ints(context or PRESET_ROWS[preset]["context"], "context"),
        batches=_ints(batch or PRESET_ROWS[preset]["batch"], "batch"),
        decode_steps=decode_steps,
        decode_attention=f["decode_attention"],
        gdn_decode=f["gdn_decode"],
        keep_every=f["keep_every"],
        calls=f["calls"],
        top=f["top"],
        budget_s=f["budget_s"],
        stage2=stage2,
    )


# the flags of the stage-2 rows alone, which --preset=small sets itself
STAGE2_FLAGS = (
    "batch_sizes", "seq_lens", "remat", "chunk_sizes", "attention_impls", "dtype", "gdn_impl",
    "smollm2_gguf", "random_smollm2",
)  # fmt: skip


def _stage2_settings(preset: str, f: dict, measured: bool) -> bench_stage2.Settings:
    """The stage-2 rows as bench_stage2 settings: the flags' points, or with --preset=small its
    tiny teacher at remat on (SettingsError if the rows are `measured` and a stage-2 flag is
    given as well, which it would ignore); one warm-up and `calls` timed loop steps."""
    common = dict(warmup_steps=1, timed_steps=f["calls"], budget_s=0.0)
    if preset == "small":
        given = [name for name in STAGE2_FLAGS if f[name] != DEFAULTS[name]]
        if given and measured:
            raise SettingsError(
                "--preset=small sets the stage-2 rows itself; drop "
                + ", ".join(f"--{name}" for name in given)
            )
        return bench_stage2.small_settings(remat=(True,), **common)
    try:
        axes = ("batch_sizes", "seq_lens", "remat", "chunk_sizes", "attention_impls")
        return bench_stage2.Settings(
            **bench_stage2.parse_axes(*(f[name].split(",") for name in axes)),
            dtype=f["dtype"],
            keep_every=f["keep_every"],
            gdn_impl=f["gdn_impl"],
            smollm2_gguf=f["smollm2_gguf"],
            random_smollm2=f["random_smollm2"],
            small=False,
            **common,
        )
    except ValueError as e:
        raise SettingsError(str(e)) from None


def rows(s: Settings) -> list[Row]:
    """The rows in the order of --targets; the decode targets' rows together, per context and
    batch one row of each decode target (a cut run keeps pairs)."""
    decodes = [t for t in s.targets if t != "stage2"]
    out = []
    for target in s.targets:
        if target == "stage2":
            out += [Row("stage2", point=p) for p in bench_stage2.points(s.stage2)]
        elif target == decodes[0]:
            out += [
                Row(t, context=c, batch=b) for c in s.contexts for b in s.batches for t in decodes
            ]
    return out


# ------------------------------------------------------------------------------ measuring


def _profile_options():
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # no event per Python function call: a smaller trace
    options.enable_hlo_proto = False  # no HLO modules written beside the trace
    return options


def time_calls(next_call, calls: int) -> list[float]:
    """Wall seconds of `calls` calls. next_call() prepares a call, untimed, and returns it; the
    timed part runs it to its results being ready (and drops them)."""
    import jax

    seconds = []
    for _ in range(calls):
        call = next_call()
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        seconds.append(time.perf_counter() - t0)
    return seconds


def trace_calls(next_call, calls: int, trace_dir: str) -> str:
    """`calls` calls (as time_calls runs them) under the profiler, each inside the annotation
    trace_summary.CALL_ANNOTATION + its index; returns the trace file written under `trace_dir`."""
    import jax

    with jax.profiler.trace(
        trace_dir, create_perfetto_trace=True, profiler_options=_profile_options()
    ):
        for i in range(calls):
            call = next_call()
            with jax.profiler.TraceAnnotation(f"{ts.CALL_ANNOTATION}{i}"):
                jax.block_until_ready(call())
    return ts.find_trace_file(trace_dir)


def profile(next_call, calls: int, trace_dir: str, log) -> dict:
    """A warm-up call, `calls` untraced timed calls, `calls` traced calls, and the trace's
    summary: {"untraced_call_s", "call_s", "trace_file", "trace_bytes", "trace": ...}."""
    import jax

    jax.block_until_ready(next_call()())
    untraced = time_calls(next_call, calls)
    log(f"  untraced: {1e3 * statistics.median(untraced):.3f} ms per call; tracing {calls} calls")
    shutil.rmtree(trace_dir, ignore_errors=True)  # this row's previous trace
    path = trace_calls(next_call, calls, trace_dir)
    t0 = time.perf_counter()
    summary = ts.summarise_trace(ts.load_trace(path))
    log(
        f"  trace {os.path.getsize(path) / 2**20:.1f} MiB read in {time.perf_counter() - t0:.1f} s"
        f" ({summary['tracks']['kind']}, {len(summary['tracks']['events'])} tracks)"
    )
    out = {
        "untraced_call_s": untraced,
        "call_s": statistics.median(untraced),
        "trace_file": path,
        "trace_bytes": os.path.getsize(path),
        "trace": summary,
    }
    if jax.default_backend() == "gpu" and summary["tracks"]["kind"] != "gpu_streams":
        out["trace_warning"] = (
            "no GPU stream tracks in the trace (the GPU tracer did not record; its messages are "
            "in the log): the figures are the host's XLA op events"
        )
        log(f"  {out['trace_warning']}")
    return out


def decode_figures(call_s: float, trace_median: dict, steps: int, roofline_s: float) -> dict:
    """A decode row's figures per step: the roofline, the busy time (trace), the untraced and
    traced wall times, and their ratios (None where busy is 0)."""
    busy = trace_median["busy_us"] * 1e-6 / steps
    wall = call_s / steps
    return {
        "roofline_s_per_step": roofline_s,
        "busy_s_per_step": busy,
        "wall_s_per_step": wall,
        "traced_wall_s_per_step": trace_median["wall_us"] * 1e-6 / steps,
        "kernels_per_step": trace_median["kernels"] / steps,
        "busy_over_roofline": busy / roofline_s,
        "wall_over_busy": wall / busy if busy else None,
        "roofline_fraction": roofline_s / wall,
    }


def stage2_figures(call_s, busy_s, loop_step_s, tokens_per_step, counts: dict, kind):
    """A stage-2 row's figures: tokens/s, MFU and the MFU of the whole step's model FLOPs
    (recovery.throughput) at the untraced step time, MFU at the busy time, and the ratios of
    wall to busy and of the loop's step to the call. `counts`: n_student, n_teacher and
    {student,teacher}_attention_flops_per_token (bench_stage2.counted_throughput)."""
    at_wall = bench_stage2.counted_throughput(counts, tokens_per_step / call_s, kind)
    at_busy = bench_stage2.counted_throughput(
        counts, tokens_per_step / busy_s if busy_s else None, kind
    )
    return {
        "tokens_per_step": tokens_per_step,
        "step_s": call_s,
        "busy_s": busy_s,
        "loop_step_s": loop_step_s,
        "tokens_per_s": at_wall["tokens_per_second"],
        "peak_bf16_flops": at_wall["peak_bf16_flops"],
        "mfu": at_wall["mfu"],
        "mfu_with_attention": at_wall["mfu_with_attention"],
        "mfu_at_busy": at_busy["mfu"],
        "wall_over_busy": call_s / busy_s if busy_s else None,
        "loop_over_step": loop_step_s / call_s,
    }


def decode_setup(s: Settings, log) -> dict:
    """What every decode row shares: the models (bench_inference.build_models), the random
    weights of the decode targets asked for, the copy bandwidth of the roofline, and the
    record of these for the result."""
    import jax.numpy as jnp
    import model_shapes  # launch/

    p = bench.PRESETS[DECODE_PRESET[s.preset]]
    dtype = jnp.dtype(p["dtype"])
    cfg = model_shapes.qwen2_config(p, max(s.contexts) + s.decode_steps)
    keep = tuple(range(0, cfg.num_hidden_layers, s.keep_every))
    teacher, student = bench.build_models(
        cfg, keep, dtype, "auto", s.decode_attention, s.gdn_decode
    )
    models = {"decode_teacher": teacher, "decode_student": student}
    params = {
        t: bench.decoding_params(models[t], i, dtype)
        for i, t in enumerate(TARGETS)
        if t in s.targets and t in models
    }
    bandwidth = bench.copy_bandwidth(p["copy_mib"] << 20, repeats=3)
    log(
        f"decode: {DECODE_PRESET[s.preset]} shape, {p['dtype']}, kept layers {list(keep)}; copy "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s ({p['copy_mib']} MiB, read + written)"
    )
    record = {
        "shape": DECODE_PRESET[s.preset],
        "dtype": p["dtype"],
        "kept_attention_layers": list(keep),
        "gdn_decode": s.gdn_decode,
        "copy_mib": p["copy_mib"],
        "copy_bandwidth_bytes_per_s": bandwidth,
    }
    weights = {t: bench.weight_bytes(models[t], dtype) for t in params}
    return {"models": models, "params": params, "weights": weights, "bandwidth": bandwidth,
            "record": record}  # fmt: skip


def decode_row(row: Row, s: Settings, setup: dict, trace_dir: str, log, out: dict) -> None:
    """Profiles one decode row, adding to `out` as each part is measured."""
    import jax
    import jax.numpy as jnp
    import probe_decode  # launch/

    from taylorcal_jax.ops.decode_attention import api as decode_api

    model, params = setup["models"][row.target], setup["params"][row.target]
    steps, slots = s.decode_steps, row.context + s.decode_steps
    out.update(decode_steps=steps, decode_attention=decode_api.resolve_impl(s.decode_attention))
    shapes = (
        params,
        jax.eval_shape(lambda: bench.empty_cache(model, row.batch, slots)),
        jax.ShapeDtypeStruct((row.batch,), jnp.int32),
    )
    t0 = time.perf_counter()
    lowered = bench.decode_program(model, steps).lower(*shapes)
    t1 = time.perf_counter()
    program = lowered.compile()
    out.update(lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
    log(f"  compiled in {out['lower_s']:.1f} + {out['compile_s']:.1f} s")
    cache = probe_decode.filled_cache(model, row.batch, slots, row.context, seed=row.context)
    token = jnp.ones((row.batch,), jnp.int32)
    step_bytes = bench.decode_step_bytes(setup["weights"][row.target], cache, row.context, steps)
    roofline = step_bytes["total"] / setup["bandwidth"]
    out["roofline"] = {"bytes_per_step": step_bytes, "s_per_step": roofline}

    def next_call():
        fresh = bench.fresh_copy(cache)  # donated to the call
        return lambda: program(params, fresh, token)

    out.update(profile(next_call, s.calls, trace_dir, log))
    ts.add_origins(out["trace"]["by_name"], program.as_text(), s.top)
    out.update(decode_figures(out["call_s"], out["trace"]["median"], steps, roofline))


def stage2_setup(s: Settings, cache_dir: str, log) -> dict:
    """What every stage-2 row shares: the teacher (bench_scaling.stage2_teacher), a mesh of one
    device, and the record of these for the result."""
    import bench_scaling  # launch/
    import jax

    from taylorcal_jax.utils import progress, sharding

    progress.set_enabled(False)  # the loop's steps of a row: one line per row instead
    st = s.stage2
    gguf_file = "" if st.small else st.smollm2_gguf
    cfg, teacher, source = bench_scaling.stage2_teacher(st.shape(), "llama", gguf_file, cache_dir)
    log(f"stage 2: teacher {source}")
    mesh = sharding.make_mesh({"layers": 1, "data": 1, "fsdp": 1}, jax.devices()[:1])
    record = {"teacher": source, "shape": st.shape()}
    return {"cfg": cfg, "teacher": teacher, "mesh": mesh, "record": record}


def stage2_row(row: Row, s: Settings, setup: dict, trace_dir: str, log, out: dict) -> None:
    """Profiles one stage-2 step (the program the training loop runs), adding to `out` as each
    part is measured; then times the training loop's steps on the same problem."""
    import bench_scaling  # launch/
    import count_stage2_flops  # launch/
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.train import loop
    from taylorcal_jax.utils import sharding

    st, point, mesh = s.stage2, row.point, setup["mesh"]
    cfg, teacher = setup["cfg"], setup["teacher"]
    problem, task, program, out["compile_s"] = bench_stage2.compile_step(
        point, st, cfg, teacher, mesh
    )
    state = loop.init_state(task, problem.student, rng=jax.random.PRNGKey(0))
    tokens = point.batch_size * point.seq_len
    log(f"  compiled in {out['compile_s']:.1f} s")
    out.update(count_stage2_flops.step_flops(program, problem.student, teacher, tokens))
    out.update(bench_stage2.attention_fields(problem, point.seq_len))
    batches = bench_scaling.random_batches(cfg.vocab_size, point.batch_size, point.seq_len)
    batch = loop.place_batch(task, mesh, batches.take(0, 1), stacked=True)
    constants = jax.tree.map(
        lambda x: jax.device_put(x, sharding.named(mesh, *task.constant_spec(x))), teacher
    )
    # the state is donated to each call and the next call takes its output; a copy, so that
    # problem.student stays for the loop's steps below
    held = [jax.device_put(jax.tree.map(jnp.copy, state), loop.state_shardings(task, state, mesh))]

    def next_call():
        def call():
            held[0], metrics = program(held[0], batch, constants)
            return held[0], metrics

        return call

    out.update(profile(next_call, s.calls, trace_dir, log))
    ts.add_origins(out["trace"]["by_name"], program.as_text(), s.top)
    held.clear()  # the profiled calls' state, before the loop makes its own
    _, seconds, _ = bench_scaling.time_steps(
        task, mesh, problem.student, teacher, batches, st.warmup_steps + st.timed_steps, row.label()
    )
    loop_step_s = statistics.median(seconds[st.warmup_steps :])
    log(f"  the training loop: {loop_step_s:.4f} s per step")
    busy_s = out["trace"]["median"]["busy_us"] * 1e-6
    kind = jax.devices()[0].device_kind
    out.update(stage2_figures(out["call_s"], busy_s, loop_step_s, tokens, out, kind))


# -------------------------------------------------------------------------------- results


def _ms(seconds) -> str:
    return "" if seconds is None else f"{1e3 * seconds:.3f}"


def _x(ratio) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def _gaps_ms(median: dict) -> str:
    """lead / between / tail of a traced call, ms."""
    parts = [median.get(k) for k in ("lead_us", "between_us", "tail_us")]
    return " / ".join("" if v is None else f"{v / 1e3:.3f}" for v in parts)


def _failed(r: dict, columns: int) -> str:
    return f"failed: {r['error']} |" + " |" * (columns - 1)


def _decode_table(rows_: list[dict]) -> list[str]:
    lines = [
        "| target | L | B | roofline ms/step | busy ms/step | untraced wall ms/step | traced wall "
        "ms/step | busy / roofline | wall / busy | of roofline | kernels/step | traced gaps per "
        "call: lead / between / tail ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows_:
        head = f"| {r['target']} | {r['context']} | {r['batch']} | "
        if r["status"] != "ok":
            lines.append(head + _failed(r, 9))
            continue
        cells = [
            _ms(r["roofline_s_per_step"]),
            _ms(r["busy_s_per_step"]),
            _ms(r["wall_s_per_step"]),
            _ms(r["traced_wall_s_per_step"]),
            _x(r["busy_over_roofline"]),
            _x(r["wall_over_busy"]),
            results_io.percent_cell(r["roofline_fraction"]),
            f"{r['kernels_per_step']:.1f}",
            _gaps_ms(r["trace"]["median"]),
        ]
        lines.append(head + " | ".join(cells) + " |")
    return lines


def _stage2_table(rows_: list[dict]) -> list[str]:
    lines = [
        "| batch | seq | remat | KL chunk | untraced step s | busy s | loop step s | traced "
        "wall s | kernels | tokens/s | MFU | MFU at busy | MFU w/ teacher + attention | wall / "
        "busy | traced gaps: lead / between / tail ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows_:
        p = r["point"]
        head = f"| {p['batch_size']} | {p['seq_len']} | {p['remat']} | {p['chunk_size']} | "
        if r["status"] != "ok":
            lines.append(head + _failed(r, 11))
            continue
        m = r["trace"]["median"]
        cells = [
            f"{r['step_s']:.4f}",
            f"{r['busy_s']:.4f}",
            f"{r['loop_step_s']:.4f}",
            f"{m['wall_us'] * 1e-6:.4f}",
            f"{m['kernels']:.0f}",
            f"{r['tokens_per_s']:,.0f}",
            results_io.percent_cell(r["mfu"]),
            results_io.percent_cell(r["mfu_at_busy"]),
            results_io.percent_cell(r["mfu_with_attention"]),
            _x(r["wall_over_busy"]),
            _gaps_ms(m),
        ]
        lines.append(head + " | ".join(cells) + " |")
    return lines


def _ranking_table(ranked: list[dict], top: int, what: str) -> list[str]:
    """A markdown ranking; with a column of the model operations (`add_origins`) when any of
    the first `top` has them."""
    origins = any("origin" in r for r in ranked[:top])
    lines = [
        f"| {what} | count | total us | mean us | busy share |" + " model ops |" * origins,
        "|---|---|---|---|---|" + "---|" * origins,
    ]
    for r in ranked[:top]:
        name = r["name"] if len(r["name"]) <= NAME_CHARS else r["name"][: NAME_CHARS - 3] + "..."
        ops = f" {', '.join(f'`{x}`' for x in r.get('origin', []))} |" * origins
        lines.append(
            f"| `{name}` | {r['count']} | {r['total_us']:.1f} | {r['mean_us']:.2f} | "
            f"{r['share']:.1%} |{ops}"
        )
    rest = ranked[top:]
    if rest:
        lines.append(
            f"| ({len(rest)} others) | {sum(r['count'] for r in rest)} | "
            f"{sum(r['total_us'] for r in rest):.1f} | | {sum(r['share'] for r in rest):.1%} |"
        )
    return lines


def _row_section(r: dict, top: int) -> list[str]:
    t = r["trace"]
    tracks = ", ".join(f"{name} ({n})" for name, n in t["tracks"]["events"].items())
    lines = [
        f"### {r['label']}",
        "",
        f"Device events: {t['tracks']['kind']}; tracks (events): {tracks}. Busy "
        f"{t['busy_us'] / 1e3:.3f} ms over {len(t['calls'])} traced calls; outside the calls: "
        f"{t['outside_calls']['events']} events, {t['outside_calls']['total_us'] / 1e3:.3f} ms. "
        f"Trace: `{r['trace_file']}` ({r['trace_bytes'] / 2**20:.1f} MiB).",
        "",
        *([f"**{r['trace_warning']}**", ""] if "trace_warning" in r else []),
        *_ranking_table(t["by_name"], top, "name"),
        "",
        *_ranking_table(t["by_family"], min(top, 10), "family"),
        "",
        *_launches_table(t.get("by_launches", []), len(t["calls"]), min(top, 10)),
    ]
    return lines


def _launches_table(groups: list[dict], calls: int, top: int) -> list[str]:
    """The largest groups of `by_launches` (busy per call = group busy / traced calls)."""
    if not groups:
        return []
    lines = [
        "Kernels grouped by launches per call (`by_launches`):",
        "",
        "| launches per call | kernels | busy ms per call | busy share | largest |",
        "|---|---|---|---|---|",
    ]
    for g in groups[:top]:
        names = ", ".join(f"`{n[:40]}`" for n in g["names"][:3])
        more = f" (+{len(g['names']) - 3})" if len(g["names"]) > 3 else ""
        lines.append(
            f"| {g['per_call']:g} | {g['kernels']} | {g['busy_us'] / calls / 1e3:.3f} | "
            f"{g['share']:.1%} | {names}{more} |"
        )
    return lines + [""]


def markdown(result: dict) -> str:
    """The result as a Markdown report."""
    s = result["settings"]
    done = result["rows"]
    decode = [r for r in done if r["target"] != "stage2"]
    stage2 = [r for r in done if r["target"] == "stage2"]
    lines = [
        f"# Where the step time goes: {result['device']}",
        "",
        f"{result['date']}, JAX {result['jax_version']}, git {result['git']}, source digest "
        f"{result['source_digest']}. Command: `{result['command']}`. XLA_FLAGS: "
        f"`{result['xla_flags']}`.",
        "",
        f"Per row: one warm-up call, {s['calls']} untraced calls (median: wall), {s['calls']} "
        "traced calls. busy = the union of a call's device events (median over the traced "
        "calls); traced gaps = traced wall - busy = lead (to the first event) + between + tail "
        "(after the last). The traced run launches each kernel alone and pays the tracer per "
        "launch: compare busy with the untraced wall. Busy share: each instant of busy time "
        "split among the tracks busy then, on a track to its innermost event.",
        "",
    ]
    if not result["complete"]:
        lines += ["**Incomplete**: the run stopped before its last row.", ""]
    if decode:
        lines += [f"## Decode: {s['decode_steps']} steps per call", ""]
        if "decode" in result:  # the rows' shared setup was made
            d = result["decode"]
            lines += [
                f"{d['shape']} shape, {d['dtype']}, attention kept in layers "
                f"{d['kept_attention_layers']}, decoding attention "
                f"{decode[0].get('decode_attention', s['decode_attention'])}, GDN decoding step "
                f"{d.get('gdn_decode', 'xla')}; roofline at the "
                f"copy bandwidth {d['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s.",
                "",
            ]
        lines += [*_decode_table(decode), ""]
    if stage2:
        lines += ["## Stage 2: one training step per call", ""]
        if "stage2" in result:
            lines += [f"Teacher {result['stage2']['teacher']}.", ""]
        lines += [*_stage2_table(stage2), ""]
    if result["not_started"]:
        lines += [
            f"Not started (--budget_s={s['budget_s']:g} reached): "
            + "; ".join(result["not_started"])
            + ".",
            "",
        ]
    lines += ["## Top device events by busy share", ""]
    for r in done:
        if r["status"] == "ok":
            lines += _row_section(r, s["top"])
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(result: dict, out_dir: str, tag: str) -> dict:
    """<out_dir>/profile_steps_<tag>.{json,md}, each written whole."""
    path = results_io.write_result(
        out_dir, "profile_steps", tag, result["settings"]["preset"] == "small", result
    )
    md = results_io.write_text(path[: -len(".json")] + ".md", markdown(result))
    return {"json": path, "md": md}


# ----------------------------------------------------------------------------------- run


def run(s: Settings, out_dir: str, tag: str, trace_dir: str, cache_dir: str) -> dict:
    """Every row of `s` in order, the result files rewritten after each; the result."""
    import jax
    import parity_real_teacher  # launch/ (its versions())

    t0 = time.perf_counter()
    log = results_io.progress_log(t0)
    tag = tag or (
        "small" if s.preset == "small" else jax.devices()[0].device_kind.replace(" ", "_")
    )
    result = {
        "benchmark": "where the time of a decode step and of a stage-2 step goes: device "
        "kernels and idle gaps, from a profiler trace",
        **results_io.provenance(),
        "versions": parity_real_teacher.versions(),
        "backend": jax.default_backend(),
        "settings": {**dataclasses.asdict(s), "stage2": dataclasses.asdict(s.stage2)},
        "trace_dir": os.path.join(trace_dir, tag),
        "rows": [],
        "not_started": [],
        "complete": False,
    }
    plan = rows(s)
    setups = {}
    for i, row in enumerate(plan):
        if s.budget_s and time.perf_counter() - t0 > s.budget_s:
            result["not_started"] = [r.label() for r in plan[i:]]
            log(f"--budget_s={s.budget_s:g} reached: {len(plan) - i} rows not started")
            break
        log(f"row {i + 1}/{len(plan)}: {row.label()} ...")
        out = {"target": row.target, "label": row.label()}
        if row.point is None:
            out.update(context=row.context, batch=row.batch)
        else:
            out["point"] = dataclasses.asdict(row.point)
        try:
            kind = "stage2" if row.point is not None else "decode"
            if kind not in setups:
                setups[kind] = (
                    stage2_setup(s, cache_dir, log) if kind == "stage2" else decode_setup(s, log)
                )
                result[kind] = setups[kind]["record"]
            measure = stage2_row if kind == "stage2" else decode_row
            measure(row, s, setups[kind], os.path.join(result["trace_dir"], row.key()), log, out)
            out["status"] = "ok"
        except Exception as e:  # a failing row (out of memory) is a result: the run goes on
            out.update(status="failed", error=bench_stage2.one_line(e))
        gc.collect()  # the row's arrays, before the next row
        result["rows"].append(out)
        write_outputs(result, out_dir, tag)
        log(f"row {i + 1}/{len(plan)}: {row.label()}: {_summary(out)}")
    else:
        result["complete"] = True
    result["elapsed_s"] = time.perf_counter() - t0
    paths = write_outputs(result, out_dir, tag)
    log(f"wrote {paths['json']} and {paths['md']}")
    return result


def _summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"FAILED ({r['error']})"
    m = r["trace"]["median"]
    pct = results_io.percent_cell
    if r["target"] == "stage2":
        head = (
            f"step {r['step_s']:.4f} s, busy {r['busy_s']:.4f} s, loop step "
            f"{r['loop_step_s']:.4f} s, MFU {pct(r['mfu'])} (at busy {pct(r['mfu_at_busy'])})"
        )
    else:
        head = (
            f"{_ms(r['wall_s_per_step'])} ms/step wall, {_ms(r['busy_s_per_step'])} busy, "
            f"{_ms(r['roofline_s_per_step'])} roofline ({pct(r['roofline_fraction'])})"
        )
    top = r["trace"]["by_name"][0] if r["trace"]["by_name"] else None
    first = "" if top is None else f"; top {top['name']} {top['share']:.0%}"
    return f"{head}; {m['kernels']:.0f} events per call{first}"


# ----------------------------------------------------------------------------------- main


def define_flags() -> None:
    """The command line (defined only when run as a script: the module imports without it)."""
    import bench_scaling  # launch/

    d = DEFAULTS
    flags.DEFINE_enum(
        "preset", "full", list(PRESET_ROWS),
        "full: the Qwen2.5-1.5B decode shape and SmolLM2-135M stage 2; small: tiny shapes (CPU).",
    )  # fmt: skip
    flags.DEFINE_string("targets", d["targets"], f"Comma-separated, of {', '.join(TARGETS)}.")
    flags.DEFINE_string("context", None, "Decode contexts L, comma-separated (preset's if unset).")
    flags.DEFINE_string("batch", None, "Decode batches B, comma-separated (preset's if unset).")
    flags.DEFINE_integer("decode_steps", None, "Tokens decoded per decode call (preset's).")
    flags.DEFINE_string("decode_attention", d["decode_attention"], "auto, xla or pallas.")
    flags.DEFINE_string(
        "gdn_decode", d["gdn_decode"], "The student's GDN decoding step: auto, xla or pallas."
    )
    flags.DEFINE_integer(
        "keep_every", d["keep_every"], "The students keep attention every k-th layer."
    )
    flags.DEFINE_string(
        "batch_sizes", d["batch_sizes"], "Stage 2: sequences per step, one row each."
    )
    flags.DEFINE_string("seq_lens", d["seq_lens"], "Stage 2: tokens per sequence, one row each.")
    flags.DEFINE_string("remat", d["remat"], "Stage 2: rematerialise each block (true/false list).")
    flags.DEFINE_string("chunk_sizes", d["chunk_sizes"], "Stage 2: positions per KL chunk, list.")
    flags.DEFINE_string(
        "attention_impls", d["attention_impls"], "Stage 2: softmax attention (blocked/cudnn), list."
    )
    flags.DEFINE_enum("dtype", d["dtype"], list(bench_stage2.DTYPES), "Stage 2: compute dtype.")
    flags.DEFINE_string("gdn_impl", d["gdn_impl"], "Stage 2: GDN op implementation.")
    bench_scaling.define_teacher_flags()  # stage 2's teacher
    flags.DEFINE_integer("calls", d["calls"], "Untraced timed calls, then traced calls, per row.")
    flags.DEFINE_integer("top", d["top"], "Names listed per row in the .md.")
    flags.DEFINE_float(
        "budget_s", d["budget_s"], "No row starts after this many seconds (0: none)."
    )
    flags.DEFINE_string("tag", "", "Result files profile_steps_<tag>.{json,md}.")
    flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")
    flags.DEFINE_string(
        "trace_dir", os.path.join(tempfile.gettempdir(), "profile_steps_traces"),
        "Where the traces are written (<trace_dir>/<tag>/<row>/); never copied into the results.",
    )  # fmt: skip


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        s = settings(
            f.preset, f.context, f.batch, f.decode_steps, **{k: getattr(f, k) for k in DEFAULTS}
        )
        if "stage2" in s.targets and s.stage2.smollm2_gguf and not s.stage2.small:
            from taylorcal_jax.models import gguf

            gguf.check_gguf_file(s.stage2.smollm2_gguf)  # a missing or wrong file fails here
    except (SettingsError, ValueError, ImportError) as e:
        raise app.UsageError(str(e)) from None
    run(s, f.out, f.tag, f.trace_dir, f.cache_dir)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    define_flags()
    app.run(main)
