"""What real providers do that our test servers did not: a plain aiohttp server of our own here
(not `nbtoolkit.testing`), answering as OpenAI's documentation shows, and what a notebook shows."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from aiohttp import web

import nbtoolkit
from nbtoolkit.config import ChatConfig
from nbtoolkit.core._estimate import estimate_run
from nbtoolkit.core._rows import ChatRequest

from .conftest import FAST_RETRY

Handler = Callable[[web.Request], Awaitable[web.Response]]

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


def completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    """A chat.completion as OpenAI sends it, extra fields included."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": body["model"] + "-2024-07-18",
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22},
    }


@contextlib.asynccontextmanager
async def docs_server(seen: list[dict[str, Any]]) -> AsyncIterator[str]:
    """An OpenAI-like /v1/chat/completions on 127.0.0.1 that replies with the docs' headers."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        return web.json_response(completion(body, "ok"), headers=OPENAI_DOCS_HEADERS)

    async with serving(chat) as base_url:
        yield base_url


@contextlib.asynccontextmanager
async def serving(chat: Handler) -> AsyncIterator[str]:
    """``chat`` as /v1/chat/completions on 127.0.0.1, a free port; yields the base URL."""
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


# What a row too long for the context, or caught by a content filter, gets: the same words
# for every such row (llama.cpp's server; Azure OpenAI).
LLAMA_CPP_TOO_LONG = {
    "error": {
        "code": 400,
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
    }
}
AZURE_FILTERED = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
        "content management policy. Please modify your prompt and retry.",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {"code": "ResponsibleAIPolicyViolation"},
    }
}


@pytest.mark.parametrize("refusal", [LLAMA_CPP_TOO_LONG, AZURE_FILTERED])
async def test_rows_refused_for_what_they_hold_fail_alone_at_the_head_of_a_frame(
    refusal: dict[str, Any], tmp_path: Path
) -> None:
    """Five rows at the head of the frame refused (too long, filtered) in the same words
    each fail alone; the run goes on and answers every other row."""
    prompts: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        prompts.append(prompt)
        if prompt.startswith("bad"):
            return web.json_response(refusal, status=400)
        return web.json_response(completion(body, "echo: " + prompt))

    frame = pd.DataFrame(
        {"text": [f"bad {i}" for i in range(5)] + [f"good {i}" for i in range(20)]}
    )
    async with serving(chat) as base_url:
        out = await frame.chat.acomplete(
            "text",
            model="gpt-4o-mini",
            base_url=base_url,
            api_key="sk-test-quirks",
            cache=str(tmp_path / "cache.sqlite3"),
            progress=False,
            max_parallel=1,  # the bad rows reach the server first, one by one
        )
    assert out["response"].tolist() == [None] * 5 + [f"echo: good {i}" for i in range(20)]
    assert sorted(prompts) == sorted(frame["text"])  # each row sent once, none left out
    errors = nbtoolkit.last_run().errors
    assert errors["error_kind"].tolist() == ["BadRequestError"] * 5
    assert errors["message"].str.contains(refusal["error"]["message"][:30]).all()


async def test_content_as_a_list_of_parts_is_its_text_parts(tmp_path: Path) -> None:
    """A reply whose content is a list of parts (Mistral's reasoning models: thinking, then
    text) is answered by its text parts, once, with its usage; not retried as malformed."""
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        reply = completion(body, "")
        reply["choices"][0]["message"]["content"] = [
            {"type": "thinking", "thinking": [{"type": "text", "text": "the user wants..."}]},
            {"type": "text", "text": "forty"},
            {"type": "text", "text": "-two"},
        ]
        return web.json_response(reply)

    async with serving(chat) as base_url:
        out = await pd.Series(["six times seven?"]).chat.acomplete(
            model="magistral-medium-latest",
            base_url=base_url,
            api_key="sk-test-quirks",
            cache=str(tmp_path / "cache.sqlite3"),
            progress=False,
        )
    assert out.tolist() == ["forty-two"]
    assert len(bodies) == 1
    assert nbtoolkit.last_run().stats.completion_tokens == 2


# OpenAI's answer to max_tokens sent to a reasoning model (o-series, gpt-5).
REASONING_REFUSES_MAX_TOKENS = {
    "error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }
}


async def test_filter_and_top_k_on_a_reasoning_model_send_only_its_own_limit(
    tmp_path: Path,
) -> None:
    """With max_completion_tokens given, filter, top_k and aggregate send no max_tokens of
    their own (a reasoning model refuses the pair), and every row is answered."""
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        if "max_tokens" in body:
            return web.json_response(REASONING_REFUSES_MAX_TOKENS, status=400)
        name = body.get("response_format", {}).get("json_schema", {}).get("name")
        text = {"verdict": '{"answer": true}', "score": '{"score": 70}'}.get(name, "letters")
        return web.json_response(completion(body, text))

    frame = pd.DataFrame({"text": ["a", "b", "c"]})
    async with serving(chat) as base_url:
        run = {
            "model": "o4-mini",
            "base_url": base_url,
            "api_key": "sk-test-quirks",
            "cache": str(tmp_path / "cache.sqlite3"),
            "progress": False,
            "max_completion_tokens": 2000,
        }
        kept = await frame.chat.afilter("Is {text} a letter?", **run)
        best = await frame.chat.atop_k(2, "How good is {text}?", **run)
        summary = await frame.chat.aaggregate("What do {text} have in common?", **run)
    assert kept["text"].tolist() == ["a", "b", "c"]
    assert best["score"].tolist() == [70.0, 70.0]
    assert summary is not None
    assert len(bodies) == 7
    assert all(b["max_completion_tokens"] == 2000 and "max_tokens" not in b for b in bodies)
