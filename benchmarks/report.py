"""Medians over repetitions, ratios to each scenario's reference, Markdown tables, JSON."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.scenarios import Scenario, Target

Runs = Mapping[str, Sequence[dict[str, Any]]]  # client -> one dict per repetition

# metric -> (column header, format); "wall_x" and "cpu_x" get the reference in the header.
COLUMNS: dict[str, tuple[str, str]] = {
    "wall": ("wall s", "{:.2f}"),
    "wall_x": ("wall x {ref}", "{:.2f}"),
    "cpu_ms_per_row": ("CPU ms / request", "{:.3f}"),
    "cpu_x": ("CPU x floor", "{:.2f}"),
    "cache_cpu_ms_per_row": ("of it in the cache", "{:.4f}"),
    "cache_added": ("cache / rest", "{:.1%}"),
    "ok": ("rows right", "{:.0f}"),
    "misaligned": ("misaligned", "{:.0f}"),
    "answered_twice": ("answered twice", "{:.0f}"),
    "requests": ("requests", "{:.0f}"),
    "n429": ("429s", "{:.0f}"),
    "rate_429": ("429s / requests", "{:.1%}"),
    "peak_rss_mb": ("peak RSS MB", "{:.0f}"),
    "rss_before_mb": ("RSS before run MB", "{:.0f}"),
    "rss_growth_mb": ("RSS growth MB", "{:.0f}"),
    "finished": ("within deadline", "{:.0f}"),
}


def _flatten(run: dict[str, Any]) -> dict[str, float]:
    server = run.get("server", {})
    requests = float(server.get("requests", 0))
    n429 = float(server.get("statuses", {}).get("429", 0))
    flat = {k: float(v) for k, v in run.items() if isinstance(v, int | float)}
    flat.update(
        requests=requests,
        n429=n429,
        rate_429=n429 / requests if requests else 0.0,
        answered_twice=float(server.get("answered_twice", 0)),
        server_cpu=float(server.get("server_cpu", 0)),
    )
    if "peak_rss_mb" in flat:
        flat["rss_growth_mb"] = flat["peak_rss_mb"] - flat["rss_before_mb"]
    if flat.get("cache_cpu_ms_per_row"):
        # What the cache added to this run: its CPU over the rest of the run's. A ratio within
        # one run, so it holds still when the machine's speed moves between runs.
        cache, total = flat["cache_cpu_ms_per_row"], flat["cpu_ms_per_row"]
        flat["cache_added"] = cache / (total - cache)
    return flat


def medians(scenario: Scenario, runs: Runs) -> dict[str, dict[str, float]]:
    """Per client: the median of each metric, worst cases, and ratios to the reference."""
    out: dict[str, dict[str, float]] = {}
    for client, client_runs in runs.items():
        flat = [_flatten(r) for r in client_runs if "error" not in r]
        if not flat:
            continue
        keys = set.intersection(*(set(f) for f in flat))
        summary = {k: statistics.median(f[k] for f in flat) for k in keys}
        summary["finished"] = sum(f.get("finished", 0) for f in flat)
        summary["runs"] = len(flat)
        summary["ok_min"] = min(f["ok"] for f in flat)
        summary["misaligned_max"] = max(f["misaligned"] for f in flat)
        summary["answered_twice_max"] = max(f["answered_twice"] for f in flat)
        out[client] = summary
    reference_wall = scenario.ideal or out.get(scenario.reference, {}).get("wall")
    floor_cpu = out.get("floor", {}).get("cpu_ms_per_row")
    for summary in out.values():
        if reference_wall:
            summary["wall_x"] = summary["wall"] / reference_wall
        if floor_cpu:
            summary["cpu_x"] = summary["cpu_ms_per_row"] / floor_cpu
    return out


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(scenario: Scenario, summary: Mapping[str, Mapping[str, float]], runs: Runs) -> str:
    """The scenario's Markdown table: one line per client, medians over repetitions."""
    headers = ["client", "runs"]
    headers += [COLUMNS[c][0].format(ref=scenario.reference) for c in scenario.columns]
    lines = [_row(headers), _row(["---"] * len(headers))]
    for client in scenario.clients:
        values = summary.get(client)
        attempted = len(runs.get(client, ()))
        if values is None:
            lines.append(_row([client, f"0/{attempted}"] + ["error"] * len(scenario.columns)))
            continue
        cells = [client, f"{values['runs']:.0f}/{attempted}"]
        for column in scenario.columns:
            value = values.get(column)
            cells.append("-" if value is None else COLUMNS[column][1].format(value))
        lines.append(_row(cells))
    return "\n".join(lines)


def targets_table(targets: Sequence[Target]) -> str:
    """Every target, what was measured, and whether nbtoolkit met it."""
    lines = [_row(["scenario", "target (nbtoolkit)", "measured", "met"]), _row(["---"] * 4)]
    for t in targets:
        met = "-" if t.met is None else "yes" if t.met else "**no**"
        lines.append(_row([t.scenario, t.goal, t.measured, met]))
    return "\n".join(lines)


def document(
    meta: Mapping[str, str],
    scenarios: Sequence[Scenario],
    sections: Mapping[str, str],
    targets: Sequence[Target],
) -> str:
    """The whole results.md."""
    parts = ["# nbtoolkit benchmarks", ""]
    parts += [f"- {key}: {value}" for key, value in meta.items()]
    parts += [
        "",
        "Medians over the repetitions. Each client run has a fresh client process and a fresh",
        "server process (nbtoolkit.testing.ChatServer) on 127.0.0.1; CPU and RSS are the client",
        "process's alone. `runs` counts the repetitions that produced figures.",
    ]
    for scenario in scenarios:
        parts += [
            "",
            f"## {scenario.name}",
            "",
            scenario.description + ".",
            "",
            sections[scenario.name],
        ]
    parts += ["", "## Targets", "", targets_table(targets), ""]
    return "\n".join(parts)


def as_json(
    meta: Mapping[str, str],
    scenarios: Sequence[Scenario],
    all_runs: Mapping[str, Runs],
    all_medians: Mapping[str, Mapping[str, Mapping[str, float]]],
    targets: Sequence[Target],
) -> dict[str, Any]:
    """Everything measured, every repetition included."""
    return {
        "meta": dict(meta),
        "scenarios": {
            s.name: {
                "spec": {k: v for k, v in dataclasses.asdict(s).items() if k not in {"targets"}},
                "runs": all_runs[s.name],
                "medians": all_medians[s.name],
            }
            for s in scenarios
        },
        "targets": [dataclasses.asdict(t) for t in targets],
    }
