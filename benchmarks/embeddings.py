"""``python -m benchmarks.embeddings [--rows N] [--dimensions D] [--repeat R]``: df.chat.embed
against a raw aiohttp floor that batches the same way, in the same run.

Each repetition starts a fresh test server process (``ChatServer`` answering
``/v1/embeddings``, shuffled, D-dimension vectors) and a fresh client process per client,
interleaved (floor, nbtoolkit, nbtoolkit_nocache, then again), so a slow minute on the
machine does not land on one client alone. A client times itself (wall and CPU of the run,
including building the output frame), reports its peak RSS, and checks every vector
against the server's after the clock stops.

    floor              aiohttp, the same batches (batch_size texts) and max_parallel workers,
                       json.loads, vectors put back by index as float32 arrays, a new frame
    nbtoolkit          df.chat.embed(...) with the response cache (a fresh file per run)
    nbtoolkit_nocache  the same with cache=False

Writes ``benchmarks/results-embeddings.md`` (``--output`` for another file).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd

from benchmarks.harness import ROOT, environment, server

CLIENTS = ("floor", "nbtoolkit", "nbtoolkit_nocache")
MODEL = "bench-embedding-model"
TARGET_CPU_X = 1.3


def text(index: int) -> str:
    """Row ``index``'s text: unique, about 15 tokens."""
    return f"review {index}: arrived on time, works as described, would buy item {index} again"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def _floor(url: str, texts: list[str], batch: int, parallel: int) -> list[Any]:
    """The least a client can do: post the batches, parse, put each vector in its row."""
    vectors: list[Any] = [None] * len(texts)
    starts = iter(range(0, len(texts), batch))
    connector = aiohttp.TCPConnector(limit=parallel)

    async def worker(session: aiohttp.ClientSession) -> None:
        for start in starts:
            body = {"model": MODEL, "input": texts[start : start + batch]}
            body["encoding_format"] = "float"
            async with session.post(url + "/embeddings", json=body) as reply:
                reply.raise_for_status()
                data = json.loads(await reply.read())["data"]
            for datum in data:
                vectors[start + datum["index"]] = np.asarray(datum["embedding"], np.float32)

    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(parallel)))
    return vectors


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one client over the spec's rows; its figures."""
    from nbtoolkit.testing import expected_vector

    url, client, rows = spec["url"], spec["client"], int(spec["rows"])
    batch, parallel, dimensions = spec["batch"], spec["parallel"], spec["dimensions"]
    frame = pd.DataFrame({"text": [text(i) for i in range(rows)]})
    gc.collect()
    rss_before = _peak_rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    if client == "floor":
        vectors = asyncio.run(_floor(url, list(frame["text"]), batch, parallel))
        column = np.empty(rows, dtype=object)
        column[:] = vectors
        out = frame.assign(embedding=pd.Series(column, index=frame.index, dtype=object))
    else:
        out = frame.chat.embed(
            "text",
            model=MODEL,
            base_url=url,
            batch_size=batch,
            max_parallel=parallel,
            cache=client == "nbtoolkit",
            progress=False,
        )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _peak_rss_mb()
    embedded = out["embedding"]
    ok = sum(
        isinstance(v, np.ndarray)
        and v.dtype == np.float32
        and np.array_equal(v, expected_vector(text(i), dimensions))
        for i, v in enumerate(embedded)
    )
    return {
        "client": client,
        "wall": wall,
        "cpu": cpu,
        "cpu_us_per_text": 1e6 * cpu / rows,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "rows": rows,
        "ok": ok,
    }


def _run(client: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    options = {
        "record": False,
        "embeddings": {"dimensions": args.dimensions, "shuffle": True},
    }
    with (
        open(work / f"{client}-server.log", "a") as log,
        tempfile.TemporaryDirectory(dir=work, prefix="cache-") as cache,
        server(options, log, ROOT) as running,
    ):
        spec = {
            "client": client,
            "url": running.url,
            "rows": args.rows,
            "batch": args.batch,
            "parallel": args.parallel,
            "dimensions": args.dimensions,
        }
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.embeddings", "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=environment(Path(cache)),
            timeout=900,
            check=False,
        )
        stats = running.stats()
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
            result["server"] = stats
            return result
    raise RuntimeError(f"{client} gave no result: {done.stderr[-2000:]}")


def _table(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    floor_cpu = statistics.median(r["cpu"] for r in runs["floor"])
    floor_wall = statistics.median(r["wall"] for r in runs["floor"])
    lines = [
        "| client | CPU per text (us) | CPU x floor | wall (s) | wall x floor | "
        "peak RSS (MB) | RSS growth (MB) | vectors right | requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for client, results in runs.items():
        cpu = statistics.median(r["cpu"] for r in results)
        wall = statistics.median(r["wall"] for r in results)
        peak = statistics.median(r["peak_rss_mb"] for r in results)
        growth = statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in results)
        ok = min(r["ok"] for r in results)
        requests = statistics.median(r["server"]["requests"] for r in results)
        lines.append(
            f"| {client} | {1e6 * cpu / args.rows:.1f} | {cpu / floor_cpu:.3f} | {wall:.2f} | "
            f"{wall / floor_wall:.3f} | {peak:.0f} | {growth:.0f} | {ok}/{args.rows} | "
            f"{requests:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the clients, print the table, write it to benchmarks/results-embeddings.md."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embeddings", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dimensions", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--output", default="benchmarks/results-embeddings.md", help="where the table goes"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(json.loads(args.child))), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="nbtoolkit-bench-embed-"))
    runs: dict[str, list[dict[str, Any]]] = {client: [] for client in CLIENTS}
    for rep in range(args.repeat):
        for client in CLIENTS:
            result = _run(client, args, work)
            runs[client].append(result)
            print(
                f"{client} {rep + 1}/{args.repeat}: wall {result['wall']:.2f} s, "
                f"CPU {result['cpu']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MB, "
                f"{result['ok']}/{result['rows']} right",
                file=sys.stderr,
            )
    ours = statistics.median(r["cpu"] for r in runs["nbtoolkit"])
    floor = statistics.median(r["cpu"] for r in runs["floor"])
    vector_bytes = args.dimensions * 4
    array_bytes = sys.getsizeof(np.zeros(args.dimensions, dtype=np.float32))
    command = "python -m benchmarks.embeddings" + "".join(f" {a}" for a in sys.argv[1:])
    document = "\n".join(
        [
            "# Embeddings benchmark",
            "",
            f"`{command}` on {os.cpu_count()} CPUs; {args.rows:,} unique texts, "
            f"{args.dimensions} dimensions, batches of {args.batch}, max_parallel "
            f"{args.parallel}, medians of {args.repeat} interleaved runs; logs in {work}.",
            "",
            _table(runs, args),
            "",
            f"Target: nbtoolkit CPU <= {TARGET_CPU_X} x floor: measured {ours / floor:.3f} "
            f"({'met' if ours / floor <= TARGET_CPU_X else 'missed'}).",
            "",
            f"Memory per row: a vector is {vector_bytes:,} bytes of float32 plus the numpy "
            f"array's own {array_bytes - vector_bytes} bytes ({array_bytes:,} in all, "
            "sys.getsizeof), and the output column one pointer per row. The rest of the "
            "growth is replies being parsed (a batch's JSON and its Python floats, about "
            "32 bytes a number while parsed), times the batches parsed at once, plus "
            "nbtoolkit's one RowResult and report row per row.",
        ]
    )
    (ROOT / args.output).write_text(document + "\n")
    print(document)


if __name__ == "__main__":
    main()
