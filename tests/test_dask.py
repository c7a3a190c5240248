"""``ddf.chat`` on dask's threaded scheduler, its processes scheduler, and a real
``distributed.LocalCluster`` (2 worker processes x 2 threads).

One cluster serves the whole module (starting one costs seconds); each test talks to its own
test server on a thread of this process, and asserts on what that server saw.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit.dask._lease import Lease, LeaseLost, LocalTransport
from nbtoolkit.dask._ledger import SlotLedger, fair_shares
from nbtoolkit.testing import ChatServer, FaultRates, RateLimit, Stall, Status
from tests.conftest import FAST_RETRY, MODEL

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")

# The function only: starting the module's cluster (worker processes that import pandas,
# dask and nbtoolkit) is the fixture's cost, and on a loaded machine it alone can take a minute.
pytestmark = pytest.mark.timeout(90, func_only=True)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A LocalCluster with worker processes, and a client that is the default for compute()."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as running,
    ):
        # Every worker imports what a partition needs now, not in the first test's time.
        running.run(importlib.import_module, "nbtoolkit.dask._accessor")
        yield running


def _frame(rows: int, partitions: int) -> Any:
    df = pd.DataFrame({"q": [f"question {i}" for i in range(rows)]}, index=range(rows))
    return df, dd.from_pandas(df, npartitions=partitions, sort=True)


def _wait_until(condition: Any, what: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.02)


def test_fair_shares_fill_small_demands_and_split_the_rest() -> None:
    """Water-filling: holders needing less than an even share get it; the rest split evenly."""
    assert fair_shares(12, {"a": 1, "b": 100, "c": 100}) == {"a": 1, "b": 6, "c": 5}
    assert fair_shares(4, {"a": 10, "b": 10, "c": 10, "d": 10, "e": 10}) == {
        "a": 1,
        "b": 1,
        "c": 1,
        "d": 1,
        "e": 0,
    }
    assert sum(fair_shares(64, {str(i): 1000 for i in range(7)}).values()) == 64


def test_ledger_never_grants_past_capacity_and_frees_a_dead_workers_slots() -> None:
    """Grants stop at capacity; a worker that dies gives its holders' slots back."""
    ledger = SlotLedger()
    one = ledger.sync(run="r", holder="a", worker="w1", capacity=4, demand=10)
    two = ledger.sync(run="r", holder="b", worker="w2", capacity=4, demand=10)
    assert (one["granted"], two["granted"]) == (4, 0)  # a came first; b waits for a's release
    ledger.sync(run="r", holder="a", worker="w1", capacity=4, demand=10, release=2)
    assert ledger.sync(run="r", holder="b", worker="w2", capacity=4, demand=10)["granted"] == 2
    ledger.drop_worker("w1")
    assert ledger.sync(run="r", holder="b", worker="w2", capacity=4, demand=10)["granted"] == 2
    assert ledger.reports(run="r")["peak_held"] == 4


def test_building_sends_nothing_and_keeps_index_and_order(client: Any) -> None:
    """No request while the graph is built; compute() gives every answer in the input's order."""
    df, ddf = _frame(200, 4)
    df.index = [f"row-{i}" for i in range(len(df))]  # a non-default index must survive
    ddf = dd.from_pandas(df, npartitions=4, sort=False)
    with ChatServer().run_in_thread() as server:
        out = ddf.chat.complete("q", model=MODEL, base_url=server.base_url, max_parallel=8)
        series = ddf["q"].chat.complete(model=MODEL, base_url=server.base_url, max_parallel=8)
        assert server.request_count == 0
        result = out.compute()
        answers = series.compute()
    assert list(result.index) == list(df.index)
    assert list(result["response"]) == [f"echo: {q}" for q in df["q"]]
    assert list(answers) == list(result["response"])
    assert server.request_count == 200  # the series call found every answer in the cache
    assert max(server.answered.values()) == 1


def test_global_limit_and_every_row_right_under_faults(client: Any) -> None:
    """1,000 rows, 8 partitions, 5% 5xx and 1% resets: <= 12 in flight, all right, none twice."""
    df, ddf = _frame(1000, 8)
    faults = FaultRates(server_error=0.05, reset=0.01, seed=14)
    with ChatServer(latency=0.03, faults=faults, record=False).run_in_thread() as server:
        out = ddf.chat.complete(
            "q",
            model=MODEL,
            base_url=server.base_url,
            max_parallel=12,
            retry=FAST_RETRY,
            cache=False,
        )
        assert server.request_count == 0
        result = out.compute()
    # Read once the server has stopped: it counts a reply after sending it.
    peak, answered, statuses = server.peak_in_flight, server.answered, server.statuses
    assert peak <= 12
    assert list(result.index) == list(df.index)
    assert list(result["response"]) == [f"echo: {q}" for q in df["q"]]
    assert len(answered) == 1000 and max(answered.values()) == 1
    report = nbtoolkit.last_dask_run()
    assert report is not None and report.outcome == "finished"
    assert report.rows == {"ok": 1000}
    assert report.peak_slots <= 12
    assert report.stats.requests_sent == sum(statuses.values())
    assert report.stats.retries == report.stats.requests_sent - 1000 > 0


def test_a_row_that_fails_is_none_with_its_reason(client: Any) -> None:
    """A row the server refuses is None in the output and explained in last_dask_run()."""
    _, ddf = _frame(40, 4)
    with ChatServer().run_in_thread() as server:
        server.script(Status(400), prompt="question 17")
        result = ddf.chat.complete(
            "q", model=MODEL, base_url=server.base_url, api_key="sk-SECRET-1", cache=False
        ).compute()
    assert result["response"].isna().tolist() == [i == 17 for i in range(40)]
    report = nbtoolkit.last_dask_run()
    assert report is not None and report.outcome == "finished"
    assert list(report.errors.index) == [17]
    assert report.errors.loc[17, "http_status"] == 400
    assert "sk-SECRET-1" not in repr(report) + report.errors.to_string()


def test_bad_key_stops_the_whole_computation_once(client: Any) -> None:
    """A 401 raises RunAborted from compute(); partitions after it send nothing."""
    _, ddf = _frame(400, 8)
    with ChatServer(api_key="sk-right").run_in_thread() as server:
        out = ddf.chat.complete(
            "q", model=MODEL, base_url=server.base_url, api_key="sk-wrong", max_parallel=4
        )
        with pytest.raises(nbtoolkit.RunAborted, match="API key") as caught:
            out.compute()
        time.sleep(0.3)  # partitions still running see the flag within a poll
        sent = server.request_count
    assert 0 < sent <= 2 * 4  # not 400 rows, nor one try per partition
    assert "sk-wrong" not in str(caught.value)


def test_bad_arguments_fail_while_building(client: Any) -> None:
    """A missing column is a ConfigError from ddf.chat.complete itself, before compute()."""
    _, ddf = _frame(10, 2)
    with pytest.raises(nbtoolkit.ConfigError, match="column 'nope' not found"):
        ddf.chat.complete("nope", model=MODEL, base_url="http://127.0.0.1:9/v1")


def test_killed_worker_never_pays_twice(client: Any, tmp_path: Path) -> None:
    """A worker killed mid-run: its partition is re-run, and the cache answers what was paid."""
    df, ddf = _frame(200, 4)
    cache = tmp_path / "shared.sqlite3"
    # Rows of the last partition (at most 4 go before a first reply, so all 4 get sent).
    stalled = [f"question {i}" for i in range(150, 154)]
    with ChatServer(latency=0.01).run_in_thread() as server:
        for prompt in stalled:  # its first try hangs until the worker dies
            server.script(Stall(30), prompt=prompt)
        future = client.compute(
            ddf.chat.complete(
                "q",
                model=MODEL,
                base_url=server.base_url,
                max_parallel=8,
                cache=cache,
                retry=FAST_RETRY,
            )
        )
        # A steady state: the other partitions are done, and the last one either waits for
        # a first reply (all 4 of its requests stalled) or has answered all its other rows.
        # Either way nothing more will be sent until the kill, and every answer is saved.
        steady = {150, 200 - len(stalled)}
        _wait_until(
            lambda: (
                server.in_flight == len(stalled)
                and sum(server.answered.values()) in steady
                and sum(map(len, client.processing().values())) == 1
            ),
            lambda: f"a steady state: {sum(server.answered.values())} answered",
        )
        _wait_until(lambda: nbtoolkit.cache_info(cache).entries in steady, "the saves")
        busy = next(addr for addr, keys in client.processing().items() if keys)
        pid = client.run(os.getpid, workers=[busy])[busy]
        os.kill(pid, signal.SIGKILL)
        result = future.result(timeout=60)
    answered = server.answered  # read once the server has stopped (it counts after replying)
    assert list(result["response"]) == [f"echo: {q}" for q in df["q"]]
    assert len(answered) == 200 and max(answered.values()) == 1


def test_extract_and_embed_run_per_partition_too(client: Any) -> None:
    """ddf.chat.extract gives typed columns and ddf.chat.embed float32 vectors, lazily."""
    df, ddf = _frame(60, 3)
    with ChatServer().run_in_thread() as server:
        fields = ddf.chat.extract(
            "q", schema={"n": int, "ok": bool}, model=MODEL, base_url=server.base_url
        )
        vectors = ddf.chat.embed("q", model="embed-model", base_url=server.base_url)
        assert server.request_count == 0
        typed = fields.compute()
        embedded = vectors.compute()
    assert list(typed.index) == list(df.index)
    assert str(typed["n"].dtype) == "Int64" and str(typed["ok"].dtype) == "boolean"
    assert typed["n"].notna().all()
    matrix = nbtoolkit.to_matrix(embedded["embedding"])
    assert matrix.dtype == "float32" and matrix.shape[0] == 60
    assert not pd.isna(matrix).any()


def test_ledger_under_racing_threads_never_grants_past_capacity() -> None:
    """8 threads syncing, leaving and reading one ledger at once: never more than capacity held."""
    ledger = SlotLedger()
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def partition(number: int) -> None:
        rng = random.Random(number)
        try:
            start.wait()
            for attempt in range(40):
                holder, held = f"{number}:{attempt}", 0
                for _ in range(25):
                    release = rng.randint(0, held)
                    reply = ledger.sync(
                        run="r", holder=holder, worker="w", capacity=5, demand=10, release=release
                    )
                    held += reply["granted"] - release
                    ledger.reports(run="r")
                ledger.leave(run="r", holder=holder)
                ledger.drop_worker("gone")  # iterates every run's holders meanwhile
        except BaseException as exc:  # pragma: no cover - what the test is looking for
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        threads = [threading.Thread(target=partition, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert ledger.reports(run="r")["peak_held"] == 5


def test_a_holder_that_left_is_never_granted_again() -> None:
    """A sync that arrives after its holder's leave (cancelled on the way) holds no slots."""
    ledger = SlotLedger()
    ledger.sync(run="r", holder="a", worker="w1", capacity=4, demand=10)
    ledger.leave(run="r", holder="a")
    late = ledger.sync(run="r", holder="a", worker="w1", capacity=4, demand=3, release=0)
    assert late["granted"] == 0 and late["gone"]
    assert ledger.sync(run="r", holder="b", worker="w2", capacity=4, demand=10)["granted"] == 4


def test_a_worker_reported_dead_stops_its_partitions_attempt() -> None:
    """A holder dropped with its worker is told it is gone; its lease raises LeaseLost."""
    transport, run = LocalTransport(), uuid.uuid4().hex  # this process's ledger
    lease = Lease(transport, run=run, holder="a", capacity=4, rows=10)
    asyncio.run(lease.acquire())
    assert lease.slots == 4
    transport.ledger.drop_worker(transport.worker)  # "a" still runs, but its worker is "gone"
    with pytest.raises(LeaseLost):
        asyncio.run(lease.keep())
    again = transport.ledger.sync(run=run, holder="b", worker="w2", capacity=4, demand=10)
    assert again["granted"] == 4


def test_threaded_scheduler_keeps_max_parallel_and_leaves_last_run() -> None:
    """8 partitions on 8 threads: <= 6 in flight at the server; last_run() is not theirs."""
    df = pd.DataFrame({"q": [f"question {i}" for i in range(400)]})
    with ChatServer(latency=0.02).run_in_thread() as server:
        before = df.head(3).chat.complete("q", model=MODEL, base_url=server.base_url, cache=False)
        mine = nbtoolkit.last_run()
        out = dd.from_pandas(df, npartitions=8, sort=True).chat.complete(
            "q", model=MODEL, base_url=server.base_url, max_parallel=6, cache=False
        )
        result = out.compute(scheduler="threads", num_workers=8)
    # Read once the server has stopped: it counts a reply after sending it.
    peak, answered = server.peak_in_flight, server.answered
    assert list(before["response"]) == ["echo: question 0", "echo: question 1", "echo: question 2"]
    assert peak <= 6
    assert list(result["response"]) == [f"echo: {q}" for q in df["q"]]
    assert answered["question 1"] == 2 and answered["question 300"] == 1
    assert nbtoolkit.last_run() is mine  # the partitions' runs are not the user's last run
    report = nbtoolkit.last_dask_run()
    assert report is not None and report.rows == {"ok": 400} and report.peak_slots <= 6


def test_threaded_scheduler_follows_rate_headers_across_partitions() -> None:
    """8 partitions against 40 req/s (burst 10): one budget for all, not one per partition."""
    df = pd.DataFrame({"q": [f"question {i}" for i in range(240)]})
    # Each partition following the headers as if it were alone got 35-44% 429s here.
    with ChatServer(rate_limit=RateLimit(40, 10)).run_in_thread() as server:
        out = dd.from_pandas(df, npartitions=8, sort=True).chat.complete(
            "q", model=MODEL, base_url=server.base_url, max_parallel=32, cache=False
        )
        result = out.compute(scheduler="threads", num_workers=8)
    statuses = server.statuses  # read once the server has stopped (it counts after replying)
    assert list(result["response"]) == [f"echo: {q}" for q in df["q"]]
    # As the pandas test allows on a loaded machine (test_the_learned_rate_matches_the_server).
    assert statuses.get("429", 0) <= 0.10 * sum(statuses.values())


def test_retry_after_max_holds_under_dask() -> None:
    """A header asking for an hour's wait holds the run retry_after_max, as in pandas."""
    df = pd.DataFrame({"q": [f"question {i}" for i in range(20)]})
    hour = {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1h",
    }
    retry = nbtoolkit.RetryPolicy(attempts=3, wait_initial=0.01, wait_max=0.05, retry_after_max=0.2)
    with ChatServer().run_in_thread() as server:
        server.script(Status(500, headers=hour), prompt="question 3")
        out = dd.from_pandas(df, npartitions=2, sort=True).chat.complete(
            "q", model=MODEL, base_url=server.base_url, max_parallel=4, retry=retry, cache=False
        )
        result = out.compute(scheduler="threads")  # with a 300 s cap this would time out
    answered = server.answered  # read once the server has stopped (it counts after replying)
    assert list(result["response"]) == [f"echo: {q}" for q in df["q"]]
    assert answered["question 3"] == 1 and sum(answered.values()) == 20


def test_batch_mode_on_dask_is_refused_while_building() -> None:
    """ddf.chat.complete(batch=True) would be one Batch API job per partition: a ConfigError."""
    _, ddf = _frame(10, 2)
    with pytest.raises(nbtoolkit.ConfigError, match="one Batch API job per partition"):
        ddf.chat.complete("q", model=MODEL, base_url="http://127.0.0.1:9/v1", batch=True)


def test_processes_scheduler_is_refused_before_anything_is_sent() -> None:
    """Processes share no ledger: compute(scheduler="processes") is a ConfigError, 0 requests."""
    _, ddf = _frame(20, 2)
    with ChatServer().run_in_thread() as server:
        out = ddf.chat.complete("q", model=MODEL, base_url=server.base_url, cache=False)
        with pytest.raises(nbtoolkit.ConfigError, match="scheduler='threads'"):
            out.compute(scheduler="processes", num_workers=1)
        sent = server.request_count
    assert sent == 0
