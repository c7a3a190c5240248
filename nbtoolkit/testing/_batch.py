"""The OpenAI Batch API for `nbtoolkit.testing._server.ChatServer`: files, batches, and their life.

Routes (under ``/v1``, ``/openai/v1`` and ``/openai``, each demanding the server's API key
like the chat route)::

    POST /files                 multipart: purpose=batch, file=<JSONL>
    GET  /files/{id}/content    the file's bytes
    POST /batches               {"input_file_id", "endpoint", "completion_window", "metadata"}
    GET  /batches/{id}          the batch object: status and request_counts
    POST /batches/{id}/cancel

A batch moves validating -> in_progress -> finalizing -> completed on a clock of seconds
(`BatchBehaviour`), or to failed (the input does not validate), expired (``expire_after``)
or cancelling -> cancelled. Nothing runs in the background: each request brings the batch
up to date with the clock, so a stopped server leaves no task behind. Answers come from
the server's own responder; output lines are shuffled; chosen lines fail, the way the real
API fails them (a 4xx body inside ``response`` with ``error`` null, or ``response`` null
and an ``error``), into the error file.

Longer than ~400 lines: the Batch API's whole life (files, batches, their states, output and
error files) is one simulated service, kept in one place like the real one's reference.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

# Builds a chat completion body (JSON text) from (model, messages, answer text).
CompletionMaker = Callable[[Any, list[dict[str, Any]], str], str]
Responder = Callable[[list[dict[str, Any]], dict[str, Any]], str]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_EXPIRED = "This request could not be executed before the completion window expired."
_MAX_UPLOAD = 256 * 1024 * 1024
_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True, kw_only=True)
class BatchBehaviour:
    """How the test server's batches behave. Seconds are real seconds, kept short for tests.

    ``hold=True`` keeps every batch in_progress (half its lines done) until
    ``server.batch.release()``: a test can look at a running batch with no timing at all.
    """

    validating: float = 0.1  # seconds in "validating"
    in_progress: float = 0.4  # seconds for the lines to run
    finalizing: float = 0.1
    cancelling: float = 0.1
    expire_after: float | None = None  # seconds after creation; None: never expires
    hold: bool = False
    fail_rate: float = 0.0  # share of lines that fail, picked by a hash of (seed, prompt)
    fail_prompts: frozenset[str] = frozenset()  # these prompts always fail
    fail_validation: bool = False  # every batch fails validation
    shuffle: bool = True  # output lines in a random order, as the real API may
    seed: int = 0
    upload_delay: float = 0.0  # seconds an upload waits before its reply (a slow link)
    # Uploads get a 400 whose message echoes the request's URL and headers, as some
    # gateways' errors do: the client must scrub them before anyone sees the message.
    refuse_uploads: bool = False
    # Route ("upload", "content", "create", "status", "cancel") -> the statuses its first
    # calls get, in order, before it answers normally: 429 (with Retry-After: 0), 5xx, ...
    statuses: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be in [0, 1], got {self.fail_rate}")

    def fails(self, prompt: str) -> bool:
        if prompt in self.fail_prompts:
            return True
        digest = hashlib.blake2b(f"{self.seed}\0{prompt}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64 < self.fail_rate


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    window: str
    metadata: dict[str, Any]
    lines: list[dict[str, Any]]
    created: float  # time.time(), as the API reports it
    born: float  # time.monotonic() at creation: the start of the expiry clock
    clock: float  # time.monotonic() the current phase began
    status: str = "validating"
    processed: int = 0  # lines run so far, in input order
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int] = field(default_factory=dict)  # "in_progress_at" and so on


class BatchAPI:
    """Files and batches of one ChatServer; only touched on the server's loop.

    Counters for tests: `uploads`, `batches_created`, `cancels`, `downloads`, `calls`
    (requests per route, scripted failures included),
    `lines_run` (prompt -> times a batch line with that prompt was answered), and
    `headers_seen` / `queries_seen` (one dict per request).
    """

    def __init__(
        self,
        behaviour: BatchBehaviour,
        *,
        responder: Responder,
        completion: CompletionMaker,
        authorized: Callable[[web.Request], bool],
        auth_error: Callable[[], web.Response],
    ) -> None:
        self.behaviour = behaviour
        self._responder = responder
        self._completion = completion
        self._authorized = authorized
        self._auth_error = auth_error
        self._ids = itertools.count(1)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self._released = False
        self.uploads = 0
        self.batches_created = 0
        self.cancels = 0
        self.downloads = 0
        self.lines_run: dict[str, int] = {}
        self.headers_seen: list[dict[str, str]] = []  # per Batch API request, in order
        self.calls: collections.Counter[str] = collections.Counter()  # requests per route
        self._failed: collections.Counter[str] = collections.Counter()  # scripted ones sent
        self.queries_seen: list[dict[str, str]] = []

    def add_routes(self, app: web.Application) -> None:
        """The routes, under ``/v1`` and ``/openai/v1`` (OpenAI, Azure's v1 API) and under
        ``/openai`` (an Azure resource, where ``api-version`` is required)."""
        routes = (
            ("upload", "POST", "/files", self._upload),
            ("content", "GET", "/files/{id}/content", self._content),
            ("create", "POST", "/batches", self._create),
            ("status", "GET", "/batches/{id}", self._get),
            ("cancel", "POST", "/batches/{id}/cancel", self._cancel),
        )
        for prefix in ("/v1", "/openai/v1", "/openai"):
            for name, method, path, handler in routes:
                app.router.add_route(method, prefix + path, self._guarded(name, handler, prefix))

    def _guarded(self, name: str, handler: _Handler, prefix: str) -> _Handler:
        """``handler`` behind the key check and the scripted statuses, recording the call."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            self.calls[name] += 1
            self.headers_seen.append(dict(request.headers))
            self.queries_seen.append(dict(request.query))
            if not self._authorized(request):
                return self._auth_error()
            if prefix == "/openai" and not request.query.get("api-version"):
                return _not_found("route: Azure resource URLs need an api-version")
            scripted = self.behaviour.statuses.get(name, ())
            if self._failed[name] < len(scripted):
                status = scripted[self._failed[name]]
                self._failed[name] += 1
                return _status(status)
            if name == "upload" and self.behaviour.upload_delay:
                await asyncio.sleep(self.behaviour.upload_delay)
            return await handler(request)

        return guarded

    def release(self) -> None:
        """Let held batches finish (see ``BatchBehaviour.hold``); safe from any thread."""
        self._released = True

    async def _upload(self, request: web.Request) -> web.Response:
        if self.behaviour.refuse_uploads:
            echoed = f"{request.path_qs} with headers {dict(request.headers)}"
            return _invalid(f"upload refused: {echoed}")
        purpose, content, name = "", b"", "upload.jsonl"
        # aiohttp caps a request body at 1 MB; a batch file may hold 200 MB.
        reader = await request.clone(client_max_size=_MAX_UPLOAD).multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                content = bytes(await part.read())
                name = part.filename or name
        if purpose != "batch" or not content:
            return _invalid("a batch upload needs purpose=batch and a non-empty file")
        self.uploads += 1
        file_id = self._new_file(content)
        return web.json_response(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": int(time.time()),
                "filename": name,
                "purpose": "batch",
            }
        )

    async def _content(self, request: web.Request) -> web.Response:
        content = self.files.get(request.match_info["id"])
        if content is None:
            return _not_found("file")
        self.downloads += 1
        return web.Response(body=content, content_type="application/octet-stream")

    async def _create(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            file_id, endpoint = body["input_file_id"], body["endpoint"]
        except (ValueError, KeyError, TypeError):
            return _invalid("a batch needs input_file_id and endpoint")
        if file_id not in self.files:
            return _not_found("file")
        if body.get("completion_window") != "24h":
            return _invalid("completion_window must be 24h")
        batch = _Batch(
            id=f"batch_{next(self._ids)}",
            input_file_id=file_id,
            endpoint=endpoint,
            window="24h",
            metadata=dict(body.get("metadata") or {}),
            lines=[],
            created=time.time(),
            born=time.monotonic(),
            clock=time.monotonic(),
        )
        self.batches[batch.id] = batch
        self.batches_created += 1
        return web.json_response(self._view(batch))

    async def _get(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _not_found("batch")
        self._advance(batch)
        return web.json_response(self._view(batch))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _not_found("batch")
        self._advance(batch)
        if batch.status in ("validating", "in_progress"):
            self.cancels += 1
            self._enter(batch, "cancelling", time.monotonic())
        return web.json_response(self._view(batch))

    def _advance(self, batch: _Batch) -> None:
        """Bring the batch's status up to date with the clock."""
        now = time.monotonic()
        b = self.behaviour
        expires = None if b.expire_after is None else batch.born + b.expire_after
        # Each phase is judged at the time it ends, not at `now`: a batch first looked at
        # long after it expired has still run the lines it had time for, whatever the
        # polling did.
        while batch.status not in _TERMINAL:
            if batch.status == "validating":
                end = batch.clock + b.validating
                if expires is not None and expires < end and now >= expires:
                    self._finish(batch, "expired", expired=True)
                    return
                if now < end:
                    return
                if not self._validate(batch):
                    self._enter(batch, "failed", end)
                    return
                self._enter(batch, "in_progress", end)
            elif batch.status == "in_progress":
                until = now if expires is None else min(now, expires)
                self._run_lines(batch, self._due(batch, until))
                if batch.processed < len(batch.lines):
                    if expires is not None and now >= expires:
                        self._finish(batch, "expired", expired=True)
                    return
                self._enter(batch, "finalizing", batch.clock + b.in_progress)
            elif batch.status == "finalizing":
                if now < batch.clock + b.finalizing:
                    return
                self._finish(batch, "completed")
            elif batch.status == "cancelling":
                if now < batch.clock + b.cancelling:
                    return
                self._finish(batch, "cancelled")

    def _due(self, batch: _Batch, now: float) -> int:
        """How many lines a running batch has done by ``now``."""
        if batch.status != "in_progress":
            return batch.processed
        length = self.behaviour.in_progress
        share = 1.0 if length <= 0 else (now - batch.clock) / length
        due = min(len(batch.lines), int(len(batch.lines) * max(0.0, share)))
        if self.behaviour.hold and not self._released:
            due = min(due, len(batch.lines) // 2)
        return max(due, batch.processed)

    def _run_lines(self, batch: _Batch, upto: int) -> None:
        for line in batch.lines[batch.processed : upto]:
            line["result"] = self._answer(line)
        batch.processed = max(batch.processed, upto)

    def _enter(self, batch: _Batch, status: str, at: float) -> None:
        batch.status = status
        batch.clock = at
        batch.times[f"{status}_at"] = int(time.time())

    def _validate(self, batch: _Batch) -> bool:
        """Parse the input file into lines; False (and `errors`) when it is not valid."""
        errors: list[dict[str, Any]] = []
        if self.behaviour.fail_validation:
            errors.append({"code": "invalid_request", "message": "scripted validation failure"})
        seen: set[str] = set()
        models: set[str] = set()
        content = self.files[batch.input_file_id].decode("utf-8", errors="replace")
        for number, text in enumerate(content.splitlines(), 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
                custom_id, body = line["custom_id"], line["body"]
            except (ValueError, KeyError, TypeError):
                errors.append(_line_error("invalid_json_line", "not a valid request line", number))
                continue
            if custom_id in seen:
                errors.append(_line_error("duplicate_custom_id", f"{custom_id} repeats", number))
            if line.get("method") != "POST" or line.get("url") != batch.endpoint:
                message = f"url must be {batch.endpoint} with method POST"
                errors.append(_line_error("invalid_url", message, number))
            seen.add(custom_id)
            models.add(str(body.get("model")))
            batch.lines.append({"custom_id": custom_id, "body": body})
        if len(models) > 1:
            errors.append({"code": "mixed_models", "message": f"one model per file: {models}"})
        if not batch.lines:
            errors.append({"code": "empty_file", "message": "the input file has no requests"})
        batch.errors = errors
        return not errors

    def _answer(self, line: dict[str, Any]) -> dict[str, Any]:
        """One line's result, as it will appear in the output or error file."""
        body = line["body"]
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        prompt = _last_user_text(messages)
        request_id = f"req_{next(self._ids)}"
        result: dict[str, Any] = {
            "id": f"batch_req_{next(self._ids)}",
            "custom_id": line["custom_id"],
        }
        if self.behaviour.fails(prompt):
            # Two ways the real API reports a failed line; alternate so tests meet both.
            digest = hashlib.blake2b(prompt.encode(), digest_size=1).digest()[0]
            if digest % 2 == 0:
                error = {
                    "message": f"Invalid request for: {prompt[:40]}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
                response = {"status_code": 400, "request_id": request_id, "body": {"error": error}}
                result |= {"response": response, "error": None}
            else:
                error = {"code": "server_error", "message": "The server had an error on this line."}
                result |= {"response": None, "error": error}
            return result
        text = self._responder(messages, body)
        completion = json.loads(self._completion(body.get("model"), messages, text))
        self.lines_run[prompt] = self.lines_run.get(prompt, 0) + 1
        response = {"status_code": 200, "request_id": request_id, "body": completion}
        return result | {"response": response, "error": None}

    def _finish(self, batch: _Batch, status: str, *, expired: bool = False) -> None:
        """Write the output and error files of the lines that ran, and end the batch."""
        ran = [line["result"] for line in batch.lines[: batch.processed]]
        if self.behaviour.shuffle:
            random.Random(self.behaviour.seed).shuffle(ran)
        good: list[dict[str, Any]] = []
        bad: list[dict[str, Any]] = []
        for record in ran:
            ok = record["response"] and record["response"]["status_code"] == 200
            (good if ok else bad).append(record)
        if expired:
            for line in batch.lines[batch.processed :]:
                error = {"code": "batch_expired", "message": _EXPIRED}
                bad.append(
                    {
                        "id": f"batch_req_{next(self._ids)}",
                        "custom_id": line["custom_id"],
                        "response": None,
                        "error": error,
                    }
                )
        if good:
            batch.output_file_id = self._new_file(_jsonl(good))
        if bad:
            batch.error_file_id = self._new_file(_jsonl(bad))
        self._enter(batch, status, time.monotonic())

    def _new_file(self, content: bytes) -> str:
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = content
        return file_id

    def _view(self, batch: _Batch) -> dict[str, Any]:
        ran = [line["result"] for line in batch.lines[: batch.processed]]
        completed = sum(1 for r in ran if r["response"] and r["response"]["status_code"] == 200)
        failed = len(ran) - completed
        if batch.status == "expired":
            failed += len(batch.lines) - batch.processed
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.window,
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created),
            "expires_at": int(batch.created) + 86400,
            **batch.times,
            "request_counts": {
                "total": len(batch.lines),
                "completed": completed,
                "failed": failed,
            },
            "metadata": batch.metadata,
        }


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _line_error(code: str, message: str, line: int) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def _invalid(message: str) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return web.json_response({"error": error}, status=400)


def _status(status: int) -> web.Response:
    error = {"message": f"scripted status {status}", "type": "server_error", "code": None}
    headers = {"Retry-After": "0"} if status == 429 else {}
    return web.json_response({"error": error}, status=status, headers=headers)


def _not_found(what: str) -> web.Response:
    error = {
        "message": f"No such {what}",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    return web.json_response({"error": error}, status=404)
