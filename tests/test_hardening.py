"""A run at 100,000 rows: budgets that spend what they promise, a breaker for outages, and
no single row, parameter or template that can sink a run."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import pytest
from aiohttp import ClientSession, web

import nbtoolkit
from nbtoolkit import ChatConfig, ChatRequest, ChatRun, ConfigError, RetryPolicy, Timeouts
from nbtoolkit.testing import ChatServer, CompletionLengths, FaultRates, Malformed, RateLimit, Stall
from tests.conftest import FAST_RETRY, MODEL, settings


def chat(server: ChatServer, **overrides: object) -> ChatConfig:
    values: dict[str, object] = {
        "base_url": server.base_url,
        "model": MODEL,
        "retry": FAST_RETRY,
        "progress": False,
        "cache": False,
    }
    values.update(overrides)
    return ChatConfig(**values)  # type: ignore[arg-type]


def asks(n: int, prefix: str = "review number ") -> list[ChatRequest]:
    return [ChatRequest(({"role": "user", "content": f"{prefix}{i}"},)) for i in range(n)]


async def test_a_wide_pool_spends_the_budget_and_never_passes_it() -> None:
    """32 workers and a 600-token budget: rows wait for refunds; the budget is nearly spent."""
    async with ChatServer(latency=0.04) as server:
        config = chat(server, max_parallel=32, max_tokens_total=600, params={"max_tokens": 16})
        run = ChatRun(config)
        results = await run.execute(asks(200))
    answered = [r for r in results if r.ok]
    spent = run.budget.tokens
    worst_case = max(
        run.endpoint.item(0, request).prompt_tokens + 16 for request in asks(200)
    )  # what one more request reserves
    assert spent <= 600
    assert spent > 600 - 2 * worst_case  # refused only when nothing in flight could free enough
    assert {r.error.kind for r in results if not r.ok} == {"over_budget"}
    assert len(answered) == sum(server.answered.values())
    assert len(answered) >= 28  # the issue measured 18 where about 31 fit


async def test_a_reply_without_usage_is_charged_its_reservation() -> None:
    """A budget stays hard when the server reports no usage: the worst case is charged."""
    async with ChatServer() as server:
        no_usage = '{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}'
        server.script(Malformed(status=200, body=no_usage))
        run = ChatRun(chat(server, max_tokens_total=10_000, params={"max_tokens": 50}))
        (result,) = await run.execute(asks(1))
    assert result.text == "hi"
    item = run.endpoint.item(0, asks(1)[0])
    assert run.budget.tokens == round(item.prompt_tokens) + 50


async def test_a_server_that_dies_mid_run_stops_it_within_seconds() -> None:
    """After answers came back, a server gone for good trips the breaker: answered rows kept."""
    patient = RetryPolicy(attempts=6, wait_initial=0.5, wait_max=8.0)  # the default's shape
    server = ChatServer(latency=0.01)
    await server.start()
    run = ChatRun(chat(server, max_parallel=8, retry=patient))
    task = asyncio.ensure_future(run.execute(asks(2_000)))
    while sum(server.answered.values()) < 100:  # noqa: ASYNC110 (the server's counter, polled)
        await asyncio.sleep(0.005)
    await server.stop()
    sent_before = run.stats.requests_sent
    with pytest.raises(nbtoolkit.RunAborted, match="stopped answering") as caught:
        await asyncio.wait_for(task, 60)  # a hang guard: without the breaker, hours of retries
    # Counted, not timed: the breaker stops the pool's rows within their retries, before
    # any of the other ~1,900 rows is tried (6 attempts each, at 0.5-8 s apart).
    assert run.stats.requests_sent - sent_before <= 8 * patient.attempts
    partial = caught.value.partial
    assert sum(1 for r in partial if r.ok) >= 100
    kinds = {r.error.kind for r in partial if not r.ok}
    assert "not_run" in kinds
    assert kinds <= {"not_run", "cancelled", "TransportError"}


async def test_a_few_resets_among_successes_do_not_trip_the_breaker() -> None:
    """A blip is retried row by row; the run finishes with every row answered."""
    async with ChatServer(faults=FaultRates(reset=0.05, seed=3)) as server:
        results = await ChatRun(chat(server, max_parallel=8)).execute(asks(400))
    assert all(r.ok for r in results)
    assert server.statuses["reset"] > 5


async def test_a_row_that_cannot_be_encoded_fails_alone() -> None:
    """A lone surrogate in one row fails that row with its reason; the others are answered."""
    requests = asks(20)
    requests[7] = ChatRequest(({"role": "user", "content": "bad \ud800 text"},))
    async with ChatServer() as server:
        results = await ChatRun(chat(server)).execute(requests)
    assert [r.ok for r in results].count(False) == 1
    assert results[7].error is not None and results[7].error.kind == "UnsendableRow"
    assert server.request_count == 19


def test_numpy_parameters_are_sent_as_plain_numbers(server: ChatServer) -> None:
    """seed=np.int64(1), temperature=np.float32(0.5) go out as JSON numbers."""
    df = pd.DataFrame({"review": ["a", "b"]})
    out = df.chat.complete(
        "review", seed=np.int64(1), temperature=np.float32(0.5), **settings(server)
    )
    assert out["response"].notna().all()
    assert {r.body["seed"] for r in server.requests} == {1}
    assert {r.body["temperature"] for r in server.requests} == {0.5}


def test_a_parameter_json_cannot_carry_is_refused_before_sending(server: ChatServer) -> None:
    """A set in the params is a ConfigError before the first request, not a crash mid-run."""
    df = pd.DataFrame({"review": ["a", "b"]})
    with pytest.raises(ConfigError, match="cannot be sent as JSON"):
        df.chat.complete("review", stop={"x", "y"}, **settings(server))
    assert server.request_count == 0


def test_the_bad_row_is_in_last_run_and_the_rest_in_the_output(server: ChatServer) -> None:
    """Through the accessor: the partial output and last_run() both survive a bad row."""
    # object dtype: pandas' arrow-backed strings cannot even hold a lone surrogate.
    texts = pd.Series(["fine", "bad \ud800", "also fine"], index=[5, 5, 9], dtype=object)
    df = pd.DataFrame({"review": texts})
    out = df.chat.complete("review", **settings(server))
    assert out["response"].tolist() == ["echo: fine", None, "echo: also fine"]
    report = nbtoolkit.last_run()
    assert report is not None
    assert report.errors["error_kind"].tolist() == ["UnsendableRow"]


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("max_paralel", "max_parallel"), ("max_token_total", "max_tokens_total"), ("sytem", "system")],
)
def test_a_misspelt_option_is_refused_with_the_right_name(
    server: ChatServer, typo: str, meant: str
) -> None:
    """A keyword close to one of our options is a ConfigError naming it; nothing is sent."""
    df = pd.DataFrame({"review": ["a"]})
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        df.chat.complete("review", **{typo: 4}, **settings(server))
    assert server.request_count == 0


def test_stream_true_is_refused(server: ChatServer) -> None:
    """nbtoolkit reads whole answers: stream=True is a ConfigError, nothing sent."""
    with pytest.raises(ConfigError, match="stream"):
        pd.DataFrame({"review": ["a"]}).chat.complete("review", stream=True, **settings(server))
    assert server.request_count == 0


def test_provider_parameters_pass_through(server: ChatServer) -> None:
    """top_k, min_p, repeat_penalty are not ours: they go into the body as they are."""
    df = pd.DataFrame({"review": ["a"]})
    df.chat.complete("review", top_k=40, min_p=0.05, repeat_penalty=1.1, **settings(server))
    (request,) = server.requests
    assert (request.body["top_k"], request.body["min_p"], request.body["repeat_penalty"]) == (
        40,
        0.05,
        1.1,
    )


def test_a_format_spec_works_on_the_raw_value(server: ChatServer) -> None:
    """{price:.2f} formats the number, not its string."""
    df = pd.DataFrame({"item": ["tea", "cake"], "price": [1.5, 12.0]})
    out = df.chat.complete(template="{item} costs {price:.2f}", **settings(server))
    assert out["response"].tolist() == ["echo: tea costs 1.50", "echo: cake costs 12.00"]


def test_a_template_that_cannot_format_a_value_names_the_field(server: ChatServer) -> None:
    """{price:d} on a float is a ConfigError naming the field, never a bare ValueError."""
    df = pd.DataFrame({"price": [1.5]})
    with pytest.raises(ConfigError, match=r"\{price:d\}"):
        df.chat.complete(template="{price:d}", **settings(server))
    assert server.request_count == 0


async def test_a_run_executes_once() -> None:
    """A second execute() is refused: results and stats belong to one run."""
    async with ChatServer() as server:
        run = ChatRun(chat(server))
        await run.execute(asks(1))
        with pytest.raises(RuntimeError, match="runs once"):
            await run.execute(asks(1))


def test_a_report_compares_by_identity(server: ChatServer) -> None:
    """RunReport has no generated __eq__ over DataFrames: == is identity, hash works."""
    pd.DataFrame({"review": ["a"]}).chat.complete("review", **settings(server))
    report = nbtoolkit.last_run()
    assert report is not None
    assert report == report and hash(report) == hash(report)


async def _forward_proxy(upstream: str, seen: list[str]) -> web.AppRunner:
    """A plain HTTP forward proxy on 127.0.0.1 that sends everything to ``upstream``."""

    async def forward(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        async with (
            ClientSession() as session,
            session.request(
                request.method,
                upstream + request.rel_url.path_qs,
                data=await request.read(),
                headers={"Content-Type": "application/json"},
            ) as reply,
        ):
            return web.Response(
                status=reply.status, body=await reply.read(), content_type="application/json"
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_requests_go_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY is honoured (as the openai SDK does); a loopback base_url skips it."""
    seen: list[str] = []
    async with ChatServer() as server:
        upstream = f"http://127.0.0.1:{server.port}"
        runner = await _forward_proxy(upstream, seen)
        try:
            port = runner.addresses[0][1]
            monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
            # A name only the proxy knows how to reach: nothing here resolves it.
            remote = chat(server, base_url="http://api.example.test/v1")
            results = await ChatRun(remote).execute(asks(3))
            assert all(r.ok for r in results)
            assert len(seen) == 3 and all("api.example.test" in url for url in seen)
            local = await ChatRun(chat(server)).execute(asks(2, "local "))
            assert all(r.ok for r in local)
            assert len(seen) == 3  # loopback traffic never went through the proxy
        finally:
            await runner.cleanup()


def test_the_report_says_what_limits_the_server_announced() -> None:
    """last_run().stats.limits: the rate learned from the headers, its window and family."""
    limit = RateLimit(50, 50, headers="ietf", window=1.0)
    with ChatServer(rate_limit=limit).run_in_thread() as server:
        pd.DataFrame({"review": [f"r{i}" for i in range(20)]}).chat.complete(
            "review", **settings(server)
        )
    report = nbtoolkit.last_run()
    assert report is not None
    learned = report.stats.limits["requests"]
    assert learned["headers"] == "ietf"
    assert learned["window_seconds"] == 1.0
    assert 45 <= learned["rate_per_second"] <= 55


async def test_the_over_budget_reason_names_the_limit_that_refused() -> None:
    """With both limits set, rows refused by max_tokens_total say max_tokens_total, not
    max_cost (which was far from reached)."""
    async with ChatServer() as server:
        config = chat(
            server,
            max_parallel=1,
            prices={MODEL: (1.0, 1.0)},
            max_cost=1_000.0,
            max_tokens_total=60,
            params={"max_tokens": 10},
        )
        results = await ChatRun(config).execute(asks(20))
    refused = [r.error.message for r in results if r.error is not None]
    assert refused and len(refused) + server.request_count == 20
    assert all(message.startswith("max_tokens_total=60 reached") for message in refused)


async def test_a_budget_holds_without_max_tokens_against_long_answers() -> None:
    """No max_tokens, 2,000-token answers, 32 in flight: the budget reserves the model's
    output ceiling, so the tokens the server billed never pass max_tokens_total."""
    lengths = CompletionLengths(median=2_000, sigma=0.0)
    async with ChatServer(latency=0.02, lengths=lengths) as server:
        run = ChatRun(chat(server, max_parallel=32, max_tokens_total=60_000))
        results = await run.execute(asks(200))
        ok = [r for r in results if r.ok]
    billed = sum(r.prompt_tokens + r.completion_tokens for r in ok)
    assert server.answered.total() == len(ok) > 0
    assert all(r.completion_tokens == 2_000 for r in ok)  # what the server answered
    assert billed == run.budget.tokens <= 60_000
    assert {r.error.kind for r in results if not r.ok} == {"over_budget"}
    assert run.stats.budget_note is not None and "16,384 completion tokens" in run.stats.budget_note


async def test_a_timed_out_request_is_charged_its_reservation() -> None:
    """A request that timed out may still be billed: the budget charges its worst case."""
    async with ChatServer() as server:
        server.script(Stall(5.0), prompt="review number 0")
        config = chat(
            server,
            max_tokens_total=10_000,
            params={"max_tokens": 50},
            timeouts=Timeouts(total=0.2),
            retry=RetryPolicy(attempts=1),
        )
        run = ChatRun(config)
        (result,) = await run.execute(asks(1))
    assert result.error is not None and result.error.kind == "RequestTimeout"
    prompt = run.endpoint.item(0, asks(1)[0]).prompt_tokens
    assert run.budget.tokens == round(prompt) + 50
    assert run.stats.charged_unconfirmed == run.budget.tokens
    assert server.statuses["dropped"] + server.statuses["stall"] == 1


def test_the_summary_states_what_the_budget_assumed(server: ChatServer) -> None:
    """Without max_tokens, the run's summary says how many completion tokens a request was
    assumed to use at most, and why; with max_tokens it says nothing of it."""
    df = pd.DataFrame({"review": ["a", "b", "c"]})
    df.chat.complete("review", max_tokens_total=100_000, **settings(server, cache=False))
    report = nbtoolkit.last_run()
    assert report is not None
    assert (
        "a request without max_tokens reserved up to 16,384 completion tokens "
        "(test-model: not in the table of output limits: an assumption)"
    ) in report.summary()
    df.chat.complete(
        "review", max_tokens=20, max_tokens_total=100_000, **settings(server, cache=False)
    )
    assert "reserved up to" not in nbtoolkit.last_run().summary()  # type: ignore[union-attr]


async def test_a_budget_below_the_ceiling_says_to_set_max_tokens() -> None:
    """A budget smaller than one request's worst case without max_tokens sends nothing,
    and each row says why and what to do."""
    async with ChatServer() as server:
        run = ChatRun(chat(server, max_tokens_total=5_000))
        results = await run.execute(asks(3))
    assert server.request_count == 0
    for result in results:
        assert result.error is not None and result.error.kind == "over_budget"
        assert result.error.message.startswith("max_tokens_total=5000 reached (spent 0)")
        assert "reserves up to 16,384 completion tokens" in result.error.message
        assert "set max_tokens" in result.error.message


async def test_a_reply_longer_than_the_assumed_ceiling_raises_it() -> None:
    """A model not in the table answering 20,000 tokens: after its first reply, requests
    without max_tokens reserve 20,000, and the summary says the ceiling was seen."""
    lengths = CompletionLengths(median=20_000, sigma=0.0)
    async with ChatServer(lengths=lengths) as server:
        run = ChatRun(chat(server, max_parallel=1, max_tokens_total=100_000))
        results = await run.execute(asks(10))
    answered = [r for r in results if r.ok]
    assert run.ceiling.tokens == 20_000 and run.ceiling.source == "seen"
    assert run.stats.budget_note is not None and "the longest reply" in run.stats.budget_note
    # Four fit at 20,000 each; a fifth would pass 100,000 with its prompt.
    assert len(answered) == server.answered.total() == 4
    assert run.budget.tokens <= 100_000
