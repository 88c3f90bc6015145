"""What a run prints on stdout: the plan, a line per stage, and a final summary.

    [3/7] statistics: teacher attention statistics and activations on the calibration text
          run: settings changed: calibration.num_sequences 4 -> 8
          done in 6.7 s: calibration_tokens=2048
    [4/7] calibrate: skipped (done, settings unchanged)

Progress bars of long steps go to stderr (utils/progress.py); errors are printed by main.
With several processes (jax.distributed), only process 0 prints.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from taylorcal_jax.utils import hosts
from taylorcal_jax.utils.metrics import format_value

INDENT = "      "


class Console:
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def line(self, text: str = "") -> None:
        if not hosts.is_main():
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        self.line(f"note: {text}")

    def plan(self, steps: Sequence, registry: Mapping, workdir: str) -> None:
        """The plan (--dry_run): every listed stage, what it does, and whether it runs."""
        runs = sum(s.action != "skip" for s in steps)
        self.line(f"plan for {workdir}: {runs} of {len(steps)} stages to run")
        for i, step in enumerate(steps, 1):
            self.line(f"[{i}/{len(steps)}] {step.name}: {registry[step.name].summary}")
            self.line(f"{INDENT}{step.action}: {step.reason}")

    def stage_start(self, i: int, n: int, step, summary: str) -> None:
        self.line(f"[{i}/{n}] {step.name}: {summary}")
        self.line(f"{INDENT}{step.action}: {step.reason}")

    def stage_skipped(self, i: int, n: int, step) -> None:
        self.line(f"[{i}/{n}] {step.name}: skipped ({step.reason})")

    def stage_done(self, seconds: float, result: Mapping) -> None:
        brief = _brief(result)
        self.line(f"{INDENT}done in {seconds:.1f} s" + (f": {brief}" if brief else ""))

    def summary(self, rows: Sequence[tuple[str, str]]) -> None:
        self.line("summary")
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            self.line(f"  {key:<{width}}  {value}")


def _brief(result: Mapping, limit: int = 4) -> str:
    """Up to `limit` scalar results, formatted, e.g. "valid_ppl=46.43 eval_tokens=3968"."""
    items = [
        f"{k}={format_value(v)}"
        for k, v in result.items()
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and len(str(v)) < 40
    ]
    return " ".join(items[:limit])
