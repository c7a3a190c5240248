"""The workloads, from the issue, and the targets nbtoolkit must meet in each.

A scenario's figures are ratios to a reference measured in the same run: the ``floor``
client, the ``pool`` client, or the ideal wall time a rate limit allows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Medians = Mapping[str, Mapping[str, float]]  # client -> metric -> median over repetitions


@dataclass(frozen=True)
class Target:
    """One target and whether the run met it."""

    scenario: str
    goal: str
    measured: str
    met: bool | None  # None: shown for comparison, not judged


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One workload: the rows, the server's behaviour, the clients, what the table shows."""

    name: str
    summary: str  # a template: {rows} and {ideal} are filled in
    rows: int
    quick_rows: int
    max_parallel: int
    clients: tuple[str, ...]
    server: dict[str, Any]  # benchmarks.serve options
    timeout: float | None = None  # per request, for every client; None: each one's default
    deadline: float = 120.0  # per client run; a run still going is cut and reported as is
    reference: str = "floor"  # a client, or "ideal" for rows / rate
    # A target that is the ratio of two close figures needs more runs than the rest for its
    # median to hold still on a shared machine.
    min_repeat: int = 1
    columns: tuple[str, ...] = ()
    targets: Callable[[Scenario, Medians], list[Target]] = field(
        default=lambda scenario, medians: [], repr=False
    )

    def quick(self) -> Scenario:
        """The smoke-run version: fewer rows and a shorter deadline."""
        return dataclasses.replace(
            self, rows=self.quick_rows, deadline=min(self.deadline, 30), min_repeat=1
        )

    @property
    def ideal(self) -> float | None:
        """The least wall time a rate limit allows (rows / rate), when there is one."""
        limit = self.server.get("rate_limit")
        return None if limit is None else self.rows / limit["requests_per_second"]

    @property
    def description(self) -> str:
        """`summary` with this version's rows and ideal time filled in."""
        latency = self.server.get("latency", 0.0)
        waves = -(-self.rows // self.max_parallel)  # rounds of max_parallel requests
        return self.summary.format(rows=self.rows, ideal=self.ideal or waves * latency)


def _ratio(scenario: Scenario, medians: Medians, metric: str, limit: float, what: str) -> Target:
    value = medians.get("nbtoolkit", {}).get(metric, float("nan"))
    return Target(
        scenario.name, f"{what} <= {limit:g} x {scenario.reference}", f"{value:.3f}", value <= limit
    )


def _latency_targets(scenario: Scenario, medians: Medians) -> list[Target]:
    return [_ratio(scenario, medians, "wall_x", 1.05, "wall")]


def _rate_limit_targets(scenario: Scenario, medians: Medians) -> list[Target]:
    ours = medians.get("nbtoolkit", {})
    rate = ours.get("rate_429", float("nan"))
    ok = ours.get("ok_min", float("nan"))
    return [
        _ratio(scenario, medians, "wall_x", 1.15, "wall"),
        Target(scenario.name, "429s <= 5% of requests", f"{rate:.1%}", rate <= 0.05),
        Target(
            scenario.name,
            f"{scenario.rows}/{scenario.rows} rows right",
            f"{ok:.0f}",
            ok == scenario.rows,
        ),
    ]


def _fault_targets(scenario: Scenario, medians: Medians) -> list[Target]:
    ours = medians.get("nbtoolkit", {})
    ok = ours.get("ok_min", float("nan"))
    wrong = ours.get("misaligned_max", float("nan"))
    twice = ours.get("answered_twice_max", float("nan"))
    rows = scenario.rows
    return [
        Target(scenario.name, f"{rows}/{rows} rows right (worst run)", f"{ok:.0f}", ok == rows),
        Target(scenario.name, "none misaligned (worst run)", f"{wrong:.0f}", wrong == 0),
        Target(scenario.name, "none answered twice (worst run)", f"{twice:.0f}", twice == 0),
        _ratio(scenario, medians, "wall_x", 1.3, "wall"),
    ]


def _cache_cost_targets(scenario: Scenario, medians: Medians) -> list[Target]:
    ours = medians.get("nbtoolkit", {}).get("cpu_ms_per_row", float("nan"))
    without = medians.get("nbtoolkit_nocache", {}).get("cpu_ms_per_row", float("nan"))
    inside = medians.get("nbtoolkit", {}).get("cache_cpu_ms_per_row", float("nan"))
    added = medians.get("nbtoolkit", {}).get("cache_added", float("nan"))
    return [
        _ratio(scenario, medians, "cpu_x", 1.0, "CPU per request"),  # issue #18's bar
        # Judged within each run: the same work's CPU moves by a third between runs on this
        # shared machine, which a 10% effect between two sets of runs cannot outlast.
        Target(
            scenario.name,
            "the cache adds <= 10% CPU per request (its own CPU / the rest, per run)",
            f"{added:.1%} ({inside * 1000:.1f} us per request)",
            added <= 0.10,
        ),
        Target(
            scenario.name,
            "cross-check, not judged: nbtoolkit vs nbtoolkit_nocache CPU",
            f"{ours / without:.3f} ({ours:.3f} vs {without:.3f} ms)",
            None,
        ),
    ]


def _cached_rerun_targets(scenario: Scenario, medians: Medians) -> list[Target]:
    wall = medians.get("nbtoolkit_cached", {}).get("wall", float("nan"))
    ok = medians.get("nbtoolkit_cached", {}).get("ok_min", float("nan"))
    rows = scenario.rows
    return [
        Target(
            scenario.name, f"fully cached re-run of {rows:,} rows < 1 s", f"{wall:.2f} s", wall < 1
        ),
        Target(scenario.name, f"{rows:,}/{rows:,} rows right", f"{ok:.0f}", ok == rows),
    ]


def _memory_targets(scenario: Scenario, medians: Medians) -> list[Target]:
    ours = medians.get("nbtoolkit", {}).get("peak_rss_mb", float("nan"))
    pool = medians.get("pool", {}).get("peak_rss_mb", float("nan"))
    return [
        Target(
            scenario.name,
            "peak RSS <= pool + 150 MB",
            f"{ours:.0f} MB vs {pool:.0f} MB (+{ours - pool:.0f})",
            ours <= pool + 150,
        ),
        _ratio(scenario, medians, "wall_x", 1.3, "wall"),
    ]


def _structured_targets(scenario: Scenario, medians: Medians) -> list[Target]:
    extract = medians.get("nbtoolkit_extract", {})
    complete = medians.get("nbtoolkit", {}).get("cpu_ms_per_row", float("nan"))
    ratio = extract.get("cpu_ms_per_row", float("nan")) / complete
    ok = extract.get("ok_min", float("nan"))
    rows = scenario.rows
    return [
        Target(
            scenario.name,
            "extract CPU per request <= 1.3 x complete's (same run)",
            f"{ratio:.3f} ({extract.get('cpu_ms_per_row', float('nan')):.3f} vs {complete:.3f} ms)",
            ratio <= 1.3,
        ),
        Target(scenario.name, f"{rows:,}/{rows:,} rows right", f"{ok:.0f}", ok == rows),
    ]


PEERS = ("floor", "recipe", "openai", "nbtoolkit")

# Issue 10: the rate_limit workload, its limit stated in each family of rate headers, over
# a one-second window (a gateway's) and a one-minute one (OpenAI's; Groq's is a day).
# (name, family, stated window in seconds)
_HEADER_CASES = (
    ("headers_openai_1s", "openai", 1.0),
    ("headers_openai_1min", "openai", 60.0),
    ("headers_groq_1day", "groq", 86400.0),
    ("headers_openrouter_1s", "openrouter", 1.0),
    ("headers_openrouter_1min", "openrouter", 60.0),
    ("headers_ietf_1s", "ietf", 1.0),
    ("headers_ietf_1min", "ietf-structured", 60.0),
    ("headers_azure", "azure", None),  # remaining counts only: no window to state
    ("headers_none", "none", None),  # no rate headers: 429s alone
)


def _header_scenario(name: str, family: str, window: float | None) -> Scenario:
    limit: dict[str, Any] = {"requests_per_second": 50, "burst": 50, "headers": family}
    stated = "no window"
    if window is not None:
        limit["window"] = window
        stated = {1.0: "per second", 60.0: "per minute", 86400.0: "per day"}[window]
    return Scenario(
        name=name,
        summary="{rows:,} rows, 50 requests/s (burst 50) in "
        + f"{family!r} rate headers, {stated}, "
        + "100 ms latency, max_parallel 100 (ideal {ideal:.0f} s)",
        rows=500,
        quick_rows=150,
        max_parallel=100,
        clients=("nbtoolkit",),
        server={"latency": 0.1, "rate_limit": limit},
        reference="ideal",
        columns=("wall", "wall_x", "ok", "requests", "n429", "rate_429", "finished"),
        targets=_rate_limit_targets,
    )


# Names --only accepts for a set of scenarios.
GROUPS: dict[str, tuple[str, ...]] = {"headers": tuple(name for name, _, _ in _HEADER_CASES)}

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="latency",
            summary="{rows:,} rows, 100 ms server latency, max_parallel 100 (ideal {ideal:.1f} s)",
            rows=2000,
            quick_rows=500,
            max_parallel=100,
            clients=(*PEERS, "engine"),
            server={"latency": 0.1},
            columns=("wall", "wall_x", "ok", "requests"),
            targets=_latency_targets,
        ),
        Scenario(
            name="overhead",
            summary="{rows:,} rows, no latency, max_parallel 64: client CPU per request",
            rows=5000,
            quick_rows=1000,
            max_parallel=64,
            # nbtoolkit_nocache right after nbtoolkit: the cache's cost is their difference.
            clients=(*PEERS, "nbtoolkit_nocache", "engine"),
            min_repeat=7,
            server={"latency": 0.0},
            columns=(
                "cpu_ms_per_row",
                "cpu_x",
                "cache_cpu_ms_per_row",
                "cache_added",
                "wall",
                "ok",
            ),
            targets=_cache_cost_targets,
        ),
        Scenario(
            name="structured",
            summary="{rows:,} rows, no latency, max_parallel 64: df.chat.extract (4 typed, "
            "checked fields) vs df.chat.complete, client CPU per request",
            rows=5000,
            quick_rows=1000,
            max_parallel=64,
            clients=("floor", "nbtoolkit", "nbtoolkit_extract"),
            # Two close figures: enough runs for the median of each to hold still.
            min_repeat=7,
            server={"latency": 0.0},
            columns=("cpu_ms_per_row", "cpu_x", "wall", "ok"),
            targets=_structured_targets,
        ),
        Scenario(
            name="rate_limit",
            summary="{rows:,} rows, 50 requests/s (burst 50), 100 ms latency, max_parallel 100 "
            "(ideal {ideal:.0f} s)",
            rows=500,
            quick_rows=150,
            max_parallel=100,
            clients=PEERS,
            server={"latency": 0.1, "rate_limit": {"requests_per_second": 50, "burst": 50}},
            reference="ideal",
            columns=("wall", "wall_x", "ok", "requests", "n429", "rate_429", "finished"),
            targets=_rate_limit_targets,
        ),
        Scenario(
            name="faults",
            summary="{rows:,} rows, 10% 5xx, 2% resets, 2% malformed, 0.5% stalls (30 s), "
            "5 s timeout, 50 ms latency, max_parallel 100",
            rows=1000,
            quick_rows=300,
            max_parallel=100,
            clients=PEERS,
            server={
                "latency": 0.05,
                "faults": {
                    "server_error": 0.10,
                    "reset": 0.02,
                    "malformed": 0.02,
                    "stall": 0.005,
                    "stall_seconds": 30.0,
                    "seed": 1,
                },
            },
            timeout=5.0,
            columns=("ok", "misaligned", "answered_twice", "requests", "wall", "wall_x"),
            targets=_fault_targets,
        ),
        Scenario(
            name="cached_rerun",
            summary="{rows:,} rows answered once, then the same call again: all from the cache",
            rows=100_000,
            quick_rows=10_000,
            max_parallel=64,
            clients=("nbtoolkit_cached",),
            server={"latency": 0.0, "record": False},
            deadline=300.0,
            reference="nbtoolkit_cached",
            columns=("wall", "cpu_ms_per_row", "ok"),
            targets=_cached_rerun_targets,
        ),
        Scenario(
            name="memory",
            summary="{rows:,} rows, no latency, max_parallel 256, each client in a fresh process",
            rows=200_000,
            quick_rows=10_000,
            max_parallel=256,
            clients=("pool", "nbtoolkit"),
            server={"latency": 0.0, "record": False},
            deadline=900.0,
            reference="pool",
            columns=("peak_rss_mb", "rss_before_mb", "rss_growth_mb", "wall", "wall_x", "ok"),
            targets=_memory_targets,
        ),
        *(_header_scenario(*case) for case in _HEADER_CASES),
    )
}
