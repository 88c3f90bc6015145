"""What the numeric export tests share: a small random student, left-padded prompts followed by
tokens to decode, our JAX logits for them, a torch model run as a prefill and then one token at
a time on its own cache, and fla's model loaded from the fla-format export.

Used on the GPU (tests/test_export_gpu.py: bf16, fla's kernels compiled) and on the CPU
(tests/fla_interpret_worker.py: float32, fla's Triton kernels in Triton's interpreter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from test_export_hf import randomize
from tiny_models import tiny_model_config

from taylorcal_jax.eval.generate import left_pad
from taylorcal_jax.export.fla_format import write_fla_model
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import init_params

# (kept layers, sliding window): no kept layer, a kept full-attention layer, a kept windowed one
FLA_CASES = [((), None), ((1,), None), ((1,), 32)]


def student(keep, conv, window=None):
    """A 3-layer student with random params; `window`: a Mistral teacher whose every layer has
    that sliding window (shorter than the prompts)."""
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


def sequences(prompt_lengths, steps):
    """Left-padded prompts, each followed by `steps` more tokens: (tokens, valid) [B, T]."""
    rng = np.random.default_rng(0)
    total = max(prompt_lengths) + steps
    rows = [list(rng.integers(1, 512, n + steps)) for n in prompt_lengths]
    return left_pad(rows, pad_id=0, length=total)


def jax_logits(sc, params, tokens, valid):
    """Our student's logits [B, T, V], float32 with matmuls at "highest"."""
    with jax.default_matmul_precision("highest"):
        logits, _, _ = sc.model().apply({"params": params}, jnp.asarray(tokens), valid_bt=valid)
    return np.asarray(logits)


def rel(a, b, valid):
    """||a - b||_F / ||b||_F over the real tokens."""
    a, b = np.asarray(a, np.float64)[valid], np.asarray(b, np.float64)[valid]
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def prefill_then_decoding_errors(forward, tokens, valid, ref, steps, device):
    """Runs the prompts (all but the last `steps` tokens) in one call, then each further token
    on the cache the call before returned, and returns the relative errors against `ref`
    [B, T, V] of the prefill's logits and of the decoded tokens' logits.
    forward(ids, mask, cache) -> (logits, cache); cache is None on the first call."""
    ids = torch.as_tensor(tokens, device=device)
    mask = torch.as_tensor(valid.astype(np.int64), device=device)
    prompt = tokens.shape[1] - steps
    with torch.no_grad():
        logits, cache = forward(ids[:, :prompt], mask[:, :prompt], None)
        chunks = [logits]
        for t in range(prompt, tokens.shape[1]):
            logits, cache = forward(ids[:, t : t + 1], mask[:, : t + 1], cache)
            chunks.append(logits)
    got = torch.cat(chunks, 1).float().cpu().numpy()
    return (
        rel(got[:, :prompt], ref[:, :prompt], valid[:, :prompt]),
        rel(got[:, prompt:], ref[:, prompt:], valid[:, prompt:]),
    )


def install_flash_attn_functions(setattr_):
    """flash-attn's functions for fla's attention layer: the package's where it is installed,
    else tests/flash_attn_reference.py's (set with `setattr_(module, name, value)`, e.g. a
    pytest monkeypatch's setattr). Returns which one."""
    try:
        import flash_attn  # noqa: F401, PLC0415

        return "flash_attn"
    except ImportError:
        import fla.layers.attn  # noqa: PLC0415
        from flash_attn_reference import flash_attn_func, flash_attn_varlen_func  # noqa: PLC0415

        setattr_(fla.layers.attn, "flash_attn_func", flash_attn_func)
        setattr_(fla.layers.attn, "flash_attn_varlen_func", flash_attn_varlen_func)
        return "reference"


def fla_model(sc, params, path, device, dtype):
    """The fla-format export of the student, loaded by fla's GatedDeltaNetForCausalLM in
    `dtype` on `device` (its attention layers need install_flash_attn_functions first), and
    its forward for prefill_then_decoding_errors."""
    from fla.models import GatedDeltaNetForCausalLM  # noqa: PLC0415

    write_fla_model(path, sc, params)
    model = GatedDeltaNetForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()

    def forward(ids, mask, cache):
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    return forward
