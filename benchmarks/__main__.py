"""``python -m benchmarks [--quick] [--only SCENARIO|GROUP ...] [--repeat N]``.

Runs every scenario's clients, repetitions interleaved (floor, recipe, ..., then again) so
a slow minute on the machine does not land on one client alone, and writes
``benchmarks/results.md`` and ``benchmarks/results.json`` (``results-quick.*`` for
``--quick``, so a smoke run never overwrites the real figures).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, run_once, snapshot
from benchmarks.report import as_json, document, medians, table
from benchmarks.scenarios import GROUPS, SCENARIOS, Scenario, Target


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rows, one repetition")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS) + sorted(GROUPS),
        help="run this scenario, or these (headers: every header family); repeatable",
    )
    parser.add_argument("--repeat", type=int, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument(
        "--rev",
        help="measure nbtoolkit/ as of this git revision (default: the working tree); "
        "the test server always comes from the working tree",
    )
    return parser.parse_args()


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def _meta(command: str, rev: str | None) -> dict[str, str]:
    cpu = platform.processor() or "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1] for ln in cpuinfo.read_text().splitlines() if "model name" in ln
        ]
        cpu = names[0].strip() if names else cpu
    if rev is None:
        dirty = _git("status", "--porcelain", "nbtoolkit")
        code = _git("rev-parse", "HEAD") + (" plus uncommitted changes" if dirty else "")
    else:
        code = f"{_git('rev-parse', rev)} ({rev}), testing/ from the working tree"
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("nbtoolkit", "aiohttp", "openai", "tenacity", "pandas", "tqdm")
    )
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "command": command,
        "nbtoolkit measured": code,
        "versions": versions,
    }


def _run_scenario(scenario: Scenario, repeat: int, work: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {client: [] for client in scenario.clients}
    repeat = max(repeat, scenario.min_repeat)
    for rep in range(repeat):
        for client in scenario.clients:
            try:
                result = run_once(scenario, client, source=work / "src", logs=work)
            except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
                result = {"client": client, "error": f"{type(exc).__name__}: {exc}"}
            runs[client].append(result)
            shown = result.get("error") or (
                f"wall {result['wall']:.2f} s, CPU {result['cpu']:.2f} s, "
                f"{result['ok']}/{result['rows']} right, peak RSS {result['peak_rss_mb']:.0f} MB, "
                f"server saw {result['server']['requests']} requests"
            )
            print(f"[{scenario.name}] {client} {rep + 1}/{repeat}: {shown}", file=sys.stderr)
    return runs


def main() -> None:
    """Run, print the tables, write the results."""
    args = _arguments()
    command = "python -m benchmarks" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    repeat = args.repeat or (1 if args.quick else 3)
    names = [part for name in (args.only or SCENARIOS) for part in GROUPS.get(name, (name,))]
    chosen = [SCENARIOS[name] for name in dict.fromkeys(names)]
    scenarios = [s.quick() if args.quick else s for s in chosen]
    work = Path(tempfile.mkdtemp(prefix="nbtoolkit-bench-"))
    meta = _meta(command, args.rev)
    try:
        meta["code digest"] = "sha256 of nbtoolkit/*.py: " + snapshot(work / "src", args.rev)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"cannot measure: {exc}") from exc
    started = time.monotonic()
    all_runs, all_medians, sections = {}, {}, {}
    targets: list[Target] = []
    for scenario in scenarios:
        all_runs[scenario.name] = runs = _run_scenario(scenario, repeat, work)
        all_medians[scenario.name] = summary = medians(scenario, runs)
        sections[scenario.name] = table(scenario, summary, runs)
        targets += scenario.targets(scenario, summary)
    meta["repetitions"] = ", ".join(f"{s.name} {max(repeat, s.min_repeat)}" for s in scenarios)
    meta["benchmark wall time"] = f"{time.monotonic() - started:.0f} s"
    meta["logs"] = str(work)
    markdown = document(meta, scenarios, sections, targets)
    stem = ROOT / "benchmarks" / ("results-quick" if args.quick else "results")
    stem.with_suffix(".md").write_text(markdown)
    data = as_json(meta, scenarios, all_runs, all_medians, targets)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(markdown)
    print(f"written: {stem}.md, {stem}.json; logs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
