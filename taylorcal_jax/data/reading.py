"""Reading a document's bytes as text, with the checks that keep bad input out of training.

`read_entry(entry, max_file_bytes)` classifies one document, reading no more than it must:

    binary      a NUL byte in its first 8 KiB (the test git uses); nothing more is read
    too_large   more than `max_file_bytes` bytes; nothing past the first 8 KiB is read
    unreadable  opening or reading it failed (permissions, a file removed meanwhile)
    empty       only whitespace once decoded
    text        kept: decoded as UTF-8, where each byte that is not part of a valid UTF-8
                sequence becomes U+FFFD and is counted (`undecodable_bytes`)

`InputReport` adds these up over a source: the skipped files by reason with a few
example ids, and the undecodable bytes against the bytes kept. `warnings()` says what was
skipped or replaced; `check(limits)` raises `DataError` when nothing is left or when the
undecodable fraction u / n (u undecodable bytes among the n bytes of kept documents)
exceeds `max_undecodable_fraction`: a corpus in another encoding (latin-1, cp1252, ...)
would otherwise be trained on with U+FFFD in place of its accented letters.
"""

from __future__ import annotations

import dataclasses
import os
import re

from taylorcal_jax.data.errors import DataError
from taylorcal_jax.data.sources import Entry

SNIFF_BYTES = 8192
SKIP_REASONS = ("binary", "too_large", "unreadable", "empty")
_SAID = {
    "binary": "binary",
    "too_large": "larger than data.max_file_bytes",
    "unreadable": "unreadable",
    "empty": "empty",
}
_NUM_EXAMPLES = 3
# surrogateescape decodes each undecodable byte 0xXY to the lone surrogate U+DCXY; valid
# UTF-8 never decodes to a lone surrogate, so these are exactly the undecodable bytes.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    """What `read_entry` and `InputReport.check` accept (the data section of the config)."""

    max_file_bytes: int
    max_undecodable_fraction: float

    @classmethod
    def from_config(cls, data_cfg) -> ReadLimits:
        size, frac = data_cfg.max_file_bytes, data_cfg.max_undecodable_fraction
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise DataError(f"data.max_file_bytes must be a positive integer, got {size!r}")
        if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac <= 1:
            raise DataError(
                f"data.max_undecodable_fraction must be in [0, 1] (0: any non-UTF-8 byte is "
                f"an error), got {frac!r}"
            )
        return cls(int(size), float(frac))


@dataclasses.dataclass(frozen=True)
class ReadResult:
    status: str  # "text" or one of SKIP_REASONS
    num_bytes: int  # the file's size (of what was read, for kept documents)
    text: str = ""
    undecodable_bytes: int = 0


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """(text, u): `raw` as UTF-8, each of its u undecodable bytes replaced by U+FFFD."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        return _ESCAPED_BYTE.subn("\ufffd", raw.decode("utf-8", errors="surrogateescape"))


def read_entry(entry: Entry, max_file_bytes: int) -> ReadResult:
    """Reads and classifies one document (see the module docstring)."""
    try:
        with entry.open_bytes() as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            head = f.read(SNIFF_BYTES)
            if b"\0" in head:
                return ReadResult("binary", size)
            if size > max_file_bytes:
                return ReadResult("too_large", size)
            # Bounded even if the file grows while it is read.
            raw = head + f.read(max_file_bytes + 1 - len(head))
    except OSError:
        return ReadResult("unreadable", 0)
    if len(raw) > max_file_bytes:
        return ReadResult("too_large", len(raw))
    text, undecodable = decode_utf8(raw)
    if not text.strip():
        return ReadResult("empty", len(raw))
    return ReadResult("text", len(raw), text, undecodable)


@dataclasses.dataclass
class InputReport:
    """Totals of `read_entry` results over a source (JSON-able via `dataclasses.asdict`)."""

    documents: int = 0  # kept
    text_bytes: int = 0  # bytes of the kept documents, before decoding
    undecodable_bytes: int = 0
    undecodable_documents: int = 0
    # [id, undecodable bytes] of the documents with the most, most first
    undecodable_examples: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    skipped_examples: dict = dataclasses.field(
        default_factory=lambda: {r: [] for r in SKIP_REASONS}
    )

    def add(self, doc_id: str, result: ReadResult) -> None:
        if result.status != "text":
            self.skipped[result.status] += 1
            if len(self.skipped_examples[result.status]) < _NUM_EXAMPLES:
                self.skipped_examples[result.status].append(doc_id)
            return
        self.documents += 1
        self.text_bytes += result.num_bytes
        if result.undecodable_bytes:
            self.undecodable_bytes += result.undecodable_bytes
            self.undecodable_documents += 1
            worst = self.undecodable_examples + [[doc_id, result.undecodable_bytes]]
            self.undecodable_examples = sorted(worst, key=lambda x: -x[1])[:_NUM_EXAMPLES]

    @property
    def undecodable_fraction(self) -> float:
        return self.undecodable_bytes / max(self.text_bytes, 1)

    def _undecodable_summary(self) -> str:
        examples = ", ".join(f"{i} ({n} B)" for i, n in self.undecodable_examples)
        return (
            f"{self.undecodable_bytes} of {self.text_bytes} bytes "
            f"({100 * self.undecodable_fraction:.2g}%) in {self.undecodable_documents} document(s) "
            f"are not valid UTF-8 (most in: {examples})"
        )

    def warnings(self, limits: ReadLimits) -> list[str]:
        """One line per kind of skipped file, and one for replaced bytes if any."""
        out = []
        ex = self.skipped_examples
        if self.skipped["binary"]:
            out.append(
                f"skipped {self.skipped['binary']} binary file(s) (a NUL byte in the first "
                f"{SNIFF_BYTES // 1024} KiB), e.g. {', '.join(ex['binary'])}"
            )
        if self.skipped["too_large"]:
            out.append(
                f"skipped {self.skipped['too_large']} file(s) larger than data.max_file_bytes="
                f"{limits.max_file_bytes} ({human_bytes(limits.max_file_bytes)}), e.g. "
                f"{', '.join(ex['too_large'])}; raise data.max_file_bytes to keep them"
            )
        if self.skipped["unreadable"]:
            out.append(
                f"skipped {self.skipped['unreadable']} file(s) that could not be read, e.g. "
                f"{', '.join(ex['unreadable'])}"
            )
        if self.undecodable_bytes:
            out.append(
                f"{self._undecodable_summary()}; each was replaced by U+FFFD (limit "
                f"data.max_undecodable_fraction={limits.max_undecodable_fraction:g})"
            )
        return out

    def check(self, limits: ReadLimits, source: str) -> None:
        """Raises DataError if no document was kept or too many bytes were not UTF-8."""
        if not self.documents:
            skipped = ", ".join(f"{n} {_SAID[r]}" for r, n in self.skipped.items() if n)
            raise DataError(
                f"source {source!r} has no text documents (skipped: {skipped or 'none'}); "
                "point data.source at text files, or raise data.max_file_bytes if they are "
                "larger than it"
            )
        if self.undecodable_fraction > limits.max_undecodable_fraction:
            raise DataError(
                f"source {source!r}: {self._undecodable_summary()}, more than "
                f"data.max_undecodable_fraction={limits.max_undecodable_fraction:g}; convert "
                "the files to UTF-8 (e.g. iconv -f latin1 -t utf-8), or raise "
                "data.max_undecodable_fraction to train on them with U+FFFD for those bytes"
            )
