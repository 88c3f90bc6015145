"""Export in flash-linear-attention's GatedDeltaNetForCausalLM format (export/fla_format.py).

The layout against fla's real model: the exported config builds it, every tensor loads by
name with its shape (strict) and lands where ours expects it; the features fla cannot express
are refused by name. The logits: fla's model runs on the CPU in float32 with its Triton
kernels in Triton's interpreter and flash-attn's functions from tests/flash_attn_reference.py
(tests/fla_interpret_worker.py, in a process of its own), and must match our student to 1e-4
relative, on a left-padded prefill and on tokens decoded on fla's own cache; in bf16 with the
compiled kernels on the GPU, test_export_gpu.py.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from export_numerics import FLA_CASES
from suite_env import suite_xla_flags
from test_export_hf import make_student

from taylorcal_jax.export.common import UnsupportedExportError
from taylorcal_jax.export.fla_format import check_fla_exportable, write_fla_model
from taylorcal_jax.models import hf_io
from taylorcal_jax.models.config import RopeConfig

fla_models = pytest.importorskip("fla.models")


def _fla_model(path, monkeypatch):
    """fla's model built from the exported config (flash-attn is only needed to run it)."""
    import fla.layers.attn  # noqa: PLC0415

    monkeypatch.setattr(fla.layers.attn, "flash_attn_func", lambda *a, **k: None)
    config = fla_models.GatedDeltaNetConfig.from_pretrained(str(path))
    return fla_models.GatedDeltaNetForCausalLM(config), config


# name, keep, teacher overrides; every case has the GDN norm_eps (1e-5) as the teacher's eps.
CASES = [
    ("mistral_window_conv", (1, 2), {}),
    ("qwen2_bias_conv_yarn", (1,), dict(rope=RopeConfig(theta=1e6))),  # default RoPE
    ("llama_tied_llama3", (), {}),  # no kept layer: the teacher's RoPE does not matter
]


@pytest.mark.parametrize("name, keep, overrides", CASES)
def test_fla_model_loads_every_tensor_in_place(name, keep, overrides, tmp_path, monkeypatch):
    sc, params = make_student(name, keep=keep, rms_norm_eps=1e-5, **overrides)
    write_fla_model(tmp_path, sc, params)
    model, config = _fla_model(tmp_path, monkeypatch)
    t = sc.teacher
    kept = list(sc.keep_full_attention_layers)
    assert [layer for spec in (config.attn or []) for layer in spec["layers"]] == kept
    for spec in config.attn or []:
        assert (spec["num_heads"], spec["num_kv_heads"]) == (4, 2)
        assert spec["qkv_bias"] == t.attention_bias and spec["rope_theta"] == t.rope.theta
        assert spec["window_size"] == t.sliding_windows[spec["layers"][0]]
    assert config.norm_eps == t.rms_norm_eps
    assert config.use_short_conv == sc.mixer_config.use_short_conv

    tensors = hf_io.read_weights(tmp_path)
    expected = model.state_dict()
    if t.tie_word_embeddings:
        assert "lm_head.weight" not in tensors
        expected.pop("lm_head.weight")
    assert sorted(tensors) == sorted(expected)
    assert all(tuple(tensors[k].shape) == tuple(v.shape) for k, v in expected.items())
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=False
    )
    # Spot values: where fla reads them, our arrays (conv [W, C] -> [C, 1, W], Dense transposed).
    gdn = params["layers_0"]["gdn"]
    attn = model.model.layers[0].attn
    np.testing.assert_array_equal(
        attn.q_proj.weight.detach().numpy(), np.asarray(gdn["q_proj"]["kernel"]).T
    )
    np.testing.assert_array_equal(attn.A_log.detach().numpy(), np.asarray(gdn["A_log"]))
    if sc.mixer_config.use_short_conv:
        conv = np.asarray(gdn["v_conv"]["kernel"])
        np.testing.assert_array_equal(attn.v_conv1d.weight.detach().numpy(), conv.T[:, None, :])
    np.testing.assert_array_equal(
        model.model.embeddings.weight.detach().numpy(),
        np.asarray(params["embed_tokens"]["embedding"]),
    )
    if t.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("qwen3_qknorm_linear", dict(rms_norm_eps=1e-5, rope=RopeConfig()), "qk_norm"),
        ("llama_tied_llama3", dict(rms_norm_eps=1e-5), "RoPE scaling 'llama3'"),
        ("mistral_window_conv", dict(rms_norm_eps=1e-6), "GDN norm_eps 1e-05 differs"),
        ("mistral_window_conv", dict(rms_norm_eps=1e-5, head_dim=16), "head_dim 16 x 4 heads"),
    ],
)
def test_inexpressible_features_are_named(name, overrides, message):
    sc, _ = make_student(name, **overrides)
    with pytest.raises(UnsupportedExportError, match=message):
        check_fla_exportable(sc)
    if message != "GDN norm_eps 1e-05 differs":  # attention features: fine without kept layers
        check_fla_exportable(sc.__class__(sc.teacher, (), sc.mixer_config))


def test_bf16_export_stores_bf16(tmp_path):
    sc, params = make_student("mistral_window_conv", rms_norm_eps=1e-5)
    write_fla_model(tmp_path, sc, params, jnp.bfloat16)
    assert {str(a.dtype) for a in hf_io.read_weights(tmp_path).values()} == {"bfloat16"}


def test_fla_model_logits_match_our_student_in_triton_interpreter():
    """export_numerics.FLA_CASES (no kept layer, a kept full-attention layer, a kept layer
    with a 32-token window): fla's float32 logits within 1e-4 of ours, prefill and decoding."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS=suite_xla_flags())
    proc = subprocess.run(
        [sys.executable, os.path.join(tests_dir, "fla_interpret_worker.py")],
        cwd=tests_dir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(tuple(row["keep"]), row["window"]) for row in rows] == FLA_CASES
    for row in rows:
        assert row["prefill"] < 1e-4 and row["decoding"] < 1e-4, row
