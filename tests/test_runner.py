"""The sync entry point in every kind of process: no loop, a running loop, uvloop, Ctrl-C.

Each case runs in a fresh interpreter: nest_asyncio2 patches asyncio process-wide, and a
real SIGINT must reach a real main thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import asyncio, json, os, signal, sys, threading, time
# Ctrl-C as a terminal's Python has it: a pytest started in the background (nohup, `&`, some
# CI runners) hands its children SIGINT ignored, and the tests' Ctrl-C would never arrive.
signal.signal(signal.SIGINT, signal.default_int_handler)
import pandas as pd
import nbtoolkit
from nbtoolkit.testing import ChatServer

def frame(n):
    return pd.DataFrame({"review": [f"r{i}" for i in range(n)]})

def report(**values):
    print("RESULT " + json.dumps(values), flush=True)
"""


def run_script(body: str, timeout: float = 60) -> tuple[dict[str, object], str]:
    """Run PRELUDE + body in a new interpreter; return its RESULT line and its stderr."""
    # A child still running near the timeout prints every thread's stack: a hang says where.
    stacks = f"import faulthandler; faulthandler.dump_traceback_later({timeout - 5})\n"
    script = stacks + PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "PYTHONDEVMODE": "1"}  # dev mode: unclosed resources are reported
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as hung:
        said = [
            part if isinstance(part, str) else (part or b"").decode()
            for part in (hung.stdout, hung.stderr)
        ]
        raise AssertionError(
            f"no result within {timeout} s:\n{said[0][-3000:]}\n{said[1][-6000:]}"
        ) from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[-1].removeprefix("RESULT ")), done.stderr


def assert_clean(stderr: str) -> None:
    for warning in (
        "Unclosed client session",
        "Task was destroyed",
        "Unclosed connector",
        "ResourceWarning",
        "never awaited",
    ):
        assert warning not in stderr, stderr


def test_sync_call_without_a_loop() -> None:
    """A plain script uses asyncio.run and leaves nothing open."""
    result, stderr = run_script("""
        with ChatServer().run_in_thread() as server:
            out = frame(5).chat.complete("review", model="m", base_url=server.base_url,
                                         progress=False)
        report(answers=out["response"].tolist())
    """)
    assert result["answers"] == [f"echo: r{i}" for i in range(5)]
    assert_clean(stderr)


def test_sync_call_inside_a_running_loop() -> None:
    """Inside a running loop (as in a kernel) the sync call works, twice, and the loop lives on."""
    result, stderr = run_script("""
        async def main():
            with ChatServer().run_in_thread() as server:
                kwargs = dict(model="m", base_url=server.base_url, progress=False)
                first = frame(3).chat.complete("review", **kwargs)
                second = frame(4).chat.complete("review", **kwargs)
                await asyncio.sleep(0)  # the outer loop still works
                third = await frame(2).chat.acomplete("review", **kwargs)
            return [len(first), len(second), len(third), second["response"].tolist()[-1]]
        report(values=asyncio.run(main()))
    """)
    assert result["values"] == [3, 4, 2, "echo: r3"]
    assert_clean(stderr)


def test_unpatchable_loop_falls_back_to_a_thread() -> None:
    """Under uvloop, which nest_asyncio2 cannot patch, a private loop on a thread does the run."""
    pytest.importorskip("uvloop", reason="uvloop is in the test extra; not installed here")
    result, stderr = run_script("""
        import uvloop
        async def main():
            with ChatServer().run_in_thread() as server:
                out = frame(6).chat.complete("review", model="m", base_url=server.base_url,
                                             progress=False)
            return out["response"].tolist()
        report(answers=uvloop.run(main()))
    """)
    assert result["answers"] == [f"echo: r{i}" for i in range(6)]
    assert_clean(stderr)


# Ctrl-C comes once the server has seen 12 requests, not after a fixed delay: on a loaded
# machine the run may not have sent anything 1 s after the call. With 4 workers, each sending
# its next request only after recording its last row, 12 requests mean 8 rows done.
INTERRUPT = """
    pressed = []

    def interrupt_once_sending():
        deadline = time.monotonic() + 30
        while server.request_count < 12 and time.monotonic() < deadline:
            time.sleep(0.005)
        pressed.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    with ChatServer(latency=0.5).run_in_thread() as server:
        threading.Thread(target=interrupt_once_sending, daemon=True).start()
        try:
            CALL
            report(error="not interrupted")
        except nbtoolkit.RunInterrupted as exc:
            seconds = time.monotonic() - pressed[0]
            # The requests cancelled mid-reply end on the server within its 0.5 s latency.
            deadline = time.monotonic() + 5
            while server.in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
            in_flight, sent = server.in_flight, server.request_count
            time.sleep(0.5)
            grew = server.request_count - sent
            answered_twice = max(server.answered.values()) > 1
            partial = exc.partial
            done = partial["response"].dropna()
            last = nbtoolkit.last_run()
            again = frame(2).chat.complete("review", model="m", base_url=server.base_url,
                                           progress=False)
            report(seconds=seconds, in_flight=in_flight, grew=grew,
                   rows=len(partial), done=int(partial["response"].notna().sum()),
                   same=last.output["response"].equals(partial["response"]),
                   outcome=last.outcome, answered_twice=answered_twice,
                   again=again["response"].tolist(),
                   aligned=bool((done == "echo: " + partial["review"][done.index]).all()))
"""

SYNC_CALL = (
    'frame(400).chat.complete("review", model="m", base_url=server.base_url, max_parallel=4)'
)


def _check_interrupt(result: dict[str, object]) -> None:
    assert result.get("error") is None, result
    # Stopped at the interrupt, not after the rest of 400 rows x 0.5 s / 4 = 50 s. A bound
    # on a stop, not a speed: half of what it guards against, for a busy machine.
    assert result["seconds"] < 25
    assert result["in_flight"] == 0  # every request was cancelled ...
    assert result["grew"] == 0  # ... and none started afterwards
    assert result["rows"] == 400
    assert 8 <= result["done"] < 400  # type: ignore[operator]
    assert result["same"] is True
    assert result["aligned"] is True
    assert result["outcome"] == "interrupted"
    assert result["answered_twice"] is False
    assert result["again"] == ["echo: r0", "echo: r1"]


def test_ctrl_c_in_a_script_keeps_finished_rows() -> None:
    """Ctrl-C cancels in-flight requests, closes the session, and keeps every finished row."""
    result, stderr = run_script(INTERRUPT.replace("CALL", SYNC_CALL))
    _check_interrupt(result)
    assert_clean(stderr)


def test_ctrl_c_inside_a_running_loop_keeps_finished_rows() -> None:
    """The same inside a running loop (the notebook case), through nest_asyncio2."""
    body = "async def main():\n" + textwrap.indent(textwrap.dedent(INTERRUPT), "    ")
    body = body.replace("CALL", SYNC_CALL) + "\nasyncio.run(main())\n"
    result, stderr = run_script(body)
    _check_interrupt(result)
    assert_clean(stderr)
