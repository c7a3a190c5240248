"""A run keeps the objects made before it out of the garbage collector's walks, and gives
them back when it ends, however it ends (core/_heap.py)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator, Sequence

import pytest

from nbtoolkit import ChatConfig, ChatRequest, ChatRun
from nbtoolkit.core._rows import RowResult
from nbtoolkit.testing import ChatServer
from tests.conftest import FAST_RETRY, MODEL


class FreezeSeen:
    """A progress listener that notes the collector's frozen count as each row finishes."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def row_done(self, result: RowResult) -> None:
        self.counts.append(gc.get_freeze_count())

    def rows_done(self, results: Sequence[RowResult]) -> None:
        self.counts += [gc.get_freeze_count()] * len(results)

    def row_retried(self) -> None:
        pass

    def row_waiting(self, seconds: float, reason: str) -> None:
        pass


def rows(n: int, prefix: str = "p") -> list[ChatRequest]:
    return [ChatRequest(({"role": "user", "content": f"{prefix}{i}"},)) for i in range(n)]


def run(server: ChatServer, listener: FreezeSeen) -> ChatRun:
    config = ChatConfig(
        base_url=server.base_url, model=MODEL, retry=FAST_RETRY, progress=False, cache=False
    )
    return ChatRun(config, listener=listener)


@pytest.fixture(autouse=True)
def _nothing_frozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


async def test_a_run_freezes_what_came_before_and_gives_it_back() -> None:
    before = object()  # made before the run: out of the collector's walks during it
    seen = FreezeSeen()
    async with ChatServer() as server:
        await run(server, seen).execute(rows(20))
    assert len(seen.counts) == 20 and min(seen.counts) > 0
    assert gc.get_freeze_count() == 0
    assert before is not None


async def test_overlapping_runs_unfreeze_when_the_last_ends() -> None:
    """The first run to start freezes, the last to end unfreezes: a run that ends first
    does not thaw the heap under one still going."""
    quick, slow = FreezeSeen(), FreezeSeen()
    async with ChatServer(latency=0.01) as server:
        await asyncio.gather(
            run(server, quick).execute(rows(2, "q")),
            run(server, slow).execute(rows(40, "s")),
        )
    assert min(slow.counts) > 0  # still frozen after the quick run had ended
    assert gc.get_freeze_count() == 0


async def test_a_cancelled_run_gives_the_heap_back() -> None:
    seen = FreezeSeen()
    async with ChatServer(latency=5.0) as server:
        task = asyncio.ensure_future(run(server, seen).execute(rows(4)))
        async with asyncio.timeout(10):
            while server.in_flight == 0:  # noqa: ASYNC110 (the server's counter, polled)
                await asyncio.sleep(0.01)
        assert gc.get_freeze_count() > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert gc.get_freeze_count() == 0


async def test_a_freeze_made_by_someone_else_is_left_alone() -> None:
    """A process that froze its heap itself (a server before forking workers) keeps it
    frozen: the run neither adds to it nor thaws it."""
    gc.freeze()
    frozen = gc.get_freeze_count()
    seen = FreezeSeen()
    async with ChatServer() as server:
        await run(server, seen).execute(rows(5))
    assert max(seen.counts) <= frozen  # nothing added to it (freed objects leave it)
    assert gc.get_freeze_count() > 0  # and not thawed
