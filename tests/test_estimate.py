"""Cost estimates before a run: the price table, the dry survey, the pilot, the ranges."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._engine import ChatRun
from nbtoolkit.core._estimate import completion_span, estimate_run
from nbtoolkit.core._pricing import Price, config_price, price_table, provider_of
from nbtoolkit.core._rows import ChatRequest
from nbtoolkit.testing import ChatServer, CompletionLengths

from .conftest import FAST_RETRY

MODEL = "test-model"
PRICES = {MODEL: (1.1, 0.275, 4.4)}  # o4-mini's figures: input, cached input, output
SYSTEM = "You are a careful analyst; answer in one paragraph. " * 6
LONG_TAIL = CompletionLengths(median=60, sigma=0.5, reasoning_median=120, reasoning_sigma=0.6)


def requests(rows: int, *, system: str = SYSTEM) -> list[ChatRequest]:
    """Rows whose prompts differ in length, after one system prompt shared by all."""
    return [
        ChatRequest(
            (
                {"role": "system", "content": system},
                {"role": "user", "content": f"review {i}: " + "good value " * (i % 40)},
            )
        )
        for i in range(rows)
    ]


def config(server: ChatServer, tmp_path: Path, **changes: object) -> ChatConfig:
    base = ChatConfig(
        base_url=server.base_url,
        model=MODEL,
        cache=tmp_path / "cache.sqlite3",
        progress=False,
        retry=FAST_RETRY,
        max_parallel=32,
        prices=PRICES,
    )
    return base if not changes else ChatConfig(**{**base.__dict__, **changes})


def test_the_shipped_table_is_dated_and_keyed_by_provider_and_model() -> None:
    """The table says when its prices were read; a model is priced behind its own provider."""
    table = price_table()
    assert table.read.count("-") == 2
    assert {"openai", "azure", "anthropic", "gemini", "groq", "mistral"} <= set(table.models)
    openai = ChatConfig(model="gpt-4o-mini-2024-07-18").resolved()  # a dated snapshot
    price = config_price(openai)
    assert price is not None and price.input == 0.15 and price.cached_input == 0.075
    assert price.source.startswith("openai price table read ")
    assert provider_of("https://api.groq.com/openai/v1") == "groq"
    assert provider_of(None, "https://x.openai.azure.com") == "azure"
    # The same name behind an unknown server (a local one, a gateway) has no price.
    assert config_price(ChatConfig(model="gpt-4o-mini", base_url="http://127.0.0.1:1")) is None


def test_a_price_bills_cached_input_and_the_batch_discount() -> None:
    """Cached prompt tokens bill at the cached price, and a Batch job at its discount."""
    price = Price(2.0, 8.0, 0.5)
    assert price.cost(1_000_000, 0) == pytest.approx(2.0)
    assert price.cost(1_000_000, 1_000_000, 500_000) == pytest.approx(1.0 + 0.25 + 8.0)
    assert price.cost(1_000_000, 0, batch=True) == pytest.approx(1.0)


async def test_a_dry_run_sends_nothing_and_says_what_it_skips(tmp_path: Path) -> None:
    """No request is sent; cached rows, duplicates and empty rows are counted as skipped."""
    async with ChatServer() as server:
        cfg = config(server, tmp_path)
        rows = requests(10)
        await ChatRun(cfg).execute(rows[:3])  # three rows are in the cache already
        server.reset_records()
        estimate = await estimate_run(cfg, [*rows, rows[5], None])
        assert server.request_count == 0
    assert estimate.rows == 12
    assert estimate.to_send == 7
    assert estimate.skipped == {"cache": 3, "duplicate": 1, "skipped": 1}
    assert estimate.prompt_tokens_by_row[0] is None and estimate.prompt_tokens_by_row[3]
    # The system prompt is the same in every row, and most of each prompt.
    assert estimate.shared_tokens >= len(SYSTEM) / 4
    assert 0.5 < estimate.shared_share < 1
    assert "estimator" in estimate.token_method


async def test_without_a_price_the_estimate_says_price_unknown(tmp_path: Path) -> None:
    """A model with no price shows "price unknown", never $0, in both reprs."""
    async with ChatServer() as server:
        estimate = await estimate_run(config(server, tmp_path, prices=None), requests(5))
    assert estimate.cost is None
    assert "price unknown" in str(estimate)
    assert "price unknown" in estimate._repr_html_()
    assert "$0" not in str(estimate)


@pytest.mark.parametrize("seed", range(5))
async def test_max_tokens_bounds_the_high_estimate(tmp_path: Path, seed: int) -> None:
    """With max_tokens and no pilot, what the run costs never passes the high bound."""
    lengths = CompletionLengths(median=80, sigma=1.0, reasoning_median=60, seed=seed)
    async with ChatServer(lengths=lengths, record=False) as server:
        cfg = config(server, tmp_path / str(seed), params={"max_tokens": 150})
        estimate = await estimate_run(cfg, requests(300))
        assert server.request_count == 0
        run = ChatRun(cfg)
        await run.execute(requests(300))
    assert estimate.cost is not None and estimate.cost.high is not None
    assert run.stats.cost is not None
    assert run.stats.cost <= estimate.cost.high
    assert estimate.completion_tokens.high == 300 * 150
    assert run.stats.completion_tokens <= 300 * 150


async def test_pilot_rows_are_never_paid_twice(tmp_path: Path) -> None:
    """A pilot sends N rows spread over the frame; the full run takes them from the cache."""
    async with ChatServer(lengths=LONG_TAIL) as server:
        cfg = config(server, tmp_path)
        rows = requests(200)
        estimate = await estimate_run(cfg, rows, pilot=20, seed=1)
        piloted = [r.prompt for r in server.requests]
        assert len(piloted) == 20
        run = ChatRun(cfg)
        await run.execute(rows)
    assert estimate.pilot is not None and estimate.pilot.rows == 20
    assert estimate.pilot.cost is not None and estimate.pilot.cost > 0
    assert estimate.pilot.reasoning_tokens > 0
    # Sampled across the frame, not the first 20 rows.
    positions = sorted(int(p.split(":")[0].removeprefix("review ")) for p in piloted)
    assert positions != list(range(20)) and positions[-1] >= 180
    assert run.stats.cache_hits == 20
    assert all(count == 1 for count in server.answered.values())
    assert len(server.answered) == 200


async def test_the_test_server_reports_reasoning_and_cached_tokens(tmp_path: Path) -> None:
    """Long-tailed lengths vary by row; usage tells reasoning tokens and the cached prefix."""
    long_system = "Follow the house style guide to the letter. " * 120  # over 1,024 tokens
    lengths = CompletionLengths(median=40, sigma=1.0, reasoning_median=50, seed=7)
    async with ChatServer(lengths=lengths) as server, aiohttp.ClientSession() as session:
        usages = []
        for row in requests(4, system=long_system):
            body = {"model": MODEL, "messages": list(row.messages), "max_tokens": 400}
            async with session.post(f"{server.base_url}/chat/completions", json=body) as reply:
                usages.append((await reply.json())["usage"])
    completions = [u["completion_tokens"] for u in usages]
    assert len(set(completions)) > 1
    for usage, row in zip(usages, requests(4, system=long_system), strict=True):
        answer, reasoning = lengths.draw(row.messages[-1]["content"])
        assert usage["completion_tokens_details"]["reasoning_tokens"] == min(reasoning, 400)
        assert usage["completion_tokens"] == min(answer + reasoning, 400)
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert cached[0] == 0  # the first request primes the server's prompt cache
    assert all(c > 1024 and c % 128 == 0 for c in cached[1:])
    assert all(c < u["prompt_tokens"] for c, u in zip(cached[1:], usages[1:], strict=True))


def test_completion_span_widens_with_a_long_tail() -> None:
    """The range holds the sample mean, and is wider for long-tailed samples."""
    even = completion_span([100.0] * 19 + [110.0], 1000, None)
    tailed = completion_span([50.0] * 19 + [1000.0], 1000, None)
    assert even.low <= even.expected <= (even.high or 0)
    assert (tailed.high or 0) - tailed.low > (even.high or 0) - even.low
    bounded = completion_span([50.0] * 19 + [1000.0], 1000, 200)
    assert bounded.high == 1000 * 200


async def test_a_one_percent_pilot_estimates_within_fifteen_percent(tmp_path: Path) -> None:
    """2,000 rows, a 20-row pilot: in 9 of 10 seeds the expected cost is within 15% of
    the actual cost (pilot included) and the actual lies inside low-high."""
    good = 0
    report = []
    for seed in range(10):
        lengths = CompletionLengths(
            median=60, sigma=0.5, reasoning_median=120, reasoning_sigma=0.6, seed=seed
        )
        async with ChatServer(lengths=lengths, record=False) as server:
            cfg = config(server, tmp_path / str(seed), max_parallel=64)
            rows = requests(2000)
            estimate = await estimate_run(cfg, rows, pilot=20, seed=seed)
            run = ChatRun(cfg)
            await run.execute(rows)
        assert estimate.cost is not None and estimate.pilot is not None
        assert run.stats.cost is not None and estimate.pilot.cost is not None
        actual = run.stats.cost + estimate.pilot.cost
        error = estimate.cost.expected / actual - 1
        inside = estimate.cost.contains(actual)
        report.append((seed, round(error, 3), inside))
        good += abs(error) <= 0.15 and inside
    assert good >= 9, json.dumps(report)
