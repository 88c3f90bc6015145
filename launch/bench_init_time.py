"""Wall time of the whole Taylor-Calibrate initialisation (docs/benchmarks.md §2-3).

Qwen2.5-1.5B shape by default (28 layers, hidden 1536, 12 heads, 2 kv heads, head dim 128,
MLP 8960, vocab 151936, tied embeddings), random weights, 21 converted layers (uniform 25%
kept: 0, 4, ..., 24), calibration batch 4 x 256, 300 alignment steps:

    python launch/bench_init_time.py                   # one H100: the reference figure
    python launch/bench_init_time.py --mesh_layers=-1  # all local devices on the layer axis
    python launch/bench_init_time.py --small           # a seconds-long CPU dry run

Phases, each timed cold (first call: tracing + compilation + run) and warm (second call,
same shapes): statistics (blockwise teacher pass over the converted layers), phase 1
(copy + closed-form calibration), phase 2 (alignment of all converted layers at once); plus
a plain teacher forward (logits) on the same batch for the statistics throughput ratio.
Writes launch/results/bench_init_time_<tag>.json (device, versions, date, command).
"""

from __future__ import annotations

import json
import os
import sys
import time

import model_shapes  # launch/ is on sys.path when run as a script
import results_io
from absl import app, flags

_SMALL = flags.DEFINE_bool("small", False, "Tiny shapes (CPU dry run).")
_LAYERS = flags.DEFINE_integer("layers", model_shapes.QWEN2_5_1_5B["layers"], "Layers.")
_HIDDEN = flags.DEFINE_integer("hidden", model_shapes.QWEN2_5_1_5B["hidden"], "Hidden size.")
_HEADS = flags.DEFINE_integer("heads", model_shapes.QWEN2_5_1_5B["heads"], "Query heads.")
_KV = flags.DEFINE_integer("kv_heads", model_shapes.QWEN2_5_1_5B["kv"], "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", model_shapes.QWEN2_5_1_5B["head_dim"], "Head dim.")
_MLP = flags.DEFINE_integer("intermediate", model_shapes.QWEN2_5_1_5B["mlp"], "MLP width.")
_VOCAB = flags.DEFINE_integer("vocab", model_shapes.QWEN2_5_1_5B["vocab"], "Vocabulary.")
_KEEP_EVERY = flags.DEFINE_integer("keep_every", 4, "Keep attention in every k-th layer.")
_N = flags.DEFINE_integer("num_sequences", 4, "Calibration sequences.")
_T = flags.DEFINE_integer("seq_len", 256, "Calibration sequence length.")
_STEPS = flags.DEFINE_integer("align_steps", 300, "Alignment steps.")
_BLOCK = flags.DEFINE_integer("block_size", 128, "Statistics block size.")
_MESH_LAYERS = flags.DEFINE_integer("mesh_layers", 1, "Devices on the layer axis (-1: all).")
_MESH_DATA = flags.DEFINE_integer("mesh_data", 1, "Devices on the data axis.")
_IMPL = flags.DEFINE_string("gdn_impl", "auto", "GDN op implementation.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "1: cold only; 2: cold and warm.")
_TAG = flags.DEFINE_string("tag", "", "Result file tag (default: device kind).")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results"), "Out dir.")


def _timed(fn):
    import jax

    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import common

    from taylorcal_jax.calibrate import align, stats, taylor
    from taylorcal_jax.convert.naive import copy_init
    from taylorcal_jax.models.mixers.gdn import GDNRuntime
    from taylorcal_jax.models.student import StudentConfig
    from taylorcal_jax.models.teacher import Transformer, init_params
    from taylorcal_jax.ops.gdn import api
    from taylorcal_jax.utils import sharding

    shape = dict(
        layers=_LAYERS.value,
        hidden=_HIDDEN.value,
        heads=_HEADS.value,
        kv=_KV.value,
        head_dim=_HEAD_DIM.value,
        mlp=_MLP.value,
        vocab=_VOCAB.value,
        n=_N.value,
        t=_T.value,
        steps=_STEPS.value,
    )
    if _SMALL.value:
        shape.update(
            layers=4, hidden=64, heads=4, kv=2, head_dim=16, mlp=128, vocab=256, n=2, t=64, steps=10
        )
    cfg = model_shapes.qwen2_config(shape, 32768)
    keep = tuple(range(0, shape["layers"], _KEEP_EVERY.value))
    sc = StudentConfig.from_teacher(cfg, keep, mixer="gdn")
    mixer = sc.student_mixer(GDNRuntime(impl=_IMPL.value))
    converted = sc.converted_layers
    c = common.get_config()
    consts = taylor.TaylorConstants.from_config(c.calibration)
    c.calibration.align.steps = shape["steps"]
    align_cfg = align.AlignConfig.from_config(c.calibration.align)
    axes = {"layers": _MESH_LAYERS.value, "data": _MESH_DATA.value}
    n_dev = _MESH_LAYERS.value * _MESH_DATA.value
    mesh = sharding.make_mesh(axes, jax.devices()[:n_dev] if n_dev > 0 else None)

    params, init_s = _timed(lambda: jax.jit(lambda k: init_params(cfg, k))(jax.random.PRNGKey(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (shape["n"], shape["t"]), 0, cfg.vocab_size)
    model = Transformer(cfg)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])

    def run_stats():
        return stats.collect(
            model,
            params,
            cfg,
            tokens,
            layers=converted,
            block_size=_BLOCK.value,
            sequences_per_batch=shape["n"],
        )

    def run_phase1(st):
        student = copy_init(params, sc, jax.random.PRNGKey(2))
        return taylor.taylor_init(
            student, st, converted, model_config=cfg, mixer=mixer, consts=consts
        )

    def run_phase2(student, st):
        return align.align_student(
            student, st, converted, model_config=cfg, mixer=mixer, cfg=align_cfg, mesh=mesh
        )

    timings = {}
    n_tok = shape["n"] * shape["t"]
    for label in ("cold", "warm")[: max(1, min(2, _REPEATS.value))]:
        _, t_fwd = _timed(lambda: fwd(params, tokens))
        st, t_stats = _timed(run_stats)
        (student, _), t_p1 = _timed(lambda st=st: run_phase1(st))
        (student, metrics), t_p2 = _timed(lambda s=student, st=st: run_phase2(s, st))
        timings[label] = {
            "teacher_forward_s": t_fwd,
            "statistics_s": t_stats,
            "phase1_s": t_p1,
            "phase2_s": t_p2,
            "total_s": t_stats + t_p1 + t_p2,
        }
        print(label, {k: round(v, 3) for k, v in timings[label].items()}, flush=True)
        last = timings[label]  # throughput from the latest (warm when there is one) repeat
        result = {
            "benchmark": "full Taylor-Calibrate initialisation (statistics + phase 1 + phase 2)",
            "shape": shape,
            "converted_layers": list(converted),
            "keep_full_attention_layers": list(keep),
            "mesh": dict(mesh.shape),
            "gdn_impl": _IMPL.value,
            "gdn_impl_resolved": api.resolve_impl(_IMPL.value),
            "timings": timings,
            "statistics_tokens_per_s": n_tok / last["statistics_s"],
            "teacher_forward_tokens_per_s": n_tok / last["teacher_forward_s"],
            "align_loss_before_mean": float(jnp.mean(metrics["loss_before"])),
            "align_loss_after_mean": float(jnp.mean(metrics["loss_after"])),
            "param_init_s": init_s,
            **results_io.provenance(),
        }
        # written after every repeat: a run cut short during the warm repeat keeps the cold one
        path = results_io.write_result(
            _OUT.value, "bench_init_time", _TAG.value, _SMALL.value, result
        )
    print(json.dumps({k: v for k, v in result.items() if k != "shape"}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    app.run(main)
