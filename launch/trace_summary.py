"""A profiler trace of annotated calls, summarised: device events, per-call busy time and gaps,
busy time per kernel name, family and launch count, and the model operations each kernel
computes (from the compiled program's HLO). Pure functions of the trace's events and the HLO
text; launch/profile_steps.py makes the traces.

The trace is a perfetto_trace.json.gz (`jax.profiler.trace(dir, create_perfetto_trace=True)`)
whose calls are each inside a `jax.profiler.TraceAnnotation(CALL_ANNOTATION + str(i))`:

  device events  on a GPU the events of the stream tracks: threads "Stream #..." of the
                 processes "/device:GPU:..." (named by the trace's metadata events, "ph": "M"),
                 i.e. the kernels, copies and memsets as CUPTI timed them on the device; XProf's
                 derived tracks ("XLA Ops", "XLA Modules", "Steps", ...) repeat them and are left
                 out. Without such tracks (a CPU) the events of XLA's ops on the host threads
                 (those with an "hlo_op" argument: XLA:CPU's thunks) stand in. trace.tracks says
                 which tracks were read.
  per call       an event belongs to the call whose annotation holds its midpoint (clipped to
                 the annotation). wall = the annotation's duration (dispatch, device work, final
                 synchronisation); busy = the length of the union of the call's events;
                 gap = wall - busy = lead (call start to the first event: dispatch) + between
                 (idle between events: kernel launches, host round trips such as the predicate
                 copy of each iteration of a while loop) + tail (last event to the call's end);
                 kernels = the call's event count.
  by name        per event name over the calls: count, total and mean duration, and its busy
                 time: each instant of the busy union split equally among the tracks busy then,
                 on each track given to its innermost event (the latest started: an XLA:CPU
                 while thunk holds its body's thunks), so that the names' busy times add up to
                 the calls' busy time; share = busy / the calls' busy time. by_family sums the
                 names without their trailing numeric suffixes (loop_fusion.12 -> loop_fusion);
                 by_launches groups the names by launches per call (`by_launches`).
  origins        `hlo_origins`: per kernel name, the op_name metadata of the HLO instructions
                 it computes, i.e. the model's module path and operation
                 (layers_N/gdn/q_proj/dot_general).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics

CALL_ANNOTATION = "profile_steps call "  # + the call's index
GPU_PROCESS_PREFIX = "/device:GPU"
GPU_STREAM_PREFIX = "Stream #"
# a call's figures (summarise_trace), microseconds but for the event count
CALL_FIGURES = ("wall_us", "busy_us", "gap_us", "kernels", "lead_us", "between_us", "tail_us")


@dataclasses.dataclass(frozen=True)
class DeviceEvent:
    """One event of a device track; times in microseconds (the trace's unit)."""

    track: str
    name: str
    start_us: float
    end_us: float


def find_trace_file(trace_dir: str) -> str:
    """The newest perfetto_trace.json.gz under `trace_dir` (what create_perfetto_trace writes,
    under plugins/profile/<run>/), else the newest XProf *.trace.json.gz (same events)."""
    for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz"):
        found = glob.glob(os.path.join(trace_dir, "**", pattern), recursive=True)
        if found:
            return max(found, key=os.path.getmtime)
    written = sorted(
        os.path.relpath(os.path.join(d, f), trace_dir)
        for d, _, files in os.walk(trace_dir)
        for f in files
    )
    raise FileNotFoundError(f"no trace .json.gz under {trace_dir}; it holds {written[:10]}")


def load_trace(path: str) -> list[dict]:
    """The "traceEvents" of a Chrome/Perfetto JSON trace file (.json or .json.gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def track_names(events: list[dict]) -> dict[tuple, tuple[str, str]]:
    """{(pid, tid): (process name, thread name)} from the metadata events ("ph": "M")."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    return {key: (processes.get(key[0], ""), name) for key, name in threads.items()}


def device_events(events: list[dict]) -> tuple[str, list[DeviceEvent]]:
    """(kind, events) of the device tracks (module docstring): kind "gpu_streams" when the trace
    has GPU stream tracks, else "xla_host_ops". A track is "<process> / <thread>"."""
    names = track_names(events)
    streams = {
        key
        for key, (process, thread) in names.items()
        if process.startswith(GPU_PROCESS_PREFIX) and thread.startswith(GPU_STREAM_PREFIX)
    }
    kind = "gpu_streams" if streams else "xla_host_ops"

    def is_device(e, key) -> bool:
        if streams:
            return key in streams
        return names.get(key, ("", ""))[0].startswith("/host:") and "hlo_op" in e.get("args", {})

    out = []
    for e in events:
        key = (e.get("pid"), e.get("tid"))
        if e.get("ph") == "X" and is_device(e, key):
            process, thread = names.get(key, ("", ""))
            start = float(e["ts"])
            out.append(DeviceEvent(f"{process} / {thread}", e["name"], start, start + e["dur"]))
    return kind, out


def call_windows(events: list[dict]) -> list[tuple[float, float]]:
    """[(start, end)] in microseconds of the annotations "profile_steps call <i>", by i."""
    calls = {}
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name.startswith(CALL_ANNOTATION):
            start = float(e["ts"])
            calls[int(name[len(CALL_ANNOTATION) :])] = (start, start + e["dur"])
    return [calls[i] for i in sorted(calls)]


def union_us(intervals) -> float:
    """Length of the union of [start, end] intervals."""
    total, current = 0.0, None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    return total if current is None else total + current[1] - current[0]


def busy_by_name(events: list[DeviceEvent]) -> dict[str, float]:
    """{name: busy microseconds}: every instant of the union of `events` split equally among the
    tracks with an event then, on each track given to its innermost event (the latest started,
    then the shortest), so that the values add up to the union's length."""
    by_start = sorted(range(len(events)), key=lambda i: events[i].start_us)
    by_end = sorted(range(len(events)), key=lambda i: events[i].end_us)
    points = sorted({e.start_us for e in events} | {e.end_us for e in events})
    active: dict[str, list[int]] = {}  # track -> indices of its events running now
    busy: dict[str, float] = collections.defaultdict(float)
    started = ended = 0
    for t, t_next in zip(points, points[1:], strict=False):
        while started < len(events) and events[by_start[started]].start_us <= t:
            i = by_start[started]
            active.setdefault(events[i].track, []).append(i)
            started += 1
        while ended < len(events) and events[by_end[ended]].end_us <= t:
            i = by_end[ended]
            running = active[events[i].track]
            running.remove(i)
            if not running:
                del active[events[i].track]
            ended += 1
        if not active:
            continue
        share = (t_next - t) / len(active)
        for running in active.values():
            inner = max(running, key=lambda i: (events[i].start_us, -events[i].end_us, i))
            busy[events[inner].name] += share
    return dict(busy)


def family(name: str) -> str:
    """The name without its trailing numeric suffixes: "loop_fusion.12" -> "loop_fusion"."""
    return re.sub(r"([._]\d+)+$", "", name) or name


def _clip(e: DeviceEvent, window: tuple[float, float]) -> DeviceEvent:
    start, end = max(e.start_us, window[0]), min(e.end_us, window[1])
    return dataclasses.replace(e, start_us=start, end_us=max(start, end))


def _ranking(counts, totals, busy, busy_total: float) -> list[dict]:
    """Rows {name, count, total_us, mean_us, busy_us, share}, by busy time, largest first."""
    rows = [
        {
            "name": name,
            "count": counts[name],
            "total_us": totals[name],
            "mean_us": totals[name] / counts[name],
            "busy_us": busy.get(name, 0.0),
            "share": busy.get(name, 0.0) / busy_total if busy_total else 0.0,
        }
        for name in counts
    ]
    return sorted(rows, key=lambda r: (-r["busy_us"], r["name"]))


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def _model_op(op_name: str) -> str:
    """An op_name without its program prefix, and with every layer index as N:
    'jit(decode)/while/body/closed_call/Transformer/layers_3/gdn/q_proj/dot_general' ->
    'layers_N/gdn/q_proj/dot_general'."""
    tail = op_name.rsplit("Transformer/", 1)[-1]
    if tail == op_name:  # no model scope: drop the jit(...) and loop parts
        tail = "/".join(p for p in op_name.split("/") if not p.startswith("jit(")
                        and p not in ("while", "body", "closed_call", "cond"))  # fmt: skip
    return re.sub(r"layers_\d+", "layers_N", tail)


def hlo_origins(hlo_text: str, limit: int = 3) -> dict[str, list[str]]:
    """{kernel name as a trace spells it: the model operations it computes}, from a compiled
    program's HLO text. A fusion (or any instruction calling a computation) gets the op_name
    metadata of the instructions inside the computations it calls, an instruction without one
    its own; names are `_model_op`'s, most frequent first (ties in program order), at most
    `limit`. Each instruction is
    keyed by its HLO name and by that name with "." as "_" (GPU kernels are named so)."""
    ops: dict[str, collections.Counter] = {}  # computation -> its instructions' op names
    calls: dict[str, list[str]] = {}  # instruction -> computations it calls
    own: dict[str, str] = {}  # instruction -> its own op name
    current = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(1)
            ops[current] = collections.Counter()
            continue
        inst = _INSTRUCTION.match(line)
        if current is None or not inst:
            continue
        op = _OP_NAME.search(line)
        if op:
            ops[current][_model_op(op.group(1))] += 1
            own[inst.group(1)] = _model_op(op.group(1))
        called = _CALLS.findall(line)
        if called:
            calls[inst.group(1)] = called

    origins = {}
    for name in set(own) | set(calls):
        found = collections.Counter()
        for comp in calls.get(name, []):
            found.update(ops.get(comp, {}))
        names = [n for n, _ in found.most_common() if n][:limit]
        if not names and own.get(name):
            names = [own[name]]
        if names:
            origins[name] = origins[name.replace(".", "_")] = names
    return origins


def add_origins(by_name: list[dict], hlo_text: str, top: int) -> None:
    """Adds "origin" (hlo_origins) to the first `top` kernels of a ranking that the program's
    HLO names (Pallas kernels are named by their own call and have none)."""
    origins = hlo_origins(hlo_text)
    for r in by_name[:top]:
        if r["name"] in origins:
            r["origin"] = origins[r["name"]]


def _by_family(by_name: list[dict], busy_total: float) -> list[dict]:
    counts, totals, busy = collections.Counter(), collections.Counter(), collections.Counter()
    for r in by_name:
        f = family(r["name"])
        counts[f] += r["count"]
        totals[f] += r["total_us"]
        busy[f] += r["busy_us"]
    return _ranking(counts, totals, busy, busy_total)


def by_launches(by_name: list[dict], calls: int, busy_total: float) -> list[dict]:
    """The kernels grouped by how often each runs per call, largest busy time first: rows
    {per_call, kernels, busy_us, share, names (by busy time)}.

    Kernels launched equally often usually come from one part of the model (in a stage-2
    step of 2 query blocks, 76 launches are the softmax passes of 38 attention layers), so a
    group's busy share is that part's share when no other part repeats as often."""
    groups: dict[float, list[dict]] = collections.defaultdict(list)
    for r in by_name:
        groups[round(r["count"] / calls, 2)].append(r)
    rows = [
        {
            "per_call": per_call,
            "kernels": len(members),
            "busy_us": sum(r["busy_us"] for r in members),
            "share": sum(r["busy_us"] for r in members) / busy_total if busy_total else 0.0,
            "names": [r["name"] for r in sorted(members, key=lambda r: -r["busy_us"])],
        }
        for per_call, members in groups.items()
    ]
    return sorted(rows, key=lambda r: (-r["busy_us"], r["per_call"]))


def summarise_trace(events: list[dict]) -> dict:
    """The per-call and per-name figures of a trace's device events (module docstring), in
    microseconds: {"tracks", "calls", "median", "busy_us", "outside_calls", "by_name",
    "by_family", "by_launches"}."""
    kind, device = device_events(events)
    windows = call_windows(events)
    if not windows:
        raise ValueError(f"the trace has no '{CALL_ANNOTATION}<i>' annotations")
    device.sort(key=lambda e: e.start_us + e.end_us)
    mids = [(e.start_us + e.end_us) / 2 for e in device]
    counts, totals, busy = collections.Counter(), collections.Counter(), collections.Counter()
    calls, inside = [], set()
    for window in windows:
        lo, hi = bisect.bisect_left(mids, window[0]), bisect.bisect_right(mids, window[1])
        mine = [_clip(e, window) for e in device[lo:hi]]
        inside.update(range(lo, hi))
        call_busy = union_us((e.start_us, e.end_us) for e in mine)
        wall = window[1] - window[0]
        call = {"wall_us": wall, "busy_us": call_busy, "gap_us": wall - call_busy}
        call["kernels"] = len(mine)
        if mine:
            lead = min(e.start_us for e in mine) - window[0]
            tail = window[1] - max(e.end_us for e in mine)
            call.update(lead_us=lead, between_us=wall - call_busy - lead - tail, tail_us=tail)
        calls.append(call)
        for e in mine:
            counts[e.name] += 1
            totals[e.name] += e.end_us - e.start_us
        busy.update(busy_by_name(mine))
    busy_total = sum(c["busy_us"] for c in calls)
    by_name = _ranking(counts, totals, busy, busy_total)
    outside = [e for i, e in enumerate(device) if i not in inside]
    median = {}
    for key in CALL_FIGURES:
        values = [c[key] for c in calls if key in c]
        median[key] = statistics.median(values) if values else None
    return {
        "tracks": {"kind": kind, "events": dict(collections.Counter(e.track for e in device))},
        "calls": calls,
        "median": median,
        "busy_us": busy_total,
        "outside_calls": {
            "events": len(outside),
            "total_us": sum(e.end_us - e.start_us for e in outside),
        },
        "by_name": by_name,
        "by_family": _by_family(by_name, busy_total),
        "by_launches": by_launches(by_name, len(calls), busy_total),
    }
