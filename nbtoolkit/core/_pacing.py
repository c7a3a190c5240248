"""A request rate learned from 429s alone, for servers whose headers do not state one.

Many servers send no rate headers (local gateways, most proxies), or only remaining counts
(Azure), so `ServerBudget` has nothing to learn a rate from. Cutting concurrency on each
429 (the governor's AIMD) does not pace such a server: with 100 ms replies, 5 requests in
flight already make 50 a second, and every wave of freed workers goes out at once, into the
wall. About a quarter of all requests came back 429 that way.

`LearnedPace` instead paces the requests themselves, as AWS's "adaptive" retry mode and
TCP congestion control do, with AIMD on the admitted rate:

- the first 429 starts the pacing at ``_BACK_OFF`` of the rate the run admitted requests
  at over the last second, and each 429 halves it until a request sent at the new rate
  succeeds (a descent of a few 429s when that second held a burst); from then on a 429
  takes ``_BACK_OFF`` off the rate. Once per reaction: a 429 for a request admitted
  before the last cut was already answered by that cut;
- the server's Retry-After is honoured (the governor's shared pause), but not read as a
  rate: a token bucket's is the time until its next token, 1 ms when it is nearly there,
  and a fixed window's is the time until the window ends;
- each success adds a little: ``_GROWTH`` of the rate at the last cut per second of
  successes, doubling every second without a 429, so the rate keeps probing up to the
  server's limit, and a guess that landed far too low (a stalled machine measures a low
  admitted rate) recovers in seconds;
- the pace spaces requests evenly, with no burst of its own.

Against a token bucket of 50 a second (burst 50), this stays within a few percent of the
server's rate, with one or two 429s each time it probes past it.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable

# A 429 keeps this share of the rate...
_BACK_OFF = 0.85
# ...or this share, while no request sent since the last cut has succeeded yet.
_DESCENT = 0.5
# Each second of successes adds this share of the rate at the last cut: back to it ~1 s
# after a cut of 15%, so a server that allows more is found again in a few seconds.
_GROWTH = 0.15
# The growth doubles each second without a cut, this many times at most.
_MAX_DOUBLINGS = 6.0
# Seconds without a cut that double the growth.
_DOUBLING = 2.0
# How late a paced request may be before the pace stops making up for it (seconds).
_SLACK = 0.05
# Admissions counted for the admitted rate (seconds).
_WINDOW = 1.0
# The least the pace falls to, requests per second; the server's Retry-After and the
# retries' backoff hold the run back further if it must.
_FLOOR = 0.1


class LearnedPace:
    """The request rate a server allows, learned from its 429s (AIMD); None until one."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.rate: float | None = None  # requests per second, once a 429 started the pacing
        self.cuts = 0
        self._clock = clock
        self._next_at = -math.inf  # when the next request may go
        self._cut_at = -math.inf
        self._rate_at_cut = 0.0
        self._found = False  # has a request sent since the last cut succeeded?
        # Times of the last _WINDOW's admissions, and of its accepted replies.
        self._admitted: collections.deque[float] = collections.deque()
        self._accepted: collections.deque[float] = collections.deque()

    def wait(self) -> float:
        """Seconds until the next request may go; 0 if now (or not pacing)."""
        if self.rate is None:
            return 0.0
        return max(0.0, self._next_at - self._clock())

    def admitted(self) -> None:
        """A request went: count it, and space the next one."""
        now = self._clock()
        _count(self._admitted, now)
        if self.rate is not None:
            # Credit for at most _SLACK of idle time: a timer that fires late (a busy
            # machine) does not lower the rate, and an idle spell does not become a burst.
            self._next_at = max(self._next_at, now - _SLACK) + 1.0 / self.rate

    def throttled(self, admitted_at: float) -> None:
        """A 429 for the request admitted at ``admitted_at`` (clock time)."""
        if admitted_at < self._cut_at:
            return  # sent before the last cut, at the rate that cut already lowered
        now = self._clock()
        measured = self._admitted_rate(now)
        if self.rate is None:
            rate = _BACK_OFF * measured
        else:
            rate = (_BACK_OFF if self._found else _DESCENT) * min(self.rate, measured)
        self.rate = max(_FLOOR, rate)
        self._rate_at_cut = self.rate
        self._cut_at = now
        self._next_at = now + 1.0 / self.rate
        self.cuts += 1

    def succeeded(self, admitted_at: float) -> None:
        """The server accepted the request admitted at ``admitted_at``: probe a little higher."""
        _count(self._accepted, self._clock())
        if self.rate is not None:
            self._found = self._found or admitted_at >= self._cut_at
            # One success per 1/rate seconds while paced: _GROWTH x the cut rate per second,
            # twice that after a second without a cut, four times after two, ...
            boost = 2.0 ** min((self._clock() - self._cut_at) / _DOUBLING, _MAX_DOUBLINGS)
            self.rate += _GROWTH * boost * self._rate_at_cut / self.rate

    def _admitted_rate(self, now: float) -> float:
        """Requests admitted, or accepted, over the last _WINDOW, per second (the more).

        Over the whole window even in the run's first second: a first wave sent in 0.1 s
        is a burst the server took from its reserve, not a rate it allows. The accepted
        count stands in when admissions were held back for a while (a slow first reply)
        and the 429 comes after a wave the server accepted earlier.
        """
        admitted = sum(1 for at in self._admitted if at >= now - _WINDOW)
        accepted = sum(1 for at in self._accepted if at >= now - _WINDOW)
        return max(admitted, accepted, 1) / _WINDOW

    def learned(self) -> dict[str, float | int | str | None]:
        """For the run's report: the pace now, and how many 429s cut it."""
        return {
            "rate_per_second": self.rate,
            "window_seconds": None,
            "limit": None,
            "burst": None,
            "basis": f"429s (AIMD, {self.cuts} cuts)",
            "headers": "none",
        }


def _count(times: collections.deque[float], now: float) -> None:
    """Add ``now`` to ``times``, and drop what is older than the window."""
    times.append(now)
    while times[0] < now - _WINDOW:
        times.popleft()
