"""The engine without pandas: concurrency, retries, timeouts, fail-fast, bounded memory."""

from __future__ import annotations

from collections.abc import Iterator
from operator import attrgetter

import pytest

import nbtoolkit
from nbtoolkit import ChatConfig, ChatRequest, ChatRun, RetryPolicy, Timeouts
from nbtoolkit.core._breaker import REFUSALS_TO_STOP
from nbtoolkit.core._engine import _LOOKUP_BATCH
from nbtoolkit.core.endpoints._embeddings import EmbeddingEndpoint
from nbtoolkit.testing import ChatServer, FaultRates, Malformed, Reset, Stall, Status
from tests.conftest import FAST_RETRY, MODEL


def config(server: ChatServer, **overrides: object) -> ChatConfig:
    values: dict[str, object] = {
        "base_url": server.base_url,
        "model": MODEL,
        "retry": FAST_RETRY,
        "progress": False,
    }
    values.update(overrides)
    return ChatConfig(**values)  # type: ignore[arg-type]


by_arrival = attrgetter("started")  # sorts a server's records by when they came in


def requests(n: int, prefix: str = "p") -> list[ChatRequest]:
    return [ChatRequest(({"role": "user", "content": f"{prefix}{i}"},)) for i in range(n)]


async def test_never_more_than_max_parallel_in_flight() -> None:
    """The server never sees more than max_parallel requests at once, and sees that many."""
    async with ChatServer(latency=0.02) as server:
        results = await ChatRun(config(server, max_parallel=7)).execute(requests(100))
    assert server.peak_in_flight == 7
    assert [r.text for r in results] == [f"echo: p{i}" for i in range(100)]


async def test_requests_are_pulled_lazily() -> None:
    """The producer stays a bounded distance ahead of the workers, whatever the row count."""
    pulled = 0
    ahead: list[int] = []

    def generate() -> Iterator[ChatRequest]:
        nonlocal pulled
        for request in requests(300):
            ahead.append(pulled - server.request_count)
            pulled += 1
            yield request

    async with ChatServer(latency=0.005) as server:
        await ChatRun(config(server, max_parallel=4)).execute(generate())
    # One cache-lookup batch + 2 * max_parallel queued + max_parallel in the workers' hands.
    assert max(ahead) <= _LOOKUP_BATCH + 3 * 4 + 1


async def test_retry_after_is_honoured() -> None:
    """A 429 with Retry-After: 0.3 is retried no sooner than 0.3 s later."""
    async with ChatServer() as server:
        server.script(Status(429, retry_after=0.3), prompt="p0")
        results = await ChatRun(config(server)).execute(requests(1))
    first, second = server.requests
    assert second.started - first.finished >= 0.3
    assert results[0].text == "echo: p0" and results[0].attempts == 2


async def test_retry_after_ms_wins_over_backoff() -> None:
    """retry-after-ms is read, and beats a long computed backoff."""
    slow_backoff = RetryPolicy(attempts=3, wait_initial=3600.0, wait_max=3600.0, jitter=0)
    async with ChatServer() as server:
        server.script(Status(503, retry_after_ms=150), prompt="p0")
        results = await ChatRun(config(server, retry=slow_backoff)).execute(requests(1))
    first, second = server.requests
    assert second.started - first.finished >= 0.15
    # The hour's backoff was not used. A bound, not a benchmark: 60 s is any busy
    # machine's 0.15 s, and a sixtieth of what it guards against (the test would hang).
    assert second.started - first.finished < 60
    assert results[0].ok


async def test_a_wait_longer_than_the_ceiling_fails_the_row() -> None:
    """A Retry-After past retry_after_max fails the row now, with the server's words kept."""
    policy = RetryPolicy(attempts=5, retry_after_max=1.0)
    async with ChatServer() as server:
        server.script(Status(429, retry_after=3600), prompt="p0")
        results = await ChatRun(config(server, retry=policy)).execute(requests(2))
    assert results[0].error is not None and results[0].error.kind == "RateLimitError"
    assert results[0].attempts == 1
    assert results[1].ok


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        (Status(500), "ServerError"),
        (Status(502), "ServerError"),
        (Status(408), "ServerError"),
        (Status(409), "ServerError"),
        (Status(429), "RateLimitError"),
        (Reset(), "TransportError"),
        (Malformed(), "MalformedResponse"),
        (Malformed('{"choices": []}'), "MalformedResponse"),
    ],
)
async def test_passing_failures_are_retried(action: object, kind: str) -> None:
    """408/409/429/5xx, resets and malformed 200s are retried until they succeed or run out."""
    async with ChatServer() as server:
        server.script(action, action, prompt="p0")  # type: ignore[arg-type]
        server.script(*[action] * 10, prompt="p1")  # type: ignore[arg-type]
        ok, failed = await ChatRun(config(server)).execute(requests(2))
    assert ok.text == "echo: p0" and ok.attempts == 3
    assert failed.text is None and failed.error is not None
    assert failed.error.kind == kind and failed.attempts == FAST_RETRY.attempts
    assert server.answered["p1"] == 0


@pytest.mark.parametrize("code", [400, 413, 422])
async def test_other_4xx_are_not_retried(code: int) -> None:
    """A 400-class error other than 401/403/404/408/409/429 fails its row after one try."""
    async with ChatServer() as server:
        server.script(Status(code), prompt="p1")
        results = await ChatRun(config(server)).execute(requests(3))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error is not None and results[1].error.status == code
    assert sum(1 for r in server.requests if r.prompt == "p1") == 1


async def test_a_stalled_connection_is_cut_and_retried() -> None:
    """A reply that never comes is cut at the total timeout and tried again."""
    async with ChatServer() as server:
        server.script(Stall(30), prompt="p0")
        run = ChatRun(config(server, timeouts=Timeouts(total=0.3)))
        results = await run.execute(requests(2))
    stalled, retried = sorted((r for r in server.requests if r.prompt == "p0"), key=by_arrival)
    assert stalled.outcome == "stall"
    # As the server saw it: the retry came once the timeout cut the stall, not after the
    # stall's 30 s. The bound is half of what it guards against, for a busy machine. No
    # lower bound: the client's 0.3 s starts before the server's record (the connect), so
    # the gap the server sees can be a little shorter.
    assert retried.started - stalled.started < 15
    assert results[0].ok and results[0].attempts == 2
    assert run.stats.statuses["RequestTimeout"] == 1


async def test_bad_key_stops_the_run_within_one_pool() -> None:
    """A 401 stops the run with RunAborted after at most max_parallel requests."""
    async with ChatServer(api_key="sk-right-0000", latency=0.01) as server:
        run = ChatRun(config(server, api_key="sk-wrong-1111", max_parallel=4))
        with pytest.raises(nbtoolkit.RunAborted, match="check the API key") as caught:
            await run.execute(requests(500))
    assert server.request_count <= 4
    assert isinstance(caught.value.cause, nbtoolkit.AuthError)
    partial = caught.value.partial
    assert all(r is not None and r.text is None for r in partial)


async def test_wrong_model_stops_the_run() -> None:
    """A 404 for the model stops the run and says to check base_url and model."""
    async with ChatServer(model_names=["real-model"]) as server:
        with pytest.raises(nbtoolkit.RunAborted, match=r"check base_url .* and the model name"):
            await ChatRun(config(server, max_parallel=3)).execute(requests(100))
    assert server.request_count <= 3


async def test_insufficient_quota_stops_the_run() -> None:
    """A 429 whose body says insufficient_quota stops the run at once, without retrying."""
    async with ChatServer(latency=0.01) as server:
        server.script(Status(429, error_code="insufficient_quota"))
        with pytest.raises(nbtoolkit.RunAborted, match="quota") as caught:
            await ChatRun(config(server, max_parallel=2)).execute(requests(50))
    assert server.request_count <= 3
    assert caught.value.partial is not None


async def test_rows_that_finished_before_an_abort_are_kept() -> None:
    """Rows answered before the systemic failure keep their answers in .partial."""
    async with ChatServer() as server:
        run = ChatRun(config(server, max_parallel=1))
        server.script(*[nbtoolkit.testing.Reply()] * 3, Status(401))  # type: ignore[attr-defined]
        with pytest.raises(nbtoolkit.RunAborted) as caught:
            await run.execute(requests(10))
    texts = [r.text for r in caught.value.partial]
    assert texts[:3] == ["echo: p0", "echo: p1", "echo: p2"]
    assert set(texts[3:]) == {None}
    assert caught.value.partial[5].error.kind == "not_run"


async def test_an_unreachable_server_stops_the_run() -> None:
    """Connection refused on every row stops the run after a pool's worth, not 1,000 rows."""
    async with ChatServer() as server:
        dead_url = server.base_url
    dead = ChatConfig(base_url=dead_url, model=MODEL, max_parallel=4, retry=FAST_RETRY)
    run = ChatRun(dead)
    with pytest.raises(nbtoolkit.RunAborted, match="could not be reached"):
        await run.execute(requests(1000))
    # Counted, not timed: at most each of the pool's rows ran out of its attempts.
    assert run.stats.requests_sent <= 4 * FAST_RETRY.attempts


async def test_faults_mix_every_row_correct_once() -> None:
    """With random 5xx, resets and malformed bodies, every row ends right and answered once."""
    faults = FaultRates(server_error=0.1, reset=0.05, malformed=0.05, seed=3)
    policy = RetryPolicy(attempts=8, wait_initial=0.001, wait_max=0.01, jitter=0.001)
    async with ChatServer(faults=faults) as server:
        results = await ChatRun(config(server, retry=policy, max_parallel=16)).execute(
            requests(300)
        )
    assert [r.text for r in results] == [f"echo: p{i}" for i in range(300)]
    assert max(server.answered.values()) == 1
    assert sum(r.attempts for r in results) == server.request_count


async def test_no_request_is_sent_for_none() -> None:
    """None in the request stream is a skipped row, with no request."""
    async with ChatServer() as server:
        results = await ChatRun(config(server)).execute([None, *requests(1), None])
    assert [r.error.kind if r.error else "ok" for r in results] == ["skipped", "ok", "skipped"]
    assert server.request_count == 1


async def test_usage_is_recorded_per_row() -> None:
    """Token usage from the reply is kept on each row's result."""
    async with ChatServer() as server:
        (result,) = await ChatRun(config(server)).execute(requests(1))
    assert result.prompt_tokens is not None and result.prompt_tokens > 0
    assert result.completion_tokens is not None and result.completion_tokens > 0


async def test_a_slow_live_server_is_not_called_unreachable() -> None:
    """Total timeouts on every row fail those rows; the run is not stopped as 'unreachable'."""
    async with ChatServer(latency=1.0) as server:
        fast_fail = RetryPolicy(attempts=1)
        run = ChatRun(config(server, max_parallel=2, retry=fast_fail, timeouts=Timeouts(total=0.1)))
        results = await run.execute(requests(6))
    assert {r.error.kind for r in results if r.error} == {"RequestTimeout"}
    assert all(not r.ok for r in results)


async def test_a_400_on_every_row_stops_the_chat_run() -> None:
    """The same 400 for every row stops the run after at most K + max_parallel requests,
    with the server's words and the parameter they name."""
    refusal = Status(400, message="Unrecognized request argument supplied: top_k")
    async with ChatServer(latency=0.01) as server:
        server.script(*[refusal] * 200)
        run = ChatRun(config(server, max_parallel=8, params={"top_k": 5}))
        with pytest.raises(nbtoolkit.RunAborted) as caught:
            await run.execute(requests(200))
    assert server.request_count <= REFUSALS_TO_STOP + 8
    # Refused, or dropped when the stop cancelled them in flight; never answered.
    assert server.statuses["400"] >= REFUSALS_TO_STOP
    assert set(server.statuses) <= {"400", "dropped"}
    message = str(caught.value)
    assert "Unrecognized request argument supplied: top_k" in message
    assert "parameter: 'top_k'" in message
    assert isinstance(caught.value.cause, nbtoolkit.BadRequestError)
    refused = [r for r in caught.value.partial if r is not None and r.error.kind != "not_run"]
    assert len(refused) >= REFUSALS_TO_STOP


async def test_a_400_on_every_input_stops_the_embeddings_run() -> None:
    """Embeddings refused for a parameter: no halving down to single inputs; at most
    K + max_parallel requests, then RunAborted naming the parameter."""
    refusal = Status(400, message="This model does not support specifying dimensions.")
    texts = [f"text number {i}" for i in range(400)]
    async with ChatServer(latency=0.01) as server:
        server.script(*[refusal] * 400)
        endpoint = EmbeddingEndpoint(model=MODEL, dimensions=8, batch_size=20)
        run = ChatRun(config(server, max_parallel=4), endpoint=endpoint)
        with pytest.raises(nbtoolkit.RunAborted) as caught:
            await run.execute(texts)
    assert server.request_count <= REFUSALS_TO_STOP + 4
    message = str(caught.value)
    assert "does not support specifying dimensions" in message
    assert "parameter: 'dimensions'" in message
    # What the server was sent: whole groups, then single-row probes; nothing in between.
    sizes = {len(r.body["input"]) for r in server.requests}
    assert sizes <= {20, 1}


async def test_a_single_group_refused_whole_stops_after_a_few_probes() -> None:
    """A run of one group, every input refused alike: K requests (the group, then single
    rows), not the 2n - 1 of a halving search."""
    refusal = Status(400, message="This model does not support specifying dimensions.")
    async with ChatServer() as server:
        server.script(*[refusal] * 100)
        endpoint = EmbeddingEndpoint(model=MODEL, dimensions=8)
        run = ChatRun(config(server, max_parallel=4), endpoint=endpoint)
        with pytest.raises(nbtoolkit.RunAborted):
            await run.execute([f"text {i}" for i in range(100)])
    assert server.request_count == REFUSALS_TO_STOP
    assert [len(r.body["input"]) for r in server.requests] == [100, 1, 1]


async def test_a_400_some_rows_get_fails_only_those_rows() -> None:
    """Three rows refused with the same words, after other rows were answered: only they
    fail, and the run goes on to the end."""
    refusal = Status(400, message="Your request was rejected by the safety system.")
    async with ChatServer(latency=0.01) as server:
        for bad in ("p10", "p20", "p30", "p31", "p32"):
            server.script(refusal, prompt=bad)
        results = await ChatRun(config(server, max_parallel=4)).execute(requests(60))
    failed = [i for i, r in enumerate(results) if not r.ok]
    assert failed == [10, 20, 30, 31, 32]
    assert all(results[i].error.status == 400 for i in failed)
    assert server.request_count == 60


async def test_bad_inputs_in_the_first_groups_do_not_stop_an_embeddings_run() -> None:
    """The first three groups each refused alike for one bad input, before any answer: a
    row sent alone is answered, so the run goes on and only the bad inputs fail."""
    texts = [f"text {i}" if i % 10 else f"<reject> text {i}" for i in range(30)]
    texts += [f"fine text {i}" for i in range(70)]
    async with ChatServer() as server:
        endpoint = EmbeddingEndpoint(model=MODEL, batch_size=10)
        run = ChatRun(config(server, max_parallel=1), endpoint=endpoint)
        results = await run.execute(texts)
        first_three = [len(r.body["input"]) for r in server.requests[:4]]
    assert first_three == [10, 10, 10, 1]  # three groups refused alike, then a probe
    assert [i for i, r in enumerate(results) if not r.ok] == [0, 10, 20]
    assert all(r.value is not None for r in results[30:])


async def test_a_refused_pair_is_probed_row_by_row_once() -> None:
    """A group of two refused before any answer, each row then refused for its own reason:
    each row is sent alone once, both fail with their own words, and the run ends."""
    async with ChatServer() as server:
        server.script(Status(400, message="bad A"), Status(400, message="bad A"), prompt="t0")
        server.script(Status(400, message="bad B"), prompt="t1")
        endpoint = EmbeddingEndpoint(model=MODEL, batch_size=2)
        results = await ChatRun(config(server), endpoint=endpoint).execute(["t0", "t1"])
    assert [len(r.body["input"]) for r in server.requests] == [2, 1, 1]
    assert [r.error.message for r in results] == ["HTTP 400: bad A", "HTTP 400: bad B"]


async def test_after_answers_a_group_refused_whole_is_not_halved_to_single_rows() -> None:
    """Groups answered, then every request refused alike: each refused group costs five
    requests (itself, its halves, a row of each alone), not the 2n - 1 of a halving search,
    and its rows fail with the server's words."""
    refusal = Status(400, message="The deployment is not available for embeddings.")
    texts = [f"text {i}" for i in range(640)]
    async with ChatServer() as server:
        server.script(nbtoolkit.testing.Reply(), nbtoolkit.testing.Reply(), *[refusal] * 1000)
        endpoint = EmbeddingEndpoint(model=MODEL, batch_size=64)
        results = await ChatRun(config(server, max_parallel=1), endpoint=endpoint).execute(texts)
        sizes = [len(r.body["input"]) for r in server.requests]
    assert sizes[:2] == [64, 64]
    assert sizes[2:7] == [64, 32, 32, 1, 1]
    assert len(sizes) == 2 + 8 * 5
    assert all(r.ok for r in results[:128])
    assert {r.error.message for r in results[128:]} == {f"HTTP 400: {refusal.message}"}


def test_a_cache_hit_is_the_result_the_dataclass_would_make() -> None:
    """`cache_hit` sets the slots itself for speed: the result is the very one
    RowResult(...) makes, equal, with the same hash, and every field there."""
    from dataclasses import fields

    from nbtoolkit.core._rows import RowResult, cache_hit

    made = cache_hit("t", 1, 2, None, ["v"])
    expected = RowResult("t", None, 0, 1, 2, None, "cache", ["v"], None)
    assert [getattr(made, f.name) for f in fields(RowResult)] == [
        getattr(expected, f.name) for f in fields(RowResult)
    ]
    assert made == expected
