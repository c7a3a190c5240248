"""``python -m benchmarks.dask_wall [--rows N] [--latency S] [--max-parallel N] [--repeat N]``.

Issue #14's benchmark: the same rows through the pandas accessor and through ``ddf.chat``
on a LocalCluster (2 worker processes x 2 threads), in the same run, against a fresh test
server process each time (its peak in flight is what it saw). Two Dask limiters:

- ``lease``: nbtoolkit's cluster-wide ledger (slots leased per partition, re-balanced);
- ``static``: the alternative the issue names, each partition running the pandas
  accessor with ``max_parallel // threads`` (exact, but idle slots cannot move).

Each runs on even partitions and on uneven ones (sizes 1:2:...:8), where a static split
strands the budget of partitions that finished early. Prints a table; the target is Dask
wall / pandas wall <= 1.2 with the peak at most max_parallel.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

import nbtoolkit
from benchmarks.harness import ROOT, server

THREADS = 4  # 2 workers x 2 threads


def _frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame({"q": [f"question {i}" for i in range(rows)]})


def _partitions(df: pd.DataFrame, uneven: bool) -> Any:
    import dask.dataframe as dd

    if not uneven:
        return dd.from_pandas(df, npartitions=2 * THREADS, sort=True)
    weights = list(range(1, 2 * THREADS + 1))
    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + round(len(df) * weight / sum(weights)))
    bounds[-1] = len(df) - 1
    return dd.from_pandas(df, npartitions=1, sort=True).repartition(divisions=bounds)


def _static(part: pd.DataFrame, options: dict[str, Any]) -> pd.DataFrame:
    share = max(1, options["max_parallel"] // THREADS)
    return part.chat.complete("q", **{**options, "max_parallel": share})  # type: ignore[no-any-return]


def _one(kind: str, uneven: bool, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    df = _frame(args.rows)
    options = {"latency": args.latency, "record": False}
    with server(options, log, ROOT) as running:
        chat = {
            "model": "bench",
            "base_url": running.url,
            "max_parallel": args.max_parallel,
            "cache": False,
            "progress": False,
        }
        started = time.perf_counter()
        if kind == "pandas":
            out = df.chat.complete("q", **chat)
        elif kind == "lease":
            out = _partitions(df, uneven).chat.complete("q", **chat).compute()
        else:
            meta = df.iloc[:0].assign(response=pd.Series([], dtype=object))
            out = _partitions(df, uneven).map_partitions(_static, chat, meta=meta).compute()
        wall = time.perf_counter() - started
        seen = running.stats()
    right = int((out["response"] == "echo: " + df["q"]).sum())
    return {
        "client": kind,
        "partitions": "-" if kind == "pandas" else ("uneven" if uneven else "even"),
        "wall_s": round(wall, 2),
        "peak_in_flight": seen["peak_in_flight"],
        "right": right,
        "answered_twice": seen["answered_twice"],
    }


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dask_wall", description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--max-parallel", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    results: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        open(Path(tmp) / "server.log", "w") as log,
        LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        for _ in range(args.repeat):
            results.append(_one("pandas", False, args, log))
            for uneven in (False, True):
                for kind in ("lease", "static"):
                    results.append(_one(kind, uneven, args, log))
            report = nbtoolkit.last_dask_run()
            print(report, file=sys.stderr)
    table = pd.DataFrame(results)
    pandas_wall = table[table["client"] == "pandas"]["wall_s"].median()
    table["vs_pandas"] = (table["wall_s"] / pandas_wall).round(2)
    print(
        f"{args.rows} rows, {args.latency * 1000:g} ms latency, max_parallel="
        f"{args.max_parallel}, LocalCluster 2 processes x 2 threads\n"
    )
    print(table.to_string(index=False))
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
