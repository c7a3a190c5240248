"""One client over one workload, in a fresh process: ``python -m benchmarks.child SPEC``.

SPEC is JSON: ``{"client", "url", "rows", "max_parallel", "timeout", "deadline"}``. The
last stdout line is ``RESULT {json}``: wall and CPU seconds of the run, peak RSS, and how
many rows came back right, wrong (another row's answer, or garbage) or missing.

Fairness: every child imports the same modules (all clients live in one module) and builds
the same DataFrame before the clock starts, so imports and the frame weigh the same in
every client's RSS; ``rss_before_mb`` is the peak up to that point. The clock covers the
client's run plus putting the answers in a new column of the frame (which
``df.chat.complete`` does itself).

The response cache's own CPU (``cache_cpu``) is timed inside it: every call the engine makes
to a `ResponseCache` is wrapped in `time.thread_time` (the cache works on a thread of its
own; the process's clock would also count what the event loop's thread did meanwhile). The
difference between the ``nbtoolkit`` and ``nbtoolkit_nocache`` clients measures the same
cost, and more (the engine's side of it), but on a shared machine the run-to-run noise is as
large as the cost itself; the timed figure is steady. The wrappers' own cost (about half a
microsecond per answer) falls on the ``nbtoolkit`` client's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pandas as pd

from benchmarks.clients import ASYNC_CLIENTS, PREPARE, SYNC_CLIENTS, Job
from nbtoolkit.core.store._cache import ResponseCache

# The calls the engine makes; merge() runs inside commit() and close(), so it is not wrapped.
_CACHE_CALLS = ("__init__", "get_many", "put", "put_many", "commit", "close")


def prompt(index: int) -> str:
    """Row `index`'s prompt: unique, so an answer in the wrong row is recognisable."""
    return f"row {index}: what do you think of item {index}?"


def expected(index: int) -> str:
    """What the test server's default responder answers to row `index`."""
    return "echo: " + prompt(index)


def expected_summary(index: int) -> str:
    """The ``summary`` field the test server's schema instance gives row `index`."""
    return f"summary: {prompt(index)}"[:60]


# Clients whose answer per row is not the echo of its prompt.
_EXPECTED: dict[str, Callable[[int], str]] = {"nbtoolkit_extract": expected_summary}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def _bounded(run: Callable[[Job], Awaitable[None]], job: Job, deadline: float) -> bool:
    """Run until done or `deadline` seconds; True when it finished."""
    try:
        async with asyncio.timeout(deadline) as scope:
            await run(job)
    except TimeoutError:
        if scope.expired():
            return False
        raise
    return True


def _interrupt_after(deadline: float) -> None:
    # SIGINT, as Ctrl-C would: asyncio.run cancels the run and nbtoolkit keeps the
    # finished rows in RunInterrupted.partial.
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    signal.setitimer(signal.ITIMER_REAL, deadline)


@contextlib.contextmanager
def _cache_cpu() -> Iterator[list[float]]:
    """Seconds of CPU spent inside `ResponseCache`, summed into the one-item list yielded."""
    spent = [0.0]

    def timed(call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                spent[0] += time.thread_time() - started

        return wrapper

    originals = {name: getattr(ResponseCache, name) for name in _CACHE_CALLS}
    for name, call in originals.items():
        setattr(ResponseCache, name, timed(call))
    try:
        yield spent
    finally:
        for name, call in originals.items():
            setattr(ResponseCache, name, call)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the client the spec names and return its measurements."""
    url, client, rows = spec["url"], spec["client"], int(spec["rows"])
    if not url.startswith("http://127.0.0.1:"):
        raise SystemExit(f"benchmarks only talk to 127.0.0.1, not {url}")
    frame = pd.DataFrame({"prompt": [prompt(i) for i in range(rows)]})
    job = Job(url, frame, int(spec["max_parallel"]), spec["timeout"], [None] * rows)
    if client in PREPARE:
        PREPARE[client](Job(url, frame, job.max_parallel, job.timeout, [None] * rows))
    gc.collect()
    rss_before = _peak_rss_mb()
    with _cache_cpu() as cache_cpu:
        wall, cpu = time.perf_counter(), time.process_time()
        if client in SYNC_CLIENTS:
            _interrupt_after(spec["deadline"])
            try:
                finished = SYNC_CLIENTS[client](job)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        else:
            finished = asyncio.run(_bounded(ASYNC_CLIENTS[client], job, spec["deadline"]))
            frame.assign(
                response=pd.Series(job.results, dtype=object)
            )  # the new frame df.chat.complete would return
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    right = _EXPECTED.get(client, expected)
    ok = sum(answer == right(i) for i, answer in enumerate(job.results))
    missing = job.results.count(None)
    return {
        "client": client,
        "finished": finished,
        "wall": wall,
        "cpu": cpu,
        "cpu_ms_per_row": 1000 * cpu / rows,
        "cache_cpu_ms_per_row": 1000 * cache_cpu[0] / rows,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        "rows": rows,
        "ok": ok,
        "misaligned": rows - ok - missing,
        "missing": missing,
    }


def main() -> None:
    """Entry point: measure, then print the result line."""
    result = measure(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
