"""Anthropic's rate headers, the only word on the limit: how close the run gets to it.

    python -m benchmarks.provider_headers [repetitions]

500 rows against `AnthropicServer` with 50 requests/s (burst 50) stated only in
``anthropic-ratelimit-*`` headers (per minute: 3,000), 100 ms latency, max_parallel 100:
the ideal is rows / rate = 10 s. Targets (issue 22): at most 1.15 x the ideal, at most 5%
429s. A figure for the README, never a test (no timed assertions in tests); the server runs
on its own thread and loop.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import nbtoolkit
from nbtoolkit import ChatRequest, ChatRun
from nbtoolkit.testing import AnthropicServer, RateLimit

ROWS = 500
RATE = 50.0


def once() -> tuple[float, int, int, int]:
    """Wall seconds, rows right, requests and 429s of one run."""
    limit = RateLimit(RATE, 50, headers="anthropic")
    requests = [ChatRequest(({"role": "user", "content": f"row {i}"},)) for i in range(ROWS)]
    with AnthropicServer(latency=0.1, rate_limit=limit, record=False).run_in_thread() as server:
        config = nbtoolkit.ChatConfig(
            provider="anthropic",
            base_url=server.base_url,
            api_key="sk-ant-bench",
            model="claude-sonnet-4-5",
            max_parallel=100,
            cache=False,
            progress=False,
        )
        started = time.perf_counter()
        results = asyncio.run(ChatRun(config).execute(requests))
        wall = time.perf_counter() - started
        right = sum(r.text == f"echo: row {i}" for i, r in enumerate(results))
        return wall, right, server.request_count, server.statuses["429"]


def main() -> None:
    repetitions = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    ideal = ROWS / RATE
    runs = [once() for _ in range(repetitions)]
    for wall, right, sent, limited in runs:
        print(
            f"wall {wall:.2f} s ({wall / ideal:.2f} x ideal {ideal:.0f} s), {right}/{ROWS} "
            f"right, {sent} requests, {limited} 429s ({limited / sent:.1%})"
        )
    wall = statistics.median(run[0] for run in runs)
    rate = statistics.median(run[3] / run[2] for run in runs)
    print(f"median: {wall / ideal:.2f} x ideal, {rate:.1%} 429s (targets: <= 1.15 x, <= 5%)")


if __name__ == "__main__":
    main()
