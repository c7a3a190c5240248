"""Two versions of nbtoolkit, the same hour, interleaved: ``python -m benchmarks.versus``.

``python -m benchmarks.versus SCENARIO REPEAT [--rows N] LABEL=TREE:CLIENT[,CLIENT] ...``
(``--rows``: the scenario with N rows instead of its own), for example::

    git worktree add --detach ../old 9f5dfa0
    python -m benchmarks.versus cached_rerun 3 old=../old:nbtoolkit_cached \\
        new=.:nbtoolkit_cached
    python -m benchmarks.versus overhead 7 floor=.:floor old=../old:nbtoolkit \\
        new=.:nbtoolkit

Each TREE's ``nbtoolkit/`` and ``benchmarks/`` are copied when the command starts, so each
version runs with its own client code; every repetition then runs each (label, client)
once, in the order given, through this tree's `run_once` (a fresh server process and a
fresh client process each time). A slow minute on a shared machine lands on both versions
alike. Prints each run, then the median and the range per (label, client) and the
1-minute load average seen before the runs (`--rev` of ``python -m benchmarks`` cannot
measure a version from before the restructure into subpackages; this can).
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import run_once
from benchmarks.scenarios import SCENARIOS


def _copy(tree: Path, dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "results*", "*.pyc")
    for name in ("nbtoolkit", "benchmarks"):
        shutil.copytree(tree / name, dest / name, ignore=ignore)
    return dest


def main() -> None:
    """Run, print every run and the medians."""
    if len(sys.argv) < 4 or sys.argv[1] not in SCENARIOS:
        raise SystemExit(__doc__)
    scenario, repeat = SCENARIOS[sys.argv[1]], int(sys.argv[2])
    arguments = sys.argv[3:]
    if arguments[:1] == ["--rows"]:
        scenario = dataclasses.replace(scenario, rows=int(arguments[1]))
        arguments = arguments[2:]
    work = Path(tempfile.mkdtemp(prefix="nbtoolkit-versus-"))
    plan: list[tuple[str, str, Path]] = []
    for argument in arguments:
        label, _, rest = argument.partition("=")
        tree, _, clients = rest.rpartition(":")
        source = _copy(Path(tree).resolve(), work / label)
        plan += [(label, client, source) for client in clients.split(",")]
    runs: list[dict[str, Any]] = []
    for rep in range(repeat):
        for label, client, source in plan:
            run = run_once(scenario, client, source=source, logs=work)
            run["label"] = label
            runs.append(run)
            print(
                f"{rep + 1}/{repeat} {label} {client}: wall {run.get('wall', float('nan')):.3f} s, "
                f"CPU {run.get('cpu_ms_per_row', float('nan')):.4f} ms/row, "
                f"{run.get('ok')}/{scenario.rows} right, load {run.get('load_before', 0):.1f}"
                f"{'  ' + run['error'] if 'error' in run else ''}",
                flush=True,
            )
    print("| version | client | runs | wall s (median, range) | CPU ms / row (median, range) |")
    print("| --- | --- | --- | --- | --- |")
    for label, client, _ in plan:
        mine = [r for r in runs if r["label"] == label and r["client"] == client and "wall" in r]
        if not mine:
            continue
        cells = []
        for metric, fmt in (("wall", "{:.2f}"), ("cpu_ms_per_row", "{:.4f}")):
            values = [r[metric] for r in mine]
            median, low, high = (fmt.format(v) for v in (statistics.median(values), *_span(values)))
            cells.append(f"{median} ({low}-{high})")
        print(f"| {label} | {client} | {len(mine)}/{repeat} | {cells[0]} | {cells[1]} |")
    loads = [r.get("load_before", 0.0) for r in runs]
    print(
        f"load average (1 min) before the runs: median {statistics.median(loads):.1f}, "
        f"range {min(loads):.1f}-{max(loads):.1f} on {len(loads)} runs; logs in {work}"
    )


def _span(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


if __name__ == "__main__":
    main()
