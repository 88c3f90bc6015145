"""Launch-option sweep of the Pallas gated delta rule: times of a grid of BF16Config fields.

Block sizes, warps, pipelining depths and the program-count thresholds change speed, not results
(every branch they select is covered by the correctness tests), so this times only: for every
combination of --grid on top of --base (BF16Config fields; '{}' = the library default), the
pipelined median (bench_gdn_kernel._jax_timer: 10 batches of 10 calls) of the forward, and with
--fwdbwd of forward + backward, at each --rows shape, bf16, in one process. Compare figures
within one result file only (one machine, one process).

Usage (device):
  python3 launch/sweep_gdn_kernel.py --rows 1,0 --fwdbwd \
      --grid '{"warps": [4, 8], "stages": [1, 2, 3]}' --out $OUT/sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gdn_kernel import ROWS, _fwd_fwdbwd, _jax_timer, bf16_config, device_inputs  # noqa: E402
from results_io import provenance  # noqa: E402


def grid_configs(base: dict, grid: dict) -> list[dict]:
    """Every combination of grid's field lists applied on top of base, in grid order."""
    names = list(grid)
    return [
        {**base, **dict(zip(names, vals, strict=True))}
        for vals in itertools.product(*grid.values())
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="{}", help="BF16Config fields as JSON ('{}' = default)")
    ap.add_argument("--grid", required=True, help="JSON {field: [values]}")
    ap.add_argument("--rows", default="1", help="comma-separated rows of bench_gdn_kernel.ROWS")
    ap.add_argument("--fwdbwd", action="store_true", help="also time forward + backward")
    ap.add_argument("--out", default="gdn_sweep.json")
    a = ap.parse_args()
    import jax

    from taylorcal_jax.ops.gdn.pallas_gpu.op import gated_delta_rule_pallas

    configs = grid_configs(json.loads(a.base), json.loads(a.grid))
    for fields in configs:  # reject a bad grid before any compilation
        bf16_config(fields)
    result = {**provenance(), "base": json.loads(a.base), "grid": json.loads(a.grid), "runs": []}
    for row in (int(x) for x in a.rows.split(",")):
        args, do_ = device_inputs(ROWS[row])
        for fields in configs:
            cfg = bf16_config(fields)
            fwd, fb = _fwd_fwdbwd(
                lambda *x, cfg=cfg: gated_delta_rule_pallas(*x, config=cfg, interpret=None)
            )
            run = {"row": row, "shape": list(ROWS[row]), "fields": fields}
            try:
                run["fwd_ms"] = _jax_timer(fwd, args)
                if a.fwdbwd:
                    run["fwdbwd_ms"] = _jax_timer(fb, args + [do_])
            except Exception as e:  # noqa: BLE001 - a combination that does not compile
                run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            result["runs"].append(run)
            varied = {k: fields[k] for k in result["grid"]}
            print("SWEEP", row, varied, run.get("fwd_ms"), run.get("fwdbwd_ms"), flush=True)
            with open(a.out, "w") as f:  # after every run: survives a timeout
                json.dump(result, f, indent=1)
            jax.clear_caches()
        del args, do_


if __name__ == "__main__":
    main()
