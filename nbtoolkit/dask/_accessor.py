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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from nbtoolkit.config import ChatConfig
from nbtoolkit.core._engine import RunHooks, governor_for
from nbtoolkit.core._runner import run_sync
from nbtoolkit.dask._lease import Lease, RowCounter, connect
from nbtoolkit.dask._report import built_runs, partition_report
from nbtoolkit.errors import ConfigError, RunAborted
from nbtoolkit.frame._accessor import ChatAccessor, SeriesChatAccessor, _ChatAccessorBase
from nbtoolkit.frame._batch import batch_mode
from nbtoolkit.frame._estimate import check_pilot
from nbtoolkit.frame._options import RUN_OPTIONS, RunOptions
from nbtoolkit.frame._report import RunReport


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
    built_runs.append(spec.run)
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
            report = partition_report(part, number, reports, outcome, started)
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
