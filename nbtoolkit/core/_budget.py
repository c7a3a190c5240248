"""Hard spending limits: stop sending once ``max_tokens_total`` or ``max_cost`` would be passed.

A request counts against the budget before it is sent, at its worst case, and is settled
to what the reply says it used. So the limit holds even with many requests in flight: a
request goes only if it fits in what is left after everything already spent or on its way.

The worst case is the prompt estimate plus the most the reply may use: ``max_tokens``
when the request sets it, else the model's output ceiling (`OutputCeiling`: the
providers' documented limits, shipped below, raised when a reply is seen to pass it). A
request that got no usage back (a timeout, a reply without ``usage``) is charged that
worst case: the provider may have billed it. A group (embeddings) larger than what is left
is cut to the rows that fit (`Budget.fitting`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from nbtoolkit.core._pricing import Price
from nbtoolkit.errors import ConfigError


class Budget:
    """Tokens and money spent by one run, and whether the next request still fits."""

    def __init__(
        self,
        *,
        model: str,
        price: Price | None,
        max_tokens_total: int | None,
        max_cost: float | None,
    ) -> None:
        self.unit_price = price
        if max_cost is not None and price is None:
            raise ConfigError(
                f"max_cost needs a price for model {model!r}, and the price table has none "
                f"for it behind this server: pass prices={{{model!r}: (input_per_million, "
                "output_per_million)}"
            )
        self.max_tokens_total = max_tokens_total
        self.max_cost = max_cost
        self.tokens = 0.0  # settled
        self.cost = 0.0  # settled
        self._reserved_tokens = 0.0
        self._reserved_cost = 0.0
        self._reservations = 0  # requests reserved and not yet settled
        self._released: asyncio.Event | None = None  # made on first wait: bound to its loop
        self._refused_by: str | None = None  # the limit that refused the last request

    @property
    def limited(self) -> bool:
        return self.max_tokens_total is not None or self.max_cost is not None

    def price(
        self,
        prompt_tokens: float,
        completion_tokens: float,
        cached_tokens: float = 0.0,
        written_tokens: float = 0.0,
    ) -> float | None:
        """What these tokens cost, or None without a price for the model; ``written_tokens``
        are prompt tokens written to the provider's prompt cache (dearer on Anthropic)."""
        if self.unit_price is None:
            return None
        return self.unit_price.cost(
            prompt_tokens, completion_tokens, cached_tokens, written=written_tokens
        )

    def worst_price(self, prompt_tokens: float, completion_tokens: float) -> float | None:
        """What a request may cost at most (every prompt token possibly a cache write)."""
        if self.unit_price is None:
            return None
        return self.unit_price.worst_cost(prompt_tokens, completion_tokens)

    async def reserve(self, prompt_tokens: float, completion_tokens: float) -> bool:
        """Count a request's worst case against the budget, waiting while it could still fit.

        A request that does not fit now may fit once the requests in flight settle and give
        back what they reserved but did not use. It is refused (False) only when nothing is
        in flight, so nothing could free enough.
        """
        while not self.try_reserve(prompt_tokens, completion_tokens):
            if self._reservations == 0:
                return False
            if self._released is None:
                self._released = asyncio.Event()
            self._released.clear()
            await self._released.wait()
        return True

    async def fitting(self, costs: Sequence[tuple[float, float]]) -> int:
        """How many of a group's rows, from the first, fit in what is left: (prompt,
        completion) worst cases per row. Waits while none fits and requests in flight may
        give some back; 0 only when none fits and nothing is in flight."""
        while True:
            count = self._leading_fit(costs)
            if count or self._reservations == 0:
                return count
            if self._released is None:
                self._released = asyncio.Event()
            self._released.clear()
            await self._released.wait()

    def _leading_fit(self, costs: Sequence[tuple[float, float]]) -> int:
        tokens_left = (
            None
            if self.max_tokens_total is None
            else self.max_tokens_total - self.tokens - self._reserved_tokens
        )
        cost_left = (
            None if self.max_cost is None else self.max_cost - self.cost - self._reserved_cost
        )
        count = 0
        for prompt, completion in costs:
            if tokens_left is not None:
                tokens_left -= prompt + completion
                if tokens_left < 0:
                    self._refused_by = "max_tokens_total"
                    break
            if cost_left is not None:
                cost_left -= self.worst_price(prompt, completion) or 0.0
                if cost_left < 0:
                    self._refused_by = "max_cost"
                    break
            count += 1
        return count

    def try_reserve(self, prompt_tokens: float, completion_tokens: float) -> bool:
        """Count a request's worst case against the budget; False if it does not fit now."""
        tokens = prompt_tokens + completion_tokens
        cost = self.worst_price(prompt_tokens, completion_tokens) or 0.0
        if self.max_tokens_total is not None and (
            self.tokens + self._reserved_tokens + tokens > self.max_tokens_total
        ):
            self._refused_by = "max_tokens_total"
            return False
        if self.max_cost is not None and self.cost + self._reserved_cost + cost > self.max_cost:
            self._refused_by = "max_cost"
            return False
        self._reserved_tokens += tokens
        self._reserved_cost += cost
        self._reservations += 1
        return True

    def release(self, prompt_tokens: float, completion_tokens: float) -> None:
        """Settle a reservation (after `spend` has counted what the reply used)."""
        self._reserved_tokens -= prompt_tokens + completion_tokens
        self._reserved_cost -= self.worst_price(prompt_tokens, completion_tokens) or 0.0
        self._reservations -= 1
        if self._released is not None:
            self._released.set()  # waiters re-check: one may fit now, or none can any more

    def spend(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        written_tokens: int = 0,
    ) -> None:
        """Count what a reply used (its prompt tokens include cache reads and writes)."""
        self.tokens += prompt_tokens + completion_tokens
        cost = self.price(prompt_tokens, completion_tokens, cached_tokens, written_tokens)
        self.cost += cost or 0.0

    def reason(self) -> str:
        """Why a request was refused: the limit that refused it (the last refusal's)."""
        if self._refused_by == "max_cost" or self.max_tokens_total is None:
            return f"max_cost={self.max_cost:g} reached (spent {self.cost:.4f})"
        return f"max_tokens_total={self.max_tokens_total} reached (spent {self.tokens:.0f})"


# The most output tokens one reply may hold, by model name prefix: the providers' documented
# output limits (reasoning included), read 2026-06. Longest prefix wins; a provider prefix
# ("openai/gpt-4o" on a gateway) is ignored.
_OUTPUT_CEILINGS: dict[str, int] = {
    "gpt-5": 128_000,
    "o1-mini": 65_536,
    "o1": 100_000,
    "o3": 100_000,
    "o4-mini": 100_000,
    "gpt-4.1": 32_768,
    "gpt-4o": 16_384,
    "gpt-4-turbo": 4_096,
    "gpt-4": 8_192,
    "gpt-3.5-turbo": 4_096,
    "claude-opus-4": 32_000,
    "claude-sonnet-4": 64_000,
    "claude-haiku-4": 64_000,
    "claude-3-7-sonnet": 64_000,
    "claude-3-5": 8_192,
    "claude-3": 4_096,
    "gemini-2.5": 65_536,
    "gemini-2.0": 8_192,
    "gemini-1.5": 8_192,
    "deepseek-reasoner": 65_536,
    "deepseek-chat": 8_192,
}
# Assumed for a model the table does not know (a local model, a gateway's own name): the
# most common ceiling among chat models; a reply seen to pass it raises it.
UNKNOWN_OUTPUT_CEILING = 16_384


@dataclass(slots=True)
class OutputCeiling:
    """The most completion tokens a request without ``max_tokens`` may come back with.

    Attributes:
        model: the model it is for.
        tokens: the ceiling.
        source: "table" (a documented limit), "assumed" (not in the table) or "seen" (a
            reply of the run used more than the table or the assumption said).
    """

    model: str
    tokens: int
    source: str

    @classmethod
    def for_model(cls, model: str) -> OutputCeiling:
        """The shipped table's ceiling for ``model``, else the assumption for unknown ones."""
        name = model.rsplit("/", 1)[-1].lower()
        prefixes = [prefix for prefix in _OUTPUT_CEILINGS if name.startswith(prefix)]
        if not prefixes:
            return cls(model, UNKNOWN_OUTPUT_CEILING, "assumed")
        return cls(model, _OUTPUT_CEILINGS[max(prefixes, key=len)], "table")

    def observe(self, completion_tokens: int) -> None:
        """A reply to a request without max_tokens used this many: the ceiling is at least
        that (a later request reserves it)."""
        if completion_tokens > self.tokens:
            self.tokens = completion_tokens
            self.source = "seen"

    def worst(self, completion_tokens: float, *, capped: bool) -> float:
        """The most completion tokens one row's request may use: its own ``max_tokens``
        (``completion_tokens`` when ``capped``), else this ceiling."""
        return completion_tokens if capped else max(completion_tokens, float(self.tokens))

    def describe(self) -> str:
        """The assumption, for the run's summary."""
        why = {
            "table": "its documented output limit",
            "assumed": "not in the table of output limits: an assumption",
            "seen": "the longest reply of this run",
        }[self.source]
        return (
            f"budget: a request without max_tokens reserved up to {self.tokens:,} completion "
            f"tokens ({self.model}: {why}); set max_tokens to reserve less"
        )
