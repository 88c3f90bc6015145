"""python -m taylorcal_jax.generate: batched, left-padded prompts and streaming equal the library's
generation of each prompt alone; resuming; one-line errors. Also generate_stream and left_pad."""

import json
import types

import jax
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax import generate as cli
from taylorcal_jax.convert.naive import copy_init
from taylorcal_jax.data.tokenizer import end_token_ids, train_bpe
from taylorcal_jax.eval.generate import generate, generate_stream, left_pad
from taylorcal_jax.models.student import StudentConfig, save_student
from taylorcal_jax.models.teacher import init_params

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20
PROMPTS = ["def add(a", "import", "print(os.getcwd(), 'x'"]
NEW = 7


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A tiny student (one kept layer, one GDN layer with the short conv) and its tokenizer."""
    tokenizer = train_bpe(TEXTS, 300)
    cfg = tiny_model_config(vocab_size=320, eos_token_id=tokenizer.eos_token_id)
    sc = StudentConfig.from_teacher(cfg, (1,), mixer="gdn", use_short_conv=True)
    params = copy_init(init_params(cfg, jax.random.PRNGKey(0)), sc, jax.random.PRNGKey(1))
    gdn = params["layers_0"]["gdn"]
    gdn["g_proj"] = {"kernel": gdn["g_proj"]["kernel"] * 4}  # the GDN layer matters in logits
    path = tmp_path_factory.mktemp("student")
    save_student(path, sc, params)
    tokenizer.save_pretrained(str(path))
    return path, sc, params, tokenizer


def _alone(student, text, **kw):
    """The library's continuation of one unpadded prompt, decoded up to EOS."""
    _, sc, params, tok = student
    ids = tok(text)["input_ids"]
    out = generate(
        sc.model(), params, np.asarray([ids]), max_new_tokens=NEW, eos_token_id=tok.eos_token_id,
        **kw,
    )  # fmt: skip
    return tok.decode(cli.until_eos(np.asarray(out["tokens"][0]), tok.eos_token_id))


def test_prompts_file_batches_equal_each_prompt_alone(student_dir, tmp_path, capsys):
    path = student_dir[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS))
    )
    out = tmp_path / "out.jsonl"
    argv = [f"--student={path}", f"--prompts_file={prompts}", f"--output={out}"]
    assert cli.main([*argv, f"--max_new_tokens={NEW}", "--batch_size=2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]  # input order, other keys kept
    assert [r["completion"] for r in rows] == [_alone(student_dir, p) for p in PROMPTS]

    # An output holding the first results is continued; one for other prompts is refused.
    out.write_text(json.dumps(rows[0]) + "\n")
    assert cli.main([*argv, f"--max_new_tokens={NEW}", "--batch_size=2"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    # ... also after a kill cut its last line short: that line is generated again
    out.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:15])
    assert cli.main([*argv, f"--max_new_tokens={NEW}", "--batch_size=1"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    out.write_text(json.dumps({**rows[0], "prompt": "other"}) + "\n")
    capsys.readouterr()
    assert cli.main([*argv, f"--max_new_tokens={NEW}"]) == 2
    assert "does not continue these prompts" in capsys.readouterr().err


def _sampled_run_args(student_dir, tmp_path, prompts, batch_size):
    """(the output path, argv) of a sampled --prompts_file run over `prompts`."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    argv = [
        f"--student={student_dir[0]}",
        f"--prompts_file={path}",
        f"--output={out}",
        f"--max_new_tokens={NEW}",
        f"--batch_size={batch_size}",
        "--temperature=1.0",
    ]
    return out, argv


def test_a_sampled_run_cut_mid_batch_resumes_to_the_uninterrupted_result(student_dir, tmp_path):
    """A kill inside a batch's write leaves some of its lines; the batch is redone whole, with
    its rows and its sampling key, not from the cut on."""
    out, argv = _sampled_run_args(student_dir, tmp_path, PROMPTS * 2, batch_size=4)
    assert cli.main(argv) == 0
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][:10])  # cut inside the first batch
    assert cli.main(argv) == 0
    assert out.read_text() == full
    out.write_text("".join(lines[:5]))  # the first batch and one line of the second
    assert cli.main(argv) == 0
    assert out.read_text() == full
    out.write_text("\n" + "".join(lines[:2]))  # a blank line (not ours) is skipped, kept
    assert cli.main(argv) == 0
    assert out.read_text() == "\n" + full


def test_continuing_an_output_with_other_settings_is_refused(student_dir, tmp_path, capsys):
    """The kept results of a resumed --output were generated with its recorded settings; a
    rerun with another seed, temperature or (sampling) batch size would append rows of another
    run, so it is refused before any generation, and so is a results file without settings."""
    out, argv = _sampled_run_args(student_dir, tmp_path, PROMPTS, batch_size=1)
    assert cli.main(argv) == 0
    first = out.read_text().splitlines(keepends=True)[0]
    for changed, name in [
        ("--seed=1", "seed"),
        ("--temperature=0.5", "temperature"),
        ("--batch_size=2", "batch_size"),
        ("--top_k=3", "top_k"),
    ]:
        out.write_text(first)
        capsys.readouterr()
        assert cli.main([*argv, changed]) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and name in err and err.count("\n") == 1
        assert out.read_text() == first  # nothing cut or appended
    assert cli.main(argv) == 0  # the recorded settings continue
    (tmp_path / "out.jsonl.settings.json").unlink()
    assert cli.main(argv) == 2
    assert "does not say how they were generated" in capsys.readouterr().err


def test_single_prompt_streams_the_same_text(student_dir, capsys):
    path = student_dir[0]
    assert cli.main([f"--student={path}", f"--prompt={PROMPTS[0]}", f"--max_new_tokens={NEW}"]) == 0
    assert capsys.readouterr().out == _alone(student_dir, PROMPTS[0]) + "\n"


def test_tokenizer_from_the_flag_for_a_student_without_one(student_dir, tmp_path, capsys):
    path, sc, params, _ = student_dir
    bare = save_student(tmp_path / "bare", sc, params)  # no tokenizer saved with it
    argv = [f"--student={bare}", f"--prompt={PROMPTS[0]}", f"--max_new_tokens={NEW}"]
    assert cli.main(argv) == 2
    assert f"no tokenizer in {bare}" in capsys.readouterr().err
    assert cli.main([*argv, f"--tokenizer={path}"]) == 0
    assert capsys.readouterr().out == _alone(student_dir, PROMPTS[0]) + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt=x", "--top_p=0"], "--top_p must be in (0, 1]"),
        (["--prompt=x", "--temperature=-1"], "--temperature must be 0 (greedy) or"),
        (["--prompt=x", "--temperature=nan"], "--temperature must be 0 (greedy) or"),
        (["--prompt=x", "--temperature=1e-300"], "--temperature must be 0 (greedy) or"),
        (["--prompt=x", f"--seed={2**32}"], "--seed must be in [0, 2**32)"),
        ([f"--prompts_file={__file__}", "--output=/tmp"], "--output /tmp is a directory"),
        (["--prompt=x", "--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
        (["--prompts_file=/nonexistent.jsonl"], "does not exist"),
        (["--prompt=x", "--tokenizer=/nonexistent"], "no tokenizer in /nonexistent"),
        (["--prompt=x", "--output=o.jsonl"], "--output goes with --prompts_file"),
        (
            [f"--prompts_file={__file__}", "--output=/nonexistent/out.jsonl"],
            "--output /nonexistent/out.jsonl: directory /nonexistent does not exist",
        ),
        (
            [f"--prompts_file={__file__}", f"--output={__file__}/out.jsonl"],
            f"--output {__file__}/out.jsonl: directory {__file__} is a file",
        ),
    ],
)
def test_bad_arguments_fail_in_one_line(student_dir, args, message, capsys):
    assert cli.main([f"--student={student_dir[0]}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_length_past_the_teachers_positions_is_warned_of(student_dir, capsys):
    limit = student_dir[1].teacher.max_position_embeddings
    argv = [f"--student={student_dir[0]}", "--prompt=def", "--max_new_tokens"]
    assert cli.main([*argv[:2], f"{argv[2]}={limit + 1}"]) == 0
    assert f"past the teacher's max_position_embeddings ({limit})" in capsys.readouterr().err
    assert cli.main([*argv[:2], f"{argv[2]}=2"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_prompt_ids_outside_the_models_vocabulary_are_refused(student_dir, tmp_path, capsys):
    """A --tokenizer larger than the student's vocabulary gave ids the model embeds as NaN, and
    an empty completion with exit status 0."""
    texts = [f"word{i} " * 3 for i in range(400)]
    big = train_bpe(texts, 600)  # ids up to ~600 > the student's 320
    big.save_pretrained(str(tmp_path / "big"))
    prompt = " ".join(f"word{i}" for i in range(0, 400, 7))
    argv = [f"--student={student_dir[0]}", f"--tokenizer={tmp_path / 'big'}", f"--prompt={prompt}"]
    assert max(big(prompt)["input_ids"]) >= 320
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "prompt 1 has token ids outside the model's vocabulary [0, 320)" in err
    assert err.count("\n") == 1


def test_a_continuation_keeps_what_its_first_token_decodes_to_after_the_prompt():
    """SentencePiece-style decoders drop the space of a first U+2581 piece: decoding the new
    tokens alone lost the space between the prompt and its continuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, "!": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    assert tok.decode([2]) == "world" and tok.decode([1, 2]) == "Hello world"
    assert cli.continuation_text(tok, [1], [2, 3]) == " world!"
    assert cli.continuation_text(tok, [1], []) == ""


def test_bad_prompts_file_and_student_dir(tmp_path, student_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert cli.main([f"--student={student_dir[0]}", f"--prompts_file={bad}"]) == 2
    assert f"{bad}:2: expected an object" in capsys.readouterr().err
    assert cli.main([f"--student={tmp_path}", "--prompt=x"]) == 2
    assert "no student_config.json" in capsys.readouterr().err
    # a student directory without its weights: one line, not a traceback
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("student_config.json", "tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((student_dir[0] / name).read_bytes())
    assert cli.main([f"--student={bare}", "--prompt=x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_stream_yields_the_tokens_of_generate(student_dir):
    _, sc, params, _ = student_dir
    tokens, valid = left_pad([[5, 9, 27, 4, 11], [8, 1]], pad_id=0)
    kw = dict(
        max_new_tokens=6, valid_bt=valid, temperature=1.0, top_k=20, rng=jax.random.PRNGKey(3)
    )
    batch = np.asarray(generate(sc.model(), params, tokens, **kw)["tokens"])
    streamed = np.stack(list(generate_stream(sc.model(), params, tokens, **kw)), axis=1)
    np.testing.assert_array_equal(streamed, batch)
    # Stops once every row has produced EOS (two equal rows, greedy: both at the same step).
    same = np.asarray([[5, 9, 27, 4]] * 2)
    free = [int(t[0]) for t in generate_stream(sc.model(), params, same, max_new_tokens=6)]
    eos = free[1]
    stopped = list(generate_stream(sc.model(), params, same, max_new_tokens=6, eos_token_id=eos))
    assert [int(t[0]) for t in stopped] == free[: free.index(eos) + 1]


def test_left_pad():
    tokens, valid = left_pad([[1, 2, 3], [4]], pad_id=9, length=4)
    np.testing.assert_array_equal(tokens, [[9, 1, 2, 3], [9, 9, 9, 4]])
    np.testing.assert_array_equal(valid, [[0, 1, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="shorter than the longest"):
        left_pad([[1, 2, 3]], 0, length=2)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0)


def test_rows_stop_at_the_tokenizers_and_the_configs_end_ids():
    # the tokenizer's EOS first, then the config's (several for Llama 3.x Instruct), each once
    sc = StudentConfig.from_teacher(tiny_model_config(eos_token_id=(9, 4)), (0,), mixer="gdn")
    tokenizer = types.SimpleNamespace(eos_token_id=4)
    ends = sc.teacher.end_token_ids
    assert end_token_ids(tokenizer, ends) == (4, 9)
    assert end_token_ids(types.SimpleNamespace(eos_token_id=None), ends) == (9, 4)
    assert cli.until_eos([5, 3, 9, 4], (4, 9)) == [5, 3]
    assert cli.until_eos([5, 3], 4) == [5, 3]
