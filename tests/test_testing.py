"""The test server: wire format, scripted behaviours, faults, records and thread mode.

Every test talks to the server through a real aiohttp client, as the code under test would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import pytest

from nbtoolkit.testing import (
    HEADER_FAMILIES,
    ChatServer,
    FaultRates,
    Malformed,
    RateLimit,
    Reply,
    Reset,
    Stall,
    Status,
    _ratelimit,
    duration,
)


def _body(prompt: str, model: str = "test-model") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": prompt},
        ],
    }


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


async def _post(
    session: aiohttp.ClientSession,
    server: ChatServer,
    prompt: str,
    **kwargs: Any,
) -> tuple[int, str, Mapping[str, str]]:
    url = server.base_url + "/chat/completions"
    async with session.post(url, json=kwargs.pop("json", _body(prompt)), **kwargs) as resp:
        return resp.status, await resp.text(), resp.headers


class LimiterClock:
    """Stands in for the `time` module inside the server's rate limiter: no time passes but
    what a test advances, so bucket levels and reset headers do not depend on how busy the
    machine is (a request that comes 0.1 s late on a loaded machine finds a refilled token).
    """

    def __init__(self) -> None:
        self.now = 1000.0  # monotonic seconds
        self.epoch_at_start = 1_800_000_000.0  # what time.time() says while now == 1000

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.epoch_at_start + self.now - 1000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def limiter_clock(monkeypatch: pytest.MonkeyPatch) -> LimiterClock:
    """The rate limiter's clock, frozen until the test advances it."""
    clock = LimiterClock()
    monkeypatch.setattr(_ratelimit, "time", clock)
    return clock


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


async def test_success_reply_has_the_openai_chat_completion_shape(
    session: aiohttp.ClientSession,
) -> None:
    """A plain request gets a chat.completion echoing the last user message, with usage."""
    async with ChatServer() as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        status, text, _ = await _post(session, server, "hello")
    assert status == 200
    body = json.loads(text)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "test-model"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hello"},
            "logprobs": None,  # as OpenAI sends it when none were asked for
            "finish_reason": "stop",
        }
    ]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


async def test_records_what_the_server_saw(session: aiohttp.ClientSession) -> None:
    """Each request is recorded with its body, headers, prompt, times, status and outcome."""
    async with ChatServer() as server:
        await _post(session, server, "a", headers={"X-Trace": "1"})
        await _post(session, server, "a")
    first, second = server.requests
    assert first.body == _body("a")
    assert first.headers["X-Trace"] == "1"
    assert (first.prompt, first.status, first.outcome, first.attempt) == ("a", 200, "ok", 0)
    assert second.attempt == 1
    assert first.started <= first.finished <= second.started
    assert server.request_count == 2
    assert server.answered == {"a": 2}
    assert server.statuses == {"ok": 2}
    server.reset_records()
    assert (server.requests, server.request_count, server.answered) == ([], 0, {})


async def test_record_false_keeps_counters_but_no_list(session: aiohttp.ClientSession) -> None:
    """record=False keeps no per-request list; the counters still count."""
    async with ChatServer(record=False) as server:
        await _post(session, server, "a")
    assert server.requests == []
    assert (server.request_count, server.answered["a"]) == (1, 1)


async def test_custom_responder_gets_messages_and_body(session: aiohttp.ClientSession) -> None:
    """A responder builds the reply text from the messages and the whole request body."""

    def responder(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
        return f"{len(messages)} messages for {body['model']}"

    async with ChatServer(responder=responder) as server:
        _, text, _ = await _post(session, server, "x", json=_body("x", model="m1"))
    assert json.loads(text)["choices"][0]["message"]["content"] == "2 messages for m1"


async def test_wrong_api_key_gets_401_without_echoing_the_key(
    session: aiohttp.ClientSession,
) -> None:
    """A wrong or missing key gets an OpenAI 401 body that never contains the sent key."""
    async with ChatServer(api_key="sk-right") as server:
        bad = {"Authorization": "Bearer sk-wrong-secret"}
        status, text, _ = await _post(session, server, "a", headers=bad)
        missing_status, _, _ = await _post(session, server, "a")
        ok_status, _, _ = await _post(
            session, server, "a", headers={"Authorization": "Bearer sk-right"}
        )
    assert (status, missing_status, ok_status) == (401, 401, 200)
    assert "sk-wrong-secret" not in text
    assert json.loads(text)["error"]["code"] == "invalid_api_key"
    assert server.statuses == {"401": 2, "ok": 1}


async def test_body_that_is_not_json_gets_400(session: aiohttp.ClientSession) -> None:
    """A request body that is not JSON gets a 400 and consumes no scripted action."""
    async with ChatServer() as server:
        server.script(Reply("kept"))
        async with session.post(server.base_url + "/chat/completions", data=b"{oops") as resp:
            status = resp.status
        _, text, _ = await _post(session, server, "a")
    assert status == 400
    assert json.loads(text)["choices"][0]["message"]["content"] == "kept"


async def test_unknown_model_gets_404_and_models_are_listed(
    session: aiohttp.ClientSession,
) -> None:
    """With model_names, another model gets a 404 model_not_found; GET /models lists them."""
    async with ChatServer(model_names=["m1"]) as server:
        status, text, _ = await _post(session, server, "a", json=_body("a", model="nope"))
        async with session.get(server.base_url + "/models") as resp:
            models = await resp.json()
    assert status == 404
    error = json.loads(text)["error"]
    assert (error["code"], error["message"]) == (
        "model_not_found",
        "The model `nope` does not exist",
    )
    assert [m["id"] for m in models["data"]] == ["m1"]


async def test_status_sends_error_body_and_retry_headers(session: aiohttp.ClientSession) -> None:
    """Status(429, retry_after, retry_after_ms) sends both headers and an OpenAI error body."""
    async with ChatServer() as server:
        server.script(
            Status(429, retry_after=2, retry_after_ms=500, error_code="rate_limit_exceeded"),
            Status(503, retry_after=0.5, headers={"X-Extra": "y"}),
        )
        status, text, headers = await _post(session, server, "a")
        status2, _, headers2 = await _post(session, server, "a")
        status3, _, _ = await _post(session, server, "a")
    assert (status, status2, status3) == (429, 503, 200)
    assert (headers["Retry-After"], headers["retry-after-ms"]) == ("2", "500")
    assert (headers2["Retry-After"], headers2["X-Extra"]) == ("0.5", "y")
    error = json.loads(text)["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert server.statuses == {"429": 1, "503": 1, "ok": 1}
    assert server.answered == {"a": 1}


async def test_reset_is_a_connection_error_for_the_client(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Reset drops the connection: the client sees a connection error, the server logs none."""
    caplog.set_level(logging.WARNING)
    async with ChatServer() as server:
        server.script(Reset())
        with pytest.raises(aiohttp.ClientConnectionError):
            await _post(session, server, "a")
        status, _, _ = await _post(session, server, "a")
    assert status == 200
    assert [(r.status, r.outcome) for r in server.requests] == [(None, "reset"), (200, "ok")]
    assert server.in_flight == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_stall_is_cut_by_client_timeout_and_shutdown_is_prompt(
    session: aiohttp.ClientSession,
) -> None:
    """A Stall outlasts a client timeout, ends when the client leaves, and never slows stop."""
    server = ChatServer()
    async with server:
        server.script(Stall(30), Stall(30))
        with pytest.raises(asyncio.TimeoutError):
            await _post(session, server, "a", timeout=aiohttp.ClientTimeout(total=0.2))
        await _until(lambda: server.in_flight == 0)  # the hang-up ended the stalled handler
        pending = asyncio.ensure_future(_post(session, server, "b"))
        await _until(lambda: server.in_flight == 1)
        stop_started = time.monotonic()
    # Stopping must not wait out the 30 s stall; a busy machine's stop takes well under half.
    assert time.monotonic() - stop_started < 15
    with pytest.raises(aiohttp.ClientConnectionError):
        await pending
    assert [(r.status, r.outcome) for r in server.requests] == [(None, "stall"), (None, "stall")]


async def test_short_stall_then_replies_normally(session: aiohttp.ClientSession) -> None:
    """A Stall shorter than the client timeout delays a normal reply by its length."""
    async with ChatServer() as server:
        server.script(Stall(0.2))
        status, _, _ = await _post(session, server, "a")
    assert status == 200
    (seen,) = server.requests
    assert seen.finished - seen.started >= 0.2
    assert server.answered == {"a": 1}


async def test_malformed_sends_a_body_that_is_not_a_completion(
    session: aiohttp.ClientSession,
) -> None:
    """Malformed sends a 200 whose body is not JSON; it does not count as answered."""
    async with ChatServer() as server:
        server.script(Malformed(), Malformed('{"choices": []}'))
        status, text, headers = await _post(session, server, "a")
        _, text2, _ = await _post(session, server, "a")
    assert (status, text) == (200, "this is not json")
    assert headers["Content-Type"].startswith("application/json")
    assert text2 == '{"choices": []}'
    assert server.statuses == {"malformed": 2}
    assert server.answered == {}


async def test_prompt_scripts_come_before_global_scripts(session: aiohttp.ClientSession) -> None:
    """Prompt-specific actions go to that prompt first; global ones go to any prompt in order."""
    async with ChatServer() as server:
        server.script(Reply("g1"), Reply("g2"))
        server.script(Reply("for b"), prompt="b")
        texts = []
        for prompt in ["a", "b", "b", "c"]:
            _, text, _ = await _post(session, server, prompt)
            texts.append(json.loads(text)["choices"][0]["message"]["content"])
    assert texts == ["g1", "for b", "g2", "echo: c"]


async def test_faults_are_the_same_per_prompt_and_attempt_whatever_the_order(
    session: aiohttp.ClientSession,
) -> None:
    """The same seed gives each prompt's Nth attempt the same fate, in any arrival order."""
    faults = FaultRates(server_error=0.3, reset=0.2, malformed=0.2, seed=7)
    prompts = [f"p{i}" for i in range(12)]

    async def fates(order: list[str], *, concurrent: bool) -> dict[tuple[str, int], str]:
        async with ChatServer(faults=faults) as server:

            async def attempt(prompt: str) -> None:
                with contextlib.suppress(aiohttp.ClientError):
                    await _post(session, server, prompt)

            for _ in range(3):
                if concurrent:
                    await asyncio.gather(*(attempt(p) for p in order))
                else:
                    for p in order:
                        await attempt(p)
        return {(r.prompt, r.attempt): r.outcome for r in server.requests}

    forward = await fates(prompts, concurrent=False)
    backward = await fates(prompts[::-1], concurrent=True)
    assert forward == backward
    assert {"ok", "500", "reset", "malformed"} <= set(forward.values())
    assert len(forward) == 36


def test_fault_rates_are_checked() -> None:
    """Rates outside [0, 1], or adding up to more than 1, are rejected."""
    with pytest.raises(ValueError, match="sum to at most 1"):
        FaultRates(server_error=0.6, reset=0.6)
    with pytest.raises(ValueError, match="sum to at most 1"):
        FaultRates(stall=-0.1)


async def test_peak_in_flight_counts_concurrent_requests(session: aiohttp.ClientSession) -> None:
    """N concurrent requests under latency are all in flight at once, and none after."""
    # A latency long enough that all 8 arrive within it even on a busy machine.
    async with ChatServer(latency=1.0) as server:
        results = await asyncio.gather(*(_post(session, server, f"p{i}") for i in range(8)))
    assert [status for status, _, _ in results] == [200] * 8
    assert server.peak_in_flight == 8
    assert server.in_flight == 0
    # As the server saw them: concurrent (the last came before the first ended), each held
    # for the latency.
    assert max(r.started for r in server.requests) < min(r.finished for r in server.requests)
    assert all(r.finished - r.started >= 1.0 for r in server.requests)
    assert all(n == 1 for n in server.answered.values())


def test_thread_mode_serves_a_plain_sync_caller() -> None:
    """run_in_thread serves sync code; scripts and counters work across threads."""
    with ChatServer(latency=0.01).run_in_thread() as server:
        server.script(Reply("scripted"), prompt="hi")
        request = urllib.request.Request(
            server.base_url + "/chat/completions",
            data=json.dumps(_body("hi")).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.load(resp)

        async def two_more() -> list[int]:
            async with aiohttp.ClientSession() as s:
                return [(await _post(s, server, p))[0] for p in ["hi", "there"]]

        statuses = asyncio.run(two_more())
    assert body["choices"][0]["message"]["content"] == "scripted"
    assert statuses == [200, 200]
    assert server.answered == {"hi": 2, "there": 1}
    assert server.request_count == 3


def test_thread_mode_stops_promptly_with_a_stalled_request() -> None:
    """Leaving run_in_thread cuts a stalled request instead of waiting for it."""
    errors: list[BaseException] = []

    def call(url: str) -> None:
        request = urllib.request.Request(url, data=json.dumps(_body("a")).encode())
        try:
            urllib.request.urlopen(request, timeout=10)
        except Exception as exc:
            errors.append(exc)

    with ChatServer().run_in_thread() as server:
        server.script(Stall(30))
        caller = threading.Thread(target=call, args=(server.base_url + "/chat/completions",))
        caller.start()
        for _ in range(500):
            if server.in_flight:
                break
            time.sleep(0.01)
        stop_started = time.monotonic()
    # Leaving must not wait out the 30 s stall; a busy machine's stop takes well under half.
    assert time.monotonic() - stop_started < 15
    caller.join(5)
    assert len(errors) == 1  # the caller saw the connection drop, not a reply
    assert server.statuses == {"stall": 1}


async def test_rate_limit_allows_a_burst_then_sends_openai_429s(
    session: aiohttp.ClientSession, limiter_clock: LimiterClock
) -> None:
    """A full bucket admits `burst` requests; the next gets an OpenAI 429 with retry headers."""
    async with ChatServer(rate_limit=RateLimit(1, 3)) as server:
        server.script(Reply("scripted"))
        replies = [await _post(session, server, f"p{i}") for i in range(4)]
    assert [status for status, _, _ in replies] == [200, 200, 200, 429]
    assert [h["x-ratelimit-remaining-requests"] for _, _, h in replies] == ["2", "1", "0", "0"]
    assert {h["x-ratelimit-limit-requests"] for _, _, h in replies} == {"60"}
    assert "x-ratelimit-limit-tokens" not in replies[0][2]
    assert "Retry-After" not in replies[0][2]
    _, text, headers = replies[3]
    error = json.loads(text)["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert error["message"].startswith("Rate limit reached for requests")
    # The limiter's clock stands still: one token refills in a second, all three in 3 s.
    assert headers["retry-after-ms"] == "1000"
    assert headers["Retry-After"] == "1"
    assert headers["x-ratelimit-reset-requests"] == "3s"
    assert server.statuses == {"ok": 3, "429": 1}
    # The turned-away request took no scripted action and no attempt number.
    assert json.loads(replies[0][1])["choices"][0]["message"]["content"] == "scripted"
    assert [r.attempt for r in server.requests] == [0, 0, 0, 0]


async def test_rate_limit_refills_at_the_given_rate(
    session: aiohttp.ClientSession, limiter_clock: LimiterClock
) -> None:
    """After a 429, waiting retry-after-ms gets the request in; the bucket refills over time."""
    async with ChatServer(rate_limit=RateLimit(20, 2)) as server:
        statuses = [(await _post(session, server, "a"))[0] for _ in range(3)]
        _, _, headers = await _post(session, server, "a")
        wait_ms = int(headers["retry-after-ms"])
        assert wait_ms == 50  # one token at 20 a second
        limiter_clock.advance(wait_ms / 1000)
        after_wait, _, _ = await _post(session, server, "a")
        limiter_clock.advance(0.15)  # 3 tokens' worth: the bucket is full again, and no fuller
        _, _, full = await _post(session, server, "a")
    assert statuses == [200, 200, 429]
    assert after_wait == 200
    assert full["x-ratelimit-remaining-requests"] == "1"
    assert server.statuses == {"ok": 4, "429": 2}


async def test_rate_limit_decides_on_arrival_for_concurrent_requests(
    session: aiohttp.ClientSession, limiter_clock: LimiterClock
) -> None:
    """Requests still waiting out their latency hold their tokens: 10 at once, burst 4."""
    # A latency long enough that all 10 arrive within it even on a busy machine.
    async with ChatServer(latency=1.0, rate_limit=RateLimit(0.5, 4)) as server:
        replies = await asyncio.gather(*(_post(session, server, f"p{i}") for i in range(10)))
    assert sorted(status for status, _, _ in replies) == [200] * 4 + [429] * 6
    assert server.peak_in_flight >= 4
    # As the server saw them: the 200s did not wait for each other (all four in flight at
    # once), and the 429s did not wait for the latency (all sent before any 200).
    answered = [r for r in server.requests if r.outcome == "ok"]
    refused = [r for r in server.requests if r.outcome == "429"]
    assert max(r.started for r in answered) < min(r.finished for r in answered)
    assert max(r.finished for r in refused) < min(r.finished for r in answered)
    assert {h["Retry-After"] for s, _, h in replies if s == 429} == {"2"}


async def test_rate_limit_on_tokens_charges_prompt_and_max_tokens(
    session: aiohttp.ClientSession, limiter_clock: LimiterClock
) -> None:
    """With tokens_per_minute, a request costs its prompt estimate plus max_tokens."""
    body = {**_body("a"), "max_tokens": 20}  # "be brief" ~3 tokens + "a" 1 + 20 = 24
    # The limiter's clock stands still, so nothing refills between the requests.
    async with ChatServer(rate_limit=RateLimit(1, 100, tokens_per_minute=60)) as server:
        replies = [await _post(session, server, "a", json=body) for _ in range(3)]
    assert [status for status, _, _ in replies] == [200, 200, 429]
    first = replies[0][2]
    assert (first["x-ratelimit-limit-tokens"], first["x-ratelimit-remaining-tokens"]) == (
        "60",
        "36",
    )
    assert first["x-ratelimit-reset-tokens"] == "24s"
    _, text, headers = replies[2]
    error = json.loads(text)["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert error["message"].startswith("Rate limit reached for tokens")
    # 12 tokens short at one token a second.
    assert headers["retry-after-ms"] == "12000"
    assert headers["Retry-After"] == "12"
    assert headers["x-ratelimit-remaining-requests"] == "98"


async def test_rate_limit_without_retry_after_still_sends_limit_headers(
    session: aiohttp.ClientSession,
) -> None:
    """retry_after=False: 429s carry no retry headers, but the x-ratelimit ones stay."""
    async with ChatServer(rate_limit=RateLimit(1, 1, retry_after=False)) as server:
        await _post(session, server, "a")
        status, _, headers = await _post(session, server, "a")
    assert status == 429
    assert "retry-after-ms" not in headers
    assert "Retry-After" not in headers
    assert headers["x-ratelimit-remaining-requests"] == "0"


def test_rate_limit_is_checked() -> None:
    """A rate or burst that could never admit a request is rejected."""
    with pytest.raises(ValueError, match="requests_per_second"):
        RateLimit(0, 1)
    with pytest.raises(ValueError, match="burst"):
        RateLimit(1, 0)
    with pytest.raises(ValueError, match="tokens_per_minute"):
        RateLimit(1, 1, tokens_per_minute=0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.12, "120ms"),
        (0.0004, "1ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (8.64, "8.64s"),
        (360, "6m0s"),
        (179.56, "2m59.56s"),
        (3600, "1h0m0s"),
    ],
)
def test_reset_headers_use_openais_duration_format(seconds: float, text: str) -> None:
    """x-ratelimit-reset-* values read like OpenAI's: 120ms, 1.5s, 6m0s (rounded up to 1 ms)."""
    assert duration(seconds) == text


async def _two_replies(session: aiohttp.ClientSession, limit: RateLimit) -> Mapping[str, str]:
    """The headers of the second of two requests."""
    async with ChatServer(rate_limit=limit) as server:
        await _post(session, server, "a")
        _, _, headers = await _post(session, server, "a")
    return headers


async def test_rate_headers_speak_each_family(
    session: aiohttp.ClientSession, limiter_clock: LimiterClock
) -> None:
    """Each header family describes the same bucket (2 used of 10, 5/s) in its own words."""
    expected_names = {
        "openai": {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests"},
        "groq": {"x-ratelimit-limit-requests", "x-ratelimit-reset-requests"},
        "openrouter": {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"},
        "ietf": {"RateLimit", "RateLimit-Policy"},
        "ietf-structured": {"RateLimit", "RateLimit-Policy"},
        "azure": {"x-ratelimit-remaining-requests"},
        "anthropic": {
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
        },
        "none": set(),
    }
    seen = {}
    for family in HEADER_FAMILIES:
        headers = await _two_replies(session, RateLimit(5, 10, headers=family))
        assert expected_names[family] <= set(headers), family
        seen[family] = headers
    now = limiter_clock.time()  # the limiter's clock stood still through every request
    assert seen["openai"]["x-ratelimit-limit-requests"] == "300"  # per minute
    assert seen["groq"]["x-ratelimit-limit-requests"] == "432000"  # per day
    assert seen["groq"]["x-ratelimit-remaining-requests"] == "8"
    headers = seen["openrouter"]
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("300", "8")
    full_in = int(headers["X-RateLimit-Reset"]) / 1000 - now  # an epoch in ms: full at
    assert full_in == pytest.approx(0.4, abs=0.002)
    assert seen["ietf"]["RateLimit"] == "limit=300, remaining=8, reset=1"
    assert seen["ietf"]["RateLimit-Policy"] == "300;w=60"
    assert seen["ietf-structured"]["RateLimit"] == '"default";r=8;t=1'
    assert seen["ietf-structured"]["RateLimit-Policy"] == '"default";q=300;w=60'
    assert "x-ratelimit-limit-requests" not in seen["azure"]
    headers = seen["anthropic"]
    assert headers["anthropic-ratelimit-requests-limit"] == "300"  # per minute
    assert headers["anthropic-ratelimit-requests-remaining"] == "8"
    # An RFC 3339 time in whole seconds, rounded up: the bucket is full 0.4 s from now.
    reset = datetime.datetime.fromisoformat(headers["anthropic-ratelimit-requests-reset"])
    assert reset.timestamp() == math.ceil(now + 0.4)
    assert not any("ratelimit" in name.lower() for name in seen["none"])


async def test_a_stated_window_scales_the_limit(session: aiohttp.ClientSession) -> None:
    """window=1 states the same 5/s as 5 per second; IETF says w=1."""
    headers = await _two_replies(session, RateLimit(5, 10, headers="ietf", window=1))
    assert headers["RateLimit-Policy"] == "5;w=1"
    headers = await _two_replies(session, RateLimit(5, 10, window=1))
    assert headers["x-ratelimit-limit-requests"] == "5"
    with pytest.raises(ValueError, match="headers must be one of"):
        RateLimit(1, 1, headers="github")  # type: ignore[arg-type]


async def test_azure_mode_wants_its_key_header_and_api_version(
    session: aiohttp.ClientSession,
) -> None:
    """Azure mode: api-key header (401 without), api-version on deployment URLs (404 without)."""
    body = json.dumps(_body("a")).encode()
    async with ChatServer(azure=True, api_key="az-key") as server:
        deployment = f"{server.azure_endpoint}/openai/deployments/dep-1/chat/completions"
        v1 = f"{server.base_url}/chat/completions"
        assert v1 == f"{server.azure_endpoint}/openai/v1/chat/completions"
        outcomes = []
        for url, headers in [
            (f"{deployment}?api-version=2024-10-21", {"api-key": "az-key"}),
            (deployment, {"api-key": "az-key"}),
            (f"{deployment}?api-version=2024-10-21", {"Authorization": "Bearer az-key"}),
            (f"{deployment}?api-version=2024-10-21", {"api-key": "wrong"}),
            (v1, {"api-key": "az-key"}),
            (v1, {"Authorization": "Bearer az-key"}),
        ]:
            async with session.post(url, data=body, headers=headers) as reply:
                outcomes.append((reply.status, await reply.json()))
    assert [status for status, _ in outcomes] == [200, 404, 401, 401, 200, 200]
    assert outcomes[0][1]["model"] == "dep-1"  # the deployment is the model
    assert "api-version" in outcomes[1][1]["error"]["message"]
    assert "az-key" not in json.dumps(outcomes[3][1])
    assert server.requests[0].query == {"api-version": "2024-10-21"}
    assert server.requests[0].path == "/openai/deployments/dep-1/chat/completions"
