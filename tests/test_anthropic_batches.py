"""Anthropic's Message Batches as the batch transport's second provider: one POST of every
request, results by custom_id from a shuffled results file, re-attach from another process,
cancel, and answers shared with complete()."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit import BatchOptions, ChatConfig, ConfigError
from nbtoolkit.testing import AnthropicServer, BatchBehaviour

KEY = "sk-ant-BATCH-SENTINEL-71c3aa"
CLAUDE = "claude-sonnet-4-5"
FAST = BatchOptions(poll_initial=0.05, poll_max=0.2)
ROOT = Path(__file__).resolve().parent.parent

# The same call as the test's, run by a second Python process against the same cache file.
CHILD = """
import sys
import pandas as pd
import nbtoolkit
df = pd.DataFrame({"q": [f"question {i}" for i in range(300)]})
config = nbtoolkit.ChatConfig(provider="anthropic", base_url=sys.argv[1], model=sys.argv[2])
job = df.chat.submit_batch("q", config=config, progress=False)
print(job.id)
"""


def config(server: AnthropicServer) -> ChatConfig:
    return ChatConfig(
        provider="anthropic",
        base_url=server.base_url,
        api_key=KEY,
        model=CLAUDE,
        progress=False,
    )


def test_a_message_batch_reattaches_maps_by_custom_id_and_pays_nothing_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """300 rows, 5% errored, results shuffled: a second process re-attaches to the same
    batch; answers land by custom_id; complete() then sends exactly the errored rows."""
    behaviour = BatchBehaviour(hold=True, fail_rate=0.05, shuffle=True, seed=5)
    df = pd.DataFrame({"q": [f"question {i}" for i in range(300)]})
    with AnthropicServer(api_key=KEY, batch=behaviour).run_in_thread() as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)  # read by both processes
        job = df.chat.submit_batch("q", config=config(server), batch=FAST)
        assert not job.status().done
        child = subprocess.run(
            [sys.executable, "-c", CHILD, server.base_url, CLAUDE],
            capture_output=True,
            text=True,
            timeout=90,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == job.id
        assert server.batch.creates == 1
        server.batch.release()
        final = job.wait(poll=0.05, progress=False)
        out = job.result()
        failing = {p for p in df["q"] if behaviour.fails(p)}
        assert 5 <= len(failing) <= 30
        assert (final.status, final.completed, final.failed) == (
            "completed",
            300 - len(failing),
            len(failing),
        )
        for prompt, answer in zip(out["q"], out["response"], strict=True):
            assert answer == (None if prompt in failing else f"echo: {prompt}")
        report = nbtoolkit.last_run()
        assert report is not None and set(report.errors["error_kind"]) == {"BadRequestError"}
        assert set(server.batch.lines_run.values()) == {1}
        batch = next(iter(server.batch.batches.values()))
        first = next(
            one["params"]
            for one in batch.requests
            if one["params"]["messages"] == [{"role": "user", "content": "question 0"}]
        )
        assert first["max_tokens"] == 1024 and first["model"] == CLAUDE

        server.reset_records()
        again = df.chat.complete("q", config=config(server))
        assert sorted(r.prompt for r in server.requests) == sorted(failing)
        assert list(again["response"]) == [f"echo: {p}" for p in df["q"]]
        assert server.batch.creates == 1


def test_a_cancelled_message_batch_keeps_what_ran() -> None:
    """A cancel while half the batch ran: those rows keep their answers, the rest are
    cancelled rows with a reason."""
    df = pd.DataFrame({"q": [f"row {i}" for i in range(10)]})
    with AnthropicServer(
        batch=BatchBehaviour(hold=True, cancelling=0.05)
    ).run_in_thread() as server:
        job = df.chat.submit_batch("q", config=config(server), batch=FAST)
        job.cancel()
        final = job.wait(poll=0.05, progress=False)
        out = job.result()
    assert final.status == "cancelled" and server.batch.cancels == 1
    answered = out["response"].notna()
    assert answered.sum() == 5
    assert list(out["response"][answered]) == [f"echo: {q}" for q in out["q"][answered]]
    report = nbtoolkit.last_run()
    assert report is not None
    assert set(report.errors["error_kind"]) == {"BatchLineError"}
    assert report.errors["message"].str.contains("canceled").all()


def test_complete_with_batch_true_on_anthropic_and_gemini_refused() -> None:
    """complete(batch=True) on Anthropic submits, waits and returns at half the price; Gemini
    has no batch here and says so before sending anything."""
    df = pd.DataFrame({"q": ["a", "b"]})
    with AnthropicServer(batch=BatchBehaviour(in_progress=0.1)).run_in_thread() as server:
        priced = dataclasses.replace(config(server), prices={CLAUDE: (3.0, 0.3, 15.0)})
        out = df.chat.complete("q", config=priced, batch=FAST)
    assert list(out["response"]) == ["echo: a", "echo: b"]
    assert server.request_count == 0 and server.batch.creates == 1
    stats = nbtoolkit.last_run().stats  # type: ignore[union-attr]
    live = (stats.prompt_tokens * 3.0 + stats.completion_tokens * 15.0) / 1e6
    assert stats.prompt_tokens > 0 and stats.cost == pytest.approx(live / 2)
    gemini = ChatConfig(provider="gemini", api_key="k", model="gemini-2.5-flash")
    with pytest.raises(ConfigError, match="gemini's batches are not supported"):
        df.chat.submit_batch("q", config=gemini)
