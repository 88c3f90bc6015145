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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_export_hf import randomize
from tiny_models import tiny_model_config

from taylorcal_jax.eval.generate import left_pad
from taylorcal_jax.export.fla_format import write_fla_model
from taylorcal_jax.export.hf_torch import write_hf_model
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import init_params

torch = pytest.importorskip("torch")
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


def _student(keep, conv, window=None):
    """A 3-layer student; `window`: a Mistral teacher whose every layer has that sliding window
    (shorter than the prompts)."""
    windowed = {} if window is None else dict(model_type="mistral", sliding_windows=(window,) * 3)
    cfg = tiny_model_config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        rms_norm_eps=1e-5,  # = the GDN norm_eps, as fla's format needs
        **windowed,
    )  # fmt: skip
    sc = StudentConfig.from_teacher(cfg, keep, mixer="gdn", use_short_conv=conv)
    params = init_params(
        cfg, jax.random.PRNGKey(0), mixers=sc.mixers, student_mixer=sc.student_mixer()
    )
    return sc, randomize(params)


def _sequences():
    """Left-padded prompts followed by DECODE_STEPS more tokens: (tokens, valid) [2, T]."""
    rng = np.random.default_rng(0)
    total = max(PROMPT_LENGTHS) + DECODE_STEPS
    rows = [list(rng.integers(1, 512, n + DECODE_STEPS)) for n in PROMPT_LENGTHS]
    return left_pad(rows, pad_id=0, length=total)


def _jax_logits(sc, params, tokens, valid):
    with jax.default_matmul_precision("highest"):
        logits, _, _ = sc.model().apply({"params": params}, jnp.asarray(tokens), valid_bt=valid)
    return np.asarray(logits)


def _rel(a, b, valid):
    a, b = np.asarray(a, np.float64)[valid], np.asarray(b, np.float64)[valid]
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("conv", [False, True])
def test_export_bf16_with_fla_kernels(conv, tmp_path):
    device = _cuda()
    sc, params = _student((1,), conv)
    tokens, valid = _sequences()
    ref = _jax_logits(sc, params, tokens, valid)
    path = write_hf_model(tmp_path, sc, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, dtype=torch.bfloat16, gdn_kernels="fla"
    )
    model = model.to(device).eval()

    def forward(ids, mask, cache):
        out = model(ids, attention_mask=mask, **({} if cache is None else {CACHE_FIELD: cache}))
        return out.logits, out[CACHE_FIELD]

    _assert_prefill_then_decoding_close(forward, tokens, valid, ref, device)


def _assert_prefill_then_decoding_close(forward, tokens, valid, ref, device):
    """The prompts (all but the last DECODE_STEPS tokens) in one call, then each further token
    on the cache the call before returned, against `ref` [B, T, V]: both parts within
    TOLERANCE. forward(ids, mask, cache) -> (logits, cache); cache is None on the first call."""
    ids = torch.as_tensor(tokens, device=device)
    mask = torch.as_tensor(valid.astype(np.int64), device=device)
    prompt = tokens.shape[1] - DECODE_STEPS
    with torch.no_grad():
        logits, cache = forward(ids[:, :prompt], mask[:, :prompt], None)
        chunks = [logits]
        for t in range(prompt, tokens.shape[1]):
            logits, cache = forward(ids[:, t : t + 1], mask[:, : t + 1], cache)
            chunks.append(logits)
    got = torch.cat(chunks, 1).float().cpu().numpy()
    assert _rel(got[:, :prompt], ref[:, :prompt], valid[:, :prompt]) < TOLERANCE
    assert _rel(got[:, prompt:], ref[:, prompt:], valid[:, prompt:]) < TOLERANCE


def _fla_attention_functions(monkeypatch):
    """flash-attn's functions for fla's attention layer: the package's where it is installed,
    else the PyTorch reference (module docstring). Returns which one."""
    try:
        import flash_attn  # noqa: F401, PLC0415

        return "flash_attn"
    except ImportError:
        import fla.layers.attn  # noqa: PLC0415
        from flash_attn_reference import flash_attn_func, flash_attn_varlen_func  # noqa: PLC0415

        monkeypatch.setattr(fla.layers.attn, "flash_attn_func", flash_attn_func)
        monkeypatch.setattr(
            fla.layers.attn, "flash_attn_varlen_func", flash_attn_varlen_func, raising=False
        )
        return "reference"


def _fla_model(sc, params, path, device, monkeypatch):
    """The fla-format export of the student, loaded by fla in bf16 on `device`."""
    if sc.keep_full_attention_layers:
        print("flash-attn functions:", _fla_attention_functions(monkeypatch))
    from fla.models import GatedDeltaNetForCausalLM  # noqa: PLC0415

    write_fla_model(path, sc, params)
    model = GatedDeltaNetForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    return model.to(device).eval()


# (kept layers, sliding window): no kept layer, a kept full-attention layer, a kept windowed one
FLA_CASES = [((), None), ((1,), None), ((1,), 32)]


@pytest.mark.parametrize("keep, window", FLA_CASES)
def test_fla_format_bf16(keep, window, tmp_path, monkeypatch):
    """fla's model from the export: the left-padded prompts, then DECODE_STEPS tokens one at a
    time on fla's own cache."""
    device = _cuda()
    sc, params = _student(keep, conv=True, window=window)
    tokens, valid = _sequences()
    ref = _jax_logits(sc, params, tokens, valid)
    model = _fla_model(sc, params, tmp_path, device, monkeypatch)

    def forward(ids, mask, cache):
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    _assert_prefill_then_decoding_close(forward, tokens, valid, ref, device)
