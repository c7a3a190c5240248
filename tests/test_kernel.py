"""What only a live kernel shows: the stop button during a run, and cells queued behind it.

Each test starts a real IPython kernel (jupyter_client), points it at a `ChatServer` on a
thread, starts a run long enough to interrupt (200 rows, 4 at a time, 0.2 s each: 10 s),
presses "stop" with ``interrupt_kernel()`` as the notebook does, and checks both what the
kernel said and what the server saw afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbtoolkit.testing import ChatServer
from tests.kernel_helpers import LEAK_MARKERS, CellRun, Kernel, running_kernel, wait_for

ROWS = 200
PARALLEL = 4
LATENCY = 0.2
WHOLE_RUN = ROWS / PARALLEL * LATENCY  # seconds the long run takes if nothing stops it
# Seconds an interrupted cell may take to end. A bound on a stop, not a speed: half of what
# it guards against (the run carrying on to its end), so a busy machine's slow reply passes.
PROMPT_STOP = WHOLE_RUN / 2

SETUP = f"""
import json, sys
import pandas as pd
import nbtoolkit
df = pd.DataFrame({{"q": [f"row {{i}}" for i in range({ROWS})]}})
"""
SYNC_RUN = f'out = df.chat.complete("q", model="test-model", max_parallel={PARALLEL})'
ASYNC_RUN = f'out = await df.chat.acomplete("q", model="test-model", max_parallel={PARALLEL})'
# What the kernel kept of the interrupted run, as JSON on stdout.
REPORT = """
report = nbtoolkit.last_run()
answers = report.output["response"]
last_error = getattr(sys, "last_value", None)
print(json.dumps({
    "outcome": report.outcome,
    "rows": len(report.output),
    "answered": int(answers.notna().sum()),
    "in_order": all(a is None or a == f"echo: row {i}" for i, a in enumerate(answers)),
    "partial_is_output": getattr(last_error, "partial", None) is report.output,
}))
"""
# New prompts, so the call goes to the server rather than to the response cache.
RUN_AGAIN = """
fresh = pd.DataFrame({"q": [f"again {i}" for i in range(8)]})
again = fresh.chat.complete("q", model="test-model", max_parallel=4)
print(again["response"].tolist())
"""
# ipykernel turns the stop button into a cancellation of a top-level-await cell.
INTERRUPT_NAMES = {"RunInterrupted", "KeyboardInterrupt", "CancelledError"}


@pytest.fixture
def server() -> Iterator[ChatServer]:
    """A slow server on its own thread, so a run lasts long enough to interrupt."""
    with ChatServer(latency=LATENCY).run_in_thread() as running:
        yield running


@pytest.fixture
def kernel(server: ChatServer, tmp_path: Path) -> Iterator[Kernel]:
    """A kernel aimed at ``server``, with nbtoolkit imported and a 200-row frame ready."""
    with running_kernel({"OPENAI_BASE_URL": server.base_url}, tmp_path / "kernel.log") as k:
        setup = k.run(SETUP, timeout=60)
        assert setup.status == "ok", setup.text()
        yield k


def _interrupt_mid_run(kernel: Kernel, server: ChatServer) -> float:
    """Once some rows have finished, press stop; return when (time.monotonic())."""
    # 3 * PARALLEL requests seen means at least 2 * PARALLEL rows are done.
    kernel.pump_until(lambda: server.request_count >= 3 * PARALLEL, 20, "the run to get going")
    pressed = time.monotonic()
    kernel.manager.interrupt_kernel()
    return pressed


def _assert_requests_stopped(server: ChatServer) -> None:
    # A wait, not a bound: cancelled requests end at once, and even uncancelled ones within
    # LATENCY; the 10 s is for a busy machine.
    wait_for(lambda: server.in_flight == 0, 10.0, "the server's in-flight requests to end")
    seen = server.request_count
    time.sleep(1.0)
    assert server.request_count == seen, "requests were still being sent after the interrupt"
    assert server.in_flight == 0


def _report(kernel: Kernel) -> dict[str, Any]:
    cell = kernel.run(REPORT, timeout=20)
    assert cell.status == "ok", cell.text()
    report: dict[str, Any] = json.loads(cell.stdout)
    return report


def _assert_usable_and_clean(kernel: Kernel, server: ChatServer) -> None:
    before = server.request_count
    again = kernel.run(RUN_AGAIN, timeout=20)
    assert again.status == "ok", again.text()
    assert again.stdout.strip() == str([f"echo: again {i}" for i in range(8)])
    assert server.request_count == before + 8
    # Collect garbage so an unclosed session or a pending task would complain now.
    assert kernel.run("import gc; gc.collect()", timeout=20).status == "ok"
    said = kernel.all_text()
    for marker in LEAK_MARKERS:
        assert marker not in said


def _assert_one_line(error: dict[str, Any]) -> None:
    """The notebook shows the error as one line: its name and message, none of our frames."""
    (line,) = error["traceback"]
    assert line.startswith(f"{error['ename']}: {error['evalue']}"), error["traceback"]
    for internal in ("nest_asyncio2", "selectors", "asyncio", "nbtoolkit/"):
        assert internal not in "\n".join(error["traceback"])


def _assert_stopped_promptly(cell: CellRun, pressed: float, names: set[str]) -> dict[str, Any]:
    """The cell ended in an interrupt error soon after ``pressed``; return that error."""
    assert cell.status == "error", cell.text()
    error = cell.error
    assert error is not None
    assert error["ename"] in names, cell.text()
    assert cell.replied_at is not None
    assert cell.replied_at - pressed < PROMPT_STOP, (
        f"the interrupted cell ended {cell.replied_at - pressed:.1f} s after the stop button"
    )
    return error


@pytest.mark.timeout(120)
def test_stop_button_ends_sync_run_and_keeps_finished_rows(
    kernel: Kernel, server: ChatServer
) -> None:
    """The stop button ends df.chat.complete at once with RunInterrupted; done rows are kept."""
    started = kernel.execute(SYNC_RUN)
    pressed = _interrupt_mid_run(kernel, server)
    cell = kernel.wait(started, timeout=WHOLE_RUN + 10)

    error = _assert_stopped_promptly(cell, pressed, {"RunInterrupted"})
    assert "nbtoolkit.last_run().output" in error["evalue"]
    _assert_one_line(error)
    _assert_requests_stopped(server)

    report = _report(kernel)
    assert report["outcome"] == "interrupted"
    assert report["rows"] == ROWS
    assert report["in_order"]
    assert report["partial_is_output"], "RunInterrupted.partial is not last_run().output"
    # Every answer kept was one the server sent; at most the requests in flight were lost.
    answered_by_server = server.statuses["ok"]
    assert 0 < report["answered"] <= answered_by_server
    assert report["answered"] >= answered_by_server - PARALLEL
    _assert_usable_and_clean(kernel, server)


@pytest.mark.timeout(120)
def test_stop_button_ends_top_level_await_run(kernel: Kernel, server: ChatServer) -> None:
    """The stop button ends `await df.chat.acomplete` at once; requests stop, rows are kept."""
    started = kernel.execute(ASYNC_RUN)
    pressed = _interrupt_mid_run(kernel, server)
    cell = kernel.wait(started, timeout=WHOLE_RUN + 10)

    _assert_stopped_promptly(cell, pressed, INTERRUPT_NAMES)
    _assert_requests_stopped(server)

    report = _report(kernel)
    assert report["outcome"] == "interrupted"
    assert report["rows"] == ROWS
    assert report["in_order"]
    assert 0 < report["answered"] <= server.statuses["ok"]
    _assert_usable_and_clean(kernel, server)


@pytest.mark.timeout(120)
def test_cell_queued_behind_a_sync_run_runs(kernel: Kernel, server: ChatServer) -> None:
    """A cell queued behind a df.chat.complete cell ("Run All") runs once that cell is done."""
    # The nested loop of a sync run must not pick up (and drop) the queued cell's first step.
    started = kernel.execute(SYNC_RUN.replace("df.chat", "df.head(16).chat"))
    queued = kernel.execute('print("the queued cell ran")')

    cell = kernel.wait(started, timeout=30)
    assert cell.status == "ok", cell.text()
    after = kernel.wait(queued, timeout=10)
    assert after.status == "ok", after.text()
    assert after.stdout == "the queued cell ran\n"
    assert server.statuses["ok"] == 16


@pytest.mark.timeout(120)
def test_cell_queued_behind_an_interrupted_run_still_runs(
    kernel: Kernel, server: ChatServer
) -> None:
    """A cell queued behind an interrupted run (stop_on_error off) runs and replies ok."""
    started = kernel.execute(SYNC_RUN, stop_on_error=False)
    queued = kernel.execute('print("the queued cell ran")')
    pressed = _interrupt_mid_run(kernel, server)

    cell = kernel.wait(started, timeout=WHOLE_RUN + 10)
    _assert_stopped_promptly(cell, pressed, {"RunInterrupted"})
    after = kernel.wait(queued, timeout=10)
    assert after.status == "ok", after.text()
    assert after.stdout == "the queued cell ran\n"
    assert after.replied_at is not None
    assert after.replied_at - pressed < PROMPT_STOP
    _assert_requests_stopped(server)
    _assert_usable_and_clean(kernel, server)


@pytest.mark.timeout(120)
def test_cell_queued_behind_an_interrupted_run_is_aborted_by_stop_on_error(
    kernel: Kernel, server: ChatServer
) -> None:
    """With stop_on_error (Jupyter's default) the queued cell is answered "aborted" at once."""
    started = kernel.execute(SYNC_RUN)
    queued = kernel.execute('print("the queued cell ran")')
    pressed = _interrupt_mid_run(kernel, server)

    cell = kernel.wait(started, timeout=WHOLE_RUN + 10)
    _assert_stopped_promptly(cell, pressed, {"RunInterrupted"})
    after = kernel.wait(queued, timeout=10)
    assert after.status == "aborted"
    assert after.stdout == ""
    assert after.replied_at is not None
    assert after.replied_at - pressed < PROMPT_STOP
    _assert_requests_stopped(server)
    _assert_usable_and_clean(kernel, server)


@pytest.mark.timeout(120)
def test_config_error_shows_one_line(kernel: Kernel) -> None:
    """A ConfigError shows in the notebook as one line, not a traceback through nbtoolkit."""
    cell = kernel.run('df.chat.complete("nope", model="test-model")', timeout=20)
    assert cell.status == "error"
    error = cell.error
    assert error is not None and error["ename"] == "ConfigError", cell.text()
    _assert_one_line(error)


@pytest.mark.timeout(120)
def test_run_aborted_shows_one_line(kernel: Kernel) -> None:
    """A RunAborted (a wrong key) shows as one line that says where the finished rows are."""
    with ChatServer(api_key="the-right-key").run_in_thread() as locked:
        code = (
            f'df.head(8).chat.complete("q", model="test-model", base_url="{locked.base_url}",'
            ' api_key="a-wrong-key", progress=False)'
        )
        cell = kernel.run(code, timeout=30)
    assert cell.status == "error"
    error = cell.error
    assert error is not None and error["ename"] == "RunAborted", cell.text()
    _assert_one_line(error)
    assert "nbtoolkit.last_run().output" in error["traceback"][0]


# Stands in for a handler the kernel serves inside the run's nested loop while the run goes.
# Like ipykernel's dispatch_shell and IPython's completer, it catches KeyboardInterrupt and
# carries on; a slow one (jedi inferring a DataFrame takes seconds) is where the stop lands.
# Files order the steps: the test writes GO once the run is sending, the handler writes
# STARTED, the test presses stop and then writes RELEASE.
BUSY_HANDLER = """
import asyncio, pathlib, threading, time
busy = {"swallowed": 0, "finished": False}
_files = pathlib.Path(FILES)

def _slow_handler():
    (_files / "STARTED").touch()
    deadline = time.monotonic() + 20
    try:
        while not (_files / "RELEASE").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    except KeyboardInterrupt:
        busy["swallowed"] += 1
    busy["finished"] = True

def _schedule(loop):
    while not (_files / "GO").exists():
        time.sleep(0.01)
    loop.call_soon_threadsafe(_slow_handler)

threading.Thread(target=_schedule, args=(asyncio.get_running_loop(),), daemon=True).start()
"""


@pytest.mark.timeout(120)
def test_stop_lands_in_a_slow_handler_inside_the_run(
    kernel: Kernel, server: ChatServer, tmp_path: Path
) -> None:
    """A stop that lands while the kernel is busy in another handler still ends the run."""
    files = tmp_path / "handshake"
    files.mkdir()
    setup = kernel.run(BUSY_HANDLER.replace("FILES", repr(str(files))), timeout=20)
    assert setup.status == "ok", setup.text()

    started = kernel.execute(SYNC_RUN)
    kernel.pump_until(lambda: server.request_count >= 3 * PARALLEL, 20, "the run to get going")
    (files / "GO").touch()
    kernel.pump_until(lambda: (files / "STARTED").exists(), 20, "the slow handler to start")
    pressed = time.monotonic()
    kernel.manager.interrupt_kernel()
    time.sleep(0.5)  # the handler stays busy while the signal is delivered
    (files / "RELEASE").touch()
    cell = kernel.wait(started, timeout=WHOLE_RUN + 10)

    # The handler held the loop 0.5 s; the run stops as soon as the loop is free again.
    _assert_stopped_promptly(cell, pressed, {"RunInterrupted"})
    _assert_requests_stopped(server)
    handler = kernel.run("print(json.dumps(busy))", timeout=20)
    assert json.loads(handler.stdout) == {"swallowed": 0, "finished": True}
    report = _report(kernel)
    assert report["outcome"] == "interrupted"
    assert report["in_order"]
    assert 0 < report["answered"] <= server.statuses["ok"]
    _assert_usable_and_clean(kernel, server)


# A completion that holds the kernel until the test lets it go (jedi inferring a DataFrame
# takes 5-11 s with a cold cache). IPython calls it inside its completer.
SLOW_COMPLETER = """
import pathlib, time
_files = pathlib.Path(FILES)

def _slow_completer(shell, event):
    (_files / "STARTED").touch()
    deadline = time.monotonic() + 20
    while not (_files / "RELEASE").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return []

get_ipython().set_hook("complete_command", _slow_completer, str_key="slow_")
"""


def _hold_kernel_in_a_completion(kernel: Kernel, tmp_path: Path) -> Path:
    """Start a completion that holds the kernel until ``<returned folder>/RELEASE`` exists."""
    files = tmp_path / "handshake"
    files.mkdir()
    setup = kernel.run(SLOW_COMPLETER.replace("FILES", repr(str(files))), timeout=20)
    assert setup.status == "ok", setup.text()
    kernel.client.complete("slow_", 5)
    kernel.pump_until(lambda: (files / "STARTED").exists(), 20, "the completion to start")
    return files


@pytest.mark.timeout(120)
def test_stop_while_a_completion_holds_the_kernel_stops_the_queued_run(
    kernel: Kernel, server: ChatServer, tmp_path: Path
) -> None:
    """A stop pressed while a slow completion holds the kernel stops the run queued behind it."""
    files = _hold_kernel_in_a_completion(kernel, tmp_path)
    started = kernel.execute(SYNC_RUN.replace("df.chat", "df.head(40).chat"))
    time.sleep(0.3)  # the run's request reaches the kernel and waits behind the completion
    kernel.manager.interrupt_kernel()
    time.sleep(0.5)
    (files / "RELEASE").touch()
    cell = kernel.wait(started, timeout=30)
    # IPython's completer swallowed the KeyboardInterrupt; nbtoolkit saw the stop land after
    # the cell was sent (kernel_stops) and the run stops before sending anything.
    assert cell.status == "error", "the stop was lost: the queued run ran to its end"
    error = cell.error
    assert error is not None and error["ename"] == "RunInterrupted", cell.text()
    _assert_one_line(error)
    assert server.request_count == 0
    later = kernel.run(SYNC_RUN.replace("df.chat", "df.head(5).chat"), timeout=30)
    assert later.status == "ok", later.text()  # the stop is used once, never carried over


@pytest.mark.timeout(120)
def test_a_stop_swallowed_before_a_cell_was_sent_does_not_stop_it(
    kernel: Kernel, server: ChatServer, tmp_path: Path
) -> None:
    """A stop pressed during a completion, with no cell waiting, is not held against later runs."""
    files = _hold_kernel_in_a_completion(kernel, tmp_path)
    kernel.manager.interrupt_kernel()
    time.sleep(0.5)
    (files / "RELEASE").touch()
    time.sleep(0.3)  # the completion ends; only then is the next cell sent
    cell = kernel.run(SYNC_RUN.replace("df.chat", "df.head(5).chat"), timeout=30)
    assert cell.status == "ok", cell.text()
    assert server.request_count == 5


EMBED_RUN = f'vecs = df.chat.embed("q", model="test-model", max_parallel={PARALLEL}, batch_size=2)'
# What the kernel kept of an interrupted embed run, as JSON on stdout.
EMBED_REPORT = """
from nbtoolkit.testing import expected_vector
report = nbtoolkit.last_run()
vectors = report.output["embedding"]
print(json.dumps({
    "outcome": report.outcome,
    "kept": sum(v is not None for v in vectors),
    "right": all(
        v is None or (v.dtype.name == "float32" and (v == expected_vector(f"row {i}", 8)).all())
        for i, v in enumerate(vectors)
    ),
}))
"""


@pytest.mark.timeout(120)
def test_stop_button_ends_an_embed_run_keeps_its_vectors_and_a_rerun_sends_the_rest(
    kernel: Kernel, server: ChatServer
) -> None:
    """Stop during df.chat.embed: RunInterrupted at once, every vector received kept and
    right, and running the cell again sends only the texts that had no vector."""
    started = kernel.execute(EMBED_RUN)
    pressed = _interrupt_mid_run(kernel, server)
    cell = kernel.wait(started, timeout=WHOLE_RUN + 10)

    error = _assert_stopped_promptly(cell, pressed, {"RunInterrupted"})
    _assert_one_line(error)
    _assert_requests_stopped(server)
    report = kernel.run(EMBED_REPORT, timeout=20)
    assert report.status == "ok", report.text()
    kept = json.loads(report.stdout)
    assert kept["outcome"] == "interrupted"
    assert kept["right"]
    answered = 2 * server.statuses["ok"]  # two texts per request
    assert answered - 2 * PARALLEL <= kept["kept"] <= answered
    assert 0 < kept["kept"] < ROWS

    before = len(server.requests)
    again = kernel.run(EMBED_RUN + "\nprint(sum(v is not None for v in vecs['embedding']))", 60)
    assert again.status == "ok", again.text()
    assert again.stdout.strip() == str(ROWS)
    sent = [text for r in server.requests[before:] for text in r.body["input"]]
    assert len(sent) == len(set(sent)) == ROWS - kept["kept"]


@pytest.mark.timeout(120)
def test_stop_button_during_a_dry_runs_pilot_shows_one_line_and_keeps_its_answers(
    kernel: Kernel, server: ChatServer, tmp_path: Path
) -> None:
    """The stop button during dry_run's pilot is one RunInterrupted line; the answers it got
    are in the cache: the next dry run's pilot sends none of those rows again."""
    cache = tmp_path / "pilot.sqlite3"
    pilot = f'est = df.chat.complete("q", model="test-model", dry_run=True, pilot=0.5, max_parallel={PARALLEL}, cache={str(cache)!r})'  # noqa: E501
    started = kernel.execute(pilot)
    pressed = _interrupt_mid_run(kernel, server)
    cell = kernel.wait(started, timeout=WHOLE_RUN + 10)
    error = _assert_stopped_promptly(cell, pressed, {"RunInterrupted"})
    assert "stopped during the dry run's pilot" in error["evalue"]
    _assert_one_line(error)
    _assert_requests_stopped(server)
    assert server.statuses["ok"] > 0
    again = kernel.run(pilot.replace("est =", "est2 ="), timeout=WHOLE_RUN + 10)
    assert again.status == "ok", again.text()
    # Answers the server sent as the stop cancelled their requests never arrived: at most
    # those in flight are asked again; every answer that arrived is not.
    twice = [prompt for prompt, n in server.answered.items() if n > 1]
    assert len(twice) <= PARALLEL and max(server.answered.values()) <= 2, twice


@pytest.mark.timeout(120)
def test_tab_after_an_item_offers_the_accessor_methods(kernel: Kernel) -> None:
    """Tab after ``df["q"].chat.`` lists the methods (Jedi, IPython's default, works from
    pandas' source and cannot see an accessor added at run time), once each, in a kernel."""
    cases = {
        'df["q"].chat.': {"complete", "embed", "extract", "classify", "filter", "acomplete"},
        'out = df["q"].chat.com': {"complete"},
        "df.chat.": {"complete", "join", "top_k"},
        "df.q.chat.ext": {"extract"},
    }
    for code, expected in cases.items():
        reply = kernel.complete(code)
        assert reply["status"] == "ok", reply
        matches = reply["matches"]
        assert expected <= set(matches), (code, matches)
        assert len(matches) == len(set(matches)), (code, matches)  # Jedi's and ours, merged
        assert reply["cursor_end"] == len(code)
        typed = code.rsplit(".", 1)[1]
        assert reply["cursor_start"] == len(code) - len(typed), (code, reply)
    # Not nbtoolkit's accessor, or not a frame: nothing offered, nothing raised.
    assert kernel.complete('{"a": 1}["a"].chat.')["matches"] == []
