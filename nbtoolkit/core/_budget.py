"""Hard spending limits: stop sending once ``max_tokens_total`` or ``max_cost`` would be passed.

A request counts against the budget before it is sent, at its worst case (the prompt
estimate plus max_tokens), and is settled to what the reply says it used. So the limit
holds even with many requests in flight: a request goes only if it fits in what is left
after everything already spent or on its way.
"""

from __future__ import annotations

import asyncio

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
        self, prompt_tokens: float, completion_tokens: float, cached_tokens: float = 0.0
    ) -> float | None:
        """What these tokens cost, or None without a price for the model."""
        if self.unit_price is None:
            return None
        return self.unit_price.cost(prompt_tokens, completion_tokens, cached_tokens)

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

    def try_reserve(self, prompt_tokens: float, completion_tokens: float) -> bool:
        """Count a request's worst case against the budget; False if it does not fit now."""
        tokens = prompt_tokens + completion_tokens
        cost = self.price(prompt_tokens, completion_tokens) or 0.0
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
        self._reserved_cost -= self.price(prompt_tokens, completion_tokens) or 0.0
        self._reservations -= 1
        if self._released is not None:
            self._released.set()  # waiters re-check: one may fit now, or none can any more

    def spend(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> None:
        self.tokens += prompt_tokens + completion_tokens
        self.cost += self.price(prompt_tokens, completion_tokens, cached_tokens) or 0.0

    def reason(self) -> str:
        """Why a request was refused: the limit that refused it (the last refusal's)."""
        if self._refused_by == "max_cost" or self.max_tokens_total is None:
            return f"max_cost={self.max_cost:g} reached (spent {self.cost:.4f})"
        return f"max_tokens_total={self.max_tokens_total} reached (spent {self.tokens:.0f})"
