"""Join result files of launch/bench_gdn_kernel.py that each time some of the shape rows.

One device call may run at most 10 minutes; the full table (ours, FLA and the XLA chunked op on
all four rows of docs/benchmarks.md) takes longer. So it can be timed in parts, each part still
measuring ours, FLA and the chunked op of its rows in one call on one card, and joined here.
The parts must agree on what was measured (device, versions, code, our configuration); the
joined file keeps each part's command and date under `parts` and orders the rows as the bench
script's ROWS.

Usage: python launch/merge_gdn_kernel_results.py PART.json [PART.json ...] --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import sys

from bench_gdn_kernel import ROWS  # launch/ is on sys.path when a script there runs

# what must be the same in every part for their rows to form one table
SAME_IN_EVERY_PART = (
    "device",
    "jax",
    "torch",
    "triton",
    "fla",
    "ours_config_fields",
    "source_digest",  # the same code (results_io.source_digest)
)
# carried over from the parts as they are (they describe the method, not one run)
METHOD_FIELDS = ("peak_memory_method", "rel_err_method")
ROW_ORDER = [list(shape) for shape in ROWS]


def _provenance(part: dict) -> dict:
    """What the joined file keeps of one part besides its rows."""
    kept = {"command": part["command"], "date": part["date"]}
    kept["shapes"] = [list(r["shape"]) for r in part["rows"]]
    if "note_added_after_the_run" in part:
        kept["note"] = part["note_added_after_the_run"]
    return kept


def merge_parts(parts: list[dict], command: str) -> dict:
    """One result object from bench_gdn_kernel result objects that time disjoint rows.

    Raises ValueError when the parts differ in any SAME_IN_EVERY_PART field, when two parts time
    the same shape, or when a part has no rows."""
    if not parts:
        raise ValueError("no parts to merge")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        for key in SAME_IN_EVERY_PART:
            if part.get(key) != first.get(key):
                raise ValueError(
                    f"part {i} differs from part 0 in {key!r}: {part.get(key)!r} vs "
                    f"{first.get(key)!r}; rows measured under different conditions do not make "
                    "one table"
                )
    rows, seen = [], {}
    for i, part in enumerate(parts):
        if not part.get("rows"):
            raise ValueError(f"part {i} has no rows")
        for row in part["rows"]:
            shape = list(row["shape"])
            if str(shape) in seen:
                raise ValueError(f"shape {shape} is timed in parts {seen[str(shape)]} and {i}")
            seen[str(shape)] = i
            rows.append(row)

    def order(row):
        shape = list(row["shape"])
        return ROW_ORDER.index(shape) if shape in ROW_ORDER else len(ROW_ORDER)

    merged = {
        "command": command,
        "date": max(p["date"] for p in parts),
        **{key: first.get(key) for key in SAME_IN_EVERY_PART},
        **{key: first[key] for key in METHOD_FIELDS if key in first},
        "parts": [_provenance(p) for p in parts],
        "rows": sorted(rows, key=order),
    }
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="+", help="result files of launch/bench_gdn_kernel.py")
    ap.add_argument("--out", required=True)
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    loaded = []
    for path in a.parts:
        try:
            with open(path) as f:
                loaded.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            print(f"cannot read {path}: {e}", file=sys.stderr)
            return 2
    try:
        merged = merge_parts(loaded, "python launch/merge_gdn_kernel_results.py " + " ".join(argv))
    except ValueError as e:
        print(f"cannot merge: {e}", file=sys.stderr)
        return 2
    with open(a.out, "w") as f:
        json.dump(merged, f, indent=1)
    print(f"{a.out}: {len(merged['rows'])} rows from {len(loaded)} parts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
