"""Rate control: header parsing, buckets, the shared pause and AIMD, on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from nbtoolkit import ChatConfig, ChatRequest, ChatRun
from nbtoolkit.core._limits import (
    RateGovernor,
    ServerLimits,
    Ticket,
    TokenBucket,
    parse_duration,
    parse_reset,
)
from nbtoolkit.core._pacing import LearnedPace
from nbtoolkit.core._rows import RowResult, estimate_tokens
from nbtoolkit.core.endpoints._base import ChatEndpoint
from nbtoolkit.testing import ChatServer, HeaderFamily, RateLimit, Status


class Holds:
    """A progress listener that keeps the waits the governor announces (those >= 0.5 s):
    how a run's speed is checked without timing it on a busy machine."""

    def __init__(self) -> None:
        self.waits: list[tuple[float, str]] = []

    def row_done(self, result: RowResult) -> None:
        pass

    def rows_done(self, results: Sequence[RowResult]) -> None:
        pass

    def row_retried(self) -> None:
        pass

    def row_waiting(self, seconds: float, reason: str) -> None:
        self.waits.append((seconds, reason))


class FakeClock:
    """A clock the test moves by hand: the only thing these tests fake."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def held_until_clock_moves(governor: RateGovernor, clock: FakeClock, seconds: float) -> None:
    """The next request waits, and goes once the fake clock has moved on by `seconds`."""
    waiter = asyncio.ensure_future(governor.admit(1))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    clock.now += seconds
    await asyncio.wait_for(waiter, 1)  # the governor re-checks its clock within 0.25 s


async def held_until_the_first_settles(governor: RateGovernor) -> None:
    """A second request waits while the first is in flight, and goes once it settles."""
    first = await governor.admit(1)
    second = asyncio.ensure_future(governor.admit(1))
    await asyncio.sleep(0.02)
    assert not second.done()
    governor.settle(first, reserved_tokens=1, used_tokens=1, limits=None, congested=False)
    await asyncio.wait_for(second, 1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1.5s", 1.5),
        ("1h2m3s", 3723.0),
        ("2", 2.0),
        ("soon", None),
        ("5x", None),
        ("", None),
    ],
)
def test_openai_durations(text: str, seconds: float | None) -> None:
    """x-ratelimit-reset-* values in OpenAI's formats become seconds; junk becomes None."""
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_server_limits_from_headers() -> None:
    """All six x-ratelimit headers are read; a reply without them gives None."""
    limits = ServerLimits.from_headers(
        {
            "x-ratelimit-limit-requests": "3000",
            "x-ratelimit-remaining-requests": "2999",
            "x-ratelimit-reset-requests": "20ms",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "149000",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert limits == ServerLimits(3000, 2999, 0.02, 150000, 149000, 360)
    assert ServerLimits.from_headers({"content-type": "application/json"}) is None


def test_bucket_refills_and_goes_into_debt() -> None:
    """A bucket refills at its rate up to capacity; an oversize request waits for a full one."""
    clock = FakeClock()
    bucket = TokenBucket(rate=10, capacity=5, clock=clock)
    bucket.take(5)
    assert bucket.wait_for(1) == pytest.approx(0.1)
    clock.now += 0.3
    assert bucket.level() == pytest.approx(3)
    assert bucket.wait_for(50) == pytest.approx(0.2)  # waits for the full 5, not for 50
    clock.now += 10
    bucket.take(50)
    assert bucket.level() == pytest.approx(-45)
    bucket.give_back(20)
    assert bucket.level() == pytest.approx(-25)


def test_estimate_counts_prompt_and_completion_budget() -> None:
    """A chat row reserves its body's estimate (4 bytes a token) plus max_tokens, or 256."""
    request = ChatRequest(({"role": "user", "content": "x" * 400},))
    capped = ChatEndpoint({"model": "m", "max_tokens": 50}).item(0, request)
    assert capped.prompt_tokens == pytest.approx(len(capped.payload) / 4)
    assert capped.prompt_tokens == pytest.approx(estimate_tokens(capped.payload))
    assert capped.completion_tokens == 50
    assert ChatEndpoint({"model": "m"}).item(0, request).completion_tokens == 256


async def test_a_429_pauses_every_worker() -> None:
    """After one 429 with a 2 s wait, nobody is admitted until 2 s have passed."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=8, probe_seconds=0, clock=clock)
    ticket = await governor.admit(10)
    governor.settle(
        ticket, reserved_tokens=10, used_tokens=None, limits=None, congested=True, pause=2.0
    )
    waiter = asyncio.ensure_future(governor.admit(10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert governor.paused_until > clock.now
    clock.now += 2.0
    await asyncio.wait_for(waiter, 1)  # the governor re-checks its clock within 0.25 s
    assert governor.in_flight == 1


async def test_aimd_halves_on_congestion_and_grows_back() -> None:
    """A 429 halves the concurrency limit (once per round trip); successes add it back slowly."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=16, probe_seconds=0, clock=clock)
    starts = [await governor.admit(1) for _ in range(4)]
    for ticket in starts[:2]:  # two 429s in the same round trip: one cut
        governor.settle(ticket, reserved_tokens=1, used_tokens=None, limits=None, congested=True)
    assert governor.limit == 8
    for ticket in starts[2:]:
        governor.settle(ticket, reserved_tokens=1, used_tokens=1, limits=None, congested=False)
    assert 8 < governor.limit < 8.5
    clock.now += 100
    for _ in range(200):
        ticket = await governor.admit(1)
        governor.settle(ticket, reserved_tokens=1, used_tokens=1, limits=None, congested=False)
    assert governor.limit == 16  # never above max_parallel


async def test_concurrency_limit_holds_extra_requests() -> None:
    """With the limit cut to 1, a second request waits until the first settles."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=2, probe_seconds=0, clock=clock)
    governor.limit = 1
    await held_until_the_first_settles(governor)


async def test_rpm_budget_paces_requests() -> None:
    """rpm=60 admits one request per (fake) second once the first second's worth is spent."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=10, rpm=60, probe_seconds=0, clock=clock)
    await governor.admit(1)
    await held_until_clock_moves(governor, clock, 1.0)


async def test_server_headers_set_the_pace() -> None:
    """A reply with 0 remaining, full again in 0.5 s, holds the next request for one token."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=10, probe_seconds=0, clock=clock)
    ticket = await governor.admit(1)
    limits = ServerLimits(limit_requests=120, remaining_requests=0, reset_requests=0.5)
    governor.settle(ticket, reserved_tokens=1, used_tokens=1, limits=limits, congested=False)
    bucket = governor.server_requests.bucket
    assert bucket is not None
    assert bucket.rate == pytest.approx(0.97 * 2)  # 1 used, back in 0.5 s: 2 a second
    await held_until_clock_moves(governor, clock, 0.6)


async def test_tokens_are_settled_against_actual_usage() -> None:
    """tpm reserves the estimate and refunds what the reply says was not used."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=10, tpm=6000, probe_seconds=0, clock=clock)
    assert governor.tokens is not None
    ticket = await governor.admit(80)
    assert governor.tokens.level() == pytest.approx(20)
    governor.settle(ticket, reserved_tokens=80, used_tokens=30, limits=None, congested=False)
    assert governor.tokens.level() == pytest.approx(70)


async def test_first_request_goes_alone_briefly() -> None:
    """Until the first reply (or probe_seconds), only one request is in flight."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=10, probe_seconds=0.05, clock=clock)
    await held_until_the_first_settles(governor)


async def test_a_rate_limited_run_stays_under_the_limit() -> None:
    """Against 40 req/s (burst 20), 120 rows finish paced at the learned 40/s, few 429s."""
    rows = [ChatRequest(({"role": "user", "content": f"p{i}"},)) for i in range(120)]
    holds = Holds()
    async with ChatServer(rate_limit=RateLimit(40, 20)) as server:
        config = ChatConfig(base_url=server.base_url, model="m", max_parallel=50, cache=False)
        run = ChatRun(config, listener=holds)
        results = await run.execute(rows)
    assert [r.text for r in results] == [f"echo: p{i}" for i in range(120)]
    assert server.statuses["429"] <= 0.05 * server.request_count
    # How near the ideal time (20 at once, then 100 at 40/s) is a benchmark's figure
    # (python -m benchmarks --only headers), not a test's: the machine is shared. Here: the
    # run paced itself at the server's rate, and was never held back half a second.
    assert learned_rate(run)["rate_per_second"] == pytest.approx(40, rel=0.10)
    assert holds.waits == []


async def test_a_429_storm_pauses_everyone_once() -> None:
    """With no headers to go on, a wall of 429s makes all workers wait the server's time."""
    rows = [ChatRequest(({"role": "user", "content": f"p{i}"},)) for i in range(40)]
    async with ChatServer() as server:
        server.script(Status(429, retry_after_ms=300))
        config = ChatConfig(base_url=server.base_url, model="m", max_parallel=8, cache=False)
        await ChatRun(config).execute(rows)
    first_429 = next(r for r in server.requests if r.status == 429)
    pause_ends = first_429.finished + 0.3
    during = [r for r in server.requests if first_429.finished < r.started < pause_ends]
    # Nobody sent anything new in the 0.3 s the server asked for (the pause is shared): the
    # only requests the server saw start then are ones the other 7 workers had already sent
    # when the 429 came back (on a busy machine they can reach the server a moment after it).
    assert len(during) <= 7
    assert all(r.prompt != first_429.prompt for r in during)
    assert len(server.requests) == 41  # 40 rows and the one retry: nothing else refused


async def test_half_the_pool_until_the_server_answers() -> None:
    """Before any reply, at most half of max_parallel is in flight; the first reply frees it."""
    governor = RateGovernor(max_parallel=10, probe_seconds=0, clock=FakeClock())
    tickets = [await governor.admit(1) for _ in range(5)]
    sixth = asyncio.ensure_future(governor.admit(1))
    await asyncio.sleep(0.02)
    assert not sixth.done()
    governor.settle(tickets[0], reserved_tokens=1, used_tokens=1, limits=None, congested=False)
    await asyncio.wait_for(sixth, 1)
    more = [await asyncio.wait_for(governor.admit(1), 1) for _ in range(4)]
    assert len(more) == 4  # the whole pool is open now
    assert governor.in_flight == 9


async def test_requests_sent_after_a_reply_count_against_its_remaining() -> None:
    """A reply's remaining count is lowered by what we sent after that request went out."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=100, probe_seconds=0, clock=clock)
    first = await governor.admit(1)
    for _ in range(30):
        await governor.admit(1)
    limits = ServerLimits(limit_requests=6000, remaining_requests=49)
    governor.settle(first, reserved_tokens=1, used_tokens=1, limits=limits, congested=False)
    assert governor.server_requests.bucket is not None
    assert governor.server_requests.bucket.level() == pytest.approx(49 - 30)


NOW = 1_700_000_000.0  # a wall clock for reset timestamps


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1.5s", 1.5), ("2", 2.0), (str(NOW + 3), 3.0), (str(int((NOW + 2.5) * 1000)), 2.5)],
)
def test_resets_as_durations_or_timestamps(text: str, seconds: float) -> None:
    """A reset is a duration, or a Unix timestamp in seconds or milliseconds (OpenRouter)."""
    assert parse_reset(text, now=NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            {
                "X-RateLimit-Limit": "20",
                "X-RateLimit-Remaining": "15",
                "X-RateLimit-Reset": str(int((NOW + 30) * 1000)),
            },
            ServerLimits(20, 15, 30.0, family="openrouter"),
            id="openrouter",
        ),
        pytest.param(
            {"RateLimit": "limit=50, remaining=3, reset=1", "RateLimit-Policy": "50;w=1"},
            ServerLimits(50, 3, 1.0, window_requests=1.0, family="ietf"),
            id="ietf",
        ),
        pytest.param(
            {
                "RateLimit": "limit=100, remaining=3, reset=20",
                "RateLimit-Policy": "10;w=1, 100;w=60",
            },
            ServerLimits(100, 3, 20.0, window_requests=60.0, family="ietf"),
            id="ietf-two-policies",
        ),
        pytest.param(
            {
                "RateLimit": '"default";r=3;t=1',
                "RateLimit-Policy": '"burst";q=5;w=1, "default";q=50;w=10',
            },
            ServerLimits(50, 3, 1.0, window_requests=10.0, family="ietf"),
            id="ietf-structured",
        ),
        pytest.param(
            {"RateLimit-Limit": "50", "RateLimit-Remaining": "7", "RateLimit-Reset": "2"},
            ServerLimits(50, 7, 2.0, family="ietf"),
            id="ietf-draft-6",
        ),
        pytest.param(
            {"X-RateLimit-Remaining-Requests": "99", "x-ratelimit-remaining-tokens": "9000"},
            ServerLimits(remaining_requests=99, remaining_tokens=9000),
            id="azure",
        ),
        pytest.param({"Content-Type": "application/json", "X-Request-Id": "1"}, None, id="none"),
    ],
)
def test_every_header_family_is_read(
    headers: dict[str, str], expected: ServerLimits | None
) -> None:
    """OpenRouter, IETF (both drafts) and Azure headers are read in any letter case."""
    assert ServerLimits.from_headers(headers, now=NOW) == expected


def settle_with(governor: RateGovernor, ticket: object, limits: ServerLimits) -> None:
    assert isinstance(ticket, Ticket)
    governor.settle(ticket, reserved_tokens=1, used_tokens=1, limits=limits, congested=False)


async def test_rate_comes_from_remaining_and_reset() -> None:
    """Limit 50 and 10 used, full again in 0.2 s: the server refills 50 a second, window 1 s."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=100, probe_seconds=0, clock=clock)
    tickets = [await governor.admit(1) for _ in range(10)]
    for used, ticket in enumerate(tickets, start=1):
        settle_with(governor, ticket, ServerLimits(50, 50 - used, used / 50))
    learned = governor.learned()["requests"]
    assert learned["rate_per_second"] == pytest.approx(50)
    assert learned["window_seconds"] == pytest.approx(1)
    assert (learned["basis"], learned["headers"]) == ("remaining and reset", "x-ratelimit")


async def test_a_stated_window_wins() -> None:
    """RateLimit-Policy 50;w=10 means 5 a second, whatever the reset suggests."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=10, probe_seconds=0, clock=clock)
    settle_with(governor, await governor.admit(1), ServerLimits(50, 40, 0.1, window_requests=10))
    learned = governor.learned()["requests"]
    assert (learned["rate_per_second"], learned["window_seconds"]) == (5, 10)
    assert learned["basis"] == "stated window"


async def test_a_bare_limit_is_read_per_minute() -> None:
    """A limit with no reset and no window falls back to OpenAI's meaning, per minute."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=10, probe_seconds=0, clock=clock)
    settle_with(governor, await governor.admit(1), ServerLimits(600, 599))
    learned = governor.learned()["requests"]
    assert learned["rate_per_second"] == pytest.approx(10)
    assert learned["basis"] == "per minute (assumed)"
    assert RateGovernor(max_parallel=1).learned() == {}


async def test_plenty_remaining_is_never_held_back() -> None:
    """However low the learned rate, a reply saying 40 remain lets 30 more go at once."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=100, probe_seconds=0, clock=clock)
    first, second = await governor.admit(1), await governor.admit(1)
    # One used of 3000, back in a minute: a rate far below what the server allows now.
    settle_with(governor, first, ServerLimits(3000, 0, 60.0))
    assert governor.server_requests.rate == pytest.approx(1 / 60)
    settle_with(governor, second, ServerLimits(3000, 40, 60.0))
    more = [await asyncio.wait_for(governor.admit(1), 1) for _ in range(30)]
    assert len(more) == 30


async def test_a_long_header_wait_is_capped_and_shown() -> None:
    """remaining 0, reset 1 h: the run waits pause_max (shown on the bar), then goes on."""
    clock = FakeClock()
    waits: list[tuple[float, str]] = []
    governor = RateGovernor(
        max_parallel=10,
        probe_seconds=0,
        clock=clock,
        pause_max=5.0,
        on_wait=lambda seconds, reason: waits.append((seconds, reason)),
    )
    settle_with(governor, await governor.admit(1), ServerLimits(100, 0, 3600.0))
    await held_until_clock_moves(governor, clock, 5.0)
    assert waits == [(5.0, waits[0][1])]
    assert "capped at 5 s" in waits[0][1]
    # Capped once: the server's own answers (429s and their Retry-After) decide from here.
    more = [await asyncio.wait_for(governor.admit(1), 1) for _ in range(5)]
    assert len(more) == 5


def learned_rate(run: ChatRun) -> dict[str, object]:
    """What the run's governor learned about the request limit."""
    learned: dict[str, object] = run.governor.learned()["requests"]
    return learned


@pytest.mark.parametrize(
    ("family", "window"),
    [
        ("openai", 1.0),  # the gateway: 40 per second
        ("openai", None),  # per minute: 2400 per minute
        ("groq", None),  # per day: 3,456,000 per day
        ("openrouter", None),
        ("ietf", 1.0),
        ("ietf-structured", 60.0),
    ],
)
async def test_the_learned_rate_matches_the_server(
    family: HeaderFamily, window: float | None
) -> None:
    """Per-second, per-minute and per-day headers all teach the server's 40/s within 10%."""
    limit = RateLimit(40, 20, headers=family, window=window)
    rows = [ChatRequest(({"role": "user", "content": f"p{i}"},)) for i in range(100)]
    holds = Holds()
    async with ChatServer(rate_limit=limit) as server:
        config = ChatConfig(base_url=server.base_url, model="m", max_parallel=50, cache=False)
        run = ChatRun(config, listener=holds)
        results = await run.execute(rows)
    assert all(r.ok for r in results)
    learned = learned_rate(run)
    assert learned["rate_per_second"] == pytest.approx(40, rel=0.10)
    assert learned["window_seconds"] == pytest.approx(limit.stated_window, rel=0.10)
    # The benchmarks hold 429s to 5% (they see none); on a loaded 2-core machine, replies
    # read late make a few more here, and an epoch-ms reset (OpenRouter) reads short.
    assert server.statuses["429"] <= 0.10 * server.request_count
    # The wall time against the ideal 2 s is the headers benchmark's figure; here: the run
    # was never held back half a second (as a window misread as the rate's period would).
    assert holds.waits == []


def settle_429(governor: RateGovernor, ticket: Ticket) -> None:
    """Report a 429 (no rate headers, no Retry-After) for ``ticket``."""
    governor.settle(
        ticket, reserved_tokens=1, used_tokens=None, limits=None, congested=True, throttled=True
    )


async def test_without_rate_headers_a_429_paces_the_requests() -> None:
    """With no rate in the headers, a 429 paces requests at 85% of the last second's rate
    (not by cutting concurrency); 429s for requests sent before that cut do not cut again;
    a 429 after a success takes 15% off; successes grow the pace back."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=200, probe_seconds=0, clock=clock)
    tickets = []
    for _ in range(100):  # 100 requests in a second
        tickets.append(await governor.admit(1))
        clock.now += 0.0099
    settle_429(governor, tickets[-1])
    assert governor.pace.rate == pytest.approx(85)
    assert governor.limit == 200  # a rate limit cuts the pace, not the concurrency
    for ticket in tickets[:-1]:  # sent before the cut: already answered by it
        settle_429(governor, ticket)
    assert governor.pace.cuts == 1
    # Paced: a request 1/85 s after the cut, and the next one 1/85 s after that.
    clock.now += 1 / 85
    governor.settle(
        await governor.admit(1), reserved_tokens=1, used_tokens=1, limits=None, congested=False
    )
    await held_until_clock_moves(governor, clock, 1 / 85)
    grown = governor.pace.rate
    assert grown is not None and grown > 85
    assert str(governor.learned()["requests"]["basis"]).startswith("429s")


def test_the_pace_halves_until_a_request_at_it_succeeds() -> None:
    """From a burst, each 429 halves the pace until a request sent at it succeeds; after
    that, a 429 takes 15% off."""
    clock = FakeClock()
    pace = LearnedPace(clock)
    for _ in range(200):  # 200 requests in a second
        pace.admitted()
        clock.now += 0.004
    pace.throttled(clock.now - 0.1)
    assert pace.rate == pytest.approx(170)
    clock.now += 0.01
    pace.admitted()
    pace.throttled(clock.now)  # sent at 170 a second, refused: halve
    assert pace.rate == pytest.approx(85)
    clock.now += 0.01
    pace.admitted()
    sent = clock.now
    clock.now += 0.1
    pace.succeeded(sent)  # sent at 85 a second, accepted
    grown = pace.rate
    assert grown is not None and grown > 85
    clock.now += 0.01
    pace.admitted()
    pace.throttled(clock.now)
    assert pace.rate == pytest.approx(0.85 * grown)
    assert pace.cuts == 3


async def test_without_rate_headers_429s_stay_rare_and_rows_right() -> None:
    """A server at 100 requests/s (burst 100) that sends no rate headers: few 429s (12-14%
    of requests before the pace, about 1% with it), every row right and answered once."""
    rows = [ChatRequest(({"role": "user", "content": f"p{i}"},)) for i in range(500)]
    limit = RateLimit(100, 100, headers="none")
    async with ChatServer(latency=0.05, rate_limit=limit) as server:
        config = ChatConfig(base_url=server.base_url, model="m", max_parallel=100, cache=False)
        run = ChatRun(config)
        results = await run.execute(rows)
    assert [r.text for r in results] == [f"echo: p{i}" for i in range(500)]
    assert all(server.answered[f"p{i}"] == 1 for i in range(500))
    assert server.statuses["429"] <= 0.08 * server.request_count
    assert str(learned_rate(run)["basis"]).startswith("429s")


def settle_calm(governor: RateGovernor, ticket: Ticket) -> None:
    governor.settle(ticket, reserved_tokens=1, used_tokens=1, limits=None, congested=False)


async def test_the_spread_paces_the_opening_wave_then_stands_down() -> None:
    """Replies that take 100 ms spread the opening wave (4 at once, then on a timer); once a
    whole pool's worth of replies came back without a 429, admissions go at once again."""
    clock = FakeClock()
    governor = RateGovernor(max_parallel=16, probe_seconds=0, clock=clock)
    first = await governor.admit(1)
    clock.now += 0.1
    settle_calm(governor, first)
    wave = [await asyncio.wait_for(governor.admit(1), 1) for _ in range(4)]
    await held_until_clock_moves(governor, clock, 0.01)  # the fifth waits for the spread
    for ticket in wave:
        settle_calm(governor, ticket)
    for _ in range(16 - 1 - len(wave)):  # the rest of a pool's worth, each after 100 ms
        clock.now += 1.0
        ticket = await asyncio.wait_for(governor.admit(1), 1)
        clock.now += 0.1
        settle_calm(governor, ticket)
    # The clock stands still: only an absent spread lets all of these through.
    burst = [await asyncio.wait_for(governor.admit(1), 1) for _ in range(12)]
    assert len(burst) == 12
