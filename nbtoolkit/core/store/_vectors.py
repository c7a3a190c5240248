"""The response cache's binary answers (float32 vectors): a file of records beside the database.

A vector is 1 KB and more, written once and never changed, and an embedding run writes
hundreds of thousands. Through SQLite each went to the WAL, then into the database at the
checkpoint, as a row of its own: 9-10 us of CPU a vector on a 2-core machine, a tenth of
what the least client spends on one. Here a commit appends its vectors' records to
``responses.sqlite3-vectors`` in one write, and inserts one row for the whole span into
`vector_spans`, in the database transaction that holds the write lock (so two processes
never append at once, and a span exists only once its bytes were all written).

Keys reach `vector_keys` (key -> where its record is) later, in key order: every
``MERGE_EVERY`` vectors, at close, and when a cache is opened (the spans of a run that was
killed). Until then this connection finds its own vectors in memory; other connections see
them once merged, as for the text journal. Inserting 2,000 random keys per commit into
a b-tree rewrote most of its pages each time.

A record is a header (key length, data length, CRC-32 of the data, the three token counts),
the key, then the bytes. Every read checks the key and the CRC: a record that does not match
(a file that lost its tail in a power cut, or was deleted or cleared meanwhile) is a miss,
fetched again and appended anew, never a wrong vector. A replaced answer leaves its old
record in the file, unused; `clear` empties the file.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = (
    # id: the key's first 8 bytes as a signed integer. A rowid b-tree of small rows takes
    # an insert for half the CPU of one keyed by the whole 32-byte key; two keys that share
    # those bytes (one chance in 10^7 among a million vectors) only cost a miss, since
    # every record holds its whole key and is checked on read.
    "CREATE TABLE IF NOT EXISTS vector_keys (id INTEGER PRIMARY KEY,"
    " file_offset INTEGER NOT NULL, record_size INTEGER NOT NULL)",
    # One row per commit: the bytes it appended, whose keys are not in vector_keys yet.
    "CREATE TABLE IF NOT EXISTS vector_spans (id INTEGER PRIMARY KEY, start INTEGER NOT NULL,"
    " stop INTEGER NOT NULL)",
)
# Vectors a connection appends before their keys are merged. Each merge rewrites most pages
# of `vector_keys` (the keys are random), so few, large ones; until then the keys are held
# in memory, about 150 bytes each: 10 MB at most, next to 1 KB and more per vector in the
# run's output.
MERGE_EVERY = 65536
# Key length, data length, CRC-32 of the data, prompt, completion and cached tokens (-1: none).
_HEADER = struct.Struct("<HIIqqq")
_NONE = -1
_HEAD = struct.Struct("<HII")
_COUNTS = struct.Struct("<qqq")
_NO_TOKENS = [None, None, None]
_NO_COUNTS = _COUNTS.pack(_NONE, _NONE, _NONE)
_PLACE = "id, file_offset, record_size"
# SQLite caps the number of ? in one statement (999 before 3.32).
_LOOKUP_CHUNK = 900

Row = tuple[Any, ...]  # (key, data, prompt_tokens, completion_tokens, cached_tokens, ...)


def vectors_path(database: Path) -> Path:
    """The file that holds the binary answers of the cache at ``database``."""
    return Path(f"{database}-vectors")


class VectorStore:
    """One connection's view of the vectors file and its two tables."""

    def __init__(self, db: sqlite3.Connection, database: Path) -> None:
        self._db = db
        self._path = vectors_path(database)
        self._fd: int | None = None  # opened when first needed: a chat-only cache has no file
        # This connection's vectors whose keys are not merged yet: key -> (offset, size).
        self._own: dict[bytes, tuple[int, int]] = {}
        self._own_spans: set[int] = set()
        # Whether vector_keys may hold anything, as of `PRAGMA data_version` (which moves
        # when another connection commits): a chat run's misses skip the second look-up.
        self._any = True
        self._version_seen: int | None = None
        # What the last `append` wrote, kept once its transaction commits.
        self._placed: list[tuple[bytes, tuple[int, int]]] = []
        self._span: int | None = None

    @property
    def unmerged(self) -> int:
        return len(self._own)

    def pending(self) -> bool:
        """Whether any connection's spans wait to be merged (a killed run's, say)."""
        (exists,) = self._db.execute("SELECT EXISTS (SELECT 1 FROM vector_spans)").fetchone()
        return bool(exists)

    def append(self, rows: Sequence[Row]) -> None:
        """Write ``rows``' records and their span. Called inside a write transaction."""
        fd = self._open(create=True)
        assert fd is not None
        start = offset = os.lseek(fd, 0, os.SEEK_END)
        parts: list[bytes] = []
        placed: list[tuple[bytes, tuple[int, int]]] = []
        for key, data, *tokens in rows:
            # Vectors carry no token counts of their own (the reply's usage is the batch's):
            # the header's tail is then the same for every record.
            counts = _NO_COUNTS if tokens == _NO_TOKENS else _counts(tokens)
            header = _HEAD.pack(len(key), len(data), zlib.crc32(data)) + counts
            parts += (header, key, data)
            size = _HEADER.size + len(key) + len(data)
            placed.append((key, (offset, size)))
            offset += size
        _write_all(fd, b"".join(parts))
        span = self._db.execute(
            "INSERT INTO vector_spans (start, stop) VALUES (?, ?)", (start, offset)
        ).lastrowid
        # Known only once the transaction commits; the caller calls `committed` then.
        self._placed, self._span = placed, span

    def committed(self) -> None:
        """The transaction that `append` ran in has committed."""
        self._own.update(self._placed)
        if self._span is not None:
            self._own_spans.add(self._span)
        self._any = True  # our own commits leave data_version where it was
        self._placed, self._span = [], None

    def get(self, keys: Sequence[bytes], found: dict[bytes, Any], make: Any) -> None:
        """Add ``make(data, prompt, completion, cached)`` to ``found`` for each stored key."""
        places: list[tuple[bytes, int, int]] = []
        asked: list[bytes] = []
        for key in keys:
            if (place := self._own.get(key)) is not None:
                places.append((key, *place))
            else:
                asked.append(key)
        if asked and self._may_have_any():
            for start in range(0, len(asked), _LOOKUP_CHUNK):
                by_id = {_id(key): key for key in asked[start : start + _LOOKUP_CHUNK]}
                marks = ",".join("?" * len(by_id))
                sql = f"SELECT {_PLACE} FROM vector_keys WHERE id IN ({marks})"
                for row_id, offset, size in self._db.execute(sql, list(by_id)):
                    places.append((by_id[row_id], offset, size))
        for key, offset, size in places:
            record = self._read(key, offset, size)
            if record is not None:
                found[key] = make(*record)

    def merge(self) -> None:
        """Put every span's keys (every process's) into `vector_keys`, in key order.
        Called inside a write transaction; a key written twice keeps its newest record."""
        spans = self._db.execute("SELECT id, start, stop FROM vector_spans ORDER BY id").fetchall()
        if not spans:
            self._own.clear()
            self._own_spans.clear()
            return
        if {span_id for span_id, _, _ in spans} == self._own_spans:
            # Only this connection's: their places are in memory (reading back 1 KB records
            # would cost more than the rest of the merge).
            newest = self._own
        else:
            newest = {}
            for _, start, stop in spans:  # in id order: the last one wins
                newest.update((key, place) for key, place in self._records(start, stop))
        # Ids and their order with numpy: per key, Python's sort and int.from_bytes cost
        # more than SQLite's insert.
        ids = np.frombuffer(b"".join(_id_bytes(key) for key in newest), dtype=">i8")
        order = np.argsort(ids, kind="stable").tolist()
        places = list(newest.values())
        ids_in_order = ids[order].tolist()
        entries = [(row_id, *places[n]) for row_id, n in zip(ids_in_order, order, strict=True)]
        self._db.executemany("INSERT OR REPLACE INTO vector_keys VALUES (?, ?, ?)", entries)
        self._db.execute("DELETE FROM vector_spans")

    def merged(self) -> None:
        """The transaction that `merge` ran in has committed."""
        self._own = {}
        self._own_spans.clear()

    def count(self) -> int:
        (keys, spans) = self._db.execute(
            "SELECT (SELECT count(*) FROM vector_keys), (SELECT count(*) FROM vector_spans)"
        ).fetchone()
        return int(keys) + (len(self._own) if spans else 0)

    def clear(self) -> None:
        """Forget every vector. Called inside a write transaction."""
        self._db.execute("DELETE FROM vector_keys")
        self._db.execute("DELETE FROM vector_spans")
        if (fd := self._open(create=False)) is not None:
            os.ftruncate(fd, 0)
        self._own.clear()
        self._own_spans.clear()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _may_have_any(self) -> bool:
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        if version != self._version_seen:  # first call, or another connection committed
            self._version_seen = version
            (exists,) = self._db.execute("SELECT EXISTS (SELECT 1 FROM vector_keys)").fetchone()
            self._any = bool(exists)
        return self._any

    def _open(self, *, create: bool) -> int | None:
        if self._fd is None:
            flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_BINARY", 0)
            try:
                # Owner-only, like the database: the vectors are the user's data.
                self._fd = os.open(self._path, flags | (os.O_CREAT * create), 0o600)
            except FileNotFoundError:
                return None
        return self._fd

    def _read(self, key: bytes, offset: int, size: int) -> tuple[Any, ...] | None:
        """(data, prompt, completion, cached) of the record at ``offset``, if it is
        ``key``'s and intact; else None."""
        fd = self._open(create=False)
        if fd is None or size < _HEADER.size:
            return None
        record = _read_at(fd, size, offset)
        if len(record) != size:
            return None
        key_length, length, crc, *tokens = _HEADER.unpack_from(record)
        data = record[_HEADER.size + key_length :]
        if (
            key_length != len(key)
            or length != len(data)
            or record[_HEADER.size : _HEADER.size + key_length] != key
            or zlib.crc32(data) != crc
        ):
            return None
        return (data, *(None if n == _NONE else n for n in tokens))

    def _records(self, start: int, stop: int) -> Iterator[tuple[bytes, tuple[int, int]]]:
        """The (key, (offset, size)) of each whole record in the file between two offsets."""
        fd = self._open(create=False)
        if fd is None:
            return
        data = _read_at(fd, stop - start, start)
        position = 0
        while position + _HEADER.size <= len(data):
            key_length, length, *_ = _HEADER.unpack_from(data, position)
            size = _HEADER.size + key_length + length
            if position + size > len(data):
                return  # the file was cut short: the rest are misses
            key = data[position + _HEADER.size : position + _HEADER.size + key_length]
            yield key, (start + position, size)
            position += size


def _counts(tokens: list[int | None]) -> bytes:
    return _COUNTS.pack(*(_NONE if n is None else n for n in tokens))


def _id_bytes(key: bytes) -> bytes:
    """A key's first 8 bytes (a shorter key padded with zeros): its id, big-endian."""
    return key[:8].ljust(8, b"\0")


def _id(key: bytes) -> int:
    return int.from_bytes(_id_bytes(key), "big", signed=True)


def _read_at(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):  # one system call, not two (not on Windows)
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # appends ignore the position (O_APPEND)
    return os.read(fd, size)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
