"""The stop button during a semantic operator, in a live kernel: it stops at once, keeps the
answers received (in the cache) and running the cell again asks only about the rest."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbtoolkit.testing import ChatServer, SemanticRules
from tests.kernel_helpers import Kernel, running_kernel, wait_for

ROWS = 120
PARALLEL = 4
LATENCY = 0.2
SETUP = f"""
import json
import pandas as pd
import nbtoolkit
df = pd.DataFrame({{"q": [f"row {{i}}" + (" <match>" if i % 2 else "") for i in range({ROWS})]}})
"""
FILTER = f'out = df.chat.filter("{{q}}", model="big", max_parallel={PARALLEL})'


@pytest.fixture
def server() -> Iterator[ChatServer]:
    """A slow server whose rules know each row's answer."""
    with ChatServer(latency=LATENCY, semantic=SemanticRules()).run_in_thread() as running:
        yield running


@pytest.fixture
def kernel(server: ChatServer, tmp_path: Path) -> Iterator[Kernel]:
    """A kernel aimed at ``server``, with its own cache folder."""
    env = {"OPENAI_BASE_URL": server.base_url, "NBTOOLKIT_CACHE_DIR": str(tmp_path / "cache")}
    with running_kernel(env, tmp_path / "kernel.log") as k:
        setup = k.run(SETUP, timeout=60)
        assert setup.status == "ok", setup.text()
        yield k


@pytest.mark.timeout(120)
def test_stop_during_filter_keeps_answers_and_a_rerun_asks_only_the_rest(
    kernel: Kernel, server: ChatServer
) -> None:
    """Stop mid-filter: one-line RunInterrupted, no more requests; the re-run sends the rest."""
    started = kernel.execute(FILTER)
    kernel.pump_until(lambda: server.request_count >= 3 * PARALLEL, 20, "the filter to start")
    kernel.manager.interrupt_kernel()
    cell = kernel.wait(started, timeout=ROWS / PARALLEL * LATENCY + 10)
    assert cell.status == "error", cell.text()
    assert cell.error["ename"] == "RunInterrupted"
    assert "filter stopped" in cell.error["evalue"]
    assert "running the cell again sends only the rest" in cell.error["evalue"]
    (line,) = cell.error["traceback"]
    assert "nbtoolkit/" not in line
    wait_for(lambda: server.in_flight == 0, 2.0, "in-flight requests to end")
    answered = server.statuses["ok"]
    seen = server.request_count
    time.sleep(1.0)
    assert server.request_count == seen
    assert 0 < answered < ROWS

    again = kernel.run(FILTER + "\nprint(json.dumps(list(out.index)))", timeout=60)
    assert again.status == "ok", again.text()
    assert json.loads(again.stdout.strip().splitlines()[-1]) == list(range(1, ROWS, 2))
    sent_again = server.request_count - seen
    assert ROWS - answered <= sent_again <= ROWS - answered + PARALLEL
