"""A Gemini API server for tests: ``models/{model}:generateContent`` and ``:batchEmbedContents``.

The same machinery as `ChatServer` (scripts, `FaultRates`, `RateLimit`, latency, counters,
records), in Google's words::

    async with GeminiServer(api_key="gm-test") as server:
        server.script(Status(429, retry_after=2), prompt="hi")  # per-minute quota, retryDelay 2s
        client = genai.Client(api_key="gm-test", http_options={"base_url": server.base_url})

- routes hang under ``/v1beta`` and ``/v1`` of `base_url`; the key travels in
  ``x-goog-api-key`` (or ``?key=``); a wrong key is a **400** ``INVALID_ARGUMENT`` whose
  ``ErrorInfo`` says ``API_KEY_INVALID``, as Google answers it; no key is a 403;
- a `Status` becomes ``{"error": {"code", "message", "status", "details"}}``; a 429 is
  ``RESOURCE_EXHAUSTED`` with a ``QuotaFailure`` naming its quota (`Status.error_code`, by
  default ``GenerateRequestsPerMinutePerProjectPerModel``; put ``PerDay`` in it for a daily
  quota) and ``retry_after`` as ``RetryInfo.retryDelay`` in the body, never a header. The
  limiter's 429s are per-minute ones with their retryDelay. Gemini sends no rate headers;
- an answer is ``candidates[0].content.parts[0].text`` with ``finishReason: "STOP"`` and
  ``usageMetadata``; ``generationConfig.responseMimeType: "application/json"`` with a
  ``responseSchema`` (or ``responseJsonSchema``) gets `schema_instance` of it as JSON text.
  A ``responseSchema`` holding a keyword Gemini's Schema does not know (``additionalProperties``,
  ``$ref``, ``const``, ...) is a 400 naming it, as Google refuses it;
- rows in `StructuredFaults` ``refuse`` end with ``finishReason: "SAFETY"`` and no content,
  in ``truncate`` with ``"MAX_TOKENS"``; rows in ``recitation`` with ``"RECITATION"``;
  rows in ``blocked`` get no candidate and ``promptFeedback.blockReason: "SAFETY"``;
- ``batchEmbedContents`` answers ``{"embeddings": [{"values": [...]}]}`` in request order,
  vectors as `expected_vector` (``outputDimensionality`` honoured), with the refusals of
  `EmbeddingBehaviour` (``max_inputs`` defaults to Gemini's 100 requests per batch).
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from nbtoolkit.testing import _embeddings, _structured
from nbtoolkit.testing._actions import FaultRates, Reply, Status
from nbtoolkit.testing._embeddings import EmbeddingBehaviour
from nbtoolkit.testing._ratelimit import RateLimit, Rejection
from nbtoolkit.testing._scripted import Exchange, ScriptedServer, tokens
from nbtoolkit.testing._server import status_phrase
from nbtoolkit.testing._structured import StructuredFaults

__all__ = ["GeminiServer"]

# (contents, body) -> the answer text; the default echoes the last user turn.
Responder = Callable[[list[dict[str, Any]], dict[str, Any]], str]

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
PER_MINUTE = "GenerateRequestsPerMinutePerProjectPerModel"
QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)
# The keywords of Gemini's Schema object (an OpenAPI subset); any other is refused.
SCHEMA_FIELDS = frozenset(
    {
        "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
        "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
        "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum",
        "maximum",
    }
)  # fmt: skip
# Protobuf's JSON reader takes each field's proto name too (google-genai sends those).
SCHEMA_FIELDS |= {re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower() for name in SCHEMA_FIELDS}
_TYPE = "type.googleapis.com/google.rpc."


class GeminiServer(ScriptedServer):
    """A Gemini API server on 127.0.0.1 that speaks Google's format (see the module).

    Args:
        latency, api_key, faults, record, rate_limit: as for `ChatServer`.
        responder: builds the answer text from (contents, body); default ``"echo: <text>"``
            of the last user turn.
        model_names: When given, other models get a 404 ``NOT_FOUND``.
        structured: how JSON answers, refusals (SAFETY) and truncation go wrong.
        embeddings: vector length, refusals and the batch cap of ``batchEmbedContents``.
        blocked: rows (their text) whose prompt is blocked (``promptFeedback``).
        recitation: rows whose answer stops with ``finishReason: "RECITATION"``.
        thoughts_tokens: ``thoughtsTokenCount`` reported per answer (a thinking model).
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
        embeddings: EmbeddingBehaviour | None = None,
        blocked: Iterable[str] = (),
        recitation: Iterable[str] = (),
        thoughts_tokens: int = 0,
    ) -> None:
        super().__init__(
            latency=latency, api_key=api_key, faults=faults, record=record, rate_limit=rate_limit
        )
        self._responder = responder or _echo
        self._models = None if model_names is None else tuple(model_names)
        self._structured = structured
        behaviour = embeddings or EmbeddingBehaviour(max_inputs=100)
        # Gemini keeps the request order; only OpenAI-style replies carry an index to shuffle.
        self.embeddings = dataclasses.replace(behaviour, shuffle=False)
        self.blocked = frozenset(blocked)
        self.recitation = frozenset(recitation)
        self.thoughts_tokens = thoughts_tokens

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: the API root, as google-genai's ``base_url``."""
        return f"http://127.0.0.1:{self.port}"

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/{version:v1beta|v1}/models/{target}", self._model_call)

    async def _model_call(self, request: web.Request) -> web.StreamResponse:
        _, _, method = request.match_info["target"].partition(":")
        if method == "batchEmbedContents":
            return await self._serve(request, "embeddings")
        if method != "generateContent":
            return _error(404, f"Method {method!r} is not found for this test server.")
        return await self._serve(request, "chat")

    def _prompt(self, body: dict[str, Any], kind: str) -> str:
        if kind == "embeddings":
            texts = _embed_texts(body)
            return texts[0] if texts else ""
        return _turn_text(body.get("contents"), last=True)

    def _authorized(self, request: web.Request) -> bool:
        if self._api_key is None:
            return True
        given = request.headers.get("x-goog-api-key") or request.query.get("key", "")
        return hmac.compare_digest(given.encode(), self._api_key.encode())

    def _auth_error(self, request: web.Request) -> web.Response:
        # Never echo the key the client sent: tests check that it cannot leak through errors.
        if not (request.headers.get("x-goog-api-key") or request.query.get("key")):
            msg = (
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API."
            )
            return _error(403, msg)
        info = {
            "@type": _TYPE + "ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"},
        }
        return _error(400, "API key not valid. Please pass a valid API key.", details=[info])

    def _bad_body(self) -> web.Response:
        return _error(400, "Invalid JSON payload received. Unexpected token.")

    def _precheck(self, request: web.Request, body: dict[str, Any] | None) -> web.Response | None:
        model = request.match_info["target"].partition(":")[0]
        if self._models is not None and model not in self._models:
            return _error(404, f"models/{model} is not found for API version v1beta.")
        return None

    def _refuse(self, body: dict[str, Any], kind: str) -> web.Response | None:
        if kind == "embeddings":
            return None
        config = body.get("generationConfig")
        schema = config.get("responseSchema") if isinstance(config, Mapping) else None
        unknown = _unknown_keyword(schema) if schema is not None else None
        if unknown is None:
            return None
        msg = (
            f'Invalid JSON payload received. Unknown name "{unknown}" at '
            "'generation_config.response_schema': Cannot find field."
        )
        return _error(400, msg)

    def _token_cost(self, body: dict[str, Any], kind: str) -> float:
        if kind == "embeddings":
            return float(sum(tokens(text) for text in _embed_texts(body)))
        config = body.get("generationConfig")
        limit = config.get("maxOutputTokens") if isinstance(config, Mapping) else None
        return float(_prompt_tokens(body) + (limit if isinstance(limit, int) else 16))

    def _rate_limited(self, rejection: Rejection) -> web.Response:
        return _quota_error(PER_MINUTE, rejection.wait, QUOTA_MESSAGE)

    def _status_response(self, action: Status) -> web.Response:
        if action.code == 429:
            message = action.message or QUOTA_MESSAGE
            response = _quota_error(action.error_code or PER_MINUTE, action.retry_after, message)
        else:
            response = _error(action.code, action.message or status_phrase(action.code))
        response.headers.update(action.headers)
        return response

    def _answer(
        self, request: web.Request, ex: Exchange, body: dict[str, Any], action: Reply
    ) -> web.Response:
        if ex.kind == "embeddings":
            return self._embed(ex, body)
        contents = [c for c in body.get("contents") or [] if isinstance(c, dict)]
        row = _turn_text(contents, last=False)
        faults = self._structured or StructuredFaults()
        usage = {"promptTokenCount": _prompt_tokens(body)}
        if action.text is None and row in self.blocked:
            feedback = {"blockReason": "SAFETY", "safetyRatings": []}
            return web.json_response({"promptFeedback": feedback, "usageMetadata": usage})
        finish = "STOP"
        text: str | None
        schema = _response_schema(body)
        if action.text is not None:
            text = action.text
        elif row in faults.refuse:
            text, finish = None, "SAFETY"
        elif row in self.recitation:
            text, finish = None, "RECITATION"
        elif schema is not None:
            user_turns = sum(1 for c in contents if c.get("role", "user") == "user")
            reasked = any(c.get("role") == "model" for c in contents)
            shaped = _structured.shaped(
                schema, row, reasked=reasked, user_turns=user_turns, faults=self._structured
            )
            text = shaped.text
            finish = "MAX_TOKENS" if shaped.finish_reason == "length" else "STOP"
        else:
            text = self._responder(contents, body)
            if row in faults.truncate:
                text, finish = text[: len(text) // 2], "MAX_TOKENS"
        candidate: dict[str, Any] = {"finishReason": finish, "index": 0}
        if text is not None:
            candidate["content"] = {"parts": [{"text": text}], "role": "model"}
        output = tokens(text or "")
        usage["candidatesTokenCount"] = output
        if self.thoughts_tokens:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        usage["totalTokenCount"] = usage["promptTokenCount"] + output + self.thoughts_tokens
        return web.json_response(
            {"candidates": [candidate], "usageMetadata": usage, "modelVersion": "test"}
        )

    def _embed(self, ex: Exchange, body: dict[str, Any]) -> web.Response:
        texts = _embed_texts(body)
        requests = body.get("requests")
        if not texts or not isinstance(requests, list) or len(texts) != len(requests):
            return _error(400, "* BatchEmbedContentsRequest.requests: each needs content.parts")
        behaviour = self.embeddings
        if behaviour.max_inputs is not None and len(texts) > behaviour.max_inputs:
            return _error(
                400,
                "* BatchEmbedContentsRequest.requests: at most "
                f"{behaviour.max_inputs} requests can be in one batch",
            )
        reason = _embeddings.rejection(texts, behaviour)
        if reason is not None:
            return _error(400, reason)
        vectors = []
        for text, one in zip(texts, requests, strict=True):
            dimensions = one.get("outputDimensionality", behaviour.dimensions)
            if behaviour.ignore_dimensions:
                dimensions = behaviour.dimensions
            if not isinstance(dimensions, int) or dimensions < 1:
                return _error(400, f"outputDimensionality must be positive, got {dimensions!r}")
            vectors.append({"values": _embeddings.draw(text, dimensions, behaviour.seed).tolist()})
        ex.inputs = texts
        return web.json_response({"embeddings": vectors})


def _error(code: int, message: str, *, details: list[dict[str, Any]] | None = None) -> web.Response:
    status = STATUS_NAMES.get(code, "INTERNAL" if code >= 500 else "FAILED_PRECONDITION")
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=code)


def _quota_error(quota_id: str, retry_delay: float | None, message: str) -> web.Response:
    """A 429 RESOURCE_EXHAUSTED naming its quota, with a RetryInfo when there is a delay."""
    violation = {
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
        "quotaId": quota_id,
        "quotaDimensions": {"location": "global", "model": "test-model"},
        "quotaValue": "50",
    }
    details: list[dict[str, Any]] = [
        {"@type": _TYPE + "QuotaFailure", "violations": [violation]},
        {
            "@type": _TYPE + "Help",
            "links": [{"description": "Learn more", "url": "https://ai.google.dev/"}],
        },
    ]
    if retry_delay is not None:
        # A protobuf Duration in JSON: seconds with up to nine decimals, then "s".
        seconds = math.ceil(retry_delay * 1000 - 1e-6) / 1000
        delay = f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
        details.append({"@type": _TYPE + "RetryInfo", "retryDelay": delay})
    return _error(429, message, details=details)


def _unknown_keyword(schema: Any) -> str | None:
    """The first keyword in a responseSchema that Gemini's Schema object does not have."""
    if isinstance(schema, list):
        named = [k for item in schema if (k := _unknown_keyword(item)) is not None]
        return named[0] if named else None
    if not isinstance(schema, Mapping):
        return None
    for key, value in schema.items():
        if key not in SCHEMA_FIELDS:
            return str(key)
        nested = value.values() if key == "properties" and isinstance(value, Mapping) else [value]
        if key in ("properties", "items", "anyOf"):
            for item in nested:
                if (inner := _unknown_keyword(item)) is not None:
                    return inner
    return None


def _response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    config = body.get("generationConfig")
    if not isinstance(config, Mapping) or config.get("responseMimeType") != "application/json":
        return None
    schema = config.get("responseSchema", config.get("responseJsonSchema"))
    return dict(schema) if isinstance(schema, Mapping) else None


def _parts_text(content: Any) -> str:
    parts = content.get("parts") if isinstance(content, Mapping) else None
    if not isinstance(parts, list):
        return ""
    return "".join(
        p["text"] for p in parts if isinstance(p, Mapping) and isinstance(p.get("text"), str)
    )


def _turn_text(contents: Any, *, last: bool) -> str:
    """The text of the last (or first) user turn; a turn with no role is the user's."""
    if not isinstance(contents, list):
        return ""
    turns = [c for c in contents if isinstance(c, Mapping) and c.get("role", "user") == "user"]
    if not turns:
        return ""
    return _parts_text(turns[-1] if last else turns[0])


def _prompt_tokens(body: dict[str, Any]) -> int:
    contents = body.get("contents")
    turns = contents if isinstance(contents, list) else []
    system = _parts_text(body.get("systemInstruction"))
    return sum(tokens(_parts_text(turn)) for turn in turns) + (tokens(system) if system else 0)


def _embed_texts(body: dict[str, Any]) -> list[str]:
    requests = body.get("requests")
    if not isinstance(requests, list):
        return []
    return [_parts_text(one.get("content")) for one in requests if isinstance(one, Mapping)]


def _echo(contents: list[dict[str, Any]], body: dict[str, Any]) -> str:
    return "echo: " + _turn_text(contents, last=True)
