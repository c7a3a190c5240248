"""The engine's side of the response cache: look-ups, saves, group commit, and failing soft.

A cache that breaks (a full disk, a lock held too long, a file that cannot be read) must
not cost the answers themselves: the rows keep them, only a re-run would pay again. So any
SQLite or file error, on a read or a write, is said once as a warning and the run goes on
without the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from nbtoolkit.core.endpoints._base import Answer
from nbtoolkit.core.store._cache import CACHE_ERRORS, CachedAnswer, ResponseCache

# The longest an answer waits for its commit: what a killed process can lose, at most.
COMMIT_EVERY = 0.020


class CacheWriter:
    """One run's connection to the cache file, or nothing if there is none or it failed."""

    def __init__(self, path: Path | None, *, model: str | None) -> None:
        self._model = model
        self._cache: ResponseCache | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_commit = -math.inf  # loop time
        if path is None:
            return
        try:
            self._cache = ResponseCache(path)
        except CACHE_ERRORS as exc:
            # An unwritable cache folder should not stop the work; it only loses the checkpoint.
            warnings.warn(
                f"response cache {path} unavailable, running without it: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def enabled(self) -> bool:
        return self._cache is not None

    def lookup(
        self, keys: Sequence[bytes], *, binary: bool | None = None
    ) -> dict[bytes, CachedAnswer]:
        """The saved answers among ``keys``; none if the cache cannot be read. ``binary``:
        as `ResponseCache.get_many`."""
        if self._cache is None or not keys:
            return {}
        try:
            return self._cache.get_many(keys, binary=binary)
        except CACHE_ERRORS as exc:
            self._failed("read", exc)
            return {}

    def save_many(self, answers: Sequence[tuple[bytes, Answer]]) -> None:
        """Hold answers for the next group commit, and make sure that commit comes."""
        if self._cache is None or not answers:
            return
        try:
            self._cache.put_many(
                [
                    (key, a.stored, a.prompt_tokens, a.completion_tokens, a.cached_tokens)
                    for key, a in answers
                ],
                model=self._model,
            )
        except CACHE_ERRORS as exc:
            self._failed("write", exc)
            return
        if self._timer is None:
            # Commit once this loop turn's replies are all in, or, when replies pour in,
            # once per COMMIT_EVERY: each commit costs ~100 us of CPU however few it holds.
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self._last_commit + COMMIT_EVERY, self.commit)

    def commit(self) -> None:
        """Make every held answer durable now."""
        self._timer = None
        with contextlib.suppress(RuntimeError):  # no running loop: closing after the run
            self._last_commit = asyncio.get_running_loop().time()
        if self._cache is None:
            return
        try:
            self._cache.commit()
        except CACHE_ERRORS as exc:
            self._failed("write", exc)

    def close(self) -> None:
        """Commit what is held and close; cancels the timer (a notebook's loop runs on)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._cache is None:
            return
        try:
            self._cache.close()
        except CACHE_ERRORS as exc:
            self._failed("write", exc)
        self._cache = None

    def _failed(self, what: str, exc: Exception) -> None:
        warnings.warn(
            f"response cache {what} failed, carrying on without it: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )
        if self._cache is not None:
            with contextlib.suppress(*CACHE_ERRORS):
                self._cache.close()
        self._cache = None
