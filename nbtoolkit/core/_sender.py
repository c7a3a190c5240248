"""One request of a run, from the budget to the parsed reply, retried as the policy says.

The engine (`ChatRun`) decides what to send: single rows, groups, halves of a refused group,
re-asks. This module is what one request goes through once the engine has chosen it, in the
order it happens::

    budget.reserve ─► governor.admit ─► post_json ─► breaker ─► endpoint.parse
        ─► stats and budget.spend ─► governor.settle     (on a failure: tenacity, again)

It raises `Attempts` when the request gives up (its rows are the engine's to finish),
`OverBudget` when the budget would not hold it, and `Systemic` when a failure means every
other request would fail too (the engine stops the run).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._breaker import CircuitBreaker
from nbtoolkit.core._budget import Budget, OutputCeiling
from nbtoolkit.core._client import Redactor, Reply, client_timeout, post_json
from nbtoolkit.core._limits import RateGovernor, ServerLimits
from nbtoolkit.core._retry import GiveUp, RetryAfterOrBackoff, is_retryable
from nbtoolkit.core._rows import ProgressListener, RunStats
from nbtoolkit.core.endpoints._base import (
    Endpoint,
    Item,
    Parsed,
    cache_write_tokens,
    reasoning_tokens,
    usage_counts,
)
from nbtoolkit.errors import (
    APIError,
    NbToolkitError,
    RateLimitError,
    RequestTimeout,
    TransportError,
)

if TYPE_CHECKING:  # imported by the first run: `import nbtoolkit` spares it
    import aiohttp


@dataclass(slots=True)
class Job:
    """One request on its way: its rows (one for chat, many for embeddings)."""

    items: list[Item]

    def worst_case(self) -> tuple[float, float]:
        """Estimated prompt tokens, and the completion tokens the request may use at most."""
        return (
            sum(item.prompt_tokens for item in self.items),
            sum(item.completion_tokens for item in self.items),
        )


class Attempts(Exception):
    """A request's last error after tenacity gave up, with how many attempts it took."""

    def __init__(self, error: Exception, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


class OverBudget(Exception):
    """A request that would pass max_cost / max_tokens_total; its rows are not sent."""

    def __init__(self, *, uncapped: bool = False) -> None:
        super().__init__()
        self.uncapped = uncapped  # it set no max_tokens: it reserved the output ceiling


class Systemic(Exception):
    """Raised out of a worker to stop the whole task group on a run-wide failure."""

    def __init__(self, error: NbToolkitError) -> None:
        super().__init__(str(error))
        self.error = error


class Sender:
    """Sends a run's requests: one `Sender` per run, shared by its workers.

    Args:
        config: the run's options, resolved.
        endpoint: how rows become a body and a reply becomes answers.
        stats: the run's counters (requests, statuses, tokens, retries).
        budget: the run's ``max_cost`` / ``max_tokens_total``, held for every request.
        ceiling: what a request without ``max_tokens`` may cost at most.
        governor: admits every request (rate limits, the shared pause, AIMD).
        listener: told of each retry (the progress bar), or None.
        on_answered: called on every 2xx (the engine's refusal watch stands down).
    """

    def __init__(
        self,
        config: ChatConfig,
        endpoint: Endpoint,
        *,
        stats: RunStats,
        budget: Budget,
        ceiling: OutputCeiling,
        governor: RateGovernor,
        listener: ProgressListener | None,
        on_answered: Callable[[], None],
    ) -> None:
        self.config = config
        self.endpoint = endpoint
        self.stats = stats
        self.budget = budget
        self.ceiling = ceiling
        self.governor = governor
        self.breaker = CircuitBreaker(threshold=config.max_parallel)
        self.ceiling_used = False  # a request reserved the ceiling: the summary says so
        self._listener = listener
        self._on_answered = on_answered
        self._timeout = client_timeout(config.timeouts, total=config.timeouts.total)
        self._url = config.url(endpoint.path)
        self._headers = config.request_headers()
        # Every text about a request that reaches a row, the report or an exception goes
        # through it: a gateway may echo the key in any body, a 200's included.
        self.redact = Redactor(self._url, self._headers)

    async def send(self, session: aiohttp.ClientSession, job: Job) -> tuple[Parsed, int]:
        """Send one request, retried as the policy says: its parsed reply and the attempts
        it took. Raises `Attempts` when it gives up."""
        try:
            return await self.send_once(session, job), 1
        except Systemic:
            raise
        except Exception as error:
            first_error = self._explained(error, job)
            if first_error is None:  # the endpoint asks differently now: at once, no retry
                return await self.send(session, job)
            if not is_retryable(first_error) or GiveUp(self.config.retry).first(first_error):
                raise Attempts(first_error, 1) from first_error
            return await self._retry(session, job, first_error)

    async def _retry(
        self, session: aiohttp.ClientSession, job: Job, first_error: Exception
    ) -> tuple[Parsed, int]:
        """Attempts 2 and on, run by tenacity. The first attempt went outside it, because
        tenacity's bookkeeping costs more CPU than a whole request to a fast server; tenacity
        is handed the first failure as its own attempt 1, so its stop and wait rules see
        exactly what happened."""
        policy = self.config.retry
        replay: list[Exception] = [first_error]

        async def attempt() -> Parsed:
            if replay:
                raise replay.pop()
            try:
                return await self.send_once(session, job)
            except APIError as exc:
                explained = self._explained(exc, job)
                if explained is exc:
                    raise
                if explained is not None:
                    raise explained from exc
            return await self.send_once(session, job)

        retrying = AsyncRetrying(
            stop=GiveUp(policy),
            wait=RetryAfterOrBackoff(policy),
            retry=retry_if_exception(is_retryable),
            before_sleep=self._on_retry,
            reraise=True,
        )
        try:
            parsed: Parsed = await retrying(attempt)
        except Systemic:
            raise
        except Exception as exc:
            raise Attempts(exc, retrying.statistics.get("attempt_number", 1)) from exc
        return parsed, int(retrying.statistics.get("attempt_number", 1))

    def _explained(self, error: Exception, job: Job) -> Exception | None:
        """The endpoint's reading of an error reply (`Endpoint.on_error_reply`): None when
        it now sends the request another way (send again at once, not as a retry)."""
        if isinstance(error, APIError):
            return self.endpoint.on_error_reply(error, job.items)
        return error

    def _on_retry(self, retry_state: RetryCallState) -> None:
        self.stats.retries += 1
        if self._listener is not None:
            self._listener.row_retried()

    async def send_once(self, session: aiohttp.ClientSession, job: Job) -> Parsed:
        """One attempt: within budget, admitted by the governor, reported back to both."""
        prompt_tokens, completion_tokens = job.worst_case()
        # The governor paces on the estimate; the budget holds the worst case, which for a
        # request without max_tokens is the model's output ceiling.
        budget = self.budget
        owed = self.owed(job.items) if budget.limited else completion_tokens
        if budget.limited and not await budget.reserve(prompt_tokens, owed):
            raise OverBudget(uncapped=any(not item.capped for item in job.items))
        reserved = prompt_tokens + completion_tokens
        try:
            ticket = await self.governor.admit(reserved)
        except BaseException:
            if budget.limited:
                budget.release(prompt_tokens, owed)
            raise
        self.stats.requests_sent += 1
        limits: ServerLimits | None = None
        body = ""
        used: float | None = None
        congested = throttled = False
        pause: float | None = None
        try:
            reply: Reply = await post_json(
                session,
                self._url,
                self.endpoint.payload(job.items),
                headers=self._headers,
                timeout=self._timeout,
                redact=self.redact,
            )
            limits = reply.limits
            self.breaker.reached()
            body = reply.text
            parsed = self.endpoint.parse(body, job.items)
        except RateLimitError as exc:
            self.breaker.reached()
            self.stats.statuses["429"] += 1
            limits, congested, throttled = exc.limits, True, True
            pause = self._shared_pause(exc)
            raise
        except RequestTimeout:
            self.stats.statuses["RequestTimeout"] += 1
            congested = True
            # The provider may have answered, and billed, after we stopped waiting.
            self._charge_unknown(prompt_tokens, owed)
            raise
        except TransportError as exc:
            self.stats.statuses[type(exc).__name__] += 1
            if self.breaker.failed(exc):
                raise Systemic(TransportError(self.breaker.describe())) from exc
            raise
        except APIError as exc:
            self.breaker.reached()
            self.stats.statuses[str(exc.status)] += 1
            limits = exc.limits
            raise
        except Exception as exc:  # a 2xx that is not what the endpoint expects
            self.stats.statuses[type(exc).__name__] += 1
            used = self._spend(None, job, prompt_tokens, owed)
            # Its message quotes the body, which a gateway may have filled with our headers.
            raise self._scrubbed(exc, body, job.items) from None
        else:
            self.stats.statuses["200"] += 1
            self._on_answered()
            used = self._spend(parsed.usage, job, prompt_tokens, owed)
            return parsed
        finally:
            if budget.limited:
                budget.release(prompt_tokens, owed)
            self.governor.settle(
                ticket,
                reserved_tokens=reserved,
                used_tokens=used,
                limits=limits,
                congested=congested,
                pause=pause,
                throttled=throttled,
            )

    def owed(self, items: list[Item]) -> float:
        """The completion tokens the budget holds for a request: each row's max_tokens, or
        the model's output ceiling for a row without one (an estimate cannot bound a reply)."""
        owed = 0.0
        for item in items:
            owed += self.ceiling.worst(item.completion_tokens, capped=item.capped)
            self.ceiling_used = self.ceiling_used or not item.capped
        return owed

    def _scrubbed(self, error: Exception, body: str, items: list[Item]) -> Exception:
        """The error a 2xx body that is not an answer raises, with the request's secrets
        scrubbed from the body before the parser quotes (and cuts) it: scrubbed after the
        cut, a key cut in half would escape."""
        clean = self.redact(body)
        if clean != body:
            try:
                self.endpoint.parse(clean, items)
            except Exception as again:  # the same failure, told from the scrubbed body
                error = again
        self.redact.error(error)
        return error

    def _charge_unknown(self, prompt_tokens: float, completion_tokens: float) -> None:
        """Charge a request whose usage is unknown its worst case: a budget stays hard."""
        self.budget.spend(round(prompt_tokens), round(completion_tokens))
        self.stats.charged_unconfirmed += round(prompt_tokens + completion_tokens)

    def _spend(
        self,
        usage: Mapping[str, Any] | None,
        job: Job,
        prompt_reserved: float,
        completion_reserved: float,
    ) -> float | None:
        """Count a reply's billed tokens; returns their total, None when it said nothing.

        A reply that reports no usage was still billed: the budget charges it what was
        reserved for it (its worst case), never zero, so a budget stays a hard limit.
        """
        prompt, completion, cached = usage_counts(usage or {})
        if prompt is None and completion is None:
            self._charge_unknown(prompt_reserved, completion_reserved)
            return None
        prompt, completion = prompt or 0, completion or 0
        if len(job.items) == 1 and not job.items[0].capped:
            self.ceiling.observe(completion)  # a reply longer than the ceiling raises it
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion
        self.stats.cached_tokens += cached or 0
        self.stats.reasoning_tokens += reasoning_tokens(usage or {})
        self.budget.spend(prompt, completion, cached or 0, cache_write_tokens(usage or {}))
        return float(prompt + completion)

    def _shared_pause(self, exc: RateLimitError) -> float | None:
        """How long a 429 pauses every worker: the server's word, unless past our ceiling."""
        wait = exc.retry_after
        if wait is None and exc.limits is not None:
            wait = exc.limits.reset_requests
        if wait is None or wait > self.config.retry.retry_after_max:
            return None  # no word from the server (AIMD and backoff handle it), or too long
        return wait
