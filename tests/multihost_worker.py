"""One process of the multi-process test (tests/test_multihost.py): the perplexity of a tiny
random teacher on a (data, fsdp) mesh over the devices of every process, params split over
"fsdp", and the attention statistics of 8 sequences split over them; process 0 writes
{"nll", "tokens", "distance_lh", "x_sum", "processes", "devices"} as JSON to argv[1].

Run through launch/multihost.py (which sets the JAX_* variables); alone it is one process.
"""

import json
import sys

import jax
import numpy as np
from tiny_models import tiny_model_config  # tests/ (the directory of this script)

from taylorcal_jax.calibrate import stats as stats_lib
from taylorcal_jax.eval import perplexity as ppl_lib
from taylorcal_jax.models.teacher import Transformer, init_params
from taylorcal_jax.utils import hosts, sharding

CFG = tiny_model_config(max_position_embeddings=64)


def perplexity_on_all_devices() -> dict:
    """The figures every process computes together (same inputs on every process)."""
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.PRNGKey(0)))
    seq = np.random.default_rng(2).integers(0, 64, size=(11, 12)).astype(np.int32)
    valid = np.ones(seq.shape, bool)
    valid[3, :4] = False
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
    out = ppl_lib.perplexity(Transformer(CFG), params, seq, batch_size=3, valid_nt=valid, mesh=mesh)
    st = stats_lib.collect(Transformer(CFG), params, CFG, seq[:8], block_size=8, mesh=mesh)
    return {
        **out,
        "distance_lh": np.asarray(st.distance_lh).tolist(),
        "x_sum": float(np.abs(np.asarray(st.x_lntd, np.float64)).sum()),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
    }


if __name__ == "__main__":
    hosts.initialize(True)
    result = perplexity_on_all_devices()
    if hosts.is_main():
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
