"""What a cache thread costs a bare aiohttp loop: ``python -m benchmarks.thread_tax [REPEAT]``.

Issue 19 moved the response cache's SQLite work off the event loop, onto a thread of its own,
so that a lock held by another process can never freeze the notebook. Issue 18 asks for the
cache-on overhead at 1.0 x the floor (bare aiohttp). This measures what the thread alone costs,
whatever the cache does on it: the floor client (``benchmarks.clients.floor``'s requests,
5,000 rows, 64 at a time, against a ChatServer in another process) three ways, interleaved:

    floor          as it is
    floor+hop      plus, every 20 ms, one hand-over to a thread that does nothing with it
    floor+sqlite   plus, every 20 ms, the answers of those 20 ms inserted into a SQLite
                   journal (WAL) on that thread, as the cache's group commit does

and prints each one's CPU per request (median and range), and its ratio to the floor's, of the
medians and of the least runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.clients import _post
from benchmarks.harness import server

ROWS, PARALLEL, COMMIT_EVERY = 5000, 64, 0.020
VARIANTS = ("floor", "floor+hop", "floor+sqlite")


def _journal(path: str) -> tuple[concurrent.futures.ThreadPoolExecutor, sqlite3.Connection]:
    thread = concurrent.futures.ThreadPoolExecutor(1)

    def open_journal() -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE journal (key BLOB, text TEXT, p, c, d, model TEXT, created)")
        return db

    return thread, thread.submit(open_journal).result()


async def run(url: str, variant: str) -> None:
    """One run of the floor's requests, with the variant's thread beside it."""
    thread = db = None
    if variant != "floor":
        thread, db = _journal(os.path.join(tempfile.mkdtemp(), "journal.sqlite3"))
    held: list[tuple[Any, ...]] = []
    done = asyncio.Event()

    def write(rows: list[tuple[Any, ...]]) -> None:
        if variant == "floor+sqlite" and rows and db is not None:
            marks = ",".join(["(?,?,?,?,?,?,?)"] * len(rows))
            db.execute(f"INSERT INTO journal VALUES {marks}", [v for row in rows for v in row])

    async def commit_every_20_ms() -> None:
        nonlocal held
        assert thread is not None
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), COMMIT_EVERY)
            rows, held = held, []
            await asyncio.wrap_future(thread.submit(write, rows))

    connector = aiohttp.TCPConnector(limit=PARALLEL)
    async with aiohttp.ClientSession(connector=connector) as session:
        semaphore = asyncio.Semaphore(PARALLEL)

        async def one(index: int) -> None:
            async with semaphore:
                text = await _post(session, url, f"row {index}")  # the floor's own request
            if thread is not None:
                key = hashlib.sha256(b"%d" % index).digest()
                held.append((key, text, 1, 2, None, "m", time.time()))

        committer = asyncio.ensure_future(commit_every_20_ms()) if thread else None
        await asyncio.gather(*(one(i) for i in range(ROWS)))
        done.set()
        if committer is not None:
            await committer
    if thread is not None:
        thread.shutdown()


def _timed(call: Callable[[], None]) -> float:
    started = time.process_time()
    call()
    return (time.process_time() - started) / ROWS * 1000


def main() -> None:
    """Start the server, run every variant REPEAT times, interleaved, and print the table."""
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    # The harness's server process: it checks the address is 127.0.0.1 and stops it on exit.
    with server({"latency": 0.0}, sys.stderr, Path.cwd()) as running:
        url = running.url  # the base URL, as `_post` takes it
        for _ in range(repeat):
            for variant in VARIANTS:
                cpu[variant].append(_timed(lambda v=variant: asyncio.run(run(url, v))))
    # Noise on a shared machine only ever adds CPU: the least of many runs is the steadier
    # figure, so both ratios are printed.
    floor, floor_least = statistics.median(cpu["floor"]), min(cpu["floor"])
    print("| variant | CPU ms / request (median, range) | vs floor: medians | least |")
    print("| --- | --- | --- | --- |")
    for variant, values in cpu.items():
        median = statistics.median(values)
        print(
            f"| {variant} | {median:.4f} ({min(values):.4f}-{max(values):.4f}) "
            f"| {median / floor:.2f} x | {min(values) / floor_least:.2f} x |"
        )
    print(f"{repeat} runs each, interleaved; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
