"""Anthropic's Message Batches for `AnthropicServer`: create, status, cancel, results.

Routes (each demanding the server's key, like ``/v1/messages``)::

    POST /v1/messages/batches                {"requests": [{"custom_id", "params"}, ...]}
    GET  /v1/messages/batches/{id}           processing_status, request_counts, results_url
    POST /v1/messages/batches/{id}/cancel
    GET  /v1/messages/batches/{id}/results   JSONL, one {"custom_id", "result"} per request

A batch is ``in_progress`` for ``validating + in_progress + finalizing`` seconds of its
`BatchBehaviour` (or until ``release()`` with ``hold``), then ``ended``; a cancel makes it
``canceling`` for ``cancelling`` seconds, the requests not yet run ``canceled``; past
``expire_after`` the rest are ``expired``. Nothing runs in the background: each request
brings the batch up to date with the clock. Results come from the server's own answers,
shuffled when the behaviour says so; requests whose prompt `BatchBehaviour.fails` are
``errored`` with an ``invalid_request_error``.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from nbtoolkit.testing._batch import BatchBehaviour

__all__ = ["MessageBatches"]

# Builds the message a request's params get (the server's own answer), and its prompt.
Answerer = Callable[[dict[str, Any]], dict[str, Any]]
Prompter = Callable[[dict[str, Any]], str]


@dataclass
class _MessageBatch:
    id: str
    requests: list[dict[str, Any]]
    created: float  # time.time()
    born: float  # time.monotonic()
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # custom_id -> result
    cancel_at: float | None = None  # time.monotonic() of the cancel
    ended_at: float | None = None


class MessageBatches:
    """The Message Batches of one AnthropicServer; only touched on the server's loop.

    Counters for tests: `creates`, `cancels`, `downloads`, `lines_run` (prompt -> times a
    request with that prompt was answered in a batch).
    """

    def __init__(
        self,
        behaviour: BatchBehaviour,
        *,
        answer: Answerer,
        prompt: Prompter,
        authorized: Callable[[web.Request], bool],
        auth_error: Callable[[web.Request], web.Response],
    ) -> None:
        self.behaviour = behaviour
        self._answer = answer
        self._prompt = prompt
        self._authorized = authorized
        self._auth_error = auth_error
        self._ids = itertools.count(1)
        self.batches: dict[str, _MessageBatch] = {}
        self._released = False
        self.creates = 0
        self.cancels = 0
        self.downloads = 0
        self.lines_run: collections.Counter[str] = collections.Counter()

    def add_routes(self, app: web.Application) -> None:
        """The four routes under ``/v1/messages/batches``."""
        base = "/v1/messages/batches"
        app.router.add_post(base, self._guarded(self._create))
        app.router.add_get(base + "/{id}", self._guarded(self._get))
        app.router.add_post(base + "/{id}/cancel", self._guarded(self._cancel))
        app.router.add_get(base + "/{id}/results", self._guarded(self._results))

    def release(self) -> None:
        """Let held batches finish (see ``BatchBehaviour.hold``)."""
        self._released = True

    def _guarded(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self._authorized(request):
                return self._auth_error(request)
            response: web.StreamResponse = await handler(request)
            return response

        return guarded

    async def _create(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            requests = body["requests"]
            if not isinstance(requests, list) or not requests:
                raise TypeError("no requests")
            ids = [one["custom_id"] for one in requests]
        except (ValueError, KeyError, TypeError):
            return _error(400, "requests: a non-empty list of {custom_id, params} is required")
        if len(set(ids)) != len(ids):
            return _error(400, "requests: custom_id values must be unique within a batch")
        self.creates += 1
        batch = _MessageBatch(
            f"msgbatch_{next(self._ids):020d}", requests, time.time(), time.monotonic()
        )
        self.batches[batch.id] = batch
        return web.json_response(self._view(request, batch))

    async def _get(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "message batch not found")
        return web.json_response(self._view(request, batch))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "message batch not found")
        self._advance(batch)
        if batch.ended_at is None and batch.cancel_at is None:
            self.cancels += 1
            batch.cancel_at = time.monotonic()
        return web.json_response(self._view(request, batch))

    async def _results(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "message batch not found")
        self._advance(batch)
        if batch.ended_at is None:
            return _error(400, "results are available once the batch has ended")
        self.downloads += 1
        records = [
            {"custom_id": one["custom_id"], "result": batch.results[one["custom_id"]]}
            for one in batch.requests
        ]
        if self.behaviour.shuffle:
            random.Random(f"{self.behaviour.seed}\0{batch.id}").shuffle(records)
        text = "".join(json.dumps(record) + "\n" for record in records)
        return web.Response(text=text, content_type="application/binary")

    def _run_time(self) -> float:
        b = self.behaviour
        return b.validating + b.in_progress + b.finalizing

    def _advance(self, batch: _MessageBatch) -> None:
        """Bring the batch up to date with the clock: run, cancel, expire or end it."""
        if batch.ended_at is not None:
            return
        now = time.monotonic()
        held = self.behaviour.hold and not self._released
        share = 0.5 if held else min(1.0, (now - batch.born) / max(self._run_time(), 1e-9))
        if batch.cancel_at is not None:
            share = min(share, (batch.cancel_at - batch.born) / max(self._run_time(), 1e-9))
        for one in batch.requests[: int(share * len(batch.requests))]:
            self._run(batch, one)
        expire = self.behaviour.expire_after
        if batch.cancel_at is not None and now - batch.cancel_at >= self.behaviour.cancelling:
            self._end(batch, "canceled")
        elif expire is not None and now - batch.born >= expire and share < 1.0:
            self._end(batch, "expired")
        elif share >= 1.0:
            self._end(batch, "canceled")  # nothing is left to mark

    def _run(self, batch: _MessageBatch, one: dict[str, Any]) -> None:
        custom_id = one["custom_id"]
        if custom_id in batch.results:
            return
        given = one.get("params")
        params: dict[str, Any] = given if isinstance(given, dict) else {}
        prompt = self._prompt(params)
        if self.behaviour.fails(prompt):
            error = {"type": "invalid_request_error", "message": f"this request failed: {prompt}"}
            batch.results[custom_id] = {
                "type": "errored",
                "error": {"type": "error", "error": error},
            }
            return
        self.lines_run[prompt] += 1
        batch.results[custom_id] = {"type": "succeeded", "message": self._answer(params)}

    def _end(self, batch: _MessageBatch, rest: str) -> None:
        for one in batch.requests:
            batch.results.setdefault(one["custom_id"], {"type": rest})
        batch.ended_at = time.monotonic()

    def _view(self, request: web.Request, batch: _MessageBatch) -> dict[str, Any]:
        self._advance(batch)
        kinds = collections.Counter(r["type"] for r in batch.results.values())
        ended = batch.ended_at is not None
        status = "ended" if ended else "canceling" if batch.cancel_at is not None else "in_progress"
        base = f"{request.scheme}://{request.host}/v1/messages/batches/{batch.id}"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": {
                "processing": len(batch.requests) - len(batch.results),
                "succeeded": kinds["succeeded"],
                "errored": kinds["errored"],
                "canceled": kinds["canceled"],
                "expired": kinds["expired"],
            },
            "created_at": _stamp(batch.created),
            "cancel_initiated_at": None if batch.cancel_at is None else _stamp(time.time()),
            "ended_at": None if not ended else _stamp(time.time()),
            "results_url": f"{base}/results" if ended else None,
        }


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str) -> web.Response:
    body = {
        "type": "error",
        "error": {
            "type": "invalid_request_error" if status == 400 else "not_found_error",
            "message": message,
        },
    }
    return web.json_response(body, status=status)
