"""A durable response cache that is also the run's checkpoint.

Each successful reply is committed to SQLite (WAL mode) as it arrives, so a run cut short
by Ctrl-C or the stop button loses nothing it paid for, and a dead kernel or ``kill -9`` at
most the answers of its last 20 ms (the engine's group commit): running the same call again
sends requests only for the rows that have no answer yet. Errors are never
cached, so a re-run also retries exactly the rows that failed.

The key is a SHA-256 of everything that changes the answer: the base URL and the whole
request body (model, messages, temperature, max_tokens, response_format / schema, every
other parameter). The API key is not part of it and is never stored.

Several processes may share one file: WAL lets readers and a writer work at once, and a
writer waits up to ``busy_timeout`` for another's commit instead of failing.

Answers are written twice, on purpose. Each commit appends its answers to ``journal``, a
table in arrival order: a commit there rewrites the last page or two. Inserting them
straight into ``responses``, ordered by a random hash, rewrote a whole 4 KB page per answer
in every commit, and cost the run more CPU than anything else the cache does. Every
``_MERGE_EVERY`` answers, at close, and when a cache is opened (the journal of a killed
run), the journal is moved into ``responses`` in key order, in one transaction.

Binary answers (float32 vectors, 1 KB and more each) live apart, written once. In
``responses`` a 1 KB row leaves room for three on a 4 KB page, spills into overflow pages,
and every move rewrites most of the table: 83 us per vector against 16 per chat answer.
Instead each commit appends them to ``blob_answers``, a rowid table, so only its last pages
are written; its small key -> id entries are what goes into ``blob_keys`` in key order,
journal-style: every ``_MERGE_EVERY`` answers, at close, and when a cache is opened. A
connection finds its own unmerged answers by id. New files get 16 KB pages (15 vectors of
256 dimensions a page); a file made with 4 KB pages keeps them, which only costs space.
Files written before ``blob_answers`` existed keep their vectors in ``responses``, where
lookups still find them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from nbtoolkit.config import default_cache_path

_COLUMNS = """
    key BLOB NOT NULL,             -- sha256 of base URL + canonical request body
    text TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cached_tokens INTEGER,
    model TEXT,                    -- for people reading the file, not part of the lookup
    created REAL NOT NULL
"""
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS responses ({_COLUMNS}, PRIMARY KEY (key)) WITHOUT ROWID",
    # Arrival order, no index: answers not yet moved into `responses`.
    f"CREATE TABLE IF NOT EXISTS journal ({_COLUMNS})",
    # Binary answers, appended in arrival order (the rowid); found through `blob_keys`.
    f"CREATE TABLE IF NOT EXISTS blob_answers (id INTEGER PRIMARY KEY, {_COLUMNS})",
    "CREATE TABLE IF NOT EXISTS blob_keys (key BLOB PRIMARY KEY, id INTEGER NOT NULL)"
    " WITHOUT ROWID",
    # One row: the highest `blob_answers` id already in `blob_keys` (above it: unmerged).
    "CREATE TABLE IF NOT EXISTS blob_merged (upto INTEGER NOT NULL)",
    "INSERT INTO blob_merged SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM blob_merged)",
)
# A new file's page size: a rowid page holds 15 vectors of 256 float32s, not 3. An existing
# file keeps the size it was made with (changing it takes a VACUUM).
_PAGE_SIZE = 16384
# Copy the WAL into the file (with an fsync) once it holds this many bytes, not every 4 MB:
# during a run, those fsyncs were most of what the cache cost.
_CHECKPOINT_BYTES = 40_000_000
_ANSWER = "key, text, prompt_tokens, completion_tokens, cached_tokens"
_BLOB_ANSWER = "a.key, a.text, a.prompt_tokens, a.completion_tokens, a.cached_tokens"
# Answers a connection journals before it moves them into `responses`. A larger batch
# touches each page of `responses` for more answers at once; the keys are held in memory
# until then (about 100 bytes each), and the move holds the write lock (and this run's
# event loop) for its duration: 14 ms into a 10,000-answer file, 120 ms into 1,000,000.
_MERGE_EVERY = 8192
# SQLite caps the number of ? in one statement (32,766 since 3.32; 999 before); a lookup
# may name each key twice, once per table.
_LOOKUP_CHUNK = 450


class CachedAnswer(NamedTuple):
    """One answer as the cache holds it (a tuple: one per row of a 100,000-row re-run)."""

    text: str | bytes  # text for chat; bytes for answers kept in binary (float32 vectors)
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """Where the cache is and how big it is."""

    path: Path
    entries: int
    bytes: int  # the database plus its WAL and shared-memory files

    def __str__(self) -> str:
        return f"{self.entries:,} responses, {self.bytes / 1e6:.1f} MB in {self.path}"


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# The C encoder JSONEncoder.encode builds on every call, built once: half the cost of
# encoding a body, which a fully cached 100,000-row re-run does for every row. The same
# arguments as encode() passes, so the same bytes; no cycle check (markers=None), so it is
# safe to share between threads.
_make_c_encoder: Callable[..., Callable[[Any, int], Iterable[str]]] | None = getattr(
    json.encoder, "c_make_encoder", None
)
_C_ENCODER = (
    None
    if _make_c_encoder is None
    else _make_c_encoder(
        None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", True, False, True
    )
)
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def encode_body(body: Mapping[str, Any]) -> bytes:
    """The request body as canonical JSON (sorted keys, no spaces): sent, and hashed."""
    if _C_ENCODER is None:
        return _ENCODER.encode(body).encode()
    return "".join(_C_ENCODER(body, 0)).encode()


def cache_scope(url: str) -> str:
    """The part of the URL that names the provider: the URL, without the port on loopback.

    A local server (llama.cpp, vLLM, `nbtoolkit.local`) gets a new free port each time it
    starts; keyed on the port, its answers could never be found again. On loopback the
    model name and the body identify the answer, and, for a server that said which model
    file it serves (`nbtoolkit.local` does), that file: two servers with different files
    under one model alias never share answers.
    """
    parts = urlsplit(url)
    if parts.hostname in _LOOPBACK:
        identity = _local_identities.get(parts.port or 0)
        scope = f"{parts.scheme}://localhost{parts.path}"
        return scope if identity is None else f"{scope}#{identity}"
    return url


# Port -> what a local server on this machine serves (its model file), while it runs.
_local_identities: dict[int, str] = {}


def register_local_server(port: int, identity: str | None) -> None:
    """Say what the local server on ``port`` serves (None: it stopped), for cache keys."""
    if identity is None:
        _local_identities.pop(port, None)
    else:
        _local_identities[port] = identity


class RequestKeys:
    """Cache keys for one endpoint: SHA-256 of the URL's scope and the canonical body.

    The body is hashed exactly as it is sent (`encode_body`), so a run serializes each
    request once, for the wire and for its key.
    """

    def __init__(self, url: str) -> None:
        self._prefix = hashlib.sha256(cache_scope(url).encode() + b"\n")

    def key(self, payload: bytes) -> bytes:
        digest = self._prefix.copy()
        digest.update(payload)
        return digest.digest()


class ResponseCache:
    """One SQLite file of answers. Open one per run; it is not shared across threads."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _create_private(self.path)
        # isolation_level=None: we say when a transaction begins and ends (see put/commit).
        self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        # Answers put() but not yet committed, by key (so a lookup sees them too): text
        # answers, and binary ones.
        self._unwritten: dict[bytes, tuple[Any, ...]] = {}
        self._unwritten_blobs: dict[bytes, tuple[Any, ...]] = {}
        # Keys this connection journaled since its last merge: only a lookup of one of these
        # needs to read the journal, which has no index.
        self._journaled: set[bytes] = set()
        # Binary answers this connection appended since its last merge: key -> their id.
        self._appended: dict[bytes, int] = {}
        # Whether the file may hold binary answers, as of `PRAGMA data_version` (which
        # moves when another connection commits): a chat run never pays a second look-up
        # for its misses in a file with no vectors.
        self._has_blobs = True
        self._version_seen: int | None = None
        # Before the file has a header (a new, empty file): WAL mode would fix the size.
        self._db.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        _retry_while_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        # NORMAL under WAL: a commit survives a killed process; only power loss can undo
        # the last few, and it never corrupts the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
        self._db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_BYTES // page_size}")
        for statement in _SCHEMA:
            _retry_while_locked(functools.partial(self._db.execute, statement))
        if self._db.execute(
            "SELECT EXISTS (SELECT 1 FROM journal) OR EXISTS (SELECT 1 FROM blob_answers"
            " WHERE id > (SELECT upto FROM blob_merged))"
        ).fetchone() != (0,):
            self.merge()  # a run that was killed, or one still going: either way, safe to move

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, CachedAnswer]:
        """The cached answers among ``keys`` (missing keys are simply absent)."""
        found: dict[bytes, CachedAnswer] = {}
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            sql = f"SELECT {_ANSWER} FROM responses WHERE key IN ({_marks(chunk)})"
            journaled = [key for key in chunk if key in self._journaled]
            if journaled:
                # One statement, one snapshot: an answer another process moves from the
                # journal into `responses` meanwhile is still found in one or the other.
                sql += " UNION ALL"
                sql += f" SELECT {_ANSWER} FROM journal WHERE key IN ({_marks(journaled)})"
                chunk = [*chunk, *journaled]
            for key, *answer in self._db.execute(sql, chunk).fetchall():
                found[key] = CachedAnswer(*answer)
            self._get_blobs([key for key in chunk if key not in found], found)
        for key in keys:
            if (row := self._unwritten.get(key) or self._unwritten_blobs.get(key)) is not None:
                found[key] = CachedAnswer(*row[1:5])
        return found

    def _get_blobs(self, keys: Sequence[bytes], found: dict[bytes, CachedAnswer]) -> None:
        """Add the binary answers among ``keys`` to ``found``.

        A second statement, for the keys the first did not find: a key is either text or
        binary, and each kind is read in one statement, one snapshot. Merged answers are
        found through `blob_keys`, this connection's unmerged ones by id; in one statement,
        so an answer another process merges (or replaces with a newer copy) meanwhile is
        still found.
        """
        if not keys or not self._may_have_blobs():
            return
        sql = (
            f"SELECT {_BLOB_ANSWER} FROM blob_keys k JOIN blob_answers a ON a.id = k.id"
            f" WHERE k.key IN ({_marks(keys)})"
        )
        ids = [self._appended[key] for key in keys if key in self._appended]
        if ids:
            sql += f" UNION ALL SELECT {_BLOB_ANSWER} FROM blob_answers a"
            sql += f" WHERE a.id IN ({_marks(ids)})"
        # An id may name another answer once another process has cleared the file: each
        # row says its own key, and only the keys asked for count.
        wanted = set(keys) if ids else None
        for key, *answer in self._db.execute(sql, [*keys, *ids]).fetchall():
            if wanted is None or key in wanted:
                found[key] = CachedAnswer(*answer)

    def _may_have_blobs(self) -> bool:
        if self._appended:
            return True
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        if version != self._version_seen:  # first call, or another connection committed
            self._version_seen = version
            (exists,) = self._db.execute("SELECT EXISTS (SELECT 1 FROM blob_answers)").fetchone()
            self._has_blobs = bool(exists)
        return self._has_blobs

    def put(self, key: bytes, answer: CachedAnswer, *, model: str | None = None) -> None:
        """Hold one answer for the next `commit`, which writes and makes it durable.

        The engine commits at the end of the event-loop turn the answer arrived in, or
        within 20 ms when replies pour in, so a burst of replies shares one transaction
        (writing them one by one cost more CPU than the requests themselves against a fast
        server).
        """
        row = (key, *answer, model, time.time())
        if isinstance(answer.text, bytes):
            self._unwritten_blobs[key] = row
        else:
            self._unwritten[key] = row

    def commit(self) -> None:
        """Make every answer held since the last commit durable, in one transaction."""
        if not self._unwritten and not self._unwritten_blobs:
            return
        rows = list(self._unwritten.values())
        blobs = list(self._unwritten_blobs.values())
        with self._write():
            if rows:
                self._db.executemany("INSERT INTO journal VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            if blobs:
                # Ids chosen here, under the write lock, so this connection knows them; above
                # the mark too, so that an id is never reused, even after a clear.
                (last,) = self._db.execute(
                    "SELECT max(coalesce((SELECT max(id) FROM blob_answers), 0),"
                    " (SELECT upto FROM blob_merged))"
                ).fetchone()
                first = last + 1
                self._db.executemany(
                    "INSERT INTO blob_answers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(first + n, *row) for n, row in enumerate(blobs)],
                )
        self._journaled.update(self._unwritten)
        self._unwritten.clear()
        if blobs:
            self._has_blobs = True  # our own commits leave data_version where it was
            self._appended.update((row[0], first + n) for n, row in enumerate(blobs))
            self._unwritten_blobs.clear()
        if len(self._journaled) + len(self._appended) >= _MERGE_EVERY:
            self.merge()

    def merge(self) -> None:
        """Move the whole journal, every process's, into `responses`, in key order.

        In key order, each page of `responses` is rewritten once for all the answers that
        land on it. One transaction: another process sees each answer in one table or the
        other, never in neither.
        """
        with self._write():
            self._db.execute("INSERT OR REPLACE INTO responses SELECT * FROM journal ORDER BY key")
            self._db.execute("DELETE FROM journal")
            self._merge_blobs()
        self._journaled.clear()
        self._appended.clear()

    def _merge_blobs(self) -> None:
        """Index the unmerged binary answers (every process's) in `blob_keys`, in key order.

        Only the small key -> id entries move; the answers stay where they were appended.
        A key written twice (two processes embedding one text at once) keeps its newest
        answer; the older copy is deleted, so every row of `blob_answers` is one answer.
        """
        ((upto,),) = self._db.execute("SELECT upto FROM blob_merged")
        # Two look-ups of the rowid b-tree: counting the tail instead reads all its pages.
        ((low, last),) = self._db.execute(
            "SELECT (SELECT min(id) FROM blob_answers WHERE id > ?1),"
            " (SELECT max(id) FROM blob_answers WHERE id > ?1)",
            (upto,),
        )
        if last is None:
            return
        newest = {key: row_id for key, row_id in self._appended.items() if row_id > upto}
        stale: list[int] = []
        ids = newest.values()
        # Ids are never reused. When this connection's ids above the mark are one unbroken
        # run from the tail's first to its last, the tail is exactly these answers, and
        # their keys are in memory: reading them back from 1 KB rows cost more than the
        # rest of the move. Otherwise (another process's answers in between), read it.
        if not (newest and low == min(ids) and last == max(ids) == low + len(newest) - 1):
            newest = {}
            tail = self._db.execute("SELECT id, key FROM blob_answers WHERE id > ?", (upto,))
            for row_id, key in sorted(tail.fetchall()):  # in id order: the last one wins
                if (older := newest.get(key)) is not None:
                    stale.append(older)
                newest[key] = row_id
        entries = sorted(newest.items())
        added = self._db.executemany("INSERT OR IGNORE INTO blob_keys VALUES (?, ?)", entries)
        if added.rowcount < len(entries):  # rare: a key that already had an answer
            for start in range(0, len(entries), _LOOKUP_CHUNK):
                chunk = [key for key, _ in entries[start : start + _LOOKUP_CHUNK]]
                sql = f"SELECT key, id FROM blob_keys WHERE key IN ({_marks(chunk)})"
                for key, row_id in self._db.execute(sql, chunk).fetchall():
                    if row_id != newest[key]:
                        stale.append(row_id)
                        self._db.execute(
                            "UPDATE blob_keys SET id = ? WHERE key = ?", (newest[key], key)
                        )
        self._db.executemany("DELETE FROM blob_answers WHERE id = ?", [(i,) for i in stale])
        self._db.execute("UPDATE blob_merged SET upto = ?", (last,))

    def _write(self) -> contextlib.AbstractContextManager[None]:
        return write_transaction(self._db)

    def info(self) -> CacheInfo:
        (entries,) = self._db.execute(
            "SELECT (SELECT count(*) FROM responses) + (SELECT count(*) FROM journal)"
            " + (SELECT count(*) FROM blob_answers)"
        ).fetchone()
        return CacheInfo(self.path, entries, _size_on_disk(self.path))

    def clear(self) -> None:
        with self._write():
            # The mark moves past every id given out, so that none is given out again.
            self._db.execute(
                "UPDATE blob_merged SET upto = max(upto,"
                " coalesce((SELECT max(id) FROM blob_answers), 0))"
            )
            for table in ("responses", "journal", "blob_answers", "blob_keys"):
                self._db.execute(f"DELETE FROM {table}")
        self._journaled.clear()
        self._appended.clear()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.execute("VACUUM")

    def close(self) -> None:
        try:
            self.commit()
            if self._journaled or self._appended:
                self.merge()
        finally:
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction holding the write lock (waiting up to busy_timeout for it)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


def _retry_while_locked(statement: Callable[[], object], *, seconds: float = 5.0) -> None:
    """Run a statement that SQLite may refuse at once while another process sets the file up.

    Switching to WAL, or creating the table, while a second process does the same can fail
    with "database is locked" without waiting for busy_timeout.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            statement()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _create_private(path: Path) -> None:
    """Create the file readable by its owner only, before SQLite creates it world-readable."""
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def _size_on_disk(path: Path) -> int:
    names: Iterable[Path] = (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
    return sum(p.stat().st_size for p in names if p.exists())


def cache_info(path: str | os.PathLike[str] | None = None) -> CacheInfo:
    """Where the response cache lives and how much it holds.

    Example:
        >>> print(nbtoolkit.cache_info())  # doctest: +SKIP
        12,345 responses, 8.1 MB in /home/me/.cache/nbtoolkit/responses.sqlite3
    """
    with ResponseCache(path) as cache:
        return cache.info()


def clear_cache(path: str | os.PathLike[str] | None = None) -> CacheInfo:
    """Delete every cached response (the next run pays for every row again)."""
    with ResponseCache(path) as cache:
        cache.clear()
        return cache.info()
