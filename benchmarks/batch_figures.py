"""Batch mode's own costs against the test server: submit, re-attach, result, and the
complete that follows (which sends only the failed lines).

    python -m benchmarks.batch_figures 1000 50000

Figures for the README, never run as tests; absolute seconds on this machine, so compare
runs made on the same machine only.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import pandas as pd

from nbtoolkit.testing import BatchBehaviour, ChatServer


def measure(rows: int) -> str:
    """One line of figures for a job of ``rows`` distinct prompts, 5% of lines failing."""
    os.environ["NBTOOLKIT_CACHE_DIR"] = tempfile.mkdtemp()
    df = pd.DataFrame({"q": [f"question {i}: tell me about item {i}" for i in range(rows)]})
    behaviour = BatchBehaviour(fail_rate=0.05, in_progress=0.5)
    with ChatServer(record=False, batch=behaviour).run_in_thread() as server:
        kw = {"model": "m", "base_url": server.base_url, "progress": False}
        started = time.perf_counter()
        job = df.chat.submit_batch("q", **kw)
        submit = time.perf_counter() - started
        started = time.perf_counter()
        df.chat.submit_batch("q", **kw)
        reattach = time.perf_counter() - started
        job.wait(poll=0.1)
        started = time.perf_counter()
        out = job.result()
        result = time.perf_counter() - started
        started = time.perf_counter()
        df.chat.complete("q", **kw, max_parallel=32)
        complete = time.perf_counter() - started
        return (
            f"rows={rows:,} submit={submit:.2f}s reattach={reattach:.2f}s result={result:.2f}s "
            f"answered={int(out['response'].notna().sum()):,} then complete sent "
            f"{server.request_count:,} requests in {complete:.2f}s; "
            f"batches created {server.batch.batches_created}"
        )


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["1000"]:
        print(measure(int(arg)))
