"""Batch jobs kept in the response cache's SQLite file, so a new kernel finds them again.

Three tables beside the cache's own (one file to keep, move or delete)::

    batch_jobs      one per submission: its key (the requests it asks for), model, created
    batch_parts     one per server batch of a job (a job splits at 50,000 lines / 200 MB):
                    the batch id, its file ids, last status and request counts
    batch_requests  custom_id -> the request's cache key, per job: how answers find their
                    row, whatever order the output file comes back in

A job's key is a hash of its sorted request keys and the endpoint's URL without its query
(the same URL the request keys are made from), so running the same cell again, in this
process or a new one, or with another ``api-version``, finds the job it submitted instead
of paying for the same requests twice. The API key is never written here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nbtoolkit.core.store._cache import ResponseCache, cache_scope, write_transaction

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS batch_jobs (
        job_id TEXT PRIMARY KEY,       -- ours, not the server's: a job may be several batches
        job_key TEXT NOT NULL,         -- sha256 of endpoint scope + sorted request keys
        created REAL NOT NULL,
        model TEXT,
        endpoint TEXT NOT NULL,        -- the endpoint's path, e.g. /chat/completions
        collected INTEGER NOT NULL DEFAULT 0  -- its results were read into the cache
    )""",
    "CREATE INDEX IF NOT EXISTS batch_jobs_by_key ON batch_jobs (job_key)",
    """CREATE TABLE IF NOT EXISTS batch_parts (
        job_id TEXT NOT NULL,
        part INTEGER NOT NULL,
        batch_id TEXT,                 -- NULL until the server created it
        input_file_id TEXT,
        output_file_id TEXT,
        error_file_id TEXT,
        status TEXT NOT NULL,          -- the server's last word, or "submitting" / "unsent"
        total INTEGER NOT NULL,
        completed INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        claimed REAL NOT NULL,         -- when a process began submitting it
        errors TEXT,                   -- why the server failed it (validation), if it did
        PRIMARY KEY (job_id, part)
    )""",
    """CREATE TABLE IF NOT EXISTS batch_requests (
        job_id TEXT NOT NULL,
        custom_id TEXT NOT NULL,
        part INTEGER NOT NULL,
        key BLOB NOT NULL,             -- the request's key in the response cache
        PRIMARY KEY (job_id, custom_id)
    ) WITHOUT ROWID""",
)
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# A part claimed this long ago and still without a batch id belongs to a process that died
# while uploading: another run may submit it. Uploading 200 MB takes minutes, not ten.
CLAIM_STALE_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class Part:
    """One server batch of a job, as last seen."""

    job_id: str
    part: int
    batch_id: str | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    status: str
    total: int
    completed: int
    failed: int
    claimed: float
    errors: str | None


def job_key(endpoint_url: str, keys: Iterable[bytes]) -> str:
    """The identity of a submission: the same requests to the same provider, in any order.

    ``endpoint_url`` is the URL without its query (``ChatConfig.key_url``): a query holds
    secrets and Azure's ``api-version``, neither of which changes what was asked.
    """
    digest = hashlib.sha256(cache_scope(endpoint_url).encode() + b"\n")
    for key in sorted(keys):
        digest.update(key)
    return digest.hexdigest()


class BatchStore:
    """The batch tables of one cache file. Open one per operation; close it after."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # The cache opens the file first: it creates it private (0600) and sets WAL mode.
        ResponseCache(path).close()
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._write():
            for statement in _SCHEMA:
                self._db.execute(statement)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> BatchStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write(self) -> contextlib.AbstractContextManager[None]:
        return write_transaction(self._db)  # the write lock: one claim wins

    def live_job(self, key: str) -> str | None:
        """The job submitted for ``key`` whose results were not read back yet, if any."""
        row = self._db.execute(
            "SELECT job_id FROM batch_jobs WHERE job_key = ? AND collected = 0 "
            "ORDER BY created DESC LIMIT 1",
            (key,),
        ).fetchone()
        return None if row is None else str(row[0])

    def claim(
        self,
        key: str,
        *,
        model: str | None,
        endpoint: str,
        parts: Sequence[Sequence[tuple[str, bytes]]],
    ) -> tuple[str, bool]:
        """The live job for ``key``, or a new one holding ``parts`` (custom_id, cache key).

        Returns:
            (job_id, created): created is False when a job with this key was already there
            and is not finished with (not yet collected, or still running): re-attach to it.
        """
        with self._write():
            live = self.live_job(key)
            if live is not None:
                return live, False
            job_id = f"job-{uuid.uuid4().hex[:16]}"
            now = time.time()
            self._db.execute(
                "INSERT INTO batch_jobs VALUES (?, ?, ?, ?, ?, 0)",
                (job_id, key, now, model, endpoint),
            )
            for number, lines in enumerate(parts):
                self._db.execute(
                    "INSERT INTO batch_parts (job_id, part, status, total, claimed) "
                    "VALUES (?, ?, 'submitting', ?, ?)",
                    (job_id, number, len(lines), now),
                )
                self._db.executemany(
                    "INSERT INTO batch_requests VALUES (?, ?, ?, ?)",
                    [(job_id, custom_id, number, k) for custom_id, k in lines],
                )
            return job_id, True

    def take_over(self, part: Part) -> bool:
        """Claim an unsent part (its submitter failed or died) for this process."""
        stale = time.time() - CLAIM_STALE_SECONDS
        with self._write():
            cursor = self._db.execute(
                "UPDATE batch_parts SET status = 'submitting', claimed = ? "
                "WHERE job_id = ? AND part = ? AND batch_id IS NULL "
                "AND (status = 'unsent' OR claimed < ?)",
                (time.time(), part.job_id, part.part, stale),
            )
            return cursor.rowcount == 1

    def parts(self, job_id: str) -> list[Part]:
        rows = self._db.execute(
            "SELECT job_id, part, batch_id, input_file_id, output_file_id, error_file_id, "
            "status, total, completed, failed, claimed, errors FROM batch_parts WHERE job_id = ? "
            "ORDER BY part",
            (job_id,),
        ).fetchall()
        return [Part(*row) for row in rows]

    def requests(self, job_id: str, part: int) -> dict[str, bytes]:
        """custom_id -> cache key for one part."""
        rows = self._db.execute(
            "SELECT custom_id, key FROM batch_requests WHERE job_id = ? AND part = ?",
            (job_id, part),
        )
        return {custom_id: bytes(key) for custom_id, key in rows}

    def update(self, job_id: str, part: int, **fields: object) -> None:
        """Record what the server said of a part (status, counts, file and batch ids)."""
        allowed = {
            "batch_id",
            "input_file_id",
            "output_file_id",
            "error_file_id",
            "status",
            "total",
            "completed",
            "failed",
            "errors",
        }
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown batch part fields {sorted(unknown)}")
        names = ", ".join(f"{name} = ?" for name in fields)
        with self._write():
            self._db.execute(
                f"UPDATE batch_parts SET {names} WHERE job_id = ? AND part = ?",
                (*fields.values(), job_id, part),
            )

    def mark_collected(self, job_id: str) -> None:
        with self._write():
            self._db.execute("UPDATE batch_jobs SET collected = 1 WHERE job_id = ?", (job_id,))

    def jobs(self) -> list[tuple[object, ...]]:
        """Every part of every job, newest first, for `nbtoolkit.batch_jobs()`."""
        return self._db.execute(
            "SELECT p.batch_id, j.job_id, j.created, p.status, p.total, p.completed, p.failed, "
            "j.model, j.endpoint, p.part, j.collected FROM batch_jobs j "
            "JOIN batch_parts p USING (job_id) ORDER BY j.created DESC, p.part"
        ).fetchall()
