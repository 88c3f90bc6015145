"""The work of one distillation stage-2 step, as XLA counts it, against the 6N FLOPs per token
that model FLOPs utilisation (MFU) credits (docs/benchmarks.md §6).

    python launch/count_stage2_flops.py --out=launch/results

Builds the stage-2 step of launch/recovery.py's throughput measurement (SmolLM2-135M's shape
with random weights, every 4th layer kept, bf16 compute over float32 masters, chunked KL) on
one device, compiles it without running it, and reads `cost_analysis()["flops"]` of the
compiled step, with and without rematerialisation. Per token:

    counted   = 6 N_student            (what MFU credits)
    necessary = 6 N_student + 2 N_teacher   (the teacher's forward is part of every step)
    executed  = XLA's FLOP count / (batch x seq_len)

The GDN op is counted as its XLA chunked form (`impl="chunked"`): XLA cannot count inside the
Pallas kernel the GPU runs, which does the same chunked products. The counts are properties of
the program, not of the device, so a CPU compile gives them; the attention's T^2 products are
in `executed` and in neither model count.

XLA's cost analysis counts the body of a loop once, whatever its trip count. So the program
counted here has the KL in one chunk of the whole sequence and the attention in one block of
queries (the GPU step splits both, for memory, into the same products); the chunked GDN op's
scan over its chunks stays a loop, of which only the first of T / 64 iterations is counted (the
inter-chunk state products, about 1% of the step): `executed` is a lower bound by that much.

--preset=small: a tiny model, for tests.
"""

from __future__ import annotations

import os
import sys

SMALL_SHAPE = dict(layers=4, hidden=32, heads=2, kv=1, head_dim=16, mlp=64, vocab=128)


def count(dims: dict, batch: int, seq_len: int, keep_every: int, remat: bool):
    """{"remat", **step_flops} of one stage-2 step on SmolLM2's shape with random weights, the
    KL in one chunk and the attention in one query block (module docstring)."""
    from taylorcal_jax.models import layers

    block = layers.ATTEND_BLOCK
    layers.ATTEND_BLOCK = max(block, seq_len)  # read when traced
    try:
        return _count(dims, batch, seq_len, keep_every, remat)
    finally:
        layers.ATTEND_BLOCK = block


def _count(dims: dict, batch: int, seq_len: int, keep_every: int, remat: bool):
    import bench_scaling  # launch/
    import jax
    import jax.numpy as jnp
    import model_shapes

    from taylorcal_jax.models.teacher import Transformer
    from taylorcal_jax.train import loop
    from taylorcal_jax.utils import sharding

    cfg = model_shapes.model_config(dims, max(seq_len, 64), "llama")
    teacher = model_shapes.random_params(Transformer(cfg), jax.random.PRNGKey(0), jnp.float32)
    problem = bench_scaling.stage2_problem(
        cfg,
        teacher,
        keep_every=keep_every,
        gdn_impl="chunked",
        dtype="bfloat16",
        chunk_size=seq_len,
        remat=remat,
    )
    mesh = sharding.make_mesh({"layers": 1, "data": 1, "fsdp": 1}, jax.devices()[:1])
    task, student = problem.task(mesh), problem.student
    state = loop.init_state(task, student, rng=jax.random.PRNGKey(0))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    compiled = loop.compiled_step(task, state, tokens, mesh=mesh, constants=teacher)
    return {"remat": remat, **step_flops(compiled, student, teacher, batch * seq_len)}


def step_flops(compiled, student, teacher, tokens_per_step: int) -> dict:
    """XLA's FLOP count of a compiled stage-2 step (`cost_analysis()["flops"]`) per token,
    against the model counts (module docstring): {"executed_flops_per_token",
    "counted_flops_per_token", "necessary_flops_per_token", "executed_over_counted",
    "executed_over_necessary", "n_student", "n_teacher"}; student and teacher are param trees."""
    import jax

    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, list) else costs
    n_student = int(sum(x.size for x in jax.tree.leaves(student)))
    n_teacher = int(sum(x.size for x in jax.tree.leaves(teacher)))
    executed = float(costs["flops"]) / tokens_per_step
    counted, necessary = 6 * n_student, 6 * n_student + 2 * n_teacher
    return {
        "executed_flops_per_token": executed,
        "counted_flops_per_token": counted,
        "necessary_flops_per_token": necessary,
        "executed_over_counted": executed / counted,
        "executed_over_necessary": executed / necessary,
        "n_student": n_student,
        "n_teacher": n_teacher,
    }


def main(argv):
    from absl import flags

    f = flags.FLAGS
    import bench_scaling  # launch/
    from results_io import progress_log, provenance, write_result

    small = f.preset == "small"
    dims = SMALL_SHAPE if small else bench_scaling.SMOLLM2_135M
    batch, seq_len = (2, 32) if small else (f.batch_size, f.seq_len)
    log = progress_log()
    rows = []
    for remat in (True, False):
        log(f"compiling the stage-2 step (remat={remat}) ...")
        row = count(dims, batch, seq_len, f.keep_every, remat)
        log(
            f"remat={remat}: {row['executed_flops_per_token']:,.0f} FLOPs/token executed, "
            f"{row['executed_over_counted']:.2f}x the 6N counted, "
            f"{row['executed_over_necessary']:.2f}x 6N + 2N_teacher"
        )
        rows.append(row)
    result = {
        **provenance(),
        "shape": dims,
        "batch_size": batch,
        "seq_len": seq_len,
        "chunk_size": seq_len,
        "note": "executed counts every loop of the step once; the GDN chunk scan's other "
        "iterations (about 1% of the step) are not in it: a lower bound",
        "keep_every": f.keep_every,
        "gdn_impl_counted": "chunked",
        "rows": rows,
    }
    path = write_result(f.out, "stage2_flops", "small" if small else "smollm2_135m", small, result)
    log(f"wrote {path}")


def define_flags():
    from absl import flags

    flags.DEFINE_enum("preset", "full", ["full", "small"], "small: a tiny model (tests).")
    flags.DEFINE_integer("batch_size", 8, "Sequences per step (launch/recovery.py's).")
    flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
    flags.DEFINE_integer("keep_every", 4, "Keep attention in every k-th layer.")
    flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")


if __name__ == "__main__":
    from absl import app

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    define_flags()
    app.run(main)
