"""Anthropic's Messages API and the Gemini API as endpoints on the engine, against their test
servers: the request each row becomes, what each reply means for its row, each provider's
errors, rate headers, prompt cache and quota words."""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
import pydantic
import pytest

import nbtoolkit
from nbtoolkit import ChatConfig, ChatRequest, ChatRun, ConfigError, RunAborted
from nbtoolkit.core.endpoints._gemini_schema import gemini_schema
from nbtoolkit.core.endpoints._schema import normalise
from nbtoolkit.testing import (
    AnthropicServer,
    ChatServer,
    FaultRates,
    GeminiServer,
    RateLimit,
    Status,
    StructuredFaults,
    expected_vector,
)

ANTHROPIC_KEY = "sk-ant-SENTINEL-9d02e71c55"
GEMINI_KEY = "gm-SENTINEL-4b8817aa03"
WRONG_KEY = "wrong-key-SENTINEL-000111"
CLAUDE = "claude-sonnet-4-5"
GEMINI = "gemini-2.5-flash"
# Many attempts: with 7% faults per attempt, 1,000 rows must all get through in every run.
PATIENT = nbtoolkit.RetryPolicy(attempts=10, wait_initial=0.01, wait_max=0.05, jitter=0.5)


def rows(n: int, system: str | None = None) -> list[ChatRequest]:
    first = ({"role": "system", "content": system},) if system else ()
    return [ChatRequest((*first, {"role": "user", "content": f"p{i}"})) for i in range(n)]


def anthropic_config(server: AnthropicServer, **changes: object) -> ChatConfig:
    base = ChatConfig(
        provider="anthropic",
        base_url=server.base_url,
        api_key=ANTHROPIC_KEY,
        model=CLAUDE,
        cache=False,
        progress=False,
        retry=PATIENT,
    )
    return nbtoolkit.config.merge(base, **changes)


def gemini_config(server: GeminiServer, **changes: object) -> ChatConfig:
    base = ChatConfig(
        provider="gemini",
        base_url=server.base_url,
        api_key=GEMINI_KEY,
        model=GEMINI,
        cache=False,
        progress=False,
        retry=PATIENT,
    )
    return nbtoolkit.config.merge(base, **changes)


def folder_bytes(folder: pathlib.Path) -> bytes:
    """Every file in ``folder`` (the cache and its journal), concatenated."""
    return b"".join(path.read_bytes() for path in folder.iterdir() if path.is_file())


class Ticket(pydantic.BaseModel):
    topic: str
    urgency: int = pydantic.Field(ge=1, le=5)
    category: str = pydantic.Field(json_schema_extra={"enum": ["billing", "bug", "other"]})
    tags: list[str]
    note: str | None = None


# Anthropic


async def test_anthropic_request_is_a_messages_request() -> None:
    """A row becomes /v1/messages with x-api-key, anthropic-version, a top-level system, the
    default max_tokens and the mapped stop/temperature/top_p/top_k; the answer is its text."""
    async with AnthropicServer(api_key=ANTHROPIC_KEY) as server:
        config = anthropic_config(
            server, params={"stop": "END", "temperature": 0.2, "top_p": 0.9, "top_k": 5}
        )
        results = await ChatRun(config).execute(rows(3, system="Be brief."))
    assert [r.text for r in results] == ["echo: p0", "echo: p1", "echo: p2"]
    seen = server.requests[0]
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in seen.headers
    assert seen.body["system"] == "Be brief."
    assert seen.body["messages"] == [{"role": "user", "content": "p0"}]
    assert seen.body["max_tokens"] == 1024
    assert seen.body["stop_sequences"] == ["END"]
    assert (seen.body["temperature"], seen.body["top_p"], seen.body["top_k"]) == (0.2, 0.9, 5)
    assert "stop" not in seen.body


async def test_anthropic_refusal_and_max_tokens_are_row_outcomes() -> None:
    """stop_reason refusal is the row's Refused, sent once; max_tokens keeps the cut text."""
    faults = StructuredFaults(refuse=frozenset({"p1"}), truncate=frozenset({"p2"}))
    async with AnthropicServer(structured=faults) as server:
        results = await ChatRun(anthropic_config(server)).execute(rows(3))
    assert results[0].text == "echo: p0"
    assert results[1].error is not None and results[1].error.kind == "Refused"
    assert results[2].text == "echo: p2"[: len("echo: p2") // 2]
    assert [r.prompt for r in server.requests].count("p1") == 1


async def test_anthropic_1000_rows_through_529s_resets_and_its_429s() -> None:
    """1,000 rows under 5% 529 overloaded, 2% resets and rate_limit_error 429s with
    anthropic-ratelimit-* headers: every row right, in order, none answered twice."""
    faults = FaultRates(server_error=0.05, server_error_status=529, reset=0.02, seed=7)
    limit = RateLimit(2000, 40, headers="anthropic")
    async with AnthropicServer(faults=faults, rate_limit=limit, record=False) as server:
        run = ChatRun(anthropic_config(server, max_parallel=32))
        results = await run.execute(rows(1000))
    assert [r.text for r in results] == [f"echo: p{i}" for i in range(1000)]
    assert server.statuses["529"] > 20 and server.statuses["reset"] > 5
    assert set(server.answered.values()) == {1} and len(server.answered) == 1000
    assert run.stats.limits["requests"]["headers"] == "anthropic"


async def test_anthropic_bad_key_stops_within_max_parallel_requests() -> None:
    """A wrong key (401 authentication_error) stops the run after at most max_parallel
    requests; the key is in no message, repr or report."""
    async with AnthropicServer(api_key=ANTHROPIC_KEY) as server:
        config = anthropic_config(server, api_key=WRONG_KEY, max_parallel=4)
        with pytest.raises(RunAborted) as stopped:
            await ChatRun(config).execute(rows(200))
    assert server.request_count <= 4
    assert "authentication_error" in server.requests[0].outcome or server.statuses["401"] >= 1
    said = f"{stopped.value} {stopped.value!r} {stopped.value.partial!r} {config!r}"
    assert "invalid x-api-key" in str(stopped.value)
    assert WRONG_KEY not in said and ANTHROPIC_KEY not in said


async def test_anthropic_credit_balance_too_low_stops_as_an_exhausted_quota() -> None:
    """A 400 invalid_request_error saying the credit balance is too low stops the run at
    once, in Anthropic's words, as an exhausted quota: not retried, not failed row by row."""
    words = (
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
        "Billing to upgrade or purchase credits."
    )
    async with AnthropicServer() as server:
        server.script(*[Status(400, message=words, error_type="invalid_request_error")] * 50)
        with pytest.raises(RunAborted) as stopped:
            await ChatRun(anthropic_config(server, max_parallel=4)).execute(rows(100))
    assert server.request_count <= 4
    prompts = [r.prompt for r in server.requests]
    assert len(prompts) == len(set(prompts))  # none sent again
    assert words in str(stopped.value)
    assert "out of quota or credit" in str(stopped.value)
    assert stopped.value.partial is not None


async def test_anthropic_other_invalid_requests_stay_row_failures() -> None:
    """Another 400 invalid_request_error fails only its row; the other rows are answered."""
    async with AnthropicServer() as server:
        refusal = Status(400, message="messages: text content blocks must be non-empty")
        server.script(refusal, prompt="p1")
        results = await ChatRun(anthropic_config(server)).execute(rows(3))
    assert [r.text for r in results] == ["echo: p0", None, "echo: p2"]
    assert results[1].error is not None and results[1].error.kind == "BadRequestError"


async def test_anthropic_retry_after_is_honoured() -> None:
    """A 429 rate_limit_error with retry-after: 1 is sent again no sooner than 1 s later."""
    async with AnthropicServer() as server:
        server.script(Status(429, retry_after=1), prompt="p0")
        results = await ChatRun(anthropic_config(server)).execute(rows(1))
    first, second = server.requests
    assert results[0].text == "echo: p0"
    assert second.started - first.finished >= 0.95


def test_anthropic_extract_through_a_forced_tool_with_a_reask(tmp_path: pathlib.Path) -> None:
    """extract sends the schema as a forced tool's input_schema; an input that breaks it is
    sent back as an is_error tool_result and the fixed one fills typed columns."""
    df = pd.DataFrame({"text": ["printer on fire", "refund please"]})
    faults = StructuredFaults(invalid_rate=1.0, seed=1)
    with AnthropicServer(structured=faults).run_in_thread() as server:
        out = df.chat.extract("text", schema=Ticket, config=anthropic_config(server))
    first = server.requests[0]
    reask = next(r for r in server.requests if len(r.body["messages"]) == 3)
    assert first.body["tool_choice"] == {"type": "tool", "name": "Ticket"}
    assert first.body["tools"][0]["input_schema"]["properties"].keys() >= {"topic", "urgency"}
    assert reask.body["messages"][-1]["content"][0]["type"] == "tool_result"
    assert reask.body["messages"][-1]["content"][0]["is_error"] is True
    assert list(out["topic"]) == ["topic: printer on fire", "topic: refund please"]
    assert str(out["urgency"].dtype) == "Int64"


def test_anthropic_shared_prefix_is_cached_for_200_rows() -> None:
    """A 2,000-token system prompt over 200 rows carries cache_control; at least 90% of its
    tokens over the run come back as cache reads, and the summary shows them and the saving."""
    system = "Follow the house rules. " * 340  # about 2,000 tokens
    df = pd.DataFrame({"text": [f"p{i}" for i in range(200)]})
    with AnthropicServer(latency=0.01).run_in_thread() as server:
        df.chat.complete(
            "text",
            system=system,
            config=anthropic_config(server),
            prices={CLAUDE: (3.0, 0.3, 15.0)},
        )
    report = nbtoolkit.last_run()
    assert report is not None
    assert server.requests[0].body["system"][0]["cache_control"] == {"type": "ephemeral"}
    prefix = len(system) // 4 + 1
    assert report.stats.cached_tokens >= 0.9 * 200 * prefix
    assert (report.rows["cached_tokens"] >= prefix).sum() >= 180
    saved = report.stats.cached_tokens * (3.0 - 0.3) / 1e6
    assert report.stats.cache_saved == pytest.approx(saved)
    assert f"{report.stats.cached_tokens:,} cached, saved {saved:.4f}" in report.summary()
    assert "max_tokens: 1024 per request (Anthropic requires one" in report.summary()


def test_anthropic_cache_writes_cost_one_and_a_quarter_times_input() -> None:
    """The prompt-cache write Anthropic reports (cache_creation_input_tokens) is billed at
    1.25 x the input price in the run's cost; reads at the cached price, the rest at input."""
    system = "Follow the house rules. " * 340  # about 2,000 tokens: cached
    df = pd.DataFrame({"text": [f"p{i}" for i in range(4)]})
    with AnthropicServer().run_in_thread() as server:
        df.chat.complete(
            "text",
            system=system,
            config=anthropic_config(server, max_parallel=1),  # one write, then reads
            prices={CLAUDE: (3.0, 0.3, 15.0)},
        )
    report = nbtoolkit.last_run()
    assert report is not None and report.stats.cost is not None
    assert server.requests[0].body["system"][0]["cache_control"] == {"type": "ephemeral"}
    written = int(report.rows["cached_tokens"].iloc[1])  # the prefix the first row wrote
    assert written > 1000 and int(report.rows["cached_tokens"].iloc[0]) == 0
    stats = report.stats
    expected = (
        (stats.prompt_tokens - stats.cached_tokens - written) * 3.0
        + stats.cached_tokens * 0.3
        + written * 3.0 * 1.25
        + stats.completion_tokens * 15.0
    ) / 1e6
    assert stats.cost == pytest.approx(expected)
    assert report.rows["cost"].sum() == pytest.approx(expected)  # the first row's is dearer


def test_cache_write_price_in_the_budget_and_the_batch_discount() -> None:
    """An Anthropic config's price has the 1.25 x write rate (a given Price's own rate wins);
    a budget reserves every prompt token at it; a batch scales it with the rest."""
    from nbtoolkit.core._budget import Budget
    from nbtoolkit.core._pricing import config_price

    price = config_price(ChatConfig(provider="anthropic", model=CLAUDE, prices={CLAUDE: (4, 40)}))
    assert price is not None and price.cache_write_input == 5.0
    assert price.cost(1_000_000, 0, written=400_000) == pytest.approx(0.6 * 4 + 0.4 * 5)
    assert price.scaled(0.5).cache_write_input == 2.5
    own = nbtoolkit.Price(4, 40, cache_write_input=8)
    assert config_price(ChatConfig(provider="anthropic", model=CLAUDE, prices={CLAUDE: own})) == own
    openai = config_price(
        ChatConfig(base_url="http://127.0.0.1:1/v1", model="m", prices={"m": (4, 40)})
    )
    assert openai is not None and openai.cache_write_input is None
    budget = Budget(model=CLAUDE, price=price, max_tokens_total=None, max_cost=5.0)
    assert budget.try_reserve(1_000_000, 0)  # at worst 5.0: fits exactly
    assert not budget.try_reserve(1, 0)
    budget.release(1_000_000, 0)
    budget.spend(1_000_000, 0, 0, 1_000_000)
    assert budget.cost == pytest.approx(5.0)


async def test_anthropic_short_prefix_is_not_marked() -> None:
    """A system prompt under the cacheable length goes as plain text, no cache_control."""
    async with AnthropicServer() as server:
        await ChatRun(anthropic_config(server)).execute(rows(1, system="Be brief."))
    assert server.requests[0].body["system"] == "Be brief."


def test_anthropic_refuses_embed_and_openai_only_fields() -> None:
    """embed on Anthropic names the providers that embed; seed= is refused before sending."""
    df = pd.DataFrame({"text": ["a"]})
    config = ChatConfig(provider="anthropic", api_key="k", model=CLAUDE)
    with pytest.raises(ConfigError, match="provider='gemini'"):
        df.chat.embed("text", config=config)
    with pytest.raises(ConfigError, match="'seed'"):
        df.chat.complete("text", config=config, seed=1)


def test_anthropic_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL alone select Anthropic, as the SDK reads them."""
    df = pd.DataFrame({"text": ["a"]})
    with AnthropicServer(api_key=ANTHROPIC_KEY).run_in_thread() as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        out = df.chat.complete("text", model=CLAUDE, progress=False)
    assert list(out["response"]) == ["echo: a"]
    assert server.requests[0].headers["x-api-key"] == ANTHROPIC_KEY


def test_gemini_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """GOOGLE_API_KEY alone selects Gemini (GOOGLE_GEMINI_BASE_URL its root, as google-genai
    reads them); GOOGLE_API_KEY wins over GEMINI_API_KEY, as in the SDK."""
    df = pd.DataFrame({"text": ["a"]})
    with GeminiServer(api_key=GEMINI_KEY).run_in_thread() as server:
        monkeypatch.setenv("GOOGLE_API_KEY", GEMINI_KEY)
        monkeypatch.setenv("GEMINI_API_KEY", "gm-other-key-SENTINEL")
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.base_url)
        out = df.chat.complete("text", model=GEMINI, progress=False)
    assert list(out["response"]) == ["echo: a"]
    assert server.requests[0].headers["x-goog-api-key"] == GEMINI_KEY


def test_provider_is_openai_when_anything_points_at_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OpenAI key or base URL anywhere keeps OpenAI, whatever other keys are set; two
    other providers' keys and nothing else is ambiguous, so OpenAI too."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "a")
    assert ChatConfig(base_url="http://127.0.0.1:1/v1").resolved().provider == "openai"
    monkeypatch.setenv("OPENAI_API_KEY", "o")
    assert ChatConfig().resolved().provider == "openai"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert ChatConfig().resolved().provider == "anthropic"
    monkeypatch.setenv("GEMINI_API_KEY", "g")
    assert ChatConfig().resolved().provider == "openai"
    with pytest.raises(ConfigError, match="provider must be one of"):
        ChatConfig(provider="claude")  # type: ignore[arg-type]


async def test_native_keys_stay_out_of_reprs_and_the_cache(tmp_path: pathlib.Path) -> None:
    """A run against each provider caches its answers under keys and files that never hold
    the API key, and no repr shows it."""
    cache = tmp_path / "answers.sqlite3"
    async with AnthropicServer(api_key=ANTHROPIC_KEY) as claude_server:
        claude = anthropic_config(claude_server, cache=str(cache))
        assert all(r.ok for r in await ChatRun(claude).execute(rows(5)))
    async with GeminiServer(api_key=GEMINI_KEY) as gemini_server:
        gemini = gemini_config(gemini_server, cache=str(cache))
        assert all(r.ok for r in await ChatRun(gemini).execute(rows(5)))
    stored = folder_bytes(tmp_path)
    assert b"echo: p4" in stored  # the answers really are in there
    for key in (ANTHROPIC_KEY, GEMINI_KEY):
        assert key.encode() not in stored
        assert key not in repr(claude) + repr(gemini) + repr(claude.resolved())


async def test_dry_run_prices_anthropic_and_gemini_models() -> None:
    """The cost estimate builds each provider's own requests and prices them from the table,
    without sending anything."""
    from nbtoolkit.core._estimate import estimate_run

    for provider, model in (("anthropic", CLAUDE), ("gemini", GEMINI)):
        config = ChatConfig(provider=provider, model=model, api_key="k", cache=False)  # type: ignore[arg-type]
        estimate = await estimate_run(config, rows(20, system="Be brief."))
        assert estimate.to_send == 20
        assert estimate.cost is not None, provider
        assert f"{provider} price table read" in str(estimate)


# Gemini


async def test_gemini_request_is_a_generate_content_request() -> None:
    """A row becomes models/{model}:generateContent under /v1beta with x-goog-api-key,
    systemInstruction and generationConfig; usage counts thoughts as output."""
    async with GeminiServer(api_key=GEMINI_KEY, thoughts_tokens=9) as server:
        config = gemini_config(server, params={"max_tokens": 50, "stop": ["X"], "top_p": 0.5})
        run = ChatRun(config)
        results = await run.execute(rows(2, system="Be brief."))
    assert [r.text for r in results] == ["echo: p0", "echo: p1"]
    seen = server.requests[0]
    assert seen.path == f"/v1beta/models/{GEMINI}:generateContent"
    assert seen.headers["x-goog-api-key"] == GEMINI_KEY
    assert seen.body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert seen.body["contents"] == [{"role": "user", "parts": [{"text": "p0"}]}]
    assert seen.body["generationConfig"] == {
        "maxOutputTokens": 50,
        "stopSequences": ["X"],
        "topP": 0.5,
    }
    assert results[0].completion_tokens == len("echo: p0") // 4 + 1 + 9
    assert run.stats.reasoning_tokens == 18


async def test_gemini_blocks_and_cuts_are_row_outcomes() -> None:
    """SAFETY, RECITATION and a blocked prompt are Refused rows, each sent once; MAX_TOKENS
    keeps the cut text."""
    faults = StructuredFaults(refuse=frozenset({"p1"}), truncate=frozenset({"p4"}))
    async with GeminiServer(structured=faults, blocked={"p2"}, recitation={"p3"}) as server:
        results = await ChatRun(gemini_config(server)).execute(rows(5))
    kinds = [r.error.kind if r.error else None for r in results]
    assert kinds == [None, "Refused", "Refused", "Refused", None]
    assert results[2].error is not None and "blockReason: SAFETY" in results[2].error.message
    assert results[3].error is not None and "RECITATION" in results[3].error.message
    assert results[4].text == "echo: p4"[: len("echo: p4") // 2]
    assert server.request_count == 5


async def test_gemini_1000_rows_through_5xx_resets_and_its_429s() -> None:
    """1,000 rows under 5% 503s, 2% resets and RESOURCE_EXHAUSTED 429s whose retryDelay is
    in the body: every row right, in order, none answered twice."""
    faults = FaultRates(server_error=0.05, server_error_status=503, reset=0.02, seed=3)
    limit = RateLimit(1500, 30, headers="none")
    async with GeminiServer(faults=faults, rate_limit=limit, record=False) as server:
        results = await ChatRun(gemini_config(server, max_parallel=32)).execute(rows(1000))
    assert [r.text for r in results] == [f"echo: p{i}" for i in range(1000)]
    assert server.statuses["503"] > 20 and server.statuses["reset"] > 5
    assert set(server.answered.values()) == {1} and len(server.answered) == 1000


async def test_gemini_bad_key_400_stops_the_run() -> None:
    """Gemini's 400 API_KEY_INVALID stops the run like a 401, after at most max_parallel
    requests, and the key is in no message."""
    async with GeminiServer(api_key=GEMINI_KEY) as server:
        config = gemini_config(server, api_key=WRONG_KEY, max_parallel=4)
        with pytest.raises(RunAborted) as stopped:
            await ChatRun(config).execute(rows(200))
    assert server.request_count <= 4
    assert "API key not valid" in str(stopped.value)
    assert WRONG_KEY not in f"{stopped.value} {stopped.value!r} {stopped.value.partial!r}"


async def test_gemini_daily_quota_stops_with_googles_words() -> None:
    """A 429 whose QuotaFailure is per day stops the run at once, in Google's words, instead
    of waiting out its retryDelay row after row."""
    words = "Quota exceeded for metric: generate_content_free_tier_requests, limit: 250"
    daily = Status(
        429,
        message=words,
        error_code="GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        retry_after=40,
    )
    async with GeminiServer() as server:
        server.script(*[daily] * 50)
        with pytest.raises(RunAborted) as stopped:
            await ChatRun(gemini_config(server, max_parallel=4)).execute(rows(100))
    assert words in str(stopped.value)
    assert "daily quota is spent" in str(stopped.value)
    assert server.request_count <= 4


async def test_gemini_per_minute_retry_delay_is_waited_out() -> None:
    """A per-minute 429 with retryDelay 0.6s in its body (no header) is sent again no sooner
    than 0.6 s later, and the row is answered."""
    async with GeminiServer() as server:
        server.script(Status(429, retry_after=0.6), prompt="p0")
        results = await ChatRun(gemini_config(server)).execute(rows(1))
    first, second = server.requests
    assert results[0].text == "echo: p0"
    assert "retry-after" not in {name.lower() for name in first.headers}
    assert second.started - first.finished >= 0.55


def test_gemini_embed_through_batch_embed_contents() -> None:
    """embed sends batchEmbedContents with outputDimensionality, at most 100 texts a
    request, and maps vectors back by position."""
    texts = [f"t{i}" for i in range(150)]
    df = pd.DataFrame({"text": texts})
    with GeminiServer().run_in_thread() as server:
        config = gemini_config(server, model="gemini-embedding-001")
        out = df.chat.embed("text", dimensions=16, config=config)
    for text, vector in zip(texts, out["embedding"], strict=True):
        np.testing.assert_allclose(vector, expected_vector(text, 16), atol=1e-6)
    assert [len(r.body["requests"]) for r in server.requests] == [100, 50]
    first = server.requests[0].body["requests"][0]
    assert first["model"] == "models/gemini-embedding-001"
    assert first["outputDimensionality"] == 16
    assert server.requests[0].path.endswith("/models/gemini-embedding-001:batchEmbedContents")


def test_gemini_schema_drops_what_gemini_refuses() -> None:
    """The responseSchema keeps types, enums, ranges and nullability in Gemini's form and
    drops additionalProperties and references."""
    strict = normalise(Ticket).strict
    converted = gemini_schema(strict)
    text = repr(converted)
    assert "additionalProperties" not in text and "$ref" not in text and "$defs" not in text
    assert converted["type"] == "OBJECT"
    urgency = converted["properties"]["urgency"]
    assert (urgency["type"], urgency["minimum"], urgency["maximum"]) == ("INTEGER", 1, 5)
    assert converted["properties"]["note"]["nullable"] is True
    assert converted["properties"]["category"]["enum"] == ["billing", "bug", "other"]


# Both


def test_extract_gives_the_same_typed_columns_on_three_providers() -> None:
    """One pydantic model: OpenAI (json_schema), Anthropic (tool) and Gemini (responseSchema)
    test servers fill the same typed columns; Gemini answers no schema with a 400."""
    df = pd.DataFrame({"text": ["printer on fire", "refund please", "login loop"]})
    outs = []
    with ChatServer().run_in_thread() as server:
        outs.append(
            df.chat.extract(
                "text", schema=Ticket, model="m", base_url=server.base_url, progress=False
            )
        )
    with AnthropicServer().run_in_thread() as claude_server:
        outs.append(df.chat.extract("text", schema=Ticket, config=anthropic_config(claude_server)))
    with GeminiServer().run_in_thread() as gemini_server:
        outs.append(df.chat.extract("text", schema=Ticket, config=gemini_config(gemini_server)))
    pd.testing.assert_frame_equal(outs[0], outs[1])
    pd.testing.assert_frame_equal(outs[0], outs[2])
    assert gemini_server.statuses["400"] == 0 and gemini_server.request_count == 3
    assert str(outs[2]["urgency"].dtype) == "Int64"


def test_classify_gives_the_same_labels_on_three_providers() -> None:
    """classify's enum schema goes through the tool (Anthropic) and responseSchema (Gemini)
    and gives the same category column as OpenAI's json_schema; the default system prompt
    travels as each provider's system field."""
    df = pd.DataFrame({"text": ["great", "awful", "fine", "meh"]})
    labels = ["pos", "neg", "neutral"]
    outs = []
    with ChatServer().run_in_thread() as server:
        outs.append(
            df.chat.classify(
                "text", labels=labels, model="m", base_url=server.base_url, progress=False
            )
        )
    with AnthropicServer().run_in_thread() as claude_server:
        outs.append(df.chat.classify("text", labels=labels, config=anthropic_config(claude_server)))
    with GeminiServer().run_in_thread() as gemini_server:
        outs.append(df.chat.classify("text", labels=labels, config=gemini_config(gemini_server)))
    pd.testing.assert_frame_equal(outs[0], outs[1])
    pd.testing.assert_frame_equal(outs[0], outs[2])
    assert list(outs[1]["label"].cat.categories) == labels
    assert "Classify" in claude_server.requests[0].body["system"]
    assert "Classify" in gemini_server.requests[0].body["systemInstruction"]["parts"][0]["text"]


def test_anthropic_rate_headers_are_read_per_minute_with_rfc3339_resets() -> None:
    """anthropic-ratelimit-* headers give a per-minute window and RFC 3339 resets as seconds;
    tokens come from the tokens family, else from input-tokens."""
    from nbtoolkit.core._limits import ServerLimits

    now = 1_800_000_000.0
    headers = {
        "anthropic-ratelimit-requests-limit": "3000",
        "anthropic-ratelimit-requests-remaining": "2990",
        "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:02Z",
        "anthropic-ratelimit-input-tokens-limit": "400000",
        "anthropic-ratelimit-input-tokens-remaining": "390000",
        "anthropic-ratelimit-input-tokens-reset": "2027-01-15T08:00:01.500000+00:00",
    }
    limits = ServerLimits.from_headers(headers, now=now)
    assert limits is not None and limits.family == "anthropic"
    assert (limits.limit_requests, limits.remaining_requests) == (3000, 2990)
    assert (limits.window_requests, limits.window_tokens) == (60.0, 60.0)
    assert limits.limit_tokens == 400_000 and limits.remaining_tokens == 390_000
    # 2027-01-15T08:00:00Z is 1,800,000,000 s after the epoch.
    assert limits.reset_requests == pytest.approx(2.0)
    assert limits.reset_tokens == pytest.approx(1.5)
