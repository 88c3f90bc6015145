"""Export to a transformers model with its own modelling code (taylorcal_jax.export.hf_torch).

References: our JAX student's logits and its greedy generation (eval/generate.py). Tolerances:
fp32 logits on the CPU within 1e-4 relative (max |torch - jax| / max |jax| over real tokens); the
cached decoding of the exported model equal to its own full forward within 1e-5 relative;
greedy tokens identical; import after export bit-identical.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import traverse_util
from tiny_models import tiny_model_config

from taylorcal_jax.eval.generate import generate, left_pad
from taylorcal_jax.export import __main__ as export_cli
from taylorcal_jax.export.common import UnsupportedExportError
from taylorcal_jax.export.fla_format import check_fla_exportable, write_fla_model
from taylorcal_jax.export.hf_modeling.modeling_taylorcal_hybrid import CACHE_FIELD
from taylorcal_jax.export.hf_torch import check_exportable, read_hf_model, write_hf_model
from taylorcal_jax.models import mixers
from taylorcal_jax.models.config import RopeConfig
from taylorcal_jax.models.joined import join_for_decoding
from taylorcal_jax.models.mixers import gdn
from taylorcal_jax.models.mixers.gdn import GDNConfig
from taylorcal_jax.models.student import StudentConfig, save_student
from taylorcal_jax.models.teacher import init_params

VOCAB = 67
PROMPTS = [[3, 9, 27, 4, 11, 60, 2, 45, 8, 19], [8, 1, 33, 50]]  # the second is left-padded
YARN = RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
LLAMA3 = RopeConfig(rope_type="llama3", factor=8.0, original_max_position_embeddings=8)
# name -> (teacher overrides, keep_full_attention_layers, GDN options)
CASES = {
    "llama_tied_llama3": (dict(tie_word_embeddings=True, rope=LLAMA3), (1,), {}),
    "qwen2_bias_conv_yarn": (dict(model_type="qwen2", attention_bias=True, rope=YARN), (1,), {}),
    "qwen3_qknorm_linear": (
        dict(model_type="qwen3", qk_norm=True, rope=RopeConfig(rope_type="linear", factor=2.0)),
        (0,),
        dict(use_short_conv=True),
    ),
    "mistral_window_conv": (
        dict(model_type="mistral", sliding_windows=(3, 3, 3)),
        (1, 2),
        dict(use_short_conv=True, conv_size=3),
    ),
}


def randomize(params, seed=0):
    """Every leaf redrawn with O(1) activations (norm scales 1 + N(0, 0.2^2), biases N(0, 0.5^2),
    kernels N(0, 1/fan_in), embeddings N(0, 1)), so a swapped or misread tensor shows in the
    logits; A_log and dt_bias keep their (already random) init."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for n, (path, value) in enumerate(sorted(flat.items())):
        noise = jax.random.normal(jax.random.PRNGKey(seed * 1000 + n), value.shape)
        leaf = path[-1]
        if leaf == "scale":
            value = 1.0 + 0.2 * noise
        elif leaf == "bias":
            value = 0.5 * noise
        elif leaf == "kernel":
            value = noise / np.sqrt(value.shape[0])
        elif leaf == "embedding":
            value = noise
        out[path] = value
    return traverse_util.unflatten_dict(out)


def make_student(name, layers=3, keep=None, **teacher):
    """(StudentConfig, random params) of a CASES entry; `keep` and `teacher` fields override."""
    overrides, case_keep, gdn = CASES[name]
    keep = case_keep if keep is None else keep
    cfg = tiny_model_config(
        vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=64,
        **{**overrides, **teacher},
    )  # fmt: skip
    sc = StudentConfig.from_teacher(cfg, keep, mixer="gdn", **gdn)
    params = init_params(
        cfg, jax.random.PRNGKey(0), mixers=sc.mixers, student_mixer=sc.student_mixer()
    )
    return sc, randomize(params)


def load_torch(path, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, **kwargs
    )
    return model.eval()


def rel_err(a, b, valid):
    a, b = np.asarray(a, np.float64)[valid], np.asarray(b, np.float64)[valid]
    return np.abs(a - b).max() / np.abs(b).max()


def _mask(valid):
    return torch.as_tensor(np.asarray(valid, np.int64))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_logits_and_cached_decoding_match_jax(name, tmp_path):
    sc, params = make_student(name)
    tokens, valid = left_pad(PROMPTS, pad_id=0)
    ref, _, _ = sc.model().apply({"params": params}, jnp.asarray(tokens), valid_bt=valid)
    model = load_torch(write_hf_model(tmp_path, sc, params))
    assert model.dtype == torch.float32
    with torch.no_grad():
        full = model(torch.as_tensor(tokens), attention_mask=_mask(valid), use_cache=False).logits
        assert rel_err(full, ref, valid) < 1e-4
        # Prefill 6 slots, then one token per call: the same logits as the full forward. The
        # cache goes in under either name (transformers renamed past_key_values to cache) and
        # comes out under the installed version's.
        out = model(torch.as_tensor(tokens[:, :6]), attention_mask=_mask(valid[:, :6]))
        steps, cache = [out.logits], out[CACHE_FIELD]
        for t in range(6, tokens.shape[1]):
            name = ("cache", "past_key_values")[t % 2]
            out = model(
                torch.as_tensor(tokens[:, t : t + 1]), attention_mask=_mask(valid[:, : t + 1]),
                **{name: cache},
            )  # fmt: skip
            steps.append(out.logits)
            cache = out[CACHE_FIELD]
        with pytest.raises(ValueError, match="not both"):
            model(torch.as_tensor(tokens[:, :1]), cache=cache, past_key_values=cache)
    assert rel_err(torch.cat(steps, 1), full, valid) < 1e-5


@pytest.mark.parametrize("name", ["mistral_window_conv", "qwen3_qknorm_linear"])
def test_greedy_generate_matches_ours(name, tmp_path):
    sc, params = make_student(name)
    tokens, valid = left_pad(PROMPTS, pad_id=0)
    ours = generate(sc.model(), params, tokens, valid_bt=valid, max_new_tokens=32)["tokens"]
    model = load_torch(write_hf_model(tmp_path, sc, params))
    theirs = model.generate(
        torch.as_tensor(tokens), attention_mask=_mask(valid), max_new_tokens=32, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    np.testing.assert_array_equal(theirs[:, tokens.shape[1] :].numpy(), np.asarray(ours))


def _assert_same_params(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(x, y, err_msg=str(path))


@pytest.mark.parametrize("name", ["llama_tied_llama3", "mistral_window_conv"])
def test_round_trip_is_exact(name, tmp_path):
    sc, params = make_student(name)
    write_hf_model(tmp_path / "export", sc, params, max_shard_bytes=20_000)  # sharded
    config, back = read_hf_model(tmp_path / "export")
    assert config == sc
    _assert_same_params(back, params)
    # config.json holds the GDN architecture only; the torch kernel choice is a load-time option.
    hf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf["gdn"] == sc.mixer_config.to_dict() and "gdn_kernels" not in hf
    # What transformers writes after loading (tied head dropped, its own safetensors) reads back.
    load_torch(tmp_path / "export", gdn_kernels="torch").save_pretrained(tmp_path / "resaved")
    assert "gdn_kernels" not in json.loads((tmp_path / "resaved" / "config.json").read_text())
    config, back = read_hf_model(tmp_path / "resaved")
    assert config == sc
    _assert_same_params(back, params)
    # bf16: stored, loaded by transformers as bf16 by default, read back as the cast params.
    write_hf_model(tmp_path / "bf16", sc, params, jnp.bfloat16)
    assert load_torch(tmp_path / "bf16").dtype == torch.bfloat16
    _assert_same_params(
        read_hf_model(tmp_path / "bf16")[1], jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    )


def test_several_end_ids_reach_transformers(tmp_path):
    # a teacher's several eos ids (Llama 3.x Instruct) go to config.json as a list, which
    # transformers' generate() stops at, and read back as the same student config
    sc, params = make_student("llama_tied_llama3", eos_token_id=(1, 4))
    write_hf_model(tmp_path / "export", sc, params)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["eos_token_id"] == [1, 4]
    assert read_hf_model(tmp_path / "export")[0] == sc
    assert list(load_torch(tmp_path / "export").generation_config.eos_token_id) == [1, 4]


def test_params_of_another_model_are_refused_before_anything_is_written(tmp_path):
    """transformers and fla would load them with the missing tensors drawn at random."""
    sc, params = make_student("mistral_window_conv", rms_norm_eps=1e-5)  # fits fla's format
    other = make_student("mistral_window_conv", keep=(0,), rms_norm_eps=1e-5)[1]
    flat = traverse_util.flatten_dict(params)
    flat[("layers_1", "mlp", "up_proj", "kernel")] = flat[("layers_1", "mlp", "up_proj", "kernel")][
        :, :-1
    ]
    cases = [
        (join_for_decoding(params), "unexpected .*qkv"),
        (other, "missing"),
        (traverse_util.unflatten_dict(flat), "layers_1/mlp/up_proj/kernel has shape"),
    ]
    for write in (write_hf_model, write_fla_model):
        for bad, match in cases:
            with pytest.raises(ValueError, match=match):
                write(tmp_path / "out", sc, bad)
    assert not (tmp_path / "out").exists()


@dataclasses.dataclass(frozen=True)
class GDNWithNegativeEigenvalues(GDNConfig):
    """A GDN option the exporter does not know (beta in [0, 2))."""

    allow_neg_eigval: bool = False


def test_unknown_feature_is_named():
    sc, _ = make_student("llama_tied_llama3")
    options = dict(sc.mixer_config.to_dict(), allow_neg_eigval=False)
    check_exportable(dataclasses.replace(sc, mixer_config=GDNWithNegativeEigenvalues(**options)))
    options["allow_neg_eigval"] = True
    odd = dataclasses.replace(sc, mixer_config=GDNWithNegativeEigenvalues(**options))
    with pytest.raises(UnsupportedExportError, match="allow_neg_eigval=True cannot be exported"):
        check_exportable(odd)


@dataclasses.dataclass(frozen=True)
class OtherMixerConfig:
    """The architecture config of a student mixer that is not GDN."""

    width: int = 1


def test_other_student_mixer_is_refused(monkeypatch):
    """Both formats hold softmax attention and GDN layers only; another registry mixer is named."""
    other = dataclasses.replace(gdn.SPEC, name="other", config_class=OtherMixerConfig)
    monkeypatch.setitem(mixers.MIXERS, "other", other)
    sc, _ = make_student("mistral_window_conv", rms_norm_eps=1e-5)
    odd = dataclasses.replace(sc, mixer_config=OtherMixerConfig())
    assert odd.mixer_name == "other"
    for check in (check_exportable, check_fla_exportable):
        with pytest.raises(UnsupportedExportError, match="student mixer 'other' cannot be"):
            check(odd)


def test_export_command(tmp_path, capsys):
    sc, params = make_student("qwen3_qknorm_linear", rms_norm_eps=1e-5)  # = the GDN norm_eps
    student = save_student(tmp_path / "student", sc, params)
    tokenizer_dir = tmp_path / "tok"
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<eos>": 0, "a": 1}, "<eos>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>")
    tokenizer.save_pretrained(str(tokenizer_dir))
    out = tmp_path / "out"
    argv = [f"--student={student}", f"--out={out}", f"--tokenizer={tokenizer_dir}"]
    assert export_cli.main(argv) == 0
    assert os.path.exists(out / "tokenizer_config.json")
    assert read_hf_model(out)[0] == sc
    assert export_cli.main(argv) == 2  # exists
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert export_cli.main([*argv, "--overwrite", "--format=fla"]) == 2  # qwen3 does not fit
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "qk_norm" in err and err.count("\n") == 1
    # Without --tokenizer the student directory's tokenizer is exported (warning if none).
    bare = [f"--student={student}", f"--out={tmp_path / 'bare'}"]
    assert export_cli.main(bare) == 0
    assert "warning: no tokenizer in" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bare" / "tokenizer_config.json")
    tokenizer.save_pretrained(str(student))
    assert export_cli.main([*bare, "--overwrite"]) == 0
    assert os.path.exists(tmp_path / "bare" / "tokenizer_config.json")
    assert read_hf_model(tmp_path / "bare")[0] == sc
    # --overwrite never deletes what it exports: --out naming the student or a folder above it
    for out_dir in (student, tmp_path):
        assert export_cli.main([f"--student={student}", f"--out={out_dir}", "--overwrite"]) == 2
        assert "which replacing --out would delete" in capsys.readouterr().err
    assert os.path.exists(student / "student_config.json")
    # an --out that is a file was removed by nothing and os.replace failed after all the work
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert export_cli.main([f"--student={student}", f"--out={afile}", "--overwrite"]) == 2
    assert "is a file; name a directory" in capsys.readouterr().err
    assert afile.read_text() == "x" and not list(tmp_path.glob(".afile.*"))
    # what --out names once resolved, as the export replaces it (nowhere/.. is no directory)
    assert export_cli.main([f"--student={student}", f"--out={tmp_path}/nowhere/../bare"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert export_cli.main([f"--student={student}", f"--out={afile}/model"]) == 2
    assert "lies under" in capsys.readouterr().err
    # the export's own temporary directory is never one a user made (<out>.tmp was removed
    # whole, a student there included); one left by an export killed outright goes
    mine = tmp_path / "mine.tmp"
    shutil.copytree(student, mine)
    stale = tmp_path / ".mine.k1ll3d00.tmp"
    stale.mkdir()
    other = tmp_path / ".mine.v2.abcd1234.tmp"  # an export to --out=mine.v2 under way
    other.mkdir()
    assert export_cli.main([f"--student={mine}", f"--out={tmp_path / 'mine'}"]) == 0
    assert read_hf_model(tmp_path / "mine")[0] == sc and (mine / "student_config.json").exists()
    assert not stale.exists() and other.exists()
    assert [p.name for p in tmp_path.glob(".mine.*")] == [other.name]
    umask = os.umask(0)
    os.umask(umask)  # the export readable as a directory made with mkdir is
    assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o777 & ~umask
    capsys.readouterr()
    # a student directory without its weights: one line, not a traceback
    os.remove(student / "model.safetensors")
    assert export_cli.main([f"--student={student}", f"--out={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_exported_generation_stops_where_ours_does_and_pads_without_a_pad_token(tmp_path):
    """Our command stops at the tokenizer's EOS and the teacher's end ids, and left-pads with
    the EOS where the tokenizer has no pad token (Llama's, Mistral's): the export carries both
    to transformers (generation_config.json; the saved tokenizer's pad token)."""
    sc, params = make_student("llama_tied_llama3", eos_token_id=(4, 1))
    student = save_student(tmp_path / "student", sc, params)
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<eos>": 0, "a": 5}, "<eos>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>")
    tokenizer.save_pretrained(str(student))
    out = tmp_path / "out"
    assert export_cli.main([f"--student={student}", f"--out={out}"]) == 0
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [4, 1]
    generation = load_torch(out).generation_config
    assert list(generation.eos_token_id) == [0, 4, 1] and generation.pad_token_id == 0
    exported = transformers.AutoTokenizer.from_pretrained(str(out))
    assert exported.pad_token == "<eos>"
    assert read_hf_model(out)[0] == sc  # config.json still reads back as the student


def test_outputs_the_model_does_not_return_are_refused(tmp_path):
    sc, params = make_student("llama_tied_llama3")
    model = load_torch(write_hf_model(tmp_path, sc, params))
    tokens = torch.as_tensor(PROMPTS[0])[None]
    for flag in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
            model(tokens, **{flag: True})
    assert model(tokens, output_hidden_states=False).logits.shape == (1, len(PROMPTS[0]), VOCAB)


def test_fla_kernel_path_equals_torch_recurrence(tmp_path):
    """gdn_kernels="fla" (fused_recurrent_gated_delta_rule; Triton's interpreter runs it on the
    CPU) gives the logits of the PyTorch recurrence, prefill and decoding, within 1e-5."""
    sc, params = make_student("mistral_window_conv")
    path = write_hf_model(tmp_path, sc, params)
    script = textwrap.dedent(f"""
        import numpy as np, torch, transformers
        tokens = torch.as_tensor({PROMPTS[0]})[None]
        logits = {{}}
        for kernels in ("fla", "torch"):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                "{path}", trust_remote_code=True, gdn_kernels=kernels).eval()
            with torch.no_grad():
                out = model(tokens[:, :6])
                steps = [out.logits]
                for t in range(6, tokens.shape[1]):
                    out = model(tokens[:, t : t + 1], {CACHE_FIELD}=out["{CACHE_FIELD}"])
                    steps.append(out.logits)
            logits[kernels] = torch.cat(steps, 1).numpy()
        err = np.abs(logits["fla"] - logits["torch"]).max() / np.abs(logits["torch"]).max()
        print("REL", err)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.split("REL")[-1]) < 1e-5


def _readme_serving_snippet() -> str:
    """The Python block of README.md's "Serving a student" that loads the export in transformers."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        lines = f.read().splitlines()
    start = lines.index("    from transformers import AutoModelForCausalLM, AutoTokenizer")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("    "))
    return textwrap.dedent("\n".join(lines[start:end]))


def test_readme_serving_snippet_runs_as_written(tmp_path):
    """The README's load-and-generate lines, run as written (stdin closed, as in a script) on an
    export at exports/tiny: they generate for both prompts and never stop to ask whether to run
    the export's code (transformers asks when a call that reads config.json lacks
    trust_remote_code=True)."""
    sc, params = make_student("llama_tied_llama3")
    student = save_student(tmp_path / "student", sc, params)
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, "def": 3, "import": 4, "os": 5}
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<unk>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    # no pad token, as Llama's and Mistral's tokenizers: the export pads with the EOS
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(str(student))
    out = tmp_path / "exports" / "tiny"
    assert export_cli.main([f"--student={student}", f"--out={out}", "--dtype=bfloat16"]) == 0
    run = subprocess.run(
        [sys.executable, "-c", _readme_serving_snippet()],
        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    said = run.stdout + run.stderr
    assert run.returncode == 0, said[-2000:]
    assert "trust_remote_code" not in said, said[-2000:]
    decoded = [line for line in run.stdout.splitlines() if line.startswith("[")]
    # the shorter prompt left-padded with the EOS
    assert len(decoded) == 1 and decoded[0].count("<eos>") >= 1, run.stdout[-2000:]
