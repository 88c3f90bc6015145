"""Whole-config validation: every bad value is one ConfigError line before any work, and the
workdir stays untouched. Also: every field has a description, and the help names the stages."""

import io
import json
import os
import sys

import ml_collections
import pytest

from taylorcal_jax import main as main_lib
from taylorcal_jax.errors import ConfigError
from taylorcal_jax.run import fields, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402


def _smoke(**changes):
    c = tiny.get_config("smoke")
    for key, value in changes.items():
        node = c
        *parents, name = key.split(".")
        for p in parents:
            node = node[p]
        node[name] = value
    return c


def _fails(config, tmp_path, match):
    wd = tmp_path / "wd"
    with pytest.raises(ConfigError, match=match) as info:
        main_lib.run(config, str(wd))
    assert "\n" not in info.value.message  # one line
    assert not wd.exists()  # nothing written
    return info.value


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("calibration.strategy", "bogus", r"calibration.strategy='bogus' is not one of copy, "),
        ("select.policy", "bogus", r"select.policy='bogus' is not one of uniform, ar, ga_s2"),
        ("calibration.write_gate", "mean", "calibration.write_gate='mean' is not one of"),
        ("calibration.gdn.impl", "cuda", "calibration.gdn.impl='cuda' is not one of"),
        ("calibration.gdn.impl", "pallas", "needs a GPU"),
        ("calibration.gdn.decode_impl", "fast", "GDN decode_impl must be one of"),
        ("calibration.gamma_min", 0.0, "calibration: need 0 < gamma_min"),
        ("calibration.align.steps", -1, "calibration.align.steps must be >= 0"),
        ("calibration.align.clip_norm", -1.0, "calibration.align.clip_norm must be > 0"),
        ("calibration.align.lr_gates", -1e-2, "calibration.align.lr_gates must be > 0"),
        ("calibration.align.weight_decay", -0.1, "calibration.align.weight_decay must be >= 0"),
        ("calibration.entropy_span_floor", 0.0, "entropy_span_floor must be > 0"),
        ("calibration.gate_damping", -5.0, "gate_damping must be >= 0"),
        ("calibration.seq_len", 65, r"calibration.seq_len=65 exceeds the teacher's max_pos"),
        ("select.keep_layers", (0, 5), r"select.keep_layers=\(0, 5\): \[5\] not in \[0, 2\)"),
        ("select.keep_layers", ("a", "b"), "must be layer indices"),
        ("select.keep_layers", (1.5,), "must be layer indices"),
        ("select.kept_fraction", 0.0, r"select.kept_fraction must be in \(0, 1\]"),
        ("pretrain.steps", -5, "pretrain.steps must be positive"),
        ("pretrain.warmup_steps", 99, "pretrain.warmup_steps must be in"),
        ("pretrain.seq_len", 4096, "max_position_embeddings"),
        ("pretrain.seq_len", 1, "pretrain.seq_len must be at least 2"),
        ("pretrain.b2", 1.0, r"pretrain.b2 must be in \[0, 1\), got 1.0"),
        ("pretrain.learning_rate", float("nan"), "pretrain.learning_rate=nan is not a finite"),
        ("distill.kl.lr_mixer", float("inf"), "distill.kl.lr_mixer=inf is not a finite number"),
        ("pretrain.b1", -0.1, r"pretrain.b1 must be in \[0, 1\)"),
        ("pretrain.weight_decay", -5.0, "pretrain.weight_decay must be >= 0"),
        ("teacher.dtype", "float16", "teacher.dtype='float16' is not one of float32, bfloat16"),
        ("teacher.model_type", "gpt2", "teacher.model_type='gpt2' is not one of"),
        ("teacher.num_key_value_heads", 3, "must be a multiple of num_key_value_heads"),
        ("tokenizer.vocab_size", 100, "tokenizer.vocab_size must be at least 259"),
        ("data.source", "s3://bucket", "unknown data source"),
        ("data.valid_fraction", 0.95, "fraction"),
        ("data.valid_fraction", 0.0, "pretrain.eval_sequences reads the valid split, but"),
        ("eval.split", "dev", "eval.split='dev' is not one of train, valid, test"),
        ("eval.seq_len", 1, "eval.seq_len must be at least 2"),
        ("stages", ("pretrain", "nope"), "unknown stage 'nope'"),
        ("stages", ("pretrain", "pretrain"), "lists pretrain more than once"),
        ("stages", ("statistics", "pretrain"), "'pretrain' is listed after it"),
        ("mesh.layers", 3, "do not fit the 8 devices here"),
        ("mesh.data", 0, "mesh.data must be positive or -1"),
        ("mesh.fsdp", -1, "are both -1; one axis at most"),
        ("distill.kl.attention_impl", "flash", "distill.kl.attention_impl='flash' is not one of"),
        ("distill.split", "valid", "distill.split='valid' is eval.split: distillation would"),
        ("calibration.split", "valid", "calibration.split='valid' is eval.split: phase 1 or"),
        ("calibration.seed", -1, r"calibration.seed must be in \[0, 2\*\*32\), got -1"),
        ("distill.seed", -3, r"distill.seed must be in \[0, 2\*\*32\)"),
        ("data.split_seed", -1, r"data.split_seed must be in \[0, 2\*\*32\)"),
        ("pretrain.seed", 2**32, r"pretrain.seed must be in \[0, 2\*\*32\)"),  # drew as 0
    ],
)
def test_bad_values_fail_before_any_work(tmp_path, key, value, match):
    _fails(_smoke(**{key: value}), tmp_path, match)


def test_layers_chosen_by_eval_text_are_refused(tmp_path):
    """select.split is read only when a policy scores candidates; then it must not be the
    eval split, as the text the chosen student is measured on would have chosen it."""
    config = _smoke(**{"select.policy": "ar", "select.split": "valid"})
    _fails(config, tmp_path, "select.split='valid' is eval.split: the kept layers would be")


def test_a_teacher_pretrained_here_is_not_evaluated_on_its_training_text(tmp_path):
    """pretrain trains on the train split, so eval.split='train' would measure every
    perplexity on the teacher's training text (the other stages read the valid split here)."""
    splits = {f"{s}.split": "valid" for s in ("calibration", "select", "distill")}
    config = _smoke(**{"eval.split": "train", **splits})
    error = _fails(config, tmp_path, "eval.split='train' is the text the teacher is pretrained")
    assert "eval.split='valid'" in error.hint


@pytest.mark.parametrize("eval_split, other", [("valid", "train"), ("train", "valid")])
def test_a_split_that_is_eval_split_is_refused_with_another_split_as_hint(eval_split, other):
    config = ml_collections.ConfigDict({"eval": {"split": eval_split}, "distill": {}})
    config.distill.split = eval_split
    with pytest.raises(ConfigError, match=f"distill.split='{eval_split}' is eval.split") as info:
        validate.not_eval_split(config, "distill.split", "distillation would train on")
    assert info.value.hint == f"use another split (distill.split='{other}')"


def test_an_empty_split_is_refused_only_where_a_running_stage_samples_it(tmp_path):
    """select samples select.split only when a policy scores the candidates: not when
    keep_layers names the layers, nor under uniform, which places them by index."""
    empty_test = {"data.test_fraction": 0.0, "select.split": "test"}
    _fails(_smoke(**empty_test, **{"select.policy": "ar"}), tmp_path, "select reads the test")
    for unscored in ({"select.keep_layers": (0,), "select.policy": "ar"}, {}):  # uniform
        config = _smoke(**empty_test, **unscored)
        validate.validate(config, main_lib.STAGES, str(tmp_path / "wd"))


def test_a_datasets_source_needs_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as where it is not installed
    config = _smoke(**{"data.source": "hf:wikitext:wikitext-2-raw-v1"})
    error = _fails(
        config, tmp_path, "data.source='hf:wikitext:wikitext-2-raw-v1' needs the `datasets`"
    )
    assert "pip install" in error.hint


@pytest.mark.parametrize("stage", ["layers", "kl"])
@pytest.mark.parametrize("dtype,match", [("float32", "dtype='bfloat16'"), ("bfloat16", "a GPU")])
def test_cudnn_attention_needs_bf16_and_a_gpu(tmp_path, stage, dtype, match):
    config = _smoke(**{f"distill.{stage}.attention_impl": "cudnn", f"distill.{stage}.dtype": dtype})
    error = _fails(config, tmp_path, match)
    assert f"distill.{stage}.attention_impl='cudnn' needs" in error.message


def test_the_pallas_decoding_step_is_refused_on_a_tpu(monkeypatch):
    from taylorcal_jax.calibrate import pipeline

    config = _smoke(**{"calibration.gdn.decode_impl": "pallas"})
    pipeline.check_gdn_backend(config, {})  # a CPU runs it in interpret mode
    monkeypatch.setattr(pipeline.jax, "default_backend", lambda: "tpu")
    with pytest.raises(ConfigError, match="decode_impl='pallas' is a GPU kernel"):
        pipeline.check_gdn_backend(config, {})


def test_alignment_sequences_must_split_over_the_data_axis(tmp_path):
    c = _smoke(
        **{
            "mesh.data": 8,
            "mesh.layers": 1,
            "calibration.num_sequences": 4,
            "pretrain.batch_size": 8,
            "distill.layers.batch_size": 8,
            "distill.kl.batch_size": 8,
        }
    )
    _fails(c, tmp_path, r"calibration.num_sequences=4 does not split over mesh.data=8")
    c.calibration.strategy = "copy"  # every stage listed, but align has nothing to do
    main_lib.run(c, str(tmp_path / "wd"), dry_run=True, console=_quiet())
    c.calibration.strategy = "taylor_init"  # no alignment: the split does not matter
    c.stages = ("pretrain",)
    main_lib.run(c, str(tmp_path / "wd"), dry_run=True, console=_quiet())


def test_stage2_batch_must_split_over_every_mesh_axis():
    # stage 2 splits its batch over layers x data x fsdp (sharding.batch_spec), fsdp included
    from taylorcal_jax.train.distill_stages import check_kl_split

    c = _smoke(**{"distill.kl.batch_size": 4})
    match = "distill.kl.batch_size=4 does not split over the 8 devices"
    with pytest.raises(ConfigError, match=match):
        check_kl_split(c, {"layers": 2, "data": 1, "fsdp": 4})
    check_kl_split(c, {"layers": 2, "data": 1, "fsdp": 2})


def _quiet():
    from taylorcal_jax.run.console import Console

    return Console(io.StringIO())


def test_unknown_fields_get_a_did_you_mean(tmp_path):
    c = _smoke()
    c.calibration.strategi = "copy"
    err = _fails(c, tmp_path, "unknown config field calibration.strategi")
    assert err.hint == "did you mean calibration.strategy?"
    c = _smoke()
    c.calibraton = ml_collections.ConfigDict({"strategy": "copy"})
    err = _fails(c, tmp_path, "unknown config field calibraton$")
    assert err.hint == "did you mean calibration?"


def test_wrong_types_are_named(tmp_path):
    d = _smoke().to_dict()
    d["eval"]["seq_len"] = "32"
    with pytest.raises(ConfigError, match=r"eval.seq_len='32' has the wrong type; expected an int"):
        validate.check_types(ml_collections.ConfigDict(d))
    d = _smoke().to_dict()
    d["stages"] = ("pretrain", 3)
    with pytest.raises(ConfigError, match="expected a tuple of str"):
        validate.check_types(ml_collections.ConfigDict(d))


def test_comma_lists_of_tuple_of_str_fields_are_split():
    """`--config.stages=a,b` reaches the config as ("a,b",) (ml_collections takes one item per
    flag); the CLI splits it, and leaves int tuples and single items alone."""
    c = _smoke(stages=("eval_teacher, statistics,,calibrate",))
    c.calibration.phase1_parts = ("write_gate,output_gate",)
    c.select.keep_layers = (0, 2)
    fields.split_comma_items(c)
    assert c.stages == ("eval_teacher", "statistics", "calibrate")
    assert c.calibration.phase1_parts == ("write_gate", "output_gate")
    assert c.select.keep_layers == (0, 2)
    c = _smoke(stages=("pretrain", "eval_teacher"))
    fields.split_comma_items(c)
    assert c.stages == ("pretrain", "eval_teacher")
    c = _smoke(stages=("",))  # --config.stages=
    fields.split_comma_items(c)
    assert c.stages == ()  # "config.stages is empty", not "unknown stage ''"


def _teacher_dir(tmp_path, *, config=True, weights=True, tokenizer=True, model_type="llama"):
    path = tmp_path / "teacher"
    path.mkdir()
    if config:
        hf = {
            "model_type": model_type,
            "vocab_size": 320,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 48,
        }
        (path / "config.json").write_text(json.dumps(hf))
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 8)
    else:
        (path / "pytorch_model.bin").write_bytes(b"\0" * 8)
    if tokenizer:
        (path / "tokenizer_config.json").write_text("{}")
    return str(path)


@pytest.mark.parametrize(
    "kind,match,hint",
    [
        ("missing", r"teacher.path='.*nowhere' does not exist", "Hugging Face checkpoint"),
        ("file", "is a file, not a directory", "Hugging Face checkpoint"),
        ("no_config", "has no config.json", "Hugging Face checkpoint"),
        ("pickle", "holds no \\*.safetensors weights", "convert the pickle weights"),
        ("unsupported", "model_type 'gpt2' is not supported", ""),
        ("no_tokenizer", "has no tokenizer files", "set tokenizer.path"),
        ("too_short", r"eval.seq_len=64 exceeds the teacher's max_position_embeddings \(48\)", ""),
        ("keep_layers", r"\[3\] not in \[0, 3\)", "the teacher has 3 layers"),
    ],
)
def test_teacher_path_problems(tmp_path, kind, match, hint):
    c = _smoke(**{"stages": ("eval_teacher", "statistics", "calibrate", "select_layers")})
    if kind == "missing":
        path = str(tmp_path / "nowhere")
    elif kind == "file":
        path = str(tmp_path / "file")
        open(path, "w").close()
    else:
        path = _teacher_dir(
            tmp_path,
            config=kind != "no_config",
            weights=kind != "pickle",
            tokenizer=kind != "no_tokenizer",
            model_type="gpt2" if kind == "unsupported" else "llama",
        )
    c.teacher.path = path
    c.eval.seq_len = 64 if kind == "too_short" else 32
    c.select.keep_layers = (3,) if kind == "keep_layers" else ()
    err = _fails(c, tmp_path, match)
    assert hint in err.hint


@pytest.mark.parametrize("content", ["{", "{}"])
def test_a_tokenizer_path_that_does_not_load_is_refused_before_any_work(tmp_path, content):
    """It had a tokenizer_config.json, so it passed; pretraining then failed with a traceback."""
    path = tmp_path / "tok"
    path.mkdir()
    (path / "tokenizer_config.json").write_text(content)
    err = _fails(_smoke(**{"tokenizer.path": str(path)}), tmp_path, "cannot be loaded")
    assert "\n" not in err.message


def test_teacher_architecture_comes_from_teacher_path_and_pretrain_is_skipped(tmp_path):
    c = _smoke(**{"stages": ("pretrain", "eval_teacher", "statistics")})
    c.teacher.path = _teacher_dir(tmp_path)
    out = io.StringIO()
    from taylorcal_jax.run.console import Console

    main_lib.run(c, str(tmp_path / "wd"), dry_run=True, console=Console(out))
    assert "skip: teacher.path is set" in out.getvalue()
    assert not (tmp_path / "wd").exists()


def test_every_field_has_a_description_and_print_config_shows_it():
    docs = fields.descriptions()
    flat = fields.flatten(fields.defaults())
    assert [k for k in flat if not docs.get(k)] == []
    assert [s for s in fields.sections(fields.defaults()) if not docs.get(s)] == []
    out = io.StringIO()
    main_lib.print_config(tiny.get_config("smoke"), out)
    text = out.getvalue()
    assert (
        "calibration.strategy = 'taylor_calibrate'  # how converted layers are initialised" in text
    )
    assert "# mesh: Device mesh, built once per run." in text
    assert all(f"\n{k} = " in text for k in flat)


def test_help_names_stages_strategies_and_policies():
    text = main_lib.help_text()
    for name, stage in main_lib.STAGES.items():
        assert f"  {name}" in text and stage.summary in text
    assert "taylor_calibrate" in text and "ga_s2" in text and "--print_config" in text


def test_corrupt_teacher_weights_are_one_user_error_line_at_load(tmp_path):
    from taylorcal_jax.errors import UserError
    from taylorcal_jax.run.console import Console

    c = _smoke(**{"stages": ("eval_teacher",)})
    c.teacher.path = _teacher_dir(tmp_path)  # model.safetensors holds 8 zero bytes
    with pytest.raises(UserError) as info:
        main_lib.run(c, str(tmp_path / "wd"), console=Console(io.StringIO()))
    err = info.value
    assert not isinstance(err, ConfigError) and err.exit_code == 1
    assert err.message.startswith(f"cannot load the teacher at {c.teacher.path} (teacher.path): ")
    assert "\n" not in err.message and "Hugging Face checkpoint" in err.hint
    record = json.load(open(tmp_path / "wd" / "stages.json"))["stages"]["eval_teacher"]
    assert record["status"] == "failed"


def test_the_corpus_fingerprint_holds_what_changes_tokens():
    from taylorcal_jax.run import inputs

    def settings(trains_bpe, **changes):
        return inputs.corpus_settings(_smoke(**changes), trains_bpe)

    # the share of undecodable bytes at which a run stops changes no token
    assert settings(True) == settings(True, **{"data.max_undecodable_fraction": 0.01})
    # the BPE's settings matter only where the BPE is trained here
    bpe = {"tokenizer.vocab_size": 300, "data.bpe_sample_bytes": 1 << 20}
    assert settings(True) != settings(True, **bpe)
    assert settings(False) == settings(False, **bpe)
    assert settings(False) != settings(False, **{"data.max_documents": 7})


def test_the_corpus_fingerprint_holds_the_token_format(monkeypatch):
    from taylorcal_jax.data import corpus
    from taylorcal_jax.run import inputs

    before = inputs.corpus_settings(_smoke(), True)
    monkeypatch.setattr(corpus, "TOKEN_FORMAT", corpus.TOKEN_FORMAT + 1)
    assert inputs.corpus_settings(_smoke(), True) != before


def test_the_corpus_fingerprint_holds_what_a_relative_source_reads(tmp_path, monkeypatch):
    from taylorcal_jax.run import inputs

    config = _smoke(**{"data.source": "files:docs/*.md"})
    seen = []
    for here in ("a", "b"):
        (tmp_path / here / "docs").mkdir(parents=True)
        (tmp_path / here / "docs" / "x.md").write_text("same text")
        monkeypatch.chdir(tmp_path / here)
        seen.append(inputs.corpus_settings(config, True))
    assert seen[0] != seen[1]
    # an edited file is other text: the fingerprint changes, and the stages reading the
    # corpus rerun (they went on with the old tokens)
    (tmp_path / "b" / "docs" / "x.md").write_text("edited text")
    assert inputs.corpus_settings(config, True) != seen[1]
    # a glob matching nothing is refused before any work (it failed inside pretrain)
    empty = _smoke(**{"data.source": "files:nothing/*.md"})
    _fails(empty, tmp_path, "data.source='files:nothing/\\*.md': no files match")


def test_validation_never_starts_the_jax_backend():
    # jax.distributed.initialize must come before the backend starts (run/runner.prepare), so
    # no check of `validate` may ask for it; the cuDNN attention's GPU check is a device check
    import subprocess

    code = """
import sys
sys.path.insert(0, "configs")
import tiny
from taylorcal_jax import main
from taylorcal_jax.run import validate
c = tiny.get_config("smoke")
for section in ("layers", "kl"):
    c.distill[section].attention_impl, c.distill[section].dtype = "cudnn", "bfloat16"
validate.validate(c, main.STAGES, "unused_workdir")
from jax._src import xla_bridge
print("backend started:", xla_bridge.backends_are_initialized())
"""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "backend started: False"
    assert not os.path.exists(os.path.join(ROOT, "unused_workdir"))


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("eval.num_sequences", 100_000, r"eval: 100000 sequences of 32 tokens need 3200000"),
        ("calibration.num_sequences", 50_000, r"calibration: 50000 sequences of"),
    ],
)
def test_samples_a_split_cannot_give_stop_the_run_before_pretraining(tmp_path, key, value, match):
    # the token counts are known once the corpus is built, at the start of the first stage that
    # reads it (pretraining): every running stage's windows are checked there, before it trains
    from taylorcal_jax.data.errors import DataError
    from taylorcal_jax.utils.metrics import read_metrics

    wd = tmp_path / "wd"
    config = _smoke(**{key: value, "stages": ("pretrain", "eval_teacher", "statistics")})
    with pytest.raises(DataError, match=match) as info:
        main_lib.run(config, str(wd), console=_quiet())
    assert "\n" not in info.value.message and "data.max_documents" in info.value.hint
    assert not (wd / "teacher").exists()  # nothing trained: not a step logged
    metrics = wd / "metrics.jsonl"
    assert not metrics.exists() or not [r for r in read_metrics(str(metrics)) if "loss" in r]
