"""``ddf.chat``: the pandas accessor's methods on a Dask DataFrame or Series, lazily.

``ddf.chat.complete(...)`` takes the pandas accessor's arguments and returns a lazy Dask
collection built with ``map_partitions`` and an explicit ``meta`` (no request is sent while
the graph is built). Each partition runs the pandas method itself, through the accessor's
declared seams (`RunHooks` for the engine, ``report_to`` for the report), with three changes:

- its concurrency comes from a lease on the run's cluster-wide slots
  (`nbtoolkit.dask._lease`), so ``max_parallel``, ``rpm``, ``tpm`` and the server's rate
  headers hold for the whole computation, and a 429 seen anywhere pauses every partition;
  the rest of the run's options (``retry_after_max``, budgets) hold as they do in pandas;
- a systemic failure (bad key, quota) sets the run's abort flag: the partition raises
  `RunAborted` once, running partitions stop within a poll, later ones send nothing;
- no progress bar (Dask's progress bar or dashboard shows the computation), and a report
  per partition goes to the ledger, combined by `last_dask_run()`; ``last_run()`` is left
  as it was (on the threaded scheduler partitions run in the caller's process).

Adding a method (``extract``, ``embed``) is one line in `DaskChatAccessor`: the partition
function takes the accessor method's name and its arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import pickle
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._engine import RunHooks, governor_for, results_in_order
from nbtoolkit.core._pricing import format_money
from nbtoolkit.core._rows import RunStats
from nbtoolkit.core._runner import run_sync
from nbtoolkit.dask._lease import Lease, LocalTransport, RowCounter, connect
from nbtoolkit.errors import ConfigError, RunAborted
from nbtoolkit.frame._accessor import ChatAccessor, SeriesChatAccessor, _ChatAccessorBase
from nbtoolkit.frame._batch import batch_mode
from nbtoolkit.frame._estimate import check_pilot
from nbtoolkit.frame._options import RUN_OPTIONS, RunOptions
from nbtoolkit.frame._report import RunReport, rows_frame

# Failed rows kept per partition in its report: the reasons stay readable without the
# report of a 20-million-row run growing with its failures.
MAX_ERRORS_PER_PARTITION = 10_000
_built: deque[str] = deque(maxlen=32)  # the ids of the runs this process built, oldest first


@dataclass(frozen=True)
class PartitionSpec:
    """What every partition of one run needs: the pandas method and its arguments."""

    run: str  # one id per ddf.chat.<method>() call
    method: str  # the pandas accessor's method: "complete" (later "extract", "embed")
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(repr=False)
    config: ChatConfig  # resolved on the client; its repr hides the key
    driver: int  # the id of the process that built the graph (see `connect`)

    def __dask_tokenize__(self) -> str:
        return self.run


@dataclass(frozen=True)
class PartitionReport:
    """One partition's outcome, as the ledger keeps it (pickled)."""

    partition: int
    rows: int
    outcome: str  # "finished" or "aborted"
    stats: RunStats
    started: float  # wall clock
    finished: float
    statuses: dict[str, int]  # rows by status ("ok", "failed", "skipped", ...)
    errors: pd.DataFrame  # the rows without an answer (at most MAX_ERRORS_PER_PARTITION)


@dataclass(frozen=True, eq=False)
class DaskRunReport:
    """The combined report of a distributed run (see `last_dask_run`).

    Attributes:
        run: the run's id.
        outcome: "finished", "aborted", or "running" (not every partition has reported).
        partitions: one report per partition that finished or stopped.
        stats: requests, retries, statuses, tokens and cost, summed over the partitions.
        errors: the rows with no answer, with the partition's index and their reasons.
        peak_slots: the most concurrency slots held at once across the cluster.
    """

    run: str
    outcome: str
    partitions: list[PartitionReport]
    stats: RunStats
    errors: pd.DataFrame
    peak_slots: int

    @property
    def rows(self) -> Counter[str]:
        """Rows by status, summed over the partitions."""
        total: Counter[str] = Counter()
        for part in self.partitions:
            total.update(part.statuses)
        return total

    def summary(self) -> str:
        """One line: rows by status; requests, cache hits, retries, 429s; tokens, cost, time."""
        stats = self.stats
        rows = ", ".join(f"{n} {status}" for status, n in sorted(self.rows.items()))
        statuses = ", ".join(f"{key}: {n}" for key, n in sorted(stats.statuses.items()))
        cost = f", cost {format_money(stats.cost)}"  # None: "price unknown", never $0
        return (
            f"{self.outcome}: {rows or 'no rows'} in {len(self.partitions)} partitions; "
            f"{stats.requests_sent} requests ({statuses or 'none'}), {stats.cache_hits} cache "
            f"hits, {stats.retries} retries, {stats.statuses.get('429', 0)} rate-limited; "
            f"{stats.prompt_tokens + stats.completion_tokens:,} tokens{cost}; "
            f"peak {self.peak_slots} slots; {stats.wall_seconds:.1f} s"
        )

    def __repr__(self) -> str:
        return f"<DaskRunReport {self.summary()}>"


class DaskChatAccessor:
    """``ddf.chat`` / ``dseries.chat``: the pandas accessor's methods, run per partition.

    Each method takes the same arguments as its pandas twin and returns a lazy Dask
    collection; nothing is sent before ``.compute()`` (or ``.persist()``). ``max_parallel``,
    ``rpm`` and ``tpm`` are for the whole computation, across every worker.
    """

    def __init__(self, collection: Any) -> None:
        self._obj = collection

    def complete(self, *args: Any, **kwargs: Any) -> Any:
        """Lazy ``complete``: the pandas accessor's arguments, a Dask collection back.

        Raises:
            ConfigError: bad arguments (while the graph is built, before anything is sent).
        """
        return lazy_method(self._obj, "complete", args, kwargs)

    complete.__signature__ = inspect.signature(_ChatAccessorBase.acomplete)  # type: ignore[attr-defined]

    def extract(self, *args: Any, **kwargs: Any) -> Any:
        """Lazy ``extract``: typed columns per partition, a Dask collection back."""
        return lazy_method(self._obj, "extract", args, kwargs)

    extract.__signature__ = inspect.signature(_ChatAccessorBase.aextract)  # type: ignore[attr-defined]

    def classify(self, *args: Any, **kwargs: Any) -> Any:
        """Lazy ``classify``: a category column per partition, a Dask collection back."""
        return lazy_method(self._obj, "classify", args, kwargs)

    classify.__signature__ = inspect.signature(_ChatAccessorBase.aclassify)  # type: ignore[attr-defined]

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        """Lazy ``embed``: a float32 vector per row, a Dask collection back."""
        return lazy_method(self._obj, "embed", args, kwargs)

    embed.__signature__ = inspect.signature(_ChatAccessorBase.aembed)  # type: ignore[attr-defined]

    def filter(self, *args: Any, **kwargs: Any) -> Any:
        """Lazy ``filter``: each partition's rows the model answers yes to (or the mask).

        Raises:
            ConfigError: ``cheap_model=``: the cascade learns one threshold from a sample of
                the whole frame, which no partition holds (while the graph is built).
        """
        if kwargs.get("cheap_model") is not None:
            raise ConfigError(
                "ddf.chat.filter(cheap_model=...) would learn a threshold per partition from "
                "its own few rows. What to do: leave cheap_model out on Dask, or run the "
                "cascade in pandas: ddf.compute().chat.filter(..., cheap_model=...)"
            )
        return lazy_method(self._obj, "filter", args, kwargs)

    filter.__signature__ = inspect.signature(_ChatAccessorBase.afilter)  # type: ignore[attr-defined]

    def top_k(self, *args: Any, **kwargs: Any) -> Any:
        """Not on Dask: ranks the whole frame (a ConfigError that says what to do)."""
        raise _whole_frame("top_k")

    def aggregate(self, *args: Any, **kwargs: Any) -> Any:
        """Not on Dask: reduces the whole frame (a ConfigError that says what to do)."""
        raise _whole_frame("aggregate")

    def join(self, *args: Any, **kwargs: Any) -> Any:
        """Not on Dask: pairs rows across the whole frames (a ConfigError, what to do)."""
        raise _whole_frame("join")


def _whole_frame(method: str) -> ConfigError:
    return ConfigError(
        f"ddf.chat.{method} works on the whole frame, not partition by partition. What to "
        f"do: narrow the rows on the cluster first (ddf.chat.filter, or plain Dask), then "
        f"ddf.compute().chat.{method}(...) in pandas"
    )


def lazy_method(collection: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``collection.map_partitions`` of the pandas accessor's ``method``, with its meta;
    with ``dry_run=True``, the pandas method's `CostEstimate` for the whole collection."""
    kwargs = dict(kwargs)
    if batch_mode(kwargs.pop("batch", False)) is not None:
        raise ConfigError(
            f"ddf.chat.{method}(batch=...) would submit one Batch API job per partition. "
            "What to do: leave batch= out to run the rows live across the cluster, or submit "
            "one job for all the rows from pandas: ddf.compute().chat.submit_batch(...)"
        )
    dry, pilot = kwargs.pop("dry_run", False), kwargs.pop("pilot", None)
    options = {name: kwargs.pop(name, None) for name in RUN_OPTIONS}
    if dry or pilot is not None:
        check_pilot(pilot, dry)
        # Counted on the client: the rows' text is read once, and nothing else is sent.
        given = {name: value for name, value in options.items() if value is not None}
        frame = collection.compute()
        return getattr(frame.chat, method)(*args, **kwargs, **given, dry_run=True, pilot=pilot)
    # The run options become a ChatConfig on the client, once per call.
    config = RunOptions(**options).settings({}, method=method).resolved()
    if config.cache_path is not None:
        # Resolved here, so every worker on this machine uses the file the client would.
        config = dataclasses.replace(config, cache=str(config.cache_path.absolute()))
    meta = _meta(collection._meta, method, args, kwargs, config)
    spec = PartitionSpec(uuid.uuid4().hex, method, tuple(args), kwargs, config, os.getpid())
    _built.append(spec.run)
    return collection.map_partitions(
        _run_partition, spec, meta=meta, enforce_metadata=False, transform_divisions=False
    )


def _meta(
    empty: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], config: ChatConfig
) -> Any:
    """The pandas method's output for no rows: checks every argument, sends nothing."""
    quiet = dataclasses.replace(config, cache=False, progress=False)
    accessor = _accessor(empty, None, report_to=_drop)  # not the user's run: no last_run()
    return run_sync(getattr(accessor, f"a{method}")(*args, **kwargs, config=quiet))


def _drop(report: RunReport) -> None:
    """A report nobody reads (the meta run's)."""


def _accessor(
    part: Any, hooks: RunHooks | None, report_to: Callable[[RunReport], object]
) -> _ChatAccessorBase:
    """The pandas accessor of a partition (a DataFrame or a Series), with the run's seams."""
    kind = SeriesChatAccessor if isinstance(part, pd.Series) else ChatAccessor
    return kind(part, hooks=hooks, report_to=report_to)


def _run_partition(part: Any, spec: PartitionSpec, partition_info: Any = None) -> Any:
    """One partition: the pandas method under the run's lease; raises only RunAborted."""
    number = int(partition_info["number"]) if partition_info else 0
    return run_sync(_partition(part, spec, number))


async def _partition(part: Any, spec: PartitionSpec, number: int) -> Any:
    transport = connect(spec.driver)
    lease = Lease(
        transport,
        run=spec.run,
        holder=f"{number}:{uuid.uuid4().hex[:8]}",
        capacity=spec.config.max_parallel,
        rows=len(part),
    )
    started = time.time()
    reports: list[RunReport] = []
    main = asyncio.current_task()
    assert main is not None

    def stop(message: str) -> None:
        main.cancel(message)

    lease.on_abort = stop
    keeper: asyncio.Task[None] | None = None
    outcome = "aborted"
    try:
        await lease.acquire()  # RunAborted here: the run was stopped, nothing is sent
        # The user's options all reach the governor (retry_after_max too); the lease caps
        # its concurrency and shares out its budgets through the governor's own methods.
        governor = governor_for(spec.config, on_pause=lease.paused)
        lease.attach(governor)
        hooks = RunHooks(governor=governor, listeners=(RowCounter(lease),))
        keeper = asyncio.create_task(lease.keep())
        keeper.add_done_callback(lambda task: _stop_if_failed(task, main))
        method = getattr(_accessor(part, hooks, reports.append), f"a{spec.method}")
        output = await method(*spec.args, **spec.kwargs, config=spec.config, progress=False)
        outcome = "finished"
        return output
    except RunAborted as exc:
        # Already stopping: the keeper must not cancel this handler (a CancelledError out of
        # a task reaches compute() as distributed's UnboundLocalError, not as RunAborted).
        lease.on_abort = None
        # The first partition to see it stops the others, which then send nothing more.
        with contextlib.suppress(asyncio.CancelledError):  # a cancel the keeper sent just now
            await transport.call("abort", run=spec.run, message=str(exc))
        raise RunAborted(f"{exc} (seen in partition {number})") from None
    except asyncio.CancelledError:
        failure = _failure(keeper)
        if failure is not None:  # the lease could not be kept: say why, loudly
            main.uncancel()
            raise RuntimeError(f"partition {number} lost its lease: {failure!r}") from failure
        if lease.aborted is None:
            raise
        main.uncancel()
        raise RunAborted(lease.aborted) from None
    finally:
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        await lease.leave()
        if not lease.gone:  # a lost attempt's report must not replace its re-run's
            report = _partition_report(part, number, reports, outcome, started)
            await transport.call("report", run=spec.run, partition=number, report=report)


def _failure(keeper: asyncio.Task[None] | None) -> BaseException | None:
    """The error the lease keeper died of, if it did (not cancelled, not an abort)."""
    if keeper is None or not keeper.done() or keeper.cancelled():
        return None
    return keeper.exception()


def _stop_if_failed(keeper: asyncio.Task[None], main: asyncio.Task[Any]) -> None:
    """A keeper that dies must not leave the partition running on stale slots, silently."""
    if _failure(keeper) is not None:
        main.cancel("the lease keeper failed")


def _partition_report(
    part: Any, number: int, reports: Sequence[RunReport], outcome: str, started: float
) -> bytes:
    if reports:
        rows, stats = reports[-1].rows, reports[-1].stats
    else:  # stopped before its run began
        rows, stats = rows_frame(results_in_order([None]) * len(part), part.index), RunStats()
    failed = rows[rows["status"] != "ok"]
    return pickle.dumps(
        PartitionReport(
            partition=number,
            rows=len(part),
            outcome=outcome,
            stats=stats,
            started=started,
            finished=time.time(),
            statuses={str(k): int(v) for k, v in rows["status"].value_counts().items()},
            errors=failed.head(MAX_ERRORS_PER_PARTITION).assign(partition=number),
        )
    )


def last_dask_run() -> DaskRunReport | None:
    """The combined report of the latest ``ddf.chat`` run this process built and computed.

    Reads the partitions' reports from the ledger (the scheduler's, or this process's for
    dask's threaded scheduler). Call it after ``compute()``; None before any partition ran.

    Returns:
        A `DaskRunReport`: ``.summary()``, ``.stats``, ``.errors`` (why each None is None).
    """
    for run in reversed(_built):
        fetched = _fetch(run)
        if fetched["reports"]:
            return _combine(run, fetched)
    return None


def _fetch(run: str) -> dict[str, Any]:
    local: dict[str, Any] = LocalTransport.ledger.reports(run=run)
    if local["reports"] or "distributed" not in sys.modules:
        return local
    from distributed import default_client

    try:
        client = default_client()  # type: ignore[no-untyped-call]
        found: dict[str, Any] = client.sync(client.scheduler.nbtoolkit_reports, run=run)
    except (ValueError, KeyError, AttributeError, OSError):  # no client, or no ledger yet
        return local
    return found


def _combine(run: str, fetched: dict[str, Any]) -> DaskRunReport:
    parts: list[PartitionReport] = [pickle.loads(blob) for blob in fetched["reports"]]
    stats = RunStats()
    costs = [p.stats.cost for p in parts if p.stats.cost is not None]
    for part in parts:
        for name in ("requests_sent", "retries", "cache_hits", "duplicates", "reasks"):
            setattr(stats, name, getattr(stats, name) + getattr(part.stats, name))
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            setattr(stats, name, getattr(stats, name) + getattr(part.stats, name))
        stats.statuses.update(part.stats.statuses)
    stats.cost = sum(costs) if costs else None
    # Wall clock across processes: from the first partition's start to the last one's end.
    stats.started = min((p.started for p in parts), default=0.0)
    stats.finished = max((p.finished for p in parts), default=0.0)
    outcome = "aborted" if fetched["aborted"] else "finished"
    errors = [p.errors for p in parts if len(p.errors)]
    return DaskRunReport(
        run=run,
        outcome=outcome,
        partitions=parts,
        stats=stats,
        errors=pd.concat(errors) if errors else parts[0].errors.iloc[:0],
        peak_slots=int(fetched["peak_held"]),
    )
