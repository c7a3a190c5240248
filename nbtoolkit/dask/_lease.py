"""One partition's lease on the run's cluster-wide concurrency, and the governor that obeys it.

Why a lease and not a lock per request: a ``distributed.Semaphore`` acquired per request
costs a scheduler round trip per request, and at a few thousand requests a second the
scheduler becomes the bottleneck (it stalled in the issue's experiments). Here a partition
talks to the scheduler every ``POLL_SECONDS`` (and when it starts and ends), whatever its
request rate: it reports how many rows it still has to finish and any 429 pause, gives back
idle slots above its fair share, and takes what the ledger grants. Within the partition the
engine's own `RateGovernor` admits requests, never more in flight than the slots it holds.

Safety: a partition raises its local slot count only after the ledger has granted the
slots, and lowers it before it gives them back, so the slots in use across the cluster never
exceed what the ledger has handed out, which never exceeds ``max_parallel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from nbtoolkit.core._limits import RateGovernor, Ticket
from nbtoolkit.core._rows import ProgressListener, RowResult
from nbtoolkit.dask._ledger import SlotLedger, wall_to_monotonic
from nbtoolkit.errors import RunAborted

# How often a running partition re-balances with the ledger: the longest a late partition
# waits for its share, and the longest a 429 seen elsewhere takes to pause this one.
POLL_SECONDS = 0.05
PLUGIN_NAME = "nbtoolkit-ledger"


class Transport(Protocol):
    """How a partition reaches the run's ledger (the scheduler, or this process)."""

    worker: str

    async def call(self, op: str, **kwargs: Any) -> Any: ...


class LocalTransport:
    """The ledger in this process: dask's threaded scheduler (all partitions share it)."""

    worker = "local"
    ledger = SlotLedger()

    async def call(self, op: str, **kwargs: Any) -> Any:
        return getattr(self.ledger, op)(**kwargs)


class SchedulerTransport:
    """The ledger on the distributed scheduler, reached over the worker's own connection.

    The partition runs its own event loop on a worker thread; the worker's comms belong to
    the worker's loop, so each call is handed to that loop and awaited from ours.
    """

    _installed: ClassVar[set[str]] = (
        set()
    )  # scheduler addresses whose ledger plugin this process saw

    def __init__(self, worker: Any) -> None:
        self._worker = worker
        self.worker: str = worker.address

    async def call(self, op: str, **kwargs: Any) -> Any:
        await self._install()
        return await self._on_worker_loop(getattr(self._worker.scheduler, f"nbtoolkit_{op}"))(
            **kwargs
        )

    async def _install(self) -> None:
        address = self._worker.scheduler.address
        if address in self._installed:
            return
        from distributed.protocol.pickle import dumps

        # idempotent: the first partition to get here installs it, the rest leave it be
        # (a second install would replace the ledger and forget who holds what).
        register = self._on_worker_loop(self._worker.scheduler.register_scheduler_plugin)
        plugin = dumps(ledger_plugin_class()())  # type: ignore[no-untyped-call]
        await register(plugin=plugin, name=PLUGIN_NAME, idempotent=True)
        self._installed.add(address)

    def _on_worker_loop(self, function: Callable[..., Any]) -> Callable[..., Any]:
        loop = self._worker.loop.asyncio_loop

        async def call(**kwargs: Any) -> Any:
            future = asyncio.run_coroutine_threadsafe(function(**kwargs), loop)
            return await asyncio.wrap_future(future)

        return call


def connect() -> Transport:
    """The ledger for a partition running here: the scheduler's, or this process's."""
    try:
        from distributed import get_worker

        return SchedulerTransport(get_worker())
    except (ImportError, ValueError):  # no distributed, or not on a distributed worker
        return LocalTransport()


def __getattr__(name: str) -> Any:
    """``LedgerPlugin``, made on first use: its base class is in ``distributed``.

    ``import nbtoolkit`` must not import ``distributed`` (a second); the scheduler unpickles
    the plugin by this name, which lands here too.
    """
    if name == "LedgerPlugin":
        return ledger_plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ledger_plugin_class() -> type:
    """The scheduler plugin class (``LedgerPlugin``), made once, on the first call."""
    if (made := globals().get("LedgerPlugin")) is not None:
        return made  # type: ignore[no-any-return]
    from distributed.diagnostics.plugin import SchedulerPlugin

    # Typed as Any, as before: its start() is sync here, which distributed also accepts.
    base: Any = SchedulerPlugin

    class LedgerPlugin(base):  # type: ignore[misc]
        """Keeps a `SlotLedger` on the scheduler; frees a dead worker's slots."""

        idempotent = True
        name = PLUGIN_NAME

        def __init__(self) -> None:
            self.ledger = SlotLedger()

        def start(self, scheduler: Any) -> None:
            for op in ("sync", "leave", "abort", "report", "reports"):
                scheduler.handlers[f"nbtoolkit_{op}"] = getattr(self.ledger, op)

        def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
            self.ledger.drop_worker(worker)

    LedgerPlugin.__module__ = __name__
    LedgerPlugin.__qualname__ = "LedgerPlugin"  # pickled by name: module.LedgerPlugin
    globals()["LedgerPlugin"] = LedgerPlugin
    return LedgerPlugin


class Lease:
    """One partition's slots; kept in step with the ledger by `keep()` while the run goes.

    Args:
        transport: where the ledger is.
        run: the run's id (one per ``ddf.chat.<method>()`` call).
        holder: this attempt at this partition (a rescheduled partition is a new holder).
        capacity: the run's max_parallel.
        rows: rows in the partition (its demand until some finish).
    """

    def __init__(
        self, transport: Transport, *, run: str, holder: str, capacity: int, rows: int
    ) -> None:
        self._transport = transport
        self._run = run
        self._holder = holder
        self.capacity = capacity
        self.slots = 0
        self.share = 0
        self.rows_left = rows
        self.aborted: str | None = None
        self.paused_until = 0.0  # wall clock, as the ledger keeps it
        self._pause_to_send = 0.0
        self.governor: LeasedGovernor | None = None
        self.on_abort: Callable[[str], None] | None = None

    async def acquire(self) -> None:
        """Wait for a first slot (or raise RunAborted if the run was stopped meanwhile)."""
        while True:
            await self.sync()
            if self.aborted is not None:
                raise RunAborted(self.aborted)
            if self.slots > 0 or self.rows_left == 0:
                return
            await asyncio.sleep(POLL_SECONDS)

    async def keep(self) -> None:
        """Re-balance every POLL_SECONDS until cancelled; stop the partition on an abort."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            await self.sync()
            if self.aborted is not None:
                if self.on_abort is not None:
                    self.on_abort(self.aborted)
                return

    async def sync(self) -> None:
        in_use = self.governor.in_flight if self.governor is not None else 0
        # Give back idle slots above what this partition should hold; lowered here first,
        # so no request can start on a slot that is on its way back.
        release = max(0, min(self.slots - in_use, self.slots - min(self.share, self.rows_left)))
        self.slots -= release
        reply = await self._transport.call(
            "sync",
            run=self._run,
            holder=self._holder,
            worker=self._transport.worker,
            capacity=self.capacity,
            demand=self.rows_left,
            release=release,
            pause_until=self._pause_to_send,
        )
        self._pause_to_send = 0.0
        self.slots += int(reply["granted"])
        self.share = int(reply["share"])
        self.aborted = reply["aborted"]
        if reply["paused_until"] > self.paused_until:
            self.paused_until = float(reply["paused_until"])
        if self.governor is not None:
            self.governor.follow(self)

    def paused(self, seconds: float) -> None:
        """A 429 here: tell the others on the next sync."""
        self._pause_to_send = max(self._pause_to_send, time.time() + seconds)

    async def leave(self) -> None:
        self.slots = 0
        with contextlib.suppress(Exception):  # a scheduler that is gone frees them itself
            await self._transport.call("leave", run=self._run, holder=self._holder)


class LeasedGovernor(RateGovernor):
    """The engine's governor, capped at the slots the partition holds.

    ``rpm``/``tpm`` are split the same way as the slots: a partition holding k of
    max_parallel slots paces at k/max_parallel of each budget, so the partitions together
    never go faster than the budget (bursts aside: each bucket holds one second's worth).
    """

    def __init__(self, lease: Lease, **options: Any) -> None:
        super().__init__(**options)
        self._lease = lease
        # The whole run's budgets, per second and burst, for the shares to be cut from.
        self._full = tuple(
            None if bucket is None else (bucket.rate, bucket.capacity)
            for bucket in (self.requests, self.tokens)
        )
        self._seen_slots = -1
        lease.governor = self
        self.follow(lease)

    def follow(self, lease: Lease) -> None:
        """Take the lease's slot count and any cluster-wide pause; wake waiting requests."""
        if lease.paused_until:
            self.paused_until = max(self.paused_until, wall_to_monotonic(lease.paused_until))
        if lease.slots != self._seen_slots:
            self._seen_slots = lease.slots
            share = max(lease.slots, 1) / lease.capacity
            for bucket, full in zip((self.requests, self.tokens), self._full, strict=True):
                if bucket is not None and full is not None:
                    bucket.retune(full[0] * share, full[1] * share)
        self._changed.set()

    def _wait_needed(self, tokens: float) -> tuple[float, str]:
        wait, reason = super()._wait_needed(tokens)
        if wait <= 0 and self.in_flight >= self._lease.slots:
            return math.inf, "cluster-wide max_parallel"  # woken by follow() or settle()
        return wait, reason

    def settle(self, ticket: Ticket, *, pause: float | None = None, **outcome: Any) -> None:
        super().settle(ticket, pause=pause, **outcome)
        if pause is not None and pause > 0:
            self._lease.paused(pause)


class RowCounter:
    """Passes the engine's row events on, counting finished rows (the partition's demand)."""

    def __init__(self, lease: Lease, inner: ProgressListener | None) -> None:
        self._lease = lease
        self._inner = inner

    def row_done(self, result: RowResult) -> None:
        self._lease.rows_left -= 1
        if self._inner is not None:
            self._inner.row_done(result)

    def row_retried(self) -> None:
        if self._inner is not None:
            self._inner.row_retried()

    def row_waiting(self, seconds: float, reason: str) -> None:
        if self._inner is not None:
            self._inner.row_waiting(seconds, reason)
