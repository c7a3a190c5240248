"""A ChatServer in its own process: ``python -m benchmarks.serve OPTIONS``.

OPTIONS is JSON: ``latency``, ``record``, and optionally ``rate_limit``, ``faults`` and
``embeddings`` (the keyword arguments of `RateLimit`, `FaultRates`, `EmbeddingBehaviour`).
The first stdout line is the base URL.
Then it reads commands from stdin, one a line: ``stats`` prints a JSON line of what the
server saw; ``stop``, end of input (the parent died) or ``max_seconds`` stops it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from nbtoolkit.testing import ChatServer, EmbeddingBehaviour, FaultRates, RateLimit

MAX_SECONDS = 3600.0  # a server forgotten by a crashed parent still goes away


def build(options: dict[str, Any]) -> ChatServer:
    """The server the options describe."""
    rate_limit = options.get("rate_limit")
    faults = options.get("faults")
    embeddings = options.get("embeddings")
    return ChatServer(
        latency=float(options.get("latency", 0.0)),
        record=bool(options.get("record", False)),
        rate_limit=None if rate_limit is None else RateLimit(**rate_limit),
        faults=None if faults is None else FaultRates(**faults),
        embeddings=None if embeddings is None else EmbeddingBehaviour(**embeddings),
    )


def stats(server: ChatServer) -> dict[str, Any]:
    """What the server saw, including the prompts it answered more than once."""
    return {
        "requests": server.request_count,
        "statuses": dict(server.statuses),
        "peak_in_flight": server.peak_in_flight,
        "answered": len(server.answered),
        "answered_twice": sum(1 for n in server.answered.values() if n > 1),
        "server_cpu": time.process_time(),
    }


async def serve(options: dict[str, Any], max_seconds: float) -> None:
    """Serve until told to stop; commands run on the server's loop, so counters are still."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with build(options) as server, asyncio.timeout(max_seconds):
        print(server.base_url, flush=True)
        while line := await reader.readline():
            command = line.strip().decode()
            if command == "stats":
                print(json.dumps(stats(server)), flush=True)
            elif command == "stop":
                break


def main() -> None:
    """Entry point."""
    options = json.loads(sys.argv[1])
    try:
        asyncio.run(serve(options, float(options.get("max_seconds", MAX_SECONDS))))
    except TimeoutError:
        print("benchmarks.serve: stopped at max_seconds", file=sys.stderr)


if __name__ == "__main__":
    main()
