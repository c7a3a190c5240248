"""A circuit breaker: stop a run within seconds once the server is gone, whatever came before.

Each attempt reports whether it reached the server. A failure to connect or a reset (a
`TransportError` that is not a timeout: a slow server is still there) adds to a streak; any
reply at all, an error status included, ends it. The breaker trips when the streak is both
long (at least a pool's worth of attempts, so a few resets among successes never trip it)
and, once the server has answered during this run, old enough (``min_seconds``: a blip of
simultaneous resets is over in less). Before any reply the length alone is enough: a wrong
port or a host that is down shows itself at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from nbtoolkit.errors import RequestTimeout, TransportError

# Long enough that a burst of resets from one restart of a proxy does not stop the run,
# short enough that a dead server costs seconds, not the hours of every row's retries.
DEFAULT_MIN_SECONDS = 3.0


class CircuitBreaker:
    """Counts consecutive attempts that never reached the server."""

    def __init__(
        self,
        *,
        threshold: int,
        min_seconds: float = DEFAULT_MIN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = max(3, threshold)
        self.min_seconds = min_seconds
        self._clock = clock
        self.streak = 0
        self._streak_started = 0.0
        self._heard_back = False
        self.last_error: BaseException | None = None

    def reached(self) -> None:
        """An attempt got a reply (any status): the server is there."""
        self.streak = 0
        self._heard_back = True

    def failed(self, error: BaseException) -> bool:
        """Record an attempt's failure; True when the run should stop."""
        if not unreachable(error):
            return False
        if self.streak == 0:
            self._streak_started = self._clock()
        self.streak += 1
        self.last_error = error
        if self.streak < self.threshold:
            return False
        return not self._heard_back or self._clock() - self._streak_started >= self.min_seconds

    def describe(self) -> str:
        if not self._heard_back:
            return f"the server could not be reached: {self.last_error}"
        seconds = self._clock() - self._streak_started
        return (
            f"the server stopped answering: the last {self.streak} requests failed to reach it "
            f"over {seconds:.1f} s ({self.last_error})"
        )


def unreachable(error: BaseException) -> bool:
    """A failure that says nothing answered: refused, reset, or no connection in time."""
    return isinstance(error, TransportError) and not isinstance(error, RequestTimeout)
