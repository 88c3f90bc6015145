"""On an NVIDIA GPU: exported students in bf16 with flash-linear-attention's kernels against our
JAX student in float32 (matmuls at "highest").

- the transformers export (export/hf_torch.py) with gdn_kernels="fla": a left-padded prefill
  of 150 tokens (chunk_gated_delta_rule) and 8 decoding steps (fused_recurrent_gated_delta_rule)
- fla's own GatedDeltaNetForCausalLM from the fla-format export (export/fla_format.py): the
  same prefill and 8 decoding steps on fla's own cache, without a kept attention layer, with a
  kept full-attention layer and with a kept sliding-window layer. fla's attention layer calls
  flash-attn; where that package is not installed (it ships as source only), its two functions
  come from tests/flash_attn_reference.py, an exact PyTorch form of them, so that the export's
  kept layers are checked all the same.

Tolerance: within 2e-2 relative, ||torch - jax||_F / ||jax||_F over the real tokens. Run on a
GPU machine, with flash-linear-attention from the wheels in .whl/:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 launch/run_gpu_tests.py tests/test_export_gpu.py --out-dir DIR
"""

import pytest
import torch  # a test dependency; export_numerics imports it as well
from export_numerics import (
    FLA_CASES,
    fla_model,
    install_flash_attn_functions,
    jax_logits,
    prefill_then_decoding_errors,
    sequences,
    student,
)

from taylorcal_jax.export.hf_torch import write_hf_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("fla")
from taylorcal_jax.export.hf_modeling.modeling_taylorcal_hybrid import CACHE_FIELD  # noqa: E402

pytestmark = pytest.mark.gpu

PROMPT_LENGTHS = (150, 100)  # > 64 tokens: fla's chunked kernel
DECODE_STEPS = 8
TOLERANCE = 2e-2


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch.device("cuda")


def _assert_close(forward, sc, params, device):
    tokens, valid = sequences(PROMPT_LENGTHS, DECODE_STEPS)
    ref = jax_logits(sc, params, tokens, valid)
    errors = prefill_then_decoding_errors(forward, tokens, valid, ref, DECODE_STEPS, device)
    assert max(errors) < TOLERANCE, f"prefill, decoding: {errors}"


@pytest.mark.parametrize("conv", [False, True])
def test_export_bf16_with_fla_kernels(conv, tmp_path):
    device = _cuda()
    sc, params = student((1,), conv)
    path = write_hf_model(tmp_path, sc, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, dtype=torch.bfloat16, gdn_kernels="fla"
    )
    model = model.to(device).eval()

    def forward(ids, mask, cache):
        out = model(ids, attention_mask=mask, **({} if cache is None else {CACHE_FIELD: cache}))
        return out.logits, out[CACHE_FIELD]

    _assert_close(forward, sc, params, device)


@pytest.mark.parametrize("keep, window", FLA_CASES)
def test_fla_format_bf16(keep, window, tmp_path, monkeypatch):
    """fla's model from the export: the left-padded prompts, then DECODE_STEPS tokens one at a
    time on fla's own cache."""
    device = _cuda()
    sc, params = student(keep, conv=True, window=window)
    if keep:
        which = install_flash_attn_functions(
            lambda module, name, value: monkeypatch.setattr(module, name, value, raising=False)
        )
        print("flash-attn functions:", which)
    forward = fla_model(sc, params, tmp_path, device, torch.bfloat16)
    _assert_close(forward, sc, params, device)
