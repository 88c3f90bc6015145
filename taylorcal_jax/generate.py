"""Command line: continue prompts with a student (or any directory `load_student` reads).

    python -m taylorcal_jax.generate --student=workdirs/tiny/student --prompt="def fib(n):"
    python -m taylorcal_jax.generate --student=DIR --prompts_file=prompts.jsonl --output=out.jsonl

--prompt: one prompt, whose continuation is printed as it is generated (--no-stream: at the end).
--prompts_file: JSON lines, each {"prompt": "..."} (other keys are copied through). Prompts run
in batches of --batch_size, left-padded; each result {..., "prompt", "completion"} is written as
one JSON line to --output (default stdout) as soon as its batch is done. An existing --output
that holds the first results of the same prompts is continued, not redone, and ends as an
uninterrupted run would (the lines of a batch a kill cut short are dropped and the batch
generated again). The settings that decide the results (student, tokenizer, dtype, seed,
sampling and, when sampling, the batch size, which sets each batch's key) are kept next to
it in OUTPUT.settings.json; continuing with other settings is refused.

Decoding is greedy unless --temperature > 0 (sampling with --seed, truncated by --top_k and
--top_p; --prompt samples with the key of --seed, each --prompts_file batch with that key
folded with the index of its first prompt, so one prompt and seed sample differently in the
two modes); a row stops at an end token (the tokenizer's EOS, and every id of the model config's
eos_token_id, e.g. Llama 3.x Instruct's <|eot_id|>) or after --max_new_tokens. The tokenizer is
the one saved in the student directory, or --tokenizer=DIR. Bad arguments fail with one line
before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from taylorcal_jax.data.tokenizer import end_token_ids, load_tokenizer, padding_id
from taylorcal_jax.eval.generate import MIN_TEMPERATURE, generate, generate_stream, left_pad
from taylorcal_jax.models.config import id_tuple
from taylorcal_jax.models.joined import join_for_decoding
from taylorcal_jax.models.student import STUDENT_CONFIG_FILE, load_student, read_student_config
from taylorcal_jax.utils.files import write_json
from taylorcal_jax.utils.progress import progress

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PAD_MULTIPLE = 16  # prompt lengths are padded up to a multiple of this: fewer compiled shapes


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m taylorcal_jax.generate", description=__doc__)
    p.add_argument("--student", required=True, help="student directory (student_config.json)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (streamed)")
    source.add_argument("--prompts_file", help='JSON lines, each {"prompt": "..."}')
    p.add_argument("--output", default=None, help="JSON lines out (--prompts_file; default stdout)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --student)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


# ----------------------------------------------------------------------- checks and input


def check_args(args):
    """The student's config; raises ValueError / FileNotFoundError (one line) for arguments
    that cannot work."""
    config = read_student_config(os.path.join(args.student, STUDENT_CONFIG_FILE))
    tokenizer_dir = args.tokenizer or args.student
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        raise FileNotFoundError(
            f"no tokenizer in {tokenizer_dir}; save the teacher's tokenizer there or pass "
            "--tokenizer=DIR"
        )
    if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
        raise FileNotFoundError(f"--prompts_file {args.prompts_file} does not exist")
    if args.output is not None and args.prompt is not None:
        raise ValueError("--output goes with --prompts_file; --prompt prints to stdout")
    if args.output is not None and os.path.isdir(args.output):
        raise ValueError(f"--output {args.output} is a directory; name a file")
    output_dir = os.path.dirname(os.path.abspath(args.output or "."))
    if args.output is not None and not os.path.isdir(output_dir):
        what = "is a file" if os.path.exists(output_dir) else "does not exist"
        raise FileNotFoundError(f"--output {args.output}: directory {output_dir} {what}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < float("inf")):
        raise ValueError(
            f"--temperature must be 0 (greedy) or a finite value >= {MIN_TEMPERATURE}, got "
            f"{args.temperature}"
        )
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    return config


def warn_past_positions(length: int, max_positions: int) -> None:
    """A warning on stderr where prompt and continuation run past the teacher's trained
    positions (its kept attention layers' RoPE was not trained there; the cache is sized for
    the whole length up front)."""
    if length > max_positions:
        print(
            f"warning: the longest prompt and --max_new_tokens reach {length} tokens, past the "
            f"teacher's max_position_embeddings ({max_positions})",
            file=sys.stderr,
        )


def check_ids(ids_rows, pad: int, vocab_size: int) -> None:
    """ValueError naming the first prompt with a token id outside the model's vocabulary (a
    tokenizer larger than the model's), or a padding id outside it."""
    for n, ids in enumerate(ids_rows, 1):
        if max(ids) >= vocab_size or min(ids) < 0:
            raise ValueError(
                f"prompt {n} has token ids outside the model's vocabulary [0, {vocab_size}) "
                f"(largest {max(ids)}): is --tokenizer the model's?"
            )
    if not 0 <= pad < vocab_size:
        raise ValueError(f"padding id {pad} is outside the model's vocabulary [0, {vocab_size})")


def read_prompts(path) -> list[dict]:
    """The records of a JSON-lines prompts file (blank lines skipped)."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{n}: expected an object with a string "prompt"')
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return records


SETTINGS_SUFFIX = ".settings.json"


def run_settings(args) -> dict:
    """What decides a --prompts_file run's results besides the prompts. Greedy rows depend
    neither on the seed nor on how they are batched (left padding); sampled ones do, through
    each batch's key."""
    settings = dict(
        student=os.path.abspath(args.student),
        tokenizer=os.path.abspath(args.tokenizer or args.student),
        dtype=args.dtype,
        **_sampling(args),
    )
    if args.temperature > 0:  # greedy rows depend on neither
        settings.update(seed=args.seed, batch_size=args.batch_size)
    return settings


def check_settings(output, settings: dict) -> None:
    """Raises ValueError unless `output`'s results were written with `settings`."""
    path = output + SETTINGS_SUFFIX
    try:
        with open(path) as f:
            before = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        raise ValueError(
            f"{output} holds results but {path} does not say how they were generated; remove "
            "it or pick another --output"
        ) from None
    changed = sorted(k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k))
    if changed:
        raise ValueError(
            f"{output} was generated with other settings ({', '.join(changed)}: "
            f"{[before.get(k) for k in changed]} there, {[settings.get(k) for k in changed]} now); "
            "rerun with those, remove it or pick another --output"
        )


def finished_records(output, records, batch_size: int, settings: dict) -> int:
    """How many results an existing output already holds for these records (0 if none),
    counted in whole batches of `batch_size`: the lines of a batch a kill cut short (a last
    line without its newline, and the whole lines before it in its batch) are cut off the
    file, so that the batch is generated again as it was (its rows and its sampling key).
    Results written with other `settings` are refused (check_settings); the settings of this
    run are then recorded next to the output."""
    if output is None:
        return 0
    if not os.path.exists(output):
        write_json(output + SETTINGS_SUFFIX, settings)
        return 0
    with open(output, "rb") as f:
        data = f.read()
    lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)
    done, starts, offset = [], [], 0  # starts[i]: where the i-th result's line begins
    for n, line in enumerate(lines, 1):
        offset += len(line)
        if not line.strip():  # not written by this command; skipped
            continue
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{output}:{n}: not JSON ({e.msg})") from None
        starts.append(offset - len(line))
    if len(done) > len(records) or any(
        d.get("prompt") != r["prompt"] for d, r in zip(done, records, strict=False)
    ):
        raise ValueError(
            f"{output} exists and does not continue these prompts; remove it or pick another "
            "--output"
        )
    if done:
        check_settings(output, settings)
    else:
        write_json(output + SETTINGS_SUFFIX, settings)
    kept = len(done) if len(done) == len(records) else len(done) // batch_size * batch_size
    size = starts[kept] if kept < len(done) else offset  # whole batches, whole lines
    if size < len(data):
        with open(output, "r+b") as f:
            f.truncate(size)
    return kept


# ----------------------------------------------------------------------- generation


def _sampling(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )


def encode(tokenizer, text: str, where: str) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise ValueError(f"{where} encodes to no tokens")
    return ids


def until_eos(ids, ends) -> list[int]:
    """ids up to (not including) the first of the end ids `ends` (an id or a tuple)."""
    ids, ends = [int(i) for i in ids], id_tuple(ends)
    cut = next((i for i, token in enumerate(ids) if token in ends), len(ids))
    return ids[:cut]


def continuation_text(tokenizer, prompt_ids, new_ids) -> str:
    """The text `new_ids` add after `prompt_ids`. Decoding the new ids alone loses what a
    decoder does at the start of a text: SentencePiece-style ones drop the space of a first
    U+2581 "word", which after a prompt is " word"."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode([*prompt_ids, *new_ids], skip_special_tokens=True)
    if whole.startswith(prompt):
        return whole[len(prompt) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)  # the decoder rewrote the prompt


def stream_prompt(model, params, tokenizer, ids, args, out, *, ends) -> str:
    """Prints the continuation of one prompt (token ids) as it is generated; returns it."""
    new, shown = [], ""
    steps = generate_stream(
        model,
        params,
        np.asarray([ids], np.int32),
        rng=jax.random.PRNGKey(args.seed),
        eos_token_id=ends,
        **_sampling(args),
    )
    for token_b in steps:
        if int(token_b[0]) in ends:
            break
        new.append(int(token_b[0]))
        text = continuation_text(tokenizer, ids, new)
        if args.stream and not text.endswith("\ufffd"):  # wait for the rest of a character
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    completion = continuation_text(tokenizer, ids, new)
    out.write(completion[len(shown) :] + "\n")
    out.flush()
    return completion


def generate_batches(model, params, tokenizer, records, ids, args, out, start=0, *, ends):
    """Writes {**record, "completion"} for records[start:] (token ids `ids`) batch by batch;
    rows stop at the end ids `ends`."""
    pad = padding_id(tokenizer)
    starts = range(start, len(records), args.batch_size)
    for first in progress(starts, desc="generate", unit="batch", file=sys.stderr):
        batch = ids[first : first + args.batch_size]
        # Full batches and padded lengths keep the compiled shapes few; extra rows are dropped.
        rows = batch + [batch[0]] * (args.batch_size - len(batch))
        longest = max(map(len, rows))
        tokens, valid = left_pad(rows, pad, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        result = generate(
            model,
            params,
            tokens,
            valid_bt=valid,
            rng=jax.random.fold_in(jax.random.PRNGKey(args.seed), first),
            eos_token_id=ends,
            pad_id=pad,
            **_sampling(args),
        )
        new = np.asarray(result["tokens"])
        lines = []
        for i, record in enumerate(records[first : first + len(batch)]):
            completion = continuation_text(tokenizer, batch[i], until_eos(new[i], ends))
            lines.append(json.dumps({**record, "completion": completion}) + "\n")
        out.write("".join(lines))  # the batch in one write: a kill leaves whole lines or a cut
        out.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = check_args(args)
        vocab_size = config.teacher.vocab_size
        tokenizer = load_tokenizer(args.tokenizer or args.student)
        if args.prompts_file is None:
            records, ids = None, encode(tokenizer, args.prompt, "--prompt")
            check_ids([ids], padding_id(tokenizer), vocab_size)
        else:
            records = read_prompts(args.prompts_file)
            ids = [encode(tokenizer, r["prompt"], f"prompt {i + 1}") for i, r in enumerate(records)]
            check_ids(ids, padding_id(tokenizer), vocab_size)
            start = finished_records(args.output, records, args.batch_size, run_settings(args))
        longest = max(map(len, ids)) if records is not None else len(ids)
        warn_past_positions(longest + args.max_new_tokens, config.teacher.max_position_embeddings)
        dtype = DTYPES[args.dtype]
        config, params = load_student(args.student, dtype)  # missing weights: one line too
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = jax.jit(join_for_decoding)(params)  # once for all batches; the originals are freed
    model, ends = config.model(dtype), end_token_ids(tokenizer, config.teacher.end_token_ids)
    if records is None:
        stream_prompt(model, params, tokenizer, ids, args, sys.stdout, ends=ends)
    elif args.output is None:
        generate_batches(model, params, tokenizer, records, ids, args, sys.stdout, ends=ends)
    else:
        with open(args.output, "a") as out:
            generate_batches(model, params, tokenizer, records, ids, args, out, start, ends=ends)
    return 0


if __name__ == "__main__":
    sys.exit(main())
