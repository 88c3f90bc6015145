"""An XLA:CPU cliff in jaxlib 0.10: full-vocabulary logits over many tokens.

One forward of a one-layer GDN model (hidden 512, vocab 8192, random weights) at T = 2048, 4096
and 8192 tokens, median of 3 after a warm-up, returning either all [1, T, V] logits or the last
position's only (`last_logits_only=True`, what prefill and generation use). Each XLA_FLAGS
setting runs in its own process (XLA reads the flags once): as is, and with
--xla_cpu_experimental_ynn_fusion_type= (no YNNPACK fusions). jaxlib 0.10's XLA:CPU groups the
chain of matmuls ending in the LM head into one YNNPACK fusion ("__ynn_fusion" in the compiled
HLO), which is what falls off the cliff for the full logits at 8192 tokens.

    python launch/probe_xla_cpu_ynn.py [--out DIR]  # -> DIR/probe_xla_cpu_ynn_<device>.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import model_shapes  # launch/ is on sys.path when run as a script
import results_io

NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
DIMS = dict(layers=1, hidden=512, heads=8, kv=2, head_dim=64, mlp=1536, vocab=8192)
LENGTHS = (2048, 4096, 8192)


def measure() -> dict:
    """{"<T>_<full|last>": median seconds} in this process."""
    import jax
    import numpy as np

    from taylorcal_jax.models.mixers.gdn import GDNRuntime
    from taylorcal_jax.models.student import StudentConfig
    from taylorcal_jax.models.teacher import init_params

    cfg = model_shapes.qwen2_config(DIMS, max(LENGTHS))
    sc = StudentConfig.from_teacher(cfg, (), mixer="gdn")
    model = sc.model(runtime=GDNRuntime(impl="chunked"))
    params = init_params(
        cfg, jax.random.PRNGKey(1), mixers=model.mixers, student_mixer=model.student_mixer
    )
    out = {}
    for mode, last in (("full", False), ("last", True)):
        fwd = jax.jit(
            lambda p, x, last=last: model.apply({"params": p}, x, last_logits_only=last)[0]
        )
        for t in LENGTHS:
            tokens = jax.random.randint(jax.random.PRNGKey(0), (1, t), 1, DIMS["vocab"])
            jax.block_until_ready(fwd(params, tokens))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(fwd(params, tokens))
                times.append(time.perf_counter() - t0)
            out[f"{t}_{mode}"] = float(np.median(times))
            print(
                os.environ.get("XLA_FLAGS", ""), t, mode, round(out[f"{t}_{mode}"], 3), flush=True
            )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=results_io.RESULTS_DIR, help="folder of the result file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one measurement
    a = ap.parse_args(argv)
    if a.child:
        print("JSON " + json.dumps(measure()), flush=True)
        return
    runs = {}
    for name, flags in (("default", ""), ("no_ynn_fusion", NO_YNN)):
        env = dict(os.environ, XLA_FLAGS=flags)
        text = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        runs[name] = json.loads(next(ln[5:] for ln in text.splitlines() if ln.startswith("JSON ")))
        print(name, runs[name], flush=True)
    result = {
        "benchmark": "one-layer GDN model forward on the CPU: all logits vs last position only, "
        "with and without XLA:CPU YNNPACK fusions",
        "dims": DIMS,
        "xla_flags": {"default": "", "no_ynn_fusion": NO_YNN},
        "seconds_median_of_3": runs,
        **results_io.provenance(),
    }
    print(
        "wrote",
        results_io.write_result(a.out, "probe_xla_cpu_ynn", "", False, result),
    )


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
