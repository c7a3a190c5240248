"""The cluster-wide books of a distributed run: who holds which concurrency slots, a shared
pause, an abort flag, and each partition's report.

Plain Python with no dask import: the scheduler keeps one `SlotLedger` (installed by
`nbtoolkit.dask._lease.LedgerPlugin`), and a run on dask's threaded scheduler keeps one in
the process. Each partition of a run is a *holder*: it tells the ledger how many rows it
still has to finish (its demand) and gets slots back, never more in all than the run's
``max_parallel``. Slots are shared out by water-filling: a holder that needs fewer than an
even share gets what it needs, the rest split what is left. A holder that holds more than
its share gives back idle slots on its next call, so a partition that starts late gets its
share within one polling interval, and a partition's tail frees slots for the others.

Thread-safe: on dask's threaded scheduler every partition's thread calls the same ledger,
so each call holds one lock for its whole read-compute-write (two partitions must never
both be granted the same free slots, nor iterate the holders while another changes them).
On the scheduler the calls come from its one event loop; the lock costs nothing there.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

# Runs whose books are kept; older ones are forgotten (their reports with them).
_KEPT_RUNS = 32


@dataclass
class _Holder:
    worker: str  # the worker's address: its slots are freed if that worker dies
    demand: int  # rows it still has to finish
    held: int = 0


@dataclass
class _Run:
    capacity: int
    holders: dict[str, _Holder] = field(default_factory=dict)
    paused_until: float = 0.0  # wall clock (time.time()): processes share no monotonic clock
    aborted: str | None = None  # the message of the systemic failure that stopped the run
    reports: dict[int, bytes] = field(default_factory=dict)  # partition number -> report
    peak_held: int = 0  # the most slots held at once: what the tests check against capacity
    left: set[str] = field(default_factory=set)  # holders gone: never granted slots again


def fair_shares(capacity: int, demands: dict[str, int]) -> dict[str, int]:
    """Water-filling: each holder's share of ``capacity`` slots, never above its demand."""
    shares: dict[str, int] = {}
    left = capacity
    pending = sorted(demands, key=lambda name: demands[name])
    while pending and demands[pending[0]] * len(pending) <= left:
        name = pending.pop(0)
        shares[name] = demands[name]
        left -= demands[name]
    for position, name in enumerate(pending):
        even, extra = divmod(left, len(pending))
        shares[name] = even + (1 if position < extra else 0)
    return shares


class SlotLedger:
    """The books of every distributed run this scheduler (or process) has seen."""

    def __init__(self) -> None:
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (inside the scheduler plugin) on its way to the scheduler: a lock is not.
        with self._lock:
            return {"runs": OrderedDict(self._runs)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._runs = state["runs"]
        self._lock = threading.Lock()

    def _run(self, run: str, capacity: int) -> _Run:
        book = self._runs.get(run)
        if book is None:
            book = self._runs[run] = _Run(capacity)
            while len(self._runs) > _KEPT_RUNS:
                self._runs.popitem(last=False)
        return book

    def sync(
        self,
        *,
        run: str,
        holder: str,
        worker: str,
        capacity: int,
        demand: int,
        release: int = 0,
        pause_until: float = 0.0,
    ) -> dict[str, Any]:
        """Give back ``release`` slots, record demand and any pause; grant what is fair.

        Returns:
            ``granted`` (new slots, 0 or more), ``share`` (what this holder should hold),
            ``paused_until`` (wall clock), ``aborted`` (None, or why the run stopped) and
            ``gone`` (True: this holder left, or its worker was reported dead and its
            partition handed to another; it must send nothing more).
        """
        with self._lock:
            return self._sync(run, holder, worker, capacity, demand, release, pause_until)

    def _sync(
        self,
        run: str,
        holder: str,
        worker: str,
        capacity: int,
        demand: int,
        release: int,
        pause_until: float,
    ) -> dict[str, Any]:
        book = self._run(run, capacity)
        if holder in book.left:
            # A late message from a holder that has left (its last sync, cancelled on the
            # way, arrived after its leave), or from a worker the scheduler declared dead
            # while it still ran: it must not come back and hold slots again.
            return {
                "granted": 0,
                "share": 0,
                "paused_until": book.paused_until,
                "aborted": book.aborted,
                "gone": True,
            }
        entry = book.holders.setdefault(holder, _Holder(worker, demand))
        entry.held = max(0, entry.held - release)
        entry.demand = max(0, demand)
        book.paused_until = max(book.paused_until, pause_until)
        granted = 0
        share = 0
        if book.aborted is None:
            shares = fair_shares(book.capacity, {n: h.demand for n, h in book.holders.items()})
            share = shares[holder]
            free = book.capacity - sum(h.held for h in book.holders.values())
            granted = max(0, min(share - entry.held, free))
            entry.held += granted
            book.peak_held = max(book.peak_held, sum(h.held for h in book.holders.values()))
        return {
            "granted": granted,
            "share": share,
            "paused_until": book.paused_until,
            "aborted": book.aborted,
            "gone": False,
        }

    def leave(self, *, run: str, holder: str) -> None:
        """A partition finished (or failed): its slots go back to the others."""
        with self._lock:
            book = self._runs.get(run)
            if book is not None:
                book.holders.pop(holder, None)
                book.left.add(holder)

    def abort(self, *, run: str, message: str) -> None:
        """Stop the run: every later sync says so, and no slot is granted any more."""
        with self._lock:
            book = self._run(run, 1)
            if book.aborted is None:
                book.aborted = message

    def report(self, *, run: str, partition: int, report: bytes) -> None:
        """Keep a partition's report; a re-run partition's replaces the earlier one."""
        with self._lock:
            self._run(run, 1).reports[partition] = report

    def reports(self, *, run: str) -> dict[str, Any]:
        """The reports of a run so far, by partition, and the most slots held at once."""
        with self._lock:
            book = self._runs.get(run)
            if book is None:
                return {"reports": [], "peak_held": 0, "aborted": None}
            return {
                "reports": [book.reports[n] for n in sorted(book.reports)],
                "peak_held": book.peak_held,
                "aborted": book.aborted,
            }

    def drop_worker(self, worker: str) -> None:
        """A worker left or died: the slots its partitions held are free again."""
        with self._lock:
            for book in self._runs.values():
                for name in [n for n, h in book.holders.items() if h.worker == worker]:
                    del book.holders[name]
                    book.left.add(name)


def wall_to_monotonic(wall: float) -> float:
    """A wall-clock instant as this process's monotonic clock reads it."""
    return time.monotonic() + (wall - time.time())
