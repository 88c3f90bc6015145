"""fla's GatedDeltaNetForCausalLM from our fla-format export, run on the CPU in float32 with
fla's Triton kernels in Triton's interpreter, against our JAX student on the same tokens.

Run by tests/test_export_fla.py in its own process: Triton reads TRITON_INTERPRET when it
builds its kernels, so it must be set before fla is imported, and fla's autotuners are limited
to their first configuration (the interpreter has no GPU to time the others on, and the choice
of launch configuration does not change what a kernel computes). fla's attention layers get
tests/flash_attn_reference.py's functions, flash-attn being a CUDA-only package.

Prints one JSON line per case of export_numerics.FLA_CASES: the kept layers, the window, and
the relative errors of the prefill's logits and of the decoded tokens' logits.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402

_prune = autotuner.Autotuner.prune_configs
autotuner.Autotuner.prune_configs = lambda self, kwargs: _prune(self, kwargs)[:1]

import export_numerics as numerics  # noqa: E402

# At most 64 tokens, where fla's layer prefills with its recurrent kernel: its chunked kernel
# does not run in Triton 3.9's interpreter (a loop index is a Python int there, and the kernel
# calls .to on it). The chunked kernel is compared on the GPU (tests/test_export_gpu.py).
PROMPT_LENGTHS = (40, 25)
DECODE_STEPS = 3


def main() -> int:
    numerics.install_flash_attn_functions(setattr)
    tokens, valid = numerics.sequences(PROMPT_LENGTHS, DECODE_STEPS)
    cpu = torch.device("cpu")
    for keep, window in numerics.FLA_CASES:
        sc, params = numerics.student(keep, conv=True, window=window)
        ref = numerics.jax_logits(sc, params, tokens, valid)
        with tempfile.TemporaryDirectory() as path:
            forward = numerics.fla_model(sc, params, path, cpu, torch.float32)
            prefill, decoding = numerics.prefill_then_decoding_errors(
                forward, tokens, valid, ref, DECODE_STEPS, cpu
            )
        row = {"keep": list(keep), "window": window, "prefill": prefill, "decoding": decoding}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
