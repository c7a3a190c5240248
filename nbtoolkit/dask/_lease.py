"""One partition's lease on the run's cluster-wide concurrency, and how its run obeys it.

Why a lease and not a lock per request: a ``distributed.Semaphore`` acquired per request
costs a scheduler round trip per request, and at a few thousand requests a second the
scheduler becomes the bottleneck (it stalled in the issue's experiments). Here a partition
talks to the scheduler every ``POLL_SECONDS`` (and when it starts and ends), whatever its
request rate: it reports how many rows it still has to finish and any 429 pause, gives back
idle slots above its fair share, and takes what the ledger grants. Within the partition the
engine's own `RateGovernor` admits requests, through its declared seams: ``hold_to`` (never
more in flight than the slots held), ``share`` (that part of ``rpm``/``tpm`` and of what the
server's rate headers allow) and ``pause`` (a 429 seen in any partition).

Safety: a partition raises its local slot count only after the ledger has granted the
slots, and lowers it before it gives them back, so the slots in use across the cluster never
exceed what the ledger has handed out, which never exceeds ``max_parallel``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

from nbtoolkit.core._limits import RateGovernor
from nbtoolkit.core._rows import RowResult
from nbtoolkit.dask._ledger import SlotLedger
from nbtoolkit.errors import ConfigError, RunAborted

# How often a running partition re-balances with the ledger: the longest a late partition
# waits for its share, and the longest a 429 seen elsewhere takes to pause this one.
POLL_SECONDS = 0.05
PLUGIN_NAME = "nbtoolkit-ledger"
LEAVE_ATTEMPTS = 4  # tries to give a partition's slots back (waits 0.05, 0.1, 0.2 s between)


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


def connect(driver: int) -> Transport:
    """The ledger for a partition running here: the scheduler's, or this process's.

    Args:
        driver: the process id of the process that built the graph.

    Raises:
        ConfigError: neither on a distributed worker nor in the driver's process (dask's
            "processes" scheduler): no ledger is shared there, so ``max_parallel`` and the
            rate limits could not hold for the whole computation. Nothing has been sent.
    """
    try:
        from distributed import get_worker

        return SchedulerTransport(get_worker())
    except (ImportError, ValueError):  # no distributed, or not on a distributed worker
        pass
    if os.getpid() != driver:
        raise ConfigError(
            "ddf.chat cannot run on dask's 'processes' scheduler: its processes share no "
            "ledger, so max_parallel and the rate limits would hold per process, not for the "
            "computation. What to do: compute() on the threaded scheduler (dask.dataframe's "
            "default: scheduler='threads'), or on a distributed cluster "
            "(distributed.Client(), also on one machine)"
        )
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


class LeaseLost(Exception):
    """The ledger no longer knows this attempt at a partition: its worker was reported dead
    while it still ran, and the scheduler runs the partition again elsewhere. Waiting for
    slots would wait forever; this attempt stops instead, and its output is not used."""

    def __init__(self) -> None:
        super().__init__(
            "this attempt at the partition lost its slots (its worker was reported gone); "
            "the scheduler runs the partition again elsewhere"
        )


class Lease:
    """One partition's slots; kept in step with the ledger by `keep()` while the run goes.

    Lives on the partition's own event loop (one thread): only the ledger is shared.

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
        self.gone = False  # the ledger no longer knows this holder (see `LeaseLost`)
        self.paused_until = 0.0  # wall clock, as the ledger keeps it
        self._pause_to_send = 0.0
        self._followed_pause = 0.0
        self.governor: RateGovernor | None = None
        self.on_abort: Callable[[str], None] | None = None

    def attach(self, governor: RateGovernor) -> None:
        """Make ``governor`` (the run's) obey this lease from now on."""
        self.governor = governor
        self._follow()

    async def acquire(self) -> None:
        """Wait for a first slot (or raise RunAborted if the run was stopped meanwhile)."""
        while True:
            await self.sync()
            if self.gone:
                raise LeaseLost()
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
            if self.gone:
                raise LeaseLost()  # the partition stops (see nbtoolkit.dask._accessor)
            if self.aborted is not None:
                if self.on_abort is not None:
                    self.on_abort(self.aborted)
                return

    async def sync(self) -> None:
        """Give back idle slots above this partition's share, take what the ledger grants."""
        in_use = self.governor.in_flight if self.governor is not None else 0
        # Give back idle slots above what this partition should hold; lowered here first,
        # so no request can start on a slot that is on its way back.
        release = max(0, min(self.slots - in_use, self.slots - min(self.share, self.rows_left)))
        self.slots -= release
        self._follow()
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
        self.gone = bool(reply.get("gone"))
        if reply["paused_until"] > self.paused_until:
            self.paused_until = float(reply["paused_until"])
        self._follow()

    def _follow(self) -> None:
        """Hand the slot count, the budget share and any cluster-wide pause to the governor."""
        governor = self.governor
        if governor is None:
            return
        governor.hold_to(self.slots)
        # k of max_parallel slots: k/max_parallel of rpm, tpm and the server's budget, so
        # the partitions together keep to them (bursts aside: a bucket holds one second's).
        governor.share(max(self.slots, 1) / self.capacity)
        if self.paused_until > self._followed_pause:
            self._followed_pause = self.paused_until
            governor.pause(self.paused_until - time.time())

    def paused(self, seconds: float) -> None:
        """A 429 here paused this partition: tell the others on the next sync."""
        self._pause_to_send = max(self._pause_to_send, time.time() + seconds)

    async def leave(self) -> None:
        """Give every slot back: the partition is done (or failed).

        Tried a few times: slots a holder never gives back are lost to the rest of the run,
        whose later partitions could then wait for them forever.
        """
        self.slots = 0
        for attempt in range(LEAVE_ATTEMPTS):
            try:
                await self._transport.call("leave", run=self._run, holder=self._holder)
                return
            except Exception:  # a scheduler that is gone frees them itself
                if attempt + 1 < LEAVE_ATTEMPTS:
                    await asyncio.sleep(POLL_SECONDS * 2**attempt)


class RowCounter:
    """Counts the partition's finished rows: its demand, as the ledger sees it."""

    def __init__(self, lease: Lease) -> None:
        self._lease = lease

    def row_done(self, result: RowResult) -> None:
        self._lease.rows_left -= 1

    def rows_done(self, results: Sequence[RowResult]) -> None:
        self._lease.rows_left -= len(results)

    def row_retried(self) -> None:
        """Nothing to count: a retried row is still to finish."""

    def row_waiting(self, seconds: float, reason: str) -> None:
        """Nothing to count: partitions show no progress bar."""
