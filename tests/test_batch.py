"""Batch mode against the test server's Batch API: submit, re-attach, results by custom_id."""

from __future__ import annotations

import _thread
import json
import os
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit import BatchOptions, Timeouts
from nbtoolkit.batch._files import Line, split
from nbtoolkit.core._rows import BATCH_KINDS, SOURCES
from nbtoolkit.testing import BatchBehaviour, ChatServer
from tests.conftest import FAST_RETRY, MODEL, settings

SECRET = "sk-nbtoolkit-BATCH-SENTINEL-5d2e8f"
FAST = BatchOptions(poll_initial=0.05, poll_max=0.2)
ROOT = Path(__file__).resolve().parent.parent

# The same call as the test's, run by a second Python process against the same cache file.
CHILD = """
import os, sys
import pandas as pd
import nbtoolkit
df = pd.DataFrame({"q": [f"question {i}: tell me about item {i}" for i in range(1000)]},
                  index=[i // 2 for i in range(1000)])
job = df.chat.submit_batch("q", model=sys.argv[1], base_url=sys.argv[2], progress=False)
print(job.id)
"""


def thousand() -> pd.DataFrame:
    """1,000 distinct prompts under a duplicated index (every label twice)."""
    prompts = [f"question {i}: tell me about item {i}" for i in range(1000)]
    return pd.DataFrame({"q": prompts}, index=[i // 2 for i in range(1000)])


def small(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame({"q": [f"row {i}" for i in range(n)]})


def lines_of(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in content.decode().splitlines() if raw.strip()]


def test_a_thousand_rows_submit_reattach_result_and_resend_only_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1,000 rows, 5% failed lines, shuffled output: one batch for two processes; results
    aligned by custom_id; a following complete sends exactly the failed rows."""
    behaviour = BatchBehaviour(hold=True, fail_rate=0.05, shuffle=True, seed=3)
    df = thousand()
    with ChatServer(batch=behaviour, api_key=SECRET).run_in_thread() as server:
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # read by both processes, as a user's
        job = df.chat.submit_batch("q", **settings(server))
        # Returned while the server holds the batch half done: submit did not wait.
        assert not job.status().done
        child = subprocess.run(
            [sys.executable, "-c", CHILD, MODEL, server.base_url],
            capture_output=True,
            text=True,
            timeout=90,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == job.id
        assert (server.batch.uploads, server.batch.batches_created) == (1, 1)

        server.batch.release()
        final = job.wait(poll=0.05, progress=False)
        out = job.result()
        report = nbtoolkit.last_run()
        assert report is not None

        failing = {p for p in df["q"] if behaviour.fails(p)}
        assert 20 <= len(failing) <= 90  # about 5% of 1,000
        assert (final.status, final.completed, final.failed) == (
            "completed",
            1000 - len(failing),
            len(failing),
        )
        batch = next(iter(server.batch.batches.values()))
        assert batch.output_file_id is not None and batch.error_file_id is not None
        sent = [line["custom_id"] for line in lines_of(server.batch.files[batch.input_file_id])]
        back = [line["custom_id"] for line in lines_of(server.batch.files[batch.output_file_id])]
        assert back != [cid for cid in sent if cid in set(back)]  # really shuffled

        assert list(out.index) == list(df.index) and list(out["q"]) == list(df["q"])
        for prompt, answer in zip(out["q"], out["response"], strict=True):
            assert answer == (None if prompt in failing else f"echo: {prompt}")
        errors = report.errors
        assert len(errors) == len(failing)
        assert set(errors["error_kind"]) <= {"BadRequestError", "BatchLineError"}
        assert errors["message"].str.len().min() > 0
        assert set(report.rows["source"].dropna()) == {"batch"}

        server.reset_records()
        again = df.chat.complete("q", **settings(server))
        assert sorted(r.prompt for r in server.requests) == sorted(failing)
        assert again["response"].tolist() == [f"echo: {p}" for p in df["q"]]
        assert server.batch.batches_created == 1


def test_submit_again_after_the_results_sends_nothing(server: ChatServer) -> None:
    """Once a job's answers are in the cache, the same call uploads nothing and answers all
    rows from the cache; identical rows go in one line."""
    df = pd.DataFrame({"q": ["a", "b", "a", None]})
    job = df.chat.submit_batch("q", **settings(server), batch=FAST)
    first = job.result()
    lines = lines_of(server.batch.files[next(iter(server.batch.batches.values())).input_file_id])
    assert len(lines) == 2
    rows = nbtoolkit.last_run().rows  # type: ignore[union-attr]
    assert rows["source"].tolist() == ["batch", "batch", "duplicate", None]
    assert rows["status"].tolist() == ["ok", "ok", "ok", "skipped"]

    again = df.chat.submit_batch("q", **settings(server), batch=FAST)
    assert again.ids == () and again.status().done
    assert again.result().equals(first)
    assert (server.batch.uploads, server.batch.batches_created) == (1, 1)
    assert nbtoolkit.last_run().rows["source"].tolist()[:2] == ["cache", "cache"]  # type: ignore[union-attr]


def test_the_line_body_is_the_body_complete_sends(server: ChatServer) -> None:
    """A batch line carries byte for byte the body complete POSTs, and its answer is then a
    cache hit for complete."""
    df = pd.DataFrame({"q": ["hello"]})
    params: dict[str, Any] = {"temperature": 0, "max_tokens": 7, "seed": 1}
    job = df.chat.submit_batch("q", system="Be brief.", **settings(server), batch=FAST, **params)
    job.result()
    (line,) = lines_of(server.batch.files[next(iter(server.batch.batches.values())).input_file_id])
    assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
    assert line["custom_id"].startswith("r-")

    nbtoolkit.clear_cache()
    df.chat.complete("q", system="Be brief.", **settings(server), **params)
    assert server.requests[0].body == line["body"]
    server.reset_records()
    df.chat.complete("q", system="Be brief.", **settings(server), **params)
    assert server.request_count == 0


def test_complete_with_batch_true_submits_waits_and_returns(server: ChatServer) -> None:
    """complete(batch=...) gives complete's frame with no chat request sent."""
    df = small(5)
    out = df.chat.complete("q", output="answer", **settings(server), batch=FAST)
    assert out["answer"].tolist() == [f"echo: row {i}" for i in range(5)]
    assert server.request_count == 0 and server.batch.batches_created == 1
    out = df.chat.complete("q", output="answer", **settings(server), batch=True)
    assert out["answer"].notna().all() and server.batch.batches_created == 1


async def test_the_async_methods_run_a_job() -> None:
    """asubmit_batch, await_ and aresult work under await."""
    async with ChatServer() as server:
        job = await small(3).chat.asubmit_batch("q", **settings(server), batch=FAST)
        assert (await job.await_(poll=0.05, progress=False)).status == "completed"
        out = await job.aresult()
    assert out["response"].tolist() == ["echo: row 0", "echo: row 1", "echo: row 2"]


def test_an_expired_batch_keeps_what_ran_and_names_the_rest() -> None:
    """Expiry: lines that ran are answers; the others are batch_expired rows, and a
    following complete sends exactly those."""
    behaviour = BatchBehaviour(hold=True, in_progress=0.0, expire_after=0.3)
    df = small(10)
    with ChatServer(batch=behaviour).run_in_thread() as server:
        job = df.chat.submit_batch("q", **settings(server), batch=FAST)
        assert job.wait(poll=0.05).status == "expired"
        out = job.result()
        report = nbtoolkit.last_run()
        assert report is not None
        assert out["response"].notna().sum() == 5  # held at half its lines when it expired
        expired = report.errors
        assert set(expired["error_kind"]) == {"BatchExpired"}
        assert expired["message"].str.startswith("batch_expired:").all()
        df.chat.complete("q", **settings(server))
        assert sorted(r.prompt for r in server.requests) == sorted(df.loc[expired.index, "q"])


def test_a_cancelled_batch_returns_its_rows_as_cancelled() -> None:
    """cancel() ends the job on the server; rows that never ran are 'cancelled'."""
    with ChatServer(batch=BatchBehaviour(hold=True)).run_in_thread() as server:
        job = small(8).chat.submit_batch("q", **settings(server), batch=FAST)
        job.cancel()
        assert job.wait(poll=0.05).status == "cancelled"
        out = job.result()
        rows = nbtoolkit.last_run().rows  # type: ignore[union-attr]
        assert server.batch.cancels == 1
        assert set(rows["status"]) <= {"ok", "cancelled"} and "cancelled" in set(rows["status"])
        assert (out["response"].notna()).tolist() == (rows["status"] == "ok").tolist()


def test_a_batch_with_only_an_error_file() -> None:
    """A completed batch whose every line failed has no output file; each row says why."""
    with ChatServer(batch=BatchBehaviour(fail_rate=1.0)).run_in_thread() as server:
        job = small(6).chat.submit_batch("q", **settings(server), batch=FAST)
        out = job.result()
        batch = next(iter(server.batch.batches.values()))
    assert batch.status == "completed" and batch.output_file_id is None
    assert out["response"].isna().all()
    errors = nbtoolkit.last_run().errors  # type: ignore[union-attr]
    assert len(errors) == 6
    assert set(errors["error_kind"]) <= {"BadRequestError", "BatchLineError"}
    assert {400} <= set(errors["http_status"].dropna())


def test_a_batch_that_fails_validation() -> None:
    """A batch the server refuses to run: every row None, with the server's reason."""
    with ChatServer(batch=BatchBehaviour(fail_validation=True)).run_in_thread() as server:
        job = small(4).chat.submit_batch("q", **settings(server), batch=FAST)
        out = job.result()
    assert out["response"].isna().all()
    errors = nbtoolkit.last_run().errors  # type: ignore[union-attr]
    assert set(errors["error_kind"]) == {"BatchFailed"}
    assert errors["message"].str.contains("scripted validation failure").all()
    assert nbtoolkit.batch_jobs()["status"].tolist() == ["failed"]


def test_a_large_job_is_split_into_several_batches(server: ChatServer) -> None:
    """Past max_lines per file the job becomes several batches, one id each, one result."""
    options = BatchOptions(max_lines=30, poll_initial=0.05, poll_max=0.2)
    df = small(100)
    job = df.chat.submit_batch("q", **settings(server), batch=options)
    assert len(job.ids) == 4 and job.id == job.job_id
    sizes = [
        len(lines_of(server.batch.files[b.input_file_id])) for b in server.batch.batches.values()
    ]
    assert sizes == [30, 30, 30, 10]
    out = job.result()
    assert out["response"].tolist() == [f"echo: row {i}" for i in range(100)]
    listed = nbtoolkit.batch_jobs()
    assert sorted(listed["id"]) == sorted(job.ids)
    assert set(listed["status"]) == {"completed"} and listed["total"].sum() == 100


def test_split_keeps_one_model_per_file_and_the_byte_limit() -> None:
    """Files never mix models, and none passes max_bytes."""
    lines = [Line(f"c{i}", bytes([i]), "a" if i % 3 else "b", b"x" * 10) for i in range(9)]
    files = split(lines, max_lines=100, max_bytes=25)
    assert all(len({one.model for one in file}) == 1 for file in files)
    assert all(sum(len(one.data) for one in file) <= 25 for file in files)
    assert sorted(one.custom_id for file in files for one in file) == sorted(
        f"c{i}" for i in range(9)
    )
    with pytest.raises(nbtoolkit.ConfigError, match="more than a batch file may hold"):
        split(lines, max_lines=100, max_bytes=5)


def test_max_cost_is_checked_at_the_batch_price_before_any_upload(server: ChatServer) -> None:
    """A worst case over max_cost is refused with nothing uploaded; the discount halves it."""
    df = small(10)
    prices = {MODEL: (1000.0, 1000.0)}  # per million tokens
    # Worst case: 10 rows x (about 12 prompt tokens, estimated from the encoded body, + 100
    # max_tokens) = about 1,215 tokens: 1.2 at full price, 0.61 at the batch price.
    with pytest.raises(nbtoolkit.ConfigError, match="nothing uploaded"):
        df.chat.submit_batch("q", **settings(server), prices=prices, max_cost=0.5, max_tokens=100)
    assert (server.batch.uploads, server.batch.batches_created) == (0, 0)
    assert nbtoolkit.batch_jobs().empty
    job = df.chat.submit_batch(
        "q", **settings(server), prices=prices, max_cost=0.7, max_tokens=100, batch=FAST
    )
    job.result()
    stats = nbtoolkit.last_run().stats  # type: ignore[union-attr]
    tokens = stats.prompt_tokens + stats.completion_tokens
    assert stats.cost == pytest.approx(tokens * 1000.0 / 1e6 * 0.5)
    with pytest.raises(nbtoolkit.ConfigError, match="max_cost needs a price"):
        small(3).chat.submit_batch("q", **settings(server), max_cost=1.0)


def test_batch_mode_needs_the_cache(server: ChatServer) -> None:
    """cache=False is refused before anything is sent: the job could not be found again."""
    with pytest.raises(nbtoolkit.ConfigError, match="cache"):
        small(2).chat.submit_batch("q", **settings(server), cache=False)
    assert server.batch.uploads == 0


def test_ctrl_c_stops_waiting_not_the_job() -> None:
    """An interrupt during wait() raises RunInterrupted; the batch runs on, uncancelled."""
    with ChatServer(batch=BatchBehaviour(hold=True)).run_in_thread() as server:
        job = small(4).chat.submit_batch("q", **settings(server))
        timer = threading.Timer(0.3, _thread.interrupt_main)
        timer.start()
        try:
            with pytest.raises(nbtoolkit.RunInterrupted, match="keeps running on the server"):
                job.wait(poll=0.05, progress=False)
        finally:
            timer.cancel()
        assert server.batch.cancels == 0
        assert not job.status().done
        server.batch.release()
        assert job.result()["response"].notna().all()


def test_the_api_key_is_in_no_repr_file_or_error(tmp_path: Path) -> None:
    """The key never shows in a job's repr, status, report, the cache file, the uploaded
    file, the job list or a rejected call's error."""
    cache = tmp_path / "jobs.sqlite3"
    with ChatServer(api_key=SECRET, batch=BatchBehaviour(fail_rate=0.3)).run_in_thread() as server:
        kw = {**settings(server), "api_key": SECRET, "cache": cache}
        job = small(10).chat.submit_batch("q", **kw, batch=FAST)
        said = [repr(job), str(job.status()), repr(job.status()), repr(job.config)]
        job.result()
        report = nbtoolkit.last_run()
        assert report is not None and report.rows["status"].eq("ok").any()
        said += [repr(report), report.rows.to_string(), report.output.to_string()]
        said.append(nbtoolkit.batch_jobs(cache).to_string())
        files = b"".join(server.batch.files.values())
        wrong = "sk-nbtoolkit-WRONG-000"
        with pytest.raises(nbtoolkit.AuthError) as caught:
            small(3).chat.submit_batch("q", **{**kw, "api_key": wrong})
        said += traceback.format_exception(caught.value)
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for needle in (SECRET, wrong):
        assert needle not in "\n".join(said)
        assert needle.encode() not in files
        assert needle.encode() not in on_disk


def test_a_query_in_the_url_keeps_batch_and_complete_answers_shared(server: ChatServer) -> None:
    """With api-version in the URL, a batch answer is a cache hit for complete (0 requests),
    and a changed api-version re-attaches to the same job instead of paying again."""
    df = small(6)
    held = BatchOptions(poll_initial=0.05, poll_max=0.2)
    job = df.chat.submit_batch("q", **settings(server), api_version="2024-10-21", batch=held)
    again = df.chat.submit_batch("q", **settings(server), api_version="2025-04-01", batch=held)
    assert again.job_id == job.job_id and again.id == job.id
    assert (server.batch.uploads, server.batch.batches_created) == (1, 1)
    job.result()
    out = df.chat.complete("q", **settings(server), api_version="2025-04-01")
    assert server.request_count == 0
    assert out["response"].tolist() == [f"echo: row {i}" for i in range(6)]


@pytest.mark.parametrize("value", [None, 0, 1, "yes"])
def test_batch_takes_only_true_false_or_options(server: ChatServer, value: object) -> None:
    """complete(batch=None / 0 / 1 / "yes") is a ConfigError with nothing sent: only True
    or a BatchOptions start a Batch API job, and False (the default) runs live;
    submit_batch(batch=...) takes only a BatchOptions."""
    with pytest.raises(nbtoolkit.ConfigError, match="batch= takes True"):
        small(2).chat.complete("q", **settings(server), batch=value)
    assert server.request_count == 0 and server.batch.uploads == 0
    with pytest.raises(nbtoolkit.ConfigError, match="BatchOptions"):
        small(2).chat.submit_batch("q", **settings(server), batch=value or True)
    assert server.batch.uploads == 0
    small(2).chat.complete("q", **settings(server), batch=False)
    assert server.request_count == 2 and server.batch.uploads == 0


def test_headers_go_on_the_calls_never_into_the_uploaded_lines(tmp_path: Path) -> None:
    """submit_batch(headers=...) sends the headers with the Batch API calls; no header value
    is in the JSONL file, the cache file or the job list."""
    secret = "org-secret-HEADER-VALUE-7f3a9c"
    with ChatServer().run_in_thread() as server:
        kw = {**settings(server), "cache": tmp_path / "c.sqlite3"}
        job = small(3).chat.submit_batch("q", **kw, headers={"X-Org-Token": secret}, batch=FAST)
        job.result()
        (batch,) = server.batch.batches.values()
        lines = lines_of(server.batch.files[batch.input_file_id])
        seen = server.batch.headers_seen
    assert all(set(line["body"]) == {"model", "messages"} for line in lines)
    assert secret.encode() not in b"".join(server.batch.files.values())
    assert seen and all(h.get("X-Org-Token") == secret for h in seen)
    assert not any(secret.encode() in p.read_bytes() for p in tmp_path.iterdir())


def test_an_azure_deployment_url_shares_answers_and_jobs_with_complete() -> None:
    """Against an Azure deployment URL (?api-version=...), the batch goes to the resource's
    /openai/files and /openai/batches; another api-version re-attaches to the same job, and
    complete() on the same rows then sends 0 requests."""
    df = small(6)
    with ChatServer(azure=True, api_key=SECRET).run_in_thread() as server:
        kw: dict[str, Any] = {
            "model": MODEL,
            "azure_endpoint": server.azure_endpoint,
            "api_key": SECRET,
            "retry": FAST_RETRY,
            "progress": False,
        }
        job = df.chat.submit_batch("q", **kw, api_version="2024-10-21", batch=FAST)
        again = df.chat.submit_batch("q", **kw, api_version="2025-04-01-preview", batch=FAST)
        assert again.job_id == job.job_id and again.id == job.id
        assert (server.batch.uploads, server.batch.batches_created) == (1, 1)
        assert job.result()["response"].tolist() == [f"echo: row {i}" for i in range(6)]
        (batch,) = server.batch.batches.values()
        assert batch.endpoint == "/chat/completions"
        assert {line["url"] for line in lines_of(server.batch.files[batch.input_file_id])} == {
            "/chat/completions"
        }
        assert all(seen.get("api-version") for seen in server.batch.queries_seen)
        out = df.chat.complete("q", **kw, api_version="2025-04-01-preview")
        assert server.request_count == 0
        assert out["response"].tolist() == [f"echo: row {i}" for i in range(6)]


def test_complete_first_then_a_batch_of_the_same_rows_sends_only_the_new_ones(
    server: ChatServer,
) -> None:
    """complete() answers 4 rows under one api-version; a batch of those 4 and 2 new rows,
    under another api-version, uploads lines for the 2 new rows only."""
    df = small(6)
    df.chat.complete("q", **settings(server), api_version="2024-10-21", max_tokens=9)
    df = pd.concat([df, pd.DataFrame({"q": ["new a", "new b"]})], ignore_index=True)
    job = df.chat.submit_batch(
        "q", **settings(server), api_version="2025-04-01", max_tokens=9, batch=FAST
    )
    (batch,) = server.batch.batches.values()
    sent = [
        line["body"]["messages"][-1]["content"]
        for line in lines_of(server.batch.files[batch.input_file_id])
    ]
    assert sorted(sent) == ["new a", "new b"]
    out = job.result()
    assert out["response"].notna().all()
    sources = nbtoolkit.last_run().rows["source"].tolist()  # type: ignore[union-attr]
    assert sources == ["cache"] * 6 + ["batch"] * 2


def test_batch_errors_never_show_the_key_a_header_or_a_query_secret(tmp_path: Path) -> None:
    """An upload refused with a body that echoes the request: the BadRequestError keeps the
    server's words and none of the key, a header value or a query value; not retried."""
    header_secret = "org-secret-HEADER-VALUE-7f3a9c"
    query_secret = "sig-secret-QUERY-VALUE-91be04"
    behaviour = BatchBehaviour(refuse_uploads=True)
    with ChatServer(api_key=SECRET, batch=behaviour).run_in_thread() as server:
        with pytest.raises(nbtoolkit.BadRequestError) as caught:
            small(3).chat.submit_batch(
                "q",
                **settings(server),
                api_key=SECRET,
                headers={"X-Org-Token": header_secret},
                query={"sig": query_secret},
                cache=tmp_path / "c.sqlite3",
            )
        assert len(server.batch.headers_seen) == 1  # a 400 is not retried
        echoed = server.batch.headers_seen[0]
    assert echoed["X-Org-Token"] == header_secret  # the server did see it, and echoed it
    shown = "\n".join(traceback.format_exception(caught.value)) + caught.value.body
    assert "upload refused" in shown
    for secret in (SECRET, header_secret, query_secret):
        assert secret not in shown


def test_a_large_upload_gets_a_timeout_sized_for_the_file() -> None:
    """A 4 MB upload the server takes 3 s to accept succeeds at the first try under a 2 s
    request timeout: an upload gets the request's timeout plus a second per MB."""
    slow = ChatServer(batch=BatchBehaviour(upload_delay=3.0))
    with slow.run_in_thread() as running:
        df = pd.DataFrame({"q": [f"{i} " + "x" * 10_000 for i in range(400)]})
        job = df.chat.submit_batch(
            "q", **settings(running), timeout=Timeouts(total=2.0), batch=FAST
        )
        assert len(running.batch.headers_seen) >= 2  # the upload, then the create
        assert running.batch.calls["upload"] == 1 and running.batch.batches_created == 1
        (batch,) = running.batch.batches.values()
        assert len(running.batch.files[batch.input_file_id]) > 4_000_000
        assert job.result()["response"].notna().all()


def test_row_sources_and_batch_kinds_are_the_documented_ones() -> None:
    """A batch's rows say source "batch" and kinds from BATCH_KINDS, as RowResult, RowError
    and the docs' run report section (docs/api.md) document them."""
    behaviour = BatchBehaviour(hold=True, in_progress=0.0, expire_after=0.3)
    with ChatServer(batch=behaviour).run_in_thread() as running:
        job = small(10).chat.submit_batch("q", **settings(running), batch=FAST)
        job.result()
    rows = nbtoolkit.last_run().rows  # type: ignore[union-attr]
    assert set(rows["source"].dropna()) == {"batch"} <= SOURCES
    assert set(rows["error_kind"].dropna()) == {"BatchExpired"} <= BATCH_KINDS
    api = (ROOT / "docs" / "api.md").read_text()
    report = api[api.index("## The run report") :]
    report = report[: report.index("\n#")]
    assert all(f"`{source}`" in report for source in SOURCES)
    assert all(f"`{kind}`" in report for kind in BATCH_KINDS)


def test_batch_calls_retry_like_rows_but_a_create_only_after_a_429(tmp_path: Path) -> None:
    """A 503 on a status check and a 429 on create are retried under the run's RetryPolicy;
    a 500 on create is not (the batch may exist: creating it again would pay twice), and
    the part stays unsent until the same call is run again."""
    cache = tmp_path / "c.sqlite3"
    retried = BatchBehaviour(statuses={"create": (429,), "status": (503, 503)})
    with ChatServer(batch=retried).run_in_thread() as server:
        job = small(3).chat.submit_batch("q", **settings(server), cache=cache, batch=FAST)
        assert job.result()["response"].notna().all()
        assert server.batch.calls["create"] == 2 and server.batch.batches_created == 1
        assert server.batch.calls["status"] >= 3  # two 503s, then answers
    refused = BatchBehaviour(statuses={"create": (500,)})
    with ChatServer(batch=refused).run_in_thread() as server:
        df = small(4)
        with pytest.raises(nbtoolkit.ServerError, match="500"):
            df.chat.submit_batch("q", **settings(server), cache=cache, batch=FAST)
        assert (server.batch.calls["create"], server.batch.batches_created) == (1, 0)
        assert "unsent" in set(nbtoolkit.batch_jobs(cache)["status"])
        job = df.chat.submit_batch("q", **settings(server), cache=cache, batch=FAST)
        assert (server.batch.uploads, server.batch.batches_created) == (2, 1)
        assert job.result()["response"].notna().all()


def test_a_batch_without_max_tokens_is_checked_at_the_models_output_ceiling(
    server: ChatServer,
) -> None:
    """Without max_tokens a batch's worst case is each row at the model's output ceiling
    (16,384 assumed for an unknown model), not a guess: over max_tokens_total, nothing is
    uploaded; with max_tokens the same budget takes the job."""
    df = small(10)
    with pytest.raises(nbtoolkit.ConfigError, match="over max_tokens_total=50,000"):
        df.chat.submit_batch("q", **settings(server), max_tokens_total=50_000)
    assert (server.batch.uploads, server.batch.batches_created) == (0, 0)
    job = df.chat.submit_batch(
        "q", **settings(server), max_tokens_total=50_000, max_tokens=100, batch=FAST
    )
    job.result()
    assert server.batch.uploads == 1
