"""What a run will cost, before it is paid: a dry run, and a pilot that is never paid twice.

`estimate_run` walks a run's requests as the engine would (the same cache keys, the same
dedupe) without sending any, counts each row's prompt tokens locally, and prices what is
left to send::

    rows ── skipped (nothing to send) / answered by the cache / duplicate of another row
         └─ to send ── prompt tokens (tiktoken or the estimator; the part shared by every row)
                    └─ completion tokens: from a pilot, else the cache's earlier answers of
                       this model, else max_tokens as the bound and a guess; low/expected/high
                    └─ cost: the price table or prices=, Batch at its discount; wall time

A pilot (``pilot=N`` or a fraction) sends N rows sampled across the rows to send (one from
each of N equal stretches, seeded), through the engine and its cache: the full run finds
their answers there and pays nothing for them again. Their real usage (reasoning tokens
included, which bill as output) gives the completion lengths of the rest, and calibrates
the local prompt count against the server's.

Completion lengths are long-tailed, so the range of their mean is taken both ways and the
wider kept: a t-interval on the sample mean, and Cox's interval for a log-normal mean.

Longer than ~400 lines: the survey, the pilot and the three ranges (prompt, completion,
cost) read the same items; their data and reprs are apart, in `_costestimate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._cachewriter import CacheWriter
from nbtoolkit.core._costestimate import CostEstimate, Pilot, Span
from nbtoolkit.core._engine import ChatRun, request_keys
from nbtoolkit.core._pricing import config_price, provider_of
from nbtoolkit.core._rows import ProgressListener, RowResult
from nbtoolkit.core._tokens import TokenCounter, token_counter
from nbtoolkit.core.endpoints._base import (
    DEFAULT_COMPLETION_TOKENS,
    Endpoint,
    Item,
)
from nbtoolkit.core.endpoints._providers import chat_endpoint
from nbtoolkit.core.store._cache import CACHE_ERRORS, ResponseCache
from nbtoolkit.errors import ConfigError

# Providers whose prompt cache works without being asked (a repeated prefix of 1,024
# tokens or more is billed at the cached-input price); Anthropic's needs cache_control.
_AUTO_PROMPT_CACHE = frozenset({"openai", "azure", "groq", "gemini"})
_PROMPT_CACHE_MIN = 1024
_PROMPT_CACHE_STEP = 128
_MIN_SAMPLES = 5  # earlier answers needed before the cache's lengths are trusted
_LOOKUP_BATCH = 256


@dataclass
class _Survey:
    """The rows a run would send (items and their requests), and the rest by reason."""

    rows: int
    items: list[Item]
    requests: list[Any]
    skipped: Counter[str]


async def estimate_run(
    config: ChatConfig,
    requests: Iterable[Any],
    *,
    endpoint: Endpoint | None = None,
    pilot: int | float | None = None,
    seed: int = 0,
    batch: bool = False,
    pilot_progress: Callable[[int], AbstractContextManager[ProgressListener]] | None = None,
) -> CostEstimate:
    """Estimate what running ``requests`` would cost; with ``pilot``, send that many first.

    Args:
        config: the run's settings (model, server, cache, max_parallel, prices).
        requests: one request per row (None: nothing to send), as the engine takes them.
        endpoint: how requests become bodies; default chat completions.
        pilot: rows to send now, an int, or a fraction (0-1) of the rows to send; None: none.
        seed: picks the pilot's rows.
        batch: price the run as a Batch API job (at the batch discount).
        pilot_progress: makes the pilot's listener (a progress bar) from its row count;
            closed when the pilot ends. None: the pilot runs unseen.

    Returns:
        The `CostEstimate`. Without a pilot no request is sent.

    Raises:
        ConfigError: no model, or a pilot size that is not a positive int or a fraction.
        RunAborted: the pilot met a bad key, wrong URL or model, or no quota.
    """
    config = config.resolved()
    if not config.model:
        raise ConfigError("no model: pass model='...' or set it with nbtoolkit.configure()")
    endpoint = endpoint or chat_endpoint(config)
    survey = await _survey(config, endpoint, requests)
    counter = token_counter(config.model)
    counts = [counter.count(item) for item in survey.items]
    shared = _shared_tokens([item.payload for item in survey.items], counter)
    price = config_price(config)
    notes: list[str] = []
    chosen = _pilot_rows(len(survey.items), pilot, seed)
    pilot_report: Pilot | None = None
    pilot_results: list[RowResult] = []
    latency: float | None = None
    learned: Mapping[str, Mapping[str, Any]] = {}
    if chosen:
        # A pilot of slow requests takes as long as a wave of the run: the bar shows it going.
        shown = pilot_progress(len(chosen)) if pilot_progress else contextlib.nullcontext()
        with shown as listener:
            run = ChatRun(
                dataclasses.replace(config, progress=False), endpoint=endpoint, listener=listener
            )
            pilot_results = await run.execute([survey.requests[i] for i in chosen])
        stats = run.stats
        pilot_report = Pilot(
            rows=len(chosen),
            requests=stats.requests_sent,
            failed=sum(1 for r in pilot_results if not r.ok),
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            reasoning_tokens=stats.reasoning_tokens,
            cached_tokens=stats.cached_tokens,
            cost=stats.cost,
            seconds=stats.wall_seconds,
        )
        waves = math.ceil(max(1, stats.requests_sent) / config.max_parallel)
        latency = stats.wall_seconds / waves
        learned = stats.limits
        if config.cache_path is None:
            notes.append("the cache is off: the full run will pay for the pilot's rows again")
    answered = {i for i, r in zip(chosen, pilot_results, strict=True) if r.ok}
    rest = [i for i in range(len(survey.items)) if i not in answered]
    rest_counts = [counts[i] for i in rest]

    prompt = _prompt_span(sum(rest_counts), counter, chosen, counts, pilot_results)
    bound = _completion_bound(survey.items)
    no_answer_text = endpoint.path == "/embeddings"
    if no_answer_text:
        completion, basis = Span(0.0, 0.0, 0.0), "embeddings bill no completion tokens"
    else:
        samples, basis = _completion_samples(config, pilot_results)
        completion = completion_span(samples, len(rest), bound)
        if not samples:
            basis = _guess_basis(bound)
            notes.append("completion lengths are a guess: pass pilot=20 to measure them")
    cached = _expected_cached(config, shared, len(rest), pilot_results)
    cost: Span | None = None
    if price is not None:
        high = None
        if completion.high is not None and prompt.high is not None:
            high = price.cost(prompt.high, completion.high, 0.0, batch=batch)
        cost = Span(
            price.cost(prompt.low, completion.low, cached, batch=batch),
            price.cost(prompt.expected, completion.expected, cached, batch=batch),
            high,
        ).plus(pilot_report.cost if pilot_report and pilot_report.cost else 0.0)
    if pilot_report is not None:
        prompt = prompt.plus(pilot_report.prompt_tokens)
        completion = completion.plus(pilot_report.completion_tokens)
    wall, wall_basis = _wall_time(
        config, endpoint, len(rest), prompt.expected + completion.expected, latency, learned, batch
    )
    by_row: list[float | None] = [None] * survey.rows
    for item, count in zip(survey.items, counts, strict=True):
        by_row[item.index] = count
    return CostEstimate(
        model=config.model,
        path=endpoint.path,
        rows=survey.rows,
        to_send=len(survey.items),
        skipped=dict(survey.skipped),
        prompt_tokens=prompt,
        prompt_tokens_by_row=tuple(by_row),
        shared_tokens=shared,
        token_method=counter.method,
        completion_tokens=completion,
        completion_basis=basis,
        cached_tokens=cached,
        cost=cost,
        price=price,
        batch=batch,
        wall_seconds=wall,
        wall_basis=wall_basis,
        pilot=pilot_report,
        notes=tuple(notes),
    )


def completion_span(samples: Sequence[float], rows: int, bound: float | None) -> Span:
    """Completion tokens of ``rows`` answers, from answer lengths seen before.

    The expected total is the sample mean times ``rows``. The range of the mean is the
    wider of a t-interval (3 standard errors up, 2.5 down) and Cox's interval for a
    log-normal mean (long tails: a few answers far longer than the rest). ``bound`` (the
    request's max_tokens) caps every figure. Without samples: 1 token a row up to the bound.
    """
    if rows == 0:
        return Span(0.0, 0.0, 0.0)
    cap = math.inf if bound is None else bound
    if not samples:
        guess = min(cap, DEFAULT_COMPLETION_TOKENS) / 2
        return Span(float(rows), rows * guess, None if bound is None else rows * bound)
    n = len(samples)
    mean = sum(samples) / n
    if n == 1:
        low_mean, high_mean = mean / 4, mean * 4
    else:
        sd = math.sqrt(sum((x - mean) ** 2 for x in samples) / (n - 1))
        logs = [math.log(max(x, 1.0)) for x in samples]
        mu = sum(logs) / n
        s2 = sum((x - mu) ** 2 for x in logs) / (n - 1)
        half = 2.09 * math.sqrt(s2 / n + s2 * s2 / (2 * (n - 1)))
        centre = mu + s2 / 2
        error = sd / math.sqrt(n)
        low_mean = max(min(math.exp(centre - half), mean - 2.5 * error), min(samples) / 2)
        high_mean = max(math.exp(centre + half), mean + 3 * error)
    return Span(
        rows * min(max(low_mean, 0.0), cap), rows * min(mean, cap), rows * min(high_mean, cap)
    )


async def _survey(config: ChatConfig, endpoint: Endpoint, requests: Iterable[Any]) -> _Survey:
    """Walk the requests as the engine does, without sending: cache hits, duplicates, rest."""
    keys = request_keys(config, endpoint)
    cache = await CacheWriter.open(config.cache_path, model=config.model)
    binary = endpoint.binary_answers
    survey = _Survey(0, [], [], Counter())
    seen: set[bytes] = set()
    batch: list[tuple[Item, Any]] = []

    async def settle() -> None:
        found = await cache.lookup([item.key for item, _ in batch if item.key], binary=binary)
        for item, request in batch:
            assert item.key is not None
            if item.key in found:
                survey.skipped["cache"] += 1
            elif config.dedupe and item.key in seen:
                survey.skipped["duplicate"] += 1
            else:
                seen.add(item.key)
                survey.items.append(item)
                survey.requests.append(request)
        batch.clear()

    try:
        for index, request in enumerate(requests):
            survey.rows += 1
            if request is None:
                survey.skipped["skipped"] += 1
                continue
            try:
                item = endpoint.item(index, request)
            except (ValueError, TypeError):
                survey.skipped["unsendable"] += 1
                continue
            item.key = keys.key(item.payload)
            batch.append((item, request))
            if len(batch) >= _LOOKUP_BATCH:
                await settle()
        await settle()
    finally:
        await cache.aclose()
    return survey


def _pilot_rows(rows: int, pilot: int | float | None, seed: int) -> list[int]:
    """The positions of the pilot's rows: one from each of N equal stretches, seeded."""
    if pilot is None or pilot is False:
        return []
    if isinstance(pilot, bool) or not isinstance(pilot, int | float) or pilot <= 0:
        raise ConfigError(f"pilot is a number of rows (20) or a fraction (0.01); got {pilot!r}")
    if isinstance(pilot, float) and pilot < 1:
        wanted = math.ceil(pilot * rows)
    elif isinstance(pilot, float) and not pilot.is_integer():
        raise ConfigError(f"pilot is a number of rows (20) or a fraction (0.01); got {pilot!r}")
    else:
        wanted = int(pilot)
    wanted = min(wanted, rows)
    rng = random.Random(seed)
    edges = [round(k * rows / wanted) for k in range(wanted + 1)] if wanted else []
    return [rng.randrange(edges[k], edges[k + 1]) for k in range(wanted)]


def _shared_tokens(payloads: Sequence[bytes], counter: TokenCounter) -> float:
    """Tokens at the start and end of every request body that are the same in all of them."""
    if len(payloads) < 2:
        return 0.0
    first = payloads[0]
    head, tail = len(first), len(first)
    for payload in payloads[1:]:
        head = min(head, _common_prefix(first, payload, head))
        tail = min(tail, _common_prefix(first[::-1], payload[::-1], tail))
    tail = min(tail, len(first) - head)
    text = first[:head].decode("utf-8", "ignore")
    if tail:
        text += first[len(first) - tail :].decode("utf-8", "ignore")
    return counter.text(text)


def _common_prefix(a: bytes, b: bytes, limit: int) -> int:
    limit = min(limit, len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low]; a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def _prompt_span(
    total: float,
    counter: TokenCounter,
    chosen: Sequence[int],
    counts: Sequence[float],
    pilot: Sequence[RowResult],
) -> Span:
    """Prompt tokens of the rows left to send, calibrated on the pilot's when there is one."""
    counted = sum(counts[i] for i, r in zip(chosen, pilot, strict=True) if r.prompt_tokens)
    billed = sum(r.prompt_tokens or 0 for r in pilot)
    if counted and billed:
        ratio = billed / counted
        return Span(0.97 * ratio * total, ratio * total, 1.03 * ratio * total)
    if counter.exact:
        return Span(0.95 * total, total, 1.05 * total)
    return Span(0.5 * total, total, 1.5 * total)


def _completion_bound(items: Sequence[Item]) -> float | None:
    """The requests' max_tokens (the largest), or None when some request sets none."""
    bound = 0.0
    for item in items:
        body = item.body
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if not isinstance(limit, int | float) or isinstance(limit, bool):
            return None
        bound = max(bound, float(limit))
    return bound or None


def _completion_samples(config: ChatConfig, pilot: Sequence[RowResult]) -> tuple[list[float], str]:
    """Answer lengths to learn from: the pilot's, else the cache's earlier answers."""
    measured = [float(r.completion_tokens) for r in pilot if r.completion_tokens is not None]
    if measured:
        return measured, f"measured: a pilot of {len(pilot)} rows (reasoning tokens included)"
    path = config.cache_path
    if path is None or not path.exists():
        return [], ""
    try:
        with ResponseCache(path) as cache:
            found = cache.completion_samples(config.model or "")
    except CACHE_ERRORS:
        return [], ""
    if len(found) < _MIN_SAMPLES:
        return [], ""
    return [float(n) for n in found], (
        f"learned from {len(found):,} earlier answers of {config.model} in the cache"
    )


def _guess_basis(bound: float | None) -> str:
    if bound is None:
        return (
            f"a guess ({DEFAULT_COMPLETION_TOKENS // 2} a row); no bound: set max_tokens, "
            "or pass pilot=20"
        )
    return f"at most max_tokens={bound:,.0f} a row; expected is a guess (pass pilot=20)"


def _expected_cached(
    config: ChatConfig, shared: float, rows: int, pilot: Sequence[RowResult]
) -> float:
    """Prompt tokens the provider's own prompt cache is expected to serve for ``rows``."""
    seen = [r.cached_tokens for r in pilot if r.cached_tokens]
    if seen:
        return float(max(seen)) * max(0, rows - config.max_parallel)
    if shared < _PROMPT_CACHE_MIN:
        return 0.0
    if provider_of(config.base_url, config.azure_endpoint) not in _AUTO_PROMPT_CACHE:
        return 0.0
    per_row = shared // _PROMPT_CACHE_STEP * _PROMPT_CACHE_STEP
    return float(per_row) * max(0, rows - config.max_parallel)


def _wall_time(
    config: ChatConfig,
    endpoint: Endpoint,
    rows: int,
    tokens: float,
    latency: float | None,
    learned: Mapping[str, Mapping[str, Any]],
    batch: bool,
) -> tuple[float | None, str]:
    """Expected wall time of the rows left, and what it rests on."""
    if batch:
        return None, "a Batch API job finishes within its window (24 h), often much sooner"
    requests = math.ceil(rows / max(1, endpoint.max_items))
    waits: list[tuple[float, str]] = []
    if latency is not None:
        waits.append(
            (
                math.ceil(requests / config.max_parallel) * latency,
                f"{latency:.2f} s a request measured by the pilot, {config.max_parallel} at once",
            )
        )
    # The server's own limits, as its rate headers told the pilot. What the server holds
    # (its burst) is spent at once, as the governor spends it; only the rest waits for the
    # refill. A reset far off with plenty remaining (OpenAI's "6m0s" beside 149,984 of
    # 150,000) gives a slow refill rate that a run within the burst never meets.
    for limit, amount in (("requests", float(requests)), ("tokens", tokens)):
        known = learned.get(limit, {})
        rate, burst = known.get("rate_per_second"), known.get("burst")
        held = float(burst) if isinstance(burst, int | float) else 0.0
        if isinstance(rate, int | float) and rate > 0 and amount > held:
            waits.append(
                ((amount - held) / rate, f"the server's {limit} limit ({rate * 60:,.0f}/min)")
            )
    if config.rpm:
        waits.append((requests / config.rpm * 60, f"rpm={config.rpm:g}"))
    if config.tpm:
        waits.append((tokens / config.tpm * 60, f"tpm={config.tpm:g}"))
    if not waits:
        return None, "no measured latency or rate limit yet: a pilot measures it"
    return max(waits)
