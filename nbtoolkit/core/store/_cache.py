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

Binary answers (float32 vectors, 1 KB and more each) are not rows of their own: they
are appended to a file beside the database, see `nbtoolkit.core.store._vectors`.

Longer than ~400 lines: the SQLite schema, its key function's inputs, its locking and its
recovery from damaged files must change together.
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

from nbtoolkit.config import default_cache_path, is_loopback
from nbtoolkit.core.store import _vectors as vector_store
from nbtoolkit.core.store._vectors import VectorStore, vectors_path

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
    *vector_store.SCHEMA,
)
# Copy the WAL into the file (with an fsync) once it holds this many bytes, not every 4 MB:
# during a run, those fsyncs were most of what the cache cost.
_CHECKPOINT_BYTES = 40_000_000
_ANSWER = "key, text, prompt_tokens, completion_tokens, cached_tokens"
# Answers a connection journals before it moves them into `responses`. A larger batch
# touches each page of `responses` for more answers at once; the keys are held in memory
# until then (about 100 bytes each), and the move holds the write lock (and this run's
# event loop) for its duration: 14 ms into a 10,000-answer file, 120 ms into 1,000,000.
_MERGE_EVERY = 8192
# SQLite caps the number of ? in one statement (32,766 since 3.32; 999 before); a lookup
# may name each key twice, once per table.
_LOOKUP_CHUNK = 450
# Answers per INSERT statement. One statement of many rows, not executemany: the sqlite3
# module lets go of the GIL around each statement step, and on the cache's thread each step
# then has to take it back from the event loop's thread; a commit of 100 answers made 100
# such hand-overs (the thread's CPU during a 5,000-row run: 17-26 us per row with them,
# 12-17 without). 128 x 7 values is well under SQLite's 32,766 bound variables.
_ROWS_PER_INSERT = 128
# The most of the file read through a memory map; pages past it are read as usual.
_MMAP_BYTES = 256 * 1024 * 1024


# What a cache read or write may raise: SQLite's errors, and the vectors file's (a full disk).
CACHE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, OSError)


# An answer as `ResponseCache.put_many` takes it: key, text (or bytes), prompt, completion
# and cached tokens.
AnswerRow = tuple[bytes, str | bytes, int | None, int | None, int | None]


_new_tuple = tuple.__new__


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


def encode_body(body: Mapping[str, Any]) -> bytes:
    """The request body as canonical JSON (sorted keys, no spaces): sent, and hashed."""
    return _encode_text(body).encode()


def _encode_text(value: Any) -> str:
    if _C_ENCODER is None:
        return _ENCODER.encode(value)
    return "".join(_C_ENCODER(value, 0))


_string = json.encoder.encode_basestring  # what _ENCODER uses for str (ensure_ascii=False)
_MARK = "\x00nbtoolkit messages\x00"  # stands for the messages while the base is encoded
# A message's encoded ending for the usual roles, worked out once.
_ROLE_ENDS = {
    role: ',"role":' + _string(role) + "}"
    for role in ("system", "developer", "user", "assistant", "tool")
}


class MessagesBody:
    """`encode_body` of ``{**base, "messages": messages}``, for many rows that share ``base``.

    The same bytes, at a third of the cost: the base is encoded once, and each row only its
    messages, the usual ``{"role": ..., "content": "..."}`` without the general encoder. A
    fully cached re-run encodes every row (its key is the hash of the body), so this is a
    large share of its CPU.
    """

    def __init__(self, base: Mapping[str, Any]) -> None:
        self._base = base
        self._head: str | None = None
        self._tail = ""
        try:
            text = _encode_text({**base, "messages": _MARK})
        except (TypeError, ValueError):
            return  # encode() raises it for each row, as encode_body would
        mark = _string(_MARK)
        if text.count(mark) == 1:
            self._head, _, self._tail = text.partition(mark)

    def encode(self, messages: list[Any]) -> bytes:
        """``encode_body({**base, "messages": messages})``."""
        if self._head is None:
            return encode_body({**self._base, "messages": messages})
        parts: list[str] = []
        for message in messages:
            if type(message) is dict and len(message) == 2:
                content, role = message.get("content"), message.get("role")
                if type(content) is str and type(role) is str:
                    end = _ROLE_ENDS.get(role) or ',"role":' + _string(role) + "}"
                    parts.append('{"content":' + _string(content) + end)
                    continue
            parts.append(_encode_text(message))
        return f"{self._head}[{','.join(parts)}]{self._tail}".encode()


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_journal(rows: int) -> str:
    return "INSERT INTO journal VALUES " + ",".join(("(?, ?, ?, ?, ?, ?, ?)",) * rows)


def cache_scope(url: str) -> str:
    """The part of the URL that names the provider: the URL, or for a local server that said
    what it serves, that instead of its port.

    `nbtoolkit.local` gets a new free port each time it starts; keyed on the port, its
    answers could never be found again. So a loopback server that registered what it serves
    (its model file and the settings that change answers) is keyed on that, not the port:
    a restart finds its answers, and two servers with different files or settings under one
    model alias never share them. Any other loopback server (llama.cpp, vLLM, Ollama, started
    by hand on their usual fixed ports) keeps its port in the key: two of them on different
    ports may serve different models under one name.
    """
    parts = urlsplit(url)
    if is_loopback(parts.hostname):
        identity = _local_identities.get(parts.port or 0)
        if identity is not None:
            return f"{parts.scheme}://localhost{parts.path}#{identity}"
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
    """One SQLite file of answers. Open one per run; use it on one thread (the engine keeps
    it on a thread of its own, see `nbtoolkit.core._cachewriter`)."""

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
        self._vectors = VectorStore(self._db, self.path)
        try:
            self._set_up()
        except BaseException:
            # Half open (a file that is not a database, a lock held past the wait): close
            # here, or the connection stays open as long as the traceback that holds us.
            self._db.close()
            self._vectors.close()
            raise

    def _set_up(self) -> None:
        """WAL, the pragmas, the tables, and a killed run's journal merged."""
        _retry_while_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        # NORMAL under WAL: a commit survives a killed process; only power loss can undo
        # the last few, and it never corrupts the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        # Pages read through a memory map, not copied by a read() each: a third less CPU in
        # the look-ups of a fully cached re-run, which touch pages all over the file.
        self._db.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
        (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
        self._db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_BYTES // page_size}")
        for statement in _SCHEMA:
            _retry_while_locked(functools.partial(self._db.execute, statement))
        journal = self._db.execute("SELECT EXISTS (SELECT 1 FROM journal)").fetchone()
        if journal != (0,) or self._vectors.pending():
            self.merge()  # a run that was killed, or one still going: either way, safe to move

    def get_many(
        self, keys: Sequence[bytes], *, binary: bool | None = None
    ) -> dict[bytes, CachedAnswer]:
        """The cached answers among ``keys`` (missing keys are simply absent).

        Args:
            keys: the answers' keys.
            binary: True when every key's answer would be bytes (vectors), False when text:
                the other kind's look-up is skipped. None looks in both.
        """
        found: dict[bytes, CachedAnswer] = {}
        for start in range(0, len(keys) if binary is not True else 0, _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            # A join on the keys as a VALUES list, not ``key IN (...)``: one seek per key,
            # without first building a temporary index of the list (a third less CPU).
            values = ",".join(("(?)",) * len(chunk))
            sql = (
                f"SELECT {_ANSWER} FROM (VALUES {values}) AS asked"
                " CROSS JOIN responses ON responses.key = asked.column1"
            )
            journaled = [key for key in chunk if key in self._journaled]
            if journaled:
                # One statement, one snapshot: an answer another process moves from the
                # journal into `responses` meanwhile is still found in one or the other.
                sql += " UNION ALL"
                sql += f" SELECT {_ANSWER} FROM journal WHERE key IN ({_marks(journaled)})"
                chunk = [*chunk, *journaled]
            # tuple.__new__, not CachedAnswer(...): a NamedTuple's own __new__ is a Python
            # function, called once per row of a 100,000-row re-run.
            rows = self._db.execute(sql, chunk).fetchall()
            found.update({row[0]: _new_tuple(CachedAnswer, row[1:]) for row in rows})
        if binary is not False:
            # A key is either text or binary: the vectors are looked up for the keys left.
            self._vectors.get([key for key in keys if key not in found], found, CachedAnswer)
        if self._unwritten or self._unwritten_blobs:
            for key in keys:
                row = self._unwritten.get(key) or self._unwritten_blobs.get(key)
                if row is not None:
                    found[key] = CachedAnswer(*row[1:5])
        return found

    def completion_samples(self, model: str, *, limit: int = 2000) -> list[int]:
        """Completion tokens of the newest text answers bought from ``model`` (a cost
        estimate learns answer lengths from them); newest first, at most ``limit``."""
        sql = (
            "SELECT completion_tokens, created FROM responses WHERE model = ? AND "
            "completion_tokens IS NOT NULL UNION ALL SELECT completion_tokens, created FROM "
            "journal WHERE model = ? AND completion_tokens IS NOT NULL "
            "ORDER BY created DESC LIMIT ?"
        )
        return [int(n) for n, _ in self._db.execute(sql, (model, model, limit)).fetchall()]

    def put(self, key: bytes, answer: CachedAnswer, *, model: str | None = None) -> None:
        """Hold one answer for the next `commit`, which writes and makes it durable.

        The engine commits at the end of the event-loop turn the answer arrived in, or
        within 20 ms when replies pour in, so a burst of replies shares one transaction
        (writing them one by one cost more CPU than the requests themselves against a fast
        server).
        """
        self.put_many([(key, *answer)], model=model)

    def put_many(self, rows: Iterable[AnswerRow], *, model: str | None = None) -> None:
        """`put` for many answers at once: (key, text or bytes, prompt, completion and
        cached tokens) each."""
        now = time.time()
        for row in rows:
            if isinstance(row[1], bytes):
                self._unwritten_blobs[row[0]] = row  # the vectors file keeps no model or time
            else:
                self._unwritten[row[0]] = (*row, model, now)

    def commit(self) -> None:
        """Make every answer held since the last commit durable, in one transaction."""
        if not self._unwritten and not self._unwritten_blobs:
            return
        rows = list(self._unwritten.values())
        blobs = list(self._unwritten_blobs.values())
        with self._write():
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start : start + _ROWS_PER_INSERT]
                self._db.execute(_insert_journal(len(chunk)), [v for row in chunk for v in row])
            if blobs:
                self._vectors.append(blobs)
        self._journaled.update(self._unwritten)
        self._unwritten.clear()
        if blobs:
            self._vectors.committed()
            self._unwritten_blobs.clear()
        if (
            len(self._journaled) >= _MERGE_EVERY
            or self._vectors.unmerged >= vector_store.MERGE_EVERY
        ):
            self.merge()

    def merge(self) -> None:
        """Move the whole journal, every process's, into `responses`, in key order, and
        index every process's unmerged vectors.

        In key order, each page of `responses` is rewritten once for all the answers that
        land on it. One transaction: another process sees each answer in one table or the
        other, never in neither.
        """
        with self._write():
            self._db.execute("INSERT OR REPLACE INTO responses SELECT * FROM journal ORDER BY key")
            self._db.execute("DELETE FROM journal")
            self._vectors.merge()
        self._journaled.clear()
        self._vectors.merged()

    def _write(self) -> contextlib.AbstractContextManager[None]:
        return write_transaction(self._db)

    def info(self) -> CacheInfo:
        (entries,) = self._db.execute(
            "SELECT (SELECT count(*) FROM responses) + (SELECT count(*) FROM journal)"
        ).fetchone()
        return CacheInfo(self.path, entries + self._vectors.count(), _size_on_disk(self.path))

    def clear(self) -> None:
        with self._write():
            for table in ("responses", "journal"):
                self._db.execute(f"DELETE FROM {table}")
            self._vectors.clear()
        self._journaled.clear()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.execute("VACUUM")

    def close(self) -> None:
        try:
            self.commit()
            if self._journaled or self._vectors.unmerged:
                self.merge()
        finally:
            self._db.close()
            self._vectors.close()

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
    names: Iterable[Path] = (path, Path(f"{path}-wal"), Path(f"{path}-shm"), vectors_path(path))
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
