"""The engine's side of the response cache: look-ups, saves, group commit, and failing soft.

Nothing here blocks the event loop. SQLite can wait: a commit for another process's write
lock (up to ``busy_timeout``, 5 s), opening the file for a second process setting it up,
the merge at open and close for the journal and vector spans of a killed run. On the
notebook's loop, any of those froze the progress bar and the stop button. So the run's
`ResponseCache` lives on a thread of its own (one thread: a SQLite connection belongs to
the thread that opened it), and the loop only hands it work:

- answers are held on the loop and handed over in one commit per ``COMMIT_EVERY`` (a
  commit still waiting on a lock gathers the next ones meanwhile);
- a look-up is one hop to the thread per batch of keys (256 rows, or one embeddings
  group), and finds the answers held on the loop too, so a row answered moments ago is
  never asked again;
- opening and closing (with its last commit and merge) run there as well; a run cancelled
  while the file opens closes it once it is open.

A cache that breaks (a full disk, a lock held too long, a file that cannot be read) must
not cost the answers themselves: the rows keep them, only a re-run would pay again. So any
SQLite or file error, on a read or a write, is said once as a warning and the run goes on
without the cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from nbtoolkit.core.endpoints._base import Answer
from nbtoolkit.core.store._cache import CACHE_ERRORS, AnswerRow, CachedAnswer, ResponseCache

# The longest an answer waits for its commit: what a killed process can lose, at most.
COMMIT_EVERY = 0.020

T = TypeVar("T")


class CacheWriter:
    """One run's connection to the cache file, or nothing if there is none or it failed.

    Make one with `open` (or ``CacheWriter()`` for none); close it with `aclose`.
    """

    def __init__(self, *, model: str | None = None) -> None:
        self._model = model
        self._cache: ResponseCache | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        # Answers saved whose commit is not confirmed yet, for look-ups; and those not yet
        # handed to the thread.
        self._memory: dict[bytes, CachedAnswer] = {}
        self._unsent: list[tuple[AnswerRow, CachedAnswer]] = []
        self._committing = False
        # Committed answers to drop from _memory once no look-up is under way (one that
        # read the file before their commit finds them in _memory when it comes back).
        self._confirmed: list[tuple[bytes, CachedAnswer]] = []
        self._lookups = 0
        self._timer: asyncio.TimerHandle | None = None
        self._last_commit = -math.inf  # loop time

    @classmethod
    async def open(cls, path: str | os.PathLike[str] | None, *, model: str | None) -> CacheWriter:
        """Open the cache at ``path`` on the cache's own thread (None: run without one).

        An unusable file is a warning, not an error: the run goes on without the cache.
        """
        writer = cls(model=model)
        if path is None:
            return writer
        thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbtoolkit-cache")
        opening = thread.submit(ResponseCache, path)
        try:
            # Shielded: a cancelled run must not abandon a connection the thread still opens.
            writer._cache = await asyncio.shield(asyncio.wrap_future(opening))
        except CACHE_ERRORS as exc:
            thread.shutdown(wait=False)
            # An unwritable cache folder should not stop the work; it only loses the checkpoint.
            warnings.warn(
                f"response cache {path} unavailable, running without it: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
            return writer
        except BaseException:
            opening.add_done_callback(functools.partial(_close_opened, thread))
            raise
        writer._thread = thread
        return writer

    @property
    def enabled(self) -> bool:
        return self._cache is not None

    async def lookup(
        self, keys: Sequence[bytes], *, binary: bool | None = None
    ) -> dict[bytes, CachedAnswer]:
        """The saved answers among ``keys``; none if the cache cannot be read. ``binary``:
        as `ResponseCache.get_many`."""
        cache = self._cache
        if cache is None or not keys:
            return {}
        self._lookups += 1
        try:
            found = await self._call(functools.partial(cache.get_many, keys, binary=binary))
        except CACHE_ERRORS as exc:
            self._failed("read", exc)
            return {}
        finally:
            self._lookups -= 1
        # After the file, not before: an answer saved while the file was read is here.
        if self._memory:
            for key in keys:
                if key not in found and (answer := self._memory.get(key)) is not None:
                    found[key] = answer
        self._forget_confirmed()
        return found

    def save_many(self, answers: Sequence[tuple[bytes, Answer]]) -> None:
        """Hold answers for the next group commit, and make sure that commit comes."""
        if self._cache is None or not answers:
            return
        unsent, memory = self._unsent, self._memory
        for key, a in answers:
            answer = CachedAnswer(a.stored, a.prompt_tokens, a.completion_tokens, a.cached_tokens)
            unsent.append(((key, *answer), answer))
            memory[key] = answer
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and not self._committing:
            # Commit once this loop turn's replies are all in, or, when replies pour in,
            # once per COMMIT_EVERY: each commit costs ~100 us of CPU however few it holds.
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self._last_commit + COMMIT_EVERY, self.commit)

    def commit(self) -> None:
        """Hand every held answer to the thread, to be made durable in one transaction."""
        self._timer = None
        with contextlib.suppress(RuntimeError):  # no running loop: closing after the run
            self._last_commit = asyncio.get_running_loop().time()
        cache, thread = self._cache, self._thread
        if cache is None or thread is None or not self._unsent or self._committing:
            return
        held, self._unsent = self._unsent, []
        self._committing = True
        rows = [row for row, _ in held]
        done = asyncio.wrap_future(thread.submit(_write, cache, rows, self._model))
        done.add_done_callback(functools.partial(self._committed, held))

    def _committed(
        self, held: list[tuple[AnswerRow, CachedAnswer]], done: asyncio.Future[None]
    ) -> None:
        self._committing = False
        if done.cancelled():
            return
        if (exc := done.exception()) is not None:
            self._failed("write", exc)
            return
        self._confirmed += [(row[0], answer) for row, answer in held]
        self._forget_confirmed()
        if self._unsent:  # saved while this commit waited
            self._schedule()

    def _forget_confirmed(self) -> None:
        if self._lookups or not self._confirmed:
            return
        memory = self._memory
        for key, answer in self._confirmed:
            if memory.get(key) is answer:  # not saved again since
                del memory[key]
        self._confirmed = []

    async def aclose(self) -> None:
        """Commit what is held and close, on the thread; cancels the timer (a notebook's
        loop runs on). Cancelling the caller does not cancel the last commit."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cache, thread = self._cache, self._thread
        self._cache = self._thread = None
        if thread is None:
            return
        rows, self._unsent = [row for row, _ in self._unsent], []
        closing = thread.submit(_write_and_close, cache, rows, self._model)
        thread.shutdown(wait=False)  # the thread ends once it has closed the file
        self._memory.clear()
        try:
            await asyncio.shield(asyncio.wrap_future(closing))
        except CACHE_ERRORS as exc:
            _warn("write", exc)

    async def _call(self, function: Callable[[], T]) -> T:
        assert self._thread is not None
        return await asyncio.wrap_future(self._thread.submit(function))

    def _failed(self, what: str, exc: BaseException) -> None:
        _warn(what, exc)
        cache, thread = self._cache, self._thread
        self._cache = self._thread = None
        self._unsent = []
        self._memory.clear()
        if thread is not None:
            thread.submit(_close_quietly, cache)
            thread.shutdown(wait=False)


def _write(cache: ResponseCache, rows: list[AnswerRow], model: str | None) -> None:
    cache.put_many(rows, model=model)
    cache.commit()


def _write_and_close(cache: ResponseCache | None, rows: list[AnswerRow], model: str | None) -> None:
    if cache is None:
        return
    try:
        cache.put_many(rows, model=model)
    finally:
        cache.close()  # commits, merges, and closes even if the put failed


def _close_quietly(cache: ResponseCache | None) -> None:
    if cache is not None:
        with contextlib.suppress(*CACHE_ERRORS):
            cache.close()


def _close_opened(
    thread: concurrent.futures.ThreadPoolExecutor, opening: concurrent.futures.Future[Any]
) -> None:
    """Close a cache whose run was cancelled while it opened, on its own thread."""
    if not opening.cancelled() and opening.exception() is None:
        thread.submit(_close_quietly, opening.result())
    thread.shutdown(wait=False)


def _warn(what: str, exc: BaseException) -> None:
    warnings.warn(
        f"response cache {what} failed, carrying on without it: {exc}",
        RuntimeWarning,
        stacklevel=3,
    )
