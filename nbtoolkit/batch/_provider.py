"""What one provider's batch API looks like: its URLs, its request lines, its result records.

Everything else about a batch (planning rows, keys, the job store, budgets, waiting, reading
answers back through the endpoint's own ``parse``, the report) is shared, so a second
provider is one new class here::

    line(custom_id, item)      -> bytes       one request line of the input, newline included
    submit(http, lines, ...)   -> Submitted   upload and create (OpenAI), or one POST
    status(http, batch_id)     -> PartState   the server's status, counts and result files
    cancel(http, batch_id)
    results(http, state)       -> [str]       the result files' text
    read(record)               -> LineRead    one result record, in the shape shared code reads

`OpenAIBatches` speaks the OpenAI Batch API (files + batches, also Azure's v1 API under
``/openai/v1``); `AzureBatches` the same API on an Azure resource, whose files and batches
live beside its deployments, not under one; `AnthropicBatches` Anthropic's Message Batches
(the requests in one POST, results by ``custom_id`` at a ``results_url``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from nbtoolkit.batch._http import BatchHTTP
from nbtoolkit.config import ChatConfig
from nbtoolkit.core.endpoints._base import Endpoint, Item
from nbtoolkit.errors import ConfigError, MalformedResponse


@dataclass(frozen=True, slots=True)
class PartState:
    """What the server says of one batch."""

    status: str
    total: int | None
    completed: int
    failed: int
    # Where the results are, for the provider's own `results`: OpenAI's file ids; another
    # provider may keep a results URL here.
    output_file_id: str | None
    error_file_id: str | None
    errors: str | None  # why the server failed the batch (validation), if it did


@dataclass(frozen=True, slots=True)
class Submitted:
    """A batch the server created: its id, the input file it runs, its first state."""

    batch_id: str
    input_file_id: str | None
    state: PartState


@dataclass(frozen=True, slots=True)
class LineRead:
    """One result record: the line's HTTP reply, or the error that stands for it."""

    custom_id: str
    status: int | None  # the line's HTTP status; None when it got no reply
    body: str | None  # the reply's body (JSON text), for the endpoint's parse
    error_code: str | None = None  # without a reply: why ("batch_expired", ...)
    error_message: str | None = None


class BatchProvider(Protocol):
    """A provider's batch API, as the shared batch transport uses it."""

    def line(self, custom_id: str, item: Item) -> bytes:
        """One request line of the input (the item's payload is its body, byte for byte)."""
        ...

    async def submit(
        self, http: BatchHTTP, lines: Sequence[bytes], *, name: str, metadata: Mapping[str, str]
    ) -> Submitted:
        """Send the lines as one batch; raises before the batch exists, or returns it."""
        ...

    async def status(self, http: BatchHTTP, batch_id: str) -> PartState: ...

    async def cancel(self, http: BatchHTTP, batch_id: str) -> None: ...

    async def results(
        self, http: BatchHTTP, output_file_id: str | None, error_file_id: str | None
    ) -> list[str]:
        """The text of every result file of a finished batch."""
        ...

    def read(self, record: Mapping[str, Any]) -> LineRead | None:
        """One parsed result record; None when it is not one (no custom_id)."""
        ...


class OpenAIBatches:
    """The OpenAI Batch API: ``POST /files`` (JSONL), ``POST /batches``, ``GET /batches/{id}``.

    Args:
        config: where the API is (its base URL, query and key).
        endpoint: the endpoint every line calls (its path names the line's ``url``).
    """

    def __init__(self, config: ChatConfig, endpoint: Endpoint) -> None:
        self.config = config
        self.endpoint_url = self._line_url(endpoint.path)

    def _line_url(self, path: str) -> str:
        return "/v1" + path  # what the API wants in each line and at create

    def url(self, path: str) -> str:
        """The URL of an API path, with the config's query (a key, ``api-version``)."""
        return self.config.url(path)

    def line(self, custom_id: str, item: Item) -> bytes:
        head = json.dumps({"custom_id": custom_id, "method": "POST", "url": self.endpoint_url})
        return head[:-1].encode() + b', "body": ' + item.payload + b"}\n"

    async def submit(
        self, http: BatchHTTP, lines: Sequence[bytes], *, name: str, metadata: Mapping[str, str]
    ) -> Submitted:
        uploaded = await http.upload(
            self.url("/files"), {"purpose": "batch"}, b"".join(lines), name=f"{name}.jsonl"
        )
        file_id = _field(uploaded, "id")
        body = {
            "input_file_id": file_id,
            "endpoint": self.endpoint_url,
            "completion_window": "24h",
            "metadata": dict(metadata),
        }
        batch = await http.post_json(self.url("/batches"), body, creates=True)
        return Submitted(_field(batch, "id"), file_id, _state(batch))

    async def status(self, http: BatchHTTP, batch_id: str) -> PartState:
        return _state(await http.get_json(self.url(f"/batches/{batch_id}")))

    async def cancel(self, http: BatchHTTP, batch_id: str) -> None:
        await http.post_json(self.url(f"/batches/{batch_id}/cancel"), None, creates=False)

    async def results(
        self, http: BatchHTTP, output_file_id: str | None, error_file_id: str | None
    ) -> list[str]:
        ids = [i for i in (output_file_id, error_file_id) if i is not None]
        return [await http.text(self.url(f"/files/{file_id}/content")) for file_id in ids]

    def read(self, record: Mapping[str, Any]) -> LineRead | None:
        """The shapes the API writes: a reply in ``response`` (200, or a 4xx/5xx body with
        ``error`` null), or ``response`` null and an ``error`` (such as ``batch_expired``)."""
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str):
            return None
        response = record.get("response")
        if isinstance(response, Mapping):
            status = response.get("status_code")
            if isinstance(status, int) and not isinstance(status, bool):
                return LineRead(custom_id, status, json.dumps(response.get("body")))
        error = record.get("error")
        if isinstance(error, Mapping):
            code = str(error.get("code") or "error")
            return LineRead(custom_id, None, None, code, str(error.get("message") or ""))
        return LineRead(custom_id, None, None)


class AzureBatches(OpenAIBatches):
    """The Batch API of an Azure OpenAI resource addressed by deployment.

    Files and batches are the resource's (``{endpoint}/openai/files?api-version=...``), not
    a deployment's; a line names ``/chat/completions`` and its body's model is the
    (global batch) deployment.
    """

    def _line_url(self, path: str) -> str:
        return path

    def url(self, path: str) -> str:
        root = self.config.key_url("")
        resource, _, _ = root.partition("/openai/deployments/")
        query = urlsplit(self.config.url("")).query
        return f"{resource}/openai{path}" + (f"?{query}" if query else "")


# The HTTP status of each Anthropic error type, for a batch result that is an error.
_ANTHROPIC_STATUSES = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


class AnthropicBatches:
    """Anthropic's Message Batches: ``POST /v1/messages/batches`` with every request in the
    body (``custom_id`` + ``params``, the Messages body as the live endpoint sends it),
    ``GET .../{id}`` for its ``processing_status``, the results as JSONL at its
    ``results_url``, ``POST .../{id}/cancel``.
    """

    def __init__(self, config: ChatConfig, endpoint: Endpoint) -> None:
        self.config = config

    def url(self, path: str) -> str:
        return self.config.url("/v1/messages/batches" + path)

    def line(self, custom_id: str, item: Item) -> bytes:
        return (
            b'{"custom_id":'
            + json.dumps(custom_id).encode()
            + b',"params":'
            + item.payload
            + b"}\n"
        )

    async def submit(
        self, http: BatchHTTP, lines: Sequence[bytes], *, name: str, metadata: Mapping[str, str]
    ) -> Submitted:
        body = {"requests": [json.loads(line) for line in lines]}
        batch = await http.post_json(self.url(""), body, creates=True)
        return Submitted(_field(batch, "id"), None, _anthropic_state(batch))

    async def status(self, http: BatchHTTP, batch_id: str) -> PartState:
        return _anthropic_state(await http.get_json(self.url(f"/{batch_id}")))

    async def cancel(self, http: BatchHTTP, batch_id: str) -> None:
        await http.post_json(self.url(f"/{batch_id}/cancel"), None, creates=False)

    async def results(
        self, http: BatchHTTP, output_file_id: str | None, error_file_id: str | None
    ) -> list[str]:
        # output_file_id holds the batch's results_url (see _anthropic_state).
        return [] if output_file_id is None else [await http.text(output_file_id)]

    def read(self, record: Mapping[str, Any]) -> LineRead | None:
        """``result.type``: ``succeeded`` (its message), ``errored`` (an error body, read as
        its HTTP status), ``canceled`` or ``expired`` (no reply)."""
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str):
            return None
        result = record.get("result")
        kind = result.get("type") if isinstance(result, Mapping) else None
        if kind == "succeeded" and isinstance(result, Mapping):
            return LineRead(custom_id, 200, json.dumps(result.get("message")))
        if kind == "errored" and isinstance(result, Mapping):
            error = result.get("error")
            inner = error.get("error", error) if isinstance(error, Mapping) else {}
            status = _ANTHROPIC_STATUSES.get(str(inner.get("type")), 400)
            return LineRead(custom_id, status, json.dumps(error))
        if kind in ("canceled", "expired"):
            code = "batch_expired" if kind == "expired" else "batch_cancelled"
            return LineRead(custom_id, None, None, code, f"the request was {kind}")
        return LineRead(custom_id, None, None)


def _anthropic_state(batch: Any) -> PartState:
    if not isinstance(batch, Mapping):
        raise MalformedResponse(f"a batch reply is not an object: {str(batch)[:200]}")
    counts = batch.get("request_counts")
    counts = counts if isinstance(counts, Mapping) else {}

    def count(name: str) -> int:
        value = counts.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    processing = str(batch.get("processing_status") or "")
    if processing == "ended":
        status = "cancelled" if batch.get("cancel_initiated_at") else "completed"
    else:
        status = {"canceling": "cancelling"}.get(processing, "in_progress")
    results_url = batch.get("results_url")
    return PartState(
        status=status,
        total=sum(count(n) for n in ("processing", "succeeded", "errored", "canceled", "expired")),
        completed=count("succeeded"),
        failed=count("errored") + count("canceled") + count("expired"),
        output_file_id=results_url if isinstance(results_url, str) else None,
        error_file_id=None,
        errors=None,
    )


def provider_for(config: ChatConfig, endpoint: Endpoint) -> BatchProvider:
    """The batch API that serves ``config``'s URL.

    Raises:
        ConfigError: a provider whose batch API is not spoken here yet.
    """
    if config.provider == "anthropic":
        return AnthropicBatches(config, endpoint)
    if config.provider not in (None, "openai"):
        raise ConfigError(
            f"batch mode speaks OpenAI's Batch API and Anthropic's Message Batches; "
            f"{config.provider}'s batches are not supported yet: run the rows live "
            "(leave batch= out)"
        )
    if config.azure_endpoint and "/openai/deployments/" in config.key_url(""):
        return AzureBatches(config, endpoint)
    return OpenAIBatches(config, endpoint)


def _state(batch: Any) -> PartState:
    if not isinstance(batch, Mapping):
        raise MalformedResponse(f"a batch reply is not an object: {str(batch)[:200]}")
    counts = batch.get("request_counts") or {}
    errors = (batch.get("errors") or {}).get("data") or []
    total = counts.get("total")
    return PartState(
        status=str(batch.get("status") or "validating"),
        total=int(total) if isinstance(total, int) and total > 0 else None,
        completed=int(counts.get("completed") or 0),
        failed=int(counts.get("failed") or 0),
        output_file_id=batch.get("output_file_id"),
        error_file_id=batch.get("error_file_id"),
        errors="; ".join(_describe(e) for e in errors) or None,
    )


def _describe(error: Any) -> str:
    if not isinstance(error, Mapping):
        return str(error)[:200]
    line = f" (line {error['line']})" if error.get("line") is not None else ""
    return f"{error.get('code')}: {error.get('message')}{line}"[:300]


def _field(reply: Any, name: str) -> str:
    value = reply.get(name) if isinstance(reply, Mapping) else None
    if not isinstance(value, str):
        raise MalformedResponse(f"reply has no {name!r}: {str(reply)[:200]}")
    return value
