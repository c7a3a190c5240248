"""An Anthropic Messages API server for tests: ``POST {base_url}/v1/messages``, scripted.

The same machinery as `ChatServer` (scripts, `FaultRates`, `RateLimit`, latency, counters,
records), in Anthropic's words::

    async with AnthropicServer(api_key="sk-ant-test") as server:
        server.script(Status(529), prompt="hi")  # overloaded_error, then a reply
        client = anthropic.AsyncAnthropic(api_key="sk-ant-test", base_url=server.base_url)

- the key travels in ``x-api-key`` or as a bearer token (401 ``authentication_error``
  otherwise), and every
  request must say ``anthropic-version`` (400 otherwise); ``max_tokens`` is required;
- a `Status` becomes ``{"type": "error", "error": {"type": ..., "message": ...}}`` with the
  type Anthropic uses for its code (``overloaded_error`` for 529, ``rate_limit_error`` for
  429, ``api_error`` for other 5xx), ``retry_after`` as a ``retry-after`` header;
- with ``RateLimit(..., headers="anthropic")``, every reply carries
  ``anthropic-ratelimit-*`` headers, and a 429 from the limiter its ``retry-after``;
- an answer is ``content: [{"type": "text", ...}]`` with ``stop_reason: "end_turn"``; a
  request that forces a tool (``tool_choice: {"type": "tool", ...}``) gets a ``tool_use``
  block whose input is `schema_instance` of the tool's ``input_schema`` (broken as
  `StructuredFaults` says); rows in ``refuse`` get ``stop_reason: "refusal"`` and those in
  ``truncate`` ``"max_tokens"``, with or without a tool;
- prompt caching: a block with ``cache_control`` marks a prefix (tools, system, messages, in
  that order); a prefix of at least ``cache_min_tokens`` is written on first sight
  (``cache_creation_input_tokens``) and read afterwards (``cache_read_input_tokens``), and
  ``input_tokens`` counts only the rest, as Anthropic counts them.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from nbtoolkit.testing import _structured
from nbtoolkit.testing._actions import FaultRates, Reply, Status
from nbtoolkit.testing._anthropic_batches import MessageBatches
from nbtoolkit.testing._batch import BatchBehaviour
from nbtoolkit.testing._ratelimit import RateLimit, Rejection, seconds_header
from nbtoolkit.testing._scripted import Exchange, ScriptedServer, text_of, tokens
from nbtoolkit.testing._server import status_phrase
from nbtoolkit.testing._structured import StructuredFaults

__all__ = ["AnthropicServer"]

# (messages, body) -> the answer text; the default echoes the last user message.
Responder = Callable[[list[dict[str, Any]], dict[str, Any]], str]

# The error type Anthropic's API gives each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class AnthropicServer(ScriptedServer):
    """A ``/v1/messages`` server on 127.0.0.1 that speaks Anthropic's format (see the module).

    Args:
        latency, api_key, faults, record, rate_limit: as for `ChatServer`.
        responder: builds the answer text from (messages, body); default ``"echo: <text>"``
            of the last user message.
        model_names: When given, other models get a 404 ``not_found_error``.
        structured: how forced tool answers, refusals and truncation go wrong.
        cache_min_tokens: the shortest prefix the prompt cache keeps (Anthropic's is 1,024
            tokens for most models, 2,048 for Haiku).
        batch: how Message Batches (``/v1/messages/batches``) behave; see `BatchBehaviour`
            and `nbtoolkit.testing._anthropic_batches`. Its batches and counters are on
            ``server.batch``.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        responder: Responder | None = None,
        faults: FaultRates | None = None,
        record: bool = True,
        model_names: Iterable[str] | None = None,
        rate_limit: RateLimit | None = None,
        structured: StructuredFaults | None = None,
        cache_min_tokens: int = 1024,
        batch: BatchBehaviour | None = None,
    ) -> None:
        super().__init__(
            latency=latency, api_key=api_key, faults=faults, record=record, rate_limit=rate_limit
        )
        self._responder = responder or _echo
        self._models = None if model_names is None else tuple(model_names)
        self._structured = structured
        self.cache_min_tokens = cache_min_tokens
        self._cached: set[bytes] = set()  # prefixes written to the prompt cache
        self._ids = itertools.count(1)
        self.batch = MessageBatches(
            batch or BatchBehaviour(),
            answer=self.message,
            prompt=lambda params: _last_user_text(params.get("messages")),
            authorized=self._authorized,
            auth_error=self._auth_error,
        )

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: the API root, as the anthropic SDK's ``base_url``."""
        return f"http://127.0.0.1:{self.port}"

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        self.batch.add_routes(app)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    def _prompt(self, body: dict[str, Any], kind: str) -> str:
        return _last_user_text(body.get("messages"))

    def _authorized(self, request: web.Request) -> bool:
        if self._api_key is None:
            return True
        key = self._api_key.encode()
        given = request.headers.get("x-api-key", "").encode()
        # The API also takes the key as a bearer token, as newer anthropic SDKs send it.
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").encode()
        return hmac.compare_digest(given, key) or hmac.compare_digest(bearer, key)

    def _auth_error(self, request: web.Request) -> web.Response:
        # Never echo the key the client sent: tests check that it cannot leak through errors.
        return _error(401, "invalid x-api-key")

    def _bad_body(self) -> web.Response:
        return _error(400, "There was an error parsing the body of your request as JSON.")

    def _precheck(self, request: web.Request, body: dict[str, Any] | None) -> web.Response | None:
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version: header is required")
        if body is None:
            return None
        model = body.get("model")
        if self._models is not None and model not in self._models:
            return _error(404, f"model: {model}")
        if not isinstance(body.get("max_tokens"), int):
            return _error(400, "max_tokens: Field required")
        if not isinstance(body.get("messages"), list):
            return _error(400, "messages: Field required")
        return None

    def _token_cost(self, body: dict[str, Any], kind: str) -> float:
        max_tokens = body.get("max_tokens")
        completion = max_tokens if isinstance(max_tokens, int) else 0
        return float(_prompt_tokens(body) + completion)

    def _rate_limited(self, rejection: Rejection) -> web.Response:
        _, what, wait = rejection
        message = (
            f"This request would exceed the rate limit for your organization of {what}. "
            "For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see "
            "the response headers for current usage."
        )
        response = _error(429, message)
        if self.rate_limit is not None and self.rate_limit.retry_after:
            response.headers["retry-after"] = str(max(1, math.ceil(wait - 1e-6)))
        return response

    def _status_response(self, action: Status) -> web.Response:
        type_ = action.error_type or ERROR_TYPES.get(
            action.code, "api_error" if action.code >= 500 else "invalid_request_error"
        )
        message = action.message or ("Overloaded" if action.code == 529 else "")
        response = _error(action.code, message or status_phrase(action.code), type_=type_)
        response.headers.update(action.headers)
        if action.retry_after is not None:
            response.headers["retry-after"] = seconds_header(action.retry_after)
        return response

    def _answer(
        self, request: web.Request, ex: Exchange, body: dict[str, Any], action: Reply
    ) -> web.Response:
        return web.json_response(self.message(body, action.text))

    def message(self, body: dict[str, Any], scripted: str | None = None) -> dict[str, Any]:
        """The message a request body gets (``scripted``: a `Reply`'s text instead of the
        responder's); the Message Batches' results are these too."""
        action = Reply(scripted)
        raw = body.get("messages")
        messages = [m for m in raw if isinstance(m, dict)] if isinstance(raw, list) else []
        row = _first_user_text(messages)
        faults = self._structured or StructuredFaults()
        tool = _forced_tool(body)
        stop_reason = "end_turn"
        content: list[dict[str, Any]]
        if action.text is None and row in faults.refuse:
            content, stop_reason = [], "refusal"
        elif action.text is None and tool is not None:
            content, stop_reason = self._tool_use(tool, row, messages)
        else:
            text = action.text if action.text is not None else self._responder(messages, body)
            if action.text is None and row in faults.truncate:
                text, stop_reason = text[: len(text) // 2], "max_tokens"
            content = [{"type": "text", "text": text}]
        output = sum(tokens(json.dumps(block)) for block in content) if content else 0
        return {
            "id": f"msg_{next(self._ids):024d}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {**self._input_usage(body), "output_tokens": output},
        }

    def _tool_use(
        self, tool: dict[str, Any], row: str, messages: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], str]:
        schema = tool.get("input_schema") or {}
        user_turns = sum(1 for m in messages if m.get("role") == "user")
        reasked = any(m.get("role") == "assistant" for m in messages)
        shaped = _structured.shaped(
            schema, row, reasked=reasked, user_turns=user_turns, faults=self._structured
        )
        if shaped.finish_reason == "length":
            # Cut off while writing the tool's input: Anthropic sends what it has, unparsed.
            return [], "max_tokens"
        try:
            value = json.loads(shaped.text or "")
        except ValueError:
            # A tool's input is always an object: "bad JSON" becomes a wrong field instead.
            instance = _structured.schema_instance(schema, row)
            value = json.loads(_structured.broken(instance, "wrong_type", schema))
        block = {
            "type": "tool_use",
            "id": f"toolu_{next(self._ids):024d}",
            "name": tool.get("name"),
            "input": value,
        }
        return [block], "tool_use"

    def _input_usage(self, body: dict[str, Any]) -> dict[str, int]:
        """Input tokens as Anthropic counts them: cache writes, cache reads, and the rest."""
        total = _prompt_tokens(body)
        prefix, key = _cached_prefix(body)
        read = written = 0
        if key is not None and prefix >= self.cache_min_tokens:
            if key in self._cached:
                read = prefix
            else:
                self._cached.add(key)
                written = prefix
        return {
            "input_tokens": total - read - written,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
        }


def _error(status: int, message: str, *, type_: str | None = None) -> web.Response:
    type_ = type_ or ERROR_TYPES.get(status, "api_error")
    body = {
        "type": "error",
        "error": {"type": type_, "message": message},
        "request_id": "req_test",
    }
    return web.json_response(body, status=status)


def _segments(body: dict[str, Any]) -> list[Any]:
    """The prompt's blocks in the order the cache reads them: tools, system, messages."""
    segments: list[Any] = []
    tools = body.get("tools")
    segments.extend(tools if isinstance(tools, list) else [])
    system = body.get("system")
    if isinstance(system, str):
        segments.append({"type": "text", "text": system})
    elif isinstance(system, list):
        segments.extend(system)
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            segments.append({"type": "text", "text": content})
        elif isinstance(content, list):
            segments.extend(content)
    return segments


def _segment_tokens(segment: Any) -> int:
    if isinstance(segment, dict) and isinstance(segment.get("text"), str):
        return tokens(segment["text"])
    return tokens(json.dumps(segment, sort_keys=True))


def _prompt_tokens(body: dict[str, Any]) -> int:
    return sum(_segment_tokens(segment) for segment in _segments(body))


def _cached_prefix(body: dict[str, Any]) -> tuple[int, bytes | None]:
    """The tokens and hash of the prompt up to its last ``cache_control`` block."""
    segments = _segments(body)
    last = None
    for position, segment in enumerate(segments):
        if isinstance(segment, dict) and segment.get("cache_control"):
            last = position
    if last is None:
        return 0, None
    prefix = segments[: last + 1]
    text = json.dumps([body.get("model"), prefix], sort_keys=True).encode()
    return sum(_segment_tokens(s) for s in prefix), hashlib.blake2b(text).digest()


def _forced_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    choice = body.get("tool_choice")
    tools = body.get("tools")
    if not isinstance(choice, dict) or choice.get("type") != "tool" or not isinstance(tools, list):
        return None
    return next(
        (t for t in tools if isinstance(t, dict) and t.get("name") == choice.get("name")), None
    )


def _last_user_text(messages: Any) -> str:
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return text_of(message.get("content"))
    return ""


def _first_user_text(messages: list[dict[str, Any]]) -> str:
    for message in messages:
        if message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def _echo(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    return "echo: " + _last_user_text(messages)
