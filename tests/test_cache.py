"""The response cache as a checkpoint: re-runs, resume after kill -9, sharing, dedupe, budgets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

import nbtoolkit
from nbtoolkit.testing import ChatServer, Reply, Stall, Status
from tests.conftest import MODEL, settings

KEY = "sk-cache-SENTINEL-5d41402abc4b2a76"


def frame(n: int, prefix: str = "row") -> pd.DataFrame:
    return pd.DataFrame({"review": [f"{prefix} {i}" for i in range(n)]})


def cache_file() -> Path:
    return Path(os.environ["NBTOOLKIT_CACHE_DIR"]) / "responses.sqlite3"


def report() -> nbtoolkit.RunReport:
    last = nbtoolkit.last_run()
    assert last is not None
    return last


def test_a_finished_call_reruns_free(server: ChatServer) -> None:
    """Running the same call again sends nothing and gives the same frame from the cache."""
    first = frame(30).chat.complete("review", **settings(server))
    sent = server.request_count
    again = frame(30).chat.complete("review", **settings(server))
    pd.testing.assert_frame_equal(first, again)
    assert server.request_count == sent == 30
    assert report().stats.cache_hits == 30
    assert set(report().rows["source"]) == {"cache"}
    assert report().stats.requests_sent == 0


def test_errors_are_never_cached_so_a_rerun_retries_only_failures(server: ChatServer) -> None:
    """A row that failed is asked again on a re-run; rows that worked are not."""
    server.script(Status(400), prompt="row 3")
    first = frame(6).chat.complete("review", **settings(server))
    assert first["response"].isna().tolist() == [False, False, False, True, False, False]
    again = frame(6).chat.complete("review", **settings(server))
    assert again["response"].notna().all()
    assert [r.prompt for r in server.requests[6:]] == ["row 3"]


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"model": "other-model"},
        {"system": "Be brief."},
        {"max_tokens": 5},
        {"response_format": {"type": "json_object"}},
    ],
)
def test_the_key_covers_what_changes_the_answer(server: ChatServer, change: dict) -> None:
    """A change of model, system prompt or any body parameter is a different request."""
    frame(2).chat.complete("review", **settings(server))
    frame(2).chat.complete("review", **settings(server, **change))
    assert server.request_count == 4


def test_the_key_leaves_out_the_api_key(tmp_path: Path) -> None:
    """Another API key for the same request still hits the cache; the key is not in the file."""
    with ChatServer().run_in_thread() as server:
        frame(3).chat.complete("review", api_key=KEY, **settings(server))
        frame(3).chat.complete("review", api_key=KEY + "-other", **settings(server))
        assert server.request_count == 3
    for path in cache_file().parent.iterdir():
        assert KEY.encode() not in path.read_bytes(), path


def test_cache_file_is_private_and_can_be_placed(server: ChatServer, tmp_path: Path) -> None:
    """cache=PATH puts the file there, readable by its owner only; cache=False writes none."""
    path = tmp_path / "mine" / "answers.sqlite3"
    frame(2).chat.complete("review", cache=path, **settings(server))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not cache_file().exists()
    frame(2).chat.complete("review", cache=False, **settings(server))
    frame(2).chat.complete("review", cache=False, **settings(server))
    assert server.request_count == 6
    assert not cache_file().exists()


def test_info_and_clear(server: ChatServer) -> None:
    """cache_info says how many answers and bytes; clear_cache empties it."""
    frame(12).chat.complete("review", **settings(server))
    info = nbtoolkit.cache_info()
    assert info.entries == 12
    assert info.bytes > 0
    assert info.path == cache_file()
    assert nbtoolkit.clear_cache().entries == 0
    frame(12).chat.complete("review", **settings(server))
    assert server.request_count == 24


def test_identical_requests_in_one_run_are_sent_once(server: ChatServer) -> None:
    """100 rows with 5 distinct prompts send 5 requests; every row gets its answer."""
    df = pd.DataFrame({"review": [f"p{i % 5}" for i in range(100)]})
    out = df.chat.complete("review", cache=False, **settings(server))
    assert out["response"].tolist() == [f"echo: p{i % 5}" for i in range(100)]
    assert server.request_count == 5
    assert report().stats.duplicates == 95
    assert report().rows["source"].value_counts().to_dict() == {"api": 5, "duplicate": 95}


def test_an_answer_from_earlier_in_the_run_is_found_before_the_run_ends(
    server: ChatServer,
) -> None:
    """A prompt asked again after its answer arrived is a cache hit, not a second request."""
    df = frame(600)
    df.loc[599, "review"] = "row 0"
    out = df.chat.complete("review", **settings(server, max_parallel=2))
    assert out["response"].iloc[599] == "echo: row 0"
    assert server.answered["row 0"] == 1
    assert server.request_count == 599
    assert report().rows["source"].iloc[599] == "cache"


def test_the_journal_moves_into_the_keyed_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers are journaled, moved in batches, at close, and when a cache is opened."""
    from nbtoolkit.core.store import _cache as cache_module
    from nbtoolkit.core.store._cache import CachedAnswer, ResponseCache

    monkeypatch.setattr(cache_module, "_MERGE_EVERY", 4)
    path = tmp_path / "c.sqlite3"
    answers = {bytes([i]) * 32: CachedAnswer(f"a{i}", i, 1, None) for i in range(10)}
    keys = list(answers)

    def tables() -> tuple[int, int]:
        with sqlite3.connect(path) as db:
            (counts,) = db.execute(
                "SELECT (SELECT count(*) FROM responses), (SELECT count(*) FROM journal)"
            ).fetchall()
        return counts

    writer, reader = ResponseCache(path), ResponseCache(path)
    for key in keys:
        writer.put(key, answers[key], model="m")
        writer.commit()
    assert tables() == (8, 2)  # moved at 4 and at 8
    assert writer.get_many(keys) == answers  # its own journal included
    assert list(reader.get_many(keys)) == keys[:8]  # another's journal is not read...
    ResponseCache(path).close()  # ...until a cache is opened (a killed run's journal)
    assert tables() == (10, 0)
    assert reader.get_many(keys) == answers
    assert writer.get_many(keys) == answers
    writer.put(b"x" * 32, CachedAnswer("late", None, None, None))
    writer.close()
    reader.close()
    assert tables() == (11, 0)


def _counts(path: Path, *tables: str) -> tuple[int, ...]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return tuple(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables)


def test_vectors_go_to_the_vectors_file_and_their_keys_are_merged_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes go to the vectors file, one span row per commit; keys reach vector_keys in
    batches, at close and on open."""
    from nbtoolkit.core.store import _vectors as vector_store
    from nbtoolkit.core.store._cache import CachedAnswer, ResponseCache

    monkeypatch.setattr(vector_store, "MERGE_EVERY", 4)
    path = tmp_path / "c.sqlite3"
    answers = {bytes([i]) * 32: CachedAnswer(bytes([i]) * 1024, None, None, None) for i in range(6)}
    keys = list(answers)
    writer, reader = ResponseCache(path), ResponseCache(path)
    for key in keys:
        writer.put(key, answers[key], model="m")
        writer.commit()
    assert _counts(path, "vector_keys", "vector_spans", "responses", "journal") == (4, 2, 0, 0)
    assert writer.get_many(keys) == answers  # its own unmerged answers, from memory
    assert list(reader.get_many(keys)) == keys[:4]  # another's are not read...
    ResponseCache(path).close()  # ...until a cache is opened (a killed run's answers)
    assert _counts(path, "vector_keys", "vector_spans") == (6, 0)
    assert reader.get_many(keys) == answers
    assert writer.get_many(keys) == answers
    assert writer.info().entries == 6
    writer.put(b"t" * 32, CachedAnswer("text", 1, 2, None))  # text still goes to the journal
    writer.put(b"x" * 32, CachedAnswer(b"late", 3, None, 0))
    writer.close()
    reader.close()
    assert _counts(path, "vector_keys", "responses") == (7, 1)
    with ResponseCache(path) as cache:
        assert cache.get_many([b"t" * 32, b"x" * 32]) == {
            b"t" * 32: CachedAnswer("text", 1, 2, None),
            b"x" * 32: CachedAnswer(b"late", 3, None, 0),  # token counts kept too
        }
        assert cache.get_many([b"t" * 32, b"x" * 32], binary=True) == {
            b"x" * 32: CachedAnswer(b"late", 3, None, 0)
        }
        assert cache.get_many([b"t" * 32, b"x" * 32], binary=False) == {
            b"t" * 32: CachedAnswer("text", 1, 2, None)
        }
        assert cache.info().entries == 8
        cache.clear()
        assert cache.info().entries == 0
        assert cache.get_many(keys) == {}
    assert _counts(path, "vector_keys", "vector_spans") == (0, 0)


def test_a_reader_finds_vectors_another_process_saved_after_it_looked(tmp_path: Path) -> None:
    """A lookup that found no vectors in the file still finds those written meanwhile."""
    from nbtoolkit.core.store._cache import CachedAnswer, ResponseCache

    path = tmp_path / "c.sqlite3"
    key = b"v" * 32
    with ResponseCache(path) as reader:
        assert reader.get_many([key]) == {}  # no vectors in the file yet
        with ResponseCache(path) as writer:
            writer.put(key, CachedAnswer(b"vector", None, None, None))
        assert reader.get_many([key]) == {key: CachedAnswer(b"vector", None, None, None)}


def test_a_binary_answer_saved_twice_is_kept_once_the_newest(tmp_path: Path) -> None:
    """Two processes saving one key: after the merge one entry is left, the later answer."""
    from nbtoolkit.core.store._cache import CachedAnswer, ResponseCache

    path = tmp_path / "c.sqlite3"
    key, other = b"k" * 32, b"o" * 32
    first, second = ResponseCache(path), ResponseCache(path)
    first.put(key, CachedAnswer(b"old", None, None, None))
    first.put(other, CachedAnswer(b"other", None, None, None))
    first.commit()
    second.put(key, CachedAnswer(b"new", None, None, None))
    second.commit()
    first.close()  # merges both connections' answers
    assert _counts(path, "vector_keys", "vector_spans") == (2, 0)
    assert second.get_many([key, other]) == {
        key: CachedAnswer(b"new", None, None, None),
        other: CachedAnswer(b"other", None, None, None),
    }
    second.put(key, CachedAnswer(b"newer", None, None, None))  # over a merged answer
    second.close()
    assert _counts(path, "vector_keys") == (2,)
    with ResponseCache(path) as cache:
        assert cache.get_many([key])[key].text == b"newer"
        assert cache.info().entries == 2


def test_a_cache_file_of_the_previous_layout_is_still_read(tmp_path: Path) -> None:
    """A 4 KB-page file with vectors in responses/journal: found, counted, and added to."""
    from nbtoolkit.core.store._cache import CachedAnswer, ResponseCache

    path = tmp_path / "old.sqlite3"
    columns = (
        "key BLOB NOT NULL, text TEXT NOT NULL, prompt_tokens INTEGER,"
        " completion_tokens INTEGER, cached_tokens INTEGER, model TEXT, created REAL NOT NULL"
    )
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"CREATE TABLE responses ({columns}, PRIMARY KEY (key)) WITHOUT ROWID")
        db.execute(f"CREATE TABLE journal ({columns})")
        rows = [
            (b"v" * 32, b"\x00" * 8, None, None, None, "m", 1.0),
            (b"c" * 32, "chat answer", 3, 4, 1, "m", 1.0),
        ]
        db.executemany("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute(
            "INSERT INTO journal VALUES (?, ?, ?, ?, ?, ?, ?)",
            (b"j" * 32, b"jj", *[None] * 3, "m", 1.0),
        )
    with ResponseCache(path) as cache:
        assert cache.get_many([b"v" * 32, b"c" * 32, b"j" * 32]) == {
            b"v" * 32: CachedAnswer(b"\x00" * 8, None, None, None),
            b"c" * 32: CachedAnswer("chat answer", 3, 4, 1),
            b"j" * 32: CachedAnswer(b"jj", None, None, None),
        }
        cache.put(b"n" * 32, CachedAnswer(b"\x01" * 1024, None, None, None))
        cache.commit()
        assert cache.info().entries == 4
    with ResponseCache(path) as cache:
        assert cache.get_many([b"n" * 32])[b"n" * 32].text == b"\x01" * 1024
        assert cache.info().entries == 4
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA page_size").fetchone() == (4096,)  # kept: no VACUUM
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_vectors_live_in_a_private_file_and_a_damaged_record_is_a_miss(tmp_path: Path) -> None:
    """The vectors file is owner-only; a record that fails its check is not returned, is
    saved again when fetched again, and clear() empties the file."""
    from nbtoolkit.core.store._cache import CachedAnswer, ResponseCache, vectors_path

    path = tmp_path / "c.sqlite3"
    answers = {bytes([i]) * 32: CachedAnswer(bytes([i]) * 1024, 5, None, None) for i in range(4)}
    keys = list(answers)
    with ResponseCache(path) as cache:
        for key, answer in answers.items():
            cache.put(key, answer)
        cache.commit()
    vectors = vectors_path(path)
    assert stat.S_IMODE(vectors.stat().st_mode) == 0o600
    record = 34 + 32 + 1024  # header, key, bytes
    assert vectors.stat().st_size == 4 * record
    data = bytearray(vectors.read_bytes())
    data[record + 34 + 32 + 100] ^= 0xFF  # vector 1: one byte changed
    vectors.write_bytes(bytes(data[: 3 * record + 500]))  # vector 3: cut short
    with ResponseCache(path) as cache:
        assert cache.get_many(keys) == {k: answers[k] for k in (keys[0], keys[2])}
        cache.put(keys[1], answers[keys[1]])  # fetched again, saved again
    with ResponseCache(path) as cache:
        assert cache.get_many(keys) == {k: answers[k] for k in keys[:3]}
        cache.clear()
        assert cache.get_many(keys) == {}
    assert vectors.stat().st_size == 0
    with ResponseCache(path) as cache:
        cache.put(keys[0], answers[keys[0]])
    vectors.unlink()  # a lost vectors file: every vector is a miss, none an error
    with ResponseCache(path) as cache:
        assert cache.get_many(keys) == {}


def test_a_killed_writers_vectors_are_found_by_the_next_cache_opened(tmp_path: Path) -> None:
    """Spans committed but never merged (kill -9 before close) are indexed on open."""
    from nbtoolkit.core.store._cache import CachedAnswer, ResponseCache

    path = tmp_path / "c.sqlite3"
    answers = {bytes([i]) * 32: CachedAnswer(bytes([i]) * 64, i, None, None) for i in range(5)}
    script = textwrap.dedent(
        f"""
        import os
        from nbtoolkit.core.store._cache import CachedAnswer, ResponseCache
        cache = ResponseCache({str(path)!r})
        for i in range(5):
            cache.put(bytes([i]) * 32, CachedAnswer(bytes([i]) * 64, i, None, None))
            cache.commit()
        os._exit(0)  # no close, no merge
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert _counts(path, "vector_keys", "vector_spans") == (0, 5)
    with ResponseCache(path) as cache:
        assert cache.get_many(list(answers)) == answers
    assert _counts(path, "vector_keys", "vector_spans") == (5, 0)


def test_a_failed_request_fails_its_duplicates_too(server: ChatServer) -> None:
    """Rows sharing a failed request share its reason, not a silent None."""
    server.script(Status(400, message="nope"), prompt="same")
    out = pd.DataFrame({"review": ["same"] * 3}).chat.complete("review", **settings(server))
    assert out["response"].isna().all()
    assert set(report().rows["error_kind"]) == {"BadRequestError"}


CHILD = """
import os, sys
import pandas as pd
import nbtoolkit
rows = int(sys.argv[1]); prefix = sys.argv[2]
df = pd.DataFrame({"review": [f"{prefix} {i}" for i in range(rows)]})
out = df.chat.complete("review", model="test-model", base_url=os.environ["URL"],
                       max_parallel=int(os.environ.get("PAR", "1")), progress=False)
print("filled", int(out["response"].notna().sum()), flush=True)
"""


def child(server: ChatServer, rows: int, prefix: str, parallel: int) -> subprocess.Popen[str]:
    env = {**os.environ, "URL": server.base_url, "PAR": str(parallel)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(rows), prefix],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_resume_after_kill_9_pays_for_nothing_twice() -> None:
    """A run killed with SIGKILL midway, run again, sends only the rows with no saved answer."""
    with ChatServer(latency=0.01).run_in_thread() as server:
        # Row 20 stalls on the server: rows 0-19 are answered, then the run waits there.
        server.script(Stall(60), prompt="row 20")
        process = child(server, 60, "row", parallel=1)
        deadline = time.monotonic() + 60  # the child imports pandas first: slow on a busy box
        # Kill only once all 20 answers are durable in the file, whatever the commit timer,
        # and row 20 is on the server (the child may save row 19 before or after sending it):
        # the test then pins exactly "a killed run loses nothing it had saved".
        while (_saved_answers() < 20 or server.in_flight < 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.in_flight == 1
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        paid_before = sum(server.answered.values())
        assert paid_before == 20

        out = frame(60).chat.complete(
            "review", model=MODEL, base_url=server.base_url, progress=False
        )
    assert out["response"].tolist() == [f"echo: row {i}" for i in range(60)]
    assert max(server.answered.values()) == 1  # no prompt answered twice
    assert len(server.answered) == 60
    assert report().stats.cache_hits == paid_before


def _saved_answers() -> int:
    """Answers committed to the cache file so far, as another process sees them."""
    if not cache_file().exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(cache_file(), timeout=1.0)) as db:
            (count,) = db.execute(
                "SELECT (SELECT count(*) FROM responses) + (SELECT count(*) FROM journal)"
            ).fetchone()
    except sqlite3.OperationalError:  # the child is still creating the tables
        return 0
    return int(count)


def test_two_processes_share_one_cache() -> None:
    """Two runs writing the same cache at once both finish, and the file stays sound."""
    with ChatServer(latency=0.002).run_in_thread() as server:
        runs = [child(server, 400, prefix, parallel=16) for prefix in ("a", "b")]
        # A hang guard, not a speed check: a run stuck on the other's lock fails here.
        outputs = [run.communicate(timeout=60) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr
        assert "filled 400" in stdout
        assert "locked" not in stderr
    with sqlite3.connect(cache_file()) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM responses").fetchone() == (800,)


def test_max_tokens_total_stops_sending(server: ChatServer) -> None:
    """Once the token budget would be passed, no more requests; the rest say over_budget."""
    out = frame(40).chat.complete(
        "review", max_tokens=10, max_tokens_total=100, **settings(server, max_parallel=2)
    )
    rows = report().rows
    sent = server.request_count
    assert 0 < sent < 40
    assert (rows["status"] == "over_budget").sum() == 40 - sent
    assert out["response"].notna().sum() == sent
    stats = report().stats
    assert stats.prompt_tokens + stats.completion_tokens <= 100
    assert (
        "max_tokens_total=100 reached"
        in rows.loc[rows["status"] == "over_budget", "message"].iloc[0]
    )


def test_max_cost_with_a_price_table(server: ChatServer) -> None:
    """Prices turn tokens into money; max_cost stops sending before it is passed."""
    prices = {MODEL: (1_000.0, 2_000.0)}  # per million tokens: 0.001 / 0.002 per token
    with pytest.warns(RuntimeWarning, match="over max_cost"):  # said early, once
        frame(30).chat.complete(
            "review", prices=prices, max_cost=0.2, max_tokens=10, **settings(server, max_parallel=1)
        )
    stats = report().stats
    assert stats.cost is not None
    assert 0 < stats.cost <= 0.2
    assert stats.cost == pytest.approx(
        (stats.prompt_tokens * 1_000 + stats.completion_tokens * 2_000) / 1e6
    )
    assert "cost" in report().summary()
    assert 0 < server.request_count < 30


def test_max_cost_needs_a_price(server: ChatServer) -> None:
    """max_cost without a price for the model is a ConfigError naming what to pass."""
    with pytest.raises(nbtoolkit.ConfigError, match="max_cost needs a price"):
        frame(2).chat.complete("review", max_cost=1.0, **settings(server))
    assert server.request_count == 0


def test_usage_per_row_and_in_the_summary(server: ChatServer) -> None:
    """Token usage is kept per row and summed in the run summary; cache hits cost nothing."""
    server.script(Reply(text="a longer answer than usual"), prompt="row 0")
    frame(4).chat.complete("review", **settings(server))
    usage = report().usage
    assert usage["prompt_tokens"].notna().all()
    assert int(usage["completion_tokens"].sum()) == report().stats.completion_tokens
    assert "4 requests" in report().summary()
    frame(4).chat.complete("review", **settings(server))
    assert report().stats.prompt_tokens == 0  # nothing billed on a cached re-run
    assert "4 cache hits" in report().summary()


def test_an_unusable_cache_location_does_not_stop_the_work(server: ChatServer) -> None:
    """A cache path that cannot be created warns and runs without a cache."""
    with pytest.warns(RuntimeWarning, match="running without it"):
        out = frame(3).chat.complete(
            "review", cache="/proc/no/such/dir/c.sqlite3", **settings(server)
        )
    assert out["response"].notna().all()


def test_keys_follow_the_canonical_body_and_the_host() -> None:
    """Key order in the body does not matter; the host does; so does a loopback port (two
    local servers may serve different models under one name)."""
    from nbtoolkit.core.store._cache import RequestKeys, encode_body

    url = "https://api.example.com/v1/chat/completions"
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "héllo"}]}
    shuffled = {"messages": body["messages"], "temperature": 0, "model": "m"}
    assert encode_body(body) == encode_body(shuffled)
    keys = RequestKeys(url)
    assert keys.key(encode_body(body)) == keys.key(encode_body(shuffled))
    assert keys.key(encode_body({**body, "seed": 3})) != keys.key(encode_body(body))
    other = RequestKeys("https://other.example.com/v1/chat/completions")
    assert other.key(encode_body(body)) != keys.key(encode_body(body))
    local = "http://127.0.0.1:{}/v1/chat/completions"
    assert RequestKeys(local.format(8000)).key(b"{}") != RequestKeys(local.format(9000)).key(b"{}")


def test_the_body_is_encoded_as_canonical_json() -> None:
    """The bytes sent and hashed are json.dumps with sorted keys and no spaces, exactly."""
    import json

    from nbtoolkit.core.store._cache import encode_body

    body = {
        "model": "m",
        "messages": ({"role": "user", "content": 'héllo \u2028 "quoted"\n'},),
        "temperature": 0.7,
        "response_format": {"type": "json_schema", "schema": {"b": [1, 2.5, None], "a": {}}},
    }
    expected = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert encode_body(body) == expected.encode()
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode_body({"model": object()})


def test_chat_payloads_are_encode_bodys_bytes() -> None:
    """A chat row's payload, encoded without the general encoder for speed, is exactly
    encode_body of its body, for any base, text and message shape, so caches stay valid."""
    from nbtoolkit.core._rows import ChatRequest
    from nbtoolkit.core.endpoints._base import ChatEndpoint
    from nbtoolkit.core.store._cache import encode_body

    bases = (
        {"model": "m"},
        {"model": 'é "q"', "temperature": 0.5, "logprobs": True, "max_tokens": 9},
        {"model": "m", "messages": [{"role": "user", "content": "overridden"}], "a": [1, None]},
        {"model": "\u0000nbtoolkit messages\u0000", "zeta": {"b": 1, "a": 2.5}},
    )
    texts = ("hi", 'é "q" \\ \n\t\x01 \u2028 😀', "", "{}")
    shapes = (
        lambda t: ({"role": "user", "content": t},),
        lambda t: ({"role": "system", "content": "be brief"}, {"content": t, "role": "user"}),
        lambda t: ({"role": "user", "content": [{"type": "text", "text": t}]},),
        lambda t: ({"role": "user", "content": t, "name": "x"},),
        lambda t: ({"role": "assistant", "content": None}, {"role": "user", "content": t}),
    )
    for base in bases:
        endpoint = ChatEndpoint(base)
        for text in texts:
            for shape in shapes:
                for params in ({}, {"seed": 3, "max_tokens": 5}):
                    item = endpoint.item(0, ChatRequest(shape(text), params))
                    body = {**base, **params, "messages": list(shape(text))}
                    assert item.body == body
                    assert item.payload == encode_body(body)
                    assert item.completion_tokens == float(body.get("max_tokens") or 256)
                    assert item.capped == ("max_tokens" in body)


def test_a_registered_local_server_on_a_new_port_still_hits_the_cache() -> None:
    """A local server that says what it serves is keyed on that: a restart on a new port
    finds its answers and sends nothing."""
    from nbtoolkit.core.store._cache import register_local_server

    with ChatServer().run_in_thread() as first:
        first_url = first.base_url
        register_local_server(first.port, "model.gguf:100")
        try:
            frame(3).chat.complete("review", model=MODEL, base_url=first_url, progress=False)
        finally:
            register_local_server(first.port, None)
    with ChatServer().run_in_thread() as second:
        assert second.base_url != first_url
        register_local_server(second.port, "model.gguf:100")
        try:
            out = frame(3).chat.complete(
                "review", model=MODEL, base_url=second.base_url, progress=False
            )
        finally:
            register_local_server(second.port, None)
        assert second.request_count == 0
    assert out["response"].notna().all()


def test_two_loopback_servers_on_different_ports_do_not_share_answers() -> None:
    """Two servers on 127.0.0.1 under one model name (llama.cpp on one port, vLLM on another)
    each answer their own rows: the port is in the key of a server that did not say what it
    serves."""
    with ChatServer().run_in_thread() as first, ChatServer().run_in_thread() as second:
        frame(3).chat.complete("review", model=MODEL, base_url=first.base_url, progress=False)
        frame(3).chat.complete("review", model=MODEL, base_url=second.base_url, progress=False)
        assert first.request_count == 3
        assert second.request_count == 3
        frame(3).chat.complete("review", model=MODEL, base_url=first.base_url, progress=False)
        assert first.request_count == 3  # its own answers come back from the cache


def test_two_local_servers_with_different_model_files_do_not_share_answers() -> None:
    """A registered local server is keyed on its model file, not its port; others on the port."""
    from nbtoolkit.core.store._cache import RequestKeys, register_local_server

    body = b'{"model":"local","messages":[]}'
    try:
        register_local_server(8001, "gemma-a.gguf:100")
        register_local_server(8002, "gemma-b.gguf:200")
        register_local_server(8003, "gemma-a.gguf:100")
        a, b, same_file = (
            RequestKeys(f"http://127.0.0.1:{port}/v1/chat/completions").key(body)
            for port in (8001, 8002, 8003)
        )
    finally:
        for port in (8001, 8002, 8003):
            register_local_server(port, None)
    assert a != b
    assert a == same_file  # a restart on a new port finds its answers again
    unknown = RequestKeys("http://127.0.0.1:8004/v1/chat/completions").key(body)
    assert RequestKeys("http://localhost:8005/v1/chat/completions").key(body) != unknown
    assert RequestKeys("http://127.0.0.1:8004/v1/chat/completions").key(body) == unknown


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "localhost", "[::1]", "0.0.0.0"])
def test_one_idea_of_loopback_for_the_proxy_and_the_cache(host: str) -> None:
    """Every spelling of this machine skips the proxy and finds a registered local server's
    answers; a remote host does neither."""
    from nbtoolkit.core.store._cache import RequestKeys, register_local_server

    body = b'{"model":"local","messages":[]}'
    try:
        register_local_server(8011, "gemma.gguf:100")
        reference = RequestKeys("http://127.0.0.1:8011/v1/chat/completions").key(body)
        url = f"http://{host}:8011/v1"
        assert RequestKeys(f"{url}/chat/completions").key(body) == reference
        assert not nbtoolkit.ChatConfig(base_url=url).use_proxy_env
        remote = "http://api.example.test:8011/v1"
        assert RequestKeys(f"{remote}/chat/completions").key(body) != reference
        assert nbtoolkit.ChatConfig(base_url=remote).use_proxy_env
    finally:
        register_local_server(8011, None)


def test_a_local_servers_identity_holds_every_setting_that_changes_answers(
    tmp_path: Path,
) -> None:
    """LocalServer keys its answers on the model file and its chat format, n_ctx and mode:
    two servers of one file that differ in any of them do not share a cache scope."""
    from nbtoolkit.core.store._cache import RequestKeys, register_local_server
    from nbtoolkit.local import LocalServer

    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"GGUF" + bytes(96))
    servers = [
        LocalServer(),
        LocalServer(chat_template=True),
        LocalServer(n_ctx=4096),
        LocalServer(embedding=True),
    ]
    body = b'{"model":"local","messages":[]}'
    keys = []
    try:
        for port, server in enumerate(servers, start=8021):
            register_local_server(port, server._identity(model_file))
            keys.append(RequestKeys(f"http://127.0.0.1:{port}/v1/chat/completions").key(body))
        register_local_server(8031, LocalServer()._identity(model_file))
        again = RequestKeys("http://127.0.0.1:8031/v1/chat/completions").key(body)
    finally:
        for port in (*range(8021, 8025), 8031):
            register_local_server(port, None)
    assert len(set(keys)) == 4
    assert again == keys[0]  # the same file and settings on another port: the same answers


_HOLD_THE_WRITE_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


async def test_a_locked_cache_file_never_freezes_the_event_loop(tmp_path: Path) -> None:
    """Another process holds the write lock for 3 s during a run: the loop never stalls for
    1 s (it stalled 3 s while a commit waited on it), every row is right, and the answers
    are saved once the lock is free."""
    from nbtoolkit import ChatConfig, ChatRequest, ChatRun
    from nbtoolkit.core.store._cache import ResponseCache

    path = tmp_path / "responses.sqlite3"
    ResponseCache(path).close()  # the file and its tables, as a first run leaves them
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLD_THE_WRITE_LOCK, str(path), "3", stdout=asyncio.subprocess.PIPE
    )
    assert holder.stdout is not None
    assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"locked\n"
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            before = loop.time()
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - before - 0.01)

    ticking = asyncio.create_task(ticker())
    rows = [ChatRequest(({"role": "user", "content": f"row {i}"},)) for i in range(40)]
    async with ChatServer(latency=0.01) as server:
        config = ChatConfig(base_url=server.base_url, model="m", max_parallel=4, cache=path)
        results = await ChatRun(config).execute(rows)
    running = False
    await ticking
    assert await holder.wait() == 0
    assert [r.text for r in results] == [f"echo: row {i}" for i in range(40)]
    assert server.request_count == 40
    # The run ends only once its last commit is in, so it spanned the lock's 3 s; a
    # commit on the loop showed as one gap of most of that.
    assert max(gaps) < 1.0
    with ResponseCache(path) as cache:
        assert cache.info().entries == 40


def _open_files(path: Path) -> list[str]:
    """The descriptors this process holds on ``path`` or its -wal / -shm files."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(path)):
                names.append(target)
    return names


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="reads /proc/self/fd")
def test_a_cache_that_fails_to_open_closes_its_connection(tmp_path: Path) -> None:
    """A file that is not a database fails to open, and leaves no connection open, even
    while the error (and its traceback) is still held, as a notebook holds the last one."""
    from nbtoolkit.core.store._cache import ResponseCache

    path = tmp_path / "responses.sqlite3"
    path.write_bytes(b"this is not a database, " * 512)
    with pytest.raises(sqlite3.DatabaseError) as failed:
        ResponseCache(path)
    assert failed.value is not None
    assert _open_files(path) == []


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="reads /proc/self/fd")
def test_a_run_on_a_corrupt_cache_file_warns_and_runs_without_it(
    server: ChatServer, tmp_path: Path
) -> None:
    """A corrupt cache file: the run warns, answers every row, and holds no file open."""
    path = tmp_path / "responses.sqlite3"
    path.write_bytes(b"this is not a database, " * 512)
    with pytest.warns(RuntimeWarning, match="running without it"):
        out = frame(5).chat.complete("review", cache=str(path), **settings(server))
    assert out["response"].tolist() == [f"echo: row {i}" for i in range(5)]
    assert server.request_count == 5
    assert _open_files(path) == []
