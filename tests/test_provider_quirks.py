"""What real providers do that our test servers did not: a plain aiohttp server of our own here
(not `nbtoolkit.testing`), answering as OpenAI's documentation shows, and what a notebook shows."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pandas as pd
from aiohttp import web

import nbtoolkit  # noqa: F401  (registers df.chat)
from nbtoolkit.config import ChatConfig
from nbtoolkit.core._estimate import estimate_run
from nbtoolkit.core._rows import ChatRequest

from .conftest import FAST_RETRY

# The rate headers of OpenAI's rate-limit guide, word for word: a token reset six minutes
# away while nearly all of the 150,000 tokens remain.
OPENAI_DOCS_HEADERS = {
    "x-ratelimit-limit-requests": "60",
    "x-ratelimit-limit-tokens": "150000",
    "x-ratelimit-remaining-requests": "59",
    "x-ratelimit-remaining-tokens": "149984",
    "x-ratelimit-reset-requests": "1s",
    "x-ratelimit-reset-tokens": "6m0s",
}


@contextlib.asynccontextmanager
async def docs_server(seen: list[dict[str, Any]]) -> AsyncIterator[str]:
    """An OpenAI-like /v1/chat/completions on 127.0.0.1 that replies with the docs' headers."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        reply = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"] + "-2024-07-18",
            "system_fingerprint": "fp_1",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22},
        }
        return web.json_response(reply, headers=OPENAI_DOCS_HEADERS)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_a_far_token_reset_with_plenty_left_does_not_inflate_the_wall_time(
    tmp_path: Path,
) -> None:
    """A pilot told "6m0s" to reset 16 of 150,000 tokens: 40 rows fit the tokens left, so the
    wall time comes from the 60 requests a minute, not from days of token refill."""
    seen: list[dict[str, Any]] = []
    async with docs_server(seen) as base_url:
        config = ChatConfig(
            base_url=base_url,
            api_key="sk-test-quirks",
            model="gpt-4o-mini",
            cache=tmp_path / "cache.sqlite3",
            progress=False,
            retry=FAST_RETRY,
            max_parallel=4,
        )
        rows = [ChatRequest(({"role": "user", "content": f"row {i}"},)) for i in range(40)]
        estimate = await estimate_run(config, rows, pilot=4)
    assert len(seen) == 4  # the pilot only
    assert estimate.wall_seconds is not None
    # Requests: 60 remaining a minute at most, 36 rows left, so well under a minute of it;
    # the token refill the headers imply (16 tokens in 360 s) would have said over 10 hours.
    assert estimate.wall_seconds < 120, (estimate.wall_seconds, estimate.wall_basis)
    assert "tokens" not in estimate.wall_basis


def test_estimate_html_keeps_mathjax_away_from_its_dollars(tmp_path: Path) -> None:
    """Both estimates' HTML carry MathJax's ignore classes, so JupyterLab shows "$0.15 in,
    $0.6 out" as text, not as LaTeX; a one-step operator says "1 step"."""
    frame = pd.DataFrame({"review": ["good", "bad", "fine"]})
    run = {
        "model": "gpt-4o-mini",
        "base_url": "http://127.0.0.1:9/v1",  # a dry run sends nothing: no server needed
        "api_key": "sk-test-quirks",
        "cache": str(tmp_path / "cache.sqlite3"),
        "prices": {"gpt-4o-mini": (0.15, 0.6)},
        "progress": False,
    }
    single = frame.chat.complete("review", dry_run=True, **run)
    operator = frame.chat.filter("Is it good? {review}", dry_run=True, **run)
    for shown in (single._repr_html_(), operator._repr_html_()):
        assert shown.startswith('<div class="tex2jax_ignore mathjax_ignore">'), shown[:80]
        assert "$0.15" in shown
    assert "in 1 step;" in operator.headline()
