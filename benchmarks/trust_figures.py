"""What a refused run costs and what a budget spends, against the test server.

    python -m benchmarks.trust_figures

Counts, not timings: requests a run sends when every row gets the same 400 (the refusal
watch stops it after at most 3 + max_parallel), tokens billed without max_tokens against
2,000-token answers, and rows embedded under a budget smaller than one default group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from typing import Any

import nbtoolkit
from nbtoolkit import ChatConfig, ChatRequest, ChatRun, RetryPolicy
from nbtoolkit.core.endpoints._embeddings import EmbeddingEndpoint
from nbtoolkit.testing import ChatServer, CompletionLengths, Status

FAST = RetryPolicy(attempts=4, wait_initial=0.01, wait_max=0.05, jitter=0.01)
REFUSAL = Status(400, message="This model does not support specifying dimensions.")


def _config(server: ChatServer, **overrides: object) -> ChatConfig:
    values: dict[str, object] = {
        "base_url": server.base_url,
        "model": "test-model",
        "retry": FAST,
        "progress": False,
        "cache": False,
    }
    values.update(overrides)
    return ChatConfig(**values)  # type: ignore[arg-type]


def _asks(n: int) -> list[ChatRequest]:
    return [ChatRequest(({"role": "user", "content": f"question {i}"},)) for i in range(n)]


async def refused(rows: int, parallel: int, *, embed: bool) -> int:
    """Requests sent before a run whose every request gets the same 400 stops."""
    async with ChatServer(latency=0.01, record=False) as server:
        server.script(*[REFUSAL] * (2 * rows))
        endpoint = EmbeddingEndpoint(model="m", dimensions=8) if embed else None
        run = ChatRun(_config(server, max_parallel=parallel), endpoint=endpoint)
        requests: list[Any] = [f"text {i}" for i in range(rows)] if embed else _asks(rows)
        with contextlib.suppress(nbtoolkit.RunAborted):  # the stop is what is measured
            await run.execute(requests)
        return server.request_count


async def main() -> None:
    os.environ["NBTOOLKIT_CACHE_DIR"] = tempfile.mkdtemp()
    for parallel in (4, 16):
        for embed in (False, True):
            sent = await refused(20_000, parallel, embed=embed)
            kind = "embed" if embed else "chat"
            print(
                f"{kind}, 20,000 rows, the same 400 for all, "
                f"max_parallel={parallel}: {sent} requests"
            )
    lengths = CompletionLengths(median=2_000, sigma=0.0)
    async with ChatServer(latency=0.02, lengths=lengths, record=False) as server:
        run = ChatRun(_config(server, max_parallel=32, max_tokens_total=60_000))
        results = await run.execute(_asks(300))
        answered = sum(result.ok for result in results)
        print(
            f"no max_tokens, 2,000-token answers, 32 in flight, max_tokens_total=60,000: "
            f"{run.budget.tokens:,.0f} tokens billed, {answered} rows answered"
        )
    async with ChatServer(record=False) as server:
        texts = [f"{i:05d} " + "a fairly short review text " * 4 for i in range(3000)]
        run = ChatRun(
            _config(server, max_tokens_total=50_000), endpoint=EmbeddingEndpoint(model="m")
        )
        results = await run.execute(texts)
        embedded = sum(result.ok for result in results)
        print(
            f"embed 3,000 texts at batch_size 2,048, max_tokens_total=50,000: {embedded:,} "
            f"embedded, {run.stats.prompt_tokens:,} tokens spent"
        )


if __name__ == "__main__":
    asyncio.run(main())
