"""Short decode timings under variants of the decoding step, each variant in its own process.

Letters: B batch, L context, N decoded tokens per call, S = L + N cache slots.

Two regimes of docs/benchmarks.md §4 fall short of the HBM roofline: long contexts at batch 16
(the KV cache read dominates: the decoding attention) and batch 1 (the weights dominate: GEMV
efficiency and the launch cost of ~15 kernels per layer and step inside the scan's while loop).
A variant is a decoding-attention implementation (layers.AttentionRuntime.decode_impl), the GDN
layers' decoding step (mixers.gdn.GDNRuntime.decode_impl: XLA's fused programs or one Pallas
kernel), extra XLA_FLAGS, and the unroll of the decode scan. Per variant, a child process (flags
are read when XLA starts) builds the teacher and the student (bench_inference.build_models, random
weights), fills a cache of S slots per row with random K, V and states (L slots valid: no prefill
to compile), compiles every row's decode program (bench_inference.decode_program) in threads, and
times N greedy steps per call (median of `repeats`, bench_inference.time_decode), reporting the
fraction of the row's HBM roofline (bench_inference.decode_step_bytes / the measured copy
bandwidth). The "op" variant times one decoding-attention call alone: XLA and the Pallas kernel
under several launch configurations (pallas_gpu.DecodeConfig). The "gdn_op" variant times the GDN
decoding step alone, 64 chained steps per call: XLA's form and the Pallas step under several
launch configurations (decode_pallas.DecodeStepConfig), against the state's read and write.

A failing or hanging variant is recorded (the head and tail of its output) and the next one
runs; variants that would start after `budget_s` are recorded as skipped. The result file
launch/results/probe_decode_<tag>.json is rewritten after every row. The parent process never
initialises JAX (it would take the accelerator's memory from its children).

    python launch/probe_decode.py --tag=h200      # Qwen2.5-1.5B shape, the default variants
    python launch/probe_decode.py --preset=small --budget_s=600   # CPU dry run
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import subprocess
import sys
import time

import bench_inference as bench  # launch/ is on sys.path when run as a script
import model_shapes
import results_io
from absl import app, flags

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(LAUNCH_DIR)
_PREFIX = "PROBE "  # a child's machine-readable output lines: _PREFIX + json
# XLA's command buffers (CUDA graphs) also over the while loop of the scan and conditionals. The
# flag takes either exact command types (FUSION, CUBLAS, CUBLASLT, CUSTOM_CALL, CUDNN,
# COLLECTIVES, CONDITIONAL, WHILE, DYNAMIC_SLICE_FUSION, ...), replacing XLA's default set, or
# every item prefixed by "+" / "-", adding to / removing from it; XLA aborts at start-up on an
# unknown type (as a failed variant here).
COMMAND_BUFFER_WHILE = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
# Weight products by cuBLAS instead of XLA's Triton GEMM fusions (at batch 16 those read the
# weights at 1.3-3.1 TB/s, launch/results/profile_steps_h200.md).
CUBLAS_GEMM = "--xla_gpu_enable_triton_gemm=false"
# XLA's autotuner tries every tiling of its Triton GEMMs, not its default short list (the
# batch-16 MLP GEMMs read their weights at about 75% of the copy bandwidth with the default).
# On one H100 it changed the 32k steps by 0.4-1.1%, batch 16 by under 0.5%
# (launch/results/probe_decode_h100.json).
EXHAUSTIVE_TILING = "--xla_gpu_exhaustive_tiling_search=true"
# Hopper's programmatic dependent launch between XLA's kernels: a kernel starts its prologue
# while the one before it finishes (a decoding step at batch 1 is ~600 kernels of a few us, about
# 20 per layer of 1.2-1.7 us outside the products). On and off, since the default differs
# between XLA versions. On one H200 it changed the steps by 0-2%
# (launch/results/probe_decode_h200_pdl.json).
PDL = "--xla_gpu_enable_pdl=true"
NO_PDL = "--xla_gpu_enable_pdl=false"
# XLA's fusion passes that may join more of a step's small kernels (at batch 1 each layer runs
# 13-16 kernels of about 1.6 us besides its products, e.g. an RMSNorm as a reduction kernel and
# then a multiply kernel): priority fusion that forms Triton fusions first where it can
# ("heroless": fusions without a reduction or transpose at their root included), and the
# rewrite of finished fusions to Triton's block-level emitter. Both are off by default; on one
# H100 either or both took the 32k steps to 1.00x-1.02x of the defaults' time
# (launch/results/probe_decode_h100_fusion_flags.json).
HEROLESS = "--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true"
BLOCK_LEVEL = "--xla_gpu_experimental_enable_fusion_block_level_rewriter=true"
# Three more of XLA's experimental switches, off by default: every fusion emitted by Triton
# instead of XLA's own emitters, the autotuner choosing the emitter per fusion, and Triton
# fusions with several outputs (a residual add whose sum both goes on and feeds the next
# RMSNorm is such a fusion). The first two left the stage-2 step as it was on one H100
# (docs/benchmarks.md §6, launch/results/bench_stage2_h100_b24_switches_*.json).
ALL_TRITON = "--xla_gpu_experimental_all_fusions_with_triton=true"
FUSION_AUTOTUNER = "--xla_gpu_experimental_enable_fusion_autotuner=true"
TRITON_MULTI_OUTPUT = "--xla_gpu_unsupported_enable_triton_multi_output_fusion=true"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run the decoding step: the decoding attention, extra XLA_FLAGS, scan unroll,
    the GDN step, the GDN input projections joined (GDNRuntime.fused_projections), the few-row
    dense products (ops.gemv: "pallas" = our kernel at batch <= 16; "auto" = at batch 1), the
    params joined for decoding once before the loop (models/joined.py) or as stored. kind
    "model": the models' decode rows; kind "op": the decoding-attention op alone; kind
    "gdn_op": the GDN decoding step alone."""

    decode_impl: str = "xla"
    xla_flags: str = ""
    unroll: int = 1
    kind: str = "model"
    gdn_decode: str = "xla"
    gdn_fused: bool = False
    gemv: str = "xla"
    joined: bool = False


VARIANTS = {
    "op": Variant(kind="op"),
    "gdn_op": Variant(kind="gdn_op"),
    "xla": Variant("xla"),
    "pallas": Variant("pallas"),
    "pallas_cmdbuf": Variant("pallas", COMMAND_BUFFER_WHILE),
    "pallas_unroll4": Variant("pallas", unroll=4),
    "xla_cmdbuf": Variant("xla", COMMAND_BUFFER_WHILE),
    "xla_unroll4": Variant("xla", unroll=4),
    "pallas_cmdbuf_unroll4": Variant("pallas", COMMAND_BUFFER_WHILE, unroll=4),
    "pallas_gdn_step": Variant("pallas", gdn_decode="pallas"),
    "pallas_cublas": Variant("pallas", CUBLAS_GEMM),
    "pallas_gdn_step_cublas": Variant("pallas", CUBLAS_GEMM, gdn_decode="pallas"),
    "pallas_gdn_step_fused": Variant("pallas", gdn_decode="pallas", gdn_fused=True),
    "pallas_gdn_step_fused_cublas": Variant(
        "pallas", CUBLAS_GEMM, gdn_decode="pallas", gdn_fused=True
    ),
    "pallas_gdn_step_gemv": Variant("pallas", gdn_decode="pallas", gemv="pallas"),
    "pallas_gdn_step_fused_gemv": Variant(
        "pallas", gdn_decode="pallas", gdn_fused=True, gemv="pallas"
    ),
    # the models' defaults on a GPU, with the params as stored and joined for decoding
    "defaults_stored": Variant("pallas", gdn_decode="pallas", gdn_fused=True, gemv="auto"),
    "defaults_joined": Variant(
        "pallas", gdn_decode="pallas", gdn_fused=True, gemv="auto", joined=True
    ),
    # the defaults with XLA flags added: the batch-16 GEMMs' tilings, PDL on and off, the fusions
    **{
        f"defaults_joined_{name}": Variant(
            "pallas", flags, gdn_decode="pallas", gdn_fused=True, gemv="auto", joined=True
        )
        for name, flags in (
            ("exhaustive", EXHAUSTIVE_TILING),
            ("pdl", PDL),
            ("no_pdl", NO_PDL),
            ("heroless", HEROLESS),
            ("block_level", BLOCK_LEVEL),
            ("heroless_block_level", f"{HEROLESS} {BLOCK_LEVEL}"),
            ("all_triton", ALL_TRITON),
            ("fusion_autotuner", FUSION_AUTOTUNER),
            ("triton_multi_output", TRITON_MULTI_OUTPUT),
        )
    },
}
# the open questions, with the Pallas decoding attention and GDN step (the models' default on a
# GPU): the GDN input projections as six products or two (GDNRuntime.fused_projections), and
# the weight products by cuBLAS. At batch 1 XLA's GPU simplifier rewrites every vector-matrix
# product whose operands hold fewer than 10M elements as multiply + reduce (a fixed threshold:
# the flag that once turned this off, --xla_gpu_enable_dot_strength_reduction, is gone from
# jaxlib 0.10.2), which is why the 1536-wide projections run as 0.8 TB/s reductions
# (launch/results/profile_steps_h100_gdn_step.md); the joined 1536 x 6144 product is under it
# too, so "fused" saves launches, not the reduction; "gemv" replaces those reductions (and at
# batch 16 XLA's GEMMs) by our few-row kernel (ops/gemv), in the teacher too. Command buffers
# and unroll were measured before and did not help (launch/results/probe_decode_h200_cmdbuf.json);
# the Pallas step against XLA's form in launch/results/bench_inference_h100_gdn_step_{pallas,
# xla}.md.
DEFAULT_VARIANTS = (
    "pallas_gdn_step,pallas_gdn_step_fused,pallas_gdn_step_gemv,pallas_gdn_step_fused_gemv,"
    "pallas_gdn_step_cublas,pallas_gdn_step_fused_cublas"
)

# (L, B) rows per preset: both regimes at the shortest and longest context of the benchmark
ROWS = {
    "qwen2_5_1_5b": "4096x1,4096x16,65536x1,65536x16",
    "cpu": "1024x1,8192x4",
    "small": "64x1,128x2",
}
# Pallas launch configurations the "op" variant times: (block_s, programs, warps, stages)
OP_CONFIGS = {
    "qwen2_5_1_5b": [(32, 528, 4, 2), (64, 264, 4, 2), (64, 528, 4, 2), (64, 1056, 4, 3),
                     (128, 528, 8, 2), (128, 1056, 8, 3)],
    "cpu": [(64, 512, 4, 2)],
    "small": [(16, 8, 4, 2), (32, 512, 4, 2)],
}  # fmt: skip
# Launch configurations the "gdn_op" variant times: (programs, warps) of
# decode_pallas.DecodeStepConfig
GDN_OP_CONFIGS = {
    "qwen2_5_1_5b": [(264, 4), (132, 4), (528, 4), (1056, 4), (264, 2), (264, 8)],
    "cpu": [(264, 4)],
    "small": [(264, 4), (1, 4)],
}
GDN_OP_STEPS = 64  # chained steps per timed call: one step alone is shorter than its launch


class SettingsError(ValueError):
    """A bad command-line value (the message is the one line the user sees)."""


def parse_rows(text: str) -> list[tuple[int, int]]:
    """ "LxB,..." -> [(L, B), ...] in the order given."""
    rows = []
    for item in text.split(","):
        parts = item.strip().split("x")
        try:
            context, batch = (int(x) for x in parts)
        except ValueError:
            raise SettingsError(f"--rows must be LxB items like 4096x16, got {item!r}") from None
        if context < 1 or batch < 1:
            raise SettingsError(f"--rows needs positive L and B, got {item!r}")
        rows.append((context, batch))
    return rows


def parse_variants(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",")]
    bad = [x for x in names if x not in VARIANTS]
    if bad or len(set(names)) != len(names):
        raise SettingsError(
            f"--variants must list distinct names of {sorted(VARIANTS)}, got {text!r}"
        )
    return names


def child_env(variant: Variant, base: dict) -> dict:
    """The child's environment: `base` with the variant's XLA flags appended to XLA_FLAGS."""
    env = dict(base)
    if variant.xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {variant.xla_flags}".strip()
    return env


def parse_child_line(line: str) -> dict | None:
    """The record of a child's machine-readable line, None for any other line."""
    if not line.startswith(_PREFIX):
        return None
    return json.loads(line[len(_PREFIX) :])


def row_line(variant: str, record: dict) -> str:
    """The printed line of one measured row."""
    if record["kind"] == "gdn_op":
        return (
            f"{variant} B={record['batch']} {record['impl']}: {1e6 * record['s_per_step']:.2f} "
            f"us/step = {record['roofline_fraction']:.0%} of the state's read and write at the "
            f"copy bandwidth (error vs xla {record['rel_err_vs_xla']:.1e})"
        )
    if record["kind"] == "op":
        return (
            f"{variant} B={record['batch']} S={record['slots']} {record['impl']}: "
            f"{1e3 * record['s_per_call']:.3f} ms = {record['roofline_fraction']:.0%} of the "
            f"K/V read at the copy bandwidth (error vs xla, max|a-b|/max|b| "
            f"{record['rel_err_vs_xla']:.1e})"
        )
    return (
        f"{variant} L={record['context']} B={record['batch']} {record['model']}: "
        f"{1e3 * record['decode_s_per_step']:.3f} ms/step = {record['roofline_fraction']:.0%} "
        f"of its roofline ({1e3 * record['roofline_s_per_step']:.3f} ms)"
    )


# --------------------------------------------------------------------------- child process


def _emit(record: dict) -> None:
    print(_PREFIX + json.dumps(record), flush=True)


def filled_cache(model, batch: int, slots: int, context: int, seed: int):
    """A decoding cache of `slots` slots whose first `context` slots hold random K and V (valid),
    with random recurrent states: what a prefill leaves, for speed (which no value changes).

    Each floating leaf is one random block over its last two axes (heads x head_dim, or the
    state's K x V), broadcast over the leading ones (batch, slots): drawing the whole cache
    (30 GB at L=65536, B=16 for the 1.5B teacher) in one program took XLA minutes to compile
    on the H200, where a broadcast compiles at once and writes at copy speed."""
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(lambda: bench.empty_cache(model, batch, slots))

    def fill(key):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        keys = jax.random.split(key, len(leaves))
        out = []
        for (path, leaf), k in zip(leaves, keys, strict=True):
            name = jax.tree_util.keystr(path)
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                block = 0.5 * jax.random.normal(k, leaf.shape[-2:], jnp.float32)
                out.append(jnp.broadcast_to(block.astype(leaf.dtype), leaf.shape))
            elif "valid" in name:
                out.append(jnp.broadcast_to(jnp.arange(slots) < context, leaf.shape))
            else:  # "index" (next slot) and "next_position"
                out.append(jnp.full(leaf.shape, context, leaf.dtype))
        return jax.tree.unflatten(treedef, out)

    return jax.jit(fill)(jax.random.PRNGKey(seed))


def run_model_variant(p: dict, variant: Variant) -> None:
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(p["dtype"])
    steps = p["decode_steps"]
    cfg = model_shapes.qwen2_config(p, max(c for c, _ in p["rows"]) + steps)
    keep = tuple(range(0, cfg.num_hidden_layers, p["keep_every"]))
    teacher, student = bench.build_models(
        cfg,
        keep,
        dtype,
        "auto",
        variant.decode_impl,
        variant.gdn_decode,
        variant.gdn_fused,
        variant.gemv,
    )
    models = {"teacher": teacher, "student": student}
    params = {
        n: bench.decoding_params(m, i, dtype, joined=variant.joined)
        for i, (n, m) in enumerate(models.items())
    }
    weights = {n: bench.weight_bytes(m, dtype) for n, m in models.items()}
    bench.log("random weights made")
    jobs = {}
    for context, batch in p["rows"]:
        for name, m in models.items():
            cache = jax.eval_shape(
                lambda m=m, b=batch, s=context + steps: bench.empty_cache(m, b, s)
            )
            token = jax.ShapeDtypeStruct((batch,), jnp.int32)
            jobs[(context, batch, name)] = (
                bench.decode_program(m, steps, variant.unroll),
                (params[name], cache, token),
            )
    named = {f"L={c} B={b} {n}": job for (c, b, n), job in jobs.items()}
    compiled, seconds = bench.compile_all(named, p["compile_threads"])
    for context, batch in p["rows"]:
        for name, m in models.items():
            job = f"L={context} B={batch} {name}"
            cache = filled_cache(m, batch, context + steps, context, seed=context + batch)
            token = jnp.ones((batch,), jnp.int32)
            t, finite = bench.time_decode(compiled[job], params[name], cache, token, p["repeats"])
            step_bytes = bench.decode_step_bytes(weights[name], cache, context, steps)
            del cache
            roofline = step_bytes["total"] / p["bandwidth"]
            figures = bench.decode_figures(t, batch, steps, roofline)
            _emit(
                {
                    "kind": "model",
                    "model": name,
                    "context": context,
                    "batch": batch,
                    "finite": finite,
                    "decode_bytes_per_step": step_bytes,
                    "roofline_s_per_step": roofline,
                    **figures,
                    **seconds[job],
                }
            )


def _time_calls(fn, args, repeats: int, calls: int = 20) -> float:
    """Median seconds per call over `repeats` batches of `calls` calls, one sync per batch."""
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        out, t0 = None, time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times))


def run_op_variant(p: dict) -> None:
    """One decoding-attention call at the preset's attention shape per row (B, S = L + N), by
    XLA and by the kernel under each of OP_CONFIGS; roofline: K and V of the L valid slots."""
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.ops.decode_attention import pallas_gpu, reference

    dtype = jnp.dtype(p["dtype"])
    h, hkv, d = p["heads"], p["kv"], p["head_dim"]
    impls = {"xla": lambda *a: reference.attend_one_query(*a, dtype)}
    for block_s, programs, warps, stages in OP_CONFIGS[p["preset"]]:
        config = pallas_gpu.DecodeConfig(block_s, programs, warps, stages)
        impls[f"pallas bs={block_s} programs={programs} warps={warps} stages={stages}"] = (
            lambda *a, c=config: pallas_gpu.decode_attention_pallas(*a, dtype, config=c)
        )
    for context, batch in p["rows"]:
        slots = context + p["decode_steps"]
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(context), 3)
        q = jax.random.normal(kq, (batch, 1, h, d), dtype)
        k = jax.random.normal(kk, (batch, slots, hkv, d), dtype)
        v = jax.random.normal(kv, (batch, slots, hkv, d), dtype)
        mask = jnp.broadcast_to(jnp.arange(slots) < context, (batch, slots))
        kv_bytes = 2 * batch * context * hkv * d * dtype.itemsize
        want = None
        for impl, fn in impls.items():
            try:
                jitted = jax.jit(fn)
                out = jax.block_until_ready(jitted(q, k, v, mask)).astype(jnp.float32)
                want = out if want is None else want
                err = float(jnp.max(jnp.abs(out - want)) / jnp.max(jnp.abs(want)))
                t = _time_calls(jitted, (q, k, v, mask), p["repeats"])
            except Exception as e:  # one configuration failing leaves the others measured
                _emit(
                    {
                        "kind": "op_error",
                        "impl": impl,
                        "batch": batch,
                        "slots": slots,
                        "error": f"{type(e).__name__}: {str(e)[:500]}",
                    }
                )
                continue
            _emit(
                {
                    "kind": "op",
                    "impl": impl,
                    "batch": batch,
                    "context": context,
                    "slots": slots,
                    "s_per_call": t,
                    "kv_bytes": kv_bytes,
                    "rel_err_vs_xla": err,
                    "roofline_fraction": kv_bytes / p["bandwidth"] / t,
                }
            )
        del q, k, v


def _chained(step, n: int):
    """(state, q, k, v, g, beta) -> (state after n steps of `step` on the same token, sum of the
    n outputs in float32): one program whose time over n is a step's, launch cost aside."""
    import jax
    import jax.numpy as jnp

    def run(state_bhkv, q_bhk, k_bhk, v_bhv, g_bh, beta_bh):
        def body(_, carry):
            state, acc = carry
            o, state = step(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state)
            return state, acc + o.astype(jnp.float32)

        zero = jnp.zeros(v_bhv.shape, jnp.float32)
        return jax.lax.fori_loop(0, n, body, (state_bhkv, zero))

    return run


def run_gdn_op_variant(p: dict) -> None:
    """GDN_OP_STEPS chained GDN decoding steps in one jitted loop, at the preset's GDN shape
    (H = heads, K = V = head_dim; the preset's dtype for q, k, v; an fp32 state) for each batch
    of the rows: by XLA's form (decode_step_xla) and by the kernel under each of GDN_OP_CONFIGS.
    Every step takes the same token, so XLA may compute its state-independent parts (the norms
    of q and k, exp(g)) once: the XLA rows are a lower bound of its step. Roofline: the state
    read and written once per step; error: the final state's, against XLA's."""
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.ops.gdn.decode_pallas import DecodeStepConfig, decode_step_pallas
    from taylorcal_jax.ops.gdn.decode_step import decode_step_xla

    dtype = jnp.dtype(p["dtype"])
    h, d = p["heads"], p["head_dim"]
    steps = {"xla": decode_step_xla}
    for programs, warps in GDN_OP_CONFIGS[p["preset"]]:
        config = DecodeStepConfig(programs, warps)
        steps[f"pallas programs={programs} warps={warps}"] = lambda *a, c=config: (
            decode_step_pallas(*a, config=c)
        )
    for batch in sorted({b for _, b in p["rows"]}):
        kq, kk, kv, kg, ks = jax.random.split(jax.random.PRNGKey(batch), 5)
        q = jax.random.normal(kq, (batch, h, d), dtype)
        k = jax.random.normal(kk, (batch, h, d), dtype)
        v = jax.random.normal(kv, (batch, h, d), dtype)
        g = -jax.random.uniform(kg, (batch, h), jnp.float32, 0.01, 1.0)
        beta = jnp.full((batch, h), 0.5, jnp.float32)
        state = jax.random.normal(ks, (batch, h, d, d), jnp.float32)
        state_bytes = 2 * state.size * state.dtype.itemsize
        want = None
        args = (state, q, k, v, g, beta)
        for impl, step in steps.items():
            try:
                jitted = jax.jit(_chained(step, GDN_OP_STEPS))
                final = jax.block_until_ready(jitted(*args))[0]
                want = final if want is None else want
                err = float(jnp.max(jnp.abs(final - want)) / jnp.max(jnp.abs(want)))
                t = _time_calls(jitted, args, p["repeats"], calls=5) / GDN_OP_STEPS
            except Exception as e:  # one configuration failing leaves the others measured
                _emit({"kind": "op_error", "impl": impl, "batch": batch,
                       "error": f"{type(e).__name__}: {str(e)[:500]}"})  # fmt: skip
                continue
            _emit(
                {
                    "kind": "gdn_op",
                    "impl": impl,
                    "batch": batch,
                    "s_per_step": t,
                    "state_bytes": state_bytes,
                    "rel_err_vs_xla": err,
                    "roofline_fraction": state_bytes / p["bandwidth"] / t,
                }
            )


def run_child(p: dict, name: str, variant: Variant) -> None:
    import jax

    p["bandwidth"] = bench.copy_bandwidth(p["copy_mib"] << 20, p["repeats"])
    _emit(
        {
            "kind": "start",
            "variant": name,
            "settings": dataclasses.asdict(variant),
            "backend": jax.default_backend(),
            "copy_bandwidth_bytes_per_s": p["bandwidth"],
            **results_io.provenance(),
        }
    )
    if variant.kind == "op":
        run_op_variant(p)
    elif variant.kind == "gdn_op":
        run_gdn_op_variant(p)
    else:
        run_model_variant(p, variant)
    _emit({"kind": "done"})


# -------------------------------------------------------------------------- parent process


def child_command(p: dict, name: str) -> list[str]:
    """The command line of one variant's child process."""
    return [
        sys.executable,
        os.path.abspath(__file__),
        f"--child={name}",
        f"--child_variant={json.dumps(dataclasses.asdict(VARIANTS[name]))}",
        f"--preset={p['preset']}",
        f"--rows={p['rows_text']}",
        f"--layers={p['layers']}",
        f"--repeats={p['repeats']}",
        f"--decode_steps={p['decode_steps']}",
        f"--compile_threads={p['compile_threads']}",
    ]


def run_variant(p: dict, name: str, timeout_s: float, on_record) -> dict:
    """Runs one variant's child, streaming its output: its records go to on_record(record), its
    progress lines are echoed. Returns {"status", "seconds", "head", "tail"}: its first and last
    other lines (XLA reports a bad flag first, then lists every flag; Python's errors come last)."""
    env = child_env(VARIANTS[name], os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        child_command(p, name),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
        process_group=0,  # its own process group: a timeout ends it and what it started
    )
    head, tail, status = [], [], "failed"
    deadline = t0 + timeout_s
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buffered = ""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            os.killpg(proc.pid, 9)  # the child and anything it started
            status = "timed out"
            break
        if not sel.select(timeout=min(left, 5.0)):
            continue
        chunk = os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
        if not chunk:
            break
        buffered += chunk
        *lines, buffered = buffered.split("\n")
        for line in lines:
            record = parse_child_line(line)
            if record is None:
                if len(head) < 20:
                    head.append(line)
                tail = (tail + [line])[-40:]
                if line.startswith("["):  # the child's progress lines (bench_inference.log)
                    print(f"  {name}: {line}", flush=True)
            elif record["kind"] == "done":
                status = "ok"
            else:
                on_record(record)
    proc.wait()
    sel.close()
    if status != "timed out" and proc.returncode != 0:
        status = f"failed (exit {proc.returncode})"
    return {"status": status, "seconds": time.perf_counter() - t0, "head": head, "tail": tail}


def write_result(result: dict, p: dict) -> str:
    """Rewrites <out>/probe_decode_<tag>.json whole (a reader never sees half a file)."""
    return results_io.write_result(p["out"], "probe_decode", p["tag"], False, result)


def run_parent(p: dict) -> str:
    t0 = time.perf_counter()
    result = {
        "probe": "decode step variants: decoding attention, XLA flags, scan unroll",
        "preset": p["preset"],
        "layers": p["layers"],
        "rows": p["rows"],
        "decode_steps": p["decode_steps"],
        "repeats": p["repeats"],
        "budget_s": p["budget_s"],
        "variants": {n: dataclasses.asdict(VARIANTS[n]) for n in p["variants"]},
        **results_io.invocation(),  # no device: this process never starts JAX
        "runs": {},
        "complete": False,
    }
    path = write_result(result, p)
    print(f"writing {path} as rows are measured", flush=True)
    for name in p["variants"]:
        run = result["runs"][name] = {"records": []}
        left = p["budget_s"] - (time.perf_counter() - t0)
        if left < p["min_variant_s"]:
            run["status"] = f"skipped: {left:.0f} s of the budget left"
            print(f"{name}: {run['status']}", flush=True)
            write_result(result, p)
            continue
        print(f"{name}: {dataclasses.asdict(VARIANTS[name])}", flush=True)

        def on_record(record, run=run, name=name):
            if record["kind"] == "start":
                run["start"] = record
            else:
                run["records"].append(record)
                if record["kind"] in ("op", "gdn_op", "model"):
                    print(row_line(name, record), flush=True)
                else:
                    print(f"{name}: {record}", flush=True)
            write_result(result, p)

        run.update(run_variant(p, name, min(left, p["variant_timeout_s"]), on_record))
        if run["status"] != "ok":
            print(f"{name}: {run['status']}; its last lines:", flush=True)
            shown = run["head"][:6] + ["..."] + run["tail"][-12:]
            print("\n".join(f"  | {x[:300]}" for x in shown), flush=True)
        else:
            run["head"], run["tail"] = run["head"][:5], run["tail"][-5:]
        print(f"{name}: {run['status']} in {run['seconds']:.0f} s", flush=True)
        write_result(result, p)
    result["complete"] = True
    result["elapsed_s"] = time.perf_counter() - t0
    return write_result(result, p)


# ----------------------------------------------------------------------------------- main


def define_flags() -> None:
    flags.DEFINE_enum("preset", "qwen2_5_1_5b", list(ROWS), "Model shape (bench_inference's).")
    flags.DEFINE_string("rows", None, "Comma-separated LxB rows (the preset's if unset).")
    flags.DEFINE_integer("layers", None, "Layers of the models (the preset's if unset).")
    flags.DEFINE_string("variants", DEFAULT_VARIANTS, f"Comma-separated, of {sorted(VARIANTS)}.")
    flags.DEFINE_integer("decode_steps", 32, "Decoded tokens per timed call.")
    flags.DEFINE_integer("repeats", 3, "Timed calls per row (median).")
    flags.DEFINE_integer("compile_threads", 8, "Programs compiled at once (per child).")
    flags.DEFINE_float("budget_s", 420.0, "No variant starts after this many seconds.")
    flags.DEFINE_float("variant_timeout_s", 200.0, "A child is stopped after this many seconds.")
    flags.DEFINE_float("min_variant_s", 45.0, "A variant starts only with this much budget left.")
    flags.DEFINE_string("tag", "", "Result file tag (default: the preset's name).")
    flags.DEFINE_string("out", os.path.join(LAUNCH_DIR, "results"), "Output directory.")
    flags.DEFINE_string("child", None, "Internal: run the variant of this name in this process.")
    flags.DEFINE_string("child_variant", None, "Internal: that variant's fields (JSON).")


def settings(
    preset,
    rows=None,
    layers=None,
    variants=DEFAULT_VARIANTS,
    decode_steps=32,
    repeats=3,
    compile_threads=8,
    budget_s=420.0,
    variant_timeout_s=200.0,
    min_variant_s=45.0,
    tag="",
    out=os.path.join(LAUNCH_DIR, "results"),
) -> dict:
    """The preset with the command line's overrides; SettingsError (one line) on a bad value."""
    p = dict(
        bench.PRESETS[preset],
        preset=preset,
        keep_every=4,
        decode_steps=decode_steps,
        repeats=repeats,
        compile_threads=compile_threads,
        budget_s=budget_s,
        variant_timeout_s=variant_timeout_s,
        min_variant_s=min_variant_s,
        out=out,
    )
    p["rows_text"] = rows or ROWS[preset]
    p["rows"] = parse_rows(p["rows_text"])
    p["variants"] = parse_variants(variants)
    p["tag"] = tag or preset
    if layers is not None:
        if layers < 2:
            raise SettingsError(f"--layers must be >= 2 (a student with both mixers), got {layers}")
        p["layers"] = layers
    for name in ("decode_steps", "repeats", "compile_threads"):
        if p[name] < 1:
            raise SettingsError(f"--{name} must be >= 1, got {p[name]}")
    if min(budget_s, variant_timeout_s) <= 0:
        raise SettingsError("--budget_s and --variant_timeout_s must be positive")
    return p


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        p = settings(
            f.preset,
            f.rows,
            f.layers,
            f.variants,
            f.decode_steps,
            f.repeats,
            f.compile_threads,
            f.budget_s,
            f.variant_timeout_s,
            f.min_variant_s,
            f.tag,
            f.out,
        )
    except SettingsError as e:
        raise app.UsageError(str(e)) from None
    if f.child:
        run_child(p, f.child, Variant(**json.loads(f.child_variant)))
    else:
        print(f"wrote {run_parent(p)}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    define_flags()
    app.run(main)
